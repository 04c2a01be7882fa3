"""The README, the tutorials and the how-to guides run as written: files written, ``bash`` and ``python`` blocks run in order.

Conventions of these pages: a block with ``title="PATH"`` is a
file the reader saves (written to PATH); a ``bash`` block is run (each must exit 0);
a ``python`` block is run in one Python process per page (one namespace), in the page's order; ``console``
and ``text`` blocks show output or commands too costly for the tests and are not run.
Each page runs in an empty folder holding a link to the bundled ``catalog/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .docs_blocks import DOCS, ROOT, blocks

_DRIVER = """
import json, sys, traceback
reply, sys.stdout = sys.stdout, sys.stderr
namespace = {"__name__": "__tutorial__"}
for line in sys.stdin:
    block = json.loads(line)
    try:
        exec(compile(block["code"], block["where"], "exec"), namespace)
        reply.write(json.dumps({"ok": True}) + "\\n")
    except BaseException:
        reply.write(json.dumps({"ok": False, "error": traceback.format_exc()}) + "\\n")
    reply.flush()
"""
"""Runs the python blocks of one page in a process of their own (a page may register a primitive, say)."""

PAGES = [ROOT / "README.md", *sorted((DOCS / "tutorials").glob("*.md")), *sorted((DOCS / "how-to").glob("*.md"))]


def _runnable(page: Path) -> bool:
    return any(b.lang in ("bash", "python") or b.title for b in blocks(page))


@pytest.mark.parametrize("page", [p for p in PAGES if _runnable(p)], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_runs_as_written(page: Path, tmp_path: Path) -> None:
    (tmp_path / "catalog").symlink_to(ROOT / "catalog")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]), "COLUMNS": "160"}
    python = subprocess.Popen([sys.executable, "-c", _DRIVER], cwd=tmp_path, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        ran = _run_blocks(page, tmp_path, env, python)
    finally:
        python.kill()
        python.wait()
    assert ran, f"{page}: nothing ran"


def _run_blocks(page: Path, tmp_path: Path, env: dict[str, str], python: subprocess.Popen[str]) -> int:
    assert python.stdin is not None and python.stdout is not None
    ran = 0
    for b in blocks(page):
        where = f"{page.relative_to(ROOT)}:{b.line}"
        if b.title:
            target = tmp_path / b.title
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(b.text, encoding="utf-8")
        elif b.lang == "bash":
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", b.text], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"{where}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            ran += 1
        elif b.lang == "python":
            python.stdin.write(json.dumps({"code": b.text, "where": where}) + "\n")
            python.stdin.flush()
            answer = json.loads(python.stdout.readline() or '{"ok": false, "error": "the process ended"}')
            assert answer["ok"], f"{where}:\n{answer['error']}"
            ran += 1
    return ran
