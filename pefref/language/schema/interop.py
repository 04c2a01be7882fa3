"""The correspondence between catalog techniques and peft's adapter format, as data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pefref.language.schema.common import Identifier, Strict
from pefref.language.schema.family import TASKS

__all__ = ["PeftModuleMap", "PeftMethod", "InteropTable"]


class PeftModuleMap(Strict):
    """How one module of a technique is stored by peft."""

    module: Identifier = Field(description="The technique's module (after `use:` expansion).")
    tensors: dict[Identifier, str] = Field(default_factory=dict, description="Per placement: the module's tensor -> peft's tensor name under the host module (e.g. A: lora_A.weight).")
    layout: dict[Identifier, Literal["column", "row", "vector"]] = Field(default_factory=dict, description="Tensors peft stores as a column [n, 1], a row [1, n] or a vector [n] (default: the same shape).")
    targets: list[str] = Field(default_factory=lambda: ["target_modules"], description="Config fields that list this module's host modules (the most specific set identifies the module on import).")
    computed: Literal["tokens", "prefix"] | None = Field(None, description="Prepend modules: peft stores what the module computes (virtual tokens [n, d], or per-layer keys and values [n, L*2*d_kv]) as 'prompt_embeddings', not its parameters.")


class PeftMethod(Strict):
    """One catalog technique and the peft method that computes the same function."""

    technique: Identifier = Field(description="Catalog technique id.")
    peft_type: str = Field(description="peft's PeftType value (adapter_config.json 'peft_type').")
    config: dict[str, bool | int | float | str | None] = Field(default_factory=dict, description="Fixed config values written on export and required on import (they tell techniques sharing a peft type apart).")
    hyperparameters: dict[str, Identifier] = Field(default_factory=dict, description="peft config field -> the technique's hyperparameter.")
    hosts: list[Literal["linear", "conv1d"]] = Field(default_factory=lambda: ["linear", "conv1d"], description="Host modules peft's method supports (nn.Linear; transformers' Conv1D as in GPT-2).")  # type: ignore[arg-type]
    conv1d_flag: str | None = Field(None, description="Config field set to whether the hosts are transformers Conv1D (peft's fan_in_fan_out).")
    modules: list[PeftModuleMap] = Field(min_length=1)
    export_only: bool = Field(False, description="Export exactly, but do not pick this technique on import (e.g. p-tuning's computed prompt reads back as prompt tuning).")
    notes: str = ""


class InteropTable(Strict):
    """The interop table (catalog/interop/peft.yaml)."""

    peft_version: str = Field(description="The peft version the table was checked against.")
    tasks: dict[Literal[TASKS], str | None] = Field(description="peft task_type for each model-class task.")  # type: ignore[valid-type]
    methods: list[PeftMethod]
