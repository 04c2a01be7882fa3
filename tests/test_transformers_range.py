"""The transformers range pefref declares (4.57, the last 4.x, to the newest 5.x): the installed version is in it,
the family maps name the key/value cache argument the installed forwards take, and a map whose names a model's
forward does not take refuses prefix keys and values instead of dropping them silently.

CI runs the whole suite, this file included, in both environments (.ci/run: transformers 5.x in .venv, 4.57 in
.venv-tf457)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from pefref.language.catalog import default_catalog
from pefref.language.errors import PefrefError
from pefref.models.build import build_model
from pefref.runtime.api import apply

from .conftest import model_inputs, output_of, tiny_model
from .modelstate import assert_same_state, model_state

ROOT = Path(__file__).resolve().parent.parent
CATALOG = default_catalog()
HF_FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "bert", "roberta", "t5"]


def _declared() -> list[Requirement]:
    """The transformers requirements of pyproject.toml (the hf, experiments and test extras name it)."""
    return [Requirement(r) for r in re.findall(r'"(transformers[<>=!~,.0-9 ]+)"', (ROOT / "pyproject.toml").read_text())]


def test_every_extra_declares_one_range_from_4_57_to_6() -> None:
    reqs = _declared()
    assert len(reqs) == 3 and len({str(r.specifier) for r in reqs}) == 1, [str(r) for r in reqs]
    spec = reqs[0].specifier
    assert "4.57.0" in spec and "4.57.6" in spec and "5.25.0" in spec
    assert "4.56.2" not in spec and "6.0.0" not in spec


def test_the_installed_transformers_is_in_the_declared_range() -> None:
    assert Version(transformers.__version__) in _declared()[0].specifier, transformers.__version__


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_the_map_names_the_cache_argument_the_installed_forward_takes(family: str) -> None:
    model = build_model("tiny-t5", seed=0) if family == "t5" else tiny_model(family)
    params = inspect.signature(model.forward).parameters
    name = CATALOG.family(family).forward.cache_arg(params)
    assert name is not None and params[name].kind is not inspect.Parameter.VAR_KEYWORD
    # 4.x forwards call it past_key_values; 5.x renamed it cache (the old name is only a deprecated alias there)
    assert name == ("cache" if Version(transformers.__version__).major >= 5 else "past_key_values")


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_prefix_keys_and_values_reach_the_layers(family: str) -> None:
    """On either end of the range a prefix changes the output (the cache argument is not dropped into **kwargs)."""
    model = tiny_model(family)
    inputs = model_inputs(family)
    with torch.no_grad():
        before = output_of(model, inputs)
        ad = apply(model, "prefix_tuning")
        for p in ad.trainable_parameters():
            p.normal_(0, 0.5)
        after = output_of(model, inputs)[:, -inputs["input_ids"].shape[1]:]
    assert (after - before).abs().max() > 1e-3


def test_a_map_whose_cache_names_the_forward_does_not_take_refuses_prefixes() -> None:
    fam = CATALOG.family("gpt2")
    fam = fam.model_copy(update={"forward": fam.forward.model_copy(update={"cache": ["kv_state", "memory"]})})
    model = tiny_model("gpt2")
    before = model_state(model)
    with pytest.raises(PefrefError, match=r"takes no key/value cache argument under any of the names the map gives \(kv_state, memory\)"):
        apply(model, "prefix_tuning", family=fam)
    assert_same_state(before, model_state(model))
    apply(model, "lora", family=fam)  # techniques that do not use the cache still apply


def test_a_single_cache_name_is_a_list_of_one() -> None:
    from pefref.language.schema import ForwardSpec

    assert ForwardSpec.model_validate({"cache": "past"}).cache == ["past"]
    assert ForwardSpec().cache_arg(["input_ids", "past_key_values"]) == "past_key_values"
    with pytest.raises(ValueError):
        ForwardSpec.model_validate({"cache": []})


def test_a_versioned_path_or_output_is_chosen_by_the_installed_version() -> None:
    from pefref.language.schema import SiteBinding, installed_transformers

    v5 = (installed_transformers() or (0,)) >= (5,)
    b = SiteBinding.model_validate({"path": [{"path": "old", "until": "5.0"}, {"path": "new", "since": "5.0"}],
                                    "output": [{"form": "first", "until": "5.0"}, {"form": "tensor", "since": "5.0"}]})
    assert b.path == ("new" if v5 else "old")
    assert b.output_form(installed_transformers()) == ("tensor" if v5 else "first")
    assert b.output_form((4, 57, 6)) == "first" and b.output_form((5, 0, 0)) == "tensor"
    with pytest.raises(ValueError, match="no path for the installed transformers"):
        SiteBinding.model_validate({"path": [{"path": "x", "until": "1.0"}]})
    # the maps: GPT-NeoX's causal LM head is embed_out in 4.x, lm_head in 5.x; BERT's layers return a tuple in 4.x
    assert CATALOG.family("gpt_neox").sites["head"].path == ("lm_head" if v5 else "embed_out")
    assert CATALOG.family("bert").sites["layer"].output_form(installed_transformers()) == ("tensor" if v5 else "first")


def test_a_layer_output_the_map_gives_no_form_for_is_refused() -> None:
    from pefref.language.schema import SiteBinding

    fam = CATALOG.family("gpt2")
    layer = SiteBinding.model_validate({"path": "transformer.h.{i}", "output": [{"form": "first", "until": "1.0"}]})
    fam = fam.model_copy(update={"sites": {**fam.sites, "layer": layer}})
    model = tiny_model("gpt2")
    before = model_state(model)
    with pytest.raises(PefrefError, match=r"site 'layer': the map says what its module returns only for other transformers versions"):
        apply(model, "loreft", family=fam)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_fsdp_finds_the_transformer_blocks_of_every_model_class(family: str) -> None:
    """FSDP shards the blocks a model's classes list in ``_no_split_modules``: every class of a family finds the same
    ones on either end of the range (4.x lists them on the inner model only, e.g. BertModel, not
    BertForSequenceClassification), the family's layers among them."""
    from pefref.experiments.distributed import transformer_blocks

    model = build_model("tiny-t5", seed=0) if family == "t5" else tiny_model(family)
    fam = CATALOG.family(family)
    found = {}
    for name in fam.classes:
        blocks = transformer_blocks(getattr(transformers, name)(model.config))
        found[name] = {type(b).__name__ for b in blocks}
    assert all(found.values()) and len({frozenset(v) for v in found.values()}) == 1, found
    assert type(model.get_submodule(fam.layers.format(i=0))).__name__ in found[type(model).__name__]
