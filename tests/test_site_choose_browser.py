"""The chooser, the compare page's settings, the typology matrix and the primitives page in a real browser
(headless chromium): filtering and ranking equal the view's counts, matched settings change the counts and the
column headers, differing rows are marked, matrix cells link to their provenance, no raw TeX, no page overflow.

One browser session and one small site build serve the module; each test loads its page afresh (no stored state,
the address names everything) and waits for conditions, never for time.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from pefref.language.catalog import default_catalog
from pefref.render.site.build import build_site
from pefref.view.params import count_params

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
IDS = ["bitfit", "houlsby_adapter", "ia3", "ladder_side_tuning", "lora", "prompt_tuning", "vera"]
MODEL = "llama-2-7b"


@pytest.fixture(scope="module")
def catalog():
    return default_catalog()


@pytest.fixture(scope="module")
def site(tmp_path_factory, catalog) -> Path:
    small = replace(catalog, techniques={k: catalog.techniques[k] for k in IDS})
    out = tmp_path_factory.mktemp("choose-site")
    build_site(out, catalog=small)
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


def _open(driver, out: Path, page: str, ready: str) -> None:
    """Load ``page`` in a known state (no stored state; the address holds the query) and wait for ``ready`` (CSS)."""
    from selenium.webdriver.support.ui import WebDriverWait

    path, _, query = page.partition("?")
    driver.get((out / path).as_uri() + (f"?{query}" if query else ""))
    driver.execute_script("try { localStorage.clear(); sessionStorage.clear(); } catch (e) {}")
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(f"return !!document.querySelector({ready!r});"))


def _wait(driver, condition) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: condition())


def _ranked(driver) -> list[str]:
    return driver.execute_script("return Array.from(document.querySelectorAll('#choices tbody tr')).map(r => r.dataset.id);")


def _expected(catalog, budget: float | None = None, mergeable: bool = False) -> list[str]:
    """The techniques that fit, smallest first, from the view's own counts."""
    shape = catalog.shape(MODEL)
    fam = catalog.family(shape.family)
    from pefref.view.choose import family_facts

    rows = []
    for tid in IDS:
        pc = count_params(catalog.techniques[tid], shape, catalog, formula=False)
        if pc.trainable == 0 and pc.dropped:
            continue
        if budget is not None and pc.trainable > budget:
            continue
        if mergeable and not next(f for f in family_facts(catalog.techniques[tid], catalog) if f.family == fam.family).mergeable:
            continue
        rows.append((pc.trainable, catalog.techniques[tid].name, tid))
    return [tid for _n, _name, tid in sorted(rows)]


def test_chooser_filters_and_ranks_by_the_views_counts(browser, site, catalog) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, site, "choose.html", "#chooser:not([hidden])")
    fits = _expected(catalog)
    assert _ranked(browser)[: len(fits)] == fits  # the techniques that fit, smallest first, n/a after them
    budget = browser.find_element(By.ID, "choose-budget")
    budget.send_keys("1M")
    want = _expected(catalog, budget=1e6)
    _wait(browser, lambda: _ranked(browser) == want)
    assert 0 < len(want) < len(fits)
    budget.clear()
    base = next(s for s in browser.execute_script("return JSON.parse(document.getElementById('choose-data').textContent).shapes;")
                if s["name"] == MODEL)["base"]
    budget.send_keys("0.01%")
    want = _expected(catalog, budget=1e-4 * base)
    _wait(browser, lambda: _ranked(browser) == want)
    browser.find_element(By.ID, "choose-mergeable").click()
    want = _expected(catalog, budget=1e-4 * base, mergeable=True)
    _wait(browser, lambda: _ranked(browser) == want)
    assert "houlsby_adapter" not in want
    status = browser.find_element(By.ID, "choose-status").text
    assert status.startswith(f"{len(want)} of {len(IDS)} techniques fit {MODEL}")


def test_compare_settings_and_differing_rows(browser, site, catalog) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(browser, site, "compare.html?ids=lora,ia3,nosuch", "#picker:not([hidden])")
    status = browser.find_element(By.ID, "compare-status")
    assert "Unknown: nosuch" in status.text
    head = browser.find_element(By.CSS_SELECTOR, 'thead th[data-col="lora"]')
    assert "r=8" in head.text and "sites: attn.q, attn.v" in head.text
    cell = browser.find_element(By.CSS_SELECTOR, '#matched-row td[data-col="lora"]')
    shape = catalog.shape(MODEL)
    assert cell.text == f"{count_params(catalog.techniques['lora'], shape, catalog).trainable:,}"
    Select(browser.find_element(By.ID, "set-size")).select_by_value("16")
    want = f"{count_params(catalog.techniques['lora'], shape, catalog, overrides={'r': 16}).trainable:,}"
    _wait(browser, lambda: cell.text == want)
    assert "r=16" in head.text
    Select(browser.find_element(By.ID, "set-sites")).select_by_value("q, k, v, o")
    want = f"{count_params(catalog.techniques['lora'], shape, catalog, overrides={'r': 16}, sites=['attn.q', 'attn.k', 'attn.v', 'attn.o']).trainable:,}"
    _wait(browser, lambda: cell.text == want)
    assert "sites: q, k, v, o" in head.text
    # rows whose shown values differ are marked; the same ones are not
    marks = browser.execute_script(
        "var out = {}; document.querySelectorAll('#comparison tbody tr').forEach(function (r) {"
        " var h = r.querySelector('th[scope=row]'); if (h) out[h.textContent.trim()] = r.classList.contains('differs'); });"
        " return out;")
    assert marks["Forms"] is True and marks["parameter sharing"] is False
    browser.find_element(By.ID, "only-differ").click()
    _wait(browser, lambda: not browser.find_element(By.XPATH, "//tr[th[normalize-space()='parameter sharing']]").is_displayed())
    # the unknown id's message goes once the picker is used
    Select(browser.find_element(By.ID, "pick")).select_by_value("vera")
    browser.find_element(By.ID, "pick-add").click()
    _wait(browser, lambda: "Unknown" not in status.text and "Comparing 3" in status.text)


def test_index_filter_finds_typology_values(browser, site) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, site, "index.html", "#index-controls:not([hidden])")
    browser.find_element(By.ID, "filter").send_keys("low-rank")
    _wait(browser, lambda: browser.find_element(By.ID, "filter-count").text.startswith("3 of"))  # an intra connectivity
    shown = browser.execute_script("return Array.from(document.querySelectorAll('#techniques tbody tr')).filter(r => !r.hidden).map(r => r.dataset.id);")
    assert sorted(shown) == ["ladder_side_tuning", "lora", "vera"]
    bar = browser.find_element(By.CSS_SELECTOR, ".compare-bar button[type=submit]")
    assert bar.location["y"] < browser.find_element(By.ID, "techniques").location["y"]  # above the table, not under it


def test_typology_matrix_links_to_provenance(browser, site) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, site, "typology.html", "#typology")
    link = browser.find_element(By.CSS_SELECTOR, '#typology a.cell[href$="techniques/lora.html#typology-intra_connectivity"]')
    assert link.text == "low-rank"
    link.click()
    _wait(browser, lambda: browser.current_url.endswith("techniques/lora.html#typology-intra_connectivity"))
    row = browser.find_element(By.ID, "typology-intra_connectivity")
    assert "low-rank" in row.text and "lora" in row.text
    _open(browser, site, "typology.html", "#graph-similarity svg")
    assert browser.execute_script("return document.querySelectorAll('#graph-similarity svg a').length;") >= len(IDS)
    assert browser.find_elements(By.CSS_SELECTOR, "#graph-similarity ul.legend li")


def test_primitives_page_has_no_raw_tex(browser, site) -> None:
    _open(browser, site, "primitives.html", "#ops")
    text = browser.execute_script("return document.body.innerText;")
    import re

    assert not re.search(r"\\[A-Za-z]+", text), re.search(r".{30}\\[A-Za-z]+.{30}", text)
    assert not re.search(r":(math|func):`", text)
    assert browser.execute_script("return document.querySelectorAll('math').length;") > 40
    width = browser.execute_script("var m = document.querySelector('math'); return m.getBoundingClientRect().width;")
    assert width > 0  # the browser lays MathML out


@pytest.mark.parametrize("width", [1440, 390])
def test_no_page_overflows(browser, site, width) -> None:
    """Every page kind of this build, at a wide and a phone width: the page never scrolls sideways."""
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 500})
    try:
        for page in ("index.html", "choose.html", "compare.html?ids=lora,ia3,prompt_tuning", "techniques/lora.html",
                     "techniques/ladder_side_tuning.html", "typology.html", "models.html", "primitives.html", "schema.html",
                     "compositions.html"):
            _open(browser, site, page, "main")
            inner, scroll = browser.execute_script("return [window.innerWidth, document.documentElement.scrollWidth];")
            assert inner == width, f"{page}: viewport {inner}px, not {width}px"
            assert scroll <= inner, f"{page}: {scroll}px wide at {width}px"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
