"""The site in a real browser (Debian's headless chromium through chromedriver): the compare page's
picker and address, the index's filter, sort and selection, and a phone-width layout.

One browser session serves the whole module, on a site built from a few catalog techniques.
Chromium missing is a failure, not a skip: ``run.sh`` installs it (``ensure_chromium``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from pefref.render.site.build import build_site

from .site_util import pick

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _composition_with_standalone_techniques(catalog) -> tuple[str, list[str]]:
    """The first catalog composition whose techniques stand alone (so a small catalog can hold them), and those ids."""
    from pefref.language.catalog import catalog_root
    from pefref.language.loader import load_file
    from pefref.language.schema import Composition

    alone = set(pick(catalog, len(catalog.techniques)))
    for f in sorted((catalog_root() / "compositions").glob("*.yaml")):
        comp, _ = load_file(Composition, f)
        techs = sorted({u.technique for u in comp.techniques})
        if set(techs) <= alone and len(techs) <= 4:
            return comp.id, techs
    pytest.fail("no catalog composition uses only standalone techniques")


@pytest.fixture(scope="module")
def composition(catalog) -> tuple[str, list[str]]:
    return _composition_with_standalone_techniques(catalog)


@pytest.fixture(scope="module")
def site(tmp_path_factory, catalog, composition) -> tuple[Path, list[str], dict]:
    """A site of four techniques: those of one composition (which gets its page) and standalone ones."""
    ids = list(composition[1])
    ids += [k for k in pick(catalog, 8) if k not in ids][: 4 - len(ids)]
    ids.sort()
    small = replace(catalog, techniques={k: catalog.techniques[k] for k in ids})
    out = tmp_path_factory.mktemp("site")
    build_site(out, catalog=small)
    return out, ids, small


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
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _url(out: Path, page: str) -> str:
    return (out / page).as_uri()


WAIT_S = 60
"""How long a condition may take to hold (generous for a loaded machine); tests wait for conditions, never for time."""


def _until(driver, value, expected):
    """``value(driver)`` once it equals ``expected`` (or, after :data:`WAIT_S`, whatever it is then, for the assert)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    with contextlib.suppress(TimeoutException):
        WebDriverWait(driver, WAIT_S).until(lambda d: value(d) == expected)
    return value(driver)


def _navigate(driver, go) -> None:
    """Run ``go`` (which navigates) and wait until a new document has loaded and its scripts have run.

    The page being left is marked first; the wait ends when the current document lacks the mark and is
    complete (deferred scripts and DOMContentLoaded handlers run before that). Without it, a reload of
    the same address could be read while the new document was still parsing: every column shown.
    """
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.pefrefLeaving = true;")
    go()
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("return !window.pefrefLeaving && document.readyState === 'complete';"))


def _open(driver, url: str) -> None:
    _navigate(driver, lambda: driver.get(url))


def _shown_columns(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#comparison thead th[data-col]'))"
        ".filter(function (c) { return !c.hidden && c.offsetParent !== null; })"
        ".map(function (c) { return c.getAttribute('data-col'); });"
    )


def _ids_in_address(driver) -> list[str]:
    q = parse_qs(urlsplit(driver.current_url).query).get("ids", [])
    return [x for v in q for x in v.split(",")]


def test_compare_picker_adds_drops_and_keeps_the_address(browser, site) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out, ids, _ = site
    a, b, _c, d = ids
    _open(browser, _url(out, "compare.html") + f"?ids={b},{a},nonexistent")
    assert _shown_columns(browser) == [b, a]
    assert _ids_in_address(browser) == [b, a]
    assert "nonexistent" in browser.find_element(By.ID, "compare-status").text
    every_row = browser.execute_script(
        "return Array.from(document.querySelectorAll('#comparison tbody tr')).filter(function (r) {"
        " return r.querySelector('td[data-col]'); }).map(function (r) {"
        " return Array.from(r.querySelectorAll('td[data-col]')).filter(function (c) { return !c.hidden; })"
        ".map(function (c) { return c.getAttribute('data-col'); }).join(','); });"
    )
    assert every_row and set(every_row) == {f"{b},{a}"}

    Select(browser.find_element(By.ID, "pick")).select_by_value(d)
    browser.find_element(By.ID, "pick-add").click()
    assert _until(browser, _shown_columns, [b, a, d]) == [b, a, d]
    assert _ids_in_address(browser) == [b, a, d]

    browser.find_element(By.CSS_SELECTOR, f'#chosen button[data-id="{a}"]').click()
    assert _until(browser, _shown_columns, [b, d]) == [b, d]
    assert _ids_in_address(browser) == [b, d]
    chips = [li.get_attribute("data-id") for li in browser.find_elements(By.CSS_SELECTOR, "#chosen li")]
    assert chips == [b, d]

    shared = browser.current_url  # the address alone reproduces the comparison: a new document, loaded from it
    _open(browser, shared)
    assert _shown_columns(browser) == [b, d]

    browser.find_element(By.ID, "pick-clear").click()
    assert _until(browser, _shown_columns, ids) == ids
    assert _ids_in_address(browser) == []


def test_index_filter_sort_and_compare_selection(browser, site) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out, ids, small = site
    _open(browser, _url(out, "index.html"))

    def visible() -> list[str]:
        return browser.execute_script(
            "return Array.from(document.querySelectorAll('#techniques tbody tr'))"
            ".filter(function (r) { return !r.hidden; }).map(function (r) { return r.getAttribute('data-id'); });"
        )

    assert sorted(visible()) == ids
    box = browser.find_element(By.ID, "filter")
    target = small.techniques[ids[2]]
    box.send_keys(target.name)
    assert ids[2] in visible() and len(visible()) < len(ids)
    assert browser.find_element(By.ID, "filter-count").text.startswith(f"{len(visible())} of {len(ids)}")
    box.clear()
    box.send_keys(" ")  # an input event with an empty filter
    assert sorted(visible()) == ids

    forms = {tid: {m.form for m in small.techniques[tid].modules if hasattr(m, "form")} for tid in ids}
    form = min(forms[ids[0]])
    Select(browser.find_element(By.ID, "form-filter")).select_by_value(form)
    assert sorted(visible()) == sorted(t for t in ids if form in forms[t])
    Select(browser.find_element(By.ID, "form-filter")).select_by_value("")

    year_button = browser.find_element(By.CSS_SELECTOR, '#techniques th[data-key="year"] button')
    year_button.click()
    years = [small.techniques[t].paper.year for t in visible()]
    assert years == sorted(years)
    year_button.click()
    years = [small.techniques[t].paper.year for t in visible()]
    assert years == sorted(years, reverse=True)
    head = browser.find_element(By.CSS_SELECTOR, '#techniques th[data-key="year"]')
    assert head.get_attribute("aria-sort") == "descending"

    for tid in (ids[3], ids[1]):
        browser.find_element(By.CSS_SELECTOR, f'#row-{tid} input[type="checkbox"]').click()
    _navigate(browser, browser.find_element(By.CSS_SELECTOR, '#index-form button[type="submit"]').click)
    assert urlsplit(browser.current_url).path.endswith("/compare.html")
    assert sorted(_shown_columns(browser)) == sorted([ids[1], ids[3]])
    assert sorted(_ids_in_address(browser)) == sorted([ids[1], ids[3]])


def test_pages_fit_a_phone(browser, site, composition) -> None:
    """At a phone's width (390 px, emulated: headless chromium's windows are at least 500 px wide) the page itself
    never scrolls sideways: wide tables scroll inside their box or show their rows as cards."""
    out, ids, _ = site
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    try:
        for page in ("index.html", f"compare.html?ids={ids[0]},{ids[1]}", f"techniques/{ids[0]}.html", "typology.html",
                     "choose.html", "models.html", "primitives.html", "schema.html", "compositions.html",
                     f"compositions/{composition[0]}.html"):
            path, _, query = page.partition("?")
            _open(browser, _url(out, path) + (f"?{query}" if query else ""))
            width, inner = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth];")
            assert inner == 390, f"{page}: the viewport is {inner}px, not the emulated 390px"
            assert width <= inner, f"{page}: {width}px wide in a {inner}px window"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_composition_page_draws_its_diagram(browser, site, composition) -> None:
    """A composition's page renders its architecture diagram (inline SVG with a nonzero size), reachable from the nav."""
    from selenium.webdriver.common.by import By

    out, _, _ = site
    cid, techs = composition
    _open(browser, _url(out, "compositions.html"))
    _navigate(browser, browser.find_element(By.CSS_SELECTOR, f'#row-{cid} a[href="compositions/{cid}.html"]').click)
    assert urlsplit(browser.current_url).path.endswith(f"/compositions/{cid}.html")
    size = browser.execute_script(
        "var s = document.querySelector('#diagram svg'); if (!s) return null;"
        "var r = s.getBoundingClientRect(); return [r.width, r.height, s.querySelectorAll('g.node').length];")
    assert size is not None, "no diagram SVG on the composition page"
    width, height, nodes = size
    assert width > 0 and height > 0 and nodes > 0, size
    nav = browser.find_element(By.CSS_SELECTOR, 'header nav a[aria-current="page"]')
    assert nav.text == "Compositions"
    members = {a.get_attribute("href").rsplit("/", 1)[-1] for a in browser.find_elements(By.CSS_SELECTOR, "#member-table a")}
    assert {f"{t}.html" for t in techs} <= members


def test_cards_keep_a_sort_menu_on_a_phone(browser, site) -> None:
    """Under 600 px the index's rows are cards (the header row hidden): a "Sort by" menu sorts them instead."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out, _ids, small = site
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    try:
        _open(browser, _url(out, "index.html"))
        menu = browser.find_element(By.CSS_SELECTOR, "select.card-sort")
        assert menu.is_displayed()
        assert not browser.find_element(By.CSS_SELECTOR, '#techniques th[data-key="year"]').is_displayed()

        def years() -> list[int]:
            shown = browser.execute_script("return Array.from(document.querySelectorAll('#techniques tbody tr'))"
                                           ".map(function (r) { return r.getAttribute('data-id'); });")
            return [small.techniques[t].paper.year for t in shown]

        for label, order in (("Year ↓", sorted(years(), reverse=True)), ("Year ↑", sorted(years()))):
            Select(menu).select_by_visible_text(label)
            assert _until(browser, lambda _d: years(), order) == order
        head = browser.find_element(By.CSS_SELECTOR, '#techniques th[data-key="year"]')
        assert head.get_attribute("aria-sort") == "ascending"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.set_window_size(1280, 900)
    _open(browser, _url(out, "index.html"))
    assert not browser.find_element(By.CSS_SELECTOR, "select.card-sort").is_displayed()  # wide: the header's buttons
