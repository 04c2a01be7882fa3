"""The results database: ``DIR/results.sqlite`` with a ``runs`` table (one row per run) and a ``steps`` table (metrics per step).

``runs.status`` is ``running`` while a run trains, ``interrupted`` when it was
stopped (its last checkpoint resumes it), ``failed`` on an error and ``done``
once finished; a rerun skips ``done`` runs.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from pefref.language.errors import PefrefError

__all__ = ["APPLICATION_ID", "DB_NAME", "RUN_COLUMNS", "SCHEMA_VERSION", "Records", "check_owned"]

DB_NAME = "results.sqlite"

RUN_COLUMNS: dict[str, str] = {
    "id": "TEXT PRIMARY KEY",           # sha256 of the resolved configuration (16 hex digits)
    "experiment": "TEXT NOT NULL",
    "label": "TEXT NOT NULL",           # technique / composition / baseline with its varying hyperparameters
    "technique": "TEXT NOT NULL",       # technique id(s) joined by '+', or the baseline's name
    "seed": "INTEGER NOT NULL",
    "lr": "REAL NOT NULL",
    "config": "TEXT NOT NULL",          # the full resolved configuration, JSON
    "hyperparameters": "TEXT",          # every technique's hyperparameters with defaults filled in, JSON
    "status": "TEXT NOT NULL",          # running | interrupted | failed | done
    "step": "INTEGER DEFAULT 0",        # optimizer steps done
    "total_steps": "INTEGER",
    "trainable": "INTEGER",
    "total_params": "INTEGER",
    "trainable_pct": "REAL",
    "main_metric": "TEXT",              # accuracy (classification) or loss (causal LM)
    "final_metrics": "TEXT",            # JSON
    "best_metrics": "TEXT",             # JSON
    "best_step": "INTEGER",
    "peak_memory": "INTEGER",           # bytes
    "memory_source": "TEXT",            # cuda (allocator peak) | tensors (weights + grads + optimizer state + saved activations)
    "step_time": "REAL",                # seconds per optimizer step (mean, first steps excluded)
    "wall_time": "REAL",                # seconds, summed over resumed sessions
    "world_size": "INTEGER",
    "device": "TEXT",
    "versions": "TEXT",                 # JSON: python, torch, transformers, datasets, pefref
    "error": "TEXT",
    "started": "REAL",
    "finished": "REAL",
}


APPLICATION_ID = 0x70656672  # 'pefr': PRAGMA application_id of pefref's results databases
SCHEMA_VERSION = 1  # PRAGMA user_version
_TABLES = frozenset({"runs", "steps"})


def _read_only(path: Path) -> sqlite3.Connection:
    """A connection that writes nothing, not even a journal: immutable while no write-ahead log holds newer pages."""
    wal = path.with_name(path.name + "-wal").exists()
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro{'' if wal else '&immutable=1'}", uri=True, timeout=30)


def _damaged(path: Path, e: object) -> PefrefError:
    return PefrefError(f"{path}: the results database is damaged or not an SQLite database ({e}); move it away "
                       f"(runs recorded in it cannot be read) and rerun the experiment into this folder or another")


def check_owned(path: Path) -> bool:
    """Whether ``path`` is a pefref results database (False: absent or empty, a new one may be made there).

    Read only: nothing is written to a database that is not pefref's, or that is damaged; both are a
    :class:`PefrefError` saying why and what to do."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        conn = _read_only(path)
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            cols = {r[1] for r in conn.execute("PRAGMA table_info(runs)")} if "runs" in tables else set()
            bad = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise _damaged(path, e) from None
    if bad != "ok":
        raise _damaged(path, bad)
    legacy = app_id == 0 and version == 0 and tables <= _TABLES and cols <= set(RUN_COLUMNS)  # written before the stamp
    if app_id != APPLICATION_ID and not legacy:
        raise PefrefError(f"{path}: not a pefref results database (tables: {', '.join(sorted(tables)) or 'none'}); "
                          "pefref leaves it untouched: choose another output folder (-o)")
    if version > SCHEMA_VERSION:
        raise PefrefError(f"{path}: written by a newer pefref (results schema {version}, this one reads {SCHEMA_VERSION}); upgrade pefref")
    return True


class Records:
    """Read and write the results database of one output folder (``read_only``: reads an existing one, writes nothing)."""

    def __init__(self, folder: str | Path, read_only: bool = False) -> None:
        self.folder = Path(folder)
        self.path = self.folder / DB_NAME
        check_owned(self.path)  # before anything is written: pefref's own database, and readable
        try:
            if read_only:
                self.conn = _read_only(self.path)
            else:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.conn = sqlite3.connect(str(self.path), timeout=30)
            self.conn.row_factory = sqlite3.Row
            if not read_only:
                self._create()
        except sqlite3.DatabaseError as e:
            raise _damaged(self.path, e) from None

    def _create(self) -> None:
        cols = ", ".join(f"{k} {v}" for k, v in RUN_COLUMNS.items())
        self.conn.execute("PRAGMA journal_mode=WAL")  # parallel workers write side by side
        with self.conn:
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
            self.conn.execute("CREATE TABLE IF NOT EXISTS steps (run_id TEXT NOT NULL, step INTEGER NOT NULL, split TEXT NOT NULL, "
                              "metrics TEXT NOT NULL, time REAL, PRIMARY KEY (run_id, step, split))")
            self.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    def run(self, run_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return _decode(dict(row)) if row else None

    def runs(self) -> list[dict[str, Any]]:
        return [_decode(dict(r)) for r in self.conn.execute("SELECT * FROM runs ORDER BY experiment, label, seed, id")]

    def upsert(self, run_id: str, **fields: Any) -> None:
        """Insert or update one run's row (JSON-encodes dicts and lists)."""
        vals = {k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}
        unknown = set(vals) - set(RUN_COLUMNS)
        assert not unknown, unknown
        with self.conn:
            if self.conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
                if vals:
                    sets = ", ".join(f"{k} = ?" for k in vals)
                    self.conn.execute(f"UPDATE runs SET {sets} WHERE id = ?", (*vals.values(), run_id))
            else:
                vals["id"] = run_id
                keys = ", ".join(vals)
                self.conn.execute(f"INSERT INTO runs ({keys}) VALUES ({', '.join('?' * len(vals))})", tuple(vals.values()))

    def log(self, run_id: str, step: int, split: str, metrics: dict[str, float]) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?, ?)", (run_id, step, split, json.dumps(metrics, sort_keys=True), time.time()))

    def truncate_steps(self, run_id: str, after: int) -> None:
        """Forget step metrics past ``after`` (a resumed run recomputes them)."""
        with self.conn:
            self.conn.execute("DELETE FROM steps WHERE run_id = ? AND step > ?", (run_id, after))

    def steps(self, run_id: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM steps" + (" WHERE run_id = ?" if run_id else "") + " ORDER BY run_id, step, split"
        return [{**dict(r), "metrics": _metrics(r)} for r in self.conn.execute(q, (run_id,) if run_id else ())]


def _metrics(r: Any) -> dict[str, float]:
    try:
        out = json.loads(r["metrics"])
    except (TypeError, json.JSONDecodeError) as e:
        raise PefrefError(f"run {r['run_id']!r}, step {r['step']}: its metrics in the results database are not JSON ({e}); "
                          "the database is damaged: move it away and rerun") from None
    return out if isinstance(out, dict) else {}


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for k in ("config", "hyperparameters", "final_metrics", "best_metrics", "versions"):
        if row.get(k):
            try:
                row[k] = json.loads(row[k])
            except (TypeError, json.JSONDecodeError) as e:
                raise PefrefError(f"run {row.get('id')!r}: its {k} in the results database is not JSON ({e}); "
                                  "the database is damaged: move it away and rerun") from None
    return row
