"""The chooser's facts, the compare page's matched settings and the peft config a technique page gives to copy."""

from __future__ import annotations

import pytest

from pefref.language.catalog import default_catalog
from pefref.language.interop_table import interop_table
from pefref.view.choose import backbone_backward, family_facts, matched_counts, size_hyperparameters
from pefref.view.params import count_params
from pefref.view.peft_config import module_name, peft_snippets, site_modules


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


def test_pareto_axis_ticks_span_the_runs() -> None:
    from pefref.experiments.plots import _compact, _ema, _log_ticks

    for lo, hi in ((1.5e5, 2.6e5), (60, 25000), (5, 5.5), (60, 2.5e7)):
        ticks = _log_ticks(lo, hi)
        assert len(ticks) <= 8 and ticks == sorted(ticks)
        assert ticks[0] <= lo * 1.5 and ticks[-1] >= hi / 1.5  # the ticks reach the runs at both ends
    assert [_compact(t) for t in _log_ticks(1.5e5 / 1.05, 2.6e5 * 1.05)] == ["100k", "150k", "200k", "250k", "300k"]
    assert _ema([1.0, 0.0, 0.0]) == [1.0, 0.6, 0.36]


def test_one_seed_shows_no_spread(tmp_path) -> None:
    """With one seed the results page writes the value alone (n=1), never '± 0.000'."""
    import jinja2

    from pefref.render.site.build import _environment

    env: jinja2.Environment = _environment()
    macro = env.get_template("macros.html").module.spread  # type: ignore[attr-defined]

    class M:
        def __init__(self, mean: float, std: float, n: int) -> None:
            self.mean, self.std, self.n = mean, std, n

    assert str(macro(M(0.375, 0.0, 1), "%.3f")) == "0.375"
    assert str(macro(M(0.4, 0.05, 3), "%.3f")) == "0.400 ± 0.050"
