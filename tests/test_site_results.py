"""``pefref site --results DIR``: an experiment's results as pages of the site (ranking, every run, plots),
linked from every page, with working links, and rendered by a real browser (headless chromium)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from pefref.experiments.results import load_results
from pefref.experiments.runner import run_experiment
from pefref.experiments.site_view import results_view
from pefref.render.site.build import build_site, site_files

from .site_util import scan
from .test_site_browser import browser  # noqa: F401  (the one chromium session of that module's kind)

DATA = Path(__file__).resolve().parents[1] / "catalog" / "experiments" / "data" / "rt_polarity"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("results")
    exp = folder / "tiny.yaml"
    exp.write_text(f"""id: tiny
model: {{shape: tiny-bert}}
task: {{type: sequence_classification, max_length: 32}}
data: {{train: {DATA / 'train.jsonl'}, eval: {DATA / 'test.jsonl'}, limit_train: 32, limit_eval: 16}}
grid:
  - baseline: head_only
  - technique: lora
  - composition: lora_ia3_stack
learning_rates: [1.0e-2]
seeds: [0, 1]
training: {{batch_size: 8, max_steps: 2, threads: 1}}
""")
    out = run_experiment(exp, folder / "out", progress=False)
    assert len(out.done) == 6 and not out.failed
    return folder / "out"


@pytest.fixture(scope="module")
def small(catalog):
    return replace(catalog, techniques={k: catalog.techniques[k] for k in ("lora", "ia3")})


@pytest.fixture(scope="module")
def files(small, results) -> dict[str, bytes]:
    return site_files(small, results=results_view(results))


def test_results_pages_and_plots_exist(files, results) -> None:
    assert "results.html" in files
    for name in ("metric_vs_params", "curves", "cost"):
        svg = files[f"results/tiny/{name}.svg"].decode()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    html = files["results.html"].decode()
    res = load_results(results)
    ranked = re.findall(r'<th scope="row" data-sort="[^"]*">([^<(]+?)(?: <span|</th>)', html.split('id="runs-tiny"')[0])
    assert ranked == [g.label for g in res.groups] and len(ranked) == 3
    best = res.groups[0].metrics["accuracy"]
    assert f"{best.mean:.3f} ± {best.std:.3f}" in html
    assert html.count("<code>") >= 6 and all(r.id in html for r in res.runs)  # every run, by id
    assert 'href="techniques/lora.html"' in html and 'href="techniques/ia3.html"' not in html.split("lora_ia3_stack")[0]


def test_every_page_links_the_results_and_links_resolve(files) -> None:
    pages = {p: c.decode() for p, c in files.items() if p.endswith(".html")}
    broken = []
    for page, html in pages.items():
        s = scan(html)
        assert ("a", "../results.html" if "/" in page else "results.html") in s.links, page
        for _tag, url in s.links:
            parts = urlsplit(url)
            if parts.scheme or parts.netloc:
                continue
            target = re.sub(r"(^|/)[^/]+/\.\./", r"\1", (Path(page).parent / unquote(parts.path)).as_posix()) if parts.path else page
            if target not in files:
                broken.append(f"{page}: {url}")
    assert not broken, broken[:10]


def test_without_results_there_is_no_results_page(small) -> None:
    plain = site_files(small)
    assert "results.html" not in plain and not any(p.startswith("results/") for p in plain)
    assert b"results.html" not in plain["index.html"]


def test_a_browser_renders_the_results_page(browser, small, results, tmp_path) -> None:  # noqa: F811
    build_site(tmp_path, catalog=small, results=results_view(results))
    browser.get((tmp_path / "results.html").as_uri())
    loaded = browser.execute_script(
        "return Array.from(document.images).map(function (i) { return [i.getAttribute('src'), i.complete && i.naturalWidth > 0]; });")
    assert len(loaded) == 3 and all(ok for _src, ok in loaded), loaded
    rows = browser.execute_script("return document.querySelectorAll('#ranking-tiny tbody tr').length;")
    assert rows == 3
    assert browser.get_screenshot_as_png()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_results_page_fits_at_390_and_1440(browser, small, results, tmp_path) -> None:  # noqa: F811
    """The results page never scrolls sideways (its tables scroll or become cards, its plots pan in their frames)."""
    from .test_site_browser import _open

    build_site(tmp_path, catalog=small, results=results_view(results))
    wide = "return [document.documentElement.scrollWidth - window.innerWidth, window.innerWidth];"
    metrics = {"width": 1440, "height": 900, "deviceScaleFactor": 1, "mobile": False}
    try:
        for width in (1440, 390):
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "width": width, "mobile": width < 600})
            _open(browser, (tmp_path / "results.html").as_uri())
            over, inner = browser.execute_script(wide)
            assert inner == width and over <= 0, f"results.html is {over}px too wide at {width}"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
