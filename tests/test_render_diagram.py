"""Architecture diagrams: the graph each form produces, every technique draws, labels are escaped, output is deterministic."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.language.catalog import default_catalog, load_techniques
from pefref.language.check import expand_modules
from pefref.language.errors import PefrefError
from pefref.language.schema import Technique
from pefref.render.diagram import technique_graph, technique_svg, to_dot
from pefref.render.dot import render_dot, render_many
from pefref.render.style import wrap
from pefref.view.params import count_params

KITCHEN_SINK = Path(__file__).parent / "fixtures" / "kitchen_sink.yaml"


def _kitchen_sink() -> Technique:
    cat = default_catalog()
    loaded, _s, _p, problems = load_techniques([KITCHEN_SINK], cat.reference, cat.techniques)
    assert not problems
    return loaded["kitchen_sink"]


def _g(*tids: str, **kw: Any) -> nx.DiGraph:
    cat = default_catalog()
    return technique_graph(cat, [cat.technique(t) for t in tids], **kw)


def _nodes(g: nx.DiGraph, **match: Any) -> list[str]:
    return [n for n, a in g.nodes(data=True) if all(a.get(k) == v for k, v in match.items())]


def _one(g: nx.DiGraph, **match: Any) -> str:
    found = _nodes(g, **match)
    assert len(found) == 1, (match, found)
    return found[0]


def _comp(g: nx.DiGraph, site: str, layer: int | None = None) -> str:
    return _one(g, role="component", site=site, layer=layer)


def _edge_roles(g: nx.DiGraph, u: str, v: str) -> str | None:
    return g.edges[u, v]["role"] if g.has_edge(u, v) else None


# --- the structure each form produces ------------------------------------------------


def test_reference_skeleton_without_modules_is_the_data() -> None:
    """Every site of the reference architecture is drawn by exactly one component or group; the flow is the data's.
    An optional group (cross-attention) is drawn where the family binds it, and the flow goes around it elsewhere."""
    cat = default_catalog()
    d = cat.reference.diagram
    optional = {gid for gid, grp in d.groups.items() if grp.optional}
    hidden = {c for c, comp in d.components.items() if comp.group in optional}
    hidden_sites = ({d.groups[gid].site for gid in optional} | {d.components[c].site for c in hidden}) - {None}
    assert optional and hidden_sites
    def kind(c: str) -> str:  # the optional groups: rotary, experts, and the cross-attention (the rest)
        return g if (g := d.components[c].group) in ("rotary", "experts") else "xattn"

    sites = {k: {d.components[c].site for c in hidden if kind(c) == k} for k in ("rotary", "experts")}
    sites["xattn"] = hidden_sites - sites["rotary"] - sites["experts"]
    around = {"rotary": {("q", "core"), ("k", "core")}, "xattn": {("attn_add", "ffn_norm"), ("attn_add", "ffn_add")},
              "experts": {("ffn_norm", "ffn_add")}}
    # T5 binds the cross-attention sites, Llama the rotary ones; neither has experts
    for model, gone in ((None, {"rotary", "xattn", "experts"}), ("tiny-t5", {"rotary", "experts"}), ("tiny-llama", {"xattn", "experts"})):
        skipped = set().union(*(sites[k] for k in gone))
        hidden_now = {c for c in hidden if kind(c) in gone}
        bypass = set().union(*(around[k] for k in gone))
        g = _g("bitfit", model=model, fold=False)
        drawn = {a["site"] for _n, a in g.nodes(data=True) if a.get("role") == "component" and a["site"]}
        drawn |= {c["site"] for c in g.graph["clusters"].values() if c["site"]}
        assert drawn == set(cat.reference.sites) - skipped
        flow = {(g.nodes[u]["component"], g.nodes[v]["component"]) for u, v, a in g.edges(data=True) if a["role"] in ("flow", "residual")
                and g.nodes[u].get("role") == g.nodes[v].get("role") == "component"}
        data = set(d.flow) | set(d.residual)
        assert not {c for e in flow for c in e} & hidden_now  # around the hidden components: their inputs go where their outputs went
        assert {e for e in data if not set(e) & hidden_now} <= flow
        assert {(a, b) for a, b in flow if (a, b) not in data} == bypass


def test_parallel_branch_from_input_to_combine_at_output() -> None:
    g = _g("lora")
    norm, q, core = _comp(g, "attn.norm"), _comp(g, "attn.q"), _comp(g, "attn.kv")
    m = _one(g, role="module", module="lora", site="attn.q")
    c = _one(g, role="combine", module="lora", site="attn.q")
    assert _edge_roles(g, norm, m) == "x" and _edge_roles(g, m, c) == "delta" and _edge_roles(g, q, c) == "h"
    assert _edge_roles(g, c, core) == "flow" and not g.has_edge(q, core)
    assert g.nodes[c]["label"] == "h + (alpha / r) * delta"  # the expression; the box shows it as math
    assert "h + (α/r)·δ" in g.nodes[c]["html"]
    assert _nodes(g, role="component", kind="band", site="ffn.block")  # the feed-forward sublayer LoRA leaves alone: one band
    assert "A: r × d_in" in g.nodes[m]["html"] and "B: d_out × r" in g.nodes[m]["html"]
    assert _nodes(g, role="module", site="attn.k") == []


def test_sequential_box_on_the_output_path() -> None:
    g = _g("houlsby_adapter")
    o, add = _comp(g, "attn.o"), _one(g, role="component", component="attn_add")
    m = _one(g, role="module", site="attn.block")
    c = _one(g, role="combine", site="attn.block")
    assert _edge_roles(g, o, m) == "h" and _edge_roles(g, m, c) == "delta" and _edge_roles(g, o, c) == "h"
    assert _edge_roles(g, c, add) == "flow" and not g.has_edge(o, add)
    down, ffn_add = _comp(g, "ffn.down"), _one(g, role="component", component="ffn_add")
    c2 = _one(g, role="combine", site="ffn.block")
    assert nx.has_path(g, down, c2) and _edge_roles(g, c2, ffn_add) == "flow"


def test_reparameterise_badge_rescale_node_prepend_and_select() -> None:
    g = _g("dora")
    for site in ("attn.q", "attn.k", "attn.v", "ffn.up", "ffn.down"):
        m = _one(g, role="module", site=site)
        assert _edge_roles(g, m, _comp(g, site)) == "weight" and g.nodes[_comp(g, site)]["reparameterised"]
        assert "W′ = m·(W + (α/r)·B·A) / ‖W + (α/r)·B·A‖" in " ".join(g.nodes[m]["html"].replace("<BR/>", " ").split())
        assert "weight_norm(W + (alpha / r) * B @ A, m, detach=True)" in g.nodes[m]["dot"]["tooltip"]
    g = _g("ia3")
    k, core = _comp(g, "attn.k"), _comp(g, "attn.kv")
    m = _one(g, role="module", module="kv", site="attn.k")
    assert _edge_roles(g, k, m) == "flow" and _edge_roles(g, m, core) == "flow" and not g.has_edge(k, core)
    act, down = _comp(g, "ffn.act"), _comp(g, "ffn.down")
    m = _one(g, role="module", module="ffn", site="ffn.act")
    assert _edge_roles(g, act, m) == "flow" and _edge_roles(g, m, down) == "flow"
    g = _g("prefix_tuning")
    m = _one(g, role="module", site="attn.kv")
    assert _edge_roles(g, m, _comp(g, "attn.kv")) == "prefix"
    g = _g("prompt_tuning")
    embed, norm = _comp(g, "embed.output"), _comp(g, "attn.norm")
    c = _one(g, role="combine", site="embed.output")
    assert _edge_roles(g, embed, c) == "h" and _edge_roles(g, c, norm) == "flow"
    g = _g("bitfit")
    for n in _nodes(g, role="module"):
        target = next(iter(g.successors(n)))
        assert g.edges[n, target]["role"] == "unfreeze" and g.nodes[target]["selected"]


def test_input_side_rescale_sits_before_the_host() -> None:
    cat = default_catalog()
    g = technique_graph(cat, [_kitchen_sink()], layers=2)
    m = _one(g, role="module", module="rescale_in", layer=1)
    assert _edge_roles(g, m, _comp(g, "ffn.down", 1)) == "flow"
    assert _nodes(g, role="module", module="rescale_in", layer=0) == []  # layers: {last: 1}


def test_shared_tensors_drawn_once_with_a_link_to_every_user() -> None:
    g = _g("vera")
    users = _nodes(g, role="module", module="vera")
    assert len(users) == 2
    for p in ("A", "B"):
        t = _one(g, role="tensor", param=p)
        assert not g.nodes[t]["trainable"] and sorted(g.successors(t)) == sorted(users)
    g = _g("prefix_tuning", layers=3)
    users = _nodes(g, role="module", module="prefix")
    assert len(users) == 3
    assert sorted(g.successors(_one(g, role="tensor", param="E"))) == sorted(users)


def test_reused_modules_are_marked_with_their_source() -> None:
    g = _g("unipelt")
    # the gated prefix is written in place (prefix tuning's module plus a gate), the others are reused
    assert {g.nodes[n]["source"] for n in _nodes(g, role="module")} == {"lora.lora", None, "pfeiffer_adapter.adapter"}


def test_composed_diagram_of_three_techniques() -> None:
    g = _g("lora", "dora", "ia3")
    assert {g.nodes[n]["technique"] for n in _nodes(g, role="module")} == {"lora", "dora", "ia3"}
    q, core = _comp(g, "attn.q"), _comp(g, "attn.kv")
    assert nx.has_path(g, _one(g, role="combine", technique="lora", site="attn.q"), core)
    assert _edge_roles(g, _one(g, role="module", technique="dora", site="attn.q"), q) == "weight"


def test_model_resolves_shapes_and_counts() -> None:
    cat = default_catalog()
    g = _g("lora", model="llama-2-7b")
    m = _one(g, role="module", site="attn.q")
    assert "A: 8 × 4096" in g.nodes[m]["html"] and "B: 4096 × 8" in g.nodes[m]["html"]
    pc = count_params(cat.technique("lora"), cat.shape("llama-2-7b"), cat)
    assert f"{pc.trainable:,} trainable" in g.graph["title"]
    assert "Transformer layer × 32" in g.graph["clusters"]["g_layer"]["html"]
    g = _g("lora", model="gpt2", layers=2)
    assert "transformer.h.1.attn.c_attn[0:768]" in g.nodes[_comp(g, "attn.q", 1)]["html"]
    assert "transformer.h.0.attn.c_attn[1536:2304]" in g.nodes[_comp(g, "attn.v", 0)]["html"]


def test_family_labels_paths_without_a_model() -> None:
    g = _g("lora", family="gpt2", fold=False)
    assert "transformer.h.{i}.attn.c_attn[0:d]" in g.nodes[_comp(g, "attn.q")]["html"]
    assert g.nodes[_comp(g, "ffn.gate")].get("unbound")
    from pefref.language.catalog import catalog_root

    g = _g("lora", family=str(catalog_root() / "families" / "llama.yaml"))  # an architecture map file
    assert "model.layers.{i}.self_attn.q_proj" in g.nodes[_comp(g, "attn.q")]["html"]
    with pytest.raises(PefrefError, match="differs"):
        _g("lora", model="llama-2-7b", family="gpt2")
    with pytest.raises(PefrefError, match="needs a model"):
        _g("lora", layers="all")


# --- every technique; speed; escaping; determinism -------------------------------------


def test_every_catalog_technique_and_the_kitchen_sink_draw_every_module() -> None:
    """The diagrams of the whole catalog: graph, DOT and SVG through dot (their time: benchmarks/bench_budgets.py)."""
    cat = default_catalog()
    techniques = [cat.techniques[k] for k in sorted(cat.techniques)] + [_kitchen_sink()]
    graphs = [technique_graph(cat, [t]) for t in techniques]
    svgs = render_many([to_dot(g) for g in graphs], "svg")
    for t, g, svg in zip(techniques, graphs, svgs):
        modules, _ = expand_modules(t, {**cat.techniques, t.id: t})
        for m in modules:
            for site in m.sites:
                assert _nodes(g, role="module", module=m.name, site=site), (t.id, m.name, site)
        assert ET.fromstring(svg).tag.endswith("svg")
        carried = [(u, v) for u, v, a in g.edges(data=True) if a.get("layer_of_source") == "previous"]
        assert nx.is_directed_acyclic_graph(nx.restricted_view(g, [], carried)), t.id  # state carried from the previous layer loops back


HOSTILE = 'Evil "quote" <b>&amp; </script><script>alert(1)</script> \\N \\" ünï 𝛼 ∑ \x07'


def test_hostile_labels_are_escaped() -> None:
    cat = default_catalog()
    t = cat.technique("lora").model_copy(update={"name": HOSTILE, "paper": cat.technique("lora").paper.model_copy(update={"authors": "<&>\""})})
    fam = cat.family("gpt2")
    sites = dict(fam.sites)
    sites["attn.q"] = sites["attn.q"].model_copy(update={"path": 'h.{i}."<c_attn>"&</script>'})
    fam = fam.model_copy(update={"sites": sites, "family": "evil"})
    g = technique_graph(cat, [t], family=fam)
    dot = to_dot(g)
    assert "</script>" not in dot and "<script>" not in dot and "\x07" not in dot
    svg = render_dot(dot, "svg").decode("utf-8")
    root = ET.fromstring(svg)
    text = "".join(root.itertext())
    assert 'Evil "quote" <b>&amp; </script><script>alert(1)</script> \\N \\" ünï 𝛼 ∑' in text
    assert 'h.{i}."<c_attn>"&</script>' in text
    inline = technique_svg(cat, cat.technique("lora"))
    assert inline.startswith("<svg") and "<?xml" not in inline and "DOCTYPE" not in inline
    ids = re.findall(r'\sid="([^"]*)"', inline)
    assert ids and all(i.startswith("diagram-lora-") for i in ids)  # unique when several diagrams share a page


def test_same_input_same_bytes() -> None:
    a = to_dot(_g("unipelt", model="bert-base-uncased"))
    b = to_dot(_g("unipelt", model="bert-base-uncased"))
    assert a == b
    assert render_dot(a, "svg") == render_dot(b, "svg")


# --- command line -------------------------------------------------------------------


def test_cli_diagram_formats_and_missing_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    out = tmp_path / "d.png"
    r = runner.invoke(app, ["diagram", "lora", str(KITCHEN_SINK), "--model", "tiny-gpt2", "--layers", "all", "--format", "png", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes().startswith(b"\x89PNG")
    r = runner.invoke(app, ["diagram", "dora", "--format", "dot"])
    assert r.exit_code == 0 and r.output.startswith("digraph")
    import shutil

    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "dot" else real(name, *a, **k))
    r = runner.invoke(app, ["diagram", "lora", "--format", "dot"])
    assert r.exit_code == 0 and "digraph" in r.output
    r = runner.invoke(app, ["diagram", "lora", "--format", "svg", "-o", str(tmp_path / "x.svg")])
    assert r.exit_code == 1 and "apt-get install graphviz" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["diagram", "lroa"])
    assert r.exit_code == 1 and "did you mean 'lora'" in r.output


def test_cli_diagram_format_from_the_suffix(tmp_path: Path) -> None:
    """``-o x.png`` writes PNG without --format; a --format that contradicts the suffix is refused, nothing written."""
    runner = CliRunner()
    for name, magic in (("x.png", b"\x89PNG"), ("x.pdf", b"%PDF"), ("x.svg", b"<?xml"), ("x.dot", b"digraph")):
        r = runner.invoke(app, ["diagram", "lora", "-o", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        assert (tmp_path / name).read_bytes().startswith(magic), name
    r = runner.invoke(app, ["diagram", "lora", "--format", "svg", "-o", str(tmp_path / "y.png")])
    assert r.exit_code == 1 and "does not match" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "y.png").exists()


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.text(alphabet=st.sampled_from("ab ,(x_)"), max_size=120), st.integers(min_value=4, max_value=60))
def test_wrap_ends_and_keeps_the_text(text: str, width: int) -> None:
    lines = wrap(text, width)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    assert all(len(ln) <= max(width, 3) for ln in lines)


def test_connections_are_edges_into_the_reading_module() -> None:
    """A module's inputs from other modules (this layer, the previous one with its fallback) and from other sites."""
    g = _g("ladder_side_tuning", layers=3)
    conn = {(g.nodes[u]["module"], g.nodes[u]["layer"], g.nodes[v]["module"], g.nodes[v]["layer"], a["layer_of_source"])
            for u, v, a in g.edges(data=True) if a["role"] == "connection"}
    assert ("side_ffn", 0, "ladder", 1, "previous") in conn and ("side_ffn", 1, "ladder", 2, "previous") in conn
    assert ("side_in", None, "ladder", 0, "previous") in conn  # the fallback of the first layer
    assert all(("ladder", i, "side_attn", i, "same") in conn for i in range(3))
    g = technique_graph(default_catalog(), [_kitchen_sink()])
    reads = [(u, a) for u, v, a in g.edges(data=True) if a["role"] == "connection" and g.nodes[u]["role"] == "component"]
    assert reads and all(g.nodes[v]["role"] == "module" for u, v, a in g.edges(data=True) if a["role"] == "connection")


def test_every_statistic_and_hook_kind_is_written_in_words() -> None:
    """A calibration statistic or training hook kind added to the language gets its math and words on the site and in
    diagrams (the closed sets and the render tables cannot drift apart)."""
    from pefref.language.schema.technique import HOOK_KINDS, STATISTIC_KINDS
    from pefref.render import behaviour

    assert set(behaviour.STAT_MATH) == set(behaviour._STAT_TEXT) == set(STATISTIC_KINDS)
    assert set(behaviour.HOOK_KIND_TEXT) == set(HOOK_KINDS)
