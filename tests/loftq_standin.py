"""peft's ``loftq_init`` runnable on a CPU without bitsandbytes, for the parity and interop tests.

peft 0.21's ``loftq_init`` refuses to run without bitsandbytes and computes on "cuda" (or "xpu") unconditionally.
:func:`peft_loftq_init` compiles peft's own source with two changes: the device is the CPU, and ``bnb`` is a
stand-in whose ``Params4bit`` / ``dequantize_4bit`` and ``Int8Params`` / ``int8_vectorwise_dequant`` are pefref's NF4
and int8 primitives. Those are checked on their own, bit-exact, against bitsandbytes 0.50.2's round trips and against
peft's unmodified ``loftq_init`` run with bitsandbytes (tests/test_quantise.py, recorded references).
"""

from __future__ import annotations

import functools
import inspect
import textwrap
import types
from typing import Any

import peft.utils.loftq_utils as lu
import torch

from pefref.ops.quantise import Quantised, int8_dequantise, int8_quantise, nf4_dequantise, nf4_quantise

__all__ = ["peft_loftq_init"]


class _Params4bit:
    def __init__(self, data: torch.Tensor, **_: Any) -> None:
        self.data: Quantised = nf4_quantise(data, 64)
        self.quant_state = None

    def to(self, *_: Any) -> _Params4bit:
        return self


class _Int8Params(_Params4bit):
    def __init__(self, data: torch.Tensor, **_: Any) -> None:
        self.data = int8_quantise(data)
        self.SCB = None


BNB = types.SimpleNamespace(
    nn=types.SimpleNamespace(Params4bit=_Params4bit, Int8Params=_Int8Params),
    functional=types.SimpleNamespace(dequantize_4bit=lambda q, _s: nf4_dequantise(q), int8_vectorwise_dequant=lambda q, _s: int8_dequantise(q)),
)


@functools.cache
def peft_loftq_init() -> Any:
    """peft's ``loftq_init``, on the CPU, with ``bnb`` the stand-in above."""
    src = textwrap.dedent(inspect.getsource(lu.loftq_init)).replace("@torch.no_grad()\n", "")
    for old, new in (('compute_device = "xpu" if is_xpu_available() else "cuda"', 'compute_device = "cpu"'),
                     ("import bitsandbytes as bnb", "pass")):
        assert src.count(old) == 1, f"peft's loftq_init changed: {old!r}"
        src = src.replace(old, new)
    space = {**vars(lu), "bnb": BNB, "is_bnb_available": lambda: True, "is_bnb_4bit_available": lambda: True}
    exec(compile(src, lu.__file__, "exec"), space)
    return torch.no_grad()(space["loftq_init"])
