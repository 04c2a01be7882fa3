"""Shape rules of the primitives: what each op gives for the shapes of its arguments (no torch).

Validation runs a module's expressions on shapes instead of tensors (see
:mod:`pefref.language.shapecheck`): a tensor is a tuple of ints, a number is a
number. A rule takes the op's arguments so represented and returns the result's
shape, or ``None`` where it cannot tell (the check then stops there); it raises
:class:`ShapeMismatch` when the arguments cannot go together. Registered once
per op with :func:`shape_rule`; a test checks every tensor op has one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from pefref.ops.rules import registrar

__all__ = ["Shape", "ComplexShape", "IntShape", "ShapeMismatch", "SHAPE_RULES", "shape_rule", "broadcast", "matmul_shape", "WORKSPACE_RULES", "workspace_rule"]


class Shape(tuple):
    """The shape of a tensor (a tuple of ints), told apart from a tuple of numbers written in an expression."""

    def __repr__(self) -> str:
        return "[" + ", ".join(map(str, self)) + "]"


class ComplexShape(Shape):
    """The shape of a complex tensor (what :func:`~pefref.ops.spectral.fft` gives): only the ops that declare
    ``complex_in`` and elementwise arithmetic take it; ``real`` brings it back."""

    def __repr__(self) -> str:
        return "complex" + super().__repr__()


class IntShape(Shape):
    """The shape of an integer tensor (indices: ``argmax``, ``randint``): only arguments an op declares in
    ``int_args`` take it (``gather``'s index, ``take``'s index)."""

    def __repr__(self) -> str:
        return "int" + super().__repr__()


class ShapeMismatch(ValueError):
    """Arguments whose shapes cannot go together."""


Rule = Callable[..., Any]
SHAPE_RULES: dict[str, Rule] = {}


shape_rule = registrar(SHAPE_RULES, "shape rule")
"""``@shape_rule(*names)``: register a function as the shape rule of the ops ``names``."""


Workspace = Callable[..., int]
WORKSPACE_RULES: dict[str, Workspace] = {}
"""Op (or initialiser) name -> the elements it allocates for itself beyond its result, given its
arguments as shapes (an initialiser: the parameter's shape): an SVD's fp32 copy and factors, a QR's.
What apply adds to an expression's transient memory when it estimates the peak (see
:func:`pefref.language.shapecheck.expression_cost`)."""


workspace_rule = registrar(WORKSPACE_RULES, "workspace rule")
"""``@workspace_rule(*names)``: register a function as the workspace rule of the ops (or initialisers) ``names``."""


def _count(n: Any, what: str) -> int:
    """A size argument (``eye(n)``, ``scatter2d(rows, cols)``): a non-negative integer."""
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ShapeMismatch(f"{what} must be a non-negative integer, found {n!r}")
    return n


def _dim(s: Shape, d: int) -> int:
    if not -len(s) <= d < len(s):
        raise ShapeMismatch(f"dimension {d} is out of range for a tensor of shape {s}")
    return d % len(s)


def broadcast(a: Shape, b: Shape) -> Shape:
    """Numpy/torch broadcasting of two shapes."""
    out = []
    for x, y in zip((1,) * (len(b) - len(a)) + tuple(a), (1,) * (len(a) - len(b)) + tuple(b)):
        if x != y and 1 not in (x, y):
            raise ShapeMismatch(f"shapes {a} and {b} do not broadcast")
        out.append(max(x, y))
    return Shape(out)


def matmul_shape(a: Shape, b: Shape) -> Shape:
    """The shape of ``a @ b`` (vectors and batches as torch.matmul)."""
    if not a or not b:
        raise ShapeMismatch("matmul of a scalar")
    a2, b2 = (Shape((1, *a)) if len(a) == 1 else a), (Shape((*b, 1)) if len(b) == 1 else b)
    if a2[-1] != b2[-2]:
        raise ShapeMismatch(f"cannot multiply {a} by {b}: {a2[-1]} != {b2[-2]}")
    lead = broadcast(Shape(a2[:-2]), Shape(b2[:-2]))
    out = [*lead, a2[-2], b2[-1]]
    if len(a) == 1:
        out.pop(-2)
    if len(b) == 1:
        out.pop(-1)
    return Shape(out)


@shape_rule("sqrt", "log2", "detach", "exp", "gelu", "gelu_tanh", "relu", "sigmoid", "silu", "tanh", "softmax", "zeros_like")
def _same(a: Shape, *_: Any, **__: Any) -> Shape:
    return a


def _matrices(a: Any, op: str) -> Shape:
    """``a`` is a matrix or a batch of them (the op works on its last two dimensions)."""
    if not isinstance(a, Shape) or len(a) < 2:
        raise ShapeMismatch(f"{op} works on the last two dimensions of a matrix (or a batch of them), found {a}")
    return a


@shape_rule("ifft2_real", "orthonormal_rows")
def _matrix_same(a: Shape, *_: Any, **__: Any) -> Shape:
    return _matrices(a, "this op")


@shape_rule("cayley")
def _cayley(q: Shape, terms: Any = 0) -> Shape:
    if _matrices(q, "cayley")[-1] != q[-2]:
        raise ShapeMismatch(f"cayley needs square matrices [..., b, b], found {q}")
    if isinstance(terms, (int, float)) and (terms != int(terms) or (int(terms) != 0 and terms < 2)):
        raise ShapeMismatch(f"cayley's terms must be 0 (exact) or an integer of at least 2, found {terms!r}")
    return q


@shape_rule("dropout")
def _dropout(a: Shape, p: Any = 0.0, *_: Any, **__: Any) -> Shape:
    if isinstance(p, (int, float)) and not 0 <= p <= 1:
        raise ShapeMismatch(f"dropout's probability must be within [0, 1], found {p!r}")
    return a


@shape_rule("min", "max")
def _entrywise2(a: Any, b: Any) -> Any:
    if any(isinstance(v, tuple) and not isinstance(v, Shape) for v in (a, b)):
        raise ShapeMismatch("takes numbers or tensors, not a tuple")
    if not isinstance(a, Shape) and not isinstance(b, Shape):
        return None
    return broadcast(a if isinstance(a, Shape) else Shape(()), b if isinstance(b, Shape) else Shape(()))


@shape_rule("linear")
def _linear(x: Shape, w: Shape, b: Shape | None = None) -> Shape:
    if len(w) != 2:
        raise ShapeMismatch(f"weight must be [out, in], found {w}")
    if x[-1] != w[1]:
        raise ShapeMismatch(f"input width {x[-1]} does not match weight {w} (in = {w[1]})")
    out = Shape((*x[:-1], w[0]))
    return broadcast(out, b) if b is not None else out


@shape_rule("matmul")
def _matmul(a: Shape, b: Shape) -> Shape:
    return matmul_shape(a, b)


@shape_rule("t")
def _t(a: Shape) -> Shape:
    a = _matrices(a, "t (the transpose of the last two dimensions)")
    return Shape((*a[:-2], a[-1], a[-2]))


@shape_rule("kron")
def _kron(a: tuple[Any, ...], b: tuple[Any, ...]) -> Shape:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return Shape(x * y for x, y in zip(a, b))


@shape_rule("kron_sum")
def _kron_sum(a: Shape, b: Shape) -> Shape:
    if len(a) != 3 or len(b) != 3 or a[0] != b[0]:
        raise ShapeMismatch(f"kron_sum needs [n, a1, a2] and [n, b1, b2], found {a} and {b}")
    return Shape((a[1] * b[1], a[2] * b[2]))


@shape_rule("diag")
def _diag(v: Shape) -> Shape:
    return Shape((v[0], v[0])) if len(v) == 1 else Shape((min(v),))


@shape_rule("eye")
def _eye(n: int, like: Shape) -> Shape:
    n = _count(n, "eye's size n")
    return Shape((n, n))


@shape_rule("sum", "mean")
def _reduce(a: Shape, dim: int = -1, keepdim: bool = False) -> Shape:
    d = _dim(a, dim)
    return Shape(a[:d] + ((1,) if keepdim else ()) + a[d + 1:])


@shape_rule("argmax", "amax")
def _argmax(a: Shape, dim: int = -1, keepdim: bool = False) -> Shape:
    return _reduce(a, dim, keepdim)


@shape_rule("row_norm")
def _row_norm(w: Shape) -> Shape:
    return Shape((w[0], 1))


@shape_rule("col_norm")
def _col_norm(w: Shape) -> Shape:
    return Shape((1, w[1]))


@shape_rule("attention")
def _attention(q: Shape, k: Shape, v: Shape, heads: int = 1, causal: Any = False, mask: Any = None) -> Shape:
    dh = q[-1] // heads if heads and not q[-1] % heads else 0
    kvh = k[-1] // dh if dh and not k[-1] % dh else 0
    if (not kvh or heads % kvh or k[-2] != v[-2] or v[-1] % kvh
            or (len(k) > 2 and tuple(k[:-2]) != tuple(q[:-2]))):
        raise ShapeMismatch(f"attention over q {q}, k {k}, v {v} with {heads} heads")
    return Shape((*q[:-1], v[-1] // kvh * heads))


@shape_rule("block_diag")
def _block_diag(b: Shape) -> Shape:
    return Shape((b[0] * b[1], b[0] * b[2]))


@shape_rule("butterfly")
def _butterfly(b: Shape) -> Shape:
    return Shape((b[1] * b[2], b[1] * b[3]))


@shape_rule("householder")
def _householder(u: Shape) -> Shape:
    if len(u) != 2:
        raise ShapeMismatch(f"householder needs its reflection vectors as the columns of a matrix [d, r], found {u}")
    return Shape((u[0], u[0]))


@shape_rule("skew")
def _skew(v: Shape, b: int) -> Shape:
    b = _count(b, "skew's block size b")
    if v[-1] != b * (b - 1) // 2:
        raise ShapeMismatch(f"skew needs [..., {b * (b - 1) // 2}] for {b}x{b} blocks, found {v}")
    return Shape((*v[:-1], b, b))


@shape_rule("svd_u")
def _svd_u(w: Shape, k: int, niter: int = 0, seed: Any = 0) -> Shape:
    return Shape((w[0], k))


@shape_rule("svd_s")
def _svd_s(w: Shape, k: int, niter: int = 0, seed: Any = 0) -> Shape:
    return Shape((k,))


@shape_rule("svd_vh")
def _svd_vh(w: Shape, k: int, niter: int = 0, seed: Any = 0) -> Shape:
    return Shape((k, w[1]))


@shape_rule("top_right_singular")
def _top_right_singular(b: Shape, a: Shape, start: Shape, iters: Any = 15) -> Shape:
    if len(a) < 2 or len(b) != len(a) or b[:-2] != a[:-2] or b[-1] != a[-2]:
        raise ShapeMismatch(f"top_right_singular needs factors b [..., out, r] and a [..., r, in] with the same batch, found {b} and {a}")
    if not start or start[-1] != a[-1] or (len(start) > 1 and tuple(start) != (*a[:-2], a[-1])):
        raise ShapeMismatch(f"top_right_singular's start must be [{a[-1]}] or [..., {a[-1]}] like the batch, found {start}")
    _count(iters, "top_right_singular's iters")
    return Shape((*a[:-2], a[-1]))


@shape_rule("damped", "inv")
def _square(c: Shape, *_: Any, **__: Any) -> Shape:
    if len(c) != 2 or c[0] != c[1]:
        raise ShapeMismatch(f"needs a square matrix [n, n], found {c}")
    return c


@shape_rule("weight_norm")
def _weight_norm(v: Shape, g: Shape, detach: Any = False) -> Shape:
    if len(v) != 2 or tuple(g) not in ((v[0], 1), (v[0],)):
        raise ShapeMismatch(f"weight_norm needs v [out, in] and g [out, 1] or [out], found {v} and {g}")
    return v


@shape_rule("scatter2d")
def _scatter2d(values: Shape, positions: Shape, rows: int, cols: int) -> Shape:
    return Shape((_count(rows, "scatter2d's rows"), _count(cols, "scatter2d's cols")))


@shape_rule("kron_linear")
def _kron_linear(x: Shape, a: Shape, b: Shape) -> Shape:
    if x[-1] != a[1] * b[1]:
        raise ShapeMismatch(f"input width {x[-1]} does not match a {a} ⊗ b {b} (in = {a[1] * b[1]})")
    return Shape((*x[:-1], a[0] * b[0]))


@shape_rule("position_mask")
def _position_mask(h: Shape, first: int = 0, last: int = 0) -> Shape:
    return Shape((h[-2], 1))


@shape_rule("from_match")
def _from_match(ids: Shape, tokens: Any) -> Shape:
    return Shape((*ids, 1))


@shape_rule("lstm")
def _lstm(x: Shape, w_ih: Shape, w_hh: Shape, *_: Any) -> Shape:
    return Shape((*x[:-1], w_hh[1] * w_hh[3]))


@shape_rule("reshape")
def _reshape(a: Shape, shape: Any) -> Shape:
    dims = list(shape) if isinstance(shape, tuple) else [shape]
    n = math.prod(a)
    if dims.count(-1) == 1:
        rest = math.prod(d for d in dims if d != -1)
        if rest == 0 or n % rest:
            raise ShapeMismatch(f"cannot reshape {a} to {tuple(dims)}")
        dims[dims.index(-1)] = n // rest
    if math.prod(dims) != n:
        raise ShapeMismatch(f"cannot reshape {a} ({n} entries) to {tuple(dims)}")
    return Shape(int(d) for d in dims)


@shape_rule("unflatten")
def _unflatten(a: Shape, dim: int, sizes: Any) -> Shape:
    d = _dim(a, dim)
    if math.prod(sizes) != a[d]:
        raise ShapeMismatch(f"cannot split dimension {dim} of {a} into {tuple(sizes)}")
    return Shape((*a[:d], *sizes, *a[d + 1:]))


@shape_rule("unsqueeze")
def _unsqueeze(a: Shape, dim: int) -> Shape:
    d = dim % (len(a) + 1)
    return Shape((*a[:d], 1, *a[d:]))


@shape_rule("squeeze")
def _squeeze(a: Shape, dim: int) -> Shape:
    d = _dim(a, dim)
    return Shape(a[:d] + a[d + 1:]) if a[d] == 1 else a


@shape_rule("narrow")
def _narrow(a: Shape, dim: int, start: int, length: int) -> Shape:
    d = _dim(a, dim)
    if start < 0 or start + length > a[d]:
        raise ShapeMismatch(f"narrow({start}, {length}) runs past dimension {dim} of {a}")
    return Shape((*a[:d], length, *a[d + 1:]))


@shape_rule("as_values")
def _as_values(v: Any, like: Shape) -> Shape:
    return Shape((len(v) if isinstance(v, (tuple, list)) else 1,))


@shape_rule("index_copy")
def _index_copy(a: Shape, dim: int, index: Any, src: Shape) -> Shape:
    d = _dim(a, dim)
    index = tuple(index) if isinstance(index, list) else index
    n = index[0] if isinstance(index, Shape) else len(index) if isinstance(index, tuple) else 1
    if len(src) != len(a) or src[d] != n or any(x != y for i, (x, y) in enumerate(zip(a, src)) if i != d):
        raise ShapeMismatch(f"index_copy of {n} entries along dimension {dim} of {a} needs a source of that shape there, found {src}")
    if isinstance(index, tuple) and len(set(index)) != len(index):
        raise ShapeMismatch(f"index_copy needs distinct positions, found {list(index)}")
    if isinstance(index, tuple) and isinstance(a[d], int) and any(not 0 <= i < a[d] for i in index):
        raise ShapeMismatch(f"index_copy positions {list(index)} run past dimension {dim} of {a}")
    return a


@shape_rule("index_add")
def _index_add(a: Shape, dim: int, index: Any, src: Shape) -> Shape:
    d = _dim(a, dim)
    n = index[0] if isinstance(index, Shape) else len(index) if isinstance(index, tuple) else 1
    if len(src) != len(a) or src[d] != n or any(x != y for i, (x, y) in enumerate(zip(a, src)) if i != d):
        raise ShapeMismatch(f"index_add of {n} slices along dimension {dim} of {a} needs a source of that shape there, found {src}")
    return a


@shape_rule("index_select")
def _index_select(a: Shape, dim: int, index: Any) -> Shape:
    d = _dim(a, dim)
    n = index[0] if isinstance(index, Shape) else len(index) if isinstance(index, (tuple, list)) else 1
    return Shape((*a[:d], n, *a[d + 1:]))


@shape_rule("gather")
def _gather(a: Shape, dim: int, index: Shape) -> Shape:
    if len(index) != len(a):
        raise ShapeMismatch(f"gather needs an index of the same rank as {a}, found {index}")
    return index


@shape_rule("scatter")
def _scatter(a: Shape, dim: int, index: Shape, src: Any) -> Shape:
    return a


@shape_rule("topk", "topk_indices")
def _topk(a: Shape, k: int, dim: int = -1) -> Shape:
    d = _dim(a, dim)
    if k > a[d]:
        raise ShapeMismatch(f"top-{k} of a dimension of size {a[d]}")
    return Shape((*a[:d], k, *a[d + 1:]))


@shape_rule("cat")
def _cat(tensors: Any, dim: int = -1) -> Shape:
    ts = [t for t in tensors]
    d = _dim(ts[0], dim)
    for t in ts[1:]:
        if len(t) != len(ts[0]) or any(x != y for i, (x, y) in enumerate(zip(t, ts[0])) if i != d):
            raise ShapeMismatch(f"cannot concatenate {ts[0]} and {t} along {dim}")
    return Shape((*ts[0][:d], sum(t[d] for t in ts), *ts[0][d + 1:]))


_LETTERS = re.compile(r"[A-Za-z]")


@shape_rule("einsum")
def _einsum(subscripts: str, *ops: Shape) -> Shape:
    lhs, _, rhs = subscripts.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        raise ShapeMismatch(f"einsum {subscripts!r} names {len(terms)} operands, {len(ops)} given")
    sizes: dict[str, int] = {}
    ell: Shape = Shape(())
    for term, s in zip(terms, ops):
        letters = _LETTERS.findall(term)
        if "..." in term:
            pre, _post = term.split("...")
            n_ell = len(s) - len(letters)
            if n_ell < 0:
                raise ShapeMismatch(f"einsum term {term!r} has more letters than {s} has dimensions")
            dims = list(s[:len(pre)]) + list(s[len(pre) + n_ell:])
            ell = broadcast(ell, Shape(s[len(pre):len(pre) + n_ell]))
        else:
            if len(letters) != len(s):
                raise ShapeMismatch(f"einsum term {term!r} does not fit an operand of shape {s}")
            dims = list(s)
        for c, n in zip(letters, dims):
            if sizes.setdefault(c, n) != n and 1 not in (n, sizes[c]):
                raise ShapeMismatch(f"einsum index {c!r} is {sizes[c]} in one operand and {n} in another")
            sizes[c] = max(sizes[c], n)
    out: list[int] = []
    for part in re.split(r"(\.\.\.)", rhs):
        out += list(ell) if part == "..." else [sizes[c] for c in _LETTERS.findall(part)]
    return Shape(out)


@workspace_rule("svd_u", "svd_s", "svd_vh")
def _svd_work(w: Shape, k: Any = 0, *_: Any, **__: Any) -> int:
    # an fp32 copy of w and the thin factors U [m, p], S [p], Vh [p, n] (p = min(m, n)), and LAPACK's work of about as much
    m, n = (w[-2], w[-1]) if len(w) >= 2 else (1, math.prod(w))
    p = min(m, n)
    return 2 * (m * n + p * (m + n + 1))


@workspace_rule("orthogonal")
def _qr_work(shape: Shape) -> int:
    # torch.nn.init.orthogonal_: a normal matrix, its QR factors, in fp32 on the host
    return 3 * math.prod(shape)


@workspace_rule("attention")
def _attention_work(q: Shape, k: Shape, v: Shape, heads: int = 1, *_: Any, **__: Any) -> int:
    # the scores [..., heads, seq_q, seq_k], softmaxed (two of them) and the mask
    lead = math.prod(q[:-2]) if len(q) > 2 else 1
    return 3 * lead * max(int(heads), 1) * (q[-2] if len(q) > 1 else 1) * (k[-2] if len(k) > 1 else 1)


# --- pointwise, spectral, decompositions, draws ---------------------------------------------------------------


@shape_rule("sin", "cos", "clamp", "relaxed_bernoulli", "randint_like")
def _entrywise(a: Shape, *_: Any, **__: Any) -> Shape:
    return a


@shape_rule("gaussian_sample")
def _gaussian_sample(mu: Shape, logvar: Shape) -> Shape:
    if broadcast(mu, logvar) != mu:  # the sample has the mean's shape, in training as in eval
        raise ShapeMismatch(f"the log-variance {logvar} must broadcast to the mean's shape {mu}")
    return mu


@shape_rule("fft", "ifft")
def _transform(a: Shape, dim: int = -1) -> Shape:
    _dim(a, dim)
    return ComplexShape(a)


@shape_rule("real")
def _real(a: Shape, like: Any = None) -> Shape:
    return Shape(a)


@shape_rule("layer_norm")
def _layer_norm(a: Shape, weight: Shape | None = None, bias: Shape | None = None, eps: Any = 1e-5) -> Shape:
    for what, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p) != (a[-1],):
            raise ShapeMismatch(f"layer_norm's {what} must be [{a[-1]}] (the last dimension of {a}), found {p}")
    return a


@shape_rule("rms_norm")
def _rms_norm(a: Shape, weight: Shape | None = None, eps: Any = 1e-6) -> Shape:
    if weight is not None and tuple(weight) != (a[-1],):
        raise ShapeMismatch(f"rms_norm's weight must be [{a[-1]}] (the last dimension of {a}), found {weight}")
    return a


@shape_rule("rotary")
def _rotary(a: Shape, d_head: Any, theta: Any = 10000.0) -> Shape:
    if len(a) < 2:
        raise ShapeMismatch(f"rotary reads a sequence [..., seq, heads * d_head], found {a}")
    if not isinstance(d_head, int) or d_head <= 0 or d_head % 2:
        raise ShapeMismatch(f"rotary's d_head must be a positive even integer, found {d_head}")
    if isinstance(a[-1], int) and a[-1] % d_head:
        raise ShapeMismatch(f"rotary: the last dimension of {a} is not a whole number of heads of {d_head}")
    return a


@shape_rule("cross_entropy")
def _cross_entropy(logits: Shape, labels: Shape, shift: Any = 0, ignore: Any = -100) -> Shape:
    if len(logits) < 1 or tuple(labels) != tuple(logits[:-1]):
        raise ShapeMismatch(f"cross_entropy: the labels {labels} must have the shape of the logits {logits} without their last (class) dimension")
    if not isinstance(shift, int) or shift < 0 or (shift and (len(logits) < 2 or (isinstance(logits[-2], int) and shift >= logits[-2]))):
        raise ShapeMismatch(f"cross_entropy: shift must be a non-negative integer shorter than the sequence of {logits}, found {shift}")
    return Shape(())


@shape_rule("flatten")
def _flatten(a: Shape, start: int = -2, end: int = -1) -> Shape:
    s, e = _dim(a, start), _dim(a, end)
    if s > e:
        raise ShapeMismatch(f"flatten: start {start} comes after end {end} in {a}")
    return Shape((*a[:s], math.prod(a[s:e + 1]), *a[e + 1:]))


@shape_rule("take")
def _take(a: Shape, index: Shape) -> Shape:
    if not a:
        raise ShapeMismatch("take reads rows of a tensor, not of a scalar")
    return Shape((*index, *a[1:]))


@shape_rule("strided")
def _strided(a: Shape, dim: int, start: int, step: int) -> Shape:
    d = _dim(a, dim)
    step, start = _count(step, "strided's step"), _count(start, "strided's start")
    if step < 1:
        raise ShapeMismatch("strided's step must be at least 1")
    return Shape((*a[:d], max(0, -(-(a[d] - start) // step)), *a[d + 1:]))


@shape_rule("block_circulant")
def _block_circulant(x: Shape, w: Shape) -> Shape:
    if len(w) != 3:
        raise ShapeMismatch(f"block_circulant's kernels must be [m, n, b], found {w}")
    if x[-1] != w[1] * w[2]:
        raise ShapeMismatch(f"block_circulant: input width {x[-1]} is not n*b = {w[1]}*{w[2]} for kernels {w}")
    return Shape((*x[:-1], w[0] * w[2]))


@shape_rule("circulant_matrix")
def _circulant_matrix(w: Shape) -> Shape:
    if len(w) != 3:
        raise ShapeMismatch(f"circulant_matrix's kernels must be [m, n, b], found {w}")
    return Shape((w[0] * w[2], w[1] * w[2]))


@shape_rule("idwt2")
def _idwt2(a: Shape, wavelet: Any = "db1") -> Shape:
    from pefref.ops.wavelet_filters import REC_LO

    if not isinstance(wavelet, str) or wavelet not in REC_LO:
        raise ShapeMismatch(f"unknown wavelet {wavelet!r} (known: {', '.join(REC_LO)})")
    if len(a) < 2 or a[-1] % 2 or a[-2] % 2:
        raise ShapeMismatch(f"idwt2 needs [..., H, W] with H and W even (four quadrants), found {a}")
    f = len(REC_LO[wavelet])
    h, w = a[-2] + 2 - f, a[-1] + 2 - f
    if h < 1 or w < 1:
        raise ShapeMismatch(f"idwt2 of {a} with the {f}-tap wavelet {wavelet!r} leaves nothing")
    return Shape((*a[:-2], h, w))


@shape_rule("qr_q")
def _qr_q(a: Shape, k: int = 0) -> Shape:
    if len(a) < 2:
        raise ShapeMismatch(f"qr_q needs a matrix, found {a}")
    p = min(a[-2], a[-1])
    return Shape((*a[:-1], min(_count(k, "qr_q's k"), p) if k else p))


@shape_rule("qr_r")
def _qr_r(a: Shape, k: int = 0) -> Shape:
    if len(a) < 2:
        raise ShapeMismatch(f"qr_r needs a matrix, found {a}")
    p = min(a[-2], a[-1])
    return Shape((*a[:-2], min(_count(k, "qr_r's k"), p) if k else p, a[-1]))


@shape_rule("gaussian")
def _gaussian(shape: Any, seed: Any = 0) -> Shape:
    if isinstance(shape, Shape):
        raise ShapeMismatch(f"gaussian's shape is a tuple of sizes, not a tensor {shape}")
    dims = shape if isinstance(shape, tuple) else (shape,)
    return Shape(_count(d, "gaussian's shape") for d in dims)


@shape_rule("random_orthogonal")
def _random_orthogonal(n: Any, seed: Any = 0) -> Shape:
    n = _count(n, "random_orthogonal's n")
    return Shape((n, n))


@workspace_rule("qr_q", "qr_r")
def _qr_factors_work(a: Shape, *_: Any, **__: Any) -> int:
    # an fp32 copy of a and both factors
    return 3 * math.prod(a)


@shape_rule("distinct_above")
def _distinct_above(x: Shape, mask: Shape) -> Shape:
    if not isinstance(x, Shape) or not isinstance(mask, Shape):
        raise ShapeMismatch("takes a tensor of values and a tensor mask")
    if broadcast(x, mask) != x:
        raise ShapeMismatch(f"the mask {mask} does not broadcast to the values' shape {x}")
    return x
