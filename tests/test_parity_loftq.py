"""LoftQ's parity with peft 0.21.2 (init_lora_weights 'loftq', LoftQConfig) on tiny Llama.

peft's ``loftq_init`` refuses to run without bitsandbytes and computes on "cuda" (or "xpu") unconditionally: it runs
here as tests/loftq_standin.py compiles it (on the CPU, bitsandbytes' NF4 and int8 round trips given by pefref's
primitives, which tests/test_quantise.py checks bit-exact against bitsandbytes and against peft's own loftq_init run
with it). Everything else (the alternating loop, peft's SVD split, where A, B and the quantised base go) is peft's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import peft
import peft.tuners.lora.layer as lora_layer
import pytest
import torch

from pefref.language.errors import PefrefError
from pefref.runtime.api import apply

from .loftq_standin import peft_loftq_init
from .parity import max_diff, padded_batch
from .test_parity_lora_family import base_model, host_paths, output, unit_key

TOL = 1e-5
R, ALPHA = 4, 8.0
SHAPE = "tiny-llama"


@pytest.fixture
def cpu_loftq(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(lora_layer, "loftq_init", peft_loftq_init())
    yield


@pytest.mark.parametrize(("bits", "iters"), [(4, 1), (4, 2), (8, 2)])
def test_loftq_matches_peft(bits: int, iters: int, cpu_loftq: None) -> None:
    paths = host_paths("loftq", SHAPE)
    hosts = {unit_key(*k): p for k, p in paths.items()}
    base = base_model(SHAPE)
    config = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=sorted(set(paths.values())), r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                             init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=bits, loftq_iter=iters))
    pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
    model = copy.deepcopy(base)
    adapter = apply(model, "loftq", r=R, alpha=ALPHA, bits=bits, iters=iters)
    assert set(adapter.units) == set(hosts)
    for key, path in hosts.items():  # the initialisation: A, B and the quantised host weight
        layer = pm.get_base_model().get_submodule(path)
        assert max_diff(adapter.units[key].A, layer.lora_A.default.weight) <= TOL, key
        assert max_diff(adapter.units[key].B, layer.lora_B.default.weight) <= TOL, key
        assert max_diff(model.get_submodule(path).weight, layer.base_layer.weight) <= TOL, path
        assert max_diff(model.get_submodule(path).weight, base.get_submodule(path).weight) > 1e-4  # the host was quantised
    inputs = padded_batch(SHAPE)
    with torch.no_grad():
        assert max_diff(output(model, "logits", inputs), output(pm, "logits", inputs)) <= TOL
        torch.manual_seed(1)
        for key, path in hosts.items():  # perturb the adapter's tensors (copied into peft's)
            layer = pm.get_base_model().get_submodule(path)
            for name, theirs in (("A", layer.lora_A.default.weight), ("B", layer.lora_B.default.weight)):
                mine = getattr(adapter.units[key], name)
                mine.add_(0.3 * torch.randn_like(mine))
                theirs.copy_(mine)
        got, want, plain = output(model, "logits", inputs), output(pm, "logits", inputs), output(base, "logits", inputs)
    assert max_diff(got, want) <= TOL
    assert max_diff(got, plain) > 1e-3  # the adapter changes the output
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert adapter.report.trainable == n_peft == sum(p.numel() for p in adapter.trainable_parameters())


def test_remove_restores_the_base_and_a_failed_apply_changes_nothing() -> None:
    base = base_model(SHAPE)
    model = copy.deepcopy(base)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    adapter = apply(model, "loftq", r=R, alpha=ALPHA, bits=8)
    assert any(not torch.equal(t, before[n]) for n, t in model.state_dict().items() if n in before)
    adapter.remove()
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    with pytest.raises(PefrefError):  # a rank above the smallest side of a weight: refused, nothing written
        apply(model, "loftq", r=10_000)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
