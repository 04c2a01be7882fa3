"""Shape inference at validate time: every tensor op has a rule, the rules agree with torch, and the catalog's
expressions all resolve to shapes that fit their hosts (so the check is not vacuous)."""

from __future__ import annotations

import pytest
import torch

from pefref.language.catalog import default_catalog
from pefref.language.check import expand_modules
from pefref.language.expr import parse_expr
from pefref.language.hparams import shape_of
from pefref.language.shapecheck import BATCH, EXAMPLE_SIZES, SEQ, _width, infer_shape, init_env, site_env, stat_shapes
from pefref.ops import PRIMITIVES, op_table
from pefref.ops.inits import INITS
from pefref.ops.shapes import SHAPE_RULES, IntShape, Shape

CAT = default_catalog()


def test_every_tensor_op_has_a_shape_rule() -> None:
    tensor_ops = {k for k, p in PRIMITIVES.items() if not p.scalar}
    assert tensor_ops <= set(SHAPE_RULES), sorted(tensor_ops - set(SHAPE_RULES))
    assert set(SHAPE_RULES) <= set(PRIMITIVES), sorted(set(SHAPE_RULES) - set(PRIMITIVES))


@pytest.mark.parametrize("text", [
    "linear(x, A)", "x @ t(A)", "einsum('...i,ri->...r', x, A)", "unflatten(linear(x, A), -1, (2, 3))",
    "narrow(x, -1, 2, 4)", "topk(x, 3)", "reshape(x, (2, -1))", "kron(A, A)", "sum(x, dim=1)",
    "cat((x, x), dim=0)", "softmax(x, dim=1) * 2 + x", "index_select(x, -1, (0, 3))", "unsqueeze(x, -2)",
])
def test_rules_agree_with_torch(text: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, A = torch.randn(2, 5, 8, generator=g), torch.randn(6, 8, generator=g)
    got = infer_shape(parse_expr(text).tree, {"x": Shape(x.shape), "A": Shape(A.shape)})
    from pefref.language.expr import evaluate

    assert got == tuple(evaluate(parse_expr(text), {"x": x, "A": A}, op_table()).shape)


@pytest.mark.parametrize("tid", sorted(CAT.techniques))
def test_catalog_expressions_resolve_to_shapes(tid: str) -> None:
    mods, hps = expand_modules(CAT.technique(tid), CAT.techniques)
    published: dict[str, Shape] = {}  # output shapes, for connections (a previous-layer read takes its fallback's)
    for m in mods:
        if m.form != "select":
            _module_resolves(m, hps, published)


def _site_tensor(c: object) -> Shape | None:
    """A tensor of a site the module does not attach to: its input x, output h, weight W or bias b."""
    if getattr(c, "module", None) is not None or getattr(c, "site", None) is None:
        return None
    site = CAT.reference.sites[c.site]
    d_out = _width(site.out, EXAMPLE_SIZES) or 0
    d_in = _width(site.in_, EXAMPLE_SIZES) or d_out
    return {"x": Shape((BATCH, SEQ, d_in)), "h": Shape((BATCH, SEQ, d_out)), "W": Shape((d_out, d_in)), "b": Shape((d_out,))}.get(c.tensor)


def _module_resolves(m: object, hps: dict, published: dict[str, Shape]) -> None:
    for s in m.sites:
        site = CAT.reference.sites[s]
        d_out = _width(site.out, EXAMPLE_SIZES) or 0
        d_in = _width(site.in_, EXAMPLE_SIZES) or d_out
        names = {**EXAMPLE_SIZES, "d_in": d_in, "d_out": d_out, "causal": 1, **{k: v.default for k, v in hps.items()}}
        env = {**names, **site_env(site.kind, d_in, d_out, EXAMPLE_SIZES)}
        for name, c in m.inputs.items():
            if c.call is not None:  # an input of the model's call: task ids [batch], token ids [batch, seq]
                env[name] = IntShape((BATCH,) if c.call == "task_ids" else (BATCH, SEQ))
                continue
            env[name] = published.get(c.module) or published.get(c.fallback) or _site_tensor(c)
            assert isinstance(env[name], Shape), (m.name, name)
        env.update(stat_shapes(m, d_in, d_out))  # calibration statistics (initialisers read them)
        for p, spec in m.params.items():
            env[p] = Shape(shape_of(spec, names))
            seen = init_env(spec, env, EXAMPLE_SIZES)  # initialisers see the unit's seed (and W_layers where shared across layers), as validate gives them
            got = infer_shape(parse_expr(spec.init).tree, seen, {k: env[p] for k in INITS})
            assert got == env[p], (p, spec.init)
            env[p] = got  # an integer tensor (indices) stays one
        for f in ("compute", "integrate", "weight", "scale", "tokens", "keys", "values", "host_update"):
            text = getattr(m, f, None)
            if text is None:
                continue
            got = infer_shape(parse_expr(text).tree, env)
            assert isinstance(got, Shape), (f, text)
            if f == "compute":
                env["delta"] = got
                published.setdefault(m.name, got)
            if f == "integrate":
                assert got == env["h"]
            if f in ("weight", "host_update"):
                assert got == env["W"]


def test_validation_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys; from pefref.language.catalog import load_catalog; load_catalog(); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
