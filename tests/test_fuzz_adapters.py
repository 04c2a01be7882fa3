"""Fuzzing the runtime: random sequences of adapter operations on a tiny model.

Properties: a failed operation leaves the model exactly as a copy taken before it; after every
adapter is removed the base model equals the original bit for bit (values, requires_grad, forwards)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pefref.language.errors import PefrefError
from pefref.runtime.api import apply

from .conftest import model_inputs, tiny_model
from .modelstate import assert_same_state, model_state

FUZZ_COUNTS = {"sequences": 0, "operations": 0, "failed operations": 0}
TECHS = ["lora", "ia3", "bitfit", "pissa", "dora"]

OPS = st.one_of(
    st.tuples(st.just("apply"), st.sampled_from(TECHS), st.sampled_from([1, 2, 64, 0])),
    st.tuples(st.sampled_from(["merge", "unmerge", "remove", "disable", "load_bad", "load_good", "train"]), st.integers(0, 3), st.just(0)),
)


@settings(deadline=None, max_examples=15, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
@given(ops=st.lists(OPS, min_size=1, max_size=8))
def test_random_operation_sequences(ops: list[tuple[str, object, int]]) -> None:
    model = tiny_model("gpt2")
    inputs = model_inputs("gpt2", batch=1, seq=4)
    base = model_state(model)
    live: list = []
    FUZZ_COUNTS["sequences"] += 1
    for n, (op, arg, r) in enumerate(ops):
        FUZZ_COUNTS["operations"] += 1
        before = model_state(model)
        try:
            if op == "apply":
                hp = {"r": r} if arg in ("lora", "pissa", "dora") else {}
                live.append(apply(model, str(arg), name=f"a{n}", **hp))
            elif not live:
                continue
            else:
                a = live[int(arg) % len(live)]
                if op == "merge":
                    a.merge()
                elif op == "unmerge":
                    a.unmerge()
                elif op == "remove":
                    a.remove()
                    live.remove(a)
                elif op == "disable":
                    with a.disable():
                        model(**inputs)
                elif op == "load_bad":
                    state = {k: v.clone() for k, v in a.state_dict().items()}
                    k = sorted(state)[-1]
                    state[k] = torch.full_like(state[k], float("nan"))
                    a.load_state_dict(state)
                elif op == "load_good":
                    a.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
                elif op == "train":
                    with torch.no_grad():
                        for p in a.trainable_parameters():
                            p.add_(0.01)
        except PefrefError:
            FUZZ_COUNTS["failed operations"] += 1
            assert_same_state(before, model_state(model))
    for a in reversed(live) if len(ops) % 2 else list(live):
        a.remove()
    assert_same_state(base, model_state(model))


def test_report_fuzz_counts() -> None:
    print("FUZZ_COUNTS", FUZZ_COUNTS)
