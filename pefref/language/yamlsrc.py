"""Safe YAML reading that keeps the source position of every node.

Only plain YAML is accepted: standard tags (str, int, float, bool, null, map,
seq), no anchors or aliases (which rules out alias bombs), no Python tags, a
size limit. Nothing read from YAML is ever executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import yaml

from pefref.language.errors import CatalogError, Location, Problem
from pefref.language.limits import current

__all__ = ["Positions", "read_yaml", "parse_yaml", "MAX_BYTES"]

MAX_BYTES = 1 << 20  # 1 MiB: no technique description is anywhere near that

_STD = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_STD + t for t in ("str", "int", "float", "bool", "null")}

Path_ = tuple[Any, ...]


class Positions(dict[Path_, Location]):
    """Map from a field path (keys and indices) to the location of its value.

    ``key_at(path)`` gives the location of the mapping key itself, used for
    reporting unknown keys.
    """

    def __init__(self, file: str) -> None:
        super().__init__()
        self.file = file
        self.keys: dict[Path_, Location] = {}  # type: ignore[assignment]
        self.quoted: set[Path_] = set()

    def at(self, path: Path_) -> Location:
        """Location of the value at ``path``, or of its nearest located parent."""
        path = tuple(path)
        while path:
            if path in self.keys and path not in self:
                return self.keys[path]
            if path in self:
                return self[path]
            path = path[:-1]
        return self.get((), Location(self.file, 1, 1))

    def key_at(self, path: Path_) -> Location:
        return self.keys.get(tuple(path)) or self.at(path)


def _loc(file: str, node: yaml.Node) -> Location:
    return Location(file, node.start_mark.line + 1, node.start_mark.column + 1)


def _construct(node: yaml.Node, path: Path_, pos: Positions, loader: yaml.SafeLoader) -> Any:
    pos[path] = _loc(pos.file, node)
    if len(path) > current().max_yaml_depth:
        raise CatalogError([Problem(_loc(pos.file, node), _dotted(path[:8]) + "...", f"nested more than {current().max_yaml_depth} levels deep")])
    allowed = cast(dict[type[yaml.Node], set[str]], {yaml.MappingNode: {_STD + "map"}, yaml.SequenceNode: {_STD + "seq"}}).get(type(node), _SCALAR_TAGS)
    if node.tag not in allowed:
        raise CatalogError([Problem(_loc(pos.file, node), _dotted(path), f"tag {node.tag.replace(_STD, '!!', 1)!r} is not allowed; only plain YAML values are accepted")])
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            if knode.tag == _STD + "merge":
                raise CatalogError([Problem(_loc(pos.file, knode), ".".join(map(str, path)), "YAML merge keys ('<<') are not allowed")])
            key = _construct(knode, path + ("<key>",), pos, loader)
            if not isinstance(key, (str, int)):
                raise CatalogError([Problem(_loc(pos.file, knode), ".".join(map(str, path)), f"mapping keys must be strings, found {type(key).__name__}")])
            if key in out:
                raise CatalogError([Problem(_loc(pos.file, knode), _dotted(path + (key,)), f"duplicate key {key!r}")])
            pos.keys[path + (key,)] = _loc(pos.file, knode)
            out[key] = _construct(vnode, path + (key,), pos, loader)
        pos.pop(path + ("<key>",), None)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(n, path + (i,), pos, loader) for i, n in enumerate(node.value)]
    if cast(yaml.ScalarNode, node).style in ("'", '"'):
        pos.quoted.add(path)
    if node.tag == _STD + "int" and len(node.value) > current().max_int_digits + 8:
        raise CatalogError([Problem(_loc(pos.file, node), _dotted(path), f"integer of {len(node.value)} characters; at most {current().max_int_digits} digits are allowed")])
    try:
        return loader.construct_object(node, deep=True)
    except (ValueError, OverflowError) as e:
        raise CatalogError([Problem(_loc(pos.file, node), _dotted(path), f"cannot read the value: {e}")]) from None


def _dotted(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            m = event.start_mark
            raise CatalogError([Problem(Location(self.name, m.line + 1, m.column + 1), "", "YAML aliases ('*name') are not allowed")])
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor:
            m = event.start_mark
            raise CatalogError([Problem(Location(self.name, m.line + 1, m.column + 1), "", f"YAML anchors ('&{anchor}') are not allowed")])
        return super().compose_node(parent, index)


def _flow_nesting(text: str, file: str, limit: int) -> None:
    """Refuse ``[`` / ``{`` nested deeper than ``limit`` before parsing (PyYAML's scanner is quadratic in it)."""
    depth, quote, line, col0 = 0, "", 1, 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line, col0 = line + 1, i + 1
        elif quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"" and (i == 0 or text[i - 1] in " \t[{,:\n"):
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t\n"):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        elif ch in "[{":
            depth += 1
            if depth > limit:
                raise CatalogError([Problem(Location(file, line, i - col0 + 1), "", f"nested more than {limit} levels deep")])
        elif ch in "]}":
            depth = max(depth - 1, 0)
        i += 1


def parse_yaml(text: str, file: str = "<string>") -> tuple[Any, Positions]:
    """Parse YAML text into plain Python data and the positions of its nodes.

    The text's size and nesting are bounded (:mod:`pefref.language.limits`);
    control characters, huge integers and unsupported tags are located errors."""
    if len(text.encode()) > MAX_BYTES:
        raise CatalogError([Problem(Location(file), "", f"file is larger than {MAX_BYTES} bytes")])
    _flow_nesting(text, file, current().max_yaml_depth)
    pos = Positions(file)
    loader: _NoAliasLoader | None = None
    try:
        loader = _NoAliasLoader(text)
        loader.name = file
        node = loader.get_single_node()
        if node is None:
            raise CatalogError([Problem(Location(file, 1, 1), "", "the file is empty; expected a mapping")])
        data = _construct(node, (), pos, loader)
    except yaml.MarkedYAMLError as e:
        m = e.problem_mark or e.context_mark
        loc = Location(file, m.line + 1, m.column + 1) if m else Location(file)
        raise CatalogError([Problem(loc, "", f"YAML syntax error: {e.problem or e}")]) from None
    except yaml.reader.ReaderError as e:  # NUL and other control characters
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        what = f"character #x{e.character:04x}" if isinstance(e.character, int) else "byte"
        raise CatalogError([Problem(Location(file, line, col), "", f"{what} is not allowed in YAML text ({e.reason})")]) from None
    except yaml.YAMLError as e:
        raise CatalogError([Problem(Location(file), "", f"YAML error: {e}")]) from None
    except RecursionError:
        raise CatalogError([Problem(Location(file), "", f"nested too deeply (at most {current().max_yaml_depth} levels)")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, pos


def read_yaml(path: str | Path) -> tuple[Any, Positions]:
    """Read a YAML file safely (see module docstring); an unchanged file's parse comes from
    :mod:`pefref.language.catalog_cache`."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise CatalogError([Problem(Location(str(p)), "", f"cannot read file: {e.strerror}")]) from None
    if size > MAX_BYTES:
        raise CatalogError([Problem(Location(str(p)), "", f"file is {size} bytes, larger than the {MAX_BYTES}-byte limit")])
    from pefref.language import catalog_cache  # imports this module

    try:
        raw = p.read_bytes()
    except OSError as e:
        raise CatalogError([Problem(Location(str(p)), "", f"cannot read file: {e.strerror}")]) from None
    hit = catalog_cache.load(raw, str(p))
    if hit is not None:
        return hit
    try:
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
    except UnicodeDecodeError as e:
        raise CatalogError([Problem(Location(str(p)), "", f"not UTF-8 text: {e.reason}")]) from None
    data, pos = parse_yaml(text, str(p))
    catalog_cache.store(raw, data, pos)
    return data, pos
