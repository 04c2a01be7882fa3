"""Whole modules trained and saved with an adapter (peft's ``modules_to_save``), e.g. a task head.

``pefref.apply(model, technique, modules_to_save=["head"])`` trains every
parameter of the named modules alongside the technique's own: a name is a site
of the family's map as bound to the model's class (``head``: the class's task
head, ``score`` of ``LlamaForSequenceClassification`` or ``classifier`` of
``BertForTokenClassification``) or a module path. The parameters become the
adapter's *selected* host parameters: they are in its state and its saved file,
``disable()`` computes with their base values and ``remove()`` restores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from pefref.language.errors import SiteError
from pefref.language.loader import suggest
from pefref.language.schema import ArchitectureMap

__all__ = ["SAVED_MODULE", "SavedModule", "resolve_saved", "select_saved"]

SAVED_MODULE = "modules_to_save"
"""The module name of the report rows of saved modules."""


@dataclass(frozen=True)
class SavedModule:
    """One module to train and save whole: the name it was asked by and its path."""

    label: str
    path: str
    module: nn.Module


def resolve_saved(model: nn.Module, fam: ArchitectureMap, names: Sequence[str], L: int) -> list[SavedModule]:
    """The modules named by ``names`` (sites of ``fam`` or module paths); nothing is changed.

    Raises:
        SiteError: a name that is neither a module-bound site of the map nor a module path.
    """
    out: list[SavedModule] = []
    for name in names:
        b = fam.sites.get(name)
        if b is not None:
            if not b.path or b.cache or b.slice is not None or b.side == "input":
                raise SiteError(f"modules_to_save: site {name!r} is not a whole module in family {fam.family!r}")
            paths = [b.path.format(i=i) for i in range(L)] if "{i}" in b.path else [b.path]
        else:
            paths = [name]
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                mods = [n for n, _ in model.named_modules() if n]
                extra = " (this model class has no task head)" if name == "head" else ""
                raise SiteError(f"modules_to_save: the model has no module {path!r}{extra}{suggest(path, [*mods, *fam.sites])}") from None
            if not any(True for _ in module.parameters()):
                raise SiteError(f"modules_to_save: module {path!r} has no parameters")
            out.append(SavedModule(name, path, module))
    return out


def select_saved(saved: Sequence[SavedModule], selected: dict[str, nn.Parameter], backup: dict[str, object]) -> dict[str, tuple[list[str], int]]:
    """Unfreeze the saved modules' parameters into an adapter's ``selected`` (with base-value backups).

    Returns, per requested name, the module paths and the number of parameters selected.
    """
    rows: dict[str, tuple[list[str], int]] = {}
    for s in saved:
        paths, n = rows.get(s.label, ([], 0))
        for pname, p in s.module.named_parameters():
            full = f"{s.path}.{pname}"
            if full in selected:
                continue
            p.requires_grad_(True)
            selected[full] = p
            backup.setdefault(full, p.detach().clone())
            n += p.numel()
        rows[s.label] = ([*paths, s.path], n)
    return rows
