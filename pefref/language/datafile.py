"""An experiment's data files read as ``pefref run`` will read them, with located errors (``file:line:col``).

jsonl (one JSON object per line), json (a list of objects, or an object of
equal-length columns) and csv (a header line) are decoded as UTF-8 with the
standard library. :func:`check_data` refuses what training would choke on or
silently misread: undecodable bytes, malformed lines, an empty file, a row
without its text or its label, labels of mixed types, and (classification
training data) fewer than two classes.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pefref.language.errors import PefrefError

__all__ = ["DataRow", "check_data", "read_rows"]

MAX_DATA_BYTES = 2 * 1024**3  # read whole: a larger file is refused before reading


@dataclass(frozen=True)
class DataRow:
    """One example as the file holds it, with the line it starts on."""

    line: int
    values: dict[str, Any]


def _text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_DATA_BYTES:
        raise PefrefError(f"{path}: {size} bytes, over the {MAX_DATA_BYTES} bytes a data file may have")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise PefrefError(f"{path}:{line}:{col}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None


def _jsonl(path: Path, text: str) -> list[DataRow]:
    rows: list[DataRow] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PefrefError(f"{path}:{n}:{e.colno}: not a JSON line ({e.msg})") from None
        if not isinstance(obj, dict):
            raise PefrefError(f"{path}:{n}:1: expected a JSON object per line, got {type(obj).__name__}")
        rows.append(DataRow(n, obj))
    return rows


def _json(path: Path, text: str) -> list[DataRow]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise PefrefError(f"{path}:{e.lineno}:{e.colno}: not JSON ({e.msg})") from None
    if isinstance(obj, dict) and "data" in obj and isinstance(obj["data"], list):
        obj = obj["data"]
    if isinstance(obj, dict) and all(isinstance(v, list) for v in obj.values()):  # columns
        lengths = {len(v) for v in obj.values()}
        if len(lengths) > 1:
            raise PefrefError(f"{path}:1:1: columns of different lengths ({', '.join(f'{k}: {len(v)}' for k, v in obj.items())})")
        return [DataRow(1, {k: v[i] for k, v in obj.items()}) for i in range(lengths.pop() if lengths else 0)]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise PefrefError(f"{path}:1:1: expected a list of objects (or an object of columns)")
    return [DataRow(1, r) for r in obj]


def _csv(path: Path, text: str) -> list[DataRow]:
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [DataRow(reader.line_num, dict(r)) for r in reader]
    except csv.Error as e:
        raise PefrefError(f"{path}:{reader.line_num}:1: not CSV ({e})") from None
    for r in rows:
        if None in r.values:
            raise PefrefError(f"{path}:{r.line}:1: more fields than the header has")
    return rows


def read_rows(path: str | Path) -> list[DataRow]:
    """Every row of a jsonl, json or csv data file (located errors)."""
    p = Path(path)
    try:
        text = _text(p)
    except OSError as e:
        raise PefrefError(f"{p}: cannot be read ({e.strerror or e})") from None
    reader = {".jsonl": _jsonl, ".json": _json, ".csv": _csv}.get(p.suffix)
    if reader is None:
        raise PefrefError(f"{p}: unsupported file type {p.suffix!r} (jsonl, json or csv)")
    if p.suffix == ".json" and text.lstrip().startswith("{") and "\n{" in text.strip():
        reader = _jsonl  # datasets reads a .json file of JSON lines as such
    return reader(p, text)


def check_data(path: str | Path, text: str, label: str | None, limit: int | None = None, training: bool = True) -> list[DataRow]:
    """The rows training reads (the first ``limit``), checked: non-empty, each with its text and (``label``) a label
    of one type; a classification training file has at least two classes."""
    p = Path(path)
    rows = read_rows(p)[:limit]
    if not rows:
        raise PefrefError(f"{p}: no examples (an empty data file)")
    kinds: dict[str, int] = {}
    for r in rows:
        for col, what in ((text, "text"), *(((label, "label"),) if label else ())):
            if col not in r.values:
                raise PefrefError(f"{p}:{r.line}:1: the row has no {what} column {col!r} (it has: {', '.join(sorted(map(str, r.values))) or 'none'})")
            v = r.values[col]
            if v is None or (isinstance(v, str) and col == label and not v.strip()):
                raise PefrefError(f"{p}:{r.line}:1: the row's {what} ({col!r}) is empty")
            if isinstance(v, (dict, list)):
                raise PefrefError(f"{p}:{r.line}:1: the row's {what} ({col!r}) is a {type(v).__name__}, expected a scalar")
        if label:
            kinds.setdefault(type(r.values[label]).__name__, r.line)
    if len(kinds) > 1:
        raise PefrefError(f"{p}: labels of mixed types ({', '.join(f'{k} at line {n}' for k, n in sorted(kinds.items()))}); use one type")
    if label and training and len({str(r.values[label]) for r in rows}) < 2:
        raise PefrefError(f"{p}: every example has the label {str(rows[0].values[label])!r}: classification needs at least two classes")
    return rows
