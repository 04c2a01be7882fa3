"""Expressions written as a paper writes them: ``linear(linear(x, A), B)`` becomes ``B·A·x``.

A small renderer over the checked expression tree (:func:`pefref.language.expr.parse_expr`):
``linear(x, W, b)`` is ``W·x + b``, ``@`` and ``*`` are ``·``, ``t(a)`` is ``aᵀ``,
``sigmoid`` is ``σ``, ``kron`` is ``⊗``, ``einsum`` is a sum over the contracted
indices with the operands' indices as subscripts, reshaping ops (``unflatten``,
``reshape``, ...) and ``dropout`` (the identity at inference) are left out, and
names such as ``Wd``, ``W1`` or ``b_g`` get subscripts. Any other op is written
as a call without its keyword arguments. The result is a list of segments
(text, subscript or superscript) with two writers: HTML for the site and
graphviz's HTML-like labels for diagrams. Nothing is evaluated.
"""

from __future__ import annotations

import ast
import html
import re
from collections.abc import Callable
from dataclasses import dataclass

from pefref.language.expr import parse_expr

__all__ = ["Math", "einsum_math", "math_of", "tree_math"]

_GREEK = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "eta": "η", "theta": "θ",
    "lambda_": "λ", "mu": "μ", "sigma": "σ", "tau": "τ", "phi": "φ", "omega": "ω",
}
_FUNCS = {"sigmoid": "σ", "softmax": "softmax", "tanh": "tanh", "relu": "ReLU", "gelu": "GELU", "gelu_tanh": "GELU",
          "silu": "SiLU", "exp": "exp", "mean": "mean", "attention": "Attn", "lstm": "LSTM", "rotary": "RoPE", "amax": "max",
          "cross_entropy": "CE"}
_TRANSPARENT = {"unflatten", "reshape", "unsqueeze", "squeeze", "detach"}
_PREC = {ast.Add: 1, ast.Sub: 1, ast.Mult: 2, ast.MatMult: 2, ast.Div: 2, ast.FloorDiv: 2, ast.Mod: 2, ast.Pow: 4}
_SYM = {ast.Add: " + ", ast.Sub: " − ", ast.Mult: "·", ast.MatMult: "·", ast.Div: "/", ast.FloorDiv: " // ", ast.Mod: " mod "}

Seg = tuple[str, str]  # (text, '' | 'sub' | 'sup')
_SPECIAL_PREC = {"skew": 1, "gaussian_sample": 1, "sum": 1, "kron_sum": 1, "weight_norm": 2, "kron_linear": 2,
                 "blockdiag_matmul": 2, "block_circulant": 2, "lowrank_hadamard": 2}
"""How tightly an op written in its own notation (``_SPECIAL``) binds, where not as an atom."""


@dataclass(frozen=True)
class Math:
    """A rendered expression: segments of text, subscripts and superscripts, and the source text."""

    segments: tuple[Seg, ...]
    source: str

    def plain(self) -> str:
        """Unicode text without markup (subscripts joined with '_', superscripts with '^' where not a symbol)."""
        return "".join(t if k == "" or t == "⊤" else ("_" if k == "sub" else "^") + t for t, k in self.segments)

    def html(self) -> str:
        """HTML (escaped text, ``<sub>``/``<sup>``)."""
        return "".join(_wrap(html.escape(t, quote=False), k, "sub", "sup") for t, k in self.segments)

    def dot(self) -> str:
        """Graphviz HTML-like label text (escaped, ``<SUB>``/``<SUP>``)."""
        from pefref.render.style import esc

        return "".join(esc(t) if k == "" else _small(esc(t), k) for t, k in self.segments)

    def __len__(self) -> int:
        return sum(len(t) if k == "" else (len(t) + 1) // 2 for t, k in self.segments)

    def lines(self, width: int = 34, prefix: str = "") -> list[Math]:
        """``prefix`` and the expression broken at spaces into lines of about ``width`` characters (never inside a name)."""
        words: list[list[Seg]] = [[]]
        for t, k in ((prefix, ""), *self.segments):
            parts = t.split(" ") if k == "" else [t]
            for j, part in enumerate(parts):
                if j:
                    words.append([])
                if part:
                    words[-1].append((part + (" " if j < len(parts) - 1 else ""), k))
        out: list[list[Seg]] = [[]]
        used = 0
        for w in words:
            n = Math(tuple(w), "").__len__()
            if used and used + n > width:
                out.append([("  ", "")])
                used = 2
            out[-1] += w
            used += n
        return [Math(tuple(_merge([(t, k) for t, k in ln])), self.source) for ln in out if ln]


_UNICODE_SUP = str.maketrans("⊤0123456789+-", "ᵀ⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻")
_UNICODE_SUB = str.maketrans("0123456789aehijklmnoprstuvx,", "₀₁₂₃₄₅₆₇₈₉ₐₑₕᵢⱼₖₗₘₙₒₚᵣₛₜᵤᵥₓ,")


def _small(text: str, kind: str) -> str:
    """A sub- or superscript in a graphviz label: Unicode's sub/superscript characters where each has one, else
    ``_d`` / ``^x`` (graphviz's SUB and mixed font sizes land off their place in SVG)."""
    table, chars = (_UNICODE_SUP, "⊤0123456789+-") if kind == "sup" else (_UNICODE_SUB, "0123456789aehijklmnoprstuvx,")
    if all(c in chars for c in text):
        return text.translate(table)
    return ("_" if kind == "sub" else "^") + text


def _wrap(text: str, kind: str, sub: str, sup: str) -> str:
    if kind == "":
        return text
    tag = sub if kind == "sub" else sup
    return f"<{tag}>{text}</{tag}>"


def math_of(expr: object) -> Math:
    """``expr`` (an expression text or number) rendered as math; an unparsable text is kept as it is."""
    text = " ".join(str(expr).split())
    try:
        tree = parse_expr(text).tree
    except Exception:
        return Math(((text, ""),), text)
    return Math(tuple(_merge(_node(tree))), text)


def _merge(segs: list[Seg]) -> list[Seg]:
    out: list[Seg] = []
    for t, k in segs:
        if out and out[-1][1] == k:
            out[-1] = (out[-1][0] + t, k)
        elif t:
            out.append((t, k))
    return out


_SUBBED = re.compile(r"^(?P<head>[A-Z])(?P<sub>[a-z0-9]{1,3})$|^(?P<h2>[a-z])(?P<s2>[0-9][a-z0-9]?)$|^(?P<h3>b)(?P<s3>[a-z]{1,3})$")


def _name(name: str) -> list[Seg]:
    if name in _GREEK:
        return [(_GREEK[name], "")]
    if "_" in name.strip("_") and not name.startswith("_"):
        head, _, sub = name.partition("_")
        if "_" in sub and len(head) > 1:  # a name of words (asa_target_subspaces): as written, not a word subscripted by a list
            return [(name, "")]
        return _name(head) + [(sub.replace("_", ","), "sub")]
    m = _SUBBED.match(name)
    if m:
        head = m.group("head") or m.group("h2") or m.group("h3")
        sub = m.group("sub") or m.group("s2") or m.group("s3")
        return [(head, ""), (sub, "sub")]
    return [(name, "")]


def _paren(segs: list[Seg]) -> list[Seg]:
    return [("(", "")] + segs + [(")", "")]


def _prec(node: ast.AST) -> float:
    """How tightly the written form binds: 1 sums, 1.5 Kronecker products, 2 products, 3 signs, 5 atoms."""
    if isinstance(node, ast.BinOp):
        return _PREC.get(type(node.op), 3)
    if isinstance(node, ast.UnaryOp):
        return 3
    if isinstance(node, ast.Call) and node.args:
        name = node.func.id  # type: ignore[attr-defined]
        if name in _TRANSPARENT or name in ("dropout", "flatten", "orient"):
            return _prec(node.args[0])
        if name == "linear":
            return 1 if len(node.args) > 2 else 2  # W·x + b, W·x
        if name == "matmul":
            return 2
        if name == "kron":
            return 1.5
        if name in _SPECIAL_PREC:
            return _SPECIAL_PREC[name]
    return 5


def _operand(node: ast.AST, above: float, right: bool = False) -> list[Seg]:
    p = _prec(node)
    segs = _node(node)
    return _paren(segs) if p < above or (right and p == above and p < 4) else segs


def _binop(node: ast.BinOp) -> list[Seg]:
    p = _PREC.get(type(node.op), 3)
    if isinstance(node.op, (ast.Mult, ast.MatMult)):  # a quotient inside a product keeps its parentheses: (α/r)·δ
        sides = [_paren(_node(s)) if isinstance(s, ast.BinOp) and isinstance(s.op, (ast.Div, ast.FloorDiv, ast.Mod)) else _operand(s, p, right=i == 1)
                 for i, s in enumerate((node.left, node.right))]
        return sides[0] + [("·", "")] + sides[1]
    if isinstance(node.op, ast.Pow):
        return _operand(node.left, 5) + [(_plain(_node(node.right)), "sup")]
    if isinstance(node.op, ast.Div) and _prec(node.left) >= 2 and _prec(node.right) >= 3:
        return _operand(node.left, 2) + [("/", "")] + _operand(node.right, 3)
    return _operand(node.left, p) + [(_SYM[type(node.op)], "")] + _operand(node.right, p, right=True)


def _plain(segs: list[Seg]) -> str:
    return "".join(t for t, _k in segs)


def _node(node: ast.AST) -> list[Seg]:
    if isinstance(node, ast.Name):
        return _name(node.id)
    if isinstance(node, ast.Constant):
        return [(str(node.value), "")]
    if isinstance(node, ast.UnaryOp):
        return [("−", "")] + _operand(node.operand, 3)
    if isinstance(node, ast.BinOp):
        return _binop(node)
    if isinstance(node, ast.Tuple):
        return _join([_node(e) for e in node.elts], ", ")
    if isinstance(node, ast.Call):
        return _call(node)
    return [(ast.unparse(node), "")]


def _join(parts: list[list[Seg]], sep: str) -> list[Seg]:
    out: list[Seg] = []
    for i, p in enumerate(parts):
        if i:
            out.append((sep, ""))
        out += p
    return out


def _product(factors: list[ast.AST]) -> list[Seg]:
    return _join([_operand(f, 2) for f in factors], "·")


def _call(node: ast.Call) -> list[Seg]:
    name = node.func.id  # type: ignore[attr-defined]
    args = node.args
    if name == "dropout" and args:
        return _node(args[0])
    if name in _TRANSPARENT and args:
        return _node(args[0])
    if name == "matmul" and len(args) == 2:
        return _product(list(args))
    if name == "t" and len(args) == 1:
        return _operand(args[0], 5) + [("⊤", "sup")]
    if name == "kron" and len(args) == 2:
        return _operand(args[0], 2) + [(" ⊗ ", "")] + _operand(args[1], 2)
    if name == "linear" and len(args) >= 2:  # the weight in parentheses where it is a sum or a Kronecker product
        return _product([args[1], args[0]]) + ([(" + ", "")] + _operand(args[2], 1) if len(args) > 2 else [])
    if name == "sqrt" and len(args) == 1:
        return [("√", "")] + _operand(args[0], 5)
    if name == "einsum" and args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
        return _einsum(args[0].value, list(args[1:]))
    if name == "narrow" and len(args) == 4:
        start, length = _node(args[2]), _node(args[3])
        end = length if _plain(start) == "0" else length + [(" + ", "")] + start
        return _operand(args[0], 5) + [("[…, ", "")] + start + [(" : ", "")] + end + [("]", "")]
    special = _SPECIAL.get(name)
    if special is not None and args:
        try:
            return special(list(args))
        except IndexError:
            pass
    head = _FUNCS.get(name, name.rstrip("_"))
    return [(head, "")] + _paren(_join([_node(a) for a in args], ", "))


def _atom(node: ast.AST) -> list[Seg]:
    return _operand(node, 5)


def _indexed(a: ast.AST, index: ast.AST) -> list[Seg]:
    return _atom(a) + [("[", "")] + _node(index) + [("]", "")]


def _lowered(node: ast.AST) -> str:
    return node.id.lower() if isinstance(node, ast.Name) else "u"


def _sub(text: str) -> Seg:
    return (text, "sub")


# Ops a paper writes in its own notation (each takes the call's positional arguments; keyword arguments are left out).
_SPECIAL: dict[str, Callable[[list[ast.AST]], list[Seg]]] = {
    "flatten": lambda a: _node(a[0]),
    "orient": lambda a: _node(a[0]),
    "cayley": lambda a: [("(I + ", "")] + _node(a[0]) + [(")(I − ", "")]
    + _operand(a[0], 1, right=True) + [(")", ""), ("-1", "sup")],
    "skew": lambda a: [("triu(", "")] + _node(a[0]) + [(") − triu(", "")] + _node(a[0]) + [(")", ""), ("⊤", "sup")],
    "index_select": lambda a: _indexed(a[0], a[2]),
    "take": lambda a: _indexed(a[0], a[1]),
    "index_copy": lambda a: _atom(a[0]) + [("[", "")] + _node(a[2]) + [(" ← ", "")] + _node(a[3]) + [("]", "")],
    "index_add": lambda a: _atom(a[0]) + [("[", "")] + _node(a[2]) + [(" += ", "")] + _node(a[3]) + [("]", "")],
    "scatter": lambda a: _atom(a[0]) + [("[", "")] + _node(a[2]) + [(" ← ", "")] + _node(a[3]) + [("]", "")],
    "zeros_like": lambda a: [("0", "")],
    "eye": lambda a: [("I", "")],
    "sum": lambda a: [("Σ ", "")] + _atom(a[0]),
    "abs": lambda a: [("|", "")] + _node(a[0]) + [("|", "")],
    "count": lambda a: [("|", "")] + _node(a[0]) + [("|", "")],
    "floor": lambda a: [("⌊", "")] + _node(a[0]) + [("⌋", "")],
    "ceil": lambda a: [("⌈", "")] + _node(a[0]) + [("⌉", "")],
    "scatter2d": lambda a: [("[", "")] + _node(a[0]) + [("]", ""), _sub(_plain(_node(a[1])))],
    "kron_sum": lambda a: [("Σ", ""), _sub("i"), (" ", "")] + _atom(a[0]) + [_sub("i"), (" ⊗ ", "")] + _atom(a[1]) + [_sub("i")],
    "kron_linear": lambda a: [("(", "")] + _atom(a[1]) + [(" ⊗ ", "")] + _atom(a[2]) + [(")·", "")] + _atom(a[0]),
    "lowrank_hadamard": lambda a: _paren(_product([a[0], a[1]])) + [(" ⊙ ", "")] + _paren(_product([a[2], a[3]])),
    "weight_norm": lambda a: _atom(a[1]) + [("·", "")] + _atom(a[0]) + [(" / ‖", "")] + _node(a[0]) + [("‖", "")],
    "row_norm": lambda a: [("‖", "")] + _node(a[0]) + [("‖", ""), _sub("row")],
    "col_norm": lambda a: [("‖", "")] + _node(a[0]) + [("‖", ""), _sub("col")],
    "blockdiag_matmul": lambda a: _atom(a[0]) + [("·blockdiag(", "")] + _node(a[1]) + [(")", "")],
    "butterfly": lambda a: [("∏", ""), _sub("i"), (" B", ""), _sub("i")] + _paren(_node(a[0])),
    "householder": lambda a: [("∏", ""), _sub("i"), (f" (I − 2·{_lowered(a[0])}", ""), _sub("i"),
                                (f"·{_lowered(a[0])}", ""), _sub("i"), ("⊤", "sup"), (")", "")],
    "block_circulant": lambda a: [("circ(", "")] + _node(a[1]) + [(")·", "")] + _atom(a[0]),
    "cat": lambda a: [("[", "")] + _join([_node(e) for e in getattr(a[0], "elts", [a[0]])], "; ") + [("]", "")],
    "topk": lambda a: [("top", ""), _sub(_plain(_node(a[1])))] + _paren(_node(a[0])),
    "topk_indices": lambda a: [("argtop", ""), _sub(_plain(_node(a[1])))] + _paren(_node(a[0])),
    "idwt2": lambda a: [("IDWT", "")] + _paren(_node(a[0])),
    "ifft2_real": lambda a: [("Re IDFT", "")] + _paren(_node(a[0])),
    "orthonormal_rows": lambda a: [("orth", "")] + _paren(_node(a[0])),
    "relaxed_bernoulli": lambda a: [("RelaxedBernoulli", "")] + _paren(_node(a[0])),
    "gaussian_sample": lambda a: _node(a[0]) + [(" + ε·exp(", "")] + _node(a[1]) + [("/2)", "")],
    "from_match": lambda a: [("𝟙[t ≥ t", ""), _sub(_plain(_node(a[1]))), ("]", "")],
    "svd_u": lambda a: [("U", ""), _sub(_plain(_node(a[1])))] + _paren(_node(a[0])),
    "svd_s": lambda a: [("s", ""), _sub(_plain(_node(a[1])))] + _paren(_node(a[0])),
    "svd_vh": lambda a: [("V", ""), _sub(_plain(_node(a[1]))), ("⊤", "sup")] + _paren(_node(a[0])),
    "quant_svd_a": lambda a: [("A", ""), _sub("T")] + _paren(_node(a[0])),
    "quant_svd_b": lambda a: [("B", ""), _sub("T")] + _paren(_node(a[0])),
    "quant_svd_base": lambda a: [("Q", ""), _sub("T")] + _paren(_node(a[0])),
    "factor_left": lambda a: [("m", "")] + _paren(_node(a[0])),
    "factor_right": lambda a: _operand(a[0], 2) + [("/m", "")] + _paren(_node(a[0])),
    "rms_norm": lambda a: [("RMSNorm", "")] + _paren(_node(a[0])) + ([("⊙", "")] + _atom(a[1]) if len(a) > 1 else []),
    "top_right_singular": lambda a: [("v", ""), _sub("1")] + _paren(_product([a[0], a[1]])),
    "distinct_above": lambda a: [("rank", "")] + _paren(_node(a[0])),
    "position_mask": lambda a: [("𝟙[t < ", "")] + _node(a[1]) + [(" ∨ t ≥ n − ", "")] + _node(a[2]) + [("]", "")],
}


def _einsum(subscripts: str, operands: list[ast.AST]) -> list[Seg]:
    """Einstein notation: a sum over the contracted indices of the product of the operands, each indexed."""
    spec = subscripts.replace(" ", "").replace("...", "")
    ins, _, out = spec.partition("->")
    terms = ins.split(",")
    if len(terms) != len(operands):
        return [("einsum", "")] + _paren(_join([_node(a) for a in operands], ", "))
    summed = sorted({c for tm in terms for c in tm} - set(out), key=lambda c: spec.index(c))
    segs: list[Seg] = [("Σ", ""), (",".join(summed), "sub"), (" ", "")] if summed else []
    factors = []
    for tm, op in zip(terms, operands):
        f = _operand(op, 5)
        if tm:
            f = f + [(tm, "sub")]
        factors.append(f)
    return segs + _join(factors, "·")


def tree_math(node: ast.AST) -> Math:
    """A checked expression's subtree rendered as math."""
    return Math(tuple(_merge(_node(node))), ast.unparse(node))


def einsum_math(subscripts: str, operands: list[ast.AST]) -> Math:
    """``einsum(subscripts, *operands)`` rendered as a sum of indexed products (as :func:`math_of` writes it)."""
    return Math(tuple(_merge(_einsum(subscripts, operands))), subscripts)
