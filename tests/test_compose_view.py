"""`pefref show` and `pefref params` on composition files: per-member, per-block and total counts that equal what runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.language.catalog import default_catalog
from pefref.language.composition import load_composition
from pefref.runtime.compose import apply_composition
from pefref.runtime.compose_merge import merge_problems
from pefref.view.composition import composition_merge_problems, count_composition

from .conftest import tiny_model

CAT = default_catalog()
COMPOSITIONS = sorted((Path(__file__).resolve().parents[1] / "catalog" / "compositions").glob("*.yaml"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("path", COMPOSITIONS, ids=lambda p: p.stem)
def test_counts_equal_the_applied_composition(path: Path, family: str) -> None:
    res = load_composition(path, CAT)
    counts = count_composition(res, CAT.shape(f"tiny-{family}"), CAT)
    model = tiny_model(family)
    comp = apply_composition(model, res, catalog=CAT)
    try:
        for m in counts.members:
            ad = comp.adapters[m.name]
            assert m.params == ad.report.trainable, (m.name, m.params, ad.report.trainable)  # type: ignore[union-attr]
            assert m.trainable == (ad.num_trainable() > 0)
        for b in counts.blocks:
            mine = [k for k in comp.combiners if k.startswith(f"b{b.index}__")]
            if b.kind != "stack":
                assert b.hosts == len(mine)
            assert b.params == sum(p.numel() for k in mine for p in comp.combiners[k].parameters())
        assert counts.trainable == comp.num_trainable()
        assert counts.total == sum(ad.report.trainable for ad in comp.adapters.values()) + sum(p.numel() for p in comp.combiners.parameters())  # type: ignore[union-attr]
        derived, found = composition_merge_problems(res, CAT.shape(f"tiny-{family}"), CAT), merge_problems(comp)
        assert len(derived) == len(found) and all(f.startswith(d) for d, f in zip(derived, found)), (derived, found)
    finally:
        comp.remove()


def test_fusion_counts_its_attention_and_freezes_the_adapters() -> None:
    res = load_composition(COMPOSITIONS[[p.stem for p in COMPOSITIONS].index("adapter_fusion")], CAT)
    c = count_composition(res, CAT.shape("tiny-bert"), CAT)
    d, L = 32, 2
    (blk,) = c.blocks
    assert (blk.kind, blk.hosts, blk.params) == ("fusion", L, L * (3 * d * d + 2 * d))
    assert not any(m.trainable for m in c.members) and c.trainable == blk.params < c.total


def test_show_and_params_take_composition_files() -> None:
    runner = CliRunner()
    path = str(COMPOSITIONS[[p.stem for p in COMPOSITIONS].index("lora_ia3_stack")])
    r = runner.invoke(app, ["params", path, "--model", "tiny-llama", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [m["name"] for m in data["members"]] == ["lora", "ia3"]
    assert data["trainable"] == sum(m["params"] for m in data["members"]) > 0
    r = runner.invoke(app, ["show", path, "--model", "tiny-gpt2"])
    assert r.exit_code == 0, r.output
    for text in ("adapter lora", "adapter ia3", "stack over lora, ia3 at attn.v", "total:"):
        assert text in r.output, text
    r = runner.invoke(app, ["show", path, "--json"])
    data = json.loads(r.output)
    assert data["kind"] == "composition" and data["parameters"]["model"] == "llama-2-7b"
    assert data["parameters"]["members"][0]["params"] == 4 * 32 * 4096 * 8 // 2  # LoRA r=4 on q and v of 32 layers: 2·L·2·d·r
    r = runner.invoke(app, ["params", path, "--model", "tiny-llama", "--set", "r=2"])
    assert r.exit_code == 1 and "--set and --sites apply to techniques" in r.output
