"""The forward probe covers units reading the mask, prepend units (prompts, prefixes) and units reading connections.

Each technique here is built in Python (``Technique.model_validate``), which skips validate's shape
inference, so that only apply's probe stands between the unit and a failing forward: apply must refuse
it with a located error before the model changes.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import yaml

from pefref.language.errors import PefrefError
from pefref.language.schema import Technique
from pefref.runtime.api import apply

from .conftest import model_inputs, tiny_model
from .modelstate import assert_same_state, model_state

HEAD = """\
id: probe
name: Probe
paper: {title: t, authors: a, year: 2024, arxiv: "2401.00001"}
hyperparameters:
  r: {type: int, default: 4, min: 1}
  n: {type: int, default: 3, min: 1}
"""

BAD = {
    # the mask is [batch, seq]: unsqueezed at 0 it broadcasts against the sequence, not the width
    "mask": """\
    modules:
      - name: m
        sites: [attn.q]
        form: parallel
        params:
          A: {shape: [r, d_in], init: normal()}
          B: {shape: [d_out, r], init: normal()}
        compute: linear(linear(x, A), B) * unsqueeze(mask, 0)
        integrate: h + delta
    """,
    "tokens": """\
    modules:
      - name: m
        sites: [embed.output]
        form: prepend
        length: n
        params:
          P: {shape: [n, d + 1], init: normal()}
        tokens: P
    """,
    "tokens_length": """\
    modules:
      - name: m
        sites: [embed.output]
        form: prepend
        length: n + 1
        params:
          P: {shape: [n, d], init: normal()}
        tokens: P
    """,
    "prefix": """\
    modules:
      - name: m
        sites: [attn.kv]
        form: prepend
        length: n
        params:
          E: {shape: [n, 3], init: normal()}
        keys: E
        values: E
    """,
    # b reads a's output (width r) as if it were the hidden state (width d)
    "connection": """\
    modules:
      - name: a
        sites: [attn.q]
        form: parallel
        params:
          A: {shape: [r, d_in], init: normal()}
        compute: linear(x, A)
        integrate: h
      - name: b
        sites: [attn.v]
        form: parallel
        inputs:
          s: {module: a, site: attn.q}
        params:
          C: {shape: [d_out, d_in], init: zeros()}
        compute: linear(s, C)
        integrate: h + delta
    """,
}
WHAT = {"mask": r"integrate|broadcast|size", "tokens": r"tokens gives shape", "tokens_length": r"tokens gives shape",
        "prefix": r"keys gives shape", "connection": r"b at .*attn\.v"}


def _technique(body: str) -> Technique:
    return Technique.model_validate(yaml.safe_load(HEAD + textwrap.dedent(body)))


@pytest.mark.parametrize("case", sorted(BAD))
def test_probe_refuses_a_unit_that_would_fail_at_forward(case: str) -> None:
    model = tiny_model("llama")
    before = model_state(model)
    with pytest.raises(PefrefError, match=WHAT[case]):
        apply(model, _technique(BAD[case]))
    assert_same_state(before, model_state(model))
    model(**model_inputs("llama"))  # the model still runs


GOOD = {
    "mask": BAD["mask"].replace("unsqueeze(mask, 0)", "unsqueeze(mask, -1)"),
    "tokens": BAD["tokens"].replace("d + 1", "d"),
    "prefix": BAD["prefix"].replace("[n, 3]", "[n, kv_heads * d_head]"),
    "connection": BAD["connection"].replace("C: {shape: [d_out, d_in]", "C: {shape: [d_out, r]"),
}


@pytest.mark.parametrize("case", sorted(GOOD))
def test_probe_accepts_the_sound_version(case: str) -> None:
    model = tiny_model("llama")
    before = model_state(model)
    adapter = apply(model, _technique(GOOD[case]))
    out = model(**model_inputs("llama")).logits
    assert torch.isfinite(out).all()
    adapter.remove()
    assert_same_state(before, model_state(model))
