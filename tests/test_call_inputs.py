"""Inputs of the model's call that modules read: per-example task ids and token ids.

Poly and multitask prompt tuning with several tasks equal peft 0.21's (each
example's task id picks its task's skill allocation, or its task's prompt
modulation), and aLoRA (LoRA from the last occurrence of its invocation tokens
in the call's input_ids on) equals peft's LoRA with alora_invocation_tokens:
fp32 outputs within 1e-5 (Poly in training mode too: the same seed gives the
same draws), equal trainable counts, the adapter changes the output, and peft's
format reads both ways. Task ids come as ``task_ids=`` on the model's call or from
``adapter.inputs(task_ids=...)``; a module that needs them and gets none is
refused with a message saying how to pass them.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import peft
import pytest
import torch

from pefref.language.errors import PefrefError
from pefref.models.build import build_model
from pefref.runtime.api import apply

from .conftest import output_of
from .parity import max_diff, padded_batch

TOL = 1e-5
SHAPE = "tiny-llama"
TASKS = torch.tensor([2, 1])


def _poly_pair() -> tuple[torch.nn.Module, torch.nn.Module, object]:
    base = build_model(SHAPE, seed=0)
    cfg = peft.PolyConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, n_tasks=3, n_skills=3, n_splits=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model = copy.deepcopy(base)
    adapter = apply(model, "poly", r=4, n_tasks=3, n_skills=3, n_splits=2)
    with torch.no_grad():
        for key, unit in adapter.units.items():
            module, site, layer = key.split("__")
            host = pm.get_base_model().model.layers[int(layer)].self_attn
            peft_layer = host.q_proj if site == "attn_q" else host.v_proj
            if module == "router":
                unit.logits.copy_(peft_layer.poly_router["default"].module_logits)
            else:
                unit.A.copy_(peft_layer.poly_lora_A["default"])
                unit.B.copy_(peft_layer.poly_lora_B["default"])
    return pm, model, adapter


def _out(model: torch.nn.Module, **extra: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model, {**padded_batch(SHAPE), **extra})


def test_poly_with_several_tasks_matches_peft() -> None:
    pm, model, adapter = _poly_pair()
    want = _out(pm, task_ids=TASKS)
    assert max_diff(_out(model, task_ids=TASKS), want) <= TOL
    with adapter.inputs(task_ids=TASKS):  # the same, given for the calls that pass none
        assert max_diff(_out(model), want) <= TOL
    assert max_diff(_out(model, task_ids=torch.tensor([0, 0])), _out(model)) == 0  # no task ids: task 0 (the default)
    assert max_diff(want, _out(pm, task_ids=torch.tensor([0, 0]))) > 1e-4  # the task ids matter
    assert max_diff(want, _out(build_model(SHAPE, seed=0))) > 1e-3  # the adapter changes the output
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert adapter.report is not None and adapter.report.trainable == n_peft


def test_poly_with_several_tasks_draws_as_peft_in_training() -> None:
    pm, model, _adapter = _poly_pair()
    pm.train()
    model.train()
    for seed in (5, 6):
        torch.manual_seed(seed)
        want = _out(pm, task_ids=TASKS)
        torch.manual_seed(seed)
        assert max_diff(_out(model, task_ids=TASKS), want) <= TOL


NEEDS_TASKS = """
id: per_task_bias
name: A bias per task
paper: {title: t, authors: a, year: 2024, url: "https://example.org"}
hyperparameters: {n_tasks: {type: int, default: 3, min: 1}}
modules:
  - name: bias
    sites: [attn.o]
    form: parallel
    inputs:
      task: {call: task_ids}
      ids: {call: input_ids}
    params:
      t: {shape: [n_tasks, d_out], init: "normal(std=0.5)"}
      E: {shape: [vocab, d_out], init: "normal(std=0.5)"}
    compute: unsqueeze(index_select(t, 0, task), -2) + take(E, ids)
"""


def test_a_module_needing_task_ids_refuses_a_call_without_them(tmp_path: Path) -> None:
    path = tmp_path / "per_task_bias.yaml"
    path.write_text(NEEDS_TASKS)
    model = build_model(SHAPE, seed=0)
    base = _out(model)
    adapter = apply(model, str(path))
    with pytest.raises(PefrefError, match="task_ids=.*adapter.inputs"):
        _out(model)
    a, b = _out(model, task_ids=torch.tensor([0, 2])), _out(model, task_ids=torch.tensor([1, 2]))
    assert max_diff(a[1], b[1]) == 0 and max_diff(a[0], b[0]) > 1e-4  # each example reads its own task's row
    with torch.no_grad():
        adapter.units["bias__attn_o__0"].E.zero_()
    assert max_diff(_out(model, task_ids=torch.tensor([0, 2])), a) > 1e-4  # and its tokens' rows
    assert max_diff(a, base) > 1e-4
    adapter.remove()
    assert torch.equal(_out(model), base)


def test_poly_with_several_tasks_reads_from_peft_and_back(tmp_path: Path) -> None:
    """peft's save of a three-task Poly reads into pefref (same outputs per task id), and pefref's save into peft."""
    import pefref

    pm, _model, _adapter = _poly_pair()
    want = _out(pm, task_ids=TASKS)
    pm.save_pretrained(tmp_path / "peft")
    back = pefref.from_pretrained(build_model(SHAPE, seed=0), tmp_path / "peft")
    assert back.hyperparameters["n_tasks"] == 3
    assert max_diff(_out(back.model, task_ids=TASKS), want) <= TOL
    back.save_pretrained(tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(build_model(SHAPE, seed=0), tmp_path / "again").eval()
    assert max_diff(_out(again, task_ids=TASKS), want) <= TOL


INVOKE = (5, 7)


def _invoked_batch() -> dict[str, torch.Tensor]:
    """The padded batch with the invocation twice in the first row (the last one counts) and not in the second."""
    batch = padded_batch(SHAPE)
    ids = batch["input_ids"].clone()
    ids[ids == 5] = 6
    ids[0, 2:4] = torch.tensor(INVOKE)
    ids[0, 4:6] = torch.tensor(INVOKE)
    return {**batch, "input_ids": ids}


def _alora_pair() -> tuple[torch.nn.Module, torch.nn.Module, object]:
    base = build_model(SHAPE, seed=0)
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, alora_invocation_tokens=list(INVOKE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model = copy.deepcopy(base)
    adapter = apply(model, "alora", r=4, alpha=8, tokens=list(INVOKE))
    with torch.no_grad():
        for key, unit in adapter.units.items():
            _m, site, layer = key.split("__")
            host = pm.get_base_model().model.layers[int(layer)].self_attn
            peft_layer = host.q_proj if site == "attn_q" else host.v_proj
            unit.A.copy_(peft_layer.lora_A["default"].weight)
            unit.B.copy_(peft_layer.lora_B["default"].weight)
    return pm, model, adapter


def test_alora_matches_peft_and_is_the_base_model_before_the_invocation() -> None:
    pm, model, adapter = _alora_pair()
    batch = _invoked_batch()
    with torch.no_grad():
        want, got = output_of(pm, batch), output_of(model, batch)
        plain = output_of(build_model(SHAPE, seed=0), batch)
    assert max_diff(got, want) <= TOL
    assert max_diff(got[0, 4:], plain[0, 4:]) > 1e-3  # active from the last invocation on
    assert max_diff(got[0, :4], plain[0, :4]) <= TOL and max_diff(got[1], plain[1]) <= TOL  # the base model elsewhere
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert adapter.report is not None and adapter.report.trainable == n_peft
    assert not adapter.mergeable_units


def test_alora_reads_from_peft_and_back(tmp_path: Path) -> None:
    import pefref

    pm, _model, _adapter = _alora_pair()
    batch = _invoked_batch()
    with torch.no_grad():
        want = output_of(pm, batch)
    pm.save_pretrained(tmp_path / "peft")
    back = pefref.from_pretrained(build_model(SHAPE, seed=0), tmp_path / "peft")
    assert back.technique.id == "alora" and back.hyperparameters["tokens"] == INVOKE
    with torch.no_grad():
        assert max_diff(output_of(back.model, batch), want) <= TOL
    back.save_pretrained(tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(build_model(SHAPE, seed=0), tmp_path / "again").eval()
    assert again.peft_config["default"].alora_invocation_tokens == list(INVOKE)
    with torch.no_grad():
        assert max_diff(output_of(again, batch), want) <= TOL


@pytest.mark.parametrize(("tid", "call"), [("alora", "input_ids"), ("poly", "task_ids")])
def test_diagram_draws_the_call_input_into_every_reader(tid: str, call: str) -> None:
    from pefref.language.catalog import default_catalog
    from pefref.render.diagram import technique_graph, to_dot

    cat = default_catalog()
    g = technique_graph(cat, [cat.technique(tid)])
    node = f"call_{tid}_{call}"
    assert g.nodes[node]["role"] == "call_input"
    readers = {n for n, a in g.nodes(data=True) if a.get("role") == "module" and a.get("module") == ("lora" if tid == "alora" else "router")}
    assert readers and {v for _u, v, a in g.out_edges(node, data=True) if a["role"] == "connection"} == readers
    assert f"{call}: [batch" in to_dot(g)


def test_multitask_prompt_tuning_with_several_tasks_matches_peft(tmp_path: Path) -> None:
    import pefref

    base = build_model(SHAPE, seed=0)
    cfg = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=3, num_ranks=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model = copy.deepcopy(base)
    adapter = apply(model, "multitask_prompt_tuning", n=4, k=2, n_tasks=3)
    (unit,) = adapter.units.values()
    enc = pm.prompt_encoder["default"]
    with torch.no_grad():
        unit.P.copy_(enc.embedding.weight)
        unit.U.copy_(enc.prefix_task_cols)
        unit.V.copy_(enc.prefix_task_rows)
    want = _out(pm, task_ids=TASKS)
    assert max_diff(_out(model, task_ids=TASKS), want) <= TOL
    assert max_diff(want, _out(pm, task_ids=torch.tensor([0, 0]))) > 1e-4  # the task ids matter
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert adapter.report is not None and adapter.report.trainable == n_peft
    pm.save_pretrained(tmp_path / "peft")
    back = pefref.from_pretrained(build_model(SHAPE, seed=0), tmp_path / "peft")
    assert back.hyperparameters["n_tasks"] == 3
    assert max_diff(_out(back.model, task_ids=TASKS), want) <= TOL
