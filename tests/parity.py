"""Helpers shared by the parity tests against HF peft."""

from __future__ import annotations

import torch

from pefref.language.catalog import default_catalog

__all__ = ["padded_batch", "max_diff", "cache_kw"]


def padded_batch(shape: str) -> dict[str, torch.Tensor]:
    """Two sequences of 7 tokens for ``shape``, the first left-padded by 2."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, default_catalog().shape(shape).config.get("vocab_size", 128), (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two tensors of the same shape."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def cache_kw(model: torch.nn.Module) -> str:
    """The name under which ``model``'s forward takes the key/value cache with the installed transformers
    (``cache`` in 5.x, ``past_key_values`` in 4.x), as the family maps give it."""
    import inspect

    name = default_catalog().family("gpt2").forward.cache_arg(inspect.signature(model.forward).parameters)
    assert name is not None, type(model).__name__
    return name
