"""The composition schema: several techniques on one model, combined at the hosts they share.

A composition names techniques (catalog ids or YAML files) with their
hyperparameters and where they go, and *blocks* that say how the adapters meet
at a shared host: in a declared order (``stack``), side by side from the same
input (``parallel``), as a weighted mean of their changes (``average``), or
through a learned attention over their outputs (``fusion``, AdapterFusion).
Which forms may share a host and how is the data of
:class:`InteractionRules` (``catalog/reference/interactions.yaml``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pefref.language.forms import BLOCKS
from pefref.language.schema.common import SITE_PATTERN, Identifier, Strict
from pefref.language.schema.technique import FORMS, Layers, Paper

__all__ = [
    "TechniqueUse", "StackBlock", "ParallelBlock", "AverageBlock", "FusionBlock", "Block", "Composition",
    "BLOCK_KINDS", "STAGES", "StageRule", "BlockRule", "PairRule", "InteractionRules",
]

BLOCK_KINDS = tuple(BLOCKS)
"""The block kinds' names (:data:`pefref.language.forms.BLOCKS`; the ``Literal`` tags below agree with it, as a test asserts)."""
STAGES = ("parameters", "positions", "input", "weight", "output")
"""When a module takes part in a host's computation (see :class:`StageRule`)."""

SiteName = Annotated[str, Field(pattern=SITE_PATTERN)]


class TechniqueUse(Strict):
    """One technique of the composition, applied as one named adapter."""

    name: Identifier = Field(description="The adapter's name in the composition and the model (unique); blocks refer to it.")
    technique: str = Field(min_length=1, description="A catalog technique id, or a technique YAML file (relative to the composition file).")
    hyperparameters: dict[Identifier, int | float | bool] = Field(default_factory=dict, description="Hyperparameter values overriding the technique's defaults.")
    sites: list[SiteName] | None = Field(None, description="Only these of the technique's sites (default: all of them).")
    layers: Layers | None = Field(None, description="Replaces every module's layer selection: 'all', a list of indices, or {first|last|every: n}.")


class _Block(Strict):
    adapters: list[Identifier] = Field(min_length=2, description="Names of the combined adapters (entries of 'techniques'), in order.")
    sites: list[SiteName] | None = Field(None, description="Sites where the block combines them (default: every site they share).")
    description: str = ""

    @model_validator(mode="after")
    def _distinct(self) -> _Block:
        dup = sorted({a for a in self.adapters if self.adapters.count(a) > 1})
        if dup:
            raise ValueError(f"adapter {dup[0]!r} is named twice in one block")
        return self


class StackBlock(_Block):
    """The adapters run one after the other in the declared order: ``h → f_n(… f_1(h))`` (weights ``W → f_n(… f_1(W))``)."""

    kind: Literal["stack"]


class ParallelBlock(_Block):
    """Each adapter reads the same input; their changes add: ``h + Σ_i (f_i(h) − h)``."""

    kind: Literal["parallel"]


class AverageBlock(_Block):
    """A weighted mean of the adapters' changes: ``h + Σ_i w_i (f_i(h) − h)`` (default ``w_i = 1/n``)."""

    kind: Literal["average"]
    weights: list[float] | None = Field(None, description="One weight per adapter (default: 1/n each).")

    @model_validator(mode="after")
    def _one_weight_each(self) -> AverageBlock:
        if self.weights is not None and len(self.weights) != len(self.adapters):
            raise ValueError(f"give one weight per adapter: {len(self.adapters)} adapters, {len(self.weights)} weights")
        return self


class FusionBlock(_Block):
    """AdapterFusion (Pfeiffer et al. 2021, arXiv 2005.00247): attention over the adapters' outputs at each host.

    With ``h`` the host output and ``δ_i = f_i(h) − h`` each adapter's change,
    ``q = h Q^T + b_Q``, ``k_i = δ_i K^T + b_K``, ``v_i = δ_i V^T``,
    ``a = softmax_i(q · k_i / T)`` and the output is ``h + Σ_i a_i v_i``. Q, K,
    V are trainable per host and layer (V starts as the identity, Q and K as
    BERT-style normal(0.02) weights with zero biases).
    """

    kind: Literal["fusion"]
    temperature: float = Field(1.0, gt=0, description="Softmax temperature T.")
    train_adapters: bool = Field(False, description="Whether the fused adapters keep training (AdapterFusion's second stage freezes them).")


Block = Annotated[StackBlock | ParallelBlock | AverageBlock | FusionBlock, Field(discriminator="kind")]


class Composition(Strict):
    """Several techniques applied to one model and the blocks that combine them where they meet."""

    id: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")] = Field(description="snake_case identifier; the file is <id>.yaml.")
    name: str = Field(description="Display name.")
    summary: str = Field("", description="One or two sentences on what the composition does.")
    papers: list[Paper] = Field(default_factory=list, description="Publications the composition follows (e.g. AdapterFusion's).")
    techniques: list[TechniqueUse] = Field(min_length=1, description="The techniques, each applied as one named adapter, in this order.")
    blocks: list[Block] = Field(default_factory=list, description="How adapters combine at the sites they share (elsewhere: in the order of 'techniques').")
    notes: str = Field("", description="Judgement calls and their justification.")

    @model_validator(mode="after")
    def _unique_names(self) -> Composition:
        seen: set[str] = set()
        for t in self.techniques:
            if t.name in seen:
                raise ValueError(f"adapter name {t.name!r} is used twice")
            seen.add(t.name)
        return self


# --- the interaction rules (data in catalog/reference/interactions.yaml) -------------


class StageRule(Strict):
    """When the modules of one form take part in a host's computation."""

    stage: Literal[STAGES] = Field(description="parameters (unfrozen host tensors), positions (prepended at the root), input (the host's input), weight (the host's weight, before it runs) or output (the host's output).")  # type: ignore[valid-type]
    input_side: Literal[STAGES] | None = Field(None, description="The stage of a module of this form placed on the host's input side (e.g. a rescale of an input).")  # type: ignore[valid-type]
    description: str = ""


class BlockRule(Strict):
    """Which modules a block may combine."""

    stages: list[Literal[STAGES]] = Field(min_length=1, description="Stages whose modules the block can combine at one host.")  # type: ignore[valid-type]
    forms: list[Literal[FORMS]] | None = Field(None, description="Only modules of these forms (default: every form of the stages).")  # type: ignore[valid-type]
    same_stage: bool = Field(True, description="Whether every combined module must be of the same stage at a host (the block mixes like with like).")
    semantics: str = Field(description="What the block computes (shown in the docs).")


class PairRule(Strict):
    """What happens when modules of two forms share one host (from two adapters of one composition)."""

    forms: Annotated[list[Literal[FORMS]], Field(min_length=2, max_length=2)] = Field(description="The two forms (order does not matter).")  # type: ignore[valid-type]
    allowed: bool = Field(description="Whether they may share a host.")
    combine: str = Field(description="How they combine (or why they cannot).")


class InteractionRules(Strict):
    """How modules of several adapters meet at one host: stages, blocks and pairs of forms (read by the validator, shown in the docs)."""

    description: str = ""
    stage_order: list[Literal[STAGES]] = Field(description="The order in which stages run at one host.")  # type: ignore[valid-type]
    forms: dict[Literal[FORMS], StageRule] = Field(description="The stage of each form.")  # type: ignore[valid-type]
    blocks: dict[Literal[BLOCK_KINDS], BlockRule] = Field(description="What each block kind may combine.")  # type: ignore[valid-type]
    pairs: list[PairRule] = Field(description="Pairs of forms at one host; a pair not listed may share a host and runs in stage order.")

    @model_validator(mode="after")
    def _complete(self) -> InteractionRules:
        if sorted(self.stage_order) != sorted(STAGES):
            raise ValueError(f"stage_order must list every stage once: {', '.join(STAGES)}")
        missing = [f for f in FORMS if f not in self.forms]
        if missing:
            raise ValueError(f"give the stage of every form; missing: {', '.join(missing)}")
        missing = [b for b in BLOCK_KINDS if b not in self.blocks]
        if missing:
            raise ValueError(f"give the rule of every block kind; missing: {', '.join(missing)}")
        return self

    def stage_of(self, form: str, input_side: bool = False) -> str:
        """The stage a module of ``form`` runs in (on the host's input side when ``input_side``)."""
        r = self.forms[form]
        return (r.input_side or r.stage) if input_side else r.stage

    def pair(self, a: str, b: str) -> PairRule | None:
        """The rule for forms ``a`` and ``b`` at one host (None: not listed)."""
        return next((p for p in self.pairs if sorted(p.forms) == sorted((a, b))), None)
