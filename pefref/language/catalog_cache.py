"""A cache of parsed YAML files, keyed by their bytes, so a process does not re-parse an unchanged catalog.

Parsing a catalog file with the position-tracking loader costs about 20 ms; a
first ``apply`` or ``pefref list`` reads a dozen of them. :func:`load` and
:func:`store` keep what :func:`~pefref.language.yamlsrc.parse_yaml` returns (the
plain data and the position of every node, so errors found later are still
located at file:line:column) as JSON, one file per source text, under
:func:`cache_dir`.

* The key is a SHA-256 of the file's bytes, of the parser's own source and of
  the parsing limits in force: an edited file, another pefref or other limits
  find no entry, and the entry is rebuilt. Schema validation runs on the cached
  data as on freshly parsed data; the catalog's checks are skipped only for a
  catalog checked clean before (the markers below).
* An entry holds plain JSON data, never anything that could run code when
  read, and a SHA-256 of its payload: an entry that does not read back, does
  not match its checksum or its key, or is not shaped as expected is ignored
  and rewritten.
* Entries are written atomically (a temporary file, then a rename); a folder
  that cannot be written only means no cache. The folder is safe to delete;
  it keeps at most :data:`MAX_ENTRIES` entries.
* Only successful parses are stored: a file with an error is parsed again, and
  reports its error, every time.

:func:`memo` keeps, next to it (``derived/``), results that are pure functions of
plain data and of pefref's code (a parameter formula factored by sympy, FLOPs
counted on the meta device), so ``pefref show`` and ``params`` need neither sympy
nor torch once they have run.

:func:`checked_key`, :func:`was_checked` and :func:`mark_checked` keep, under
``checked/``, the keys of catalogs whose cross-file checks found nothing. A key
covers the path and the bytes of every file of the catalog, the loading options
and pefref's code (as :func:`memo`'s: any changed module, another version, misses).
A marker holds nothing but its key and a checksum; a missing, damaged or foreign
marker only means the checks run again, and their clean result is marked anew.
Files are still parsed and validated against the schema on a hit; only the
checks (shapes, connections, slices, templates), which are pure functions of
those files and of pefref's code, are skipped.

``$PEFREF_CACHE_DIR`` sets the folder; ``$PEFREF_NO_CACHE`` (any value but
``""`` or ``0``) turns the cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from pefref.language.errors import Location
from pefref.language.limits import current
from pefref.language.yamlsrc import Positions

__all__ = ["cache_dir", "enabled", "load", "store", "memo", "checked_key", "was_checked", "mark_checked", "FORMAT", "MAX_ENTRIES"]

T = TypeVar("T")

FORMAT = 1
"""Version of the entry layout; part of every key."""

MAX_ENTRIES = 2000
"""Beyond this many entries, a write removes the oldest (edited files leave their old entries behind)."""


def enabled() -> bool:
    """Whether the cache is used (``$PEFREF_NO_CACHE`` unset, empty or ``0``)."""
    return os.environ.get("PEFREF_NO_CACHE", "") in ("", "0")


def cache_dir() -> Path:
    """``$PEFREF_CACHE_DIR``, else the user's cache folder (``$XDG_CACHE_HOME``, ``~/.cache``,
    ``%LOCALAPPDATA%`` on Windows, ``~/Library/Caches`` on macOS) ``/pefref/parsed``."""
    env = os.environ.get("PEFREF_CACHE_DIR")
    if env:
        return Path(env)
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pefref" / "parsed"


@lru_cache(maxsize=1)
def _code_digest() -> bytes:
    """The parser's own source: a changed parser never reads an older parser's entries."""
    h = hashlib.sha256(f"pefref-parsed-yaml/{FORMAT}".encode())
    for mod in ("yamlsrc.py", "catalog_cache.py"):
        try:
            h.update((Path(__file__).parent / mod).read_bytes())
        except OSError:
            h.update(mod.encode())
    return h.digest()


def _key(raw: bytes) -> str:
    h = hashlib.sha256(_code_digest())
    h.update(repr(current()).encode())
    h.update(raw)
    return h.hexdigest()


def _entry(key: str) -> Path:
    return cache_dir() / f"{key}.json"


def load(raw: bytes, file: str) -> tuple[Any, Positions] | None:
    """The cached parse of a file whose bytes are ``raw`` (its positions name ``file``), or None."""
    if not enabled():
        return None
    key = _key(raw)
    payload = _read(_entry(key), key)
    if payload is None:
        return None
    try:
        return _decode(json.loads(payload), file)
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None  # absent, unreadable or malformed: parsed again (and rewritten)


def store(raw: bytes, data: Any, pos: Positions) -> None:
    """Keep the parse of ``raw``; does nothing when the cache is off, the data is not plain JSON
    (integer mapping keys) or the folder cannot be written."""
    if not enabled() or not isinstance(data, dict) or not _plain(data):
        return
    key = _key(raw)
    body = {"data": data, "at": [[list(p), loc.line, loc.column] for p, loc in pos.items()],
            "keys": [[list(p), loc.line, loc.column] for p, loc in pos.keys.items()], "quoted": [list(p) for p in pos.quoted]}
    try:
        payload = json.dumps(body, separators=(",", ":"), allow_nan=True).encode()
    except (ValueError, TypeError):
        return  # no cache, same results
    _write(_entry(key), payload, key)


def _prune(folder: Path) -> None:
    """Keep the newest :data:`MAX_ENTRIES` entries (by modification time)."""
    entries = [e for e in os.scandir(folder) if e.name.endswith(".json") and not e.name.startswith(".")]
    if len(entries) <= MAX_ENTRIES:
        return
    entries.sort(key=lambda e: e.stat().st_mtime)
    for e in entries[: len(entries) - MAX_ENTRIES]:
        Path(e.path).unlink(missing_ok=True)


def _plain(v: Any) -> bool:
    """Whether ``v`` survives a JSON round trip unchanged (string keys only)."""
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (str, int, float, bool))


def _decode(body: dict[str, Any], file: str) -> tuple[Any, Positions]:
    at, keys, quoted = body["at"], body["keys"], body["quoted"]
    if not (type(at) is list and type(keys) is list and type(quoted) is list):
        raise ValueError("not a parsed entry")
    rows = at + keys
    # one pass per check, over every row at once (a file has hundreds of nodes): exact types, so a
    # boolean is no line number and no path component
    if {type(r) for r in rows} - {list} or {len(r) for r in rows} - {3}:
        raise ValueError("bad position row")
    if {type(r[1]) for r in rows} - {int} or {type(r[2]) for r in rows} - {int}:
        raise ValueError("bad position")
    paths = [r[0] for r in rows] + quoted
    if {type(p) for p in paths} - {list} or {type(c) for p in paths for c in p} - {str, int}:
        raise ValueError("bad path")
    pos = Positions(file)
    pos.update({tuple(p): Location(file, line, col) for p, line, col in at})
    pos.keys = {tuple(p): Location(file, line, col) for p, line, col in keys}
    pos.quoted = {tuple(p) for p in quoted}
    data = body["data"]
    if not isinstance(data, dict) or not _plain(data):
        raise ValueError("not a parsed mapping")
    return data, pos


@lru_cache(maxsize=1)
def _package_digest() -> bytes:
    """Size and modification time of every module of the installed pefref: derived facts computed by
    another pefref are not reused."""
    h = hashlib.sha256(f"pefref-memo/{FORMAT}".encode())
    for rel, size, mtime in sorted(_modules(str(Path(__file__).resolve().parents[1]), "")):
        h.update(f"{rel}:{size}:{mtime}".encode())
    return h.digest()


def _modules(folder: str, rel: str) -> list[tuple[str, int, int]]:
    """(path under the package, size, modification time) of every ``.py`` file under ``folder``: one directory
    scan per folder (a pathlib glob with a stat per file costs more than the rest of a warm start's cache reads)."""
    out: list[tuple[str, int, int]] = []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                out += _modules(e.path, f"{rel}{e.name}/")
            elif e.name.endswith(".py"):
                st = e.stat()
                out.append((rel + e.name, st.st_size, st.st_mtime_ns))
    return out


def _write(path: Path, payload: bytes, key: str) -> None:
    """Write an entry (a header with its key and checksum, then ``payload``) atomically; no folder, no entry."""
    head = json.dumps({"format": FORMAT, "key": key, "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(head + b"\n" + payload)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _prune(path.parent)
    except OSError:
        pass


def _read(path: Path, key: str) -> bytes | None:
    """The payload of the entry at ``path`` when its header names ``key`` and its checksum matches."""
    try:
        head, _, payload = path.read_bytes().partition(b"\n")
        if json.loads(head) == {"format": FORMAT, "key": key, "sha256": hashlib.sha256(payload).hexdigest()}:
            return payload
    except (OSError, ValueError):
        pass
    return None


def checked_key(files: Sequence[Path], options: Any) -> str | None:
    """The key of a catalog made of ``files`` (their paths and bytes, in order) loaded with ``options``
    (plain JSON data), under this pefref; None when the cache is off or a file cannot be read."""
    if not enabled():
        return None
    h = hashlib.sha256(_package_digest())
    h.update(b"checked\0" + repr(current()).encode() + json.dumps(options, sort_keys=True).encode())
    for f in files:
        try:
            raw = f.read_bytes()
        except OSError:
            return None
        name = str(f).encode()
        h.update(len(name).to_bytes(8, "little") + name + len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()


def _checked_entry(key: str) -> Path:
    return cache_dir().parent / "checked" / f"{key}.json"


def was_checked(key: str | None) -> bool:
    """Whether the catalog of ``key`` was checked clean before (an intact marker names it)."""
    return key is not None and enabled() and _read(_checked_entry(key), key) == b"{}"


def mark_checked(key: str | None) -> None:
    """Record that the catalog of ``key`` passed its checks."""
    if key is not None and enabled():
        _write(_checked_entry(key), b"{}", key)


def memo(kind: str, key: Any, compute: Callable[[], T]) -> T:
    """``compute()``, or its result kept from an earlier process: a pure function of ``key`` (plain JSON
    data: everything the result depends on) and of pefref's own code. The result must be plain JSON data
    too (a dict, list or scalar); a damaged entry is computed again."""
    if not enabled():
        return compute()
    h = hashlib.sha256(_package_digest())
    h.update(kind.encode() + b"\0" + json.dumps(key, sort_keys=True, separators=(",", ":")).encode())
    digest = h.hexdigest()
    path = cache_dir().parent / "derived" / f"{digest}.json"
    payload = _read(path, digest)
    if payload is not None:
        try:
            return json.loads(payload)
        except ValueError:
            pass
    value = compute()
    with contextlib.suppress(ValueError, TypeError):  # not JSON data: not kept
        _write(path, json.dumps(value, separators=(",", ":")).encode(), digest)
    return value
