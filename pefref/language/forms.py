"""The registry of forms and composition block kinds: one object per form, one per block kind.

A *form* says how a module meets its host. Everything a form means lives in its
:class:`Form` entry: the expression fields its modules declare and the host
tensors each may read, how its unit's forward runs (a :class:`Rule` over those
fields), how it integrates with a host (:class:`Integration`), its stage in a
composition, how it merges, the typology facts it implies and its diagram
style. The compiler, the runtime, the view, the renderers and the checks ask
this registry; none of them switches on a form's name (they switch on the
closed set of :class:`Integration` kinds a host offers, and read the entry's
other facts). The schema's ``Literal`` tags are the only other place the names
are written, and a test asserts the two agree.

:data:`BLOCKS` is the same for a composition's block kinds (how the modules of
several adapters combine at one host).

A new form is one entry of :data:`FORMS` (plus its schema class); a new block
kind one entry of :data:`BLOCKS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

__all__ = [
    "Integration", "Merge", "Rule", "Form", "FORMS", "form_of", "DELTA_FORM", "SERIAL", "CONCURRENT",
    "Combine", "BlockKind", "BLOCKS", "block_of",
]


class Integration(Enum):
    """How a unit's result meets its host: the closed set of host mechanisms the runtime implements."""

    HIDDEN = "hidden"
    """The unit returns the host's new hidden state (its output, or its input on the input side)."""
    SCALE = "scale"
    """The unit returns a vector that multiplies the host's hidden state elementwise."""
    WEIGHT = "weight"
    """The unit returns the weight ``W'`` the host runs with (weight space)."""
    POSITIONS = "positions"
    """The unit returns positions prepended to a sequence: tokens at the root, keys and values in the cache."""
    PARAMETERS = "parameters"
    """No unit: existing host parameters train in place."""


class Merge(Enum):
    """How a form's mergeability is derived (:func:`pefref.view.analysis.mergeability`)."""

    ALWAYS = "always"
    """The host's own tensors: nothing to fold."""
    NEVER = "never"
    """Extra positions: no weight holds them."""
    ON_LINEAR = "on linear sites"
    """A function of the weight (or a scale of it): folds wherever the host is a linear map."""
    DERIVED = "derived"
    """From the expressions: linear in what the module reads folds; affine folds with a host bias."""


@dataclass(frozen=True)
class Rule:
    """How a unit's forward evaluates its fields: each field of ``fields`` present in the description, in
    order; the value of a field in ``binds`` is visible to the later ones under the bound name (``delta``);
    the unit returns the present ``results`` (one value, or a tuple of several)."""

    fields: tuple[str, ...]
    results: tuple[str, ...]
    binds: tuple[tuple[str, str], ...] = ()
    published: str | None = None
    """The bound name a unit whose output other units read returns with its result (``(result, delta)``)."""


@dataclass(frozen=True)
class Form:
    """Everything one form means. Facets, by layer:

    * language: ``reads`` (expression field -> host tensors it may read, before the site kind narrows
      it), ``own_reads`` (fields read from the layer, not narrowed by the site), ``publishes`` (other
      modules' connections may read its output; only such modules may read connections), ``stage``
      (when it runs in a host's computation, as ``catalog/reference/interactions.yaml`` also says);
    * compiler: ``rule`` (the unit's forward), ``side_rules`` (further programs over the same tensors,
      made when their field is given: a prefix's gate);
    * runtime: ``integration``, ``reads_input`` (the hidden state its computation reads, ``x`` or ``h``),
      ``host_weight`` (its forward is given the host's weight at run time);
    * view: ``merge``, ``merges_at_activation``, ``serial`` (extra work on the critical path when not
      merged), ``insertion``, ``integration_form``, ``input_type``, ``dynamic``, ``adaptation`` (typology
      values; ``None``: derived from the expressions);
    * render: ``colour``, ``fill``, ``legend``.
    """

    name: str
    summary: str
    integration: Integration
    rule: Rule
    reads: Mapping[str, frozenset[str]]
    stage: str
    merge: Merge
    insertion: str
    colour: str
    fill: str
    legend: str
    own_reads: frozenset[str] = frozenset()
    side_rules: Mapping[str, Rule] = field(default_factory=lambda: MappingProxyType({}))
    reads_input: str | None = None
    host_weight: bool = False
    publishes: bool = False
    merges_at_activation: bool = True
    serial: bool = False
    integration_form: str | None = None
    input_type: str | None = None
    dynamic: bool = False
    adaptation: str | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        """The expression fields its units compile (:attr:`Rule.fields`)."""
        return self.rule.fields

    @property
    def has_unit(self) -> bool:
        """Whether a module of this form compiles to a unit (host parameters that train in place do not)."""
        return self.integration is not Integration.PARAMETERS

    def __str__(self) -> str:
        return self.name

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """A form is a registry entry: copied or pickled (an adapted model deep-copied, ``torch.save``d), it stays the
        registry's own object."""
        return form_of, (self.name,)


def _reads(**fields: set[str]) -> Mapping[str, frozenset[str]]:
    return MappingProxyType({k: frozenset(v) for k, v in fields.items()})


_HIDDEN_RULE = Rule(("compute", "integrate"), ("integrate",), (("compute", "delta"),), published="delta")
_LINE = "#1f6fb4"

FORMS: Mapping[str, Form] = MappingProxyType({f.name: f for f in (
    Form("parallel", "reads the host's input x, meets the host's output h", Integration.HIDDEN, _HIDDEN_RULE,
         _reads(compute={"x", "W", "b", "mask"}, integrate={"x", "h", "delta"}), "output", Merge.DERIVED, "parallel",
         _LINE, "#dceaf7", "branch from the site's input x, combined with its output h",
         reads_input="x", host_weight=True, publishes=True, merges_at_activation=False),
    Form("sequential", "transforms the host's output h (or its input at input-side sites)", Integration.HIDDEN, _HIDDEN_RULE,
         _reads(compute={"h", "W", "b", "mask"}, integrate={"x", "h", "delta"}), "output", Merge.DERIVED, "sequential",
         "#2e8b2e", "#ddf0da", "on the output path: reads h, its δ is combined with h",
         reads_input="h", host_weight=True, publishes=True, serial=True),
    Form("reparameterise", "the host runs with W' = f(W): before the host, on its weight", Integration.WEIGHT,
         Rule(("weight",), ("weight",)), _reads(weight={"W"}), "weight", Merge.ON_LINEAR, "in-place",
         "#d9700b", "#fde6cf", "weight badge: the host runs with W' instead of W", integration_form="weight update"),
    Form("rescale", "multiplies the host's output, or its input at input-side sites", Integration.SCALE,
         Rule(("scale",), ("scale",)), _reads(scale=set()), "output", Merge.ON_LINEAR, "sequential",
         "#8a4fbf", "#ece1f5", "elementwise ⊙ on the output (or input) path",
         serial=True, integration_form="rescaling", input_type="hidden states"),
    Form("prepend", "positions prepended at the model's root (prompts) or in the key/value cache (prefixes)", Integration.POSITIONS,
         Rule(("tokens", "keys", "values"), ("tokens", "keys", "values")),
         _reads(tokens=set(), keys=set(), values=set(), gate={"x"}, length=set()), "positions", Merge.NEVER, "parallel",
         "#12939f", "#d5f2f4", "extra positions: tokens at the embeddings, keys/values at attention",
         own_reads=frozenset({"gate"}),  # the hidden state entering the layer's attention, whatever the kv site offers
         side_rules=MappingProxyType({"gate": Rule(("gate",), ("gate",))}),
         integration_form="concatenation", input_type="none", dynamic=True),
    Form("select", "unfrozen host tensors: trained in place, no computation of their own", Integration.PARAMETERS,
         Rule((), ()), _reads(), "parameters", Merge.ALWAYS, "in-place",
         "#c62828", "#f9dada", "existing host parameters unfrozen (highlighted)",
         integration_form="selection", input_type="none", adaptation="selection"),
)})
"""Every form, by name, in the order the schema, the legend and the site list them."""

DELTA_FORM = FORMS["parallel"]
"""The form of a module adding ``delta`` computed from the host's input to its output (what a merged
low-rank update is written as)."""

SERIAL, CONCURRENT = "sequential", "parallel"
"""Latency classes of a technique's unmerged modules: extra work on the critical path, or beside it."""


def form_of(m: object) -> Form:
    """The form of a module description (or a form's name)."""
    name = m if isinstance(m, str) else getattr(m, "form", None)
    try:
        return FORMS[name]  # type: ignore[index]
    except KeyError:
        raise KeyError(f"unknown form {name!r} (one of {', '.join(FORMS)})") from None


class Combine(Enum):
    """How a block combines the adapters it names at one host."""

    ORDER = "order"
    """One after the other, in the declared order (no combiner: the host's entries are reordered)."""
    SUM = "sum"
    """Their changes add: ``h + Σ_i (f_i(h) − h)``."""
    MEAN = "mean"
    """A weighted mean of their changes: ``h + Σ_i w_i (f_i(h) − h)``."""
    ATTENTION = "attention"
    """Attention over their changes, with trainable Q, K, V per host (AdapterFusion)."""


@dataclass(frozen=True)
class BlockKind:
    """Everything one composition block kind means: how it combines (``combine``), whether a composition
    using it can still fold into the base weights (``folds``), and its diagram legend (``meaning``)."""

    name: str
    combine: Combine
    folds: bool
    meaning: str

    def __str__(self) -> str:
        return self.name

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """A registry entry, copied or pickled as itself (as :meth:`Form.__reduce__`)."""
        return block_of, (self.name,)


BLOCKS: Mapping[str, BlockKind] = MappingProxyType({b.name: b for b in (
    BlockKind("stack", Combine.ORDER, True, "in the declared order: h → f_n(… f_1(h))"),
    BlockKind("parallel", Combine.SUM, True, "changes added: h + Σ_i δ_i"),
    BlockKind("average", Combine.MEAN, True, "weighted mean of changes: h + Σ_i w_i δ_i"),
    BlockKind("fusion", Combine.ATTENTION, False, "attention over the changes: h + Σ_i softmax_i(q·k_i / T) δ_i Vᵀ"),
)})
"""Every composition block kind, by name."""


def block_of(blk: object) -> BlockKind:
    """The kind of a composition block (or a kind's name)."""
    name = blk if isinstance(blk, str) else getattr(blk, "kind", None)
    return BLOCKS[name]  # type: ignore[index]
