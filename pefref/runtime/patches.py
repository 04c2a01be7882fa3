"""Runtime patches: how compiled units take part in a real model's forward.

A host module gets one :class:`HostPatch` (its ``forward`` replaced on the
instance, as accelerate's hooks do), holding an ordered list of entries from any
number of adapters; the model's root gets one :class:`RootPatch` for modules that
prepend positions (prompts at the embeddings, prefixes in the key/value cache).
Parameter names and the base model's state-dict keys are untouched. When the
last entry goes, the original forward is restored.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import torch
from torch import nn

from pefref.compiler.units import cast_floats
from pefref.language.errors import PefrefError
from pefref.language.forms import Form, Integration
from pefref.runtime.first_pass import FirstPass, first_value, run_first_pass
from pefref.runtime.hosts import HostKind, bias_of
from pefref.runtime.rows import disjoint, replace, replace_each, take

__all__ = ["Entry", "InputCell", "Owner", "Group", "LayerBatch", "PublishKey", "HostPatch", "RootPatch", "patch_of", "root_patch_of", "input_cell", "release_input_cell", "ROUTE", "first_tensor"]

class _Route:
    """Per-example adapter selection: ``current`` holds, for each example of the batch, the adapter
    handles that run for it (None: no selection, every active adapter runs).

    Set by a composition's ``per_example`` context; a host then runs once per distinct
    set of adapters and takes each example's rows from its own run. (A plain attribute,
    not a ContextVar: torch.compile traces reading it without a graph break.)
    """

    current: Sequence[frozenset[Any]] | None = None


ROUTE = _Route()

_PATCH = "_pefref_patch"
_ROOT = "_pefref_root_patch"
_INPUTS = "_pefref_inputs"


class Owner(Protocol):
    """What an entry needs of the adapter it belongs to (:class:`pefref.runtime.adapter.Adapter`)."""

    name: str
    merged: bool

    @property
    def active(self) -> bool: ...


class Group(Protocol):
    """A combiner shared by the entries a composition block combines at one host (:mod:`pefref.runtime.compose`)."""

    def combine(self, t: torch.Tensor, fns: Sequence[Any], members: Sequence[Entry]) -> torch.Tensor: ...


class LayerBatch(Protocol):
    """A layer-batched program computing the keys and values of a group of prefix entries at once
    (:mod:`pefref.runtime.layer_batches`)."""

    size: int

    def __call__(self, training: bool) -> Any: ...


PublishKey = tuple[Any, ...]
"""Where a unit's output is published for other units: (adapter, module, site, layer)."""


@dataclass(eq=False)
class InputCell:
    """The model's input cell: what units read besides their host's tensors in the current forward pass.

    ``mask``: the model's attention mask (a :class:`RootPatch` replaces it with the mask it extends);
    ``values``: outputs units publish for the connections of other units, by :data:`PublishKey`;
    ``call``: the inputs of the model's call units read (``task_ids``, taken out of the call's keyword
    arguments, and ``input_ids``), ``given``: task ids set by :meth:`Adapter.inputs` for the calls that
    pass none, ``batch``: the call's batch size and device (for a default task id);
    ``users``: entries using the cell (the last one to go removes ``hook``, the model's pre-hook that
    sets the mask and empties the values at every pass); ``first``: the first forward pass the hook runs
    before the real one, where units read values from it (:mod:`pefref.runtime.first_pass`)."""

    mask: torch.Tensor | None = None
    values: dict[PublishKey, torch.Tensor] = field(default_factory=dict)
    call: dict[str, torch.Tensor] = field(default_factory=dict)
    given: dict[str, torch.Tensor] = field(default_factory=dict)
    batch: tuple[int, Any] = (0, None)
    users: int = 0
    hook: Any = field(default=None, repr=False)
    first: FirstPass | None = field(default=None, repr=False)


@dataclass(eq=False)
class Entry:
    """One unit attached at one host."""

    unit: nn.Module
    form: Form
    owner: Owner = field(repr=False)  # whether the entry runs: owner.active
    side: Literal["output", "input"] = "output"
    start: int = 0
    size: int = 0  # 0: the whole output; else a slice [start, start+size)
    period: int = 0  # >0: the slice repeats every `period` features (interleaved fused projections)
    layer: int | None = None
    length: int = 0  # prepend: number of positions
    unit_key: str = ""  # the unit's name in its adapter
    site: str = ""  # the reference site it is placed at
    group: Group | None = field(default=None, repr=False)  # a combiner shared by the entries a block combines at this host
    inputs: InputCell | None = field(default=None, repr=False)  # the model's input cell: its mask, and the values units publish
    reads: dict[str, list[PublishKey]] = field(default_factory=dict)  # connection name -> keys of the published values it reads (first present)
    publish: PublishKey | None = None  # key under which the unit's output (delta) is published for other units, or None
    batch: LayerBatch | None = field(default=None, repr=False)  # prefixes: a layer-batched program computing this entry's keys and values with its group's
    pick: int = 0  # prepend with a batch: the slice (layer) of the batch's outputs that is this entry's
    rotary: Any = field(default=None, repr=False)  # a site after the rotary embedding: the RotaryCell that rotates h for the unit
    passes: Literal["both", "first", "real"] = "both"  # which forward passes of a call it runs in (first: a tap read only from a first pass)
    off: bool = False  # skipped in the pass under way (set by the first-pass driver from `passes`)
    first_no_grad: bool = False  # its adapter's first pass runs under torch.no_grad()
    reads_W: bool = field(init=False, default=True)  # False when the unit's code never reads W (skip fetching it)
    reads_mask: bool = field(init=False, default=False)
    reads_b: bool = field(init=False, default=False)  # the unit's code reads the host's bias b

    def __post_init__(self) -> None:
        used = getattr(self.unit, "used_inputs", None)  # compiled units: the arguments their code reads
        if used is not None:
            self.reads_W, self.reads_mask, self.reads_b = "W" in used, "mask" in used, "b" in used

    def connected(self) -> dict[str, Any]:
        """The values this entry's connections read in the current forward pass."""
        cell = cast(InputCell, self.inputs)
        values = cell.values
        out = {}
        for name, keys in self.reads.items():
            if keys[0][0] == "call":
                out[name] = _call_input(cell, self.unit_key, name, keys[0])
                continue
            if keys[0][0] == "first":
                out[name] = first_value(cell.first, self.unit_key, name, keys[0])
                continue
            key = next((k for k in keys if k in values), None)
            if key is None:
                raise PefrefError(f"{self.unit_key}: input {name!r} reads {keys[0]}, which has not run in this forward pass")
            out[name] = values[key]
        return out


def _call_input(cell: InputCell, unit: str, name: str, key: PublishKey) -> torch.Tensor:
    """The input ``key[1]`` of the model's call (a default task id for a call given none, where ``key[2]`` is one)."""
    got = cell.call.get(key[1])
    if got is not None:
        return got
    n, device = cell.batch
    if key[1] == "task_ids" and key[2] is not None:
        return torch.full((n,), key[2], dtype=torch.long, device=device)
    how = ("pass task_ids=... (one task id per example) to the model's forward, or call it inside "
           "adapter.inputs(task_ids=...)") if key[1] == "task_ids" else f"call the model with {key[1]}"
    raise PefrefError(f"{unit}: input {name!r} reads the call's {key[1]}, which this call does not have; {how}")


def _sliced(h: torch.Tensor, e: Entry, fn: Any) -> torch.Tensor:
    """``fn`` applied to the output features a sliced site owns (all of them when unsliced)."""
    return replace(h, -1, e.start, e.size, e.period, fn)


def _disjoint_slices(es: list[Entry]) -> bool:
    """Every entry sees a slice, all of one period, and no two slices overlap."""
    return disjoint([(e.start, e.size, e.period) for e in es])


def _sliced_rows(W: torch.Tensor, e: Entry, fn: Any) -> torch.Tensor:
    """``fn`` applied to the rows of a weight [out, in] that a sliced site owns (all rows when unsliced)."""
    return replace(W, 0, e.start, e.size, e.period, fn)


class HostPatch:
    """The replacement forward of one host module."""

    def __init__(self, host: nn.Module, kind: HostKind, first: bool) -> None:
        self.host, self.kind, self.first = host, kind, first
        self.had_instance_forward = "forward" in host.__dict__
        self.orig = host.forward
        self.entries: list[Entry] = []
        self.stash: list[torch.Tensor | None] = [None]
        self.stash_hooks: list[Any] = []
        host.__dict__["forward"] = self.forward  # plain instance attributes (what nn.Module.__setattr__ does, without its checks)
        host.__dict__[_PATCH] = self

    suspended: bool = False

    def _put_back_forward(self) -> None:
        if self.had_instance_forward:
            self.host.forward = self.orig
        else:
            del self.host.forward

    def restore(self) -> None:
        for hk in self.stash_hooks:
            hk.remove()
        if not self.suspended:
            self._put_back_forward()
        delattr(self.host, _PATCH)
        released = getattr(self.host, "patch_released", None)  # a virtual host (a raw parameter's slice) lets its owner go
        if callable(released):
            released()

    def suspend(self) -> None:
        """Give the host its own forward back while none of the entries can run (all merged into its weight):
        a merged host costs nothing, not even a Python call. :meth:`resume` patches it again."""
        if not self.suspended:
            self._put_back_forward()
            self.suspended = True

    def settle(self) -> None:
        """Suspend the patch when every entry's adapter is merged, resume it otherwise."""
        if self.entries and all(getattr(e.owner, "merged", False) for e in self.entries):
            self.suspend()
        else:
            self.resume()

    def resume(self) -> None:
        """Patch the host's forward again (after an unmerge, or when a new entry arrives)."""
        if self.suspended:
            self.host.forward = self.forward
            self.suspended = False

    def stash_input_of(self, module: nn.Module) -> None:
        """Take the site input x from another module's input (e.g. the sublayer that contains the host)."""

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.stash[0] = _first_tensor(args, kwargs)

        self.stash_hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        es = self.entries
        if len(es) == 1 and ROUTE.current is None and not self.stash_hooks:
            e = es[0]
            if e.owner.active and not e.off and _plain_output(e):  # the common case (one adapter adding to the output): no lists, no closures
                out = self.orig(*args, **kwargs)
                x = args[0] if args else _first_tensor(args, kwargs)
                if self.first:
                    return (self._apply(e, x, out[0], self.host.training), *out[1:])
                return self._apply(e, x, out, self.host.training)
        entries = [e for e in es if e.owner.active and not e.off]
        if not entries:
            return self.orig(*args, **kwargs)
        route = ROUTE.current
        if route is not None:
            return self._routed(route, entries, args, kwargs)
        return self.run(entries, args, kwargs)

    def _routed(self, route: Sequence[frozenset[Any]], entries: list[Entry], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Each example with its own adapters: one run per distinct set, rows taken from the example's run."""
        rows: dict[frozenset[Any], list[int]] = {}
        for i, owners in enumerate(route):
            rows.setdefault(frozenset(o for o in owners if any(e.owner is o for e in entries)), []).append(i)
        result: Any = None
        for owners, idx in rows.items():
            es = [e for e in entries if e.owner in owners]
            out = self.run(es, args, kwargs) if es else self.orig(*args, **kwargs)
            if result is None:
                result = out
                continue
            h, r = (out[0], result[0]) if self.first else (out, result)
            if h.shape[0] != len(route):
                raise PefrefError(f"per-example adapters: {len(route)} names for a batch of {h.shape[0]}")
            sel = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
            sel[idx] = True
            merged = torch.where(sel.view(-1, *([1] * (h.dim() - 1))), h, r)
            result = (merged, *result[1:]) if self.first else merged
        return result

    def run(self, entries: list[Entry], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        training = self.host.training
        x = x_in = _first_tensor(args, kwargs)
        for e, grp in _steps([e for e in entries if e.side == "input"]):
            x = _sliced(x, e, self._fn(e, grp, None, training)) if grp else self._apply(e, None, x, training)
        if x is not x_in:
            args, kwargs = _replace_first(args, kwargs, x)
        weights = [e for e in entries if e.form.integration is Integration.WEIGHT]
        if weights and self._lean(weights):
            out = self._run_lean(weights, x, training)
        elif weights:
            W = self.kind.get_weight(self.host)  # type: ignore[misc]
            for e, grp in _steps(weights):
                if grp:
                    W = _sliced_rows(W, e, lambda w, e=e, grp=grp: cast(Group, e.group).combine(w, [lambda t, m=m: m.unit(None, None, t, training) for m in grp], grp))
                else:
                    W = _sliced_rows(W, e, lambda w, e=e: e.unit(None, None, w, training))
            out = self.kind.run(self.host, x, W)  # type: ignore[misc]
        else:
            out = self.orig(*args, **kwargs)
        h = out[0] if self.first else out
        x_site = self.stash[0] if self.stash_hooks else x
        outs = [e for e in entries if e.side == "output" and e.form.integration is not Integration.WEIGHT]
        if len(outs) > 1 and _disjoint_slices(outs):
            h = self._apply_slices(outs, x_site, h, training)
        else:
            for e, grp in _steps(outs):
                h = _sliced(h, e, self._fn(e, grp, x_site, training))
        return (h, *out[1:]) if self.first else h

    def _lean(self, weights: list[Entry]) -> bool:
        """Whether the reparameterised weights can act on the input without being formed: a linear host, units whose
        weight has an activation-space reading, each on its own rows (one unsliced unit, or disjoint slices)."""
        if self.kind.bias is None or any(e.group is not None or getattr(e.unit, "linear_forward", None) is None for e in weights):
            return False
        return (len(weights) == 1 and not weights[0].size) or _disjoint_slices(weights)

    def _run_lean(self, weights: list[Entry], x: torch.Tensor, training: bool) -> torch.Tensor:
        """The host's output with each unit's weight read in activation space (``x W'^T + b``, no ``W'`` formed);
        a sliced unit replaces its features of the host's own output."""
        W = self.kind.get_weight(self.host)  # type: ignore[misc]
        b = self.kind.bias(self.host)  # type: ignore[misc]

        def own(e: Entry) -> torch.Tensor:
            y = cast(Any, e.unit).linear_forward(x, None, take(W, 0, e.start, e.size, e.period), training)
            return y if b is None else y + take(b, 0, e.start, e.size, e.period)

        if len(weights) == 1 and not weights[0].size:
            return own(weights[0])
        base = self.kind.run(self.host, x, W)  # type: ignore[misc]

        def part(e: Entry) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda _h: own(e)  # the features of the host's own output are replaced, not read

        return replace_each(base, -1, [(e.start, e.size) for e in weights], weights[0].period, [part(e) for e in weights])

    def _fn(self, e: Entry, grp: list[Entry] | None, x: torch.Tensor | None, training: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """The step of one entry, or of a block's entries combined by their group."""
        if not grp:
            return lambda t: self._apply(e, x, t, training)
        return lambda t: cast(Group, e.group).combine(t, [lambda u, m=m: self._apply(m, x, u, training) for m in grp], grp)

    def _apply_slices(self, es: list[Entry], x: torch.Tensor | None, h: torch.Tensor, training: bool) -> torch.Tensor:
        """Entries on disjoint slices of the output (q and v of a fused qkv): each on its slice, one torch.cat."""
        fns = [lambda t, e=e: self._apply(e, x, t, training) for e in es]
        return replace_each(h, -1, [(e.start, e.size) for e in es], es[0].period, fns)

    def _apply(self, e: Entry, x: torch.Tensor | None, h: torch.Tensor, training: bool) -> torch.Tensor:
        # the unit's generated forward, called directly: nn.Module.__call__ costs ~1 us
        # a call, and units carry no hooks (a hook a user registers on a unit would not run)
        if e.rotary is not None:  # a site after the rotary embedding: the unit reads the rotated h; the host's output stays
            self._apply_unit(e, x, e.rotary.rotate(h), training)
            return h
        return self._apply_unit(e, x, h, training)

    def _apply_unit(self, e: Entry, x: torch.Tensor | None, h: torch.Tensor, training: bool) -> torch.Tensor:
        if e.form.integration is Integration.SCALE:  # the product in the unit's dtype, rounded once to the host's (as peft's (IA)^3)
            return (h * e.unit.forward(None, None, None, training)).to(h.dtype)
        W = None
        if e.reads_W and self.kind.has_weight and e.form.host_weight:
            W = self.kind.get_weight(self.host)  # type: ignore[misc]
            W = take(W, 0, e.start, e.size, e.period)  # a sliced site sees its own rows
        if e.reads_b:  # the host's bias (zeros where it has none), its own slice of it
            b = bias_of(self.kind, self.host)
            b = None if b is None else take(b, 0, e.start, e.size, e.period)
            mask = e.inputs.mask if e.inputs is not None else None
            return self._with_b(e, x, h, W, training, mask, b)
        if e.reads or e.publish is not None:  # connections: inputs from the cell, the output published to it
            cell = cast(InputCell, e.inputs)
            out = e.unit.forward(x, h, W, training, cell.mask, e.connected())
            if e.publish is None:
                return out
            cell.values[e.publish] = out[1]
            return out[0]
        if e.reads_mask:
            return e.unit.forward(x, h, W, training, e.inputs.mask if e.inputs is not None else None)
        return e.unit.forward(x, h, W, training)

    def _with_b(self, e: Entry, x: Any, h: torch.Tensor, W: Any, training: bool, mask: Any, b: Any) -> torch.Tensor:
        """A unit reading the host's bias: the same calls as :meth:`_apply`, with ``b``."""
        if e.reads or e.publish is not None:
            out = e.unit.forward(x, h, W, training, mask, e.connected(), b=b)
            if e.publish is None:
                return out
            cast(InputCell, e.inputs).values[e.publish] = out[1]
            return out[0]
        return e.unit.forward(x, h, W, training, mask, b=b)


def _plain_output(e: Entry) -> bool:
    """An entry that adds to its host's whole output on its own (no slice, group or connection):
    :meth:`HostPatch.run` would call just ``_apply(e, x, h)`` for it."""
    return (e.side == "output" and e.form.integration is Integration.HIDDEN and not e.size and e.group is None and not e.reads
            and e.publish is None)


def _steps(es: list[Entry]) -> list[tuple[Entry, list[Entry] | None]]:
    """Entries in order; the entries of one group come once, at the first of them, with the group's running members."""
    out: list[tuple[Entry, list[Entry] | None]] = []
    seen: set[int] = set()
    for e in es:
        if e.group is None:
            out.append((e, None))
        elif id(e.group) not in seen:
            seen.add(id(e.group))
            out.append((e, [m for m in es if m.group is e.group]))
    return out


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The hidden states a module's forward receives (its first tensor argument)."""
    return _first_tensor(args, kwargs)


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _replace_first(args: tuple[Any, ...], kwargs: dict[str, Any], x: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (x, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return args, {**kwargs, key: x}


def patch_of(host: nn.Module, kind: HostKind, first: bool) -> HostPatch:
    """The host's patch, created on first use."""
    p = host.__dict__.get(_PATCH)
    if p is None:
        return HostPatch(host, kind, first)
    p.resume()
    return p


class RootPatch:
    """The model-level forward for prepended positions (prompts and prefixes).

    On the first step (empty cache) token entries are concatenated in front of
    the input embeddings and kv entries fill the cache; on every step the
    attention mask is extended to cover them, so ``generate()`` keeps working.
    """

    def __init__(self, model: nn.Module, fwd: Any, sizes: dict[str, int], embed: nn.Module | None) -> None:
        self.model, self.fwd, self.sizes, self.embed = model, fwd, sizes, embed
        self.had_instance_forward = "forward" in model.__dict__
        self.orig = model.forward
        self.sig = inspect.signature(self.orig)
        self.cache_arg = fwd.cache_arg(self.sig.parameters) or fwd.cache[0]  # placement refuses prefixes when it names none
        self.entries: list[Entry] = []
        self.live: tuple[Any, dict[int, list[tuple[Entry, int]]]] | None = None  # the cache this pass filled, its gated entries

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self.forward(*args, **kwargs)

        # keep the original signature visible: generate() inspects it (position_ids, logits_to_keep)
        model.forward = functools.update_wrapper(forward, self.orig)
        setattr(model, _ROOT, self)

    def restore(self) -> None:
        if self.had_instance_forward:
            self.model.forward = self.orig
        else:
            del self.model.forward
        delattr(self.model, _ROOT)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = self.sig.bind_partial(*args, **kwargs).arguments
        for name, p in self.sig.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
                bound.update(bound.pop(name))
        return dict(bound)

    def _cache_len(self, cache: Any) -> int:
        if cache is None:
            return 0
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        return int(cache[0][0].shape[2]) if len(cache) else 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        entries = [e for e in self.entries if e.owner.active and not e.off]
        if not entries:
            return self.orig(*args, **kwargs)
        if ROUTE.current is not None:
            raise PefrefError("per-example adapter selection does not cover prepended positions (prompts, prefixes): they change the sequence of the whole batch")
        a = self._bind(args, kwargs)
        f = self.fwd
        # the cache as the caller passed it (under any of its names: a deprecated one too), else the forward's own name
        cache_key = next((n for n in f.cache if a.get(n) is not None), None) or next((n for n in f.cache if n in a), None) or self.cache_arg
        cache = a.get(cache_key)
        first = self._cache_len(cache) == 0
        tokens = [e for e in entries if e.form.integration is Integration.POSITIONS and e.layer is None]
        kvs = [e for e in entries if e.form.integration is Integration.POSITIONS and e.layer is not None]
        n_tok = sum(e.length for e in tokens)
        n_kv = self.kv_length(kvs) if kvs else 0
        ref = a.get(f.ids) if a.get(f.ids) is not None else a.get(f.embeds)
        b = cast(Any, ref).shape[0]
        training = self.model.training
        if first:
            if tokens:
                emb = a.pop(f.embeds, None)
                if emb is None:
                    emb = self.embed(a.pop(f.ids))  # type: ignore[misc]
                else:
                    a.pop(f.ids, None)
                prompts = [(e.unit(None, None, None, training, None, e.connected()) if e.reads else e.unit(None, None, None, training)).to(emb.dtype)
                           for e in tokens]  # [length, d], or [batch, length, d]: one prompt per example
                emb = torch.cat([p.unsqueeze(0).expand(b, -1, -1) if p.dim() == 2 else p for p in prompts] + [emb], dim=1)
                a[f.embeds] = emb
                for key, fill in f.extend.items():
                    if a.get(key) is not None and a[key].dim() > 1:  # per-token (not per-sequence labels)
                        v = a[key]
                        a[key] = torch.cat([torch.full((b, n_tok), fill, dtype=v.dtype, device=v.device), v], dim=1)
            if kvs:
                a[cache_key] = self._fill_cache(cache, kvs, b, training)
            a.pop("cache_position", None)
            pos = a.pop("position_ids", None)
            if pos is not None:  # prepended tokens take the first positions; a kv prefix shifts them all
                lead = torch.arange(n_tok, dtype=pos.dtype, device=pos.device).expand(b, -1)
                a["position_ids"] = torch.cat([lead, pos + n_tok], dim=-1) + n_kv
        else:
            for key in ("position_ids", "cache_position"):
                if a.get(key) is not None:
                    a[key] = a[key] + n_tok + n_kv
        if a.get(f.mask) is not None:
            m = a[f.mask]
            a[f.mask] = torch.cat([torch.ones(b, n_tok + n_kv, dtype=m.dtype, device=m.device), m], dim=1)
            cell = self.model.__dict__.get(_INPUTS)
            if cell is not None:  # units reading the mask see the extended one
                cell.mask = a[f.mask]
        try:
            return self.orig(**a)
        finally:
            self.live = None  # gated prefixes are rescaled only in the pass that filled the cache

    def kv_length(self, kvs: list[Entry]) -> int:
        """Prefix positions per layer: the same in every layer (the attention mask, extended by them, is shared)."""
        per = [0] * self.sizes["L"]
        for e in kvs:
            per[cast(int, e.layer)] += e.length
        if len(set(per)) > 1:
            raise PefrefError("prefix keys and values give the layers different numbers of positions "
                              f"({', '.join(f'layer {i}: {n}' for i, n in enumerate(per))}); the attention mask, extended by "
                              "them, is shared by all layers, so every layer needs the same prefix length")
        return per[0] if per else 0

    def _fill_cache(self, cache: Any, kvs: list[Entry], b: int, training: bool) -> Any:
        kvh, dh = self.sizes["kv_heads"], self.sizes["d_head"]
        n_l = self.sizes["L"]
        layer_ids = [e.layer for e in kvs]
        batched = self._batches(kvs, training)  # the layer-batched programs whose entries are all here, run once each
        if len(set(layer_ids)) == len(kvs) == n_l and len({e.length for e in kvs}) == 1 and not any(map(_gated, kvs)):
            # one entry per layer, one length: fill every layer's cache at once: keys and values of all layers
            # [L, n, kvh*dh] each take one reshape, permute and expand, and one unbind hands out the layers (its
            # backward is one stack; indexing layer by layer would give each layer a backward the size of all)
            order = sorted(range(len(kvs)), key=lambda i: layer_ids[i])  # type: ignore[arg-type, return-value]
            whole = batched[0] if len(batched) == 1 else None
            if whole is not None and [kvs[i].pick if kvs[i].batch is whole[0] else -1 for i in order] == list(range(n_l)):
                keys, values = whole[1]  # one program gives every layer, in order
            else:
                pairs = [self._kv_of(kvs[i], batched, training) for i in order]
                keys, values = torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])
            per = [t.unflatten(-1, (kvh, dh)).permute(0, 2, 1, 3).unsqueeze(1).expand(-1, b, -1, -1, -1).unbind(0) for t in (keys, values)]
            layers = list(zip(*per))  # [(keys, values) [batch, kvh, n, dh] of each layer]
            return self._cache_of(cache, layers)
        per_layer: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(n_l)}
        gated: dict[int, list[tuple[Entry, int]]] = {}
        for e in kvs:
            k, v = self._kv_of(e, batched, training)  # [n, kvh*dh]
            shape = (k.shape[0], kvh, dh)
            k = k.reshape(shape).permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1)
            v = v.reshape(shape).permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1)
            at = per_layer[cast(int, e.layer)]  # the cache of the entry's own layer, not the i-th filled one
            if _gated(e):
                gated.setdefault(cast(int, e.layer), []).append((e, sum(t.shape[2] for t, _ in at)))
            at.append((k, v))
        layers = [(torch.cat([k for k, _ in per_layer[i]], dim=2), torch.cat([v for _, v in per_layer[i]], dim=2)) for i in sorted(per_layer)]
        out = self._cache_of(cache, layers)
        self.live = (out, gated) if gated else None
        return out

    @staticmethod
    def _batches(kvs: list[Entry], training: bool) -> list[tuple[Any, Any]]:
        """(program, its outputs) for each layer-batched program all of whose entries are in ``kvs``."""
        out: list[tuple[Any, Any]] = []
        for e in kvs:
            bt = e.batch
            if bt is None or any(bt is seen for seen, _ in out):
                continue
            if sum(1 for f in kvs if f.batch is bt) == bt.size:
                bd = e.unit.__dict__.get("boundary")  # an adapter computing in its own dtype: the host's dtype in the cache
                out.append((bt, bt(training) if bd is None else cast_floats(bt(training), bd[1])))
        return out

    @staticmethod
    def _kv_of(e: Entry, batched: list[tuple[Any, Any]], training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """An entry's keys and values [n, kv_heads*d_head]: its slice of its program's outputs, else its unit's own."""
        for bt, (keys, values) in batched:
            if e.batch is bt:
                return keys[e.pick], values[e.pick]
        return cast(tuple[torch.Tensor, torch.Tensor], e.unit(None, None, None, training))

    def gate_layer(self, e: Entry, x: torch.Tensor) -> None:
        """Scale ``e``'s keys and values in its layer's cache by its gate of ``x`` (the hidden state entering the
        layer's attention), before the attention reads them; only in the pass that filled the cache."""
        if self.live is None:
            return
        cache, gated = self.live
        at = next((start for g, start in gated.get(cast(int, e.layer), []) if g is e), None)
        if at is None:
            return
        g = cast(Any, e.unit).gate_unit(x, None, None, self.model.training)  # [batch, 1]
        g = g.reshape(g.shape[0], 1, 1, 1).to(x.dtype)
        i = cast(int, e.layer)
        k, v = (cache.layers[i].keys, cache.layers[i].values) if hasattr(cache, "layers") else cache[i]
        k, v = (torch.cat([t[:, :, :at], t[:, :, at:at + e.length] * g, t[:, :, at + e.length:]], dim=2) for t in (k, v))
        if hasattr(cache, "layers"):
            cache.layers[i].keys, cache.layers[i].values = k, v
        else:
            cache[i] = (k, v)

    def _cache_of(self, cache: Any, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """The model's cache holding ``layers`` (key, value) [batch, kv_heads, n, d_head] per layer."""
        if self.fwd.cache_format == "tuples":
            return layers
        if cache is not None and hasattr(cache, "update"):
            for i, (k, v) in enumerate(layers):
                cache.update(k, v, i)
            return cache
        from transformers import DynamicCache

        return DynamicCache(layers)


def _gated(e: Entry) -> bool:
    """Whether a prefix entry's unit has a gate (its keys and values are rescaled per layer at run time)."""
    return "gate_unit" in getattr(e.unit, "__dict__", {})


def root_patch_of(model: nn.Module, fwd: Any, sizes: dict[str, int], embed: nn.Module | None) -> RootPatch:
    p = getattr(model, _ROOT, None)
    if p is None:
        p = RootPatch(model, fwd, sizes, embed)
    elif p.embed is None:
        p.embed = embed
    return p


def input_cell(model: nn.Module, mask_name: str, ids_name: str = "input_ids", cache_names: tuple[str, ...] = ()) -> InputCell:
    """The model's :class:`InputCell`, created with its forward pre-hook on first use; one more user of it.

    The hook runs before the model's other pre-hooks: it takes ``task_ids`` out of the call's keyword
    arguments (the model's forward does not know them), keeps the call's token ids ``ids_name`` and runs
    the call's first pass where units read one (``cache_names``: the forward's key/value cache arguments,
    which a first pass refuses)."""
    cell = model.__dict__.get(_INPUTS)
    if cell is None:
        sig = inspect.signature(model.forward)
        c = InputCell()

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
            task_ids = kwargs.pop("task_ids", None)
            type_mask = kwargs.pop("input_type_mask", None)  # a per-token input a token loss reads (not the model's)
            bound = sig.bind_partial(*args, **kwargs).arguments if args else kwargs
            c.mask = bound.get(mask_name)
            c.values.clear()
            c.call.clear()
            ids = bound.get(ids_name)
            if isinstance(ids, torch.Tensor):
                c.call["input_ids"] = ids
            labels = bound.get("labels")
            if isinstance(labels, torch.Tensor):  # read after the forward pass by auxiliary losses
                c.call["labels"] = labels
            if isinstance(type_mask, torch.Tensor):
                c.call["input_type_mask"] = type_mask
            first = next((v for v in bound.values() if isinstance(v, torch.Tensor)), None)
            c.batch = (first.shape[0], first.device) if first is not None and first.dim() > 0 else (0, None)
            task_ids = task_ids if task_ids is not None else c.given.get("task_ids")
            if task_ids is not None:
                c.call["task_ids"] = torch.as_tensor(task_ids, dtype=torch.long, device=c.batch[1])
            if c.first is not None:
                run_first_pass(_m, c, args, kwargs, [bound.get(n) for n in cache_names], "use_cache" in sig.parameters)
            return args, kwargs

        c.hook = model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
        model.__dict__[_INPUTS] = cell = c
    cell.users += 1
    return cell


def release_input_cell(model: nn.Module) -> None:
    """One user fewer of the input cell; the last one removes it."""
    cell = model.__dict__.get(_INPUTS)
    if cell is None:
        return
    cell.users -= 1
    if cell.users <= 0:
        cell.hook.remove()
        del model.__dict__[_INPUTS]

