"""The whole site in a real browser (headless chromium): every technique and composition page's diagram is scaled to
its column at 1440 and 390 px (at 1440 px whole, with text of at least 10 px), no page scrolls sideways at either
width, the Full size control pans inside its frame, the compare page's diagrams, and honest applicability (n/a with
its reason, test shapes hidden until asked for).

One browser session and one full site build serve the module; every technique page is checked in one loop.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from pefref.render.site.build import build_site

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MIN_TEXT_PX = 10.0

_DIAGRAM = """
var fig = document.querySelector('figure.diagram'); if (!fig) return null;
var frame = fig.querySelector('.frame'), svg = frame.querySelector('svg');
var box = svg.getBoundingClientRect(), inner = frame.getBoundingClientRect();
var scale = box.width / svg.viewBox.baseVal.width, least = 1e9, smallest = '';
svg.querySelectorAll('text').forEach(function (t) {
  if (!t.textContent.trim()) return;
  var px = parseFloat(t.getAttribute('font-size') || getComputedStyle(t).fontSize) * scale;
  if (px < least) { least = px; smallest = t.textContent; }
});
return {svg: box.width, frame: inner.width, column: fig.parentNode.getBoundingClientRect().width,
        pans: getComputedStyle(frame).overflowX === 'auto' && frame.scrollWidth > frame.clientWidth,
        least: least, smallest: smallest, texts: svg.querySelectorAll('text').length};
"""


@pytest.fixture(scope="module")
def full_site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fullsite")
    build_site(out)
    return out


@pytest.fixture(scope="module")
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.fail(f"{path} is missing: install Debian's chromium and chromium-driver (./run.sh does, as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="pefref-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1440,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _phone(driver, on: bool) -> None:
    """A 390 px wide viewport (headless chromium's windows are at least 500 px wide, so the metrics are emulated)."""
    if on:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    else:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _overflow(driver) -> int:
    return driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth;")


def _open(driver, url: str) -> None:
    """Load a page and wait until it is laid out: the document complete, its fonts loaded, its images decoded."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && document.fonts.status === 'loaded'"
        " && Array.prototype.every.call(document.images, function (i) { return i.loading === 'lazy' || i.complete; });"))


_LABEL_CROSSINGS = """
var svg = document.querySelector('figure.diagram svg'), out = [], texts = [];
svg.querySelectorAll('g.node, g.cluster, g.edge').forEach(function (g) {
  var title = (g.querySelector('title') || {}).textContent || '';
  g.querySelectorAll('text').forEach(function (t) { if (t.textContent.trim()) texts.push([t.textContent, t.getBBox(), title]); });
});
svg.querySelectorAll('g.edge path').forEach(function (p) {
  var n = p.getTotalLength(), title = p.parentNode.querySelector('title').textContent;
  for (var s = 0; s <= n; s += 2) {
    var pt = p.getPointAtLength(s);
    texts.forEach(function (c) {
      var b = c[1];
      if (c[2] !== title && pt.x > b.x + 1 && pt.x < b.x + b.width - 1 && pt.y > b.y + 1 && pt.y < b.y + b.height - 1)
        out.push(title + ' through ' + c[0] + ' (' + c[2] + ')');
    });
  }
});
return Array.from(new Set(out));
"""


def _diagram_pages(site: Path) -> list[str]:
    return sorted(f"techniques/{p.name}" for p in (site / "techniques").glob("*.html")) + sorted(
        f"compositions/{p.name}" for p in (site / "compositions").glob("*.html"))


def _problems(browser, page: str, width: int) -> list[str]:
    """One page at one width: the page does not scroll sideways; the diagram is scaled to fit its frame, and the
    frame its column (no panning until asked for); at 1440 px its smallest text is >= 10 px and no edge runs through
    any text (real text boxes, paths sampled every 2 units; an edge's own label exempt)."""
    d = browser.execute_script(_DIAGRAM)
    if d is None or d["texts"] <= 5:
        return [f"{page}: no diagram"]
    out = [f"{page}: edge {c}" for c in browser.execute_script(_LABEL_CROSSINGS)] if width > 600 else []
    if _overflow(browser) > 0:
        out.append(f"{page}: the page is {_overflow(browser)}px too wide at {width}")
    if d["svg"] > d["frame"] + 0.5 or d["pans"]:
        out.append(f"{page}: diagram {d['svg']:.0f}px in a {d['frame']:.0f}px frame at {width} (not fitted)")
    if width < 600 and d["frame"] > d["column"] + 0.5:
        out.append(f"{page}: frame {d['frame']:.0f}px wider than its {d['column']:.0f}px column at {width}")
    if width > 600 and d["least"] < MIN_TEXT_PX:
        out.append(f"{page}: text {d['smallest']!r} at {d['least']:.1f}px at {width}")
    return out


def test_every_diagram_fits_with_readable_text(browser, full_site) -> None:
    """Every technique and composition page at 1440 px and at 390 px (:func:`_problems`): at both widths the diagram
    is scaled to its column by default; at 1440 every one is whole with text of at least 10 px."""
    pages = _diagram_pages(full_site)
    assert len(pages) > 40
    problems: list[str] = []
    browser.set_window_size(1440, 900)
    for page in pages:
        _open(browser, (full_site / page).as_uri())
        problems += _problems(browser, page, 1440)
    _phone(browser, True)
    try:
        for page in pages:
            _open(browser, (full_site / page).as_uri())
            problems += _problems(browser, page, 390)
        assert browser.execute_script("return window.innerWidth") == 390
    finally:
        _phone(browser, False)
    assert not problems, "\n".join(problems)


def test_full_size_control_pans_inside_the_frame(browser, full_site) -> None:
    """On a phone a diagram opens scaled to its column; "Full size" shows it at its own size (text >= 10 px), panned
    inside a frame that still fits the column; "Fit to width" brings the overview back."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _phone(browser, True)
    try:
        _open(browser, (full_site / "techniques" / "unipelt.html").as_uri())
        button = browser.find_element(By.CSS_SELECTOR, "figure.diagram button.zoom")
        assert button.get_attribute("aria-pressed") == "false"
        fit = browser.execute_script(_DIAGRAM)
        assert fit["svg"] <= fit["frame"] + 0.5 and fit["frame"] <= fit["column"] + 0.5 and not fit["pans"]
        button.click()
        WebDriverWait(browser, 10).until(lambda d: button.get_attribute("aria-pressed") == "true")
        full = browser.execute_script(_DIAGRAM)
        assert full["svg"] > 2 * fit["svg"] and full["pans"] and full["least"] >= MIN_TEXT_PX
        assert full["frame"] <= full["column"] + 0.5 and _overflow(browser) <= 0
        browser.execute_script("var f = document.querySelector('figure.diagram .frame'); f.scrollLeft = f.scrollWidth;")
        assert browser.execute_script("return document.querySelector('figure.diagram .frame').scrollLeft") > 0
        button.click()
        WebDriverWait(browser, 10).until(lambda d: button.get_attribute("aria-pressed") == "false")
        assert browser.execute_script(_DIAGRAM)["svg"] == fit["svg"]
    finally:
        _phone(browser, False)


def test_not_applicable_says_why_and_test_shapes_hide(browser, full_site) -> None:
    """BitFit on Llama (no biases) and prefix tuning on T5 (no attn.kv) read n/a with the reason, never 0; UniPELT on
    T5 says what it leaves out; tiny-* rows are hidden until the toggle shows them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get((full_site / "techniques" / "bitfit.html").as_uri())
    row = browser.find_element(By.CSS_SELECTOR, '#parameters tr:has(a[href$="#model-llama-2-7b"])')
    assert row.find_element(By.CSS_SELECTOR, "td.na").text == "n/a"
    assert "no bias" in row.text and " 0" not in row.text
    eff = browser.find_element(By.CSS_SELECTOR, "#efficiency tbody tr")
    assert "n/a" in eff.text and "Yes" not in eff.text
    tiny = browser.find_elements(By.CSS_SELECTOR, "#parameters tr.test-shape")
    assert tiny and not any(r.is_displayed() for r in tiny)
    browser.find_element(By.CSS_SELECTOR, "#parameters input.show-tests").click()
    WebDriverWait(browser, 10).until(lambda d: all(r.is_displayed() for r in tiny))
    browser.get((full_site / "techniques" / "prefix_tuning.html").as_uri())
    row = browser.find_element(By.CSS_SELECTOR, '#parameters tr:has(a[href$="#model-t5-base"])')
    assert "n/a" in row.text and "attn.kv" in row.text
    browser.get((full_site / "techniques" / "unipelt.html").as_uri())
    row = browser.find_element(By.CSS_SELECTOR, '#parameters tr:has(a[href$="#model-t5-base"])')
    assert "partial: leaves out prefix" in row.text
    browser.get((full_site / "index.html").as_uri())
    cell = browser.find_element(By.CSS_SELECTOR, "#row-bitfit td.na")
    assert cell.text == "n/a" and "no bias" in cell.get_attribute("title")
    browser.get((full_site / "models.html").as_uri())
    assert not any(c.is_displayed() for c in browser.find_elements(By.CSS_SELECTOR, ".test-shape"))


def test_index_table_fits_at_1440_with_more_columns_behind_a_toggle(browser, full_site) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(1440, 900)
    _open(browser, (full_site / "index.html").as_uri())
    box = "var s = document.querySelector('#techniques').closest('.scroll'); return s.scrollWidth - s.clientWidth;"
    assert browser.execute_script(box) <= 0
    more = browser.find_elements(By.CSS_SELECTOR, "#techniques thead th.more")
    assert len(more) == 3 and not any(th.is_displayed() for th in more)
    browser.find_element(By.CSS_SELECTOR, "label[for=more-columns]").click()
    WebDriverWait(browser, 10).until(lambda d: all(th.is_displayed() for th in more))
    assert browser.execute_script(box) > 0  # the three columns are back (the box scrolls again, as it did)
    _phone(browser, True)
    try:
        _open(browser, (full_site / "index.html").as_uri())
        cells = browser.find_elements(By.CSS_SELECTOR, "#row-lora td.more")
        assert len(cells) == 3 and all(c.is_displayed() for c in cells)  # the cards show every column
        assert _overflow(browser) <= 0
    finally:
        _phone(browser, False)


def test_compare_diagrams_fit_their_columns_with_full_size(browser, full_site) -> None:
    """compare.html: the diagrams follow the table's columns, one below the other at the page's width, each scaled to
    fit (no page overflow) with text of at least 10 px at 1440 px, an 'open full size' link to its SVG and the Full
    size control, which shows it at its own size inside its frame; on a phone each fits its column."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ids = ["lora", "molora_topk", "adalora"]
    browser.set_window_size(1440, 900)
    _open(browser, (full_site / "compare.html").as_uri() + "?ids=" + ",".join(ids))
    figs = [f for f in browser.find_elements(By.CSS_SELECTOR, "figure.compare-diagram") if f.is_displayed()]
    assert [f.get_attribute("data-col") for f in figs] == ids  # the picked techniques' diagrams, in the table's order
    for fig in figs:
        img = fig.find_element(By.CSS_SELECTOR, ".frame img")
        browser.execute_script("arguments[0].scrollIntoView()", img)  # loaded lazily, when scrolled to
        WebDriverWait(browser, 20).until(lambda d, i=img: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i))
        sizes = browser.execute_script(
            "var i = arguments[0], f = i.closest('.frame'); return [i.getBoundingClientRect().width, f.clientWidth, i.naturalWidth];", img)
        assert sizes[0] <= sizes[1] + 0.5 and sizes[0] >= min(sizes[2], 0.9 * sizes[1]) - 1  # fitted, never enlarged
        tid = fig.get_attribute("data-col")
        assert _least_text_px(full_site / "diagrams" / f"{tid}.svg", sizes[0]) >= MIN_TEXT_PX, tid  # readable where shown
        link = fig.find_element(By.CSS_SELECTOR, "a.open-full")
        assert link.get_attribute("href").endswith(".svg") and link.is_displayed()
    assert _overflow(browser) <= 0
    button = figs[1].find_element(By.CSS_SELECTOR, "button.zoom")
    button.click()
    WebDriverWait(browser, 10).until(lambda d: button.get_attribute("aria-pressed") == "true")
    img = figs[1].find_element(By.CSS_SELECTOR, "img")
    full = browser.execute_script("var i = arguments[0]; return [i.getBoundingClientRect().width, i.naturalWidth];", img)
    assert abs(full[0] - full[1]) <= 1
    assert _overflow(browser) <= 0
    _phone(browser, True)
    try:
        _open(browser, (full_site / "compare.html").as_uri() + "?ids=lora,molora_topk")
        shown = [f for f in browser.find_elements(By.CSS_SELECTOR, "figure.compare-diagram") if f.is_displayed()]
        assert len(shown) == 2
        for fig in shown:
            img = fig.find_element(By.CSS_SELECTOR, ".frame img")
            browser.execute_script("arguments[0].scrollIntoView()", img)
            WebDriverWait(browser, 20).until(lambda d, i=img: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i))
            w = browser.execute_script("var i = arguments[0]; return [i.getBoundingClientRect().width, i.closest('.frame').clientWidth];", img)
            assert w[0] <= w[1] + 0.5
        assert _overflow(browser) <= 0
    finally:
        _phone(browser, False)


def _least_text_px(svg: Path, shown_width: float) -> float:
    """The smallest text of a drawing shown ``shown_width`` px wide: its smallest font size scaled by the width over
    its viewBox's."""
    import re

    text = svg.read_text(encoding="utf-8")
    view_w = float(re.search(r'viewBox="[-\d.]+ [-\d.]+ ([\d.]+)', text).group(1))  # type: ignore[union-attr]
    return min(float(x) for x in re.findall(r'font-size="([\d.]+)"', text)) * shown_width / view_w


def test_a_mixture_of_experts_is_drawn_as_router_experts_and_sum(browser, full_site) -> None:
    _open(browser, (full_site / "techniques" / "molora.html").as_uri())
    texts = browser.execute_script("return Array.from(document.querySelectorAll('figure.diagram svg text')).map(function (t) { return t.textContent; });")
    assert "router" in texts and "expert 1" in texts and "weighted sum" in texts


def test_a_mixed_stack_is_drawn_as_numbered_experts_with_its_router(browser, full_site) -> None:
    """Poly's skills (a stack its router's weights mix) as a row of numbered experts, beside a router fed by the task
    ids; CorDA's covariance as a dashed input; OSF's gradient projection as an annotation (all from structure)."""
    def texts(page: str) -> list[str]:
        _open(browser, (full_site / "techniques" / page).as_uri())
        return browser.execute_script("return Array.from(document.querySelectorAll('figure.diagram svg text')).map(function (t) { return t.textContent; });")

    poly = texts("poly.html")
    assert "router" in poly and "expert 1" in poly and "expert n_skills" in poly and "task_ids: [batch]" in poly
    assert "C = cov(x) on calibration data" in texts("corda.html")
    assert "training: gradient projection" in texts("osf.html")


def test_typology_matrix_fits_at_1440_with_training_time_and_initialisation(browser, full_site) -> None:
    """The typology matrix, with its training-time and initialisation columns, fits its page at 1440 px (its box does
    not scroll); each of those cells links to the section of the technique's page that says it."""
    from selenium.webdriver.common.by import By

    browser.set_window_size(1440, 900)
    _open(browser, (full_site / "typology.html").as_uri())
    box = "var s = document.querySelector('#typology').closest('.scroll'); return s.scrollWidth - s.clientWidth;"
    assert browser.execute_script(box) <= 0 and _overflow(browser) <= 0
    row = browser.find_element(By.CSS_SELECTOR, '#typology tr:has(a[href$="techniques/osf.html"])')
    assert row.find_element(By.CSS_SELECTOR, "td.training-time a").get_attribute("href").endswith("osf.html#training")
    assert "gradient projection" in row.find_element(By.CSS_SELECTOR, "td.training-time").text
    row = browser.find_element(By.CSS_SELECTOR, '#typology tr:has(a[href$="techniques/corda.html"])')
    assert row.find_element(By.CSS_SELECTOR, "td.initialisation").text == "calibration data"
