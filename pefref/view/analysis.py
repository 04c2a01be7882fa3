"""Structural analysis of a module's expressions: what they read, linearity, integration.

Pure functions over the parsed expressions and the primitive registry's
metadata; no torch. Typology, mergeability and costs are derived from these.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable

from pefref.language.expr import Expr, parse_expr
from pefref.language.forms import DELTA_FORM, FORMS, Merge, form_of
from pefref.ops import PRIMITIVES

__all__ = [
    "degree", "affine", "integration_kind", "module_exprs", "ops_used", "uses_matmul", "reads", "linear_in_input",
    "affine_in_input", "mergeable", "mergeability", "module_mergeable", "low_rank_factors", "connected_modules",
    "technique_mergeability", "modules_mergeable", "mergeable_on", "stochastic_ops",
]

_LINEAR_SITE_KINDS = ("linear", "activation", "parameter")  # a raw parameter slice is a linear map


def degree(node: ast.AST | Expr, var: str | set[str]) -> int | None:
    """Degree of an expression in ``var``: 0 (independent), 1 (linear, no offset) or None (anything else)."""
    return _degree(node.tree if isinstance(node, Expr) else node, {var} if isinstance(var, str) else var, offsets=False)


def affine(node: ast.AST | Expr, var: str | set[str]) -> int | None:
    """Degree of an expression in ``var`` where an input-independent offset is allowed.

    0: independent of ``var``; 1: affine, ``A(var) + c`` (a scale and a shift, a
    linear map with a bias); None: anything else (a product of two terms in
    ``var``, a nonlinear op). :func:`degree` is the stricter test without offsets.
    """
    return _degree(node.tree if isinstance(node, Expr) else node, {var} if isinstance(var, str) else var, offsets=True)


def _degree(node: ast.AST, vs: set[str], offsets: bool) -> int | None:
    """The walk behind :func:`degree` (``offsets=False``) and :func:`affine` (``offsets=True``)."""
    if isinstance(node, ast.Name):
        return 1 if node.id in vs else 0
    if isinstance(node, ast.Constant):
        return 0
    if isinstance(node, ast.UnaryOp):
        return _degree(node.operand, vs, offsets)
    if isinstance(node, (ast.Tuple, ast.List)):
        ds = [_degree(e, vs, offsets) for e in node.elts]
        return 0 if all(d == 0 for d in ds) else None
    if isinstance(node, ast.BinOp):
        a, b = _degree(node.left, vs, offsets), _degree(node.right, vs, offsets)
        if a is None or b is None:
            return None
        if isinstance(node.op, (ast.Add, ast.Sub)):
            # a sum with an input-independent term is affine, not linear
            return max(a, b) if offsets else (a if a == b else None)
        if isinstance(node.op, (ast.Mult, ast.MatMult)):
            return a + b if a + b <= 1 else None
        if isinstance(node.op, ast.Div):
            return a if b == 0 else None
        return 0 if a == b == 0 else None
    if isinstance(node, ast.Call):
        prim = PRIMITIVES.get(node.func.id)  # type: ignore[attr-defined]
        args, kws = node.args, node.keywords
        if prim is not None and prim.eval_args is not None:  # a stochastic op, read as its eval map
            names = _param_names(prim)
            args = [a if i in prim.eval_args else ast.Constant(0) for i, a in enumerate(args)]
            kws = [k for k in kws if k.arg in {names[i] for i in prim.eval_args if i < len(names)}]
        ds = [_degree(a, vs, offsets) for a in args]
        kw = {k.arg: _degree(k.value, vs, offsets) for k in kws}
        if all(d == 0 for d in ds) and all(d == 0 for d in kw.values()):
            return 0
        if prim is None or any(d is None for d in ds) or any(kw.values()):
            return None
        lin = [i for i, d in enumerate(ds) if d == 1]
        if len(lin) != 1 or lin[0] not in prim.linear_in:
            return None
        # an op linear in one argument maps an affine argument to an affine result; a bias argument is an offset
        if not offsets and any(i < len(node.args) and not _is_none(node.args[i]) for i in prim.offset_args):
            return None
        return 1
    return None


def _param_names(prim: object) -> list[str]:
    import inspect

    return list(inspect.signature(prim.fn).parameters)  # type: ignore[attr-defined]


def stochastic_ops(m: object) -> list[str]:
    """The stochastic ops a module's expressions call (they sample while training, see :mod:`pefref.ops`), sorted."""
    return sorted(o for o in ops_used(m) if o in PRIMITIVES and PRIMITIVES[o].stochastic)


def _is_none(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def module_exprs(m: object) -> dict[str, Expr]:
    """The module's expressions by field name."""
    out = {}
    for f in ("compute", "integrate", "weight", "scale", "tokens", "keys", "values", "gate", "host_update"):
        v = getattr(m, f, None)
        if v is not None:
            out[f] = parse_expr(v)
    return out


def ops_used(m: object, computation_only: bool = False) -> set[str]:
    """Ops the module's expressions call (``computation_only``: not its integration or host update)."""
    exprs = [e for f, e in module_exprs(m).items() if not (computation_only and f in ("integrate", "host_update"))]
    return set().union(*(e.ops for e in exprs))


def uses_matmul(m: object) -> bool:
    """Whether the module's computation multiplies matrices with the ``@`` operator."""
    return any(
        isinstance(n, ast.BinOp) and isinstance(n.op, ast.MatMult)
        for f, e in module_exprs(m).items() if f not in ("integrate", "host_update")
        for n in ast.walk(e.tree)
    )


def reads(m: object) -> set[str]:
    """Host tensors the module's computation reads (x, h, W, b)."""
    names: set[str] = set()
    for f, e in module_exprs(m).items():
        if f not in ("integrate", "host_update"):
            names |= e.names
    return names & {"x", "h", "W", "b"}


def integration_kind(integrate: str, params: Iterable[str]) -> str | None:
    """Classify ``integrate``: direct, scaled or gated addition (None when it is none of these)."""
    e = parse_expr(integrate).tree
    if not (isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add)):
        return None
    sides = [e.left, e.right]
    hs = [s for s in sides if isinstance(s, ast.Name) and s.id == "h"]
    if len(hs) != 1:
        return None
    other = sides[1] if sides[0] is hs[0] else sides[0]
    if isinstance(other, ast.Name) and other.id == "delta":
        return "direct addition"
    if isinstance(other, ast.BinOp) and isinstance(other.op, (ast.Mult, ast.Div)):
        factors = [other.left, other.right]
        ds = [f for f in factors if isinstance(f, ast.Name) and f.id == "delta"]
        if len(ds) != 1:
            return None
        gate = factors[1] if factors[0] is ds[0] else factors[0]
        names = {n.id for n in ast.walk(gate) if isinstance(n, ast.Name)}
        calls = {n.func.id for n in ast.walk(gate) if isinstance(n, ast.Call)}  # type: ignore[attr-defined]
        names -= calls
        if names & (set(params) | {"x", "h", "delta"}):
            return "gated addition"
        return "scaled addition"
    return None


def linear_in_input(m: object) -> bool:
    """Whether the module's output is linear in the host's input (parallel) or output (sequential)."""
    exprs = module_exprs(m)
    var = form_of(m).reads_input or "h"
    if degree(exprs["compute"], var) != 1:
        return False
    tree = exprs["integrate"].tree
    if isinstance(tree, ast.Name) and tree.id == "delta":  # the module's output replaces h: linear as it is
        return True
    kind = integration_kind(m.integrate, m.params)  # type: ignore[attr-defined]
    if kind in ("direct addition", "scaled addition"):
        return True
    if kind == "gated addition":
        # a gate that depends only on parameters is a constant at inference
        gate_names = exprs["integrate"].names - {"h", "delta"}
        return not (gate_names & {"x", "h"})
    return False


def affine_in_input(m: object) -> bool:
    """Whether the adapted host output is an affine map (a scale and a shift) of the host's input or output.

    The module's computation is affine in what it reads (``x`` for parallel
    modules, ``h`` for sequential ones) and its integration is affine in ``h``,
    ``x`` and ``delta`` (a gate that depends only on parameters is a constant).
    """
    exprs = module_exprs(m)
    var = form_of(m).reads_input or "h"
    return affine(exprs["compute"], var) is not None and affine(exprs["integrate"], {"h", "x", "delta"}) is not None


def mergeability(m: object, site_kinds: Iterable[str]) -> str:
    """``"yes"``, ``"with a host bias"`` (an affine module: its shift folds into the host's bias) or ``"no"``."""
    form = form_of(m)
    kinds = set(site_kinds)
    if form.merge is Merge.ALWAYS:
        return "yes"
    if form.merge is Merge.NEVER or not kinds <= set(_LINEAR_SITE_KINDS):
        return "no"
    if form.merge is Merge.ON_LINEAR:
        return "yes"
    if not form.merges_at_activation and "activation" in kinds:
        return "no"
    if linear_in_input(m):
        return "yes"
    return "with a host bias" if affine_in_input(m) else "no"


def mergeable(m: object, site_kinds: Iterable[str], host_bias: bool = False, connected: bool = False) -> bool:
    """Whether the module can be folded into the host weights (so it costs nothing at inference).

    The one derivation behind both the view (``pefref show``, costs, typology,
    the site) and the runtime's ``merge()``. ``host_bias``: whether the host is
    a projection with a bias, which absorbs an affine module's shift
    (``h' = h * s + t`` folds into ``W' = diag(s) W``, ``b' = b * s + t``);
    without one only maps linear in the input fold. ``connected``: the module
    reads another module's output or a hidden state elsewhere, or others read
    its output (:func:`connected_modules`): folded into a weight, it would
    neither see nor publish those values, so it never merges.
    """
    if connected:
        return False
    m_ = mergeability(m, site_kinds)
    return m_ == "yes" or (host_bias and m_ == "with a host bias")


def connected_modules(modules: Iterable[object]) -> set[str]:
    """Names of the modules that take part in a connection, as reader or as source; where a module reads a first
    forward pass (``pass: first``), every module (each is off during that pass, which a merged weight could not be)."""
    out: set[str] = set()
    ms = list(modules)
    for m in ms:
        for c in (getattr(m, "inputs", None) or {}).values():
            out.add(m.name)  # type: ignore[attr-defined]
            out |= {n for n in (c.module, c.fallback) if n is not None}
            if getattr(c, "first_pass", False):
                out |= {getattr(x, "name", "") for x in ms}
    return out


def module_mergeable(m: object, reference: object, host_bias: bool = False, connected: bool = False) -> bool:
    """:func:`mergeable` at the module's sites, their kinds read from the reference architecture."""
    return mergeable(m, [reference.sites[s].kind for s in m.sites], host_bias, connected)  # type: ignore[attr-defined]


def mergeable_on(m: object, reference: object, family: object, connected: bool = False) -> bool:
    """:func:`mergeable` at each of the module's sites that ``family`` has, with the host's bias as
    the family's architecture map records it (what the runtime finds on the real module)."""
    sites = family.sites  # type: ignore[attr-defined]
    return all(mergeable(m, [reference.sites[s].kind], bool(sites[s].bias), connected)  # type: ignore[attr-defined]
               for s in m.sites if s in sites)  # type: ignore[attr-defined]


def modules_mergeable(modules: list[object], reference: object, family: object) -> bool:
    """Whether ``merge()`` folds all of a technique's ``modules`` on a model of ``family``
    (:func:`mergeable_on` for each; sites the family lacks get no placement)."""
    conn = connected_modules(modules)
    return all(mergeable_on(m, reference, family, m.name in conn) for m in modules)  # type: ignore[attr-defined]


def technique_mergeability(modules: list[object], reference: object) -> str:
    """A technique's mergeability on any model: ``"yes"``, ``"with a host bias"`` (every module folds where
    its hosts have biases, e.g. GPT-2 and BERT projections, not Llama's) or ``"no"``."""
    conn = connected_modules(modules)
    vals = {"no" if m.name in conn else mergeability(m, [reference.sites[s].kind for s in m.sites])  # type: ignore[attr-defined]
            for m in modules}
    return "no" if "no" in vals else ("with a host bias" if "with a host bias" in vals else "yes")


def _call(node: ast.AST, op: str) -> ast.Call | None:
    return node if isinstance(node, ast.Call) and getattr(node.func, "id", None) == op and not node.keywords else None


def low_rank_factors(m: object) -> tuple[str, str, str] | None:
    """``(A, B, c)`` when the module is a low-rank update ``ΔW = c · B A`` of its host, else None.

    Recognised from structure: a parallel module computing ``linear(linear(x, A), B)``
    (``x`` possibly under ``dropout``) with parameters ``A`` [r, in] and ``B`` [out, r],
    integrated as ``h + delta``, ``h + c * delta`` or ``h + delta * c`` with ``c`` an
    expression of hyperparameters and constants (returned as text, ``"1"`` when absent).
    """
    if FORMS.get(getattr(m, "form", None)) is not DELTA_FORM:  # type: ignore[arg-type]
        return None
    params = set(m.params)  # type: ignore[attr-defined]
    outer = _call(parse_expr(m.compute).tree, "linear")  # type: ignore[attr-defined]
    if outer is None or len(outer.args) != 2:
        return None
    inner = _call(outer.args[0], "linear")
    if inner is None or len(inner.args) != 2:
        return None
    src = inner.args[0]
    drop = _call(src, "dropout")
    if drop is not None:
        src = drop.args[0] if drop.args else src
    names = [a.id if isinstance(a, ast.Name) else None for a in (src, inner.args[1], outer.args[1])]
    if names[0] != "x" or names[1] not in params or names[2] not in params:
        return None
    e = parse_expr(m.integrate).tree  # type: ignore[attr-defined]
    if not (isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add)):
        return None
    sides = [e.left, e.right]
    if not any(isinstance(s, ast.Name) and s.id == "h" for s in sides):
        return None
    other = sides[1] if isinstance(sides[0], ast.Name) and sides[0].id == "h" else sides[0]
    if isinstance(other, ast.Name) and other.id == "delta":
        return names[1], names[2], "1"  # type: ignore[return-value]
    if isinstance(other, ast.BinOp) and isinstance(other.op, ast.Mult):
        fs = [other.left, other.right]
        ds = [f for f in fs if isinstance(f, ast.Name) and f.id == "delta"]
        if len(ds) != 1:
            return None
        c = fs[1] if fs[0] is ds[0] else fs[0]
        used = {n.id for n in ast.walk(c) if isinstance(n, ast.Name)} - {n.func.id for n in ast.walk(c) if isinstance(n, ast.Call)}  # type: ignore[attr-defined]
        if used & (params | {"x", "h", "delta", "W", "b", "mask"}):
            return None
        return names[1], names[2], ast.unparse(c)  # type: ignore[return-value]
    return None
