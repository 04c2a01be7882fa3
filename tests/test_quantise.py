"""The quantisation primitives (NF4, int8) and LoftQ's alternating initialisation against recorded references.

tests/fixtures/quant/reference.pt holds, for fixed weights, bitsandbytes 0.50.2's NF4 (block size 64) and int8
(``Int8Params``, row-wise) round trips and peft 0.21.2's ``loftq_init`` (which needs bitsandbytes and a GPU; it was
run on the CPU, see make_reference.py there). Here neither is needed: the recorded tensors are the reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pefref.ops import PRIMITIVES
from pefref.ops.quantise import NF4_CODE, int8, int8_dequantise, int8_quantise, nf4, nf4_dequantise, nf4_quantise, quant_svd, quantise
from pefref.ops.shapes import SHAPE_RULES, Shape, ShapeMismatch

from .parity import max_diff

TOL = 1e-5
REF = torch.load(Path(__file__).parent / "fixtures" / "quant" / "reference.pt")
WEIGHTS = sorted(k.split(".", 1)[1] for k in REF if k.startswith("w."))
LOFTQ = sorted(k.split(".", 1)[1] for k in REF if k.startswith("loftq_q."))


@pytest.mark.parametrize("name", WEIGHTS)
def test_nf4_matches_bitsandbytes(name: str) -> None:
    w = REF[f"w.{name}"]
    q = nf4_quantise(w)
    assert max_diff(q.absmax, REF[f"nf4_absmax.{name}"]) <= TOL
    assert max_diff(nf4(w), REF[f"nf4.{name}"]) <= TOL
    assert max_diff(nf4_dequantise(q), nf4(w)) == 0
    assert int(q.codes.max()) < len(NF4_CODE) and q.codes.numel() == w.numel()
    assert max_diff(nf4(w), w) > 1e-3  # quantisation loses something: the comparison is not of w with itself


@pytest.mark.parametrize("name", WEIGHTS)
def test_int8_matches_bitsandbytes(name: str) -> None:
    w = REF[f"w.{name}"]
    q = int8_quantise(w)
    assert torch.equal(q.codes, REF[f"int8_codes.{name}"])
    assert max_diff(int8_dequantise(q), REF[f"int8.{name}"]) <= TOL
    assert max_diff(int8(w), REF[f"int8.{name}"]) <= TOL
    assert max_diff(quantise(w, 8), int8(w)) == 0 and max_diff(quantise(w, 4), nf4(w)) == 0


@pytest.mark.parametrize("tag", LOFTQ)
def test_loftq_matches_peft_loftq_init(tag: str) -> None:
    name, r, bits, iters = tag.split(".")
    out = quant_svd(REF[f"w.{name}"], int(r[1:]), int(bits[1:]), int(iters[1:]))
    assert max_diff(out.Q, REF[f"loftq_q.{tag}"]) <= TOL
    assert max_diff(out.A, REF[f"loftq_a.{tag}"]) <= TOL
    assert max_diff(out.B, REF[f"loftq_b.{tag}"]) <= TOL
    w = REF[f"w.{name}"]
    assert torch.linalg.norm(w - out.Q - out.B @ out.A) < torch.linalg.norm(w - out.Q)  # the pair reduces the error


def test_nf4_blocks_and_edge_values() -> None:
    """Blocks run over the flattened tensor (64 a block, the rest in a last one); each block's absmax maps to +-1 and
    a zero block stays zero; a value at a midpoint between two codes takes the lower one."""
    w = torch.zeros(3, 50)
    w[0, 0], w[2, 49] = -4.0, 2.0
    q = nf4_quantise(w)
    assert q.absmax.tolist() == [4.0, 0.0, 2.0]
    out = nf4(w)
    assert out[0, 0] == -4.0 and out[2, 49] == 2.0 and int((out != 0).sum()) == 2
    mid = (NF4_CODE[8] + NF4_CODE[9]) / 2
    assert nf4(torch.tensor([1.0, mid]))[1] == pytest.approx(NF4_CODE[8])
    assert nf4(torch.tensor([1.0, mid + 1e-4]))[1] == pytest.approx(NF4_CODE[9])


def test_quant_svd_reuses_one_computation_and_refuses_bad_ranks() -> None:
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(3))
    first = quant_svd(w, 2)
    assert quant_svd(w.clone(), 2) is first  # the same weight: A, B and Q of one unit from one run
    w2 = w.clone()
    w2[0, 0] += 1
    assert quant_svd(w2, 2) is not first
    with pytest.raises(ValueError, match="r <= 16"):
        quant_svd(w, 17)
    with pytest.raises(ValueError, match="bits"):
        quantise(w, 3)


def test_registered_with_shape_rules() -> None:
    for op in ("nf4", "int8", "quantise", "quant_svd_a", "quant_svd_b", "quant_svd_base"):
        assert op in PRIMITIVES and op in SHAPE_RULES, op
    assert SHAPE_RULES["quant_svd_a"](Shape((32, 48)), 4) == (4, 48)
    assert SHAPE_RULES["quant_svd_b"](Shape((32, 48)), 4) == (32, 4)
    with pytest.raises(ShapeMismatch):
        SHAPE_RULES["quant_svd_a"](Shape((32, 48)), 40)
