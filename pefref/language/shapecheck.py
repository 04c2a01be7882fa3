"""Shape inference at validate time: a module's tensors and expressions on representative sizes.

Every module is checked at each of its sites on :data:`EXAMPLE_SIZES` (a small
Transformer with grouped-query attention, so that no two widths coincide by
accident) and a batch of ``B`` sequences of ``S`` positions. Parameters'
shapes must resolve to positive integers; an initialiser must give its
parameter's shape; the expressions run on shapes (the primitives' rules in
:mod:`pefref.ops.shapes`) and their results must fit the host: a parallel or
sequential integration gives the host output's shape, a weight the host
weight's, a scale broadcasts to the host output (or input), prepended tokens are
``[length, d]`` and keys and values ``[length, kv_heads*d_head]``. A mismatch is a
located problem at the field (and at the column of the op that fails); where a
rule cannot tell (an op without a rule, an unknown name), the check stops
quietly, so it never refuses a sound technique. No torch.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from typing import Any, cast

from pefref.language.errors import Location, Problem
from pefref.language.expr import ExprError, arith, bad_call, parse_expr
from pefref.language.forms import Integration, form_of
from pefref.language.limits import current
from pefref.language.loader import dotted
from pefref.language.sizes import eval_scalar
from pefref.language.yamlsrc import Positions
from pefref.ops import PRIMITIVES, SUPPLIED, call_problem, signature_of, word_problem
from pefref.ops.inits import INITS, INTEGER, MIN_DIMS
from pefref.ops.shapes import SHAPE_RULES, WORKSPACE_RULES, ComplexShape, IntShape, Shape, ShapeMismatch, broadcast, matmul_shape

__all__ = ["EXAMPLE_SIZES", "BATCH", "SEQ", "check_module_shapes", "infer_shape", "init_env", "site_env", "stat_shapes", "ipca_components", "Watch", "Tally",
           "expression_cost"]

EXAMPLE_SIZES: dict[str, int] = {"d": 512, "d_ff": 2048, "L": 4, "heads": 8, "kv_heads": 2, "d_head": 64, "vocab": 1000}
"""Representative reference sizes for shape inference (distinct widths: d, d_ff, kv_heads·d_head, vocab)."""
BATCH, SEQ = 2, 9


class _Located(Exception):
    def __init__(self, message: str, column: int, on_sizes: bool = True) -> None:
        super().__init__(message)
        self.message, self.column, self.on_sizes = message, column, on_sizes  # on_sizes: found on the example sizes


Watch = Callable[[str, Shape, int, int], None]
"""Told of every tensor an op makes while shapes are inferred: (op, result shape, column, workspace elements)."""


def _made(name: str, got: Any, column: int, watch: Watch | None, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None) -> Any:
    """Check a tensor an op gives: non-negative integer dimensions, at most ``max_elements`` entries."""
    if not isinstance(got, Shape):
        return got
    if any(isinstance(d, bool) or not isinstance(d, (int, float)) or d < 0 or (isinstance(d, float) and not d.is_integer()) for d in got):
        raise _Located(f"{name} gives shape {got}: dimensions must be non-negative integers", column)
    got = type(got)(int(d) for d in got)  # a complex shape stays complex
    n, lim = math.prod(got), current().max_elements
    if n > lim:
        raise _Located(f"{name} gives a tensor of shape {got} ({n:,} elements), more than the limit of {lim:,} elements", column)
    if watch is not None:
        work = 0
        rule = WORKSPACE_RULES.get(name)
        if rule is not None:
            try:
                work = int(rule(*args, **(kwargs or {})))
            except (TypeError, ValueError, IndexError, ArithmeticError):
                work = 0
        watch(name, got, column, work)
    return got


def infer_shape(node: ast.AST, env: Mapping[str, Any], inits: Mapping[str, Shape] | None = None, watch: Watch | None = None) -> Any:
    """The value of an expression on shapes: a number, a :class:`Shape`, a tuple, a string, or None (unknown).

    ``inits``: initialiser names callable here, each giving the shape bound to it. Every tensor an op
    gives is checked (non-negative integer dimensions, at most ``max_elements`` of
    :mod:`pefref.language.limits`) and reported to ``watch``. Raises ``_Located``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env.get(node.id)
    if isinstance(node, (ast.Tuple, ast.List)):
        vals = [infer_shape(e, env, inits, watch) for e in node.elts]
        return None if any(v is None for v in vals) else tuple(vals)
    if isinstance(node, ast.UnaryOp):
        v = infer_shape(node.operand, env, inits, watch)
        return v if isinstance(v, Shape) or v is None else (-v if isinstance(node.op, ast.USub) else v)
    if isinstance(node, ast.BinOp):
        a, b = infer_shape(node.left, env, inits, watch), infer_shape(node.right, env, inits, watch)
        if a is None or b is None:
            return None
        if not isinstance(a, Shape) and not isinstance(b, Shape):
            try:
                return arith(type(node.op), a, b, node.col_offset)
            except ExprError as e:  # bounds: a huge power, a division by zero
                raise _Located(e.message, e.column) from None
            except (ArithmeticError, TypeError):
                return None
        op = _OPS.get(type(node.op), "operator")
        if isinstance(a, IntShape) or isinstance(b, IntShape):
            raise _Located(f"{op} of an integer tensor (indices, from {', '.join(_INT_SOURCES)}): use it as an index (gather, take, ...)", node.col_offset, on_sizes=False)
        cplx = isinstance(a, ComplexShape) or isinstance(b, ComplexShape)
        if cplx and not isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            raise _Located(f"{op} of a complex tensor (from fft/ifft): take real() first", node.col_offset, on_sizes=False)
        try:
            if isinstance(node.op, ast.MatMult):
                got = matmul_shape(a, b) if isinstance(a, Shape) and isinstance(b, Shape) else None
            else:
                got = broadcast(a if isinstance(a, Shape) else Shape(()), b if isinstance(b, Shape) else Shape(()))
        except ShapeMismatch as e:
            raise _Located(f"{op}: {e}", node.col_offset) from None
        return _made(op, ComplexShape(got) if cplx and got is not None else got, node.col_offset, watch)
    if isinstance(node, ast.Call):
        name = node.func.id  # type: ignore[attr-defined]
        _check_call(node, name, inits is not None and name in inits)
        if inits is not None and name in inits:
            if len(inits[name]) < MIN_DIMS.get(name, 0):
                raise _Located(f"{name}() makes tensors of at least {MIN_DIMS[name]} dimensions, not {inits[name]}", node.col_offset, on_sizes=False)
            made = IntShape(inits[name]) if name in INTEGER else inits[name]
            return _made(name, made, node.col_offset, watch, (inits[name],))
        args = [infer_shape(a, env, inits, watch) for a in node.args]
        kwargs = cast(dict[str, Any], {k.arg: infer_shape(k.value, env, inits, watch) for k in node.keywords})
        if any(v is None for v in (*args, *kwargs.values())):
            return None
        prim = PRIMITIVES.get(name)
        if prim is not None and prim.scalar and not any(isinstance(v, Shape) for v in (*args, *kwargs.values())):
            why = bad_call(name, prim.fn, args, kwargs)
            if why is not None:
                raise _Located(why, node.col_offset)
            try:
                return prim.fn(*args, **kwargs)
            except (ArithmeticError, TypeError, ValueError):
                return None
        rule = SHAPE_RULES.get(name)
        if rule is None:
            return None
        if prim is not None:
            _check_kinds(prim, args, kwargs, node.col_offset)
        try:
            got = rule(*args, **kwargs)
        except ShapeMismatch as e:
            raise _Located(f"{name}: {e}", node.col_offset) from None
        except (TypeError, IndexError, ValueError, ZeroDivisionError, AttributeError) as e:  # every argument known: they do not go together
            shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
            raise _Located(f"{name} cannot take ({shown}): {e}", node.col_offset) from None
        if prim is not None and (prim.int_out or (prim.layout and args and isinstance(args[0], IntShape))) and isinstance(got, Shape):
            got = IntShape(got)
        return _made(name, got, node.col_offset, watch, tuple(args), kwargs)
    return None


_NUMBER_KINDS = ("int", "float", "bool")
_INT_SOURCES = sorted({n for n, p in PRIMITIVES.items() if p.int_out} | INTEGER)


def _check_kinds(prim: Any, args: list[Any], kwargs: dict[str, Any], col: int) -> None:
    """Each argument is of the kind the op's signature annotates: a tensor where it says ``torch.Tensor``, a number
    where it says int, float or bool; a real tensor unless the op takes complex ones (``complex_in``)."""
    if not prim.complex_in and any(isinstance(v, ComplexShape) for v in (*args, *kwargs.values())):
        raise _Located(f"{prim.name} takes real tensors; this one is complex (from fft/ifft): take real() first", col, on_sizes=False)
    params = [p for p in signature_of(prim.fn).parameters.values() if p.name not in SUPPLIED]
    bound = list(zip(params, args)) + [(next((p for p in params if p.name == k), None), v) for k, v in kwargs.items()]
    for p, v in bound:
        if p is None or p.kind is p.VAR_POSITIONAL:
            continue
        if isinstance(v, IntShape) and p.name not in prim.int_args and not (prim.layout and p is params[0]):
            raise _Located(f"{prim.name}: its argument {p.name} takes floating values, found an integer tensor {v} (indices, from "
                           f"{', '.join(_INT_SOURCES)}); integer tensors go where an op takes indices", col, on_sizes=False)
        if p.name in prim.int_args and isinstance(v, Shape) and not isinstance(v, IntShape):
            raise _Located(f"{prim.name}: its argument {p.name} takes an integer tensor (indices), found a floating one {v}", col, on_sizes=False)
        ann = str(p.annotation).replace(" ", "")
        kinds = set(ann.split("|"))
        if "torch.Tensor" in kinds and not isinstance(v, Shape) and not ("None" in kinds and v is None):
            raise _Located(f"{prim.name}: its argument {p.name} is a tensor, found {v!r}", col, on_sizes=False)
        if kinds and kinds <= {*_NUMBER_KINDS, "None"} and isinstance(v, (Shape, tuple)):
            raise _Located(f"{prim.name}: its argument {p.name} is a number, found {'a tensor ' if isinstance(v, Shape) else 'a tuple '}{v!r}", col, on_sizes=False)


def _check_call(node: ast.Call, name: str, init: bool) -> None:
    """The call's arguments bind to the signature of what it calls (an initialiser in an ``init``, else an op)."""
    kw = tuple(k.arg for k in node.keywords if k.arg is not None)
    if init:
        why = call_problem(INITS[name], len(node.args), kw, skip=3)
        if why is None and any(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in (*node.args, *(k.value for k in node.keywords))):
            why = "an initialiser takes no word arguments"
        if why is not None and name in PRIMITIVES:
            why += f"; in an init, {name}() is the initialiser (the op {name}() is not callable there)"
    elif (prim := PRIMITIVES.get(name)) is not None:
        why = call_problem(prim.fn, len(node.args), kw, supplied=SUPPLIED if prim.leaf else ())
        words: list[tuple[int | str, ast.Constant]] = [(i, a) for i, a in enumerate(node.args) if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        words += [(k.arg, k.value) for k in node.keywords if k.arg is not None and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)]
        for at, lit in words:
            if why is None:
                why = word_problem(prim, at, cast(str, lit.value))
    else:
        return
    if why is not None:
        raise _Located(f"{name}: {why}", node.col_offset, on_sizes=False)


_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.MatMult: "@", ast.Pow: "**"}


def site_env(kind: str, d_in: int, d_out: int, sizes: Mapping[str, int]) -> dict[str, Shape]:
    """Shapes of the host tensors a module at a site of ``kind`` may read."""
    bs = (BATCH, SEQ)
    env = {"x": Shape((*bs, d_in)), "h": Shape((*bs, d_out)), "mask": Shape(bs)}
    if kind == "linear":
        env |= {"W": Shape((d_out, d_in)), "b": Shape((d_out,))}
    elif kind == "embedding":
        env |= {"W": Shape((sizes["vocab"], d_out))}
    elif kind == "norm":
        env |= {"W": Shape((d_out,)), "b": Shape((d_out,))}
    return env


def stat_shapes(m: Any, d_in: int, d_out: int, names: Mapping[str, Any] | None = None) -> dict[str, Shape]:
    """Shapes of a module's calibration statistics at a site of widths ``d_in``, ``d_out`` (``names``: the
    hyperparameters and sizes an ``input_ipca``'s number of components reads; without them, or where they do not
    give it, its rows are taken as ``d_in``)."""
    dims = {"input_cov": (d_in, d_in), "output_cov": (d_out, d_out), "weight_grad": (d_out, d_in), "input_pca": (d_in, d_in)}
    out = {}
    for name, st in (getattr(m, "calibration", None) or {}).items():
        if st.kind == "input_ipca":
            out[name] = Shape((ipca_components(st, names, d_in, d_out), d_in))
        else:
            out[name] = Shape(dims[st.kind])
    return out


def ipca_components(st: Any, names: Mapping[str, Any] | None, d_in: int, d_out: int) -> int:
    """The number of principal axes an ``input_ipca`` statistic keeps (``d_in`` where ``names`` do not give it)."""
    if names is None:
        return d_in
    try:
        return int(eval_scalar(st.components, {**names, "d_in": d_in, "d_out": d_out}))
    except Exception:
        return d_in


def init_env(spec: Any, env: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, Any]:
    """What the initialiser of the tensor ``spec`` sees besides ``env`` (the site's names and earlier tensors): the unit's
    seed, and for a tensor shared across layers at a site with a weight, ``W_layers`` [L, *W] (every layer's weight)."""
    out = {**env, "init_seed": 0}
    if spec.shared == "layers" and isinstance(env.get("W"), Shape):
        out["W_layers"] = Shape((sizes["L"], *env["W"]))
    return out


def _problem(pos: Positions, path: tuple[Any, ...], column: int, msg: str) -> Problem:
    loc = pos.at(path)
    col = column + (1 if path in pos.quoted else 0)
    return Problem(Location(loc.file, loc.line, loc.column + col), dotted(path), msg)


def _run(text: str, env: Mapping[str, Any], pos: Positions, path: tuple[Any, ...], inits: Mapping[str, Shape] | None = None) -> tuple[Any, list[Problem]]:
    try:
        return infer_shape(parse_expr(text).tree, env, inits), []
    except _Located as e:
        return None, [_problem(pos, path, e.column, f"{e.message} (shapes on the reference sizes {_sizes_text()})" if e.on_sizes else e.message)]
    except ExprError:
        return None, []


def _sizes_text() -> str:
    return ", ".join(f"{k}={v}" for k, v in EXAMPLE_SIZES.items() if k != "L")


def connection_shapes(inputs: Mapping[str, Any], published: Mapping[str, Any], ref: Any, sizes: Mapping[str, int]) -> dict[str, Any]:
    """The shapes of the values ``inputs`` (connections) read, on ``sizes``: an input of the call, a module's output
    (``published``: module name -> the shape of its delta; None where unknown), a site's hidden state or weight."""
    extra: dict[str, Any] = {}
    for name, conn in inputs.items():
        if conn.call is not None:
            extra[name] = IntShape((BATCH,) if conn.call == "task_ids" else (BATCH, SEQ))
        elif conn.module is not None:
            extra[name] = published.get(conn.module)
        elif conn.site in ref.sites:
            site = ref.sites[conn.site]
            w_out = _width(site.out, sizes) or 0
            extra[name] = site_env(site.kind, _width(site.in_, sizes) or w_out, w_out, sizes).get(conn.tensor)
    return extra


def check_module_shapes(m: Any, mpath: tuple[Any, ...], hps: Mapping[str, Any], ref: Any, pos: Positions,
                        published: dict[str, Any] | None = None) -> list[Problem]:
    """Shape problems of one (expanded) module at each of its sites, on :data:`EXAMPLE_SIZES`.

    ``published``: the output shapes of the modules checked before (module name -> shape of its
    ``delta``), read by this module's connections; this module's output shape is added to it."""
    sizes = {**EXAMPLE_SIZES, **{k: 16 for k in ref.sizes if k not in EXAMPLE_SIZES}}
    published = {} if published is None else published
    extra = connection_shapes(getattr(m, "inputs", {}), published, ref, sizes)
    out: list[Problem] = []
    for s in m.sites:
        site = ref.sites.get(s)
        if site is None:
            continue
        kind = site.kind
        d_out = _width(site.out, sizes) or 0
        d_in = _width(site.in_, sizes) or d_out
        if kind == "kv":
            d_in = 0
        names: dict[str, Any] = {**sizes, "d_in": d_in, "d_out": d_out, "causal": 1, **hps}
        env: dict[str, Any] = {**names, **site_env(kind, d_in, d_out, sizes), **(extra or {}), **stat_shapes(m, d_in, d_out, names)}
        for pname, spec in m.params.items():
            pp = mpath + ("params", pname)
            dims: list[int] = []
            for k, dim in enumerate(spec.shape):
                v, probs = (dim, []) if isinstance(dim, int) else _run(dim, names, pos, pp + ("shape", k))
                out += probs  # a bound exceeded (a huge power, a division by zero) while resolving it
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    if v is not None:
                        out.append(_problem(pos, pp + ("shape", k), 0, f"dimension {dim!r} is {v!r} at site {s!r}; expected a positive integer (on the reference sizes {_sizes_text()})"))
                    dims = []
                    break
                if v > current().max_dim:
                    out.append(_problem(pos, pp + ("shape", k), 0, f"dimension {dim!r} resolves to {v} at site {s!r}, over the limit of {current().max_dim} (on the reference sizes {_sizes_text()})"))
                    dims = []
                    break
                dims.append(v)
            if dims and math.prod(dims) > current().max_elements:
                out.append(_problem(pos, pp + ("shape",), 0, f"shape {Shape(dims)} has {math.prod(dims):,} elements at site {s!r}, over the limit of {current().max_elements:,} (on the reference sizes {_sizes_text()})"))
                dims = []
            if not dims:
                env[pname] = None
                continue
            shape = Shape(dims)
            env[pname] = shape
            got, probs = _run(spec.init, init_env(spec, env, sizes), pos, pp + ("init",), {k: shape for k in INITS})
            out += probs
            if isinstance(got, Shape) and (got != shape or isinstance(got, ComplexShape)):
                out.append(_problem(pos, pp + ("init",), 0, f"init gives {got}, the parameter is {shape} at site {s!r}"))
            elif isinstance(got, IntShape):
                env[pname] = IntShape(shape)  # indices: expressions may use them only as such
                if spec.trainable:
                    out.append(_problem(pos, pp + ("init",), 0, f"init gives an integer tensor {got} (indices), which cannot train: declare it trainable: false"))
        out += _fields(m, mpath, env, sizes, s, pos)
        published.setdefault(m.name, env.get("delta"))
        if out:
            break  # one site's problems are enough; the others would repeat them
    return out


def _width(text: str | None, sizes: Mapping[str, int]) -> int | None:
    if text is None:
        return None
    try:
        v = infer_shape(parse_expr(text).tree, sizes)
    except (_Located, ExprError):
        return None
    return int(v) if isinstance(v, (int, float)) else None


def _fields(m: Any, mpath: tuple[Any, ...], env: dict[str, Any], sizes: Mapping[str, int], site: str, pos: Positions) -> list[Problem]:
    out: list[Problem] = []
    how = form_of(m).integration

    def want(fld: str, got: Any, shape: Shape, what: str, broadcast_ok: bool = False) -> None:
        if not isinstance(got, Shape):
            return
        if isinstance(got, ComplexShape):
            out.append(_problem(pos, mpath + (fld,), 0, f"{fld} gives a complex tensor {got}; take real() of it"))
            return
        if isinstance(got, IntShape):
            out.append(_problem(pos, mpath + (fld,), 0, f"{fld} gives an integer tensor {got} (indices); it must give floating values"))
            return
        if broadcast_ok:
            try:
                if broadcast(got, shape) == shape:
                    return
            except ShapeMismatch:
                pass
        elif got == shape:
            return
        out.append(_problem(pos, mpath + (fld,), 0, f"{fld} gives {got}; {what} is {shape} at site {site!r}"))

    def run(fld: str) -> Any:
        got, probs = _run(getattr(m, fld), env, pos, mpath + (fld,))
        out.extend(probs)
        return got

    if how is Integration.HIDDEN:
        if getattr(m, "side", "output") == "input":  # h is the tensor entering the host, and the result replaces it
            env["h"] = env["x"]
        delta = run("compute")
        env["delta"] = delta
        if delta is not None and not out:
            want("integrate", run("integrate"), env["h"], "the host output h")
    elif how is Integration.WEIGHT and isinstance(env.get("W"), Shape):
        want("weight", run("weight"), env["W"], "the host weight W")
    elif how is Integration.SCALE:
        target = env["x"] if getattr(m, "side", "output") == "input" else env["h"]
        want("scale", run("scale"), Shape(target[-1:]), "the width it scales", broadcast_ok=True)
    elif how is Integration.POSITIONS:
        n = _run(m.length, env, pos, mpath + ("length",))[0]
        if isinstance(n, (int, float)) and float(n).is_integer():
            if m.tokens is not None and any(c.call == "task_ids" for c in getattr(m, "inputs", {}).values()):
                want("tokens", run("tokens"), Shape((BATCH, int(n), sizes["d"])), "[batch, length, d] (one prompt per example's task)")
            elif m.tokens is not None:
                want("tokens", run("tokens"), Shape((int(n), sizes["d"])), "[length, d]")
            else:
                kv = Shape((int(n), sizes["kv_heads"] * sizes["d_head"]))
                want("keys", run("keys"), kv, "[length, kv_heads*d_head]")
                want("values", run("values"), kv, "[length, kv_heads*d_head]")
                if getattr(m, "gate", None) is not None:  # read from the hidden state entering the attention, whatever the site's x
                    env["x"] = Shape((BATCH, SEQ, sizes["d"]))
                    got = run("gate")
                    if isinstance(got, Shape) and not (got[:1] == (BATCH,) and math.prod(got[1:]) == 1):
                        out.append(_problem(pos, mpath + ("gate",), 0, f"gate gives {got}; one value per example, [batch, 1] "
                                            f"= {Shape((BATCH, 1))} for x {env['x']}, is needed at site {site!r}"))
    if getattr(m, "host_update", None) is not None and isinstance(env.get("W"), Shape):
        want("host_update", run("host_update"), env["W"], "the host weight W")
    return out


class Tally:
    """What shape-inference walks made: every tensor's elements added up (a bound on what one evaluation holds at
    once: nothing is assumed freed), and the largest one with the op that makes it."""

    def __init__(self) -> None:
        self.total = 0
        self.largest = 0
        self.what = ""

    def __call__(self, op: str, shape: Shape, column: int, work: int) -> None:
        n = math.prod(shape) + work
        self.total += n
        if n > self.largest:
            self.largest, self.what = n, f"{op} giving {shape}" + (f" (and {work:,} elements of workspace)" if work else "")


_FIELDS = ("compute", "integrate", "weight", "scale", "tokens", "keys", "values", "host_update")


def expression_cost(m: Any, names: Mapping[str, Any], d_in: int, d_out: int, W: tuple[int, ...] | None,
                    param_shapes: Mapping[str, tuple[int, ...]], batch: int = 1, seq: int = 2) -> list[tuple[str, Tally]]:
    """The tensors each of a module's expressions makes on real sizes: each parameter's ``init``
    (``params.NAME.init``), then its output fields and ``host_update``, on ``batch`` sequences of ``seq``
    positions (apply's probe). Shapes a rule cannot tell are not counted; a tensor over ``max_elements``
    raises a :class:`PefrefError` naming the field and column."""
    from pefref.language.errors import PefrefError

    bs = (batch, seq)
    env: dict[str, Any] = {**names, "x": Shape((*bs, d_in)), "h": Shape((*bs, d_out)), "mask": Shape(bs), "b": Shape((d_out,))}
    if W is not None:
        env["W"] = Shape(W)
        env["W_layers"] = Shape((names.get("L", 1), *W))  # what a tensor shared across layers may read at init
    env.update(stat_shapes(m, d_in, d_out, names))
    jobs: list[tuple[str, str, Mapping[str, Shape] | None]] = []
    for pname, shape in param_shapes.items():
        jobs.append((f"params.{pname}.init", str(m.params[pname].init), {k: Shape(shape) for k in INITS}))
    jobs += [(f, str(getattr(m, f)), None) for f in _FIELDS if getattr(m, f, None) is not None]
    out: list[tuple[str, Tally]] = []
    done = False
    integer: set[str] = set()  # parameters whose init makes indices
    for fld, text, inits in jobs:
        if not done and inits is None:  # the output fields read the parameters
            env.update({p: (IntShape if p in integer else Shape)(s) for p, s in param_shapes.items()})
            done = True
        tally = Tally()
        try:
            got = infer_shape(parse_expr(text).tree, env, inits, tally)
        except _Located as e:
            raise PefrefError(f"{fld}: {e.message} (column {e.column + 1} of {text!r})") from None
        except ExprError:
            continue
        if fld == "compute":
            env["delta"] = got
        if inits is not None and isinstance(got, IntShape):
            integer.add(fld.split(".")[1])
        out.append((fld, tally))
    return out
