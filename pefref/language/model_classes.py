"""Every model class of a family through one architecture map.

A map writes its paths for one class (``backbone`` says where the base model
sits in them: ``model`` for ``LlamaForCausalLM``, ``''`` for ``BertModel``). Each
class the map lists says where *its* backbone sits and which module is its task
head; :func:`bind_class` rewrites the map's paths for that class, so
``LlamaModel``, ``LlamaForSequenceClassification`` and ``BertForMaskedLM`` all
resolve through the same sites.
"""

from __future__ import annotations

from typing import Any

from pefref.language.schema import ArchitectureMap, ModelClass, SiteBinding

__all__ = ["bind_class", "head_path"]


def _move(path: str | None, old: str, new: str) -> str | None:
    """``path`` with the backbone prefix ``old`` replaced by ``new`` (paths outside the backbone unchanged)."""
    if path is None or old == new:
        return path
    if old == "":
        rest = path
    elif path == old:
        rest = ""
    elif path.startswith(old + "."):
        rest = path[len(old) + 1:]
    else:
        return path
    return ".".join(p for p in (new, rest) if p)


def _check_version(fam: ArchitectureMap) -> None:
    """Refuse a map written for other transformers versions than the installed one (a layout that changed)."""
    from pefref.language.errors import PefrefError
    from pefref.language.schema.family import installed_transformers

    version = installed_transformers()
    if fam.transformers is not None and version is not None and not fam.transformers.holds(version):
        span = " ".join(x for x in (f">= {fam.transformers.since}" if fam.transformers.since else "",
                                    f"< {fam.transformers.until}" if fam.transformers.until else "") if x)
        raise PefrefError(f"family {fam.family!r} is mapped for transformers {span}; the installed {'.'.join(map(str, version))} "
                          "lays its models out differently")


def bind_class(fam: ArchitectureMap, cls: str) -> ArchitectureMap:
    """The map with its paths for model class ``cls`` (unchanged for a class it does not list).

    Binding is idempotent: the result lists only ``cls``, with its backbone and head as bound.
    """
    _check_version(fam)
    mc = fam.classes.get(cls)
    if mc is None:
        return fam
    old = fam.backbone
    new = old if mc.backbone is None else mc.backbone
    explicit_head = "head" in mc.model_fields_set
    sites = {}
    for name, b in fam.sites.items():
        if name == "head" and explicit_head:
            continue
        sites[name] = b.model_copy(update={"path": _move(b.path, old, new), "input_path": _move(b.input_path, old, new)})
    head = mc.head if explicit_head else sites.get("head")
    if head is not None:
        sites["head"] = head
    bound = ModelClass.model_construct(task=mc.task, backbone=new, head=head, stacks=mc.stacks)  # validated parts: no validator built
    update: dict[str, Any] = {"sites": sites, "layers": _move(fam.layers, old, new) or fam.layers, "backbone": new, "classes": {cls: bound}}
    if fam.stacks:
        update |= _bind_stacks(fam, sites, mc.stacks, old, new)
    return fam.model_copy(update=update)


def _bind_stacks(fam: ArchitectureMap, sites: dict[str, SiteBinding], keep: list[str] | None, old: str, new: str) -> dict[str, Any]:
    """The class's stacks (all, or those it lists) with their paths moved, the sites only they bind, and L their total."""
    stacks = {}
    for name, st in fam.stacks.items():
        if keep is not None and name not in keep:
            continue
        moved = {s: b.model_copy(update={"path": _move(b.path, old, new), "input_path": _move(b.input_path, old, new)}) for s, b in st.sites.items()}
        stacks[name] = st.model_copy(update={"sites": moved, "layers": _move(st.layers, old, new) or st.layers})
    own = {s: b for s, b in sites.items() if not any(s in st.sites for st in fam.stacks.values())}
    for st in stacks.values():
        for s, b in st.sites.items():
            own.setdefault(s, b)
    return {"stacks": stacks, "sites": own, "sizes": {**fam.sizes, "L": " + ".join(f"({st.count})" for st in stacks.values()) or "0"}}


def head_path(fam: ArchitectureMap, cls: str | None = None) -> str | None:
    """The module path of the task head (in class ``cls`` when given), or None without a head."""
    bound = bind_class(fam, cls) if cls else fam
    b = bound.sites.get("head")
    return b.path if b is not None else None
