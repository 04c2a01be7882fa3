"""T5: an encoder-decoder through one map with two layer stacks and the cross-attention sites."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import pefref
from pefref.language.catalog import default_catalog
from pefref.models.build import build_model
from pefref.view.params import count_params

CATALOG = default_catalog()
QV = ["attn.q", "attn.v", "xattn.q", "xattn.v"]  # peft's target_modules=["q", "v"]: self-attention in both stacks, cross-attention


def _inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(2, 128, (2, 5), generator=g)}


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_on_q_and_v_equals_peft_in_encoder_decoder_and_cross_attention() -> None:
    base = build_model("tiny-t5", seed=0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q", "v"])).eval()
    model = copy.deepcopy(base)
    ad = pefref.apply(model, "lora", sites=QV, r=4, alpha=8)
    g = torch.Generator().manual_seed(2)
    placed = 0
    with torch.no_grad():
        for row in ad.report.rows:
            for path, layer in zip(row.paths, row.layers):
                host = pm.get_base_model().get_submodule(path)
                unit = ad.units[f"lora__{row.site.replace('.', '_')}__{layer}"]
                host.lora_B["default"].weight.copy_(torch.randn(host.lora_B["default"].weight.shape, generator=g) * 0.3)
                unit.A.copy_(host.lora_A["default"].weight)
                unit.B.copy_(host.lora_B["default"].weight)
                placed += 1
    assert placed == 2 * 2 + 2 * 2 + 2 * 2  # q, v in 2 encoder and 2 decoder layers; cross q, v in 2 decoder layers
    assert {r.site: r.layers for r in ad.report.rows} == {"attn.q": [0, 1, 2, 3], "attn.v": [0, 1, 2, 3], "xattn.q": [2, 3], "xattn.v": [2, 3]}
    x = _inputs()
    with torch.no_grad():
        ours, theirs = model(**x).logits, pm(**x).logits
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5, diff
    assert (ours - base(**x).logits).abs().max().item() > 1e-3
    assert ad.report.trainable == _trainable(pm) == count_params(CATALOG.technique("lora"), CATALOG.shape("tiny-t5"), CATALOG, {"r": 4}, sites=QV).trainable


def test_all_linear_counts_what_peft_counts() -> None:
    base = build_model("tiny-t5", seed=0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules="all-linear"))
    ad = pefref.apply(copy.deepcopy(base), "lora", sites=["all-linear"], r=4)
    assert ad.report.trainable == _trainable(pm) == count_params(CATALOG.technique("lora"), CATALOG.shape("tiny-t5"), CATALOG, {"r": 4}, sites=["all-linear"]).trainable


@pytest.mark.parametrize(("technique", "sites"), [
    ("houlsby_adapter", ["attn.block", "xattn.block", "ffn.block"]),
    ("ia3", ["attn.k", "attn.v", "xattn.k", "xattn.v", "ffn.act"]),
])
def test_bottleneck_adapter_and_ia3_train_on_t5(technique: str, sites: list[str]) -> None:
    model = build_model("tiny-t5", seed=0)
    ad = pefref.apply(model, technique, sites=sites, **({"r": 8} if technique == "houlsby_adapter" else {}))
    assert {r.site for r in ad.report.rows} == set(sites)
    x = _inputs()
    labels = torch.randint(2, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # both start as the identity
        start = model(**x).logits
        with ad.disable():
            assert (start - model(**x).logits).abs().max().item() <= 1e-6
    model.train()
    opt = torch.optim.Adam(ad.trainable_parameters(), lr=5e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert _trainable(model) == ad.report.trainable


def test_layer_selection_and_model_classes() -> None:
    model = build_model("tiny-t5", seed=0)
    dec = pefref.apply(model, "lora", layers=[2, 3], r=2)  # the decoder's layers follow the encoder's
    assert all(p.startswith("decoder.") for r in dec.report.rows for p in r.paths)
    dec.remove()
    named = pefref.apply(model, "lora", layers="encoder", r=2)  # or by the stack's name
    assert {r.site: r.layers for r in named.report.rows} == {"attn.q": [0, 1], "attn.v": [0, 1]}
    named.remove()
    with pytest.raises(pefref.PefrefError, match="no stack 'decodr'.*encoder, decoder"):
        pefref.apply(model, "lora", layers=["decodr"], r=2)
    from transformers import T5EncoderModel, T5Model

    enc = T5EncoderModel(model.config)
    ad = pefref.apply(enc, "lora", sites=["attn.q", "attn.v"], r=2)
    assert {r.site: r.layers for r in ad.report.rows} == {"attn.q": [0, 1], "attn.v": [0, 1]}
    with pytest.raises(pefref.PefrefError, match="xattn.q"):
        pefref.apply(T5EncoderModel(model.config), "lora", sites=["xattn.q"], r=2)
    both = pefref.apply(T5Model(model.config), "lora", sites=QV, r=2)
    assert sum(len(r.paths) for r in both.report.rows) == 12


def test_cross_attention_is_drawn_where_it_exists() -> None:
    from pefref.render.diagram import technique_graph

    t5 = technique_graph(CATALOG, [CATALOG.technique("lora")], model="tiny-t5", fold=False)
    llama = technique_graph(CATALOG, [CATALOG.technique("lora")], model="tiny-llama", fold=False)
    sites = {a.get("site") for _n, a in t5.nodes(data=True)}
    assert {"xattn.q", "xattn.k", "xattn.v", "xattn.o"} <= sites
    folded = technique_graph(CATALOG, [CATALOG.technique("lora")], model="tiny-t5")  # untouched: one labelled band
    assert "xattn.block" in {a.get("site") for _n, a in folded.nodes(data=True)}
    assert not any(str(a.get("site", "")).startswith("xattn") for _n, a in llama.nodes(data=True))
    assert not any("cross-attention" in str(c.get("html", "")) for c in llama.graph["clusters"].values())


def test_validate_locates_a_bad_stack(tmp_path) -> None:
    from typer.testing import CliRunner

    from pefref.cli.app import app
    from pefref.language.catalog import catalog_root

    text = (catalog_root() / "families" / "t5.yaml").read_text()
    bad = tmp_path / "t5.yaml"
    bad.write_text(text.replace("stacks: [encoder]}", "stacks: [encodr]}").replace("xattn.o: {path", "xattn.oo: {path"))
    res = CliRunner().invoke(app, ["validate", str(bad)])
    assert res.exit_code == 1
    lines = bad.read_text().splitlines()
    cls = next(i for i, t in enumerate(lines, 1) if "encodr" in t)
    site = next(i for i, t in enumerate(lines, 1) if "xattn.oo" in t)
    assert f"t5.yaml:{cls}:" in res.output and "unknown stack 'encodr'" in res.output and "encoder" in res.output, res.output
    assert f"t5.yaml:{site}:" in res.output and "xattn.oo" in res.output, res.output
