"""Catalog compositions against plain-torch references on tiny Llama, GPT-2 and BERT; a composition trains.

Each composition is applied to a copy of a seeded base model and every tensor
of its adapters and blocks is made non-trivial; another copy runs the
techniques' equations and the blocks' combinations written here in plain
torch, with forward hooks on the model's own modules (paths written in this
file, not read from pefref's architecture maps), reading the same tensors.
fp32, eval mode, max abs difference <= 1e-5.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pefref
from pefref.language.catalog import catalog_root
from pefref.models.build import build_model
from pefref.runtime.compose import Composition
from tests.conftest import model_inputs, output_of

TOL = 1e-5
COMPS = catalog_root() / "compositions"
SHAPES = {"llama": "tiny-llama", "gpt2": "tiny-gpt2", "bert": "tiny-bert"}

# (module, output slice as a multiple of d, or None) per family; {i} is the layer
PATHS: dict[str, dict[str, Any]] = {
    "llama": {"q": ("model.layers.{i}.self_attn.q_proj", None), "k": ("model.layers.{i}.self_attn.k_proj", None),
              "v": ("model.layers.{i}.self_attn.v_proj", None), "down": "model.layers.{i}.mlp.down_proj", "ffn": "model.layers.{i}.mlp"},
    "gpt2": {"q": ("transformer.h.{i}.attn.c_attn", 0), "k": ("transformer.h.{i}.attn.c_attn", 1),
             "v": ("transformer.h.{i}.attn.c_attn", 2), "down": "transformer.h.{i}.mlp.c_proj", "ffn": "transformer.h.{i}.mlp"},
    "bert": {"q": ("encoder.layer.{i}.attention.self.query", None), "k": ("encoder.layer.{i}.attention.self.key", None),
             "v": ("encoder.layer.{i}.attention.self.value", None), "down": "encoder.layer.{i}.output.dense", "ffn": "encoder.layer.{i}.output.dense"},
}


@functools.cache
def _base(family: str) -> nn.Module:
    return build_model(SHAPES[family], seed=0)


def _layers(model: nn.Module) -> int:
    c = model.config
    return int(getattr(c, "num_hidden_layers", None) or c.n_layer)


def _d(model: nn.Module) -> int:
    c = model.config
    return int(getattr(c, "hidden_size", None) or c.n_embd)


def _weight(mod: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return mod.weight if isinstance(mod, nn.Linear) else mod.weight.t()


def _on_output(model: nn.Module, family: str, site: str, i: int, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> None:
    """Hook the output rows of a projection: ``fn(x, h, W_rows, b_rows)`` gives the new rows."""
    path, part = PATHS[family][site]
    mod = model.get_submodule(path.format(i=i))
    d = _d(model)
    sl = slice(None) if part is None else slice(part * d, (part + 1) * d)

    def hook(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        W = _weight(m)[sl]
        b = None if m.bias is None else m.bias[sl]
        new = fn(args[0], out[..., sl], W, b)
        if part is None:
            return new
        return torch.cat([out[..., : sl.start], new, out[..., sl.stop :]], dim=-1)

    mod.register_forward_hook(hook)


def _perturb(comp: Composition, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in comp.adapters.values():
            for p in ad.units.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        for _n, p in comp.combiners.named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _unit(comp: Composition, adapter: str, module: str, site: str, i: int) -> nn.Module:
    return comp.adapters[adapter].units[f"{module}__{site.replace('.', '_')}__{i}"]


def _lora(u: nn.Module, x: torch.Tensor, s: float) -> torch.Tensor:
    return s * (x @ u.A.t()) @ u.B.t()


def _ref_lora_ia3_stack(ref: nn.Module, comp: Composition, family: str) -> None:
    s = 8 / 4
    for i in range(_layers(ref)):
        q, v = _unit(comp, "lora", "lora", "attn.q", i), _unit(comp, "lora", "lora", "attn.v", i)
        lk, lv = _unit(comp, "ia3", "kv", "attn.k", i).l, _unit(comp, "ia3", "kv", "attn.v", i).l
        lf = _unit(comp, "ia3", "ffn", "ffn.act", i).l
        _on_output(ref, family, "q", i, lambda x, h, W, b, q=q: h + _lora(q, x, s))
        _on_output(ref, family, "k", i, lambda x, h, W, b, lk=lk: h * lk)
        _on_output(ref, family, "v", i, lambda x, h, W, b, v=v, lv=lv: (h + _lora(v, x, s)) * lv)  # stack: LoRA, then (IA)3
        ref.get_submodule(PATHS[family]["down"].format(i=i)).register_forward_pre_hook(lambda m, a, lf=lf: (a[0] * lf, *a[1:]))


def _ref_lora_average(ref: nn.Module, comp: Composition, family: str) -> None:
    L = _layers(ref)
    for i in range(L - 2, L):
        for site, key in (("attn.q", "q"), ("attn.v", "v")):
            w, n = _unit(comp, "wide", "lora", site, i), _unit(comp, "narrow", "lora", site, i)
            _on_output(ref, family, key, i, lambda x, h, W, b, w=w, n=n: h + 0.7 * _lora(w, x, 16 / 8) + 0.3 * _lora(n, x, 16 / 2 ** 0.5))


def _ref_lora_loha_parallel(ref: nn.Module, comp: Composition, family: str) -> None:
    for i in range(_layers(ref)):
        for site, key in (("attn.q", "q"), ("attn.v", "v")):
            lo, lh = _unit(comp, "lora", "lora", site, i), _unit(comp, "loha", "loha", site, i)

            def fn(x: torch.Tensor, h: torch.Tensor, W: Any, b: Any, lo: nn.Module = lo, lh: nn.Module = lh) -> torch.Tensor:
                dW = (lh.w1a @ lh.w1b) * (lh.w2a @ lh.w2b)  # LoHa: Hadamard product of two rank-r products
                return h + _lora(lo, x, 16 / 4) + (8 / 2) * x @ dW.t()

            _on_output(ref, family, key, i, fn)


def _cayley_blocks(v: torch.Tensor, b: int) -> torch.Tensor:
    blocks = []
    iu = torch.triu_indices(b, b, 1)
    for row in v:
        U = torch.zeros(b, b)
        U[iu[0], iu[1]] = row
        Q = U - U.t()
        eye = torch.eye(b)
        blocks.append((eye + Q) @ torch.linalg.inv(eye - Q))
    return torch.block_diag(*blocks)


def _ref_oft_dora_stack(ref: nn.Module, comp: Composition, family: str) -> None:
    r_oft = comp.adapters["oft"].hyperparameters["r"]
    hp = comp.adapters["dora"].hyperparameters
    s = hp["alpha"] / hp["r"]
    for i in range(_layers(ref)):
        for site, key in (("attn.q", "q"), ("attn.v", "v")):
            uo, ud = _unit(comp, "oft", "oft", site, i), _unit(comp, "dora", "dora", site, i)

            def fn(x: torch.Tensor, h: torch.Tensor, W: torch.Tensor, b: Any, uo: nn.Module = uo, ud: nn.Module = ud) -> torch.Tensor:
                W1 = W @ _cayley_blocks(uo.v, W.shape[1] // r_oft)  # OFT first
                V = W1 + s * ud.B @ ud.A  # then DoRA on the rotated weight
                W2 = ud.m.reshape(-1, 1) * V / V.norm(dim=1, keepdim=True)
                return F.linear(x, W2, b)

            _on_output(ref, family, key, i, fn)


def _ref_adapter_fusion(ref: nn.Module, comp: Composition, family: str) -> None:
    for i in range(_layers(ref)):
        ads = [_unit(comp, n, "adapter", "ffn.block", i) for n in ("task_a", "task_b", "task_c")]
        fu = comp.combiners[f"b0__ffn_block__{i}"]

        def hook(m: nn.Module, args: Any, h: torch.Tensor, ads: list[nn.Module] = ads, fu: nn.Module = fu) -> torch.Tensor:
            deltas = [F.relu(h @ a.Wd.t() + a.bd) @ a.Wu.t() + a.bu for a in ads]  # each adapter's change (Pfeiffer)
            q = h @ fu.Q.t() + fu.bQ
            scores = torch.stack([((dl @ fu.K.t() + fu.bK) * q).sum(-1) for dl in deltas], dim=-1)
            att = torch.softmax(scores / fu.T, dim=-1)
            return h + sum(att[..., j : j + 1] * (dl @ fu.V.t()) for j, dl in enumerate(deltas))

        ref.get_submodule(PATHS[family]["ffn"].format(i=i)).register_forward_hook(hook)


REFS = {
    "lora_ia3_stack": _ref_lora_ia3_stack,
    "lora_average": _ref_lora_average,
    "lora_loha_parallel": _ref_lora_loha_parallel,
    "oft_dora_stack": _ref_oft_dora_stack,
    "adapter_fusion": _ref_adapter_fusion,
}


def test_every_catalog_composition_has_a_reference() -> None:
    assert {p.stem for p in COMPS.glob("*.yaml")} == set(REFS)


@pytest.mark.parametrize("family", list(SHAPES))
@pytest.mark.parametrize("cid", sorted(REFS))
def test_matches_plain_torch(cid: str, family: str) -> None:
    model, ref = copy.deepcopy(_base(family)), copy.deepcopy(_base(family))
    inputs = model_inputs(family)
    base = output_of(model, inputs)
    comp = pefref.apply(model, COMPS / f"{cid}.yaml")
    assert isinstance(comp, Composition)
    _perturb(comp)
    with torch.no_grad():
        got = output_of(model, inputs)
        REFS[cid](ref, comp, family)
        want = output_of(ref, inputs)
    assert (got - base).abs().max() > 1e-3  # the composition changes the output
    assert (got - want).abs().max() <= TOL
    comp.remove()
    assert not hasattr(model, "pefref_adapters")
    assert torch.equal(output_of(model, inputs), base)
    assert model.state_dict().keys() == _base(family).state_dict().keys()


@pytest.mark.parametrize("cid", ["adapter_fusion", "lora_average"])
def test_composition_trains(cid: str) -> None:
    torch.manual_seed(0)
    model = copy.deepcopy(_base("llama"))
    comp = pefref.apply(model, COMPS / f"{cid}.yaml")
    if cid == "adapter_fusion":  # AdapterFusion's second stage: the (frozen) task adapters were trained before
        with torch.no_grad():
            for ad in comp.adapters.values():
                for p in ad.units.parameters():
                    p.add_(0.3 * torch.randn_like(p))
        assert all(not p.requires_grad for ad in comp.adapters.values() for p in ad.units.parameters())
        assert comp.num_trainable() == sum(p.numel() for p in comp.combiners.parameters())
    params = comp.trainable_parameters()
    assert params and all(p.requires_grad for p in params)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("pefref_adapters")}
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (4, 12), generator=g)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    after = {n: p for n, p in model.named_parameters() if not n.startswith("pefref_adapters")}
    assert all(torch.equal(before[n], after[n]) for n in before)  # the base model did not move


def test_a_failed_composition_changes_nothing(tmp_path) -> None:
    p = tmp_path / "half.yaml"
    p.write_text("id: half\nname: Half\ntechniques:\n  - {name: lora, technique: lora}\n  - {name: bias, technique: bitfit}\n", encoding="utf-8")
    model = copy.deepcopy(_base("llama"))  # Llama's projections have no biases: bitfit has nothing to train
    inputs = model_inputs("llama")
    base = output_of(model, inputs)
    with pytest.raises(Exception, match="nothing to train"):
        pefref.apply(model, p)
    assert not hasattr(model, "pefref_adapters")
    assert [q.requires_grad for q in model.parameters()] == [q.requires_grad for q in _base("llama").parameters()]
    assert torch.equal(output_of(model, inputs), base)
