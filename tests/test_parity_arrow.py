"""Numerical parity with HF peft 0.21.2 for Arrow routing (LoraConfig(arrow_config=ArrowConfig(...)), create_arrow_model).

peft's Arrow model is built the way its documentation builds it: E LoRA experts
(perturbed, so no factor sits at its initial value) are saved with
``save_pretrained`` and loaded by ``create_arrow_model`` (GenKnowSub: with
general adapters as well); the same experts' tensors are copied into pefref's
arrow (arrow_gks) technique, stacked. On tiny Llama, Qwen2 and BERT, fp32,
eval mode, checked per case:

* outputs agree within 1e-5 and differ from the base model's;
* trainable counts: pefref trains nothing; peft's only trainable tensors are
  its router adapter's own lora_A and lora_B, which its forward pass never
  reads (the output does not depend on them: it carries no gradient);
* the routing matters: the same experts averaged with equal weights (k = E and
  a temperature so high that the softmax is flat) give a different output.

The prototypes' power iteration starts from the same seeded vector as peft's
(rng_seed = the technique's seed), so they agree whether or not it has converged.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn

from pefref.runtime.api import Adapter, apply

from .parity import max_diff, padded_batch
from .test_parity_lora_family import OUTPUT, TASK, base_model, family_of, host_paths, output, unit_key

TOL = 1e-5
SHAPES = ["tiny-llama", "tiny-qwen2", "tiny-bert"]
E, G, R, ALPHA = 4, 2, 4, 8.0
ROUTING = {"k": 2, "temperature": 0.7, "seed": 3}


def _expert(base: nn.Module, task: str, targets: list[str], seed: int, directory: Path) -> str:
    """A LoRA on ``targets`` with every factor perturbed (B too), saved in peft's format; its path."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type=task, target_modules=targets, r=R, lora_alpha=ALPHA, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(directory))
    return str(directory)


@functools.cache
def experts(shape: str) -> tuple[list[str], list[str]]:
    """Paths of E task experts and G general experts for ``shape`` (saved once per session)."""
    paths = host_paths("arrow", shape)
    targets = sorted(set(paths.values()))
    root = Path(tempfile.mkdtemp(prefix="pefref-arrow-"))
    base, task = base_model(shape), TASK[family_of(shape)]
    tasks = [_expert(base, task, targets, 100 + i, root / f"task{i}") for i in range(E)]
    general = [_expert(base, task, targets, 200 + i, root / f"general{i}") for i in range(G)]
    return tasks, general


def peft_arrow(shape: str, gks: bool, **routing: Any) -> Any:
    tasks, general = experts(shape)
    cfg = peft.ArrowConfig(top_k=routing["k"], router_temperature=routing["temperature"], rng_seed=routing["seed"], use_gks=gks)
    return peft.create_arrow_model(copy.deepcopy(base_model(shape)), tasks, cfg, general_adapter_paths=general if gks else None).eval()


def _lora(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


def _factors(paths: list[str], host: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' A stacked along the rank ([n·r, d_in]) and B stacked ([n, d_out, r]) at ``host``, as saved."""
    states = [_lora(p) for p in paths]
    a = [next(v for k, v in s.items() if k.endswith(f"{host}.lora_A.weight")) for s in states]
    b = [next(v for k, v in s.items() if k.endswith(f"{host}.lora_B.weight")) for s in states]
    return torch.cat(a, 0), torch.stack(b, 0)


def pefref_arrow(shape: str, gks: bool, **routing: Any) -> tuple[nn.Module, Adapter]:
    """pefref's arrow (arrow_gks) with the saved experts' tensors copied in."""
    tid = "arrow_gks" if gks else "arrow"
    tasks, general = experts(shape)
    model = copy.deepcopy(base_model(shape))
    hps = {"E": E, "r": R, "alpha": ALPHA, **routing, **({"G": G} if gks else {})}
    adapter = apply(model, tid, **hps)
    for (module, site, layer), path in host_paths(tid, shape).items():
        unit = adapter.units[unit_key(module, site, layer)]
        with torch.no_grad():
            a, b = _factors(tasks, path)
            unit.A.copy_(a)
            unit.B.copy_(b)
            if gks:
                ga, gb = _factors(general, path)
                unit.GA.copy_(ga)
                unit.GB.copy_(gb)
    return model.eval(), adapter


@pytest.mark.parametrize("gks", [False, True], ids=["arrow", "gks"])
@pytest.mark.parametrize("shape", SHAPES)
def test_outputs_and_counts_match_peft(shape: str, gks: bool) -> None:
    inputs = padded_batch(shape)
    key = OUTPUT[family_of(shape)]
    theirs_model = peft_arrow(shape, gks, **ROUTING)
    model, adapter = pefref_arrow(shape, gks, **ROUTING)
    want = output(theirs_model, key, inputs)  # with autograd on: shows which of peft's tensors the output reads
    with torch.no_grad():
        got = output(model, key, inputs)
        base = output(base_model(shape), key, inputs)
    assert max_diff(got, want.detach()) <= TOL
    assert max_diff(base, want.detach()) > 1e-3  # the experts change the model: the comparison is not vacuous

    assert adapter.report.trainable == 0 and not adapter.trainable_parameters()
    dead = [n for n, p in theirs_model.named_parameters() if p.requires_grad]
    assert dead and all(".arrow_router." in n for n in dead)  # peft's router LoRA: trainable, ...
    assert not want.requires_grad  # ... but never read: nothing the output depends on trains, as in pefref


@pytest.mark.parametrize("shape", SHAPES)
def test_routing_differs_from_a_plain_average(shape: str) -> None:
    """Top-k routing by the prototypes is not the experts' plain average (k = E, a flat softmax), which peft computes too."""
    inputs = padded_batch(shape)
    key = OUTPUT[family_of(shape)]
    flat = {"k": E, "temperature": 1e9, "seed": 3}
    routed, _ = pefref_arrow(shape, False, **ROUTING)
    averaged, _ = pefref_arrow(shape, False, **flat)
    with torch.no_grad():
        got_routed, got_average = output(routed, key, inputs), output(averaged, key, inputs)
        assert max_diff(got_average, output(peft_arrow(shape, False, **flat), key, inputs)) <= TOL
    assert max_diff(got_routed, got_average) > 1e-3


def test_prototypes_are_the_top_right_singular_vectors() -> None:
    """The op against the SVD of the formed products (up to sign), batched, and equal to peft's power iteration."""
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    from pefref.ops.draws import gaussian
    from pefref.ops.shapes import SHAPE_RULES, Shape, ShapeMismatch
    from pefref.ops.weight_space import top_right_singular

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 24, generator=g), torch.randn(3, 16, 4, generator=g)
    got = top_right_singular(b, a, gaussian((24,), 1), iters=500)
    want = torch.linalg.svd(b @ a).Vh[:, 0]
    assert got.shape == (3, 24)
    assert max_diff(got.abs(), want.abs()) <= 1e-5
    cfg = peft.ArrowConfig(rng_seed=7)
    cfg.task_adapter_names = []  # create_arrow_model sets it
    layer = ArrowLoraLinearLayer(24, cfg)
    few = top_right_singular(b, a, gaussian((24,), 7), iters=15)
    for i in range(3):  # 15 steps, not converged: still the same vector as peft's
        assert max_diff(few[i], layer.top_right_singular_vec_from_BA(a[i], b[i])) <= 1e-6
    rule = SHAPE_RULES["top_right_singular"]
    assert rule(Shape((3, 16, 4)), Shape((3, 4, 24)), Shape((24,))) == (3, 24)
    for bad in [((3, 16, 4), (3, 5, 24), (24,)), ((3, 16, 4), (2, 4, 24), (24,)), ((3, 16, 4), (3, 4, 24), (23,))]:
        with pytest.raises(ShapeMismatch):
            rule(*map(Shape, bad))


def test_frozen_says_the_technique_trains_nothing(tmp_path: Path) -> None:
    """Without frozen: true a technique with no trainable tensor is refused; with it, one that declares one is."""
    from pefref.language.validate import validate_paths

    root = Path(__file__).resolve().parent.parent / "catalog" / "techniques"
    arrow = (root / "arrow.yaml").read_text(encoding="utf-8")
    unsaid = tmp_path / "arrow.yaml"
    unsaid.write_text(arrow.replace("frozen: true\n", ""), encoding="utf-8")
    wrong = tmp_path / "lora.yaml"
    wrong.write_text((root / "lora.yaml").read_text(encoding="utf-8").replace("identity_at_init: true\n", "identity_at_init: true\nfrozen: true\n"),
                     encoding="utf-8")
    problems, _ = validate_paths([unsaid, wrong])
    messages = sorted(str(p) for p in problems)
    assert len(messages) == 2, messages
    assert "lora.yaml" in messages[1] and "says it trains nothing" in messages[1]
    assert "arrow.yaml" in messages[0] and "nothing to train" in messages[0] and "frozen: true" in messages[0]
