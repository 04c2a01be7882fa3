"""The compiler: one module description + one site context → one runnable torch module.

Technique-agnostic: it reads the form and the expressions of a module
description and never its name. Each *unit* (one module at one site of one
layer) is an ``nn.Module`` holding the unit's tensors; its forward is produced by
tracing the expression walk with :mod:`torch.fx`, so what runs is generated
straight-line code calling the registered primitives (no per-call
interpretation). The tracing and code generation happen once per *program*
(a description with its constants) and the generated class is shared by all
units of that program: injecting 160 units costs one trace. Every unit has the same signature
``forward(x, h, W, training, mask=None, inputs=None, b=None)`` (``mask``: the model's key padding mask [batch, seq],
``b``: the host's bias, zeros where it has none (:func:`pefref.runtime.hosts.bias_of`), for modules that read it;
for modules that read it; ``inputs``: the values of the module's connections, by name; a unit whose
output other units read returns ``(output, delta)``). What the forward computes is the form's
:class:`~pefref.language.forms.Rule` (the forms' registry): its fields in order, bound values visible to the
later ones, the present results returned; the code never names a form. For the registered forms:

* parallel:        ``integrate(h, delta=compute(x))`` → new host output
* sequential:      ``integrate(h, delta=compute(h))`` → new host output
* reparameterise:  ``weight(W)`` → the weight the host runs with; where the weight expression has an
                   activation-space reading (:mod:`pefref.compiler.activation`), the class also has
                   ``linear_forward(x, None, W, training)`` → :math:`x W'^\\top` without forming ``W'``
* rescale:         ``scale`` → vector multiplying the host output (or input)
* prepend:         ``tokens`` or ``(keys, values)`` → positions to prepend; a prefix with a ``gate``
                   also holds ``unit.gate_unit`` (same tensors): ``gate_unit(x, None, None, training)``
                   → the gate [batch, 1] of ``x``, the hidden state entering a layer's attention (a form's
                   ``side_rules``: one more program over the unit's tensors per given field)

A program is a :class:`Program` (printable, hashable: equal programs share one generated class).
"""

from __future__ import annotations

import ast
import linecache
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import module as _torch_module

from pefref.compiler import parts
from pefref.compiler.activation import NoLinearRule, linear_forward
from pefref.language.check import INIT_SEED, LAYER_WEIGHTS
from pefref.language.errors import PefrefError
from pefref.language.expr import evaluate, parse_expr
from pefref.language.forms import FORMS, Integration, Rule, form_of
from pefref.language.hparams import resolve_hyperparameters, shape_of, share_run
from pefref.language.limits import current
from pefref.ops import PRIMITIVES, TORCH_SETUP
from pefref.ops.inits import FILLERS, init_table

for _setup in TORCH_SETUP:  # torch-side definitions of primitives, made before any traced call
    _setup()

__all__ = ["Program", "SiteContext", "resolve_hyperparameters", "shape_of", "build_unit", "SharedStore", "OUTPUT_FIELDS", "Unit", "clear_programs", "Recipe", "TensorRecipe", "recipe"]

OUTPUT_FIELDS = {**{f.name: f.fields for f in FORMS.values()}, **{fld: r.fields for f in FORMS.values() for fld, r in f.side_rules.items()}}
"""The expression fields a program of each form (or side program, e.g. a prefix's ``gate``) evaluates."""


@dataclass(frozen=True)
class Program:
    """What one generated unit class is compiled from: a module description under one set of constants.

    ``form``: the form's name (a side program, e.g. a prefix's gate, is named by its field); ``rule``: how
    the forward evaluates ``exprs`` (field -> expression text); ``consts``: sizes, host widths, flags and
    hyperparameters; ``shapes``: (name, *entry) of each tensor (:func:`parts.entry`); ``views``: tensors
    read through a smaller view; ``inputs``: connection names; ``publish``: also return the published
    value; ``picks``: stacked tensors and the index of this unit's slice; ``lean``: try an activation-space
    reading of the weight (:mod:`pefref.compiler.activation`). Hashable: equal programs share one class."""

    form: str
    rule: Rule
    exprs: tuple[tuple[str, str], ...]
    consts: tuple[tuple[str, Any], ...]
    shapes: tuple[tuple[Any, ...], ...]
    views: tuple[tuple[str, tuple[int, ...]], ...] = ()
    inputs: tuple[str, ...] = ()
    publish: bool = False
    picks: tuple[tuple[str, int], ...] = ()
    lean: bool = False


@dataclass
class SiteContext:
    """What the compiler knows of one placement: sizes, host widths, dtype, device, host weight."""

    site: str
    layer: int | None
    d_in: int
    d_out: int
    sizes: Mapping[str, int]
    flags: Mapping[str, int] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    W: torch.Tensor | None = None
    host_dtype: torch.dtype | None = None  # the host's dtype where it differs from the adapter's (the unit casts at its boundary)
    stats: Mapping[str, torch.Tensor] = field(default_factory=dict)  # calibration statistics gathered at this placement, by name
    layer_pos: int | None = None  # the layer's position among the layers the module is placed at on this site (runs of layers share by it)
    place_pos: int | None = None  # the placement's position among the module's placements in the model's module order (groups share by it)
    place_count: int | None = None  # how many placements the module has
    layer_weights: Callable[[], torch.Tensor] | None = None
    """The host weights of every layer the module is placed at on this site, stacked [L, out, in] (built only when an
    initialiser of a tensor shared across layers reads ``W_layers``); None: this placement's ``W`` alone."""

    def weights_of_layers(self) -> torch.Tensor | None:
        """``W_layers``: :attr:`layer_weights`' stack, else ``W`` as a stack of one layer."""
        if self.layer_weights is not None:
            return self.layer_weights()
        return None if self.W is None else self.W.unsqueeze(0)

    def names(self, hps: Mapping[str, Any]) -> dict[str, Any]:
        """Scalars visible to expressions: model sizes, host widths, flags, hyperparameters."""
        return {**self.sizes, "d_in": self.d_in, "d_out": self.d_out, **self.flags, **hps}


class SharedStore:
    """Tensors shared across layers and/or sites, keyed by module, name and sharing scope.

    A tensor stored ``stacked`` (per-layer copies kept in one tensor [layers, *shape]) has one key per
    module, name and site; ``picks`` counts the slices handed out so far (each unit takes the next)."""

    def __init__(self) -> None:
        self.tensors: dict[tuple[Any, ...], Any] = {}  # a tensor, or a split tensor's pieces (nested lists)
        self.picks: dict[tuple[Any, ...], int] = {}

    @staticmethod
    def key(module: str, pname: str, shared: str, site: str, layer: int | None, stacked: str = "none", run: int | None = None) -> tuple[Any, ...]:
        """The tensor's key; ``run``: for a tensor shared in runs (``every``, ``groups``), the placement's run or group."""
        if stacked != "none":
            return (module, pname, "stacked", site)
        scope = {"none": (site, layer), "layers": (site,) if run is None else (site, run), "sites": (layer,), "all": () if run is None else (run,)}[shared]
        return (module, pname, shared, *scope)


def _value_key(a: Any) -> Any:
    """A hashable identity of an op argument: the proxy itself (by identity), or the constant with its type."""
    if isinstance(a, fx.Proxy):
        return ("proxy", id(a))
    if isinstance(a, (tuple, list)):
        return (type(a).__name__, *map(_value_key, a))
    hash(a)
    return (type(a).__name__, a)


def _proxy_in(a: Any) -> fx.Proxy | None:
    """``a`` if it is a proxy, else the first proxy among the pieces of a split tensor (nested lists)."""
    if isinstance(a, fx.Proxy):
        return a
    if isinstance(a, list):
        for x in a:
            if (p := _proxy_in(x)) is not None:
                return p
    return None


def _leaf(fn: Any, memo: dict[Any, Any] | None = None) -> Any:
    """Record ``fn`` as one call in the traced graph when any argument is a proxy.

    With ``memo``, a call with the same op and the same arguments as an earlier one
    returns the earlier node (ops are pure functions): a subexpression written
    twice, e.g. a hidden layer that both keys and values read, is computed once.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        for arg in (*args, *kwargs.values()):
            if (a := _proxy_in(arg)) is not None:
                if memo is None:
                    return a.tracer.create_proxy("call_function", fn, args, kwargs)
                try:
                    key = (fn, _value_key(args), _value_key(sorted(kwargs.items())))
                except TypeError:  # an unhashable constant: no sharing
                    return a.tracer.create_proxy("call_function", fn, args, kwargs)
                if key not in memo:
                    memo[key] = (a.tracer.create_proxy("call_function", fn, args, kwargs), args, kwargs)  # args kept alive: ids stay unique
                return memo[key][0]
        return fn(*args, **kwargs)

    return call


def _supplied(fn: Any, training: Any) -> Any:
    """A stochastic op with the unit's ``training`` flag passed (recorded unshared: each call draws anew)."""
    return lambda *a, **kw: _leaf(fn)(*a, training=training, **kw)


class _Program(nn.Module):
    """Holds example tensors of a unit; its forward walks the expressions (traced once per program)."""

    def __init__(self, program: Program, tensors: dict[str, torch.Tensor], lean: bool = False) -> None:
        super().__init__()
        self.rule, self.exprs, self.consts = program.rule, {f: parse_expr(t) for f, t in program.exprs}, dict(program.consts)
        self.views, self.picks = dict(program.views), dict(program.picks)
        views = self.views
        self.input_names, self.publish, self.lean = program.inputs, program.publish, lean
        self.shapes = {n: tuple(views.get(n, t.shape[1:] if n in self.picks else t.shape))  # a stacked tensor: one layer's slice
                       for n, t in tensors.items() if not isinstance(t, list)}  # split tensors: unknown
        for name, t in parts.flatten(tensors).items():
            if isinstance(t, nn.Parameter):
                self.register_parameter(name, t)
            else:
                self.register_buffer(name, t)
        self.tensor_names = list(tensors)
        self.splits = {n: parts.lead(t) for n, t in tensors.items() if isinstance(t, list)}

    def forward(self, x: Any, h: Any, W: Any, training: Any, mask: Any = None, inputs: Any = None, b: Any = None) -> Any:
        memo: dict[Any, Any] = {}  # common subexpressions (an op called twice on the same values) become one node
        ops: dict[str, Any] = {k: _leaf(p.fn, memo) for k, p in PRIMITIVES.items()}  # a scalar op of numbers runs at once
        drop = PRIMITIVES["dropout"].fn  # random: never shared
        ops["dropout"] = lambda a, p: _leaf(drop)(a, p, training) if p > 0 else a
        for k, p in PRIMITIVES.items():  # stochastic ops: the compiler supplies training; random, never shared
            if p.stochastic:
                ops[k] = _supplied(p.fn, training)
        env = dict(self.consts)
        piecewise = parts.piecewise_names(self.exprs.values(), self.splits)
        whole = [n for n in self.tensor_names if n not in self.picks]
        env.update(parts.env_values(self, self.splits, whole, self.views, piecewise, _leaf(parts.join)))
        for n, i in self.picks.items():  # a stacked tensor: this layer's slice
            v = self.views.get(n)
            env[n] = getattr(self, n)[i][tuple(slice(0, s) for s in v)] if v else getattr(self, n)[i]
        host = {"x": x, "h": h, "W": W, "b": b, "mask": mask}  # HOST_TENSORS; a module's own tensor of one of these names shadows it
        env.update({k: v for k, v in host.items() if k not in self.tensor_names})
        for n in self.input_names:  # connections: values other units published in this forward pass
            env[n] = inputs[n]
        return self._run(env, ops, x)

    def _run(self, env: dict[str, Any], ops: dict[str, Any], x: Any) -> Any:
        """The form's rule: its fields in order (bound values visible to later ones), then its results."""
        rule, binds = self.rule, dict(self.rule.binds)
        results: list[Any] = []
        for fld in rule.fields:
            if fld not in self.exprs:
                continue
            if self.lean and fld in rule.results:  # x W'^T read in activation space (NoLinearRule where it has no such reading)
                v = linear_forward(self.exprs[fld], env, ops, x, self.shapes, (self.consts["d_out"], self.consts["d_in"]))
            else:
                v = evaluate(self.exprs[fld], env, ops)
            if fld in binds:
                env[binds[fld]] = v
            if fld in rule.results:
                results.append(v)
        if not results:
            raise PefrefError(f"a unit of {self.rule} computes nothing")
        out = results[0] if len(results) == 1 else tuple(results)
        return (out, env[rule.published]) if self.publish and rule.published else out


class Unit(nn.Module):
    """One module at one site: its own tensors, and the generated code of its *program*.

    A program is a module description compiled for one set of constants (sizes,
    host widths, hyperparameters, tensor views): every unit with the same program
    is an instance of the same generated class, so the expressions are traced
    with :mod:`torch.fx` and turned into Python code once, whatever the number
    of units (a 70B model's 160 LoRA units share one class). Class attributes:
    ``form``, ``graph`` (the traced :class:`torch.fx.Graph`), ``code`` (its
    generated source), ``used_inputs`` (the forward's arguments the code reads),
    ``picks`` (the stacked tensors it holds whole, each with the index of this unit's slice),
    ``program`` (what it was compiled from) and ``tensor_of`` (the attribute holding a piece of a split
    tensor -> the declared tensor) and ``splits`` (a split tensor -> its split dimensions;
    :mod:`pefref.compiler.parts`, whose ``read``/``write`` take a declared tensor by name).
    """

    form: str
    graph: fx.Graph
    used_inputs: frozenset[str]
    code: str
    program: Program
    tensor_of: dict[str, str] = {}
    picks: Mapping[str, int] = {}
    splits: dict[str, tuple[int, ...]] = {}
    linear_forward: Any = None  # reparameterise: x W'^T without forming W' (generated), or None
    lean_code: str = ""

    def __init__(self, tensors: Mapping[str, torch.Tensor], trainable: Mapping[str, bool]) -> None:
        # nn.Module's own state, copied from an empty module's (fresh tables; ~5x faster than Module.__init__,
        # which an apply runs once per placement)
        self.__dict__.update({k: v.copy() if isinstance(v, (dict, set)) else v for k, v in _EMPTY_MODULE_STATE.items()})
        # the names were checked when the class was made (no clash with its attributes), so without global
        # registration hooks the tensors go straight into the module's tables (register_* costs ~15 us each)
        fast = not _torch_module._global_parameter_registration_hooks and not _torch_module._global_buffer_registration_hooks
        if any(isinstance(t, list) for t in tensors.values()):  # split tensors: their pieces (compiler.parts)
            trainable = {a: trainable[n] for a, n in parts.owners(tensors).items()}
            tensors = parts.flatten(tensors)
        for name, t in tensors.items():
            if trainable[name]:
                p = t if isinstance(t, nn.Parameter) else nn.Parameter(t)
                if fast:
                    self._parameters[name] = p
                else:
                    self.register_parameter(name, p)
            elif fast:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t)

    def own(self, name: str) -> torch.Tensor:
        """The unit's own value of tensor ``name`` (a declared tensor or a piece of a split one): its slice of a
        stacked tensor (a view), a split tensor's pieces stacked, else the tensor as held (:func:`parts.read`)."""
        return parts.read(self, name)

    def own_numel(self, trainable_only: bool = True) -> int:
        """Elements of this unit's tensors (of its slices of stacked ones), trainable ones only by default."""
        cls = type(self)
        plain = not cls.picks and not cls.splits  # every tensor held as declared: its own numel
        return sum(p.numel() if plain else self.own(n).numel() for n, p in self._parameters.items()
                   if p is not None and (p.requires_grad or not trainable_only))

    def __reduce_ex__(self, protocol: Any) -> Any:
        # the generated class cannot be found by name: pickle the program it comes from
        return (_unit_of_program, (self.program,), self.__getstate__())


_EMPTY_MODULE_STATE: dict[str, Any] = dict(nn.Module().__dict__)
_PROGRAMS: dict[Program, type[Unit]] = {}
_BY_CODE: dict[str, type[Unit]] = {}
_RECIPES: dict[tuple[Any, ...], tuple[Any, Any]] = {}


def clear_programs() -> None:
    """Forget every compiled program (existing units keep their class; the next unit compiles anew)."""
    _PROGRAMS.clear()
    _BY_CODE.clear()
    _RECIPES.clear()


def _unit_of_program(program: Program) -> Unit:
    """An empty instance of a program's class (unpickling fills its state)."""
    cls = _PROGRAMS.get(program)
    if cls is None:
        cls = _program_class(program, {n: parts.example(s, k) for n, s, k in program.shapes})
    return cls.__new__(cls)


def _program_class(program: Program, tensors: Mapping[str, torch.Tensor]) -> type[Unit]:
    """Trace the program once with example tensors and generate its class."""
    form, picks = program.form, program.picks
    own = parts.owners(tensors)
    if len(own) < sum(math.prod(parts.lead(t)) for t in tensors.values()):
        raise PefrefError(f"the pieces of split tensors ({', '.join(n for n, t in tensors.items() if isinstance(t, list))}) clash with other tensor names; rename them")
    clash = sorted(n for n in own if hasattr(Unit, n) or n in ("form", "graph", "code", "used_inputs", "program", "tensor_of", "linear_forward", "lean_code", "picks"))
    if clash:
        raise PefrefError(f"tensor names {clash} clash with attributes of a compiled unit; rename them")
    graph = _trace(_Program(program, dict(tensors)))
    name = f"Unit_{form}_{len(_BY_CODE)}"
    pc = graph.python_code(root_module="self")
    lpc = None
    if program.lean:
        lean = _Program(program, dict(tensors), lean=True)
        try:
            lpc = _trace(lean).python_code(root_module="self")
        except NoLinearRule:  # a node without an activation-space reading: the host runs with the formed weight
            pass
        except Exception:  # an optimisation only: whatever the reading cannot trace runs with the formed weight
            lpc = None
    lean_src = "" if lpc is None else lpc.src
    same = _BY_CODE.get(pc.src + lean_src)  # other constants, same code (e.g. widths the code never reads)
    if same is not None:
        _PROGRAMS[program] = same
        return same
    used = frozenset(str(n.target) for n in graph.nodes if n.op == "placeholder" and n.users)
    scales = form in FORMS and FORMS[form].integration is Integration.SCALE  # a product with the host: rounded by the caller
    attrs = {"forward": _at_boundary(_generated(pc, name), not scales), "form": form, "graph": graph, "code": pc.src, "used_inputs": used,
             "program": program, "tensor_of": {a: n for a, n in own.items() if a != n},
             "splits": {n: parts.lead(t) for n, t in tensors.items() if isinstance(t, list)}, "picks": dict(picks), "__module__": __name__,
             "lean_code": lean_src}
    if lpc is not None:
        attrs["linear_forward"] = _at_boundary(_generated(lpc, name + "_linear"), True)
    cls = type(name, (Unit,), attrs)
    _PROGRAMS[program] = _BY_CODE[pc.src + lean_src] = cls
    return cls


def _trace(prog: _Program) -> fx.Graph:
    tracer = fx.Tracer(autowrap_modules=cast(Any, ()), autowrap_functions=())  # primitives are recorded as leaves (_leaf): nothing to patch
    tracer.proxy_buffer_attributes = True  # frozen tensors stay named attributes of the unit, also when a view of them is taken
    return tracer.trace(prog)


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with its floating tensors (also inside tuples, lists and dicts) in ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value


def _replaced_dtype(args: tuple[Any, ...], kwargs: Mapping[str, Any], default: torch.dtype) -> torch.dtype:
    """The dtype of the host tensor a unit's result takes the place of (forward arguments ``x, h, W, ...``)."""
    for i, n in ((1, "h"), (2, "W"), (0, "x")):
        t = args[i] if len(args) > i else kwargs.get(n)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return default


def _at_boundary(fwd: Any, casts_output: bool) -> Any:
    """``fwd`` computing in the unit's own dtype: a unit with a ``boundary`` (compute dtype, host dtype) casts the
    host's tensors it receives to its dtype and rounds its result once to the dtype of the host tensor it
    replaces (``h``, else ``W``, else ``x``; the host's dtype when it receives none): peft's input cast and
    ``result.to(previous_dtype)``. A product with the host (``casts_output`` False) is rounded by the caller."""

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        bd = self.__dict__.get("boundary")
        if bd is None:
            return fwd(self, *args, **kwargs)
        back = _replaced_dtype(args, kwargs, bd[1])
        out = fwd(self, *cast_floats(args, bd[0]), **cast_floats(kwargs, bd[0]))
        return cast_floats(out, back) if casts_output else out

    forward.__wrapped__ = fwd  # type: ignore[attr-defined]
    return forward


def set_boundary(unit: nn.Module, compute: torch.dtype, host: torch.dtype | None) -> None:
    """Make ``unit`` (and its gate) compute in ``compute`` on a host held in ``host`` (no casting when they agree)."""
    for u in (unit, unit.__dict__.get("gate_unit")):
        if u is None:
            continue
        if host is None or host == compute:
            u.__dict__.pop("boundary", None)
        else:
            u.__dict__["boundary"] = (compute, host)


def _generated(pc: Any, name: str) -> Any:
    """The ``forward`` function of generated code (``pc``: torch.fx's PythonCode), its source kept for tracebacks."""
    filename = f"<pefref generated {name}>"
    linecache.cache[filename] = (len(pc.src), None, pc.src.splitlines(True), filename)  # tracebacks show the code
    glb = dict(pc.globals)
    exec(compile(pc.src, filename, "exec"), glb)  # code generated by torch.fx from the checked expression tree, never YAML text
    return glb["forward"]


@dataclass(frozen=True)
class TensorRecipe:
    """One tensor of a description under one set of constants: its name, spec, local shape and parsed init;
    ``filler``: the init is one call of a filler initialiser (on the meta device an empty tensor stands for it)."""

    name: str
    spec: Any
    shape: tuple[int, ...]
    init: Any
    filler: bool


@dataclass(frozen=True, eq=False)
class Recipe:
    """What a description compiles to for one set of constants, worked out once (every layer's unit reuses it)."""

    tensors: tuple[TensorRecipe, ...]
    exprs: tuple[tuple[str, str], ...]
    consts: tuple[tuple[str, Any], ...]
    meta_checked: set[str] = field(default_factory=set)  # filler inits already run once on the meta device (arguments checked)
    seeded: bool = False  # some init reads init_seed (drawn once per unit from torch's global generator)


def recipe(spec: Any, names: dict[str, Any]) -> Recipe:
    """The :class:`Recipe` of a module description under the constants ``names`` (memoised per description and constants)."""
    consts = tuple(sorted(names.items()))
    key = (id(spec), consts, current().max_dim)  # shapes are checked against the current limits
    hit = _RECIPES.get(key)
    if hit is not None and hit[0] is spec:  # the spec is kept in the entry: its id cannot be reused
        return hit[1]
    tensors = []
    for pname, pspec in spec.params.items():
        init = parse_expr(pspec.init)
        tree = init.tree
        filler = isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id in FILLERS
        tensors.append(TensorRecipe(pname, pspec, shape_of(pspec, names), init, filler))
    exprs = tuple((f, str(getattr(spec, f))) for f in form_of(spec).fields if getattr(spec, f, None) is not None)
    out = Recipe(tuple(tensors), exprs, consts, seeded=any(INIT_SEED in tr.init.names for tr in tensors))
    if len(_RECIPES) > 4096:
        _RECIPES.clear()
    _RECIPES[key] = (spec, out)
    return out


def _initial_value(held: torch.Tensor, pick: int | None, local: tuple[int, ...]) -> torch.Tensor:
    """What a later initialiser of the unit reads of a tensor: its slice of a stacked one, its leading block of a
    shared one larger than it needs, detached (an initial value, no graph)."""
    own = held[pick] if pick is not None else held
    return (own[tuple(slice(0, n) for n in local)] if tuple(own.shape) != tuple(local) else own).detach()


def _fill_slice(store: SharedStore, key: tuple[Any, ...], full: tuple[int, ...], i: int, part: torch.Tensor, trainable: bool, meta: bool) -> None:
    """Slice ``i`` of the stacked tensor ``key`` (created on first use, filled unit by unit) takes ``part``."""
    if key not in store.tensors:
        t = (torch.empty if meta else torch.zeros)(full, dtype=part.dtype, device=part.device)
        store.tensors[key] = nn.Parameter(t, requires_grad=True) if trainable else t
    if not meta:
        with torch.no_grad():
            store.tensors[key][i].copy_(part)
    store.picks[key] = i + 1


def build_unit(spec: Any, ctx: SiteContext, hps: Mapping[str, Any], store: SharedStore, shared_shapes: Mapping[tuple[Any, ...], tuple[int, ...]] | None = None,
               publish: bool = False) -> Unit | None:
    """One module description at one site as a :class:`Unit` (None for select modules); its program is compiled on first use.

    A module with connections (``inputs``) reads them from the unit's ``inputs`` argument (a dict);
    with ``publish`` the unit returns ``(output, delta)`` so that other units can read its ``delta``."""
    form = form_of(spec)
    if not form.has_unit:
        return None
    names = ctx.names(hps)
    rec = recipe(spec, names)
    tensors: dict[str, Any] = {}
    views: dict[str, tuple[int, ...]] = {}
    picks: dict[str, int] = {}
    trainable: dict[str, bool] = {}
    env: dict[str, Any] | None = None
    initial: dict[str, Any] = {}  # tensor name -> its initial value (this unit's part), for later initialisers
    meta = str(ctx.device) == "meta"

    def init(tr: TensorRecipe, shape: tuple[int, ...]) -> torch.Tensor:
        nonlocal env
        if meta and tr.filler and tr.name in rec.meta_checked:  # shapes only: the values come with the weights loaded later
            return torch.empty(shape, dtype=ctx.dtype, device="meta")
        if env is None:
            env = {**names, "W": None if ctx.W is None else ctx.W.detach().to(ctx.dtype), **ctx.stats}  # read in the adapter's dtype
            if rec.seeded:  # one integer per unit from torch's global generator: its seeded draws share it
                env[INIT_SEED] = int(torch.randint(0, 2**62, ()).item())
        env.update(initial)  # the initial values of the tensors declared before this one
        if LAYER_WEIGHTS in tr.init.names and LAYER_WEIGHTS not in env:  # read by a tensor shared across layers: stacked on first use
            stack = ctx.weights_of_layers()
            env[LAYER_WEIGHTS] = None if stack is None else stack.detach().to(ctx.dtype)
        t = evaluate(tr.init, env, init_table(shape, ctx.dtype, ctx.device))
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise PefrefError(f"{spec.name}.{tr.name}: init {tr.spec.init!r} gave {got}, expected shape {shape}")
        t = t.to(dtype=ctx.dtype if t.is_floating_point() else t.dtype, device=ctx.device).contiguous()  # integer tensors (indices) keep their dtype; stored dense (a slice of a decomposition is a strided view)
        if meta and tr.filler:
            rec.meta_checked.add(tr.name)
        return t

    for tr in rec.tensors:
        pname, pspec, local = tr.name, tr.spec, tr.shape
        stacked = pspec.stacked != "none"
        owner, tname = pspec.owner(spec.name, pname)
        key = SharedStore.key(owner, tname, pspec.shared, ctx.site, ctx.layer, pspec.stacked, share_run(pspec, ctx.layer_pos, ctx.place_pos, ctx.place_count, ctx.names(hps)))
        full = (shared_shapes or {}).get(key, (1, *local) if stacked else local)
        if stacked:  # per-layer copies in one tensor: this unit initialises (and then reads) the next slice
            i = store.picks.get(key, 0)
            if i >= full[0]:
                raise PefrefError(f"{spec.name}.{pname}: more placements than the {full[0]} slices planned for the stacked tensor")
            _fill_slice(store, key, full, i, init(tr, full[1:]), pspec.trainable, meta)
            picks[pname] = i
            full = full[1:]
        elif key not in store.tensors:
            t = init(tr, full)
            k = getattr(pspec, "split", 0)
            store.tensors[key] = parts.split(t, k, pspec.trainable, f"{spec.name}.{pname}") if k else nn.Parameter(t, requires_grad=True) if pspec.trainable else t
        tensors[pname] = store.tensors[key]
        trainable[pname] = pspec.trainable
        if not isinstance(store.tensors[key], list):  # a split tensor's pieces are not read by initialisers
            # a shared tensor is read whole (its readers are shared alike and start at their largest shape too)
            initial[pname] = _initial_value(store.tensors[key], picks.get(pname), local if pspec.shared == "none" else full)
        if full != local:
            views[pname] = local
    shapes = tuple((n, *parts.entry(t)) for n, t in tensors.items())
    program = Program(form.name, form.rule, rec.exprs, rec.consts, shapes, tuple(sorted(views.items())), tuple(getattr(spec, "inputs", None) or {}),
                      publish, tuple(sorted(picks.items())), lean=form.integration is Integration.WEIGHT)
    cls = _PROGRAMS.get(program)
    if cls is None:
        cls = _program_class(program, tensors)
    unit = cls(tensors, trainable)
    for fld, rule in form.side_rules.items():  # e.g. a prefix's gate
        if getattr(spec, fld, None) is not None:
            # its own program over the same tensors, kept off the module tree (no second copy in state_dict)
            side = Program(fld, rule, ((fld, str(getattr(spec, fld))),), rec.consts, shapes, program.views, picks=program.picks)
            scls = _PROGRAMS.get(side) or _program_class(side, tensors)
            unit.__dict__[f"{fld}_unit"] = scls(tensors, trainable)
    set_boundary(unit, ctx.dtype, ctx.host_dtype)
    return unit
