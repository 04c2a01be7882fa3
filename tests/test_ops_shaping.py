"""Shaping and routing ops, row-selecting initialisers, and `pefref ops`: each against torch, through the expression language."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.language.expr import ExprError, evaluate, parse_expr
from pefref.ops import PRIMITIVES, op_table
from pefref.ops.inits import INITS, init_table
from pefref.runtime.api import apply

from .conftest import tiny_model

ISSUE_OPS = ("reshape", "unsqueeze", "squeeze", "einsum", "gather", "index_select", "narrow", "topk", "softmax", "argmax")


def _ev(text: str, **env: object) -> object:
    return evaluate(parse_expr(text), env, op_table())


def test_the_ops_are_registered_with_documentation() -> None:
    for name in ISSUE_OPS:
        assert name in PRIMITIVES, name
        assert len(PRIMITIVES[name].doc) > 30, name


def test_ops_agree_with_torch() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 6, generator=g)
    B = torch.randn(6, 4, generator=g)
    idx = torch.tensor([[[0, 2], [1, 1], [5, 0]]] * 2)
    assert torch.equal(_ev("reshape(a, (2, -1))", a=a), a.reshape(2, -1))
    assert torch.equal(_ev("unflatten(a, -1, (2, 3))", a=a), a.reshape(2, 3, 2, 3))
    assert torch.equal(_ev("squeeze(unsqueeze(a, -2), -2)", a=a), a)
    assert _ev("unsqueeze(a, 1)", a=a).shape == (2, 1, 3, 6)
    torch.testing.assert_close(_ev("einsum('...i,ij->...j', a, B)", a=a, B=B), a @ B)
    assert torch.equal(_ev("gather(a, -1, i)", a=a, i=idx), torch.gather(a, -1, idx))
    assert torch.equal(_ev("index_select(a, -1, (4, 0))", a=a), a[..., [4, 0]])
    assert torch.equal(_ev("narrow(a, -1, 1, 3)", a=a), a[..., 1:4])
    vals, ind = torch.topk(a, 2, dim=-1)
    assert torch.equal(_ev("topk(a, 2)", a=a), vals) and torch.equal(_ev("topk_indices(a, 2)", a=a), ind)
    assert torch.equal(_ev("argmax(a, dim=1)", a=a), a.argmax(1))
    torch.testing.assert_close(_ev("softmax(a, dim=1)", a=a), torch.softmax(a, 1))
    # a top-k gate: softmax over the k largest entries, zero elsewhere
    gate = _ev("scatter(zeros_like(a), -1, topk_indices(a, 2), softmax(topk(a, 2), dim=-1))", a=a)
    assert torch.equal((gate > 0).sum(-1), torch.full((2, 3), 2))
    torch.testing.assert_close(gate.sum(-1), torch.ones(2, 3))
    assert torch.equal(_ev("cat((a, a), dim=0)", a=a), torch.cat([a, a]))
    torch.testing.assert_close(_ev("mean(a, dim=1)", a=a), a.mean(1))


def test_only_einsum_subscripts_are_string_literals() -> None:
    parse_expr("einsum('...e,eor->...o', g, B)")
    for bad in ("einsum('import os', g)", "f('a;b')", "'x' + 1"):
        with pytest.raises(ExprError, match="einsum subscripts"):
            parse_expr(bad)


def test_the_subscript_error_names_an_existing_op() -> None:
    with pytest.raises(ExprError) as e:
        parse_expr("x[0]")
    suggested = re.search(r"e\.g\. (\w+)", e.value.message).group(1)
    assert suggested in PRIMITIVES


def test_rows_initialiser_selects_host_rows() -> None:
    W = torch.randn(50, 8)
    t = evaluate(parse_expr("rows(W, ids=(5, 17, 42))"), {"W": W}, init_table((7, 8), torch.float32, "cpu"))
    assert torch.equal(t, W[[5, 17, 42, 5, 17, 42, 5]])
    with pytest.raises(ValueError, match="rows of W"):
        evaluate(parse_expr("rows(W, ids=(50,))"), {"W": W}, init_table((2, 8), torch.float32, "cpu"))
    s = evaluate(parse_expr("sampled_rows(W, high=10)"), {"W": W}, init_table((6, 8), torch.float32, "cpu"))
    assert all(any(torch.equal(r, W[j]) for j in range(10)) for r in s)


def test_a_prompt_starts_from_chosen_vocabulary_rows(tmp_path) -> None:
    spec = {
        "id": "text_prompt", "name": "Prompt from vocabulary rows",
        "paper": {"title": "t", "authors": "a", "year": 2021, "arxiv": "2104.08691"},
        "hyperparameters": {"n": {"type": "int", "default": 5}},
        "modules": [{"name": "prompt", "sites": ["embed.output"], "form": "prepend", "length": "n",
                     "params": {"P": {"shape": ["n", "d"], "init": "rows(W, ids=(3, 9, 4))"}}, "tokens": "P"}],
    }
    p = tmp_path / "text_prompt.yaml"
    p.write_text(yaml.safe_dump(spec))
    model = tiny_model("gpt2")
    table = model.get_input_embeddings().weight
    a = apply(model, p)
    state = a.state_dict()
    assert [tuple(v.shape) for v in state.values()] == [(5, table.shape[1])]  # the rows, not the table
    assert torch.equal(next(iter(state.values())), table.detach()[[3, 9, 4, 3, 9]])


def test_ops_cli_lists_every_op_and_initialiser() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["ops", "--json"])
    assert res.exit_code == 0, res.output
    docs = json.loads(res.output)
    names = {(d["kind"], d["name"]) for d in docs}
    assert names == {("op", n) for n in PRIMITIVES} | {("initialiser", n) for n in INITS}
    by = {d["name"]: d for d in docs if d["kind"] == "op"}
    assert by["narrow"]["signature"] == "narrow(a, dim, start, length)"
    assert by["dropout"]["signature"] == "dropout(a, p)"  # the compiler supplies training
    assert all(d["doc"] for d in docs)
    text = runner.invoke(app, ["ops"]).output
    assert "topk_indices(a, k, dim=-1)" in text and "rows(W, ids)" in text
