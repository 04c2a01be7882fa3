"""Atomic file writes: a file pefref writes is either the old one or the new one, never half of either.

Every file pefref writes (schemas, adapter files, site pages, experiment
artefacts) goes through :func:`atomic_write_bytes` or :func:`atomic_write_text`:
the data goes to a temporary file in the target's folder, which is flushed,
``fsync``-ed and renamed over the target with :func:`os.replace` (atomic on
POSIX and Windows when both lie on one file system). On any failure the
temporary file is removed and the target is left as it was; the error is a
:class:`~pefref.language.errors.PefrefError` naming the path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pefref.language.errors import PefrefError

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_open", "writable_folder"]

_UMASK = os.umask(0)
os.umask(_UMASK)


def writable_folder(folder: str | Path, *, create: bool = True) -> Path:
    """``folder`` as a Path, created when missing; a :class:`PefrefError` when it is a file or cannot be written."""
    p = Path(folder)
    for up in (p, *p.parents):
        if up.exists():
            if not up.is_dir():
                raise PefrefError(f"{up}: not a folder (it is a file)")
            break
    if not p.exists():
        if not create:
            raise PefrefError(f"{p}: no such folder")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PefrefError(f"{p}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise PefrefError(f"{p}: folder is not writable")
    return p


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit flush, fsync and rename it over ``path``.

    On an exception inside the block (or while committing) the temporary file
    is removed and ``path`` is untouched. OS errors become :class:`PefrefError`.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise PefrefError(f"{target}: is a folder, not a file")
    if folder.exists() and not folder.is_dir():
        raise PefrefError(f"{folder}: not a folder (it is a file)")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise PefrefError(f"cannot write {target}: {e.strerror or e}") from None
    try:
        mode_bits = (target.stat().st_mode & 0o7777) if target.exists() else (0o666 & ~_UMASK)
        with os.fdopen(fd, mode, encoding=encoding, newline="" if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode_bits)
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise PefrefError(f"cannot write {target}: {e.strerror or e}") from None
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (best effort: not every platform can open a folder)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (newlines written as given)."""
    atomic_write_bytes(path, text.encode(encoding))
