"""The correspondence between catalog techniques and peft's adapter format, as data."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from pefref.language.schema.common import SITE_PATTERN, ExprStr, Identifier, Int, Strict
from pefref.language.schema.family import TASKS

__all__ = ["PeftModuleMap", "PeftMethod", "InteropTable", "ShapeRef", "FusedForm", "RankMasks", "ResidualForm", "Scalar", "GroupedTensor",
           "ExpertFolders"]

Scalar = bool | int | float | str | None


class GroupedTensor(Strict):
    """A tensor peft stores as one piece per group of a placement (a ParameterList under the host module), where the
    technique keeps one tensor and an integer tensor of group labels."""

    labels: Identifier = Field(description="The module's integer tensor holding each row's group (groups 0 .. its largest value).")
    name: str = Field(pattern=r"\{group\}", description="peft's name of group k's piece under the host module, with '{group}' for k (e.g. adamss_B.{group}).")
    by: Literal["index", "rows"] = Field(description="'index': group k's piece is the tensor's slice [k]; 'rows': it is the tensor's rows labelled k, in order.")
    rank_dim: int | None = Field(None, ge=0, description="A dimension of the piece that peft cuts to the group's size where the group has fewer rows "
                                 "(a rank no larger than the group); the technique keeps it whole, the part past the cut zero.")


class PeftModuleMap(Strict):
    """How one module of a technique is stored by peft."""

    module: Identifier = Field(description="The technique's module (after `use:` expansion).")
    tensors: dict[Identifier, str] = Field(default_factory=dict, description="Per placement: the module's tensor -> peft's tensor name under the host module (e.g. A: lora_A.weight). For a module of form 'select', the keys are the host's own parameters it trains (weight, bias).")
    layout: dict[Identifier, Literal["column", "row", "vector", "batch"]] = Field(default_factory=dict, description="Tensors peft stores as a column [n, 1], a row [1, n], a vector [n] or with a leading dimension of one, [1, *shape] (one member of a per-task stack), instead of their own shape.")
    negate: list[Identifier] = Field(default_factory=list, description="Tensors peft stores with the opposite sign (its convention is the transpose of the technique's).")
    shared: dict[Identifier, str] = Field(default_factory=dict, description="Tensors shared by every placement, stored once under this full key (e.g. A: base_model.vera_A).")
    repeated: dict[Identifier, str] = Field(default_factory=dict, description="Tensors shared by every placement that peft nevertheless stores whole under each host module, under this name (e.g. A: randlora_A); on import every copy must be the same.")
    indexed: dict[Identifier, str] = Field(default_factory=dict, description="Per placement, stored outside the host module under this full key, where '{index}' is the placement's position among the module's hosts in the model's module order (e.g. v: 'base_model.tinylora_v.{index}').")
    targets: list[str] = Field(default_factory=lambda: ["target_modules"], description="Config fields that list this module's host modules (the most specific set identifies the module on import); sub.field names a field of a sub-config (e.g. use_bdlora.target_modules_bd_a).")
    computed: Literal["tokens", "prefix"] | None = Field(None, description="Prepend modules: peft stores what the module computes (virtual tokens [n, d], or per-layer keys and values [n, L*2*d_kv]) as 'prompt_embeddings', not its parameters.")
    pieces: dict[Literal["tokens", "keys", "values"], list[Identifier]] = Field(
        default_factory=dict, description="Computed prepend modules whose tokens, keys or values are these free tensors concatenated along the positions "
        "(e.g. frozen leading positions, then trained ones): peft's rows are split into them in order on import, and the module must then compute them back exactly.")
    under: Annotated[str, Field(pattern=SITE_PATTERN)] | None = Field(
        None, description="peft keeps the module's tensors under the module bound at this site in the same layer, not under its host "
        "(e.g. attn.block: the attention peft wraps, for a module attached to its output projection).")
    zeros: dict[str, list[Int | ExprStr]] = Field(
        default_factory=dict, description="peft tensors under the host module that hold constant zeros (buffers standing for a path the technique does not have), "
        "with their shapes over the host's d_in and d_out: written as zeros on export, and on import accepted only when all zero.")
    by_target: dict[Identifier, str] = Field(
        default_factory=dict, description="Tensors shared across the layers of a site (shared: layers) that peft stores once per projection under this "
        "full key, where '{target}' is peft's name of the projection: the host path's last two components joined by '_' (self_attn.q_proj: "
        "self_attn_q_proj; the last alone after a layer index; attention.output.dense: attention_output), e.g. V: 'base_model.frod_V.{target}'.")
    size_tensors: dict[str, list[Int | ExprStr]] = Field(
        default_factory=dict, description="Integer tensors of sizes that peft stores beside the module's, by full key ('{target}' as in by_target), "
        "with their values over the host's d_in and d_out (e.g. 'base_model.frod_s_size.{target}': [d_in, d_in]): written on export, checked on import.")
    grouped: dict[Identifier, GroupedTensor] = Field(
        default_factory=dict, description="Per placement, tensors peft stores as one piece per group of rows (see GroupedTensor).")


class ShapeRef(Strict):
    """A hyperparameter read off the shape of a stored tensor (e.g. OFT's number of blocks)."""

    module: Identifier = Field(description="The technique's module.")
    tensor: Identifier = Field(description="The module's tensor (its peft name comes from the module's map).")
    dim: int = Field(ge=0, description="The dimension whose size is the hyperparameter.")


class FusedForm(Strict):
    """How placements on slices of one fused projection are written as ONE block-structured peft module (LoRA family).

    The slices' down projections are stacked along the rank, their up projections are
    placed at the slice's output rows and their own rank columns (zero elsewhere), and
    the host's rank and alpha go into peft's per-module patterns so that the scaling stays
    exactly the technique's.
    """

    rank: str = Field(description="peft config field of the rank (r).")
    alpha: str = Field(description="peft config field of the scaling numerator (lora_alpha).")
    rank_pattern: str = Field("rank_pattern", description="peft's per-module rank field.")
    alpha_pattern: str = Field("alpha_pattern", description="peft's per-module alpha field.")
    alpha_growth: Literal["linear", "sqrt"] = Field(description="How alpha grows with k slices so the scaling is unchanged: alpha·k (scaling alpha/r) or alpha·sqrt(k) (scaling alpha/sqrt(r)).")
    tensors: dict[Identifier, Literal["stack", "block"]] = Field(description="'stack': the tensor's rows are the rank (concatenated); 'block': its rows are the slice's output features and its columns the rank.")


class RankMasks(Strict):
    """peft's per-module keep-masks over the rank (AdaLoRA's rank_pattern after budget allocation).

    On import the pruned ranks are put back as zeros (the function is unchanged: a pruned
    singular value is zero), so the adapter has the technique's full rank.
    """

    pattern: str = Field(description="Config field holding {module: [keep, ...]}.")
    dims: dict[Identifier, int] = Field(description="The module's tensor -> its rank dimension.")


class ResidualForm(Strict):
    """A low-rank adapter ``s·B·A`` (``s`` = alpha / rank) whose ``host_update`` rewrote each host weight to
    :math:`W_0 - s B_0 A_0` at apply (from calibration data peft cannot see again), written as peft's converted LoRA
    (``save_pretrained(path_initial_model_for_weight_conversion=...)``): on the original weights, of rank 2·rank and
    alpha 2·alpha (the same scaling), :math:`A' = [A; A_0]`, :math:`B' = [B, -B_0]`, so that
    :math:`W_0 + s B' A' = W_0 - s B_0 A_0 + s B A`. :math:`B_0 A_0` is read back as a rank-``rank`` factorisation
    (thin SVD) of the host's change :math:`W_0 - W_{res}` divided by ``s``. Such a file reads back as plain LoRA."""

    rank: str = Field("r", description="Config field holding the rank (doubled on export).")
    alpha: str = Field("lora_alpha", description="Config field holding alpha (doubled on export: alpha / rank is unchanged).")
    down: Identifier = Field(description="The module's down projection [rank, d_in] (A): the initial factor's rows are appended.")
    up: Identifier = Field(description="The module's up projection [d_out, rank] (B): the negated initial factor's columns are appended.")


class ExpertFolders(Strict):
    """A module whose experts peft keeps as adapters of their own, each in a folder of its own that a config field names
    (``{name: folder}``), read and written through another row of the table; the module's tensors are the experts'
    tensors joined along their first dimension, in the order of the mapping."""

    field: str = Field(description="Config field mapping each expert's name to its folder (e.g. 'adapters').")
    module: Identifier = Field(description="The technique's module holding the experts (its tensors in the row's map: the experts' names for them).")
    row: Identifier = Field(description="The technique whose interop row reads and writes one expert folder (a low-rank update's, say).")
    count: Identifier = Field(description="The technique's hyperparameter holding the number of experts.")
    join: dict[Identifier, Literal["rows", "stack"]] = Field(description="How each of the module's tensors joins the experts' own: 'rows': "
                                                             "concatenated along their first dimension; 'stack': along a new first dimension.")
    hyperparameters: dict[str, Identifier] = Field(description="An expert config field -> the technique's hyperparameter; every expert must have the same value.")
    targets: str = Field("target_modules", description="The expert config field listing its host modules (every expert must list the same).")
    folder: str = Field("experts/{index}", pattern=r"\{index\}", description="Where export writes expert i, relative to the adapter folder.")


class PeftMethod(Strict):
    """One catalog technique and the peft method that computes the same function."""

    technique: Identifier = Field(description="Catalog technique id.")
    peft_type: str = Field(description="peft's PeftType value (adapter_config.json 'peft_type').")
    config: dict[str, Scalar | list[Scalar] | dict[str, Scalar]] = Field(default_factory=dict, description="Fixed config values written on export and required on import (they tell techniques sharing a peft type apart); a list gives the values accepted on import, the first one written; a mapping is a sub-config (e.g. LoraConfig's kasa_config), written as given (peft fills in its defaults) and on import required to be set, with the values it lists.")
    written: dict[str, Scalar] = Field(default_factory=dict, description="Config values written on export and not checked on import (peft needs them to build its config).")
    hyperparameters: dict[str, Identifier] = Field(default_factory=dict, description="peft config field (sub.field inside a sub-config, e.g. use_bdlora.nblocks) -> the technique's hyperparameter.")
    when: dict[Identifier, Scalar] = Field(default_factory=dict, description="The row applies to adapters with these hyperparameter values (export), and sets them (import).")
    from_shapes: dict[Identifier, ShapeRef] = Field(default_factory=dict, description="Hyperparameters read off stored tensor shapes on import (they override the config's, which peft may leave at 0).")
    hosts: list[Literal["linear", "conv1d", "embedding", "block"]] = Field(default_factory=lambda: ["linear", "conv1d"], description="Host modules peft's method supports (nn.Linear; transformers' Conv1D as in GPT-2; nn.Embedding; block: any other module, e.g. a whole decoder block peft wraps).")  # type: ignore[arg-type]
    from_model: dict[Identifier, list[str]] = Field(default_factory=dict, description=(
        "Hyperparameters the model's config determines where peft reads them off the model (e.g. a norm's epsilon in a "
        "side network of the host's block class): config keys, the first present wins (a dotted key reads into a "
        "mapping, e.g. rope_parameters.rope_theta). On import they are set from the model; an export whose values differ "
        "from the model's is refused."))
    families: list[Identifier] = Field(default_factory=list, description=(
        "Convert only on models of these families (empty: every family), where peft's method builds part of the adapter "
        "from the host's own architecture (e.g. a side network of the host's block class) and the technique computes the same "
        "function on these families only."))
    bias_free: bool = Field(False, description="Convert only placements whose host has no bias (peft's method decomposes the bias with the weight, "
                            "which the technique does not): refused both ways on a host with one.")
    untied_only: bool = Field(False, description="Convert only on models whose output head does not share the input embedding's weight (peft "
                              "changes a tied head with the embedding, which the technique leaves alone): refused both ways on a tied model.")
    targets_by_name: bool = Field(False, description="Write each target as the module's name within its layer (e.g. self_attn.q_proj), one entry per site, "
                                  "instead of full paths: peft groups the modules one target entry matches and shares tensors within a group (e.g. up "
                                  "projections), so a tensor the technique shares across layers stays shared. A site placed on only some layers is refused.")
    top_layers: str | None = Field(
        None, description="Config field holding how many layers are adapted, counted from the last (peft's adapter_layers): written on export, "
        "where every module must sit on the last layers only; on import the modules are placed where the tensors are.")
    conv1d_flag: str | None = Field(None, description="Config field set to whether the hosts are transformers Conv1D (peft's fan_in_fan_out).")
    fused: FusedForm | None = Field(None, description="The block-structured form of placements on slices of a fused projection (null: such placements are refused).")
    rank_masks: RankMasks | None = Field(None, description="Per-module rank masks peft may save (read back with the pruned ranks as zeros).")
    residual: ResidualForm | None = Field(None, description="Export the host weights' rewrite at apply as peft's converted low-rank adapter of rank 2r on the original weights (export only: it reads back as the plain low-rank technique of that rank).")
    sizes: dict[str, Identifier] = Field(default_factory=dict, description="Config fields written with a size of the model on export (e.g. hidden_size: d).")
    experts: ExpertFolders | None = Field(None, description="A module whose experts peft keeps as adapters of their own in other folders (see ExpertFolders).")
    modules: list[PeftModuleMap] = Field(min_length=1)
    export_only: bool = Field(False, description="Export exactly, but do not pick this technique on import (e.g. p-tuning's computed prompt reads back as prompt tuning).")
    import_only: bool = Field(False, description="Read this peft form into the technique, but export the technique through its other row.")
    refused: str = Field("", description=("Non-empty: peft computes the technique with this form, but pefref does not convert it, for this "
                                          "reason. Import refuses a peft config the row matches (checked before the other rows, so the "
                                          "form is never read as another technique) and export refuses the technique, both with the reason."))
    notes: str = ""


class InteropTable(Strict):
    """The interop table (catalog/interop/peft.yaml)."""

    peft_version: str = Field(description="The peft version the table was checked against.")
    tasks: dict[Literal[TASKS], str | None] = Field(description="peft task_type for each model-class task.")  # type: ignore[valid-type]
    config_classes: dict[str, str] = Field(default_factory=dict, description="peft_type -> the name of peft's config class (for the config a reader copies, e.g. LORA: LoraConfig).")
    methods: list[PeftMethod]
