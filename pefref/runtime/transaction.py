"""Transactions over a model: an operation completes, or the model is exactly as it was.

Every change an operation makes to a model (a tensor written, a
``requires_grad`` flag set, a forward patched, a module or hook added) goes
through a :class:`Transaction`, which records how to undo it. When the block
raises, the undo log runs in reverse order and the error comes out as a
:class:`~pefref.language.errors.PefrefError` that says what failed and where,
adding that nothing was changed. Operations check what they can before they
begin (shapes, initialisers, budgets), so the log is a safety net for what
cannot be known in advance (a torch error while writing, an interrupt).

>>> with Transaction("merge adapter 'a'") as txn:      # doctest: +SKIP
...     txn.write(host.weight, new_weight)
...     txn.set_requires_grad(p, False)
...     txn.on_undo(lambda: patch.entries.remove(entry))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Literal

import torch

from pefref.language.errors import PefrefError

__all__ = ["Transaction", "OperationError", "located"]


class OperationError(PefrefError):
    """An operation on a model failed; the model was left as it was before the operation."""


class Transaction:
    """An undo log for one operation on a model (use as a context manager)."""

    def __init__(self, what: str, keep: bool = False) -> None:
        self.what = what
        self._undo: list[Callable[[], object]] = []
        self._saved: set[int] = set()
        self.committed = False
        self.keep = keep
        """Keep the undo log after success, so that :meth:`rollback` can undo the operation later."""

    # --- recording ------------------------------------------------------------------------------------

    def on_undo(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` if the operation fails (undo actions run last-registered first)."""
        self._undo.append(fn)

    def save(self, t: torch.Tensor) -> None:
        """Keep a copy of ``t``'s value (once per transaction) to write back on failure."""
        if id(t) in self._saved:
            return
        self._saved.add(id(t))
        copy = t.detach().clone()

        def restore() -> None:
            with torch.no_grad():
                t.copy_(copy)

        self._undo.append(restore)

    def write(self, t: torch.Tensor, value: torch.Tensor) -> None:
        """Copy ``value`` into ``t`` in place (shape checked first), saving the old value."""
        if tuple(value.shape) != tuple(t.shape):
            raise PefrefError(f"cannot write a tensor of shape {tuple(value.shape)} into one of shape {tuple(t.shape)}")
        self.save(t)
        with torch.no_grad():
            t.copy_(value)

    def set_requires_grad(self, p: torch.Tensor, flag: bool) -> None:
        """Set ``p.requires_grad``, restoring the old flag on failure."""
        old = p.requires_grad
        if old == flag:
            return
        self._undo.append(lambda: p.requires_grad_(old))
        p.requires_grad_(flag)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set an attribute, restoring the old value (or its absence) on failure."""
        missing = object()
        old = obj.__dict__.get(name, missing)

        def restore() -> None:
            if old is missing:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old

        self._undo.append(restore)
        setattr(obj, name, value)

    # --- outcome --------------------------------------------------------------------------------------

    def rollback(self) -> list[BaseException]:
        """Run the undo log (every action, even when one fails); returns the failures."""
        failures: list[BaseException] = []
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except BaseException as e:
                failures.append(e)
        self._saved.clear()
        return failures

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> Literal[False]:
        if exc is None:
            self.committed = True
            if not self.keep:
                self._undo.clear()
            self._saved.clear()
            return False
        failures = self.rollback()
        if failures:
            raise OperationError(f"{self.what} failed ({_describe(exc)}) and undoing it failed too ({_describe(failures[0])}); the model may be inconsistent") from exc
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: undone, then passed on as they are
            return False
        if isinstance(exc, PefrefError):
            if isinstance(exc, OperationError) or "nothing was changed" in str(exc):
                return False
            raise OperationError(f"{self.what}: {exc} (nothing was changed)") from exc
        raise OperationError(f"{self.what} failed: {_describe(exc)} (nothing was changed)") from exc


def _describe(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


@contextlib.contextmanager
def located(where: str) -> Iterator[None]:
    """Re-raise any error inside the block as a :class:`PefrefError` prefixed with ``where``."""
    try:
        yield
    except PefrefError as e:
        if isinstance(e, OperationError):
            raise
        raise PefrefError(f"{where}: {e}") from e
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        raise PefrefError(f"{where}: {_describe(e)}") from e
