"""Any torch model works through an architecture map written in YAML."""

from __future__ import annotations

import textwrap

import torch
from torch import nn

from pefref.runtime.api import apply


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.wq = nn.Linear(d, d)
        self.wv = nn.Linear(d, d)
        self.mix = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.wq(x) @ x.transpose(1, 2), -1) @ self.wv(x)
        x = x + self.mix(a)
        return x + self.fc2(torch.relu(self.fc1(x)))


class Custom(nn.Module):
    def __init__(self, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


MAP = textwrap.dedent(
    """\
    family: custom
    description: a hand-made model with its own module names
    model_type: null
    sizes: {d: "16", d_ff: "32", L: "3", heads: "1", kv_heads: "1", d_head: "16", vocab: "1"}
    layers: "blocks.{i}"
    base_params: "0"
    sites:
      attn.q: {path: "blocks.{i}.wq"}
      attn.v: {path: "blocks.{i}.wv"}
      ffn.act: {path: "blocks.{i}.fc2", side: input}
    """
)


def test_user_written_map(tmp_path, catalog) -> None:
    path = tmp_path / "custom.yaml"
    path.write_text(MAP)
    torch.manual_seed(0)
    model = Custom().eval()
    x = torch.randn(2, 5, 16)
    base = model(x)
    a = apply(model, "lora", family=path, r=2)
    assert [r.site for r in a.report.rows] == ["attn.q", "attn.v"]
    assert a.report.rows[0].paths == ["blocks.0.wq", "blocks.1.wq", "blocks.2.wq"]
    assert a.report.trainable == 3 * 2 * 2 * (16 + 16)
    torch.testing.assert_close(model(x), base)  # LoRA starts as the identity
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.normal_()
    assert (model(x) - base).abs().max() > 1e-3
    a.remove()
    torch.testing.assert_close(model(x), base)
    b = apply(model, "ia3", family=path, sites=["ffn.act"])
    assert b.report.trainable == 3 * 32
    with torch.no_grad():
        for p in b.trainable_parameters():
            p.fill_(2.0)
    # doubling fc2's input doubles its weight contribution: check against the hand computation
    blk = model.blocks[0]
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(blk.fc2(h), torch.nn.functional.linear(2 * h, blk.fc2.weight, blk.fc2.bias))
