"""Placement anywhere: sites=, patterns and selectors (Python and --sites on the CLI)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from typer.testing import CliRunner

import pefref
from pefref.cli.app import app
from pefref.language.catalog import default_catalog
from pefref.language.errors import SiteError
from pefref.language.placement import expand_sites, retarget

from .conftest import model_inputs, output_of, tiny_model

CATALOG = default_catalog()
runner = CliRunner()


def _json(*args: str) -> dict:
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_all_linear_on_llama_2_7b_counts_peft_number() -> None:
    """peft's LoRA with target_modules='all-linear' at r=8 on Llama-2-7B trains 19,988,480 parameters."""
    out = _json("params", "lora", "--model", "llama-2-7b", "--set", "r=8", "--sites", "all-linear", "--json")
    assert out["trainable"] == 19_988_480
    # the technique's own placement (q, v) counts less
    assert _json("params", "lora", "--model", "llama-2-7b", "--set", "r=8", "--json")["trainable"] == 4_194_304


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_all_linear_matches_peft_on_tiny_models(family: str) -> None:
    """Same trainable count and the same hosts as peft's all-linear (fused c_attn whole on GPT-2)."""
    model = tiny_model(family)
    adapter = pefref.apply(model, "lora", sites=["all-linear"], r=4)
    pm = peft.get_peft_model(tiny_model(family), peft.LoraConfig(r=4, target_modules="all-linear"))
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    mine = {p for row in adapter.report.rows for p in row.paths}
    if family == "bert":  # peft also targets the pooler's dense layer, which is no site of a Transformer layer
        theirs.discard("pooler.dense")
        n_peft -= sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and "pooler" in n)
    assert mine == theirs
    assert adapter.report.trainable == n_peft
    # the analytic count agrees with what was placed
    shape = {"llama": "tiny-llama", "gpt2": "tiny-gpt2", "bert": "tiny-bert"}[family]
    assert _json("params", "lora", "--model", shape, "--set", "r=4", "--sites", "all-linear", "--json")["trainable"] == adapter.report.trainable


def test_patterns_expand_over_sites_the_family_binds() -> None:
    fam = CATALOG.family("llama")
    got = [s for s, _ in expand_sites(["attn.*"], CATALOG.reference, fam)]
    assert got == ["attn.q", "attn.k", "attn.v", "attn.kv", "attn.o", "attn.block", "attn.norm"]
    gpt2 = [s for s, _ in expand_sites(["all-linear"], CATALOG.reference, CATALOG.family("gpt2"))]
    assert gpt2 == ["attn.qkv", "attn.o", "ffn.up", "ffn.down"]  # c_attn whole, not also its q/k/v slices
    t = retarget(CATALOG.technique("lora"), ["attn.*"], CATALOG.reference, CATALOG.techniques, fam)
    assert [m.sites for m in t.modules] == [["attn.q", "attn.k", "attn.v", "attn.o"]]  # linear sites only


def test_own_sites_narrow_and_new_sites_go_to_modules_of_their_kind() -> None:
    ia3 = CATALOG.technique("ia3")
    narrowed = retarget(ia3, ["attn.k"], CATALOG.reference, CATALOG.techniques)
    assert [(m.name, m.sites) for m in narrowed.modules] == [("kv", ["attn.k"])]
    moved = retarget(ia3, ["ffn.up", "ffn.act"], CATALOG.reference, CATALOG.techniques)
    assert [(m.name, m.sites) for m in moved.modules] == [("kv", ["ffn.up"]), ("ffn", ["ffn.act"])]


def test_lora_on_the_ffn_runs_and_changes_only_those_hosts() -> None:
    model = tiny_model("llama")
    base_out = output_of(model, model_inputs("llama"))
    adapter = pefref.apply(model, "lora", sites=["ffn.*"], r=2)
    assert sorted(r.site for r in adapter.report.rows) == ["ffn.down", "ffn.gate", "ffn.up"]
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.1)
        assert (output_of(model, model_inputs("llama")) - base_out).abs().max() > 1e-4
    adapter.remove()
    assert torch.equal(output_of(model, model_inputs("llama")), base_out)


@pytest.mark.parametrize(("technique", "sites", "message"), [
    ("lora", ["attn.kv"], "cannot be placed on 'attn.kv' \\(a kv site\\)"),
    ("prompt_tuning", ["attn.q"], "cannot be placed on 'attn.q'"),
    ("lora", ["attn.qq"], "did you mean 'attn.q'"),
    ("lora", ["*.norm"], "no module of lora fits any site of '\\*.norm'"),
    ("lora", ["attn.qkv"], "family 'llama' has no site 'attn.qkv'"),
])
def test_incompatible_sites_are_errors_that_change_nothing(technique: str, sites: list[str], message: str) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(SiteError, match=message):
        pefref.apply(model, technique, sites=sites)
    assert not hasattr(model, "pefref_adapters")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_cli_errors_name_the_site() -> None:
    res = runner.invoke(app, ["params", "lora", "--model", "gpt2", "--sites", "attn.kv"])
    assert res.exit_code == 1
    assert "cannot be placed on 'attn.kv'" in res.output


def test_show_and_apply_take_sites() -> None:
    shown = _json("show", "lora", "--model", "llama-2-7b", "--set", "r=8", "--sites", "all-linear", "--json")
    assert shown["parameters"]["trainable"] == 19_988_480
    applied = _json("apply", "lora", "--model", "tiny-gpt2", "--sites", "attn.qkv,ffn.up", "--json")
    assert sorted({r["site"] for r in applied["placements"]}) == ["attn.qkv", "ffn.up"]
