"""Structured products computed without their dense intermediates (less time, less memory).

Each primitive here equals a short expression of other primitives, but never
builds the large matrix that expression names: a block-diagonal matrix is
applied block by block, a Hadamard product of low-rank matrices keeps only
its factors for the backward pass. Techniques use them where peft does the
same, so the catalog is not slower or hungrier than the reference
implementation it is checked against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pefref.ops import TORCH_SETUP, primitive
from pefref.ops.linear_maps import LinearMap, Mapped, NoLinearRule, Ops, as_map, dense, linear_rule
from pefref.ops.shapes import Shape, ShapeMismatch, shape_rule

if TYPE_CHECKING:
    import torch

__all__ = ["blockdiag_matmul", "lowrank_hadamard"]


@primitive(linear_in=(0, 1))
def blockdiag_matmul(a: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Product with a block-diagonal matrix, block by block: :math:`a\\,\\operatorname{diag}(B_1, \\dots, B_n)`.

    ``a`` is ``[..., n·b]``, ``blocks`` is ``[n, b, c]``; the result is
    ``[..., n·c]``, equal to ``a @ block_diag(blocks)`` but computed as ``n``
    products of ``b``-wide slices (``n`` times fewer multiplications, and no
    ``n·b × n·c`` matrix). Applied to a weight ``W`` [out, in] it rotates the
    input side of the weight block-wise, as orthogonal finetuning does
    (Qiu et al. 2023, https://arxiv.org/abs/2306.07280).
    """
    n, b, c = blocks.shape
    lead = a.shape[:-1]
    parts = a.reshape(-1, n, b).transpose(0, 1)  # [n, rows, b]
    out = (parts @ blocks).transpose(0, 1)  # [rows, n, c]
    return out.reshape(*lead, n * c)


@shape_rule("blockdiag_matmul")
def _blockdiag_matmul(a: Shape, blocks: Shape) -> Shape:
    if len(blocks) != 3 or not a or a[-1] != blocks[0] * blocks[1]:
        raise ShapeMismatch(f"blockdiag_matmul needs a [..., n*b] and blocks [n, b, c], found {a} and {blocks}")
    return Shape((*a[:-1], blocks[0] * blocks[2]))


@linear_rule("blockdiag_matmul")
def _blockdiag_matmul_map(ops: Ops, a: Any, blocks: Any) -> LinearMap:
    """:math:`x (M \\operatorname{diag}(B_i))^\\top = (x \\operatorname{diag}(B_i^\\top)) M^\\top`: the input is
    transformed block by block (rotated, for orthogonal blocks), then ``M`` acts on it; the product is never formed."""
    m = as_map(a)
    if isinstance(blocks, LinearMap) and blocks.involves_w:
        raise NoLinearRule("blocks that depend on W")
    r = dense(ops, blocks)
    rows = m.shape[0] if m.shape is not None and len(m.shape) == 2 else None
    return Mapped(
        (rows, None), m.involves_w,
        apply=lambda x: m.apply(ops, ops["blockdiag_matmul"](x, ops["t"](r))),
        apply_t=lambda y: ops["blockdiag_matmul"](m.apply_t(ops, y), r),
        value=lambda detached: ops["blockdiag_matmul"](m.value(ops, detached), ops["detach"](r) if detached else r),
    )


_HADAMARD: Any = None


def _hadamard_function() -> Any:
    """The autograd function of :func:`lowrank_hadamard` (defined on first use: torch is imported lazily)."""
    global _HADAMARD
    if _HADAMARD is None:
        import torch

        class LowRankHadamard(torch.autograd.Function):
            """(a1 b1) ⊙ (a2 b2), saving only the four factors; the backward recomputes each product."""

            @staticmethod
            def forward(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
                return (a1 @ b1) * (a2 @ b2)

            @staticmethod
            def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
                ctx.save_for_backward(*inputs)

            @staticmethod
            def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
                a1, b1, a2, b2 = ctx.saved_tensors
                need = ctx.needs_input_grad
                g1 = grad * (a2 @ b2) if need[0] or need[1] else None
                ga1 = g1 @ b1.transpose(-2, -1) if need[0] else None
                gb1 = a1.transpose(-2, -1) @ g1 if need[1] else None
                del g1
                g2 = grad * (a1 @ b1) if need[2] or need[3] else None
                ga2 = g2 @ b2.transpose(-2, -1) if need[2] else None
                gb2 = a2.transpose(-2, -1) @ g2 if need[3] else None
                return ga1, gb1, ga2, gb2

        _HADAMARD = LowRankHadamard
    return _HADAMARD


TORCH_SETUP.append(_hadamard_function)


@primitive(intra="dense", linear_in=(0, 1, 2, 3))
def lowrank_hadamard(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Hadamard product of two low-rank products, :math:`(A_1 B_1) \\odot (A_2 B_2)`, memory-lean.

    Equal to ``(a1 @ b1) * (a2 @ b2)``; autograd would keep both full-size
    products for the backward pass, this keeps only the factors and recomputes
    the products there (FedPara / LoHa, Hyeon-Woo et al. 2022,
    https://arxiv.org/abs/2108.06098; peft's LoHa does the same).
    """
    return _hadamard_function().apply(a1, b1, a2, b2)


@shape_rule("lowrank_hadamard")
def _lowrank_hadamard(a1: Shape, b1: Shape, a2: Shape, b2: Shape) -> Shape:
    for a, b in ((a1, b1), (a2, b2)):
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise ShapeMismatch(f"lowrank_hadamard needs [m, r] @ [r, n] factors, found {a} and {b}")
    if (a1[0], b1[1]) != (a2[0], b2[1]):
        raise ShapeMismatch(f"lowrank_hadamard: products {a1[0]}x{b1[1]} and {a2[0]}x{b2[1]} differ")
    return Shape((a1[0], b1[1]))
