"""A technique's token loss (``loss:``): the distinct-rank op, the loss pefref run computes equal to the model
forward's, refusals that leave the model as it was, and the call's per-token input kept out of the model."""

from __future__ import annotations

import copy

import pytest
import torch

from pefref.experiments.evaluation import batch_count, batch_loss, with_token_loss
from pefref.language.errors import PefrefError
from pefref.models.build import build_model
from pefref.ops import op_table
from pefref.runtime.api import apply
from pefref.runtime.token_loss import token_loss_in

from .parity import padded_batch

HPS = {"ids": [28, 58, 70, 32, 11, 45], "types": [1, 2, 4, 5, 6, 8], "decay": 0.5}


def _inputs() -> dict[str, torch.Tensor]:
    b = padded_batch("tiny-llama")
    return {**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100),
            "input_type_mask": torch.tensor([[0, 0, 1, 2, 4, 4, 4], [1, 2, 4, 5, 6, 8, 8]])}


def test_distinct_above_counts_the_larger_masked_values_of_each_row() -> None:
    f = op_table()["distinct_above"]
    x = torch.tensor([[3, 7, 7, 5, 9], [1, 1, 2, 2, 0]])
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]])
    assert f(x, m).tolist() == [[1, 0, 0, 1, 0], [1, 1, 0, 0, 2]]


def test_the_run_loss_is_the_model_forward_loss() -> None:
    """pefref run's summed loss over the token loss's targets, divided by their count, is outputs.loss."""
    model = build_model("tiny-llama", seed=0).eval()
    ad = apply(model, "cpt", **HPS)
    with torch.no_grad():
        next(iter(ad.units.values())).D.normal_(std=0.01)
        inputs = _inputs()
        want = model(**inputs).loss
        tl = token_loss_in([ad])
        batch = with_token_loss(inputs, tl)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        got = batch_loss(logits, batch, True) / batch_count(batch, True)
    assert batch["targets"].shape == (2, 6 + 7 - 1)
    assert abs(float(got) - float(want)) <= 1e-6
    plain = with_token_loss(inputs, None)
    assert "targets" not in plain and abs(float(batch_loss(logits[:, 6:], plain, True) / batch_count(plain, True)) - float(want)) > 1e-3


def test_disabled_adapter_keeps_the_models_own_loss() -> None:
    model = build_model("tiny-llama", seed=0).eval()
    base = copy.deepcopy(model)
    ad = apply(model, "cpt", **HPS)
    inputs = _inputs()
    with torch.no_grad(), ad.disable():
        got = model(**inputs).loss
    want = base(**{k: v for k, v in inputs.items() if k != "input_type_mask"}).loss
    assert torch.equal(got, want)


PROMPT = """\
id: typed_prompt
name: Typed prompt
paper: {title: "A test technique", authors: pefref tests, year: 2024, arxiv: "2401.00001"}
hyperparameters:
  n: {type: int, default: 3, min: 1}
  kinds: {type: ints, default: [1, 2, 4], min: 0}
loss:
  prompt_types: kinds
  keep: "1 - min(type % 4, 1)"
modules:
  - name: prompt
    sites: [embed.output]
    form: prepend
    length: n
    params:
      P: {shape: [n, d], init: normal(std=0.02)}
    tokens: P
"""


def test_prompt_types_of_another_length_are_refused_and_the_model_is_unchanged(tmp_path) -> None:
    """Valid on its defaults, the technique is refused where an override gives the prompt another length than its
    types: the error names the loss, and the model comes back as it was."""
    path = tmp_path / "typed_prompt.yaml"
    path.write_text(PROMPT)
    model = build_model("tiny-llama", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply(copy.deepcopy(model), path).token_loss is not None
    with pytest.raises(PefrefError, match="prompt_types gives 3 position"):
        apply(model, path, n=4)
    assert not hasattr(model, "_pefref_inputs") and "forward" not in model.__dict__ and not model._forward_hooks
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_pefref_run_trains_and_evaluates_with_the_token_loss(tmp_path, monkeypatch) -> None:
    """A causal LM run of CPT (accumulated micro-batches) computes its training and evaluation losses with the
    technique's token loss: its targets span the prompt's positions too."""
    import math

    from pefref.experiments import evaluation
    from pefref.experiments.results import load_results
    from pefref.experiments.runner import run_experiment

    from .test_experiments import write_exp

    seen: list[tuple[int, ...]] = []
    real = evaluation.with_token_loss

    def spy(batch, token_loss):  # type: ignore[no-untyped-def]
        out = real(batch, token_loss)
        seen.append(tuple(out["targets"].shape) if "targets" in out else ())
        return out

    monkeypatch.setattr(evaluation, "with_token_loss", spy)
    monkeypatch.setattr("pefref.experiments.train.with_token_loss", spy)
    p = write_exp(tmp_path, "  - technique: cpt\n    hyperparameters: {decay: 0.5}", task="causal_lm", model="{shape: tiny-llama}",
                  training=", grad_accum: 2, max_steps: 2")
    p.write_text(p.read_text().replace("max_steps: 6, ", ""))
    out = run_experiment(p, tmp_path / "o", progress=False)
    assert len(out.done) == 1, out.failed
    run = load_results(tmp_path / "o").runs[0]
    assert math.isfinite(run.final["loss"])
    assert seen and all(s and s[1] > 4 for s in seen)  # every batch, training and evaluation, carries the prompt's targets
