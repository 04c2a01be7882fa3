"""Train and evaluate one run: AdamW over the trainable parameters, warmup and decay, clipping, accumulation,
mixed precision, periodic evaluation, early stopping, resumable checkpoints, DDP."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pefref.experiments.checkpoint import (
    load_state,
    load_tensors,
    rng_state,
    save_state,
    save_tensors,
    set_rng_state,
)
from pefref.experiments.compiled import compile_model, mark_dynamic, use_compile
from pefref.experiments.data import Examples, collate, epoch_order, grouped_order, load_examples
from pefref.experiments.distributed import (
    Dist,
    all_sum,
    any_true,
    broadcast,
    full_tensor,
    load_optimizer_state,
    local_shard,
    optimizer_state,
    shard,
    wrap,
)
from pefref.experiments.grid import RunSpec
from pefref.experiments.records import Records
from pefref.experiments.tasks import (
    Prepared,
    build_task_model,
    decay_groups,
    prepare_run,
)
from pefref.language.catalog import Catalog
from pefref.language.errors import PefrefError
from pefref.language.schema.experiment import DataSpec, TrainingSpec

__all__ = ["MAIN_METRIC", "RunEnv", "StopFlag", "classification_metrics", "train_run", "versions"]

MAIN_METRIC = {"sequence_classification": ("accuracy", True), "causal_lm": ("loss", False)}
"""Each task's main metric and whether higher is better."""


class StopFlag:
    """Set by Ctrl-C (SIGINT); training stops at the next step boundary after saving a checkpoint."""

    def __init__(self) -> None:
        self.requested = False

    def set(self, *_: Any) -> None:
        self.requested = True


@dataclass
class RunEnv:
    """What every run of one experiment shares."""

    root: Path
    out: Path
    data: DataSpec
    training: TrainingSpec
    catalog: Catalog
    records: Records | None
    dist: Dist = field(default_factory=Dist)
    stop: StopFlag = field(default_factory=StopFlag)
    progress: Callable[[int, int], None] | None = None
    on_step: Callable[[int], None] | None = None
    cache: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    from importlib import metadata

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "datasets", "pefref", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def classification_metrics(preds: list[int], labels: list[int], n_classes: int) -> dict[str, float]:
    """Accuracy and macro-averaged F1 (a class absent from both predictions and labels is left out)."""
    acc = sum(p == t for p, t in zip(preds, labels)) / max(len(labels), 1)
    f1s = []
    for c in range(n_classes):
        tp = sum(p == c and t == c for p, t in zip(preds, labels))
        fp = sum(p == c and t != c for p, t in zip(preds, labels))
        fn = sum(p != c and t == c for p, t in zip(preds, labels))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "f1": sum(f1s) / max(len(f1s), 1)}


def _device(training: TrainingSpec, d: Dist) -> str:
    if d.device.startswith("cuda"):
        return d.device
    if training.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return training.device


def _autocast(precision: str, device: str) -> tuple[Any, torch.dtype | None]:
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.split(":")[0], dtype=dtype)), dtype


def _schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        frac = (step - warmup) / max(total - warmup, 1)
        return max(0.0, 1.0 - frac) if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    return f


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    if not causal:
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    logits = logits[:, -labels.shape[1]:]  # modules that prepend positions leave them in front
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def _count(labels: torch.Tensor, causal: bool) -> int:
    return int((labels[:, 1:] != -100).sum()) if causal else int(labels.shape[0])


@torch.no_grad()
def evaluate(model: nn.Module, ex: Examples, pad_id: int, causal: bool, batch_size: int, device: str, autocast: Any) -> dict[str, float]:
    """Metrics on the evaluation set (every process computes them on all of it)."""
    was = model.training
    model.eval()
    preds: list[int] = []
    total, count = 0.0, 0
    order = sorted(range(len(ex)), key=lambda j: (-len(ex.ids[j]), j))  # similar lengths share a batch: little padding
    for i in range(0, len(ex), batch_size):
        b = {k: v.to(device) for k, v in collate(ex, order[i:i + batch_size], pad_id, causal).items()}
        with autocast():
            logits = _logits(model, b)
        total += float(_loss_sum(logits, b["labels"], causal))
        count += _count(b["labels"], causal)
        if not causal:
            preds += logits.argmax(-1).tolist()
    model.train(was)
    loss = total / max(count, 1)
    if causal:
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    assert ex.labels is not None
    labels = ex.labels
    return {"loss": loss, **classification_metrics(preds, [labels[j] for j in order], len(ex.label_names))}


class _SavedBytes:
    """Bytes of the activations autograd saves for backward (parameters excluded), counted once per storage."""

    def __init__(self, params: set[int]) -> None:
        self.params = params
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            s = t.untyped_storage()
            key = s.data_ptr()
            if key not in self.params and key not in self.seen:
                self.seen.add(key)
                self.bytes += s.nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
            pass
        return t


def _data(env: RunEnv, config: dict[str, Any], tok: Any) -> tuple[Examples, Examples]:
    key = repr((config["model"], config["task"]["max_length"]))
    if key not in env.cache:
        causal = config["task"]["type"] == "causal_lm"
        label = None if causal else env.data.label
        ml = config["task"]["max_length"]
        tr = load_examples(env.root / env.data.train, env.data.text, label, tok, ml, env.data.limit_train)
        ev = load_examples(env.root / env.data.eval, env.data.text, label, tok, ml, env.data.limit_eval, tr.label_names or None)
        env.cache[key] = (tr, ev)
    return env.cache[key]


def _label_count(env: RunEnv, config: dict[str, Any]) -> int:
    if config["task"]["type"] != "sequence_classification":
        return 0
    from pefref.experiments.data import read_table

    key = "labels"
    if key not in env.cache:
        env.cache[key] = len(set(map(str, read_table(env.root / env.data.train)[env.data.label])))
    return int(env.cache[key])


def train_run(spec: RunSpec, env: RunEnv) -> str:
    """Train one run to the end (or until stopped); returns its status: done, interrupted or stopped early (done)."""
    cfg, tr = spec.config, env.training
    d, rec = env.dist, env.records
    causal = cfg["task"]["type"] == "causal_lm"
    metric, higher = MAIN_METRIC[cfg["task"]["type"]]
    device = _device(tr, d)
    autocast, _ = _autocast(tr.precision, device)
    t_session = time.perf_counter()
    ckdir = env.out / "runs" / spec.id
    prev = rec.run(spec.id) if rec else None

    torch.manual_seed(spec.seed)
    model, tok = build_task_model(cfg["model"], cfg["task"]["type"], _label_count(env, cfg), env.catalog)
    prep: Prepared = prepare_run(model, cfg, env.root, env.catalog)
    fsdp = d.active and tr.distributed == "fsdp"
    if fsdp:
        _shard(model, prep, d)
    else:
        model.to(device)
    train_ex, eval_ex = _data(env, cfg, tok)

    B, A, W = tr.batch_size, tr.grad_accum, d.world
    if B % (A * W):
        raise PefrefError(f"batch_size {B} is not divisible by grad_accum × processes = {A * W}")
    spe = len(train_ex) // B
    if spe == 0:
        raise PefrefError(f"{len(train_ex)} training examples are fewer than one batch of {B}")
    total = tr.max_steps or math.ceil((tr.epochs or 1) * spe)
    eval_every = tr.eval_every or spe
    ck_every = tr.checkpoint_every or eval_every
    opt = torch.optim.AdamW(decay_groups(prep.adapters, prep.trainable, spec.lr, tr.weight_decay, prep.head, tr.head_lr), lr=spec.lr, betas=tr.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(tr.schedule, round(tr.warmup * total), total))
    params = list(prep.trainable.values())
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    state: dict[str, Any] = {"step": 0, "best": None, "best_step": None, "bad_evals": 0, "final": None, "wall": 0.0}
    # only rank 0 keeps the records: it decides, and every process resumes (or none does)
    if broadcast(bool(prev and prev["status"] != "done" and (ckdir / "state.pt").is_file()), d):
        prep.load_state(load_tensors(ckdir / "last.safetensors"))
        saved = load_state(ckdir / "state.pt")
        if fsdp:
            load_optimizer_state(model, opt, saved["optimizer"])
        else:
            opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        state = saved["progress"]
    if rec:
        rec.truncate_steps(spec.id, state["step"])
        rec.upsert(spec.id, experiment=cfg["experiment"], label=spec.label, technique=_technique_name(cfg, prep), seed=spec.seed, lr=spec.lr,
                   config=cfg, hyperparameters=prep.hyperparameters, status="running", step=state["step"], total_steps=total,
                   trainable=n_train, total_params=n_total, trainable_pct=100.0 * n_train / n_total, main_metric=metric,
                   world_size=W, device=device, versions=versions(), error=None, started=(prev or {}).get("started") or time.time())
    tb = _tensorboard(env, spec) if tr.tensorboard and d.main else None

    def better(m: dict[str, float]) -> bool:
        best = state["best"]
        return best is None or (m[metric] > best[metric] if higher else m[metric] < best[metric])

    def checkpoint(name: str = "last") -> None:
        if fsdp:  # evaluation (forward only) leaves the root's tensors gathered; shard them again first
            model.reshard()  # type: ignore[operator]
        tensors = {k: full_tensor(v) for k, v in prep.state().items()}  # under FSDP every process takes part
        optim = optimizer_state(model, opt) if fsdp and name == "last" else None  # FSDP: gathered on rank 0, by name
        if not d.main:
            return
        meta = {"run": spec.id, "label": spec.label, "step": state["step"], "hyperparameters": prep.hyperparameters}
        save_tensors(ckdir / f"{name}.safetensors", tensors, meta)
        if name == "last":
            save_state(ckdir / "state.pt", {"optimizer": optim if fsdp else opt.state_dict(), "scheduler": sched.state_dict(),
                                            "rng": rng_state(), "progress": dict(state)})

    ddp = model if fsdp else wrap(model, d)
    fwd = compile_model(ddp) if use_compile(tr.compile, device) else ddp  # the one place the step is compiled
    model.train()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    mem = 0
    rows = slice(d.rank * (B // W), (d.rank + 1) * (B // W))
    order: tuple[int, list[int]] = (-1, [])
    status = "done"
    stopped_early = False
    while state["step"] < total:
        step = state["step"]
        epoch, pos = divmod(step, spe)
        if order[0] != epoch:
            order = (epoch, grouped_order([len(x) for x in train_ex.ids], B, spec.seed, epoch) if tr.group_by_length
                     else epoch_order(len(train_ex), spec.seed, epoch))
        t0 = time.perf_counter()
        batch = collate(train_ex, order[1][pos * B:(pos + 1) * B], tok.pad_token_id, causal)
        count = _count(batch["labels"], causal)
        local = {k: v[rows].to(device) for k, v in batch.items()}
        mb = (B // W) // A
        loss_sum = 0.0
        saver = _SavedBytes({local_shard(p).untyped_storage().data_ptr() for p in model.parameters()}) if not times else None
        for i in range(A):
            micro = {k: v[i * mb:(i + 1) * mb] for k, v in local.items()}
            if fsdp:
                model.set_requires_gradient_sync(i == A - 1)  # type: ignore[operator]
            sync = contextlib.nullcontext() if (i == A - 1 or not d.active or fsdp) else ddp.no_sync()  # type: ignore[operator]
            hooks = torch.autograd.graph.saved_tensors_hooks(saver.pack, lambda t: t) if saver else contextlib.nullcontext()
            with sync:
                if fwd is not ddp:
                    mark_dynamic(micro)
                with hooks, autocast():
                    ls = _loss_sum(_logits(fwd, micro), micro["labels"], causal)
                (ls * W / count).backward()
            loss_sum += float(ls.detach())
        if tr.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        if saver is not None:
            mem = _tensor_memory(model, params, opt, saver.bytes)
        state["step"] = step + 1
        train_loss = all_sum(loss_sum, d) / count
        if rec and (state["step"] % tr.log_every == 0 or state["step"] == total):
            rec.log(spec.id, state["step"], "train", {"loss": train_loss, "lr": sched.get_last_lr()[0]})  # type: ignore[dict-item]
        if tb is not None:
            tb.add_scalar(f"{spec.label}/train_loss", train_loss, state["step"])
        if state["step"] % eval_every == 0 or state["step"] == total:
            m = evaluate(model, eval_ex, tok.pad_token_id, causal, tr.eval_batch_size or B, device, autocast)
            state["final"] = m
            if rec:
                rec.log(spec.id, state["step"], "eval", m)
            if tb is not None:
                for k, v in m.items():
                    tb.add_scalar(f"{spec.label}/eval_{k}", v, state["step"])
            if better(m):
                state.update(best=m, best_step=state["step"], bad_evals=0)
                checkpoint("best")
            else:
                state["bad_evals"] += 1
                stopped_early = tr.early_stopping is not None and state["bad_evals"] >= tr.early_stopping
        if env.progress:
            env.progress(state["step"], total)
        if env.on_step:
            env.on_step(state["step"])
        stop = any_true(env.stop.requested, d)
        if stopped_early or stop or state["step"] % ck_every == 0:
            state["wall"] = state.get("wall", 0.0) + time.perf_counter() - t_session
            t_session = time.perf_counter()
            checkpoint()
        if stop and state["step"] < total and not stopped_early:
            status = "interrupted"
            break
        if stopped_early:
            break
    if status == "done":
        state["wall"] = state.get("wall", 0.0) + time.perf_counter() - t_session
        checkpoint("adapter")
    if device.startswith("cuda"):
        mem, source = int(torch.cuda.max_memory_allocated(device)), "cuda"
    else:
        source = "tensors"
    skip = min(2, len(times) - 1) if times else 0
    step_time = sum(times[skip:]) / max(len(times) - skip, 1) if times else None
    if rec:
        fields: dict[str, Any] = {"status": status, "step": state["step"], "wall_time": state["wall"]}
        if status == "done":
            fields.update(final_metrics=state["final"], best_metrics=state["best"], best_step=state["best_step"], finished=time.time())
        if times:
            fields.update(step_time=step_time, peak_memory=mem or None, memory_source=source)
        rec.upsert(spec.id, **fields)
    if tb is not None:
        tb.close()
    return status


def _nbytes(t: torch.Tensor) -> int:
    t = local_shard(t)
    return t.numel() * t.element_size()


def _tensor_memory(model: nn.Module, params: list[nn.Parameter], opt: torch.optim.Optimizer, saved: int) -> int:
    """Training memory from the tensors that exist at a step's peak in this process: weights, gradients, optimizer state, saved activations."""
    weights = sum(_nbytes(p) for p in {id(p): p for p in model.parameters()}.values())
    grads = sum(_nbytes(p) for p in params)
    states = sum(_nbytes(t) for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return weights + grads + states + saved


def _shard(model: nn.Module, prep: Prepared, d: Dist) -> None:
    """FSDP2 on the task model; the run's trainable and head tensors are looked up again (sharding replaces them)."""
    if any(getattr(a, "selected", None) for a in prep.adapters):
        raise PefrefError("training.distributed: fsdp does not support techniques that unfreeze the base model's own tensors (select form) yet; use ddp")
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [k for k, p in prep.trainable.items() if id(p) not in names]
    if missing:
        raise PefrefError(f"training.distributed: fsdp needs every trained tensor inside the model; {missing[0]} is not")
    trainable = {k: names[id(p)] for k, p in prep.trainable.items()}
    head = {k: names[id(p)] for k, p in prep.head.items()}
    shard(model, d)
    prep.trainable = {k: model.get_parameter(n) for k, n in trainable.items()}
    prep.head = {k: model.get_parameter(n) for k, n in head.items()}


def _technique_name(cfg: dict[str, Any], prep: Prepared) -> str:
    if "baseline" in cfg:
        return str(cfg["baseline"])
    return "+".join(a.technique.id if hasattr(a, "technique") else a.name for a in prep.adapters)


_TB_WARNED: list[bool] = []


def _tensorboard(env: RunEnv, spec: RunSpec) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _TB_WARNED:
            _TB_WARNED.append(True)
            print("warning: training.tensorboard is set but tensorboard is not installed (pip install 'pefref[tensorboard]'); not logging to it", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(env.out / "tensorboard" / spec.id))
