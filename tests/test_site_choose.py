"""The chooser's facts, the compare page's matched settings and the peft config a technique page gives to copy."""

from __future__ import annotations

import pytest

from pefref.interop.peft_snippet import module_name, peft_snippets, site_modules
from pefref.interop.table import interop_table
from pefref.language.catalog import default_catalog
from pefref.view.choose import backbone_backward, family_facts, matched_counts, size_hyperparameters
from pefref.view.params import count_params


@pytest.fixture(scope="module")
def catalog():
    return default_catalog()


def test_config_classes_agree_with_peft() -> None:
    """The table's class names are peft's own (a drift guard: the table is the second list)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    table = interop_table()
    for peft_type, cls in table.config_classes.items():
        assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].__name__ == cls
    assert {m.peft_type for m in table.methods} <= set(table.config_classes)


def test_lora_config_on_llama_names_the_real_modules_and_builds_in_peft(catalog) -> None:
    snippet = next(s for s in peft_snippets(catalog.technique("lora"), catalog) if s.family == "llama")
    assert snippet.code.splitlines()[-1].startswith(
        'config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16.0, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]')
    import peft

    scope: dict[str, object] = {}
    exec(snippet.code, {"__builtins__": __builtins__, "peft": peft}, scope)  # the snippet is the site's own text
    config = scope["config"]
    assert config.r == 8 and sorted(config.target_modules) == ["q_proj", "v_proj"]


def test_no_peft_equivalent_and_ambiguous_names(catalog) -> None:
    assert peft_snippets(catalog.technique("houlsby_adapter"), catalog) == []
    bert = catalog.family("bert")
    # BERT's attention output and FFN output are both '...dense': the attention one needs more of its path
    assert module_name(bert.sites["attn.o"].path, bert) == "attention.output.dense"
    mods = {m.site: m.name for m in site_modules(catalog.technique("lora"), catalog.family("gpt2"), catalog)}
    assert mods == {"attn.q": "c_attn", "attn.v": "c_attn"}


def test_view_facts_for_choosing(catalog) -> None:
    assert size_hyperparameters(catalog.technique("lora"), catalog) == ["r"]
    assert size_hyperparameters(catalog.technique("prompt_tuning"), catalog) == ["n"]
    assert size_hyperparameters(catalog.technique("ia3"), catalog) == []
    assert not backbone_backward(catalog.technique("ladder_side_tuning"), catalog, 32)
    assert backbone_backward(catalog.technique("lora"), catalog, 32)
    llama = {f.family: f for f in family_facts(catalog.technique("lora"), catalog)}["llama"]
    assert llama.mergeable and llama.no_added_latency
    adapter = {f.family: f for f in family_facts(catalog.technique("houlsby_adapter"), catalog)}["llama"]
    assert not adapter.mergeable and not adapter.no_added_latency


def test_matched_counts_equal_the_view_count(catalog) -> None:
    t, shape = catalog.technique("lora"), catalog.shape("llama-2-7b")
    got = {(m.sites, m.value): m.trainable for m in matched_counts(t, shape, catalog, values=(4, 16))}
    assert got[("default", 16)] == count_params(t, shape, catalog, overrides={"r": 16}).trainable == 2 * 16 * 4096 * 2 * 32
    assert got[("q, k, v, o", 4)] == count_params(t, shape, catalog, overrides={"r": 4}, sites=["attn.q", "attn.k", "attn.v", "attn.o"]).trainable
    prompt = {(m.sites, m.value): m for m in matched_counts(catalog.technique("prompt_tuning"), shape, catalog, values=(4,))}
    assert prompt[("q, v", 4)].trainable is None and prompt[("q, v", 4)].why  # n/a with its reason, never 0
