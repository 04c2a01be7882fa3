"""The technique schema: a PEFT technique as components placed at sites."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from pefref.language.forms import FORMS as _REGISTRY
from pefref.language.schema.common import SITE_PATTERN, ExprStr, Float, Identifier, Int, Strict, at_least

__all__ = [
    "Paper", "IntParam", "FloatParam", "BoolParam", "ChoiceParam", "IntsParam", "Hyperparameter",
    "ParamSpec", "Connection", "LayerRange", "Layers", "ParallelModule", "SequentialModule",
    "ReparameteriseModule", "RescaleModule", "PrependModule", "SelectModule", "ModuleUse",
    "Module", "Technique", "FORMS", "FormName", "TYPOLOGY_PROPERTIES",
    "ScheduleHook", "GradProjectionHook", "AfterStepHook", "AuxLossHook", "StateHook", "MaskHook", "StepWindow", "TrainingHook",
    "HOOK_KINDS",
    "Statistic", "STATISTIC_KINDS", "TokenLoss", "TOKEN_LOSS_CALLS",
]

FORMS = tuple(_REGISTRY)
"""The forms' names (:data:`pefref.language.forms.FORMS`; the ``Literal`` tags below agree with it, as a test asserts)."""
FormName = Literal["parallel", "sequential", "reparameterise", "rescale", "prepend", "select"]
TYPOLOGY_PROPERTIES = (
    "workspace", "insertion_form", "integration_form", "parameter_adaptation",
    "intra_connectivity", "inter_connectivity", "parameter_sharing", "input_type", "insertions",
)


class Paper(Strict):
    """The publication that introduced the technique."""

    title: str = Field(description="Title of the paper.")
    authors: str = Field(description="Authors, e.g. 'Hu et al.'.")
    year: Int = Field(ge=1990, le=2100, description="Year of publication.")
    arxiv: str | None = Field(None, pattern=r"^\d{4}\.\d{4,5}$", description="arXiv identifier, e.g. '2106.09685'.")
    url: str | None = Field(None, pattern=r"^https?://", description="URL when there is no arXiv identifier.")
    venue: str | None = Field(None, description="Where it was published (optional).")

    @model_validator(mode="after")
    def _has_link(self) -> Paper:
        if not (self.arxiv or self.url):
            raise ValueError("give an arxiv identifier or a url")
        return self


class _HP(Strict):
    description: str = Field("", description="What the hyperparameter controls.")


class IntParam(_HP):
    """An integer hyperparameter."""

    type: Literal["int"]
    default: Int
    min: Int | None = None
    max: Int | None = None


class FloatParam(_HP):
    """A real-valued hyperparameter."""

    type: Literal["float"]
    default: Float
    min: Float | None = None
    max: Float | None = None


class BoolParam(_HP):
    """A boolean hyperparameter."""

    type: Literal["bool"]
    default: bool


class ChoiceParam(_HP):
    """A hyperparameter taking one of a fixed set of numeric values."""

    type: Literal["choice"]
    default: Int | Float
    choices: list[Int | Float] = Field(min_length=1)


class IntsParam(_HP):
    """A list of integers (e.g. the rows of a table to train); expressions read it as a tuple, ``count(v)`` its length;
    ``min`` and ``max`` bound every entry."""

    type: Literal["ints"]
    default: list[Int] = Field(min_length=1)
    min: Int | None = None
    max: Int | None = None


Hyperparameter = Annotated[Union[IntParam, FloatParam, BoolParam, ChoiceParam, IntsParam], Field(discriminator="type")]


class ParamSpec(Strict):
    """A tensor the module owns: symbolic shape, initialisation, trainability, sharing."""

    shape: list[Int | ExprStr] = Field(description="Dimensions, each a number or an expression over host sizes (in, out, d, ...) and hyperparameters.")
    init: ExprStr = Field("zeros()", description="Initialiser call, e.g. zeros(), normal(std=0.02), kaiming_uniform(a=sqrt(5)); may read the host weight W; a tensor with shared: layers may also read W_layers, the host weights of every layer it is placed at on its site, stacked [L, out, in].")
    trainable: bool = Field(True, description="False for fixed tensors (e.g. shared random projections); they are stored but not trained.")
    shared: Literal["none", "layers", "sites", "all"] = Field(
        "none", description="One copy per site and layer (none), per site across layers (layers), per layer across sites (sites), or one for all (all)."
    )
    every: at_least(1) | Identifier | None = Field(  # type: ignore[valid-type]
        None, description="With shared: layers, one copy per run of this many consecutive layers the module is placed at on the site "
        "(a number, or an int hyperparameter), instead of one for all of them: with every: 2, layers 0-1 share one, 2-3 the next."
    )
    groups: at_least(1) | ExprStr | None = Field(  # type: ignore[valid-type]
        None, description="With shared: all, G tensors instead of one, each shared by a run of consecutive placements in the model's "
        "module order: of n placements, the i-th is in group min(i // max(1, n // G), G - 1) (the last group takes the rest). G is a "
        "number or an expression over hyperparameters and n, e.g. max(1, round(n * (1 - weight_tying))) for a tying fraction."
    )
    group: Identifier | None = Field(
        None, description="One tensor shared by several modules of the technique: every tensor declared with the same group name "
        "(in any module, under any name) is the same tensor, shared within the scope `shared` gives (all: one for the whole "
        "technique, e.g. a bank every module reads; sites: one per layer; layers: one per site; none: one per placement, e.g. "
        "two modules at one site). Its declarations must agree (shape, init, trainable, shared); the first module placed "
        "initialises it, and it is counted and saved once."
    )
    stacked: Literal["none", "layers"] = Field(
        "none", description="Storage only, for unshared tensors: 'layers' keeps the copies of every layer at one site in one tensor "
        "[layers, *shape] (the optimizer sees one tensor; each layer's unit reads its slice), so that units evaluated together "
        "(the key/value prefixes of every layer, filling the cache at once) run one batched op instead of one per layer. "
        "Values, counts and typology are those of per-layer copies."
    )
    lr_scale: Float | ExprStr = Field(
        1.0, description="Multiplier of the optimizer's learning rate for this tensor (a number or an expression over hyperparameters, e.g. a ratio between two tensors' rates); read by Adapter.param_groups."
    )
    weight_decay: at_least(0, float) | None = Field(  # type: ignore[valid-type]
        None, description="Weight decay for this tensor; None uses the optimizer's (the value given to Adapter.param_groups)."
    )
    split: at_least(0) = Field(  # type: ignore[valid-type]
        0,
        description="Store the tensor as separate tensors, one per index of its first `split` dimensions (state-dict keys name.i, name.i.j, ...); "
        "its shape, count and initialisation are unchanged and expressions still see one value. Ops that take pieces (e.g. lstm) read them "
        "as they are; any other use stacks them. Each piece is its own optimizer tensor (an LSTM's weights per layer and direction, as torch.nn.LSTM holds them).",
    )
    description: str = ""

    def owner(self, module: str, pname: str) -> tuple[str, str]:
        """Whose tensor this is, for storing and counting it once: (module, name), or ('group:NAME', NAME) for a
        tensor of a ``group`` (the same tensor whichever module declares it, under whatever name)."""
        return (f"group:{self.group}", self.group) if self.group else (module, pname)


class LayerRange(Strict):
    """A contiguous or strided selection of layers (Python range semantics; negative counts from the end)."""

    first: at_least(0) | None = Field(None, description="The first N layers.")  # type: ignore[valid-type]
    last: at_least(0) | None = Field(None, description="The last N layers.")  # type: ignore[valid-type]
    every: at_least(1) | None = Field(None, description="Every k-th layer, starting at 0.")  # type: ignore[valid-type]


Layers = Union[Literal["all"], list[Int], LayerRange]


class Connection(Strict):
    """A named input of a module read from elsewhere in the model during the forward pass.

    Either another module's output (its ``compute`` result, ``delta``) — in the same
    layer, the previous layer (state carried layer to layer, e.g. a side network) or
    the last layer —, a tensor of a site the module does not attach to: its hidden
    state (host input ``x`` or output ``h``) or its host's own frozen weight ``W`` or
    bias ``b`` (a neighbouring projection's, e.g. the key projection's weight read at
    the output projection), or an input of the model's call (``call``): the
    per-example task ids or the token ids. The name it is given is visible to the
    module's expressions like ``x`` or ``h``.
    """

    module: Identifier | None = Field(None, description="Read this module's output (its compute result, delta); the module must be parallel or sequential.")
    site: Annotated[str, Field(pattern=SITE_PATTERN)] | None = Field(
        None, description="With module: which of its sites (needed when it has several). Without: read the hidden state at this site."
    )
    tensor: Literal["x", "h", "W", "b"] = Field(
        "h", description="Without module: the host's input x or output h at the site, or its host's frozen weight W or bias b (the site's kind must offer it).")
    layer: Literal["same", "previous", "last"] = Field(
        "same", description="Which layer's value: this layer's, the previous layer's (carried state), or the last layer's (for model-level readers)."
    )
    fallback: Identifier | None = Field(
        None, description="Module read instead where the source does not exist (the previous layer of the first layer), e.g. a model-level module at the embeddings."
    )
    call: Literal["task_ids", "input_ids", "labels"] | None = Field(None, description=(
        "Read an input of the model's call instead: task_ids, one task id per example (int64 [batch]; passed as "
        "model(..., task_ids=...) or inside adapter.inputs(task_ids=...)), input_ids, the token ids (int64 [batch, seq]), "
        "or labels, the labels the model's loss reads (an auxiliary loss's inputs only)."))
    default: at_least(0) | None = Field(None, description=(  # type: ignore[valid-type]
        "With call: task_ids, the task id of every example of a call given none; without it a call without task ids is refused."))
    pass_: Literal["same", "first"] = Field("same", alias="pass", description=(
        "Which forward pass the site's hidden state comes from: this one (same), or a first pass of the adapted model that "
        "runs once per call before it (first: two-pass routing, e.g. a router reading the last hidden state); a first-pass "
        "read may come from any site, later ones included."))
    no_grad: bool = Field(False, description="With pass: first, run the first pass under torch.no_grad() (its value carries no gradient).")
    during: Literal["base"] = Field("base", description=(
        "With pass: first, what the technique's modules do during the first pass: base (the model computes without them, as the base model "
        "with any other adapters; only the value read is taken from it)."))

    @model_validator(mode="after")
    def _source(self) -> Connection:
        if (self.call is not None) + (self.module is not None) + (self.site is not None and self.module is None) != 1:
            raise ValueError("give one source to read from: a module, a site, or call")
        if self.default is not None and self.call != "task_ids":
            raise ValueError("a default is a task id: it goes with call: task_ids")
        if self.pass_ == "first" and (self.site is None or self.module is not None or self.tensor not in ("x", "h")):
            raise ValueError("pass: first reads a site's hidden state (site: with tensor: x or h)")
        if self.no_grad and self.pass_ != "first":
            raise ValueError("no_grad goes with pass: first (it is how the first pass runs)")
        return self

    @property
    def first_pass(self) -> bool:
        """Whether the value comes from a first forward pass (``pass: first``)."""
        return self.pass_ == "first"


STATISTIC_KINDS = ("input_cov", "output_cov", "weight_grad", "input_pca", "input_ipca")
"""The closed set of calibration statistics a module may declare (``calibration:``)."""


class Statistic(Strict):
    """A statistic gathered at each of the module's placements on calibration batches before its tensors are
    initialised (``pefref.apply(..., calibration=batches)``, an experiment's ``calibration:`` section); the module's
    initialisers and ``host_update`` read it under its name.

    * ``input_cov``: :math:`\\sum_b X_b^\\top X_b` over the batches' inputs of the host ``X_b`` ([tokens, d_in]), [d_in, d_in];
    * ``output_cov``: the same over the host's outputs, [d_out, d_out];
    * ``weight_grad``: :math:`\\sum_b \\partial \\mathcal{L}_b / \\partial W` of the model's loss on each batch with respect
      to the host weight, [d_out, d_in] (the batches carry labels; gathered with gradients, the others under no_grad);
    * ``input_pca``: the principal axes of the host's inputs over all the batches' tokens, [d_in, d_in]: row ``i`` is the
      ``i``-th right singular vector of the centred inputs :math:`X - \\bar{x}` (the eigenvectors of their scatter matrix,
      computed in fp64, by decreasing variance), its sign such that its largest-magnitude entry is positive (sklearn's and
      peft's ``svd_flip`` convention). ``average`` does not change it;
    * ``input_ipca``: the ``components`` leading principal axes of the host's inputs estimated by a streaming incremental
      PCA (sklearn's IncrementalPCA with a randomised SVD, ``torch.svd_lowrank`` with ``q`` columns and ``niter``
      iterations drawn from a generator seeded with ``seed``, ``svd_flip`` on V), [components, d_in]: each batch's
      tokens (those with attention mask 1 and, where the batch has labels, a label other than ``ignore_label``) update
      the placement's fit (a batch with fewer tokens than ``components`` is skipped); the fit has converged once every
      axis has a cosine similarity of at least ``tau`` with the previous batch's estimate, and then stops; the batches
      are cycled until every placement of the module has converged, at most ``max_cycles`` times (then the last estimate, with a ConvergenceWarning).
    """

    kind: Literal["input_cov", "output_cov", "weight_grad", "input_pca", "input_ipca"] = Field(
        description="Which statistic: the covariance of the host's input or output activations, the loss gradient of its weight, "
        "the principal axes of its (centred) inputs, or their streaming incremental estimate.")
    normalise: Literal["none", "batch_max"] = Field(
        "none", description="Covariances: 'batch_max' divides each batch's activations by their largest value (its absolute value) "
        "before the product, as some reference implementations do.")
    average: Literal["batches", "tokens", "none"] = Field(
        "batches", description="The sum over batches divided by the number of batches, by the number of tokens (rows of X; "
        "for weight_grad, batches), or kept as the sum.")
    components: int | ExprStr | None = Field(
        None, description="input_ipca: how many principal axes the fit keeps (an expression of hyperparameters and sizes, e.g. r).")
    tau: float = Field(0.99, gt=0, le=1, description="input_ipca: the cosine similarity every axis must keep between two batches' estimates for the fit to have converged.")
    seed: int = Field(42, ge=0, description="input_ipca: the seed of the randomised SVD's generator (drawn afresh at every batch).")
    q: int | ExprStr | None = Field(None, description="input_ipca: the randomised SVD's number of columns (default 2 * components).")
    niter: int = Field(4, ge=0, le=64, description="input_ipca: the randomised SVD's subspace iterations.")
    max_cycles: int = Field(100, ge=1, le=100000, description="input_ipca: the most passes over the batches; an unconverged fit then keeps its last estimate, with a warning.")
    ignore_label: int | None = Field(-100, description="input_ipca: tokens whose label is this are left out (None: labels are not read).")
    description: str = ""

    @model_validator(mode="after")
    def _ipca_fields(self) -> Statistic:
        if self.kind == "input_ipca" and self.components is None:
            raise ValueError("input_ipca keeps a number of principal axes: give components (e.g. r)")
        if self.kind != "input_ipca" and (self.components is not None or self.q is not None):
            raise ValueError(f"components and q are input_ipca's options, not {self.kind}'s")
        return self


class _ModuleBase(Strict):
    name: Identifier = Field(description="Name of the module, unique within the technique.")
    sites: list[Annotated[str, Field(pattern=SITE_PATTERN)]] = Field(min_length=1, description="Sites of the reference architecture the module attaches to.")
    layers: Layers = Field("all", description="Which layers (for per-layer sites): 'all', a list of indices, or {first|last|every: n}.")
    params: dict[Identifier, ParamSpec] = Field(default_factory=dict, description="Tensors the module owns.")
    inputs: dict[Identifier, Connection] = Field(
        default_factory=dict, description="Connections: names the module's expressions read from other modules' outputs or other sites' hidden states."
    )
    calibration: dict[Identifier, Statistic] = Field(
        default_factory=dict, description="Statistics gathered at each placement on calibration batches (activations' covariances, "
        "the loss gradient of the host weight), read by name in the initialisers and host_update: the module is initialised from data.")
    host_update: ExprStr | None = Field(None, description="Expression for a new host weight written once at apply time (e.g. a residual after an SVD initialisation); remove() restores the original.")
    description: str = ""


class ParallelModule(_ModuleBase):
    """Reads the host's input ``x``; its output ``delta`` is combined with the host's output ``h``."""

    form: Literal["parallel"]
    compute: ExprStr = Field(description="delta as a function of x, the module's params and hyperparameters.")
    integrate: ExprStr = Field("h + delta", description="How delta meets the host output h.")


class SequentialModule(_ModuleBase):
    """Reads the host's output ``h`` and transforms it (or, with ``side: input``, the tensor entering the host)."""

    form: Literal["sequential"]
    compute: ExprStr = Field(description="delta as a function of h (the host output), params and hyperparameters.")
    integrate: ExprStr = Field("h + delta", description="How delta meets h.")
    side: Literal["output", "input"] = Field("output", description=(
        "Transform the host's output (default) or its input: with 'input', h is the tensor entering the host and "
        "the host runs on the result (e.g. a correction added to a block's input before the block)."))


class ReparameteriseModule(_ModuleBase):
    """Weight space: the host runs with ``W' = f(W, params)`` instead of ``W``."""

    form: Literal["reparameterise"]
    weight: ExprStr = Field(description="The new weight W' (shape [out, in]) from W and the params.")


class RescaleModule(_ModuleBase):
    """Multiplies the host's output (or input) elementwise by a learned vector."""

    form: Literal["rescale"]
    scale: ExprStr = Field(description="The scaling vector (broadcast over the last dimension).")
    side: Literal["output", "input"] = Field("output", description="Rescale the host's output (default) or its input.")


class PrependModule(_ModuleBase):
    """Prepends learned vectors to a sequence: tokens at the embeddings, or keys and values at attention."""

    form: Literal["prepend"]
    length: ExprStr = Field(description="Number of prepended positions (an expression over hyperparameters).")
    tokens: ExprStr | None = Field(None, description="[length, d] virtual token embeddings (embedding sites).")
    keys: ExprStr | None = Field(None, description="[length, kv_heads*d_head] prefix keys (attention key/value sites).")
    values: ExprStr | None = Field(None, description="[length, kv_heads*d_head] prefix values (attention key/value sites).")
    gate: ExprStr | None = Field(None, description=(
        "Multiplier of the prefix keys and values in each layer, computed when the layer runs from x, the hidden state "
        "entering its attention (the input of site attn.block), and the module's parameters: one value per example "
        "([batch, 1]), e.g. mean(sigmoid(linear(x, Wg, bg)), dim=1), a learned gate averaged over the sequence."))

    @model_validator(mode="after")
    def _one_kind(self) -> PrependModule:
        if (self.tokens is None) == (self.keys is None and self.values is None):
            raise ValueError("give either tokens, or keys and values")
        if (self.keys is None) != (self.values is None):
            raise ValueError("keys and values go together")
        if self.gate is not None and self.keys is None:
            raise ValueError("a gate scales prefix keys and values; prepended tokens take none")
        return self


class SelectModule(_ModuleBase):
    """Unfreezes existing parameters of the host (biases, norm weights)."""

    form: Literal["select"]
    targets: list[Literal["weight", "bias"]] = Field(min_length=1, description="Which host parameters to train.")


class ModuleUse(Strict):
    """Reuses a module of another catalog technique, optionally re-placed or re-integrated."""

    use: Annotated[str, Field(pattern=r"^[a-z0-9_]+\.[A-Za-z0-9_]+$")] = Field(description="'technique_id.module_name'.")
    name: Identifier | None = Field(None, description="New name (default: the used module's name).")
    sites: list[Annotated[str, Field(pattern=SITE_PATTERN)]] | None = None
    layers: Layers | None = None
    params: dict[Identifier, ParamSpec] = Field(default_factory=dict, description="Extra tensors (e.g. gates) for a new integration.")
    integrate: ExprStr | None = Field(None, description="A new integration expression (parallel and sequential modules).")


def _module_tag(v: Any) -> str:
    if isinstance(v, dict):
        return "use" if "use" in v else str(v.get("form", ""))
    return "use" if isinstance(v, ModuleUse) else getattr(v, "form", "")


Module = Annotated[
    Union[
        Annotated[ParallelModule, Tag("parallel")],
        Annotated[SequentialModule, Tag("sequential")],
        Annotated[ReparameteriseModule, Tag("reparameterise")],
        Annotated[RescaleModule, Tag("rescale")],
        Annotated[PrependModule, Tag("prepend")],
        Annotated[SelectModule, Tag("select")],
        Annotated[ModuleUse, Tag("use")],
    ],
    Discriminator(_module_tag, custom_error_type="form", custom_error_message=f"expected 'form' (one of {', '.join(FORMS)}) or 'use'"),
]


HOOK_KINDS = ("schedule", "grad_projection", "after_step", "aux_loss", "state", "mask")
"""The closed set of training-time behaviours a technique may declare (``training:``)."""
TensorRef = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")]


class _HookBase(Strict):
    description: str = Field("", description="What the training-time behaviour does and why (the paper's equation).")


class ScheduleHook(_HookBase):
    """A value over optimiser steps (a budget, a rate, a mask): an expression of ``step``, recomputed before each step."""

    kind: Literal["schedule"]
    name: Identifier = Field(description="The schedule's name: the other hooks' expressions read its current value under it.")
    value: ExprStr = Field(description="The value at optimiser step `step` (0 before the first), from step and the hyperparameters, "
                           "e.g. a cubic decay of a rank budget after a warm-up.")
    tensor: TensorRef | None = Field(None, description="'module.tensor': also write the value into this tensor of every unit of the "
                                     "module before each step (a mask over ranks), broadcast to its shape, without gradient.")


class GradProjectionHook(_HookBase):
    """A projection of a tensor's gradient, applied after the backward pass and before the optimiser step."""

    kind: Literal["grad_projection"]
    tensor: TensorRef = Field(description="'module.tensor': the trainable tensor whose gradient is projected, in every unit of the module.")
    value: ExprStr = Field(description="The new gradient, from `grad` (the current one), the module's tensors, the hyperparameters and "
                           "the schedules, e.g. grad - matmul(matmul(grad, t(U)), U) (remove the component in a frozen subspace).")


class AfterStepHook(_HookBase):
    """A projection of a tensor after each optimiser step, assigned back without gradient."""

    kind: Literal["after_step"]
    tensor: TensorRef = Field(description="'module.tensor': the tensor projected, in every unit of the module.")
    value: ExprStr = Field(description="The tensor's new value, from its current value (its own name), `initial` (its value when the "
                           "adapter was applied), the module's tensors, the hyperparameters and the schedules, e.g. "
                           "initial + clamp(P - initial, min=-eps, max=eps) (back into an eps-ball around the initial value).")


class AuxLossHook(_HookBase):
    """An auxiliary loss term added to the task loss (a regulariser of the adapter's tensors, or a loss of what a module
    computed in the last forward pass, read through ``inputs``)."""

    kind: Literal["aux_loss"]
    module: Identifier = Field(description="The module whose units the term is computed on.")
    value: ExprStr = Field(description="The term of one unit (a scalar), from the module's tensors and the hyperparameters, e.g. an "
                           "orthogonality penalty sqrt(sum(sum((matmul(A, t(A)) - eye(r, A)) ** 2, -1), -1)).")
    reduce: Literal["mean", "sum"] = Field("mean", description="How the units' terms combine: their mean or their sum.")
    weight: Float | ExprStr = Field(1.0, description="Multiplier of the combined term (a number or an expression over the hyperparameters "
                                    "and the schedules), e.g. a regulariser weight hyperparameter.")
    inputs: dict[Identifier, Connection] = Field(default_factory=dict, description=(
        "Values of the model's last forward pass the term reads by name, as a module's connections (resolved at each unit's "
        "site and layer): another module's output, a site's hidden state or frozen weight, or an input of the call "
        "(call: labels, the labels of the call). A unit whose inputs the last forward pass did not give (a call without "
        "labels, a disabled adapter) adds no term: e.g. a loss of a side network's own prediction against the labels."))


class StepWindow(Strict):
    """Optimiser steps (0-based): from ``first`` to ``last`` (both included, either may be left out), every ``every``-th
    step (``step % every == 0``); each bound an expression over the hyperparameters."""

    first: int | ExprStr | None = Field(None, description="The first step of the window (included); none: from step 0.")
    last: int | ExprStr | None = Field(None, description="The last step of the window (included); none: no end.")
    every: int | ExprStr = Field(1, description="Only the steps divisible by this (peft's deltaT), e.g. deltaT.")


_AT_DOC = ("When in the step it runs: after the optimiser step (before the gradients are cleared: the gradient of the "
           "step is still there) or before it (after the backward pass).")


class StateHook(_HookBase):
    """A persistent tensor of each unit (an exponential moving average of a statistic), zero when the adapter is applied
    and updated at the steps of ``when``, in the order of the ``training:`` list (a later one reads an earlier one's new value)."""

    kind: Literal["state"]
    name: Identifier = Field(description="The state's name: the hooks of the same module read each unit's value under it.")
    tensor: TensorRef = Field(description="'module.tensor': a trainable tensor, whole; the state has its shape, and `grad` is its gradient.")
    value: ExprStr = Field(description="The new value, from the previous one (its own name), `grad`, the module's tensors, its "
                           "states, the hyperparameters and the schedules, e.g. beta1 * s + (1 - beta1) * abs(A * grad).")
    when: list[StepWindow] = Field(default_factory=list, description="The steps it runs at: any of these windows (none: every step).")
    at: Literal["after_step", "before_step"] = Field("after_step", description=_AT_DOC)


class MaskHook(_HookBase):
    """Zeroes (or freezes) the entries of a tensor whose score is among the lowest over every unit of the module (a
    global budget): the scores of all units are ranked together, the ``active - keep`` lowest found (their largest is
    the threshold) and every entry scoring at most the threshold is set to zero, without gradient. The mask is kept
    and, at the steps of ``hold``, applied again. With ``effect: freeze`` the masked entries keep their values and stop
    training for good: from the mask on their gradient is zeroed before each optimiser step and their value restored
    after it (so no update, momentum or weight decay moves them, as for a parameter whose gradient is None), and later
    rankings rank only the entries still training."""

    kind: Literal["mask"]
    tensor: TensorRef = Field(description="'module.tensor': the tensor whose entries are zeroed, in every unit of the module.")
    score: ExprStr = Field(description="The importance of each ranked item, the tensor's shape or one that broadcasts to it (one "
                           "score for a block of entries, e.g. [K, 1, 1] for K slices), from the module's tensors, its states, the "
                           "hyperparameters and the schedules (e.g. a singular value's and its vectors' smoothed sensitivities).")
    keep: ExprStr = Field(description="How many ranked items stay, over all units together, from `total` (the score's entries over all "
                          "units), `active` (those not frozen: total unless the effect is freeze), `units` (their number), the "
                          "hyperparameters and the schedules, e.g. a budget schedule.")
    effect: Literal["zero", "freeze"] = Field("zero", description="What the mask does to the entries of the lowest scores: set them "
                                              "to zero (they keep training) or freeze them at their value for the rest of training.")
    also: dict[Identifier, ExprStr] = Field(default_factory=dict, description=(
        "Other tensors of the module the same decision applies to, each with its mask as an expression of `kept` (1 where "
        "the item stays, 0 where it is masked; the score's shape), the module's tensors and the hyperparameters, of a shape "
        "that broadcasts to that tensor, e.g. B: index_select(reshape(kept, (-1, 1)), 0, c) (the rows of each masked group)."))
    when: list[StepWindow] = Field(min_length=1, description="The steps at which it ranks the scores and zeroes (any of these windows).")
    hold: list[StepWindow] = Field(default_factory=list, description="The steps at which the last mask is applied again (any of these windows).")
    at: Literal["after_step", "before_step"] = Field("after_step", description=_AT_DOC)


TrainingHook = Annotated[Union[ScheduleHook, GradProjectionHook, AfterStepHook, AuxLossHook, StateHook, MaskHook], Field(discriminator="kind")]


TOKEN_LOSS_CALLS = ("input_type_mask",)
"""The per-token inputs of the model's call a token loss may read (``loss: call``)."""


class TokenLoss(Strict):
    """The model's causal LM loss replaced by a weighted mean over its labelled positions (``outputs.loss``).

    Over the whole sequence (the prepended positions, then the input's), each position has a type: ``prompt_types``
    at the prepended positions, ``input_types`` (from ``t``, the call's per-token input) at the input's. ``keep``
    (from ``type``) says where labels count: elsewhere they become -100; the prepended positions' labels are
    ``prompt_labels``. Every predicted position (all but the first) weighs ``weight`` (from its ``type`` and
    ``keep``, the tensors of the predicted positions, [batch, seq - 1]); the loss is the mean over the positions with a
    label of cross-entropy times weight (divided by their count, not by the weights' sum). ints hyperparameters are
    int64 tensors here. A call without labels keeps the model's own output."""

    description: str = Field("", description="What the weighting does.")
    call: Literal["input_type_mask"] = Field("input_type_mask", description=(
        "The call's per-token input read as `t` (int64 [batch, seq]; passed as model(..., input_type_mask=...)), "
        "taken out of the call's arguments."))
    default: int = Field(0, description="The value of `t` at every token of a call that gives none.")
    prompt_labels: ExprStr | None = Field(None, description=(
        "The labels of the prepended positions, one integer each, from the hyperparameters (none: ignored, -100)."))
    prompt_types: ExprStr | None = Field(None, description=(
        "The types of the prepended positions, from the hyperparameters (none: the technique prepends no positions)."))
    input_types: ExprStr = Field("t", description="The types of the input's positions, from `t` and the hyperparameters.")
    keep: ExprStr = Field(description="Where labels count (1) or not (0), from `type` and the hyperparameters.")
    weight: ExprStr = Field("1", description=(
        "Each predicted position's weight, from `type`, `keep` and the hyperparameters, e.g. "
        "decay ** distinct_above(type, keep) (an exponential decay over the examples, the last one weighing 1)."))

    def fields(self) -> dict[str, tuple[str, frozenset[str]]]:
        """Field -> (its expression, the names it reads besides the hyperparameters)."""
        out = {"input_types": (self.input_types, frozenset({"t"})), "keep": (self.keep, frozenset({"type"})),
               "weight": (self.weight, frozenset({"type", "keep"}))}
        for name in ("prompt_labels", "prompt_types"):
            text = getattr(self, name)
            if text is not None:
                out[name] = (text, frozenset())
        return out


class Technique(Strict):
    """A PEFT technique: the components it adds and how they meet the frozen Transformer."""

    id: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")] = Field(description="snake_case identifier; the file is <id>.yaml.")
    name: str = Field(description="Display name, as the paper writes it.")
    paper: Paper
    summary: str = Field("", description="One or two sentences on what the technique does.")
    original: bool = Field(False, description="True for techniques designed in pefref, implemented by no other library.")
    extends: list[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]] = Field(
        default_factory=list, description="Ids of catalog techniques this one builds on, as its paper says (drawn in the lineage graph with its `use:` reuse)."
    )
    hyperparameters: dict[Identifier, Hyperparameter] = Field(
        default_factory=dict,
        description=("Named, typed values the expressions read (users override them per use). Convention: the inner width of a "
                     "down/up pair (a low-rank update's rank, an adapter's bottleneck) is the width itself, named r (r_<part> for a "
                     "second one, e.g. r_adapter), never a reduction factor of the host width (He et al. 2022's r)."),
    )
    modules: list[Module] = Field(min_length=1)
    training: list[TrainingHook] = Field(
        default_factory=list,
        description=("Training-time behaviour beyond the forward pass, from a closed set of kinds: schedules over optimiser steps, "
                     "gradient projections, projections after each step, auxiliary losses, persistent state tensors and "
                     "masks from a global ranking of scores. Adapter.aux_loss, "
                     "before_optimizer_step and after_optimizer_step run them (pefref run and the Trainer callback call them)."),
    )
    loss: TokenLoss | None = Field(None, description=(
        "The model's causal LM loss replaced by a per-token weighting (the model forward's outputs.loss), labels of "
        "prepended positions included; none: the model's own loss."))
    identity_at_init: bool = Field(False, description="Whether the initialisation makes the adapted model equal the base model.")
    frozen: bool = Field(False, description=("True for a technique that trains nothing: every tensor it declares is fixed (e.g. a routing "
                                             "over a library of modules trained elsewhere, whose tensors are loaded before use). Without it, "
                                             "a technique with no trainable tensor is refused; with it, one that declares a trainable tensor is."))
    typology: dict[Literal[TYPOLOGY_PROPERTIES], str | list[str]] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Typology values declared where the structure cannot determine them (shown as declared)."
    )
    notes: str = Field("", description="Judgement calls and their justification.")

    @model_validator(mode="after")
    def _unique_modules(self) -> Technique:
        seen: set[str] = set()
        for m in self.modules:
            name = m.name if m.name else m.use.split(".")[1]  # type: ignore[union-attr]
            if name in seen:
                raise ValueError(f"module name {name!r} is used twice")
            seen.add(name)
        return self
