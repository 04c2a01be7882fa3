"""Every model class of a family resolves through its one map; a task head trains and saves with the adapter."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import transformers
from torch import nn

import pefref
from pefref.language.catalog import default_catalog
from pefref.language.errors import SiteError
from pefref.language.model_classes import bind_class

from .conftest import TINY

CATALOG = default_catalog()
HF_FAMILIES = [f for f in TINY if CATALOG.family(f).model_type is not None]
CASES = [(f, cls) for f in HF_FAMILIES for cls in CATALOG.family(f).classes]


@functools.cache
def _built(family: str, cls: str) -> nn.Module:
    fam = CATALOG.family(family)
    config = {"pad_token_id": 0, **CATALOG.shape(TINY[family]).config, "num_labels": 2 if "QuestionAnswering" in cls else 3}
    cfg = transformers.AutoConfig.for_model(fam.model_type, **config)
    if cls.endswith(("LMHeadModel", "ForCausalLM")) and family in ("bert", "roberta"):
        cfg.is_decoder = True
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cls)(cfg).eval()


def fresh(family: str, cls: str) -> nn.Module:
    import copy

    return copy.deepcopy(_built(family, cls))


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def out(model: nn.Module, **extra: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        o = model(**inputs(), **extra)
    return o[0] if not hasattr(o, "start_logits") else torch.cat([o.start_logits, o.end_logits], -1)


def test_every_class_is_listed_with_its_task() -> None:
    tasks = {f: {m.task for m in CATALOG.family(f).classes.values()} for f in HF_FAMILIES}
    for f, got in tasks.items():
        assert {"base", "causal_lm" if f not in ("bert", "roberta") else "masked_lm",
                "sequence_classification", "token_classification", "question_answering"} <= got, f


@pytest.mark.parametrize(("family", "cls"), CASES)
def test_lora_and_prompt_apply_on_every_class(family: str, cls: str) -> None:
    model = fresh(family, cls)
    base = out(model)
    fam = bind_class(CATALOG.family(family), cls)
    head = fam.sites.get("head")
    saved = ["head"] if head is not None else None
    a = pefref.apply(model, "lora", r=2, modules_to_save=saved)
    hosts = {p for row in a.report.rows for p in row.paths}
    assert all(model.get_submodule(p) is not None for p in hosts)
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapted = out(model)
    assert (adapted - base).abs().max() > 1e-4
    if head is not None:  # the head trains and is saved with the adapter
        assert any(k.startswith(f"host.{head.path}.") for k in a.state_dict())
        assert model.get_submodule(head.path).weight.requires_grad
    with a.disable():
        torch.testing.assert_close(out(model), base, atol=1e-6, rtol=0)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    a.remove()
    assert torch.equal(out(model), base)

    other = fresh(family, cls)
    b = pefref.apply(other, "lora", r=2, modules_to_save=saved)
    b.load_state_dict(state)
    torch.testing.assert_close(out(other), adapted, atol=1e-6, rtol=0)

    p = pefref.apply(fresh(family, cls), "prompt_tuning", n=3)
    assert p.report.trainable == 3 * CATALOG.shape(TINY[family]).config.get("hidden_size", CATALOG.shape(TINY[family]).config.get("n_embd"))


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_sequence_classification_head_trains_with_prompt_tuning(family: str) -> None:
    """One step on a classification loss (per-sequence labels, not extended by the prompt) moves the head."""
    cls = next(c for c, m in CATALOG.family(family).classes.items() if m.task == "sequence_classification")
    model = fresh(family, cls)
    a = pefref.apply(model, "prompt_tuning", n=3, modules_to_save=["head"])
    head = model.get_submodule(bind_class(CATALOG.family(family), cls).sites["head"].path)
    before = head.weight.detach().clone()
    model.train()
    loss = model(**inputs(), labels=torch.tensor([0, 2])).loss
    loss.backward()
    torch.optim.SGD(a.trainable_parameters(), lr=0.1).step()
    model.eval()
    assert not torch.equal(before, head.weight)
    assert a.report.rows[-1].module == "modules_to_save" and a.report.rows[-1].params == sum(p.numel() for p in head.parameters())
    a.remove()
    assert torch.equal(before, head.weight)


def test_modules_to_save_by_path_and_errors() -> None:
    model = fresh("llama", "LlamaForSequenceClassification")
    a = pefref.apply(model, "lora", modules_to_save=["score"])
    assert "host.score.weight" in a.state_dict()
    a.remove()
    with pytest.raises(SiteError, match="no task head"):
        pefref.apply(fresh("llama", "LlamaModel"), "lora", modules_to_save=["head"])
    m = fresh("gpt2", "GPT2ForTokenClassification")
    with pytest.raises(SiteError, match="did you mean 'classifier'"):
        pefref.apply(m, "lora", modules_to_save=["clasifier"])
    assert not hasattr(m, "pefref_adapters") and not any(p.requires_grad is False for p in m.parameters())


def test_binding_is_idempotent() -> None:
    fam = CATALOG.family("llama")
    once = bind_class(fam, "LlamaModel")
    assert once.sites["attn.q"].path == "layers.{i}.self_attn.q_proj" and "head" not in once.sites
    assert bind_class(once, "LlamaModel") == once
    qa = bind_class(fam, "LlamaForQuestionAnswering")
    assert qa.layers == "transformer.layers.{i}" and qa.sites["head"].path == "qa_outputs"
    bert = bind_class(CATALOG.family("bert"), "BertForMaskedLM")
    assert bert.sites["embed.output"].path.startswith("bert.embeddings") and bert.sites["head"].path == "cls.predictions.decoder"


def test_the_tested_transformers_is_the_declared_range() -> None:
    """pyproject declares the transformers versions the suite runs on (4.57 to 5.x: the maps name the forward
    arguments of both, CI runs the model tests on each end)."""
    import re
    from pathlib import Path

    from packaging.specifiers import SpecifierSet

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    specs = set(re.findall(r'"transformers([<>=!~][^"]*)"', text))
    assert specs, "transformers is not declared"
    for spec in specs:
        assert transformers.__version__ in SpecifierSet(spec), (transformers.__version__, spec)
        assert "4.56.2" not in SpecifierSet(spec)  # the range starts at 4.57, the oldest version CI runs the model tests on
