"""pefref's own small Transformer, in which every site of the reference architecture exists natively.

A pre-norm decoder: token + learned position embeddings, ``L`` layers of
grouped-query self-attention and a GELU feed-forward network, a final norm and
an LM head. Its forward takes the same arguments as a transformers causal LM
(``input_ids``, ``attention_mask``, ``inputs_embeds``, ``past_key_values`` as a
list of ``(key, value)`` per layer, ``labels``), so prompts and prefixes reach it
the same way they reach real models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RefConfig", "RefTransformer", "RefOutput"]


@dataclass
class RefConfig:
    vocab_size: int = 128
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 128
    norm_eps: float = 1e-5


@dataclass
class RefOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class Attention(nn.Module):
    def __init__(self, c: RefConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.d_head = c.hidden_size // c.num_attention_heads
        self.q = nn.Linear(c.hidden_size, self.heads * self.d_head)
        self.k = nn.Linear(c.hidden_size, self.kv_heads * self.d_head)
        self.v = nn.Linear(c.hidden_size, self.kv_heads * self.d_head)
        self.o = nn.Linear(self.heads * self.d_head, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.d_head).transpose(1, 2)  # [b, H, s, dh]
        k = self.k(x).view(b, s, self.kv_heads, self.d_head).transpose(1, 2)  # [b, Hkv, s, dh]
        v = self.v(x).view(b, s, self.kv_heads, self.d_head).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        rep = self.heads // self.kv_heads
        ke, ve = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask)  # [b, H, s, dh]
        return self.o(out.transpose(1, 2).reshape(b, s, -1)), (k, v)


class FFN(nn.Module):
    def __init__(self, c: RefConfig) -> None:
        super().__init__()
        self.up = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = nn.GELU()
        self.down = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Layer(nn.Module):
    def __init__(self, c: RefConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.attn = Attention(c)
        self.ffn_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.ffn = FFN(c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, present = self.attn(self.attn_norm(x), mask, past)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), present


class RefTransformer(nn.Module):
    """The reference Transformer (see module docstring)."""

    def __init__(self, config: RefConfig | None = None, **kwargs: int | float) -> None:
        super().__init__()
        c = config or RefConfig(**kwargs)  # type: ignore[arg-type]
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.pos = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.final_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        labels: torch.Tensor | None = None,
    ) -> RefOutput:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # [b, s, d]
        _b, s, _ = x.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        x = x + self.pos(torch.arange(s, device=x.device))
        total = past_len + s
        causal = torch.ones(s, total, dtype=torch.bool, device=x.device).tril(past_len)  # [s, total]
        mask = causal[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -total:].bool()
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, mask, past_key_values[i] if past_key_values else None)
            presents.append(present)
        logits = self.head(self.final_norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return RefOutput(logits=logits, loss=loss, past_key_values=presents)
