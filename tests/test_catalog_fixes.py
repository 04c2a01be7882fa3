"""Catalog fixes, each with the check that would have caught it."""

from __future__ import annotations

import pytest
import torch

import pefref
from pefref.language.catalog import default_catalog
from pefref.view.params import count_params

from .conftest import tiny_model

CATALOG = default_catalog()


def test_compacter_shares_one_set_of_rule_matrices() -> None:
    """Karimi Mahabadi et al. share the rule matrices A by every adapter: n^3 parameters once, not per site."""
    model = tiny_model("llama")
    a = pefref.apply(model, "compacter", r=8, n=4)
    rule = {id(u.A) for u in a.units.values()}
    assert len(rule) == 1 and len(a.units) == 4  # 2 sites x 2 layers, one A
    one_site = pefref.apply(tiny_model("llama"), "compacter", sites=["ffn.block"], r=8, n=4)
    both = a.report.trainable
    assert both - 2 * one_site.report.trainable == -4 ** 3  # the second site adds its factors, not another A
    assert count_params(CATALOG.technique("compacter"), CATALOG.shape("tiny-llama"), CATALOG, {"r": 8, "n": 4}).trainable == both


@pytest.mark.parametrize(("family", "embedding"), [("gpt2", "transformer.wpe"), ("bert", "embeddings.position_embeddings")])
def test_prefix_tuning_shifts_absolute_positions_by_its_length(family: str, embedding: str) -> None:
    """As its notes say: on learned absolute positions the real tokens' position ids start at n."""
    notes = CATALOG.technique("prefix_tuning").notes
    assert "position ids start at n" in " ".join(notes.split())
    model = tiny_model(family)
    pefref.apply(model, "prefix_tuning", n=3, hidden=8)
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(embedding).register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    ids = torch.randint(3, 100, (1, 5))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    hook.remove()
    assert seen and seen[0].flatten().tolist() == [3, 4, 5, 6, 7]


def test_validate_checks_maps_shapes_and_the_interop_table_by_their_own_schemas(tmp_path) -> None:
    from typer.testing import CliRunner

    from pefref.cli.app import app
    from pefref.language.catalog import catalog_root

    runner = CliRunner()
    root = catalog_root()
    ok = runner.invoke(app, ["validate", str(root / "families" / "llama.yaml"), str(root / "models.yaml"), str(root / "interop" / "peft.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "unknown key" not in ok.output and "1 architecture map" in ok.output
    bad = tmp_path / "fam.yaml"
    bad.write_text((root / "families" / "gpt2.yaml").read_text().replace("  attn.o:", "  attn.oo:"))
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 1
    assert "fam.yaml:" in res.output and "attn.oo" in res.output and "unknown key 'family'" not in res.output


def test_every_bottleneck_names_its_width_r() -> None:
    """The catalog's convention (Technique.hyperparameters): a down/up pair's inner width is a hyperparameter r (or
    r_<part>), the width itself. Pfeiffer's and UniPELT's adapters once said `d_out // reduction`, Houlsby's `r`."""
    from pefref.language.check import expand_modules

    hosts = {"d", "d_in", "d_out"}
    seen = set()
    for tid, t in CATALOG.techniques.items():
        modules, hps = expand_modules(t, CATALOG.techniques)
        for m in modules:
            if m.form not in ("parallel", "sequential"):
                continue
            mats = {k: [str(d) for d in p.shape] for k, p in m.params.items() if len(p.shape) == 2}
            for down, (k, h_in) in mats.items():
                ups = [u for u, (h_out, k2) in mats.items() if u != down and k2 == k and h_in in hosts and h_out in hosts]
                if ups:
                    seen.add(tid)
                    capped = k.startswith("min(r, ")  # r capped at the host's rank (SVD factors, as peft caps them)
                    capped |= "min(d_in, d_out)" in k  # a share of the host's rank (a fraction of its singular triplets)
                    capped |= k.replace(" ", "") in ("heads*d_head", "d_head*heads", "d_ff")  # the model's own widths: a full-size block (a side network's), no bottleneck
                    assert k == "r" or capped or (k.startswith("r_") and k in hps), f"{tid}.{m.name}: {down}/{ups[0]} inner width {k!r}; name it r (a width)"
    assert {"houlsby_adapter", "pfeiffer_adapter", "unipelt", "parallel_adapter", "lora"} <= seen
