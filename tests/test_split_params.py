"""Split parameters (``split: k``): one stored tensor per index of the leading dimensions, one value for expressions."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from pefref.language.catalog import default_catalog, load_techniques
from pefref.runtime.api import apply
from pefref.view.params import count_params
from tests.conftest import TINY, model_inputs, output_of, tiny_model

LOW_RANK = """\
# yaml-language-server: $schema=../schemas/technique.schema.json
id: {tid}
name: Low rank with a split down projection
paper: {{title: "LoRA: Low-Rank Adaptation of Large Language Models", authors: Hu et al., year: 2021, arxiv: "2106.09685"}}
hyperparameters:
  r: {{type: int, default: 3, min: 1}}
modules:
  - name: lr
    sites: [attn.q, attn.v]
    form: parallel
    params:
      A: {{shape: [r, d_in], init: "normal(std=0.5)"{split}, lr_scale: 2.0}}
      B: {{shape: [d_out, r], init: "normal(std=0.5)"}}
    compute: linear(linear(x, A), B)
    integrate: h + delta
"""


def _technique(tmp_path: Path, split: bool, host_update: bool = False):
    tid = "split_probe" if split else "whole_probe"
    p = tmp_path / f"{tid}.yaml"
    p.write_text(LOW_RANK.format(tid=tid, split=", split: 1" if split else "") + ("    host_update: W - 0.5 * B @ A\n" if host_update else ""),
                 encoding="utf-8")
    cat = default_catalog()
    loaded, _s, _p, problems = load_techniques([p], cat.reference, cat.techniques)
    assert not problems, "\n".join(map(str, problems))
    return loaded[tid]


def test_a_split_tensor_is_stored_per_piece_and_computes_what_the_whole_one_does(tmp_path: Path) -> None:
    """linear() and the host update take no pieces: they are stacked back, and the adapter computes exactly what
    the unsplit one does (same initial values: the initialiser fills the whole tensor, then it is split)."""
    whole, split = _technique(tmp_path, False, True), _technique(tmp_path, True, True)
    cat = default_catalog()
    shape = cat.shape(TINY["llama"])
    assert count_params(split, shape, cat).trainable == count_params(whole, shape, cat).trainable
    inputs = model_inputs("llama")
    outs, adapters = [], []
    for t in (whole, split):
        model = tiny_model("llama")
        torch.manual_seed(3)
        adapters.append(apply(model, t))
        outs.append(output_of(model, inputs))
    assert torch.equal(outs[0], outs[1])
    a_whole, a_split = adapters
    assert a_split.num_trainable() == a_whole.num_trainable()
    state = a_split.state_dict()
    r, d = next(v.shape for k, v in a_whole.state_dict().items() if k.endswith(".A"))
    key = next(k for k in a_whole.state_dict() if k.endswith(".A"))
    pieces = [f"{key}_{i}" for i in range(r)]
    assert all(k in state and state[k].shape == (d,) for k in pieces) and key not in state
    assert torch.equal(torch.stack([state[k] for k in pieces]), a_whole.state_dict()[key])
    # a piece trains with its tensor's declared settings
    scaled = {n for g in a_split.param_groups(lr=1.0) if g["lr"] == 2.0 for n in g["names"]}
    assert {k.rsplit(".", 1)[-1] for k in scaled} == {f"A_{i}" for i in range(r)}


def test_a_split_adapter_saves_loads_and_compiles_without_graph_breaks(tmp_path: Path) -> None:
    t = _technique(tmp_path, True)
    inputs = model_inputs("llama")
    m1, m2 = tiny_model("llama"), tiny_model("llama")
    torch.manual_seed(1)
    a1 = apply(m1, t)
    torch.manual_seed(2)
    a2 = apply(m2, t)
    a1.save(tmp_path / "split.safetensors")
    a2.load_state_dict(a1.state_dict())
    assert torch.equal(output_of(m1, inputs), output_of(m2, inputs))
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(m1)(**inputs)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons


def test_lstm_weights_are_torch_lstm_s_tensors_ordered_layer_by_layer() -> None:
    """p_tuning_lstm's split LSTM weights are the tensors torch.nn.LSTM holds, registered index by index
    (never two pieces of one tensor in a row), so that AdamW's per-tensor temporaries stay as small as peft's."""
    model = tiny_model("llama")
    adapter = apply(model, "p_tuning_lstm", hidden=8, lstm_layers=3)
    (unit,) = adapter.units.values()
    d = model.config.hidden_size
    ref = torch.nn.LSTM(d, 8, num_layers=3, bidirectional=True)
    mine = sorted(tuple(p.shape) for n, p in unit.named_parameters() if n[0] in "Wb" and n[1:3] in ("ih", "hh"))
    assert mine == sorted(tuple(p.shape) for p in ref.parameters())
    names = [n for n, _p in unit.named_parameters()]
    owner = type(unit).tensor_of
    pieces = [owner[n] for n in names if n in owner]
    assert len(pieces) == len(list(ref.parameters()))
    assert all(a != b for a, b in itertools.pairwise(pieces))
    assert names[:3] == ["E", "Wih_0", "Wih_rest_0_0"] and names[-4:] == ["W1", "b1", "W2", "b2"]


def test_a_split_tensor_reads_writes_and_merges_as_one(tmp_path: Path) -> None:
    from pefref.compiler.parts import read, write

    model = tiny_model("llama")
    adapter = apply(model, _technique(tmp_path, True))
    unit = next(iter(adapter.units.values()))
    assert type(unit).splits == {"A": (3,)}
    a = read(unit, "A")
    assert a.shape == (3, model.config.hidden_size)
    write(unit, "A", a.flip(0))
    assert torch.equal(read(unit, "A"), a.flip(0)) and torch.equal(unit.A_0, a[2])
    inputs = model_inputs("llama")
    with torch.no_grad():
        before = output_of(model, inputs)
        adapter.merge()
        assert (output_of(model, inputs) - before).abs().max().item() <= 1e-5
