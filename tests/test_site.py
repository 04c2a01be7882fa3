"""The comparison site: complete, linked, offline, escaped, accessible, deterministic, and checked in."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from html import escape as html_escape
from html import unescape
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markupsafe import escape
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.language.schema import TYPOLOGY_PROPERTIES
from pefref.render.site.build import MANIFEST, build_site, check_site, site_files
from pefref.render.site.filters import script_json
from pefref.render.site.gather import builds_on, similar_techniques
from pefref.view.params import count_params
from pefref.view.typology import INITIALISATION, TRAINING_TIME, derive_typology

from .site_util import PROBE_DIR, pick, scan, small_catalog_dir

runner = CliRunner()
PROBE = "escape_probe"


@pytest.fixture(scope="module")
def full(catalog) -> dict[str, bytes]:
    """The whole catalog's site plus the escaping probe, built once for this module."""
    return site_files(catalog, include=[PROBE_DIR])


def _pages(files: dict[str, bytes]) -> dict[str, str]:
    return {p: c.decode("utf-8") for p, c in files.items() if p.endswith(".html")}


def test_committed_site_is_current() -> None:
    """`pefref site --check`: site/ equals a fresh build (after changing the catalog or the view, run `pefref site`)."""
    result = runner.invoke(app, ["site", "--check"])
    assert result.exit_code == 0, result.output + "\nsite/ is out of date: run `python -m pefref.cli site`"


def test_every_page_is_there(full, catalog) -> None:
    for page in ("index.html", "typology.html", "compare.html", "models.html", "primitives.html", "schema.html",
                 "compositions.html", "assets/site.css", "assets/site.js"):
        assert page in full
    for tid in [*catalog.techniques, PROBE]:
        assert f"techniques/{tid}.html" in full


def test_internal_links_and_anchors_resolve(full) -> None:
    pages = _pages(full)
    scans = {p: scan(h) for p, h in pages.items()}
    broken = []
    for page, s in scans.items():
        for tag, url in s.links:
            parts = urlsplit(url)
            if parts.scheme in ("http", "https"):
                continue
            assert not parts.scheme and not parts.netloc, f"{page}: {tag} {url!r} is not a relative link"
            target = page if not parts.path else (Path(page).parent / unquote(parts.path)).as_posix()
            target = re.sub(r"(^|/)[^/]+/\.\./", r"\1", target)
            if target not in full:
                broken.append(f"{page}: {url}")
            elif parts.fragment and target in scans and parts.fragment not in scans[target].ids:
                broken.append(f"{page}: {url} (no id {parts.fragment!r})")
    assert not broken, "\n".join(broken[:20])


def test_nothing_comes_from_the_network(full) -> None:
    """Scripts, styles and images are local files; only plain links (papers, model configs) point outside."""
    for page, html in _pages(full).items():
        for tag, url in scan(html).links:
            if tag != "a":
                assert not urlsplit(url).scheme and not url.startswith("//"), f"{page}: {tag} loads {url}"
    css = full["assets/site.css"].decode()
    assert "url(" not in css and "@import" not in css
    assert "http" not in full["assets/site.js"].decode()


def test_user_text_is_escaped_everywhere(full, catalog) -> None:
    """The probe's name, paper, notes, module and hyperparameter texts try to open tags and close elements."""
    probe_page = full[f"techniques/{PROBE}.html"].decode()
    for page, html in _pages(full).items():
        for bad in ("<script>alert", "<img src=x", "<svg onload", "<b>bold</b>", "<i>al</i>", "</textarea><svg"):
            assert bad not in html, f"{page}: unescaped {bad!r}"
        assert html.count("<script") == html.count("</script>"), page
    assert "Probe &lt;/script&gt;&lt;script&gt;alert(" in probe_page
    assert "&lt;b&gt;bold&lt;/b&gt;" in probe_page
    # the paper URL lands in an attribute: its quote cannot end the attribute
    assert 'b=&#34;2&#34;&gt;&lt;script&gt;' in probe_page
    compare = scan(full["compare.html"].decode())
    (data,) = compare.scripts
    assert "</" not in data and "<!--" not in data
    names = {t["id"]: t["name"] for t in json.loads(data)["techniques"]}
    assert names[PROBE] == "Probe </script><script>alert('name')</script> & \"quoted\" <b>bold</b>"


def test_script_json_cannot_close_its_element() -> None:
    text = str(script_json({"a": "</script><!-- & \u2028"}))
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"a": "</script><!-- & \u2028"}


def test_included_techniques_are_marked(full, catalog) -> None:
    assert "not from the catalog" in full[f"techniques/{PROBE}.html"].decode()
    index = full["index.html"].decode()
    row = index[index.index(f'id="row-{PROBE}"'):]
    assert "not from the catalog" in row[: row.index("</tr>")]
    some = sorted(catalog.techniques)[0]
    assert "not from the catalog" not in full[f"techniques/{some}.html"].decode()


def test_basic_accessibility(full) -> None:
    for page, html in _pages(full).items():
        s = scan(html)
        assert s.lang == "en", page
        assert s.title.strip(), page
        assert s.th_without_scope == 0, page
        assert s.captions == s.tables, f"{page}: a table without a caption"
        for img in s.imgs:
            assert img.get("alt"), f"{page}: image without alt text"
        assert '<meta name="viewport"' in html, page


def test_typology_page_shows_the_derived_values(full, catalog) -> None:
    html = full["typology.html"].decode()
    for tid, t in catalog.techniques.items():
        typ = derive_typology(t, catalog.reference, catalog.techniques)
        row = html[html.index(f'href="techniques/{tid}.html"'):]
        row = row[: row.index("</tr>")]
        cells = [re.sub(r"<[^>]+>", "", c).replace("*", "").strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        expected = [typ.values[p] for p in TYPOLOGY_PROPERTIES] + [typ.values[TRAINING_TIME], typ.values[INITIALISATION]]
        assert [c.replace("&amp;", "&") for c in cells] == expected, tid


def test_index_counts_are_the_views(full, catalog) -> None:
    html = full["index.html"].decode()
    shape = catalog.shapes["llama-2-7b"]
    for tid, t in catalog.techniques.items():
        row = html[html.index(f'id="row-{tid}"'):]
        row = row[: row.index("</tr>")]
        pc = count_params(t, shape, catalog)
        if pc.trainable == 0 and pc.dropped:  # cannot be placed on the model: n/a with the reason, sorted last, never 0
            assert 'class="na"' in row and ">n/a<" in row and 'data-sort="0"' not in row, tid
        else:
            assert f'data-sort="{pc.trainable}"' in row, tid


def test_primitives_reference_lists_every_registered_primitive(full) -> None:
    from pefref.ops import PRIMITIVES
    from pefref.ops.inits import INITS
    from pefref.view.primitives import primitive_docs

    docs = primitive_docs()
    assert sorted(d.name for d in docs if d.kind == "op") == sorted(PRIMITIVES)
    assert sorted(d.name for d in docs if d.kind == "initialiser") == sorted(INITS)
    ids = scan(full["primitives.html"].decode()).ids
    assert {f"op-{k}" for k in PRIMITIVES} | {f"init-{k}" for k in INITS} <= ids
    assert all(d.doc for d in docs), [d.name for d in docs if not d.doc]
    init = next(d for d in docs if d.kind == "initialiser")
    assert "dtype" not in init.signature and "shape" not in init.signature


def test_schema_reference_lists_every_field(full) -> None:
    from pydantic import BaseModel

    from pefref.language.schema import SCHEMAS

    html = full["schema.html"].decode()
    seen: set[type] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, f in model.model_fields.items():
            assert f"<code>{f.alias or name}</code>" in html, f"{model.__name__}.{name}"
            for sub in re.findall(r"\w+", repr(f.annotation)):
                cls = getattr(__import__("pefref.language.schema", fromlist=[sub]), sub, None)
                if isinstance(cls, type) and issubclass(cls, BaseModel):
                    walk(cls)

    for model in SCHEMAS.values():
        walk(model)
    assert len(seen) > len(SCHEMAS)


def test_related_techniques(catalog, full) -> None:
    from pefref.language.schema import ModuleUse

    users = {tid: t for tid, t in catalog.techniques.items() if any(isinstance(m, ModuleUse) for m in t.modules)}
    assert users, "the catalog has techniques built from others' modules"
    for tid, t in users.items():
        page = full[f"techniques/{tid}.html"].decode()
        related = page[page.index('id="related"'):]
        for used, _why in builds_on(t):
            assert f'href="../techniques/{used}.html"' in related[: related.index("Most similar")], (tid, used)
            assert f'href="../techniques/{tid}.html"' in full[f"techniques/{used}.html"].decode()


def test_similar_techniques_rank_by_shared_values() -> None:
    values = {
        "a": {"workspace": "ffn", "insertion_form": "parallel", "input_type": "none"},
        "b": {"workspace": "ffn", "insertion_form": "parallel", "input_type": "x"},
        "c": {"workspace": "ffn", "insertion_form": "sequential", "input_type": "y"},
        "d": {"workspace": "head", "insertion_form": "in-place", "input_type": "z"},
    }
    assert similar_techniques("a", values) == [("b", ["workspace", "insertion_form"]), ("c", ["workspace"])]


def test_build_writes_checks_and_prunes(tmp_path, catalog) -> None:
    """A small catalog: the build is deterministic, --check sees changed, missing and extra files, and a
    rebuild removes the pages of techniques that are gone (and only files it wrote)."""
    ids = pick(catalog, 3)
    small = replace(catalog, techniques={k: catalog.techniques[k] for k in ids})
    out = tmp_path / "site"
    first = site_files(small)
    assert site_files(small) == first
    written, removed = build_site(out, catalog=small)
    assert removed == [] and len(written) == len(first) + 1
    assert check_site(out, catalog=small) == []
    assert build_site(out, catalog=small) == ([], [])
    (out / "index.html").write_text("changed")
    (out / "techniques" / f"{ids[0]}.html").unlink()
    (out / "stray.txt").write_text("not ours")
    assert check_site(out, catalog=small) == ["index.html", "stray.txt", f"techniques/{ids[0]}.html"]
    fewer = replace(catalog, techniques={k: catalog.techniques[k] for k in ids[1:]})
    written, removed = build_site(out, catalog=fewer)
    assert [p.relative_to(out).as_posix() for p in removed] == [f"diagrams/{ids[0]}.svg"]  # its page was already gone
    assert (out / "stray.txt").exists()
    assert f"techniques/{ids[0]}.html" not in (out / MANIFEST).read_text()
    build_site(out, catalog=small)
    written, removed = build_site(out, catalog=fewer)
    assert sorted(p.relative_to(out).as_posix() for p in removed) == [f"diagrams/{ids[0]}.svg", f"techniques/{ids[0]}.html"]


def test_cli_builds_and_checks(tmp_path, monkeypatch, catalog) -> None:
    from pefref.language.catalog import _cached

    root = small_catalog_dir(tmp_path / "catalog", pick(catalog, 2))
    from pefref.language.bundled import BundledData

    monkeypatch.setattr("pefref.language.sources.bundled_data", lambda: BundledData(root, root / "schemas", None))  # the small catalog in place of the bundled one
    _cached.cache_clear()
    try:
        out = tmp_path / "site"
        result = runner.invoke(app, ["site", "-o", str(out), "--check"])
        assert result.exit_code == 1 and "out of date" in result.output
        result = runner.invoke(app, ["site", "-o", str(out), "--model", "gpt2", "--include", str(PROBE_DIR)])
        assert result.exit_code == 0, result.output
        assert "on <strong>gpt2</strong>" in (out / "index.html").read_text()
        assert runner.invoke(app, ["site", "-o", str(out), "--model", "gpt2", "--include", str(PROBE_DIR), "--check"]).exit_code == 0
        result = runner.invoke(app, ["site", "-o", str(out), "--model", "gtp2"])
        assert result.exit_code == 1 and "gpt2" in result.output and "Traceback" not in result.output
        result = runner.invoke(app, ["site", "-o", str(out), "--include", str(tmp_path / "missing")])
        assert result.exit_code == 1 and "not a folder" in result.output
    finally:
        _cached.cache_clear()


def _compositions(catalog):
    from pefref.language.catalog import catalog_root
    from pefref.language.composition import load_composition

    return [load_composition(f, catalog) for f in sorted((catalog_root() / "compositions").glob("*.yaml"))]


def test_compositions_index_links_every_composition_page(full, catalog) -> None:
    comps = _compositions(catalog)
    assert comps
    index = scan(full["compositions.html"].decode())
    for res in comps:
        cid = res.composition.id
        assert ("a", f"compositions/{cid}.html") in index.links, cid
        assert f"compositions/{cid}.html" in full and f"diagrams/compositions/{cid}.svg" in full, cid
        page = scan(full[f"compositions/{cid}.html"].decode())
        assert {"diagram", "members", "blocks", "parameters", "merging", "source"} <= page.ids, cid
        for name, t in res.techniques.items():
            assert ("a", f"../techniques/{t.id}.html") in page.links, (cid, name)


def test_every_page_links_the_compositions_in_its_nav(full) -> None:
    for page, html in _pages(full).items():
        nav = html[html.index('<nav aria-label="Site">'):]
        nav = nav[: nav.index("</nav>")]
        assert f'href="{"../" * page.count("/")}compositions.html"' in nav, page


def test_composition_counts_are_pefref_params(full, catalog) -> None:
    from pefref.view.composition import composition_merge_problems, count_composition

    for res in _compositions(catalog):
        cid = res.composition.id
        html = full[f"compositions/{cid}.html"].decode()
        cli = runner.invoke(app, ["params", str(res.source), "--model", "llama-2-7b", "--json"])
        assert cli.exit_code == 0, cli.output
        for name, shape in catalog.shapes.items():
            counts = count_composition(res, shape, catalog)
            if name == "llama-2-7b":
                assert counts.as_dict() == json.loads(cli.output)
            row = html[html.index(f'<tr id="count-{name}">'):]
            row = row[: row.index("</tr>")]
            expected = [*(m.params for m in counts.members), *(b.params for b in counts.blocks), counts.total, counts.trainable]
            assert [int(n) for n in re.findall(r'data-n="(\d+)"', row)] == expected, (cid, name)
        merging = html[html.index('<section id="merging">'):]
        merging = merging[: merging.index("</section>")]
        problems = composition_merge_problems(res, catalog.shapes["llama-2-7b"], catalog)
        assert ("Does not merge" in merging) == bool(problems), cid
        for p in problems:
            assert str(escape(p)) in merging, (cid, p)


def test_technique_pages_link_back_to_their_compositions(full, catalog) -> None:
    comps = _compositions(catalog)
    for res in comps:
        for t in res.techniques.values():
            assert f'href="../compositions/{res.composition.id}.html"' in full[f"techniques/{t.id}.html"].decode(), (t.id, res.composition.id)
    users = {t.id for res in comps for t in res.techniques.values()}
    unused = next(tid for tid in sorted(catalog.techniques) if tid not in users)
    assert "Used in compositions" not in full[f"techniques/{unused}.html"].decode()


def test_hooks_calibration_and_inputs_are_shown_from_structure(full, catalog) -> None:
    """Every technique's training: hooks, calibration statistics and inputs appear on its page (with their math) and
    in its diagram (a hook as an annotation in the box of the module it acts on, a statistic as a dashed input
    'C = cov(x) on calibration data', an input of the model's call as its own node); a technique without them has
    no such section."""
    from pefref.language.check import expand_modules
    from pefref.render.behaviour import hooks_of, inputs_of, loss_of, stats_of

    seen = {"hooks": set(), "calibration": set(), "call": set()}
    for tid, t in catalog.techniques.items():
        page, svg = full[f"techniques/{tid}.html"].decode(), unescape(full[f"diagrams/{tid}.svg"].decode())
        modules = expand_modules(t, catalog.techniques)[0]
        hooks, stats, inputs = hooks_of(t), stats_of(modules), inputs_of(modules)
        loss = loss_of(t)
        assert ('id="training"' in page) == bool(hooks or loss), tid
        if loss is not None:  # a weighted token loss (CPT's) is listed with its weight as math and the call input it reads
            section = page[page.index('id="training"'):]
            assert "weighted token loss" in section and loss.weight.html() in section and loss.call in section, tid
            seen["hooks"].add("loss")
        assert ('id="inputs"' in page) == bool(inputs), tid
        for h in hooks:
            section = page[page.index('id="training"'):]
            assert h.kind_text in section and h.short.html() in section, (tid, h.kind)
            assert h.label in svg, (tid, h.kind)
            seen["hooks"].add(h.kind)
        for st in stats:
            assert st.line in page[page.index('id="calibration"'):] and st.line in svg, (tid, st.name)
            seen["calibration"].add(tid)
        for i in inputs:
            assert html_escape(i.source, quote=False) in page or i.source in unescape(page), (tid, i.name)
            if i.call:
                assert "an input of the model's call" in svg, tid
                seen["call"].add(tid)
    assert seen["hooks"] >= {"grad_projection", "after_step", "aux_loss", "state", "mask", "loss"}
    assert {"corda"} <= seen["calibration"] and {"poly", "alora"} <= seen["call"]
    for tid in ("corda", "loftq"):  # the host weight rewritten at apply, as math
        assert "W ← " in full[f"techniques/{tid}.html"].decode()
