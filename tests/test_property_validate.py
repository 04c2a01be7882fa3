"""Validate means it runs: techniques generated from the schema either fail validation or apply and run.

Hypothesis writes technique files: one or two modules, each with a form, random sites among those the
reference defines for the form (per-layer sites of linear, block, activation and norm kinds), tensors
with shapes from the host widths and a rank hyperparameter, initialisers from the registry, and output
expressions built from registered ops with arity-correct arguments (linear maps, activations, entrywise
maths, spectral round trips, stochastic samples, the host's bias). A share of the cases is broken on
purpose (a swapped shape, an unknown keyword, a word that is not a choice, an extra argument, a tensor
the site does not offer). The property: when ``validate`` accepts a file, ``apply`` succeeds on every tiny
model whose family binds all its sites, and the adapted model runs forward in eval and in training (with
a backward pass) with finite outputs. Derandomised, so it never flakes; counts are printed. More cases for a
longer hunt: ``PEFREF_PROPERTY_EXAMPLES=500``.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pefref.language.catalog import default_catalog, load_techniques
from pefref.language.check import HOST_TENSORS, reads_of
from pefref.ops import PRIMITIVES, SUPPLIED
from pefref.ops.shapes import SHAPE_RULES
from pefref.runtime.api import apply
from tests.conftest import model_inputs, output_of, tiny_model

CAT = default_catalog()
FAMILIES = ("llama", "gpt2", "bert")
SITE_KINDS = ("linear", "block", "activation", "norm")
SITES = {form: sorted(s for s, v in CAT.reference.sites.items()
                      if v.per_layer and v.kind in SITE_KINDS and form in CAT.reference.site_kinds[v.kind].forms and not s.startswith("xattn"))
         for form in ("parallel", "sequential", "reparameterise", "rescale")}
COUNTS = {"cases": 0, "valid": 0, "applied": 0, "broken on purpose": 0}

INITS = ["zeros()", "ones()", "normal(std=0.1)", "constant(value=0.5)", "kaiming_uniform(a=sqrt(5))", "xavier_uniform()", "uniform(a=-0.1, b=0.1)"]
UNARY = ["relu({})", "gelu({})", "tanh({})", "sigmoid({})", "silu({})", "sin({})", "cos({})", "sqrt({0} * {0} + 1)", "clamp({}, min=-1.0, max=1.0)",
         "layer_norm({})", "dropout({}, 0.1)", "exp(clamp({}, max=2.0))", "relaxed_bernoulli({})", "softmax({}, dim=-1)", "real(ifft(fft({})))",
         "min({}, 0.5)", "max({}, -0.5)"]


@dataclass
class Gen:
    """What one module's expressions declare as they are generated: its tensors, the widths it reads."""

    data: Any
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    width_in: str = "d_in"
    site_reads: frozenset[str] = frozenset()

    def param(self, shape: list[Any], init: str | None = None) -> str:
        name = f"P{len(self.params)}"
        spec: dict[str, Any] = {"shape": shape, "init": init or self.data.draw(st.sampled_from(INITS))}
        earlier = [n for n, p in self.params.items() if p["shape"] == shape]
        if earlier and init is None and self.data.draw(st.integers(0, 3)) == 0:  # start from an earlier tensor's value
            spec["init"] = f"0.5 * {earlier[0]}"
        shared = self.data.draw(st.sampled_from(["none", "none", "layers", "sites", "all"]))
        if shared != "none":
            spec["shared"] = shared
        if self.data.draw(st.integers(0, 5)) == 0:  # one tensor for every module that declares this group
            spec["group"] = "g_" + "_".join(map(str, shape))
            spec["init"], spec["shared"] = "normal(std=0.1)", "all"
        self.params[name] = spec
        return name


def _expr(g: Gen, src: str, src_w: str, want: str, depth: int) -> str:
    """An expression of ``src`` ([..., src_w]) giving [..., want] (widths: d_in, d_out or r)."""
    if depth <= 0 or g.data.draw(st.integers(0, 3)) == 0:
        if src_w == want and g.data.draw(st.booleans()):
            return src
        return f"linear({src}, {g.param([want, src_w])})"
    kind = g.data.draw(st.sampled_from(["linear", "unary", "sum", "product", "vector", "bias", "gauss", "flat", "attention", "circulant"]))
    if kind == "attention" and "mask" in g.site_reads and want == src_w:
        q = _expr(g, src, src_w, "r", depth - 1)
        return f"linear(attention({q}, {q}, {_expr(g, src, src_w, 'r', depth - 1)}, heads=2, causal=causal, mask=mask), {g.param([want, 'r'])})"
    if kind == "circulant":  # a block-circulant map of a rank-r code: one r x r circulant block
        return f"linear(block_circulant({_expr(g, src, src_w, 'r', depth - 1)}, {g.param([1, 1, 'r'])}), {g.param([want, 'r'])})"
    if kind == "linear":
        mid = g.data.draw(st.sampled_from(["r", want, src_w]))
        return f"linear({_expr(g, src, src_w, mid, depth - 1)}, {g.param([want, mid])})"
    if kind == "unary":
        return g.data.draw(st.sampled_from(UNARY)).format(_expr(g, src, src_w, want, depth - 1))
    if kind in ("sum", "product"):
        op = "+" if kind == "sum" else "*"
        return f"({_expr(g, src, src_w, want, depth - 1)} {op} {_expr(g, src, src_w, want, depth - 1)})"
    if kind == "vector":
        return f"{_expr(g, src, src_w, want, depth - 1)} * {g.param([want], 'ones()')}"
    if kind == "bias" and want == "d_out" and "b" in g.site_reads:
        return f"({_expr(g, src, src_w, want, depth - 1)} + 0.1 * b)"
    if kind == "gauss":
        inner = _expr(g, src, src_w, want, depth - 1)
        return f"gaussian_sample({inner}, {_expr(g, src, src_w, want, depth - 1)} - 3.0)"
    if kind == "flat" and want == "r":
        return f"flatten(unflatten({_expr(g, src, src_w, want, depth - 1)}, -1, (2, r / 2)))"
    return _expr(g, src, src_w, want, depth - 1)


OPS = sorted(n for n, p in PRIMITIVES.items() if n in SHAPE_RULES)
POSITIVE_DOMAIN = {"sqrt", "log2"}
"""Ops defined on positive numbers only: their tensor arguments are drawn as x * x + 1 (a NaN from sqrt(-1) is maths,
not a defect of validate)."""
NUMBERS = ["0", "1", "2", "-1", "0.5", "r", "(2, r / 2)", "(r, r)"]


def _registry_expr(g: Gen, src: str, src_w: str) -> str:
    """A call of any registered op with as many arguments as its signature requires, each drawn from tensors of
    the module (the input, tensors of rank-r shapes), numbers, tuples and the op's declared words."""
    name = g.data.draw(st.sampled_from(OPS))
    prim = PRIMITIVES[name]
    sig = inspect.signature(prim.fn)
    words = dict(prim.choices)
    args = []
    for pn, par in sig.parameters.items():
        if pn in SUPPLIED or par.kind is par.VAR_KEYWORD:
            continue
        if par.default is not par.empty and g.data.draw(st.booleans()):
            continue
        if pn in words:
            args.append(repr(g.data.draw(st.sampled_from(words[pn]))))
        elif pn == "subscripts":
            args.append(repr(g.data.draw(st.sampled_from(["...i->...i", "...i,...i->...i", "ij->ji"]))))
        elif g.data.draw(st.integers(0, 2)):
            shape = g.data.draw(st.sampled_from([[src_w], ["r"], ["r", "r"], ["r", src_w], [src_w, "r"], [2, "r"], [1, 1, "r"], ["r", 1]]))
            arg = src if shape == [src_w] and g.data.draw(st.booleans()) else g.param(shape)
            args.append(f"({arg} * {arg} + 1)" if name in POSITIVE_DOMAIN else arg)
        else:
            args.append(g.data.draw(st.sampled_from(NUMBERS)))
        if par.kind is par.VAR_POSITIONAL:
            break
    return f"{name}({', '.join(args)})"


def _module(data: Any, i: int) -> tuple[dict[str, Any], bool]:
    """One module description, and whether it was broken on purpose."""
    form = data.draw(st.sampled_from(list(SITES)))
    sites = data.draw(st.lists(st.sampled_from(SITES[form]), min_size=1, max_size=3, unique=True))
    kinds = [CAT.reference.site_kinds[CAT.reference.sites[s].kind] for s in sites]
    reads = frozenset.intersection(*[frozenset(k.reads) for k in kinds])
    g = Gen(data, site_reads=reads)
    m: dict[str, Any] = {"name": f"m{i}", "sites": sites, "form": form}
    if form in ("parallel", "sequential"):
        src, src_w = ("x", "d_in") if form == "parallel" else ("h", "d_out")  # what every site of the form offers
        m["compute"] = _expr(g, src, src_w, "d_out", data.draw(st.integers(1, 3)))
        if data.draw(st.integers(0, 2)) == 0:  # any registered op, reduced to a number that scales a map of the input
            m["compute"] = f"{g.param(['d_out'], 'ones()')} * mean(flatten({_registry_expr(g, src, src_w)}, 0, -1)) + {m['compute']}"
        m["integrate"] = data.draw(st.sampled_from(["h + delta", "h + alpha * delta", "h + delta * 0.5"]))
    elif form == "reparameterise":
        if "W" not in reads:
            return _module(data, i)
        a, b = g.param(["r", "d_in"]), g.param(["d_out", "r"], "zeros()")
        m["weight"] = data.draw(st.sampled_from([f"W + {b} @ {a}", f"W + alpha * matmul({b}, {a})", f"W * (1 + {b} @ {a})", f"W + t(t({b} @ {a}))",
                                                 f"W + real(ifft(fft({b} @ {a})))", f"W + qr_q({b}) @ {a}", f"W + sin({b}) @ cos({a})",
                                                 f"W + {b} @ gaussian_sample({a}, {a})"]))
    else:
        m["scale"] = data.draw(st.sampled_from(["{}", "1 + tanh({})", "sqrt({0} * {0} + 1)"])).format(g.param(["d_out"], "ones()"))
    m["params"] = g.params
    broken = data.draw(st.integers(0, 4)) == 0
    if broken:
        _break(data, m)
    return m, broken


def _break(data: Any, m: dict[str, Any]) -> None:
    """Break a module in one of the ways validate must catch."""
    how = data.draw(st.sampled_from(["swap", "kwarg", "word", "extra", "init_kwarg", "reads"] if m["params"] else ["kwarg", "word", "extra", "reads"]))
    field_ = next(f for f in ("compute", "weight", "scale") if f in m)
    p = next(iter(m["params"].values()), {"shape": []})
    if how == "swap" and len(p["shape"]) == 2:
        p["shape"] = p["shape"][::-1]
    elif how == "kwarg":
        m[field_] = f"softmax({m[field_]}, dim=-1, bogus=1)"
    elif how == "word":
        m[field_] = f"idwt2({m[field_]}, 'db99')"
    elif how == "extra":
        m[field_] = f"relu({m[field_]}, 2)"
    elif how == "init_kwarg":
        p["init"] = "normal(std=0.1, nope=2)"
    else:
        m[field_] = f"{m[field_]} * sum(mask)"


def _technique(data: Any) -> tuple[dict[str, Any], bool]:
    mods = [_module(data, i) for i in range(data.draw(st.integers(1, 2)))]
    t = {"id": "prop", "name": "generated", "paper": {"title": "x", "authors": "y", "year": 2021, "arxiv": "2106.09685"},
         "hyperparameters": {"r": {"type": "int", "default": 4, "min": 2}, "alpha": {"type": "float", "default": 0.5}},
         "modules": [m for m, _ in mods]}
    return t, any(b for _, b in mods)


def _runs(family: str, t: Any) -> None:
    model = tiny_model(family)
    inputs = model_inputs(family)
    torch.manual_seed(0)
    ad = apply(model, t)
    with torch.no_grad():  # the adapter's tensors away from their start, so every path is exercised
        for p in ad.units.parameters():
            if p.is_floating_point():
                p.add_(0.01 * torch.randn_like(p))
    out = output_of(model, inputs)
    assert torch.isfinite(out).all(), f"{family}: non-finite output in eval"
    model.train()
    out = output_of(model, inputs)
    out.float().square().mean().backward()
    model.eval()
    ad.remove()


@settings(max_examples=int(os.environ.get("PEFREF_PROPERTY_EXAMPLES", "60")), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(st.data())
def _validates_then_applies(data: Any) -> None:
    spec, broken = _technique(data)
    COUNTS["cases"] += 1
    COUNTS["broken on purpose"] += broken
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "prop.yaml"
        p.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        loaded, _s, _p, problems = load_techniques([p], CAT.reference, CAT.techniques)
    if problems:
        assert all(pr.location.line for pr in problems), problems  # located
        return
    COUNTS["valid"] += 1
    t = loaded["prop"]
    sites = {s for m in t.modules for s in m.sites}
    binding = [f for f in FAMILIES if sites <= set(CAT.families[f].sites)]
    if binding:  # one family per case (drawn), so that the cases together cover every family quickly
        _runs(data.draw(st.sampled_from(binding)), t)
        COUNTS["applied"] += 1


def test_whatever_validates_applies_on_every_family_that_binds_its_sites() -> None:
    _validates_then_applies()
    print(COUNTS)
    # the generator makes mostly sound techniques (so apply is what is tested) and some broken ones
    assert COUNTS["valid"] >= COUNTS["cases"] // 3 and COUNTS["applied"] >= COUNTS["valid"] * 2 // 3
    assert COUNTS["cases"] - COUNTS["valid"] >= COUNTS["broken on purpose"] // 2


def test_validate_and_the_compiler_bind_the_same_host_tensors() -> None:
    """One list of bound names: what fields may read (check.HOST_TENSORS) is what a compiled unit's forward takes."""
    import inspect

    from pefref.compiler.units import _Program

    params = set(inspect.signature(_Program.forward).parameters)
    assert set(HOST_TENSORS) <= params
    for (form, fld) in [("parallel", "compute"), ("sequential", "compute"), ("reparameterise", "weight"), ("prepend", "gate")]:
        assert reads_of(form, fld) <= set(HOST_TENSORS) | {"delta"}
