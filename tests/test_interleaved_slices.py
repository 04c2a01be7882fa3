"""Interleaved fused projections: GPT-NeoX's query_key_value holds [h0q, h0k, h0v, h1q, ...]."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

import pefref
from pefref.cli.app import app
from pefref.language.catalog import catalog_root, default_catalog
from pefref.models.build import build_model
from pefref.view.params import count_params

CATALOG = default_catalog()
NEOX = catalog_root() / "families" / "gpt_neox.yaml"


def _rows(which: int, heads: int, d_head: int) -> list[int]:
    """Rows of q (0), k (1) or v (2) in the interleaved weight, head by head (written out, not through pefref)."""
    return [j * 3 * d_head + which * d_head + t for j in range(heads) for t in range(d_head)]


def test_lora_on_interleaved_q_and_v_equals_plain_torch() -> None:
    model = build_model("tiny-gpt-neox", seed=0)
    base = copy.deepcopy(model)
    r, alpha = 4, 16.0
    ad = pefref.apply(model, "lora", r=r, alpha=alpha)  # sites attn.q, attn.v: slices with a period of 3 d_head
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ad.units.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    cfg = base.config
    heads, d_head = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for i, layer in enumerate(ref.gpt_neox.layers):
            W = layer.attention.query_key_value.weight
            for which, site in ((0, "q"), (2, "v")):
                u = ad.units[f"lora__attn_{site}__{i}"]
                W[_rows(which, heads, d_head)] += (alpha / r) * u.B @ u.A
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=g)
    out = model(input_ids=ids).logits
    want = ref(input_ids=ids).logits
    diff = (out - want).abs().max().item()
    assert diff <= 1e-5, diff
    assert (out - base(input_ids=ids).logits).abs().max().item() > 1e-2  # the update is not negligible
    n = 2 * 2 * (r * cfg.hidden_size + heads * d_head * r)  # 2 layers x (q, v) x (A, B)
    assert ad.report.trainable == n == count_params(CATALOG.technique("lora"), CATALOG.shape("tiny-gpt-neox"), CATALOG, {"r": r}).trainable
    ad.merge()  # merged rows: the same outputs
    assert (model(input_ids=ids).logits - want).abs().max().item() <= 1e-5
    ad.remove()
    for (k, a), b in zip(model.state_dict().items(), base.state_dict().values()):
        assert torch.equal(a, b), k


def _map_with(tmp_path, old: str, new: str):
    text = NEOX.read_text()
    assert old in text
    bad = tmp_path / "neox.yaml"
    bad.write_text(text.replace(old, new))
    return bad


@pytest.mark.parametrize(("old", "new", "field", "message"), [
    ("start: d_head, size: d_head, period: 3 * d_head", "start: d_head, size: d_head, period: 5 * d_head", "attn.k.slice.period", "not a whole number of periods"),
    ("start: 2 * d_head, size: d_head", "start: 2 * d_head, size: 2 * d_head", "attn.v.slice.period", "does not fit in the period"),
    ("start: d_head, size: d_head, period: 3 * d_head", "start: d_head // 2, size: d_head, period: 3 * d_head", "attn.k.slice.start", "overlaps site 'attn.q'"),
    ("start: d_head, size: d_head, period: 3 * d_head", "start: d_head, size: d_head // 2, period: 3 * d_head", "attn.k.slice.size", "owns"),
])
def test_validate_locates_bad_interleaved_slices(tmp_path, old: str, new: str, field: str, message: str) -> None:
    bad = _map_with(tmp_path, old, new)
    res = CliRunner().invoke(app, ["validate", str(bad)])
    assert res.exit_code == 1, res.output
    line = next(i for i, t in enumerate(bad.read_text().splitlines(), 1) if f"  {field.split('.')[0]}.{field.split('.')[1]}:" in t)
    assert f"neox.yaml:{line}:" in res.output and field in res.output and message in res.output, res.output


def test_apply_refuses_a_period_that_does_not_divide_the_module(tmp_path) -> None:
    bad = _map_with(tmp_path, "start: \"0\", size: d_head, period: 3 * d_head", "start: \"0\", size: d_head, period: 5 * d_head")
    model = build_model("tiny-gpt-neox", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pefref.PefrefError, match="not a whole number of periods"):
        pefref.apply(model, "lora", family=str(bad))
    assert not hasattr(model.gpt_neox.layers[0].attention.query_key_value, "_pefref_patch")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
