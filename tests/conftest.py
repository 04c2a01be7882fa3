"""Shared fixtures: the bundled catalog and tiny models of every family (built once, copied per test)."""

from __future__ import annotations

import copy
import functools
import random

import pytest
import torch

from pefref.language.catalog import default_catalog
from pefref.models.build import build_model

# Tests run in parallel workers (pytest -n 2 on 2 cores): one intra-op thread each, or the workers'
# OpenMP threads contend for the cores (an LSTM step then takes 700x longer).
torch.set_num_threads(1)

TINY = {
    "reference": "tiny-ref",
    "bert": "tiny-bert",
    "roberta": "tiny-roberta",
    "gpt2": "tiny-gpt2",
    "llama": "tiny-llama",
    "mistral": "tiny-mistral",
    "qwen2": "tiny-qwen2",
    "gpt_neox": "tiny-gpt-neox",
}
"""The test-size shape of each family."""


@pytest.fixture(autouse=True)
def _fixed_seeds() -> None:
    """Every test starts from the same random state, whichever tests ran before it in this worker."""
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def catalog():
    return default_catalog()


@functools.cache
def _base(shape: str) -> torch.nn.Module:
    return build_model(shape, seed=0)


def tiny_model(family: str) -> torch.nn.Module:
    """A fresh copy of the family's tiny model (random weights, eval mode)."""
    return copy.deepcopy(_base(TINY[family]))


def model_inputs(family: str, batch: int = 2, seq: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :2] = 0 if family in ("bert", "roberta") else 1  # padding on encoders
    return {"input_ids": ids, "attention_mask": mask}


def output_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if t is not None:
            return t
    raise AssertionError("model output has neither logits nor last_hidden_state")


@pytest.fixture(autouse=True)
def _random_calibration(request, monkeypatch) -> None:
    """Catalog-wide tests apply every technique without data: a technique initialised from calibration statistics
    gathers them on a few batches of random tokens there (tests marked ``given_calibration`` pass their own, or none)."""
    if request.node.get_closest_marker("given_calibration"):
        return
    from pefref.runtime import applying
    from pefref.runtime.calibration import random_batches

    real = applying.calibrate

    def calibrate(model, p, calibration):
        if calibration is None:
            calibration = random_batches(model, 2, seq=8)
        real(model, p, calibration)

    monkeypatch.setattr(applying, "calibrate", calibrate)


INVOKED = {"alora": "tokens"}
"""Techniques active only from an invocation (a token sequence in the input) on, and the hyperparameter naming it."""


def invoking(tid: str, ids: torch.Tensor) -> dict[str, list[int]]:
    """Hyperparameters that make a token of ``ids`` (the first row's fourth) invoke technique ``tid`` ({} for others)."""
    return {INVOKED[tid]: [int(ids[0, 3])]} if tid in INVOKED else {}
