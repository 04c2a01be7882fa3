"""Build real models from named shapes: transformers architectures from configs (random
weights, nothing downloaded) or pefref's reference Transformer."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from pefref.language.catalog import Catalog, default_catalog
from pefref.language.connections import sites_read
from pefref.language.errors import PefrefError
from pefref.language.schema import ArchitectureMap, ModelShape

__all__ = ["build_model", "applicable"]

_AUTO = {
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "question_answering": "AutoModelForQuestionAnswering",
    "base": "AutoModel",
}


def build_model(shape: ModelShape | str, catalog: Catalog | None = None, *, device: str | torch.device | None = None, seed: int | None = 0) -> nn.Module:
    """A model of ``shape`` with random weights (``device='meta'`` allocates nothing), in eval mode."""
    catalog = catalog or default_catalog()
    if isinstance(shape, str):
        try:
            shape = catalog.shape(shape)
        except KeyError as e:
            raise PefrefError(e.args[0]) from None
    fam = catalog.family(shape.family)
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device) if device is not None else _nullctx():
        model = _build(fam, dict(shape.config))
    return model.eval()


def _build(fam: ArchitectureMap, config: dict[str, Any]) -> nn.Module:
    if fam.model_type is None:
        from pefref.models.reference import RefConfig, RefTransformer

        return RefTransformer(RefConfig(**config))
    try:
        import transformers
    except ImportError:  # pragma: no cover - an install without the hf extra
        raise PefrefError("building transformers models needs the 'hf' extra: pip install 'pefref[hf]'") from None
    cfg = transformers.AutoConfig.for_model(fam.model_type, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, _AUTO[fam.task]).from_config(cfg)


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def applicable(modules: list[Any], fam: ArchitectureMap) -> bool:
    """Whether a family binds every site the modules use (attach to, or read through a connection)."""
    return all(s in fam.sites for m in modules for s in sites_read(m))
