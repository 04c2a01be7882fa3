"""The Python API: apply a technique to a model and get a handle with peft's operations.

>>> handle = pefref.apply(model, technique_id, r=16)      # doctest: +SKIP
>>> handle.report.trainable, handle.merge(), handle.remove()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import nn

from pefref.language.catalog import Catalog, catalog_for, default_catalog
from pefref.language.file_kinds import file_kind
from pefref.language.schema import ArchitectureMap, Technique
from pefref.runtime.adapter import ADAPTERS_ATTR, Adapter
from pefref.runtime.applying import apply_technique, resolve_technique
from pefref.runtime.precision import AdapterDtype
from pefref.runtime.report import Report, ReportRow, fold_paths

if TYPE_CHECKING:
    from pefref.runtime.compose import Composition

__all__ = ["apply", "apply_technique", "resolve_technique", "Adapter", "Report", "ReportRow", "fold_paths", "ADAPTERS_ATTR"]


@overload
def apply(model: nn.Module, technique: Technique, *, sites: Sequence[str] | None = ..., layers: Sequence[int | str] | None = ...,
          family: str | Path | ArchitectureMap | None = ..., name: str | None = ..., dtype: torch.dtype | None = ...,
          device: torch.device | str | None = ..., catalog: Catalog | None = ..., overrides: Mapping[str, Any] | None = ...,
          modules_to_save: Sequence[str] | None = ..., adapter_dtype: AdapterDtype = ...,
          calibration: Iterable[Mapping[str, Any]] | None = ..., **hyperparameters: Any) -> Adapter: ...


@overload
def apply(model: nn.Module, technique: str | Path, *, sites: Sequence[str] | None = ..., layers: Sequence[int | str] | None = ...,
          family: str | Path | ArchitectureMap | None = ..., name: str | None = ..., dtype: torch.dtype | None = ...,
          device: torch.device | str | None = ..., catalog: Catalog | None = ..., overrides: Mapping[str, Any] | None = ...,
          modules_to_save: Sequence[str] | None = ..., adapter_dtype: AdapterDtype = ...,
          calibration: Iterable[Mapping[str, Any]] | None = ..., **hyperparameters: Any) -> Adapter | Composition: ...


def apply(
    model: nn.Module,
    technique: str | Path | Technique,
    *,
    sites: Sequence[str] | None = None,
    layers: Sequence[int | str] | None = None,
    family: str | Path | ArchitectureMap | None = None,
    name: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    catalog: Catalog | None = None,
    overrides: Mapping[str, Any] | None = None,
    modules_to_save: Sequence[str] | None = None,
    adapter_dtype: AdapterDtype = "auto",
    calibration: Iterable[Mapping[str, Any]] | None = None,
    **hyperparameters: Any,
) -> Adapter | Composition:
    """Apply a technique to ``model`` and return its :class:`Adapter` handle.

    Args:
        model: a torch model of a family with an architecture map (or pass ``family``).
        technique: a catalog id, a :class:`Technique`, or a YAML path; a composition file
            (``catalog/compositions/``) gives a :class:`~pefref.runtime.compose.Composition` instead
            (so a name or path is typed ``Adapter | Composition``, a :class:`Technique` ``Adapter``; the
            entry points typed for one of them: :func:`~pefref.runtime.applying.apply_technique`,
            :func:`~pefref.runtime.compose.apply_composition`).
        sites: where the modules go: the technique's own sites narrow it; other sites, patterns
            (``attn.*``) and selectors (``all-linear``) place its modules on every compatible site
            (see :mod:`pefref.language.placement`).
        layers: restrict to some layers (indices, negative from the end; in encoder-decoder maps also stack names, e.g. 'decoder').
        family: architecture map name, object or YAML path (default: found from the model's class).
        name: adapter name (default: the technique id); several adapters may coexist.
        dtype, device: for the adapter's tensors (default: the host's device; the dtype by ``adapter_dtype``).
        adapter_dtype: ``"auto"`` (default, peft's ``autocast_adapter_dtype=True``): on a bf16/fp16 host the
            adapter's tensors are fp32 and it computes in fp32, rounding its result once to the host's dtype;
            ``"host"``: the adapter's tensors in the host's dtype.
        overrides / **hyperparameters: hyperparameter values, e.g. ``r=16``.
        modules_to_save: whole modules trained and saved with the adapter (peft's
            ``modules_to_save``): sites such as ``head`` (the class's task head) or module paths.
        calibration: batches (an iterable of model input dicts, with labels where a loss gradient is declared)
            from which a technique whose modules declare calibration statistics (``calibration:``) initialises;
            gathered in one pass, the model left as it was. Refused when such a technique is applied without them.
            A composition passes them to each member (give a list: each member that declares statistics reads it).
    """
    path = None if isinstance(technique, Technique) else Path(technique)
    is_file = path is not None and path.suffix in (".yaml", ".yml")
    if catalog is None:  # a catalog id loads only what it needs
        catalog = catalog_for(technique) if isinstance(technique, str) and not is_file else default_catalog()
    if path is not None and is_file and file_kind(path) == "composition":  # told apart once, from the table of file kinds
        from pefref.runtime.compose import apply_composition  # a composition file: several adapters and their blocks

        return apply_composition(model, path, catalog=catalog, name=name, family=family, dtype=dtype, device=device, adapter_dtype=adapter_dtype,
                                 **({"calibration": calibration} if calibration is not None else {}))
    return apply_technique(model, technique, catalog, sites=sites, layers=layers, family=family, name=name, dtype=dtype, device=device,
                           hyperparameters={**(overrides or {}), **hyperparameters}, modules_to_save=modules_to_save, adapter_dtype=adapter_dtype,
                           calibration=calibration)
