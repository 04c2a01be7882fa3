"""Adapter files: read and verify everything before a single value is copied into a model.

:func:`read_verified` opens a safetensors file written by ``Adapter.save`` and
checks it against the adapter it is loaded into: the technique id, the
hyperparameters, the model family, and every tensor's name, shape and dtype
(read from the header, before any data is loaded), then every value's
finiteness. Any difference, and any unreadable or corrupt file, is a
:class:`~pefref.language.errors.PefrefError` naming the file and what differs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from pefref.language.errors import PefrefError
from pefref.runtime.precision import loads_exactly

__all__ = ["metadata_of", "read_verified", "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def metadata_of(adapter: Any) -> dict[str, str]:
    """The metadata ``save`` writes: technique, hyperparameters (JSON) and family."""
    return {
        "technique": adapter.technique.id,
        "hyperparameters": json.dumps(adapter.hyperparameters, sort_keys=True),
        "family": adapter.family.family,
    }


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return bool(a == b)


def _check_metadata(where: str, meta: dict[str, str], adapter: Any) -> None:
    tid = meta.get("technique")
    if tid is None:
        raise PefrefError(f"{where}: not a pefref adapter file (its metadata names no technique)")
    if tid != adapter.technique.id:
        raise PefrefError(f"{where}: the file holds technique {tid!r}, the adapter is {adapter.technique.id!r}")
    fam = meta.get("family")
    if fam is not None and fam != adapter.family.family:
        raise PefrefError(f"{where}: the file was saved from a model of family {fam!r}, the adapter is on family {adapter.family.family!r}")
    try:
        hps = json.loads(meta.get("hyperparameters", "{}"))
    except (ValueError, RecursionError):
        raise PefrefError(f"{where}: its hyperparameters metadata is not valid JSON") from None
    if not isinstance(hps, dict):
        raise PefrefError(f"{where}: its hyperparameters metadata is not a mapping")
    own = adapter.hyperparameters
    differ = sorted(k for k in set(hps) | set(own) if k not in hps or k not in own or not _same_value(hps[k], own[k]))
    if differ:
        parts = [f"{k}={hps.get(k, '<missing>')!r} in the file, {own.get(k, '<missing>')!r} in the adapter" for k in differ[:4]]
        raise PefrefError(f"{where}: hyperparameters differ: {'; '.join(parts)}")


def read_verified(path: str | Path, adapter: Any, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of the adapter file at ``path``, verified against ``adapter`` and its state ``own``."""
    where = str(path)
    try:
        from safetensors import safe_open

        with safe_open(where, "pt") as f:
            meta = dict(f.metadata() or {})
            _check_metadata(where, meta, adapter)
            keys = sorted(f.keys())
            missing, unexpected = sorted(set(own) - set(keys)), sorted(set(keys) - set(own))
            if missing or unexpected:
                raise PefrefError(f"{where}: tensors do not match the adapter: missing {missing[:5]}, unexpected {unexpected[:5]}")
            for k in keys:
                sl = f.get_slice(k)
                shape, dt = tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype())
                if shape != tuple(own[k].shape):
                    raise PefrefError(f"{where}: tensor {k}: shape {shape} in the file, {tuple(own[k].shape)} in the adapter")
                if not loads_exactly(dt, own[k].dtype):
                    raise PefrefError(f"{where}: tensor {k}: dtype {sl.get_dtype()} in the file, {own[k].dtype} in the adapter (convert it explicitly)")
            tensors = {k: f.get_tensor(k) for k in keys}
    except PefrefError:
        raise
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PefrefError(f"{where}: not a readable safetensors adapter file ({reason})") from None
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PefrefError(f"{where}: tensor {k} holds NaN or infinite values")
    return tensors
