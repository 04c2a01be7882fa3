"""Layer-batched programs: the units of one module at every layer of a site, evaluated at once.

Units whose tensors are each either shared across layers or *stacked*
(``stacked: layers``, the per-layer copies kept in one tensor ``[layers, *shape]``)
hold the same tensors and differ only in the slice of the stacked ones they
read. Where they are evaluated together (the key/value prefixes of every layer,
which fill the attention cache at once), their expressions are traced once,
with torch.fx, over the whole stacked tensors:

* a subexpression that reads no stacked tensor (e.g. the hidden layer of a
  reparameterisation MLP over shared tensors) is one node, computed once for
  every layer (ops are pure: the same call on the same values is one node);
* a primitive with a rule over a leading layer dimension
  (:mod:`pefref.ops.layered`, e.g. ``linear`` of a shared input by stacked
  weights: one matrix product) runs once for all layers;
* any other op reading stacked values runs per layer on the unbound slices,
  and its results are stacked again (always what the units compute).

The result is each output field with a leading layer dimension, in the order of
the stacked tensors' slices. The generated module holds the units' tensors
themselves (no copy), off any module tree.
"""

from __future__ import annotations

import itertools
import linecache
import operator
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn

from pefref.compiler.units import Unit, _leaf
from pefref.language.expr import evaluate, parse_expr
from pefref.language.forms import FORMS, Integration
from pefref.ops import PRIMITIVES
from pefref.ops.layered import rule_for

__all__ = ["batchable", "layer_batch"]


class _V:
    """A traced tensor value of the batched walk; ``stacked``: it has a leading layer dimension (a stacked
    tensor, or an op reading one).

    Arithmetic (the expression walk's ``+ - * / @ **``) between values that are not stacked, or of a stacked
    value with a number, acts on the values whole; with a stacked value and another tensor it runs per layer
    (broadcasting the other operand against the layer dimension could pair it with the wrong dimension)."""

    __slots__ = ("p", "per_layer", "stacked")

    def __init__(self, p: Any, stacked: bool, per_layer: Callable[..., _V]) -> None:
        self.p, self.stacked, self.per_layer = p, stacked, per_layer

    def _arith(self, fn: Callable[[Any, Any], Any], other: Any, reflected: bool) -> _V:
        number = isinstance(other, (int, float)) and not isinstance(other, bool)
        if not (self.stacked or (isinstance(other, _V) and other.stacked)) or (number and fn is not operator.matmul):
            o = other.p if isinstance(other, _V) else other
            return _V(fn(o, self.p) if reflected else fn(self.p, o), self.stacked, self.per_layer)
        return self.per_layer(fn, [other, self] if reflected else [self, other], {})

    def __add__(self, o: Any) -> _V: return self._arith(operator.add, o, False)
    def __radd__(self, o: Any) -> _V: return self._arith(operator.add, o, True)
    def __sub__(self, o: Any) -> _V: return self._arith(operator.sub, o, False)
    def __rsub__(self, o: Any) -> _V: return self._arith(operator.sub, o, True)
    def __mul__(self, o: Any) -> _V: return self._arith(operator.mul, o, False)
    def __rmul__(self, o: Any) -> _V: return self._arith(operator.mul, o, True)
    def __truediv__(self, o: Any) -> _V: return self._arith(operator.truediv, o, False)
    def __rtruediv__(self, o: Any) -> _V: return self._arith(operator.truediv, o, True)
    def __pow__(self, o: Any) -> _V: return self._arith(operator.pow, o, False)
    def __rpow__(self, o: Any) -> _V: return self._arith(operator.pow, o, True)
    def __matmul__(self, o: Any) -> _V: return self._arith(operator.matmul, o, False)
    def __rmatmul__(self, o: Any) -> _V: return self._arith(operator.matmul, o, True)
    def __neg__(self) -> _V: return _V(-self.p, self.stacked, self.per_layer)
    def __pos__(self) -> _V: return self


def batchable(units: Sequence[Unit]) -> bool:
    """Whether ``units`` can run as one layer-batched program: one program up to the slice each unit
    reads, the same tensors, at least one of them stacked, and every slice of the stacked ones read once."""
    if len(units) < 2 or not units[0].picks or units[0].tensor_of:  # (split tensors are held as pieces)
        return False
    first = units[0]

    def head(u: Unit) -> tuple[Any, ...]:  # the program but its constants and shapes: a class may come from a model of
        p = u.program  # other sizes whose code is the same
        return p.form, p.exprs, p.views, p.inputs, p.publish

    own = {n: t for n, t in [*first.named_parameters(recurse=False), *first.named_buffers(recurse=False)]}
    n_layers = {own[n].shape[0] for n in first.picks}
    if len(n_layers) != 1 or n_layers.pop() != len(units):
        return False
    seen: set[int] = set()
    for u in units:
        if head(u) != head(first) or set(u.picks) != set(first.picks) or len(set(u.picks.values())) != 1:
            return False
        mine = {n: t for n, t in [*u.named_parameters(recurse=False), *u.named_buffers(recurse=False)]}
        if mine.keys() != own.keys() or any(mine[n] is not own[n] for n in own):
            return False
        seen.add(next(iter(u.picks.values())))
    return seen == set(range(len(units)))


class _BatchProgram(nn.Module):
    """The units' tensors (stacked ones whole); its forward walks the expressions over stacked values (traced once)."""

    def __init__(self, unit: Unit) -> None:
        super().__init__()
        prog = unit.program
        self.form, self.exprs, self.consts = prog.form, {f: parse_expr(t) for f, t in prog.exprs}, dict(prog.consts)
        self.results = [f for f in prog.rule.results if f in self.exprs]
        form = FORMS.get(prog.form)
        self.positions = form is not None and form.integration is Integration.POSITIONS
        self.views, self.stacked = dict(prog.views), {n for n, _ in prog.picks}
        self.tensor_names: list[str] = []
        for name, t in [*unit.named_parameters(recurse=False), *unit.named_buffers(recurse=False)]:
            if isinstance(t, nn.Parameter):
                self.register_parameter(name, t)
            else:
                self.register_buffer(name, t)
            self.tensor_names.append(name)
        self.n_layers = int(getattr(self, next(iter(self.stacked))).shape[0])

    def forward(self, training: Any) -> Any:
        memo: dict[Any, Any] = {}
        unbound: dict[int, Any] = {}
        n_l = self.n_layers

        def part(v: Any, i: int) -> Any:  # layer i of a value: its slice if stacked (one unbind per value)
            if isinstance(v, (tuple, list)):
                return type(v)(part(e, i) for e in v)
            if not isinstance(v, _V):
                return v
            if not v.stacked:
                return v.p
            if id(v) not in unbound:
                u = _leaf(torch.unbind, memo)(v.p)
                unbound[id(v)] = (v, [u[j] for j in range(n_l)])
            return unbound[id(v)][1][i]

        def per_layer(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> _V:
            outs = [fn(*[part(a, i) for a in args], **{k: part(v, i) for k, v in kwargs.items()}) for i in range(n_l)]
            proxy = next(o for o in outs if isinstance(o, fx.Proxy))
            return _V(proxy.tracer.create_proxy("call_function", torch.stack, (outs,), {}), True, per_layer)

        def whole(v: Any) -> Any:
            if isinstance(v, (tuple, list)):
                return type(v)(map(whole, v))
            return v.p if isinstance(v, _V) else v

        def is_stacked(v: Any) -> bool:
            return any(map(is_stacked, v)) if isinstance(v, (tuple, list)) else isinstance(v, _V) and v.stacked

        def op(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            leaf = _leaf(fn, memo)

            def call(*args: Any, **kwargs: Any) -> Any:
                flags = tuple(map(is_stacked, args))
                kw_stacked = any(map(is_stacked, kwargs.values()))
                if not any(flags) and not kw_stacked:  # reads no stacked value: computed once for every layer
                    return _V(leaf(*map(whole, args), **{k: whole(v) for k, v in kwargs.items()}), False, per_layer)
                rule = None if kw_stacked else rule_for(name, flags)
                if rule is not None:
                    return _V(_leaf(rule, memo)(*map(whole, args), **{k: whole(v) for k, v in kwargs.items()}), True, per_layer)
                return per_layer(leaf, args, kwargs)

            return call

        def scalar(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            traced = op(name, fn)  # a scalar op of numbers runs at once; of tensors it is traced like any op
            return lambda *a, **kw: traced(*a, **kw) if any(isinstance(v, _V) for v in (*a, *kw.values())) else fn(*a, **kw)

        ops: dict[str, Any] = {k: (scalar(k, p.fn) if p.scalar else op(k, p.fn)) for k, p in PRIMITIVES.items()}
        drop = PRIMITIVES["dropout"].fn  # random, elementwise: one mask over a stacked value is one per layer

        def dropout(a: Any, p: Any) -> Any:
            return _V(_leaf(drop)(a.p, p, training), a.stacked, per_layer) if p > 0 else a

        ops["dropout"] = dropout
        for k, p in PRIMITIVES.items():  # stochastic ops: the compiler supplies training, as in a unit's own program
            if p.stochastic:
                ops[k] = (lambda call: lambda *a, **kw: call(*a, training=training, **kw))(op(k, p.fn))
        env: dict[str, Any] = dict(self.consts)
        for n in self.tensor_names:
            t = getattr(self, n)
            view = self.views.get(n)
            if n in self.stacked:
                env[n] = _V(t[(slice(None), *(slice(0, s) for s in view))] if view else t, True, per_layer)
            else:
                env[n] = _V(t[tuple(slice(0, s) for s in view)] if view else t, False, per_layer)
        env.update(x=None, h=None, W=None, mask=None)
        if self.positions and len(self.results) > 1:  # keys and values of every layer at once
            return tuple(self._whole(evaluate(self.exprs[f], env, ops)) for f in self.results)
        raise ValueError(f"no layer-batched program for form {self.form!r}")

    def _whole(self, v: Any) -> Any:
        """A result with its layer dimension (a value that reads no stacked tensor is the same for every layer)."""
        if v.stacked:
            return v.p
        return cast(fx.Proxy, v.p).tracer.create_proxy("call_function", _leading, (v.p, self.n_layers), {})


def _leading(v: torch.Tensor, n: int) -> torch.Tensor:
    """``v`` repeated (as a view) along a new leading dimension of ``n``."""
    return v.unsqueeze(0).expand(n, *v.shape)


def layer_batch(units: Sequence[Unit]) -> Callable[[Unit, Any], Any]:
    """The layer-batched program of ``units`` (see :func:`batchable`), as generated code: ``fn(units[0], training)``
    → the output fields (a prefix's keys and values) with a leading layer dimension, slice ``i`` being what the unit
    reading slice ``i`` gives. The code reads the tensors from the unit it is given (by name), so it follows them
    wherever the model moves them."""
    prog = _BatchProgram(units[0])
    tracer = fx.Tracer(autowrap_modules=cast(Any, ()), autowrap_functions=())
    tracer.proxy_buffer_attributes = True  # frozen tensors stay named attributes of the unit
    graph = tracer.trace(prog)
    pc = graph.python_code(root_module="self")
    filename = f"<pefref generated layer batch {next(_COUNT)}>"
    linecache.cache[filename] = (len(pc.src), None, pc.src.splitlines(True), filename)  # tracebacks show the code
    glb = dict(pc.globals)
    exec(compile(pc.src, filename, "exec"), glb)  # code generated by torch.fx from the checked expression tree, never YAML text
    return cast(Callable[[Unit, Any], Any], glb["forward"])


_COUNT = itertools.count()  # numbers the generated files
