"""The expression language of technique descriptions.

A closed grammar: numbers, einsum subscripts (the one string literal), declared names, the arithmetic operators
``+ - * / // % ** @``, unary minus, tuples, and calls of *registered* ops with
positional and keyword arguments. Python's own parser reads the text; anything
outside that grammar (attribute access, subscripts, lambdas, comprehensions,
comparisons, strings ...) is rejected with its column. Nothing is ever passed
to ``eval``: :func:`evaluate` walks the checked tree, and the compiler traces
that walk once with :mod:`torch.fx` into generated code.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

from pefref.language.errors import PefrefError
from pefref.language.limits import current

__all__ = ["Expr", "ExprError", "parse_expr", "evaluate", "arith", "substitute", "BINOPS", "bad_call"]

BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.MatMult: operator.matmul,
}
_SUBSCRIPTS = re.compile(r"[A-Za-z.,\->]{1,64}")
"""The one kind of string literal: einsum subscripts such as '...e,eor->...o' (data, never executed)."""
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class ExprError(PefrefError, ValueError):
    """A grammar or bounds error at a 0-based column of the expression text."""

    def __init__(self, message: str, column: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.column = column


_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")


def _is_word(node: ast.AST) -> bool:
    """A short word literal (``'db2'``) given to an op: one of the op's declared choices for that argument
    (``choices`` in :mod:`pefref.ops`; validate checks it is one), never a name looked up or executed."""
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and _WORD.fullmatch(node.value) is not None


def _check(node: ast.AST) -> None:
    col = getattr(node, "col_offset", 0)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (bool, int, float)):
            return
        raise ExprError(f"only numbers, einsum subscripts (letters, ',', '->', '...', as an op's first argument) and words an op declares as choices (as its arguments) are allowed as literals, found {node.value!r}", col)
    if isinstance(node, ast.Name):
        return
    if isinstance(node, ast.BinOp):
        if type(node.op) not in BINOPS:
            raise ExprError(f"operator {type(node.op).__name__} is not allowed", col)
        _check(node.left)
        _check(node.right)
        return
    if isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise ExprError(f"operator {type(node.op).__name__} is not allowed", col)
        _check(node.operand)
        return
    if isinstance(node, (ast.Tuple, ast.List)):
        for e in node.elts:
            _check(e)
        return
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise ExprError("only calls of registered ops by name are allowed (no attribute access)", col)
        for i, a in enumerate(node.args):
            if isinstance(a, ast.Starred):
                raise ExprError("*args is not allowed", a.col_offset)
            if i == 0 and isinstance(a, ast.Constant) and isinstance(a.value, str) and _SUBSCRIPTS.fullmatch(a.value):
                continue  # einsum subscripts: data, never executed
            if _is_word(a):
                continue  # a name among an op's declared choices (checked against them at validate): data
            _check(a)
        for k in node.keywords:
            if k.arg is None:
                raise ExprError("**kwargs is not allowed", col)
            if not _is_word(k.value):
                _check(k.value)
        return
    if isinstance(node, ast.Attribute):
        raise ExprError("attribute access is not allowed", col)
    if isinstance(node, ast.Subscript):
        raise ExprError("subscripts are not allowed; use a registered op (e.g. narrow)", col)
    raise ExprError(f"{type(node).__name__} is not part of the expression grammar", col)


@dataclass(frozen=True)
class Expr:
    """A parsed, grammar-checked expression."""

    text: str
    tree: ast.expr

    @cached_property
    def names(self) -> frozenset[str]:
        """Variable names read (not op names)."""
        calls = {id(n.func) for n in ast.walk(self.tree) if isinstance(n, ast.Call)}
        return frozenset(n.id for n in ast.walk(self.tree) if isinstance(n, ast.Name) and id(n) not in calls)

    @cached_property
    def ops(self) -> frozenset[str]:
        """Names of the ops called."""
        return frozenset(n.func.id for n in ast.walk(self.tree) if isinstance(n, ast.Call))  # type: ignore[attr-defined]

    def name_columns(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in ast.walk(self.tree):
            if isinstance(n, ast.Name):
                out.setdefault(n.id, n.col_offset)
        return out

    def __str__(self) -> str:
        return self.text


def parse_expr(text: str | int | float) -> Expr:
    """Parse and check an expression; raises :class:`ExprError` with a column.

    Expressions are immutable, so a text is parsed once per process (injection
    reads the same few expressions for every unit). The text's length, the
    syntax tree's size and depth and the digits of integer literals are bounded
    (:mod:`pefref.language.limits`).
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ExprError(f"expected an expression, found {type(text).__name__}")
    if isinstance(text, float) and not math.isfinite(text):
        raise ExprError(f"expected a finite number, found {text!r}")
    if isinstance(text, int) and _too_big(text):
        raise ExprError(f"integer of about {int(text.bit_length() * 0.30103)} digits; at most {current().max_int_digits} are allowed")
    return _parse(type(text), text)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=8192)
def _parse(_kind: type, text: str | int | float) -> Expr:  # the type is part of the key: 1 and 1.0 hash alike
    src = str(text)
    lim = current()
    if len(src) > lim.max_expr_chars:
        raise ExprError(f"expression of {len(src)} characters; at most {lim.max_expr_chars} are allowed")
    bad = next((i for i, ch in enumerate(src) if ord(ch) < 32 and ch not in "\t\n\r"), None)
    if bad is not None:
        raise ExprError(f"control character {src[bad]!r} in an expression", bad)
    try:
        tree = ast.parse(src.strip(), mode="eval").body
    except SyntaxError as e:
        raise ExprError(f"syntax error: {e.msg}", max((e.offset or 1) - 1, 0)) from None
    except (RecursionError, MemoryError, ValueError):
        raise ExprError("expression too deeply nested or too large to parse") from None
    lead = len(src) - len(src.lstrip())
    _measure(tree, lead)
    _check_offset(tree, lead)
    return Expr(src, tree)


def _too_big(n: int) -> bool:
    """More decimal digits than the limit allows (read off the bit length: no conversion to text)."""
    return n.bit_length() * 0.30103 > current().max_int_digits


def _measure(tree: ast.expr, lead: int) -> None:
    """Bound the tree's node count and depth, and the digits of integer literals (iteratively: no recursion)."""
    lim = current()
    count = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        col = getattr(node, "col_offset", 0) + lead
        if count > lim.max_expr_nodes:
            raise ExprError(f"expression of more than {lim.max_expr_nodes} terms; simplify it", 0)
        if depth > lim.max_expr_depth:
            raise ExprError(f"expression nested more than {lim.max_expr_depth} deep", col)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool) and _too_big(node.value):
            raise ExprError(f"integer literal of more than {lim.max_int_digits} digits", col)
        stack.extend((c, depth + 1) for c in ast.iter_child_nodes(node))


def arith(op: type, a: Any, b: Any, column: int = 0) -> Any:
    """``a op b`` (a :data:`BINOPS` operator), with bounds where both sides are plain numbers.

    Integer powers are bounded in exponent and result size, integer results in
    digits, float results must be finite; division by zero is an
    :class:`ExprError` at ``column``. Tensors go to torch unchanged."""
    fn = BINOPS[op]
    if not (_number(a) and _number(b)):
        return fn(a, b)
    lim = current()
    if op is ast.Pow and isinstance(a, int) and isinstance(b, int) and (
        abs(b) > lim.max_exponent or (b > 0 and abs(a) > 1 and b * math.log10(abs(a)) > lim.max_int_digits)
    ):
        raise ExprError(f"{a} ** {b} is too large (exponents up to {lim.max_exponent}, results up to {lim.max_int_digits} digits)", column)
    try:
        out = fn(a, b)
    except ZeroDivisionError:
        raise ExprError("division by zero", column) from None
    except OverflowError:
        raise ExprError("number too large", column) from None
    if isinstance(out, complex):
        raise ExprError(f"{a!r} ** {b!r} is not a real number", column)
    if isinstance(out, int) and _too_big(out):
        raise ExprError(f"integer result of more than {lim.max_int_digits} digits", column)
    if isinstance(out, float) and not math.isfinite(out):
        raise ExprError(f"result {out!r} is not a finite number", column)
    return out


def substitute(text: str | int, names: Mapping[str, str | int]) -> str:
    """The expression ``text`` with each name of ``names`` replaced by that expression (on the syntax tree,
    so ``d_inner`` is untouched when ``d_in`` is replaced); the result is parenthesised as needed."""
    tree = parse_expr(text).tree
    repl = {k: parse_expr(v).tree for k, v in names.items()}

    class _Sub(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            return repl.get(node.id, node)

        def visit_Call(self, node: ast.Call) -> ast.AST:  # op names are not variables
            node.args = [self.visit(a) for a in node.args]
            node.keywords = [self.visit(k) for k in node.keywords]
            return node

    import copy

    return ast.unparse(_Sub().visit(copy.deepcopy(tree)))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_offset(tree: ast.expr, lead: int) -> None:
    try:
        _check(tree)
    except ExprError as e:
        raise ExprError(e.message, e.column + lead) from None


@functools.cache
def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without one: its own error stands
        return None


def bad_call(name: str, fn: Callable[..., Any], args: list[Any], kwargs: Mapping[str, Any]) -> str | None:
    """Why op ``name`` cannot take these arguments (too few, too many, an unknown keyword), or None when it can."""
    sig = _signature(fn)
    if sig is None:
        return None
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        return f"{name}: {e}"
    return None


def _integral(v: Any) -> Any:
    """An op's argument with whole floats as integers (``r / 2`` is a size where shape inference takes it as one)."""
    if type(v) is float and v.is_integer() and abs(v) < 2**53:
        return int(v)
    if type(v) is tuple:
        return tuple(_integral(e) for e in v)
    return v


def evaluate(expr: Expr | ast.expr, env: Mapping[str, Any], ops: Mapping[str, Callable[..., Any]]) -> Any:
    """Walk a checked expression with ``env`` for names and ``ops`` for calls."""
    node = expr.tree if isinstance(expr, Expr) else expr
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        try:
            return env[node.id]
        except KeyError:
            raise ExprError(f"unknown name {node.id!r}", node.col_offset) from None
    if isinstance(node, ast.BinOp):
        return arith(type(node.op), evaluate(node.left, env, ops), evaluate(node.right, env, ops), node.col_offset)
    if isinstance(node, ast.UnaryOp):
        return cast(Callable[[Any], Any], _UNARY[type(node.op)])(evaluate(node.operand, env, ops))
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(evaluate(e, env, ops) for e in node.elts)
    if isinstance(node, ast.Call):
        name = node.func.id  # type: ignore[attr-defined]
        fn = ops.get(name)
        if fn is None:
            raise ExprError(f"unknown op {name!r}", node.col_offset)
        args = [_integral(evaluate(a, env, ops)) for a in node.args]
        kwargs = cast(dict[str, Any], {k.arg: _integral(evaluate(k.value, env, ops)) for k in node.keywords})
        why = bad_call(name, fn, args, kwargs)
        if why is not None:
            raise ExprError(why, node.col_offset)
        return fn(*args, **kwargs)
    raise ExprError(f"{type(node).__name__} is not part of the expression grammar", getattr(node, "col_offset", 0))
