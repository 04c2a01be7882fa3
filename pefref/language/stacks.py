"""Layer stacks of encoder-decoder families: where each layer of a per-layer site is (no torch).

A map with ``stacks`` (T5: ``encoder``, ``decoder``) numbers the layers of all
its stacks in one range: the first stack's layers come first (``0 ..
L_encoder - 1``), the next stack's follow. A per-layer site exists in the
layers of the stacks that bind it (cross-attention only in the decoder), with
the stack's own path (``{i}``: the index within the stack). A map without
stacks has one implicit stack: every layer binds the site as ``sites`` says.
"""

from __future__ import annotations

from collections.abc import Sequence

from pefref.language.errors import SiteError
from pefref.language.schema import ArchitectureMap, SiteBinding

__all__ = ["stacked", "layer_bindings", "expand_layers"]


def stacked(fam: ArchitectureMap, site: str) -> bool:
    """Whether ``site`` is bound per stack (its layers depend on which stacks bind it)."""
    return any(site in st.sites for st in fam.stacks.values())


def layer_bindings(fam: ArchitectureMap, site: str, sizes: dict[str, int]) -> list[tuple[int, int, SiteBinding]]:
    """(layer index, index in its stack, binding) of every layer where a per-layer ``site`` exists."""
    if not stacked(fam, site):
        b = fam.sites[site]
        return [(i, i, b) for i in range(sizes["L"])]
    out: list[tuple[int, int, SiteBinding]] = []
    offset = 0
    for name, st in fam.stacks.items():
        n = sizes[f"L_{name}"]
        sb = st.sites.get(site)
        if sb is not None:
            out += [(offset + j, j, sb) for j in range(n)]
        offset += n
    return out


def expand_layers(fam: ArchitectureMap, sizes: dict[str, int], layers: Sequence[int | str]) -> list[int]:
    """A layer selection with stack names (``"decoder"``) replaced by the indices of their layers."""
    if isinstance(layers, str):  # one stack's name
        layers = [layers]
    out: list[int] = []
    offset = {}
    k = 0
    for name in fam.stacks:
        offset[name] = k
        k += sizes[f"L_{name}"]
    for x in layers:
        if isinstance(x, str):
            if x not in offset:
                known = ", ".join(offset) or "none: the map has no stacks"
                raise SiteError(f"layers: no stack {x!r} in family {fam.family!r} (stacks: {known})")
            out += range(offset[x], offset[x] + sizes[f"L_{x}"])
        else:
            out.append(x)
    return out
