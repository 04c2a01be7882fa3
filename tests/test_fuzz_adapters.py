"""Fuzzing the runtime: random sequences of adapter operations on a tiny model, with failures injected.

Operations: apply (valid, or with an invalid argument, an allocation budget too small, a failing
initialiser), merge, unmerge, remove, disable, load of a state or of a file (good, NaN, corrupt,
truncated), training steps, operations on removed handles, and any of them with a failure injected
in the middle (the k-th tensor write, ``requires_grad`` change or attribute change of its transaction
raises after it happened). Properties: no exception but a :class:`PefrefError` (no traceback); a
failed operation leaves the model exactly as a copy taken before it; after every adapter is removed
the base model equals the original bit for bit (values, requires_grad, forwards, hooks). Each case is
bounded in time; the counts (cases, operations, failures injected, failed operations) are printed
and a good share of operations must fail, so that the failure paths are what is fuzzed.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pefref.language.errors import PefrefError
from pefref.ops.inits import INITS
from pefref.runtime.api import apply

from .conftest import model_inputs, tiny_model
from .modelstate import assert_same_state, model_state

CASES = 30
TECHS = ["lora", "ia3", "bitfit", "pissa", "dora", "prefix_tuning", "oft"]
BAD_APPLY = [{"r": 0}, {"r": -2}, {"r": math.nan}, {"r": True}, {"r": 64}, {"zz": 1}, {"sites": ["no.such.site"]},
             {"layers": [99]}, {"alpha": math.inf}, {"r": "4"}]
RANK = ("lora", "pissa", "dora", "oft")

OPS = st.one_of(
    st.tuples(st.just("apply"), st.sampled_from(TECHS), st.integers(0, 9)),
    st.tuples(st.sampled_from(["apply_bad", "apply_budget", "apply_failing_init", "apply_same_name"]), st.sampled_from(TECHS), st.integers(0, 9)),
    st.tuples(st.sampled_from(["merge", "unmerge", "remove", "disable", "merge_in_disable", "train", "load_good", "load_nan",
                               "save_load", "load_corrupt", "dead"]), st.integers(0, 3), st.integers(0, 9)),
)
INJECT = st.one_of(st.none(), st.integers(1, 6))  # fail at the k-th change a transaction makes, or not at all

COUNTS = {"cases": 0, "operations": 0, "injected": 0, "failed operations": 0, "cpu seconds": 0.0}


@contextlib.contextmanager
def failing_after(k: int | None) -> Iterator[None]:
    """Make the ``k``-th change a :class:`Transaction` records (a write, a requires_grad, an attribute) raise after it is made."""
    if k is None:
        yield
        return
    from pefref.runtime.transaction import Transaction

    seen = [0]
    originals = {n: getattr(Transaction, n) for n in ("write", "set_requires_grad", "set_attr")}

    def wrap(name: str) -> Any:
        real = originals[name]

        def method(self: Any, *a: Any, **kw: Any) -> Any:
            out = real(self, *a, **kw)
            seen[0] += 1
            if seen[0] == k:
                raise RuntimeError(f"injected failure at change {k} ({name})")
            return out

        return method

    for n in originals:
        setattr(Transaction, n, wrap(n))
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(Transaction, n, f)


@contextlib.contextmanager
def failing_init() -> Iterator[None]:
    """Every initialiser but ``zeros`` raises (an initialiser that fails part way through apply)."""
    saved = dict(INITS)

    def boom(*a: Any, **kw: Any) -> Any:
        raise RuntimeError("injected initialiser failure")

    for k in INITS:
        if k != "zeros":
            INITS[k] = boom
    try:
        yield
    finally:
        INITS.clear()
        INITS.update(saved)


def _hps(tech: str, v: int) -> dict[str, Any]:
    return {"r": (1, 2, 4)[v % 3]} if tech in RANK else {}


def _corrupt(path: Path, v: int) -> None:
    data = path.read_bytes()
    if v % 3 == 0:
        path.write_bytes(data[: len(data) // 2])  # truncated
    elif v % 3 == 1:
        path.write_bytes(b"\x00garbage" * 7)
    else:
        path.write_bytes(data[:8] + b"{" + data[9:])  # a broken header


def _run_op(model: Any, inputs: dict[str, torch.Tensor], live: list[Any], dead: list[Any], op: str, arg: Any, v: int, n: int, tmp: Path) -> None:
    """One operation; raises PefrefError when it is refused or fails."""
    if op == "apply":
        live.append(apply(model, str(arg), name=f"a{n}", **_hps(str(arg), v)))
    elif op == "apply_bad":
        kw = dict(BAD_APPLY[v % len(BAD_APPLY)])
        if arg not in RANK:
            kw.pop("r", None)
            kw.setdefault("zz", 1)
        live.append(apply(model, str(arg), name=f"a{n}", **kw))
    elif op == "apply_budget":
        from pefref.language.limits import limits

        with limits(max_alloc_bytes=v):
            live.append(apply(model, str(arg), name=f"a{n}", **_hps(str(arg), v)))
    elif op == "apply_failing_init":
        with failing_init():
            live.append(apply(model, str(arg), name=f"a{n}", **_hps(str(arg), v)))
    elif op == "apply_same_name":
        name = live[v % len(live)].name if live else "x"
        live.append(apply(model, str(arg), name=name, **_hps(str(arg), v)))
    elif op == "dead":
        if not dead:
            return
        a = dead[v % len(dead)]
        [a.merge, a.unmerge, lambda: a.load_state_dict({}), lambda: a.disable().__enter__()][v % 4]()
    elif live:
        a = live[int(arg) % len(live)]
        if op == "merge":
            a.merge()
        elif op == "unmerge":
            a.unmerge()
        elif op == "remove":
            a.remove()
            live.remove(a)
            dead.append(a)
        elif op == "disable":
            with a.disable():
                model(**inputs)
        elif op == "merge_in_disable":
            with a.disable():
                a.merge()
        elif op == "train":
            with torch.no_grad():
                for p in a.trainable_parameters():
                    p.add_(0.01 * (v + 1))
        elif op in ("load_good", "load_nan"):
            state = {k: t.clone() for k, t in a.state_dict().items()}
            if op == "load_nan" and state:
                k = sorted(state)[v % len(state)]
                state[k] = torch.full_like(state[k], float("nan"))
            a.load_state_dict(state)
        elif op in ("save_load", "load_corrupt"):
            p = tmp / f"{a.name}-{n}.safetensors"
            a.save(p)
            if op == "load_corrupt":
                _corrupt(p, v)
            a.load(p)


@settings(deadline=None, max_examples=CASES, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
@given(ops=st.lists(st.tuples(OPS, INJECT), min_size=2, max_size=10))
def _sequences(ops: list[tuple[tuple[str, Any, int], int | None]]) -> None:
    c0 = time.process_time()  # reported (FUZZ_COUNTS), never asserted: a hang is caught by the test's timeout
    model = tiny_model("gpt2")
    inputs = model_inputs("gpt2", batch=1, seq=4)
    base = model_state(model)
    live: list[Any] = []
    dead: list[Any] = []
    COUNTS["cases"] += 1
    with tempfile.TemporaryDirectory() as d:
        for n, ((op, arg, v), k) in enumerate(ops):
            COUNTS["operations"] += 1
            before = model_state(model)
            n_live = len(live)
            try:
                with failing_after(k):
                    _run_op(model, inputs, live, dead, op, arg, v, n, Path(d))
            except PefrefError as e:
                COUNTS["failed operations"] += 1
                COUNTS["injected"] += "injected" in str(e)
                del live[n_live:]  # nothing was added
                assert_same_state(before, model_state(model))
                model(**inputs)  # the model still runs
    for a in reversed(live) if len(ops) % 2 else list(live):
        a.remove()
    assert_same_state(base, model_state(model))
    COUNTS["cpu seconds"] += time.process_time() - c0


@pytest.mark.timeout(600)  # a deadlock fails the test instead of hanging the suite; no time is asserted
def test_random_operation_sequences_with_injected_failures() -> None:
    _sequences()
    print("FUZZ_COUNTS", COUNTS)
    assert COUNTS["cases"] >= CASES // 2  # hypothesis ran the cases (it stops early only when it has exhausted them)
    assert COUNTS["failed operations"] >= 0.2 * COUNTS["operations"], COUNTS
    assert COUNTS["injected"] > 0, COUNTS


# --- failures the fuzzing found (kept as plain tests) ----------------------------------------------------


def test_failure_while_re_enabling_gives_back_the_model_as_before_the_block() -> None:
    # found by the fuzzing: a failure in the transaction that re-enables an adapter at the end of
    # disable() left it disabled for good (PiSSA's residual host weight stayed replaced by the base)
    model = tiny_model("gpt2")
    inputs = model_inputs("gpt2", batch=1, seq=4)
    a = apply(model, "pissa", r=2)
    before = model_state(model)
    out = model(**inputs).logits
    with failing_after(2), a.disable():  # change 1: the disable's flag; change 2: the re-enable's, at the block's end
        model(**inputs)
    assert a.enabled
    assert_same_state(before, model_state(model))
    assert torch.equal(model(**inputs).logits, out)
    a.remove()
