"""Expressions written as math in diagrams and pages (pefref.render.mathtext), and side networks drawn beside (or above) the backbone."""

from __future__ import annotations

import pytest

from pefref.language.catalog import default_catalog
from pefref.render.diagram import technique_graph
from pefref.render.mathtext import math_of


@pytest.mark.parametrize(("expr", "plain"), [
    ("linear(linear(dropout(x, dropout), A), B)", "B·A·x"),
    ("h + (alpha / r) * delta", "h + (α/r)·δ"),
    ("h + sigmoid(linear(x, Wg, bg)) * delta", "h + σ(W_g·x + b_g)·δ"),
    ("linear(relu(linear(h, Wd, bd)), Wu, bu)", "W_u·ReLU(W_d·h + b_d) + b_u"),
    ("einsum('...e,eor,...er->...o', softmax(linear(x, Wg), dim=-1), B, unflatten(linear(x, A), -1, (E, r)))",
     "Σ_e,r softmax(W_g·x)_e·B_eor·(A·x)_er"),
    ("narrow(linear(tanh(linear(E, W1, b1)), Wkv, bkv), -1, 0, d_out)", "(W_kv·tanh(W_1·E + b_1) + b_kv)[…, 0 : d_out]"),
    ("W - (alpha / r) * B @ A", "W − (α/r)·B·A"),
    ("linear(x, kron(w1, w2a @ w2b))", "(w_1 ⊗ w_2a·w_2b)·x"),
    ("s * (W @ t(R))", "s·(W·R⊤)"),
])
def test_expressions_read_as_math(expr: str, plain: str) -> None:
    assert math_of(expr).plain() == plain


def test_markup_is_escaped_and_subscripted() -> None:
    m = math_of("linear(x, Wg) + alpha")
    assert m.html() == "W<sub>g</sub>·x + α"
    assert math_of("linear(x, Wg) + W1 + Wkv").dot() == "W_g·x + W₁ + Wₖᵥ"
    assert math_of("a <").plain() == "a <" and math_of("a <").dot() == "a &lt;"  # not an expression: kept, escaped


def test_lines_never_break_inside_a_name() -> None:
    m = math_of("linear(relu(linear(lstm(E, Wih, Whh, bih, bhh, Wih_rest), W1, b1)), W2, b2)")
    lines = m.lines(20, "tokens = ")
    assert len(lines) > 1
    assert "".join(ln.plain() for ln in lines).replace(" ", "") == ("tokens = " + m.plain()).replace(" ", "")


def test_side_network_only_reads_the_backbone() -> None:
    """Ladder side tuning: modules with ``integrate: h`` sit in the side-network box, get no combine node and write
    nothing into the backbone; the module that integrates (side_out) is the one combine on the backbone's path."""
    cat = default_catalog()
    g = technique_graph(cat, [cat.technique("ladder_side_tuning")])
    side = [n for n, a in g.nodes(data=True) if a.get("side")]
    assert {g.nodes[n]["module"] for n in side} == {"side_in", "ladder", "side_attn", "side_ffn"}
    assert all(g.nodes[n]["cluster"].startswith("side_network") for n in side)
    combines = [n for n, a in g.nodes(data=True) if a.get("role") == "combine"]
    assert [g.nodes[n]["module"] for n in combines] == ["side_out"]
    for n in side:
        assert all(a["role"] in ("connection", "param") for _u, _v, a in g.out_edges(n, data=True))
    attn = next(n for n, a in g.nodes(data=True) if a.get("module") == "side_attn")
    assert not any(a["role"] == "h" for _u, _v, a in g.in_edges(attn, data=True))  # it reads z only


def test_a_module_read_as_weights_over_a_stack_is_drawn_as_a_router() -> None:
    """Poly: each site's skill mixture reads the router at its own site (one connection each, as the compiler reads
    it) as the weights of its stack of skills, so the router is drawn as a router at its site, fed by the task ids, above its
    skills (not as a side network); ladder side tuning's side modules, which no module reads that way, keep their
    side network beside the layer."""
    cat = default_catalog()
    g = technique_graph(cat, [cat.technique("poly")])
    edges = [(u, v) for u, v, a in g.edges(data=True) if a["role"] == "connection"]
    conns = sorted((g.nodes[u]["site"], g.nodes[v]["site"]) for u, v in edges if g.nodes[u].get("role") == "module")
    assert conns == [("attn.q", "attn.q"), ("attn.v", "attn.v")]
    calls = sorted(g.nodes[v]["site"] for u, v in edges if g.nodes[u].get("role") == "call_input")  # the task ids feed the routers
    assert calls == ["attn.q", "attn.v"]
    assert not any(c.startswith("side_network") for c in g.graph["clusters"])
    routers = sorted(n for n, a in g.nodes(data=True) if a.get("router"))
    assert routers == ["m_poly_router_attn_q", "m_poly_router_attn_v"]
    for r in routers:
        node = g.nodes[r]
        assert node["router"] == "skills" and node["cluster"] == "g_qkv" and node["html"].startswith("<B>router</B>")
        assert "s = " in node["html"] and "δ = " not in node["html"]
        assert {(a["role"], g.nodes[u].get("role")) for u, _v, a in g.in_edges(r, data=True)} == {("connection", "call_input")}
        assert [g.nodes[v]["module"] for _u, v, a in g.out_edges(r, data=True) if a["role"] == "connection"] == ["skills"]
    ladder = technique_graph(cat, [cat.technique("ladder_side_tuning")])
    spec = next(s for c, s in ladder.graph["clusters"].items() if c.startswith("side_network"))
    assert "above" not in spec and spec["beside"]


# Function names a paper writes as they are (the rest of the registry's ops get their own notation).
_MATH_NAMES = {"softmax", "min", "max", "tanh", "sin", "cos", "exp", "log", "mean", "diag", "sqrt"}


def _catalog_expressions() -> list[tuple[str, str]]:
    """Every expression text of every module of the catalog's techniques (compute, integrate, weight, gates...)."""
    from pefref.language.catalog import load_catalog

    out = []
    for tid, t in load_catalog().techniques.items():
        for m in t.modules:
            for key, value in m.model_dump(exclude_none=True).items():
                if key in ("params", "description", "name", "id", "form", "sites", "at"):
                    continue
                for text in (value.values() if isinstance(value, dict) else [value]):
                    if isinstance(text, str) and "(" in text:
                        out.append((f"{tid}.{key}", text))
    return out


def test_no_catalog_expression_renders_a_raw_primitive_name() -> None:
    """Every op the catalog's expressions call is written as math (``W·blockdiag(…)``, ``‖W‖_row``, ``x[idx]``),
    never as the registry's call (``blockdiag_matmul(…)``, ``row_norm(…)``, ``index_select(…)``)."""
    import re

    from pefref.ops import PRIMITIVES

    exprs = _catalog_expressions()
    assert len(exprs) > 100
    raw = sorted({f"{where}: {name}(" for where, text in exprs
                  for name in re.findall(r"([A-Za-z_][A-Za-z_0-9]*)\(", math_of(text).plain())
                  if name in PRIMITIVES and name not in _MATH_NAMES})
    assert not raw, raw


def test_no_diagram_box_shows_a_raw_primitive_name() -> None:
    """Every box of every technique's diagram (modules, routers, sums: expressions, tensor shapes, hook annotations)
    writes math, never a registry op's call; the expressions as written stay in the box's hover text."""
    import re

    from pefref.ops import PRIMITIVES

    cat = default_catalog()
    raw = []
    for tid, t in sorted(cat.techniques.items()):
        g = technique_graph(cat, [t])
        for _n, a in g.nodes(data=True):
            if a.get("role") not in ("module", "router", "mix", "block", "calibration"):
                continue
            text = re.sub(r"<[^>]+>", " ", a.get("html", ""))
            raw += [f"{tid}: {name}(" for name in re.findall(r"([A-Za-z_][A-Za-z_0-9]*)\(", text)
                    if name in PRIMITIVES and name not in _MATH_NAMES]
    assert not sorted(set(raw)), sorted(set(raw))
    oft = technique_graph(cat, [cat.techniques["oft"]])
    boxes = [a for _n, a in oft.nodes(data=True) if a.get("role") == "module"]
    assert boxes and all("blockdiag_matmul(W, cayley(" in a["dot"]["tooltip"] for a in boxes)  # the expression as written, on hover
    assert all("blockdiag(" in a["html"] and "blockdiag_matmul" not in a["html"] for a in boxes)
