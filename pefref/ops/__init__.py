"""The primitive registry: every op a technique's expressions may call.

Each primitive is registered once with :func:`primitive`, with its math and the
facts the view derives typology from:

* ``intra``: the intra-connectivity it contributes (``dense``, ``attention``,
  ``kronecker/hypercomplex``, ``orthogonal``, ``sparse``), or ``None``;
* ``nonlinear``: True when it breaks linearity (activations);
* ``linear_in``: indices of the arguments the op is linear in, given the other
  arguments do not depend on the input (mergeability analysis);
* ``dynamic``: True when it mixes positions of the sequence (attention);
* ``offset_args``: arguments that add an input-independent offset (a bias);
* ``stochastic``: True when it draws random numbers: it samples only in training mode (the compiler
  supplies its ``training`` argument; expressions never pass it), from torch's global generator (so a
  seeded run is reproducible), and is deterministic in eval (dropout: the identity; a reparameterised
  Gaussian: its mean; a relaxed Bernoulli: its probabilities). Mergeability reads a stochastic op as its
  eval map (what a merged model computes: merging is for inference; a merged module no longer samples, so
  train it unmerged); ``eval_args``: the arguments that eval map reads (the mean of a Gaussian sample, not
  its variance), its ``linear_in`` counted among them. Diagrams mark a module that uses one;
* ``choices``: arguments that take a word from a closed set (``idwt2(a, 'db2')``): the expression language
  admits a word literal only there, and validate checks it is one of them;
* ``complex_in``: True when it takes complex tensors (``fft``, ``ifft``, ``real``); validate tracks which tensors
  are complex and refuses any other op of one (elementwise arithmetic excepted), and a complex result;
* ``int_out``: its result holds integers (indices); ``int_args``: the arguments that take such a tensor (an index).
  Validate tracks integer tensors and refuses them anywhere else (a mean of indices, a field's result);
* ``layout``: True for a pure rearrangement of its first argument (reshape, flatten, narrow, ...): an integer
  tensor passes through it and stays one (indices reshaped before they index);
* ``parts``: True when the op also takes a *split* tensor (a parameter declared
  with ``split: k``, stored as one tensor per index of its first ``k``
  dimensions) as its pieces, nested lists indexed like the tensor's leading
  dimensions, instead of one stacked tensor (the compiler passes the pieces
  as they are; any other op gets them stacked).

Primitives live in the modules of this package, grouped by topic; every module
here is imported (found by listing the package), so adding a primitive means
writing one decorated function. Ops are plain functions of torch tensors and
Python numbers; torch is imported inside them, so the registry's metadata is
available without torch.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Primitive", "PRIMITIVES", "TORCH_SETUP", "SUPPLIED", "primitive", "op_table", "call_problem", "word_problem", "signature_of"]


@dataclass(frozen=True)
class Primitive:
    name: str
    fn: Callable[..., Any]
    doc: str
    intra: str | None = None
    nonlinear: bool = False
    linear_in: tuple[int, ...] = ()
    dynamic: bool = False
    leaf: bool = False
    scalar: bool = False
    offset_args: tuple[int, ...] = ()
    tags: frozenset[str] = field(default_factory=frozenset)
    parts: bool = False
    stochastic: bool = False
    choices: tuple[tuple[str, tuple[str, ...]], ...] = ()
    eval_args: tuple[int, ...] | None = None
    complex_in: bool = False
    int_args: tuple[str, ...] = ()
    int_out: bool = False
    layout: bool = False


PRIMITIVES: dict[str, Primitive] = {}

TORCH_SETUP: list[Callable[[], None]] = []
"""Callbacks the compiler runs once, after importing torch: what a primitive must build with torch before any
traced call (an autograd function defined inside code that torch.compile traces would break its graph)."""


def primitive(
    name: str | None = None,
    *,
    intra: str | None = None,
    nonlinear: bool = False,
    linear_in: tuple[int, ...] = (),
    dynamic: bool = False,
    leaf: bool = False,
    scalar: bool = False,
    offset_args: tuple[int, ...] = (),
    parts: bool = False,
    stochastic: bool = False,
    choices: dict[str, tuple[str, ...]] | None = None,
    eval_args: tuple[int, ...] | None = None,
    complex_in: bool = False,
    int_args: tuple[str, ...] = (),
    int_out: bool = False,
    layout: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a primitive op under ``name`` (default: the function's name)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = name or fn.__name__.rstrip("_")
        if key in PRIMITIVES:
            raise ValueError(f"primitive {key!r} registered twice")
        PRIMITIVES[key] = Primitive(key, fn, (fn.__doc__ or "").strip(), intra, nonlinear, linear_in, dynamic, leaf or stochastic, scalar, offset_args,
                                    parts=parts, stochastic=stochastic,
                                    choices=tuple(sorted((choices or {}).items())), eval_args=eval_args,
                                    complex_in=complex_in, int_args=int_args, int_out=int_out, layout=layout)
        return fn

    return deco


def op_table() -> dict[str, Callable[..., Any]]:
    """Name → function, for :func:`pefref.expr.evaluate`."""
    return {k: p.fn for k, p in PRIMITIVES.items()}



SUPPLIED = ("training",)
"""Arguments the compiler supplies to a stochastic (or ``leaf``) op; an expression never writes them."""


@functools.lru_cache(maxsize=1024)
def signature_of(fn: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature(fn)``, cached (validate binds every call to its op's signature)."""
    return inspect.signature(fn)


def call_problem(fn: Callable[..., Any], nargs: int, kwnames: tuple[str, ...], skip: int = 0, supplied: tuple[str, ...] = ()) -> str | None:
    """Why a call of ``fn`` with ``nargs`` positional arguments and the keywords ``kwnames`` cannot bind to its
    signature (the first ``skip`` parameters are bound by the caller: an initialiser's shape, dtype and device;
    ``supplied``: parameters the compiler passes, never written), or None when it binds. No call is made."""
    sig = signature_of(fn)
    params = [p for p in list(sig.parameters.values())[skip:] if p.name not in supplied]
    written = [n for n in kwnames if n in supplied]
    if written:
        return f"argument {written[0]!r} is supplied by the compiler, not written"
    try:
        sig.replace(parameters=params).bind(*range(nargs), **{k: 0 for k in kwnames})
    except TypeError as e:
        shown = ", ".join(str(p) for p in params)
        return f"{e} (its arguments: ({shown}))"
    return None


def word_problem(prim: Primitive, position: int | str, word: str) -> str | None:
    """Why the word literal ``word``, given as argument ``position`` (an index or a keyword), is not one of the
    choices ``prim`` declares for that argument, or None when it is."""
    names = [p for p in signature_of(prim.fn).parameters if p not in SUPPLIED]
    arg = position if isinstance(position, str) else names[position] if position < len(names) else None
    if arg == "subscripts":  # einsum's subscripts: checked by the grammar and the shape rule
        return None
    allowed = dict(prim.choices).get(arg) if arg is not None else None
    if allowed is None:
        takes = ", ".join(f"{a} ({', '.join(c)})" for a, c in prim.choices) or "none"
        return f"a word ({word!r}) is not an argument {prim.name}() takes here (its word arguments: {takes})"
    if word not in allowed:
        return f"{word!r} is not one of {prim.name}()'s {arg} choices: {', '.join(allowed)}"
    return None


for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")
