"""Train and evaluate one run: AdamW over the trainable parameters, warmup and decay, clipping, accumulation,
mixed precision, periodic evaluation, early stopping, resumable checkpoints, DDP."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
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
from pefref.experiments.data import Examples, calibration_batches, collate, epoch_order, grouped_order, load_examples
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
from pefref.experiments.evaluation import MAIN_METRIC, batch_count, batch_loss, evaluate, model_logits, with_token_loss
from pefref.experiments.grid import RunSpec
from pefref.experiments.memory import SavedBytes, tensor_memory
from pefref.experiments.records import Records
from pefref.experiments.tasks import (
    Prepared,
    build_task_model,
    decay_groups,
    prepare_run,
)
from pefref.language.catalog import Catalog
from pefref.language.errors import PefrefError
from pefref.language.schema.experiment import DataSpec, TaskSpec, TrainingSpec
from pefref.runtime.token_loss import token_loss_in
from pefref.runtime.training import after_step_of, aux_loss_of, before_step_of, hooks_state_of, load_hooks_state_of

__all__ = ["RunConfig", "RunEnv", "StopFlag", "TrainState", "train_run", "versions"]


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


@dataclass(frozen=True)
class RunConfig:
    """One run, typed: what training reads of its resolved configuration (:class:`RunSpec`) and the experiment's settings.

    ``config`` is the resolved configuration itself (its hash is ``id``), as the records keep it.
    """

    id: str
    label: str
    experiment: str
    seed: int
    lr: float
    model: dict[str, Any]  # the model as the configuration names it: shape, package, or checkpoint path and digest
    task: TaskSpec
    training: TrainingSpec
    baseline: str | None
    config: dict[str, Any] = field(repr=False)

    @staticmethod
    def of(spec: RunSpec, training: TrainingSpec) -> RunConfig:
        """The typed view of ``spec`` (its task validated again by the schema), trained with ``training``."""
        cfg = spec.config
        return RunConfig(spec.id, spec.label, str(cfg["experiment"]), spec.seed, spec.lr, dict(cfg["model"]),
                         TaskSpec.model_validate(cfg["task"]), training, cfg.get("baseline"), cfg)

    @property
    def causal(self) -> bool:
        return self.task.type == "causal_lm"

    @property
    def metric(self) -> str:
        """The task's main metric (:data:`MAIN_METRIC`)."""
        return MAIN_METRIC[self.task.type][0]

    @property
    def higher(self) -> bool:
        """Whether a higher main metric is better."""
        return MAIN_METRIC[self.task.type][1]


@dataclass
class TrainState:
    """A run's progress: saved with every resumable checkpoint (``state.pt``) and restored on resume."""

    step: int = 0
    best: dict[str, float] | None = None  # the metrics of the best evaluation so far
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    final: dict[str, float] | None = None  # the metrics of the latest evaluation
    wall: float = 0.0  # seconds of wall time over every session

    def saved(self) -> dict[str, Any]:
        """The progress as a checkpoint holds it (plain values: ``torch.load(weights_only=True)`` reads them)."""
        return asdict(self)

    @staticmethod
    def of(saved: dict[str, Any]) -> TrainState:
        """The progress of a checkpoint (:meth:`saved`)."""
        return TrainState(**saved)


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


def _data(env: RunEnv, cfg: RunConfig, tok: Any) -> tuple[Examples, Examples]:
    key = repr((cfg.model, cfg.task.max_length))
    if key not in env.cache:
        label = None if cfg.causal else env.data.label
        ml = cfg.task.max_length
        tr = load_examples(env.root / env.data.train, env.data.text, label, tok, ml, env.data.limit_train)
        ev = load_examples(env.root / env.data.eval, env.data.text, label, tok, ml, env.data.limit_eval, tr.label_names or None)
        env.cache[key] = (tr, ev)
    return env.cache[key]


def _label_count(env: RunEnv, cfg: RunConfig) -> int:
    if cfg.task.type != "sequence_classification":
        return 0
    from pefref.experiments.data import read_table

    key = "labels"
    if key not in env.cache:
        env.cache[key] = len(set(map(str, read_table(env.root / env.data.train)[env.data.label])))
    return int(env.cache[key])


@dataclass
class _Run:
    """What :func:`_setup` builds for one run: the model and what it trains, data, optimizer, schedule, lengths."""

    cfg: RunConfig
    env: RunEnv
    device: str
    autocast: Callable[[], Any]
    model: nn.Module
    tok: Any
    prep: Prepared
    fsdp: bool
    train_ex: Examples
    eval_ex: Examples
    steps_per_epoch: int
    total: int
    eval_every: int
    checkpoint_every: int
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    params: list[nn.Parameter]
    folder: Path  # the run's checkpoints
    previous: dict[str, Any] | None  # the run's record from an earlier session (rank 0)
    clock: float  # when this session's share of the wall time started

    @property
    def dist(self) -> Dist:
        return self.env.dist


@dataclass
class _Loop:
    """What the training loop carries from step to step in this session (a resumed run starts it afresh)."""

    ddp: nn.Module  # the model as the step calls it (wrapped by DDP; itself under FSDP or in one process)
    tb: Any
    fwd: nn.Module  # what the step's forward calls: ``ddp``, or ``ddp`` compiled (training.compile)
    rows: slice  # this process's rows of each global batch
    times: list[float] = field(default_factory=list)
    memory: int = 0
    epoch: int = -1  # the epoch ``order`` belongs to
    order: list[int] = field(default_factory=list)


def train_run(spec: RunSpec, env: RunEnv) -> str:
    """Train one run to the end (or until stopped); returns its status: done, interrupted or stopped early (done).

    Setup builds the model, data and optimizer; a run interrupted before resumes
    from its last checkpoint; each optimizer step may evaluate (keeping the best
    adapter, counting evaluations without improvement) and write a resumable
    checkpoint; the end records the metrics and costs.
    """
    run = _setup(RunConfig.of(spec, env.training), env)
    state = _resume(run)
    loop = _start(run, state)
    status = "done"
    while state.step < run.total:
        _train_step(run, loop, state)
        due = state.step % run.eval_every == 0 or state.step == run.total
        stopped_early = _evaluate_run(run, loop, state) if due else False
        if env.progress:
            env.progress(state.step, run.total)
        if env.on_step:
            env.on_step(state.step)
        stop = any_true(env.stop.requested, run.dist)
        if stopped_early or stop or state.step % run.checkpoint_every == 0:
            _add_wall(run, state)
            _checkpoint(run, state)
        if stop and state.step < run.total and not stopped_early:
            status = "interrupted"
            break
        if stopped_early:
            break
    return _finish(run, loop, state, status)


def _setup(cfg: RunConfig, env: RunEnv) -> _Run:
    """The seeded task model with the run's techniques applied (sharded or on its device), data, optimizer, schedule."""
    tr, d = cfg.training, env.dist
    device = _device(tr, d)
    autocast, _ = _autocast(tr.precision, device)
    clock = time.perf_counter()
    previous = env.records.run(cfg.id) if env.records else None
    torch.manual_seed(cfg.seed)
    model, tok = build_task_model(cfg.model, cfg.task.type, _label_count(env, cfg), env.catalog)
    train_ex, eval_ex = _data(env, cfg, tok)
    prep: Prepared = prepare_run(model, cfg.config, env.root, env.catalog, _calibration(cfg, train_ex, tok))
    fsdp = d.active and tr.distributed == "fsdp"
    if fsdp:
        _shard(model, prep, d)
    else:
        model.to(device)

    B, A, W = tr.batch_size, tr.grad_accum, d.world
    if B % (A * W):
        raise PefrefError(f"batch_size {B} is not divisible by grad_accum × processes = {A * W}")
    spe = len(train_ex) // B
    if spe == 0:
        raise PefrefError(f"{len(train_ex)} training examples are fewer than one batch of {B}")
    total = tr.max_steps or math.ceil((tr.epochs or 1) * spe)
    eval_every = tr.eval_every or spe
    opt = torch.optim.AdamW(decay_groups(prep.adapters, prep.trainable, cfg.lr, tr.weight_decay, prep.head, tr.head_lr), lr=cfg.lr, betas=tr.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(tr.schedule, round(tr.warmup * total), total))
    return _Run(cfg, env, device, autocast, model, tok, prep, fsdp, train_ex, eval_ex, spe, total, eval_every,
                tr.checkpoint_every or eval_every, opt, sched, list(prep.trainable.values()), env.out / "runs" / cfg.id, previous, clock)


def _calibration(cfg: RunConfig, train_ex: Examples, tok: Any) -> Callable[[nn.Module], list[dict[str, torch.Tensor]]] | None:
    """The experiment's calibration batches (``calibration:``), made for the module a technique is applied to: labels
    only where its forward takes them (a loss to differentiate). None without the section."""
    spec = cfg.config.get("calibration")
    if spec is None:
        return None

    def make(target: nn.Module) -> list[dict[str, torch.Tensor]]:
        import inspect

        keep = {"input_ids", "attention_mask"} | ({"labels"} if "labels" in inspect.signature(target.forward).parameters else set())
        return calibration_batches(train_ex, spec["batches"], spec["batch_size"], tok.pad_token_id, keep)

    return make


def _resume(run: _Run) -> TrainState:
    """The run's progress: restored with the adapter, optimizer, schedule and RNG from the last checkpoint of an
    unfinished run, else a fresh start. Only rank 0 keeps the records: it decides, and every process resumes (or none does)."""
    prev = run.previous
    if not broadcast(bool(prev and prev["status"] != "done" and (run.folder / "state.pt").is_file()), run.dist):
        return TrainState()
    try:  # both files read and checked before anything is restored: a damaged checkpoint restarts the run
        tensors, saved = load_tensors(run.folder / "last.safetensors"), load_state(run.folder / "state.pt")
        if not isinstance(saved, dict) or not {"optimizer", "scheduler", "rng", "progress"} <= set(saved):
            raise ValueError("state.pt lacks the optimizer, schedule, random or progress state")
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"warning: run {run.cfg.id}: its last checkpoint in {run.folder} is damaged ({type(e).__name__}: {reason}); "
              "restarting it from scratch", file=sys.stderr)
        return TrainState()
    run.prep.load_state(tensors)
    if run.fsdp:
        load_optimizer_state(run.model, run.opt, saved["optimizer"])
    else:
        run.opt.load_state_dict(saved["optimizer"])
    run.sched.load_state_dict(saved["scheduler"])
    load_hooks_state_of(run.prep.adapters, saved.get("hooks", []))  # training hooks' states and masks (AdaLoRA's EMAs)
    set_rng_state(saved["rng"])
    return TrainState.of(saved["progress"])


def _start(run: _Run, state: TrainState) -> _Loop:
    """Record the run as running (its configuration, sizes, versions), open TensorBoard, wrap the model for DDP."""
    cfg, d, rec = run.cfg, run.dist, run.env.records
    if rec:
        n_train = sum(p.numel() for p in run.params)
        n_total = sum(p.numel() for p in {id(p): p for p in run.model.parameters()}.values())
        rec.truncate_steps(cfg.id, state.step)
        rec.upsert(cfg.id, experiment=cfg.experiment, label=cfg.label, technique=_technique_name(cfg, run.prep), seed=cfg.seed, lr=cfg.lr,
                   config=cfg.config, hyperparameters=run.prep.hyperparameters, status="running", step=state.step, total_steps=run.total,
                   trainable=n_train, total_params=n_total, trainable_pct=100.0 * n_train / n_total, main_metric=cfg.metric,
                   world_size=d.world, device=run.device, versions=versions(), error=None, started=(run.previous or {}).get("started") or time.time())
    tb = _tensorboard(run.env, cfg) if cfg.training.tensorboard and d.main else None
    ddp = run.model if run.fsdp else wrap(run.model, d)
    fwd = compile_model(ddp) if use_compile(cfg.training.compile, run.device) else ddp  # the one place the step is compiled
    run.model.train()
    if run.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(run.device)
    per = cfg.training.batch_size // d.world
    return _Loop(ddp, tb, fwd, slice(d.rank * per, (d.rank + 1) * per))


def _train_step(run: _Run, loop: _Loop, state: TrainState) -> None:
    """One optimizer step over the next global batch (accumulated in micro-batches), clipped; logs the training loss."""
    cfg, tr, d = run.cfg, run.cfg.training, run.dist
    B, A, W = tr.batch_size, tr.grad_accum, d.world
    epoch, pos = divmod(state.step, run.steps_per_epoch)
    if loop.epoch != epoch:
        loop.epoch = epoch
        loop.order = (grouped_order([len(x) for x in run.train_ex.ids], B, cfg.seed, epoch) if tr.group_by_length
                      else epoch_order(len(run.train_ex), cfg.seed, epoch))
    t0 = time.perf_counter()
    batch = collate(run.train_ex, loop.order[pos * B:(pos + 1) * B], run.tok.pad_token_id, cfg.causal)
    batch = with_token_loss(batch, token_loss_in(run.prep.adapters) if cfg.causal else None)  # a technique's loss: targets, weights
    count = batch_count(batch, cfg.causal)
    local = {k: v[loop.rows].to(run.device) for k, v in batch.items()}
    mb = (B // W) // A
    summed = 0.0
    saver = SavedBytes({local_shard(p).untyped_storage().data_ptr() for p in run.model.parameters()}) if not loop.times else None
    for i in range(A):
        micro = {k: v[i * mb:(i + 1) * mb] for k, v in local.items()}
        if run.fsdp:
            run.model.set_requires_gradient_sync(i == A - 1)  # type: ignore[operator]
        sync = contextlib.nullcontext() if (i == A - 1 or not d.active or run.fsdp) else loop.ddp.no_sync()  # type: ignore[operator]
        hooks = torch.autograd.graph.saved_tensors_hooks(saver.pack, lambda t: t) if saver else contextlib.nullcontext()
        with sync:
            if loop.fwd is not loop.ddp:
                mark_dynamic(micro)
            with hooks, run.autocast():
                ls = batch_loss(model_logits(loop.fwd, micro), micro, cfg.causal)
            (ls * W / count + aux_loss_of(run.prep.adapters) / A).backward()  # the techniques' auxiliary losses, once per step
        summed += float(ls.detach())
    if tr.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(run.params, tr.max_grad_norm)
    before_step_of(run.prep.adapters, state.step)  # training hooks: schedules, gradient projections (after clipping, as Trainer's on_pre_optimizer_step)
    run.opt.step()
    after_step_of(run.prep.adapters, state.step)  # training hooks: after-step projections
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    loop.times.append(time.perf_counter() - t0)
    if saver is not None:
        loop.memory = tensor_memory(run.model, run.params, run.opt, saver.bytes)
    state.step += 1
    train_loss = all_sum(summed, d) / count
    if run.env.records and (state.step % tr.log_every == 0 or state.step == run.total):
        run.env.records.log(cfg.id, state.step, "train", {"loss": train_loss, "lr": run.sched.get_last_lr()[0]})  # type: ignore[dict-item]
    if loop.tb is not None:
        loop.tb.add_scalar(f"{cfg.label}/train_loss", train_loss, state.step)


def _evaluate_run(run: _Run, loop: _Loop, state: TrainState) -> bool:
    """Evaluate, log, keep the best adapter (checkpoint ``best``); True when early stopping ends the run here."""
    cfg, tr = run.cfg, run.cfg.training
    m = evaluate(run.model, run.eval_ex, run.tok.pad_token_id, cfg.causal, tr.eval_batch_size or tr.batch_size, run.device, run.autocast,
                 token_loss_in(run.prep.adapters) if cfg.causal else None)
    state.final = m
    if run.env.records:
        run.env.records.log(cfg.id, state.step, "eval", m)
    if loop.tb is not None:
        for k, v in m.items():
            loop.tb.add_scalar(f"{cfg.label}/eval_{k}", v, state.step)
    if state.best is None or (m[cfg.metric] > state.best[cfg.metric] if cfg.higher else m[cfg.metric] < state.best[cfg.metric]):
        state.best, state.best_step, state.bad_evals = m, state.step, 0
        _checkpoint(run, state, "best")
        return False
    state.bad_evals += 1
    return tr.early_stopping is not None and state.bad_evals >= tr.early_stopping


def _add_wall(run: _Run, state: TrainState) -> None:
    """Add this session's wall time since the last checkpoint to the run's."""
    now = time.perf_counter()
    state.wall += now - run.clock
    run.clock = now


def _checkpoint(run: _Run, state: TrainState, name: str = "last") -> None:
    """Write the run's tensors as ``name.safetensors`` (on rank 0); ``last`` also saves what resuming needs."""
    if run.fsdp:  # evaluation (forward only) leaves the root's tensors gathered; shard them again first
        run.model.reshard()  # type: ignore[operator]
    tensors = {k: full_tensor(v) for k, v in run.prep.state().items()}  # under FSDP every process takes part
    optim = optimizer_state(run.model, run.opt) if run.fsdp and name == "last" else None  # FSDP: gathered on rank 0, by name
    if not run.dist.main:
        return
    meta = {"run": run.cfg.id, "label": run.cfg.label, "step": state.step, "hyperparameters": run.prep.hyperparameters}
    save_tensors(run.folder / f"{name}.safetensors", tensors, meta)
    if name == "last":
        save_state(run.folder / "state.pt", {"optimizer": optim if run.fsdp else run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                                             "rng": rng_state(), "progress": state.saved(), "hooks": hooks_state_of(run.prep.adapters)})


def _finish(run: _Run, loop: _Loop, state: TrainState, status: str) -> str:
    """Save the finished adapter, record the status, metrics, step time and memory; returns ``status``."""
    if status == "done":
        _add_wall(run, state)
        _checkpoint(run, state, "adapter")
    mem = loop.memory
    if run.device.startswith("cuda"):
        mem, source = int(torch.cuda.max_memory_allocated(run.device)), "cuda"
    else:
        source = "tensors"
    times = loop.times
    skip = min(2, len(times) - 1) if times else 0
    step_time = sum(times[skip:]) / max(len(times) - skip, 1) if times else None
    if run.env.records:
        fields: dict[str, Any] = {"status": status, "step": state.step, "wall_time": state.wall}
        if status == "done":
            fields.update(final_metrics=state.final, best_metrics=state.best, best_step=state.best_step, finished=time.time())
        if times:
            fields.update(step_time=step_time, peak_memory=mem or None, memory_source=source)
        run.env.records.upsert(run.cfg.id, **fields)
    if loop.tb is not None:
        loop.tb.close()
    return status


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


def _technique_name(cfg: RunConfig, prep: Prepared) -> str:
    if cfg.baseline is not None:
        return cfg.baseline
    return "+".join(a.technique.id if hasattr(a, "technique") else a.name for a in prep.adapters)


_TB_WARNED: list[bool] = []


def _tensorboard(env: RunEnv, cfg: RunConfig) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _TB_WARNED:
            _TB_WARNED.append(True)
            print("warning: training.tensorboard is set but tensorboard is not installed (pip install 'pefref[tensorboard]'); not logging to it", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(env.out / "tensorboard" / cfg.id))
