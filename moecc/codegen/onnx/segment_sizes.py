"""A symbolic size written again as FX ops on the dims it is made of.

A size that crosses into a segment (``repeated_layers``) is read back inside it. Where it is no input's dim (a
chunked scan pads its length to ``Mod(64 - Mod(s, 64), 64)``), it is computed again from the dims its symbols
are, with Python's integer ops on SymInts, which ``torch.export`` traces. The expression comes from a SymInt
(a fresh capture) or from its text (a capture read back from the capture cache), so both are parsed from text,
with torch's size functions left unevaluated."""

from __future__ import annotations

import operator

import sympy
import torch
from torch import fx

_FUNCTIONS = {"Mod": operator.mod, "PythonMod": operator.mod, "FloorDiv": operator.floordiv,
              "Max": torch.sym_max, "Min": torch.sym_min}
_NAMES = {name: sympy.Function(name) for name in _FUNCTIONS}


class Unwritable(Exception):
    """The expression holds what this module does not write as ops."""


def parse(text: str) -> sympy.Expr:
    try:
        return sympy.sympify(text, locals=dict(_NAMES), evaluate=False)
    except (sympy.SympifyError, TypeError, SyntaxError) as exc:
        raise Unwritable(f"the size {text} does not parse") from exc


def symbols(expr: sympy.Expr) -> list[str]:
    return sorted(s.name for s in expr.free_symbols)


def emit(graph: fx.Graph, expr: sympy.Expr, dims: dict[str, fx.Node]):
    """``expr`` as nodes of ``graph`` (or an int), its symbols read from ``dims``."""
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return dims[expr.name]
    if expr.is_Add or expr.is_Mul:
        op = operator.add if expr.is_Add else operator.mul
        args = [emit(graph, a, dims) for a in expr.args]
        out = args[0]
        for arg in args[1:]:
            out = graph.call_function(op, (out, arg))
        return out
    if expr.is_Pow and expr.exp.is_Integer and int(expr.exp) > 0:
        base = emit(graph, expr.base, dims)
        out = base
        for _ in range(int(expr.exp) - 1):
            out = graph.call_function(operator.mul, (out, base))
        return out
    if isinstance(expr, (sympy.floor, sympy.ceiling)):  # a division printed as floor(a/k + b/k)
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        if den.is_number and not (den.is_Integer and int(den) > 0):
            raise Unwritable(f"a division by {den} in a size ({expr})")
        top = emit(graph, num if isinstance(expr, sympy.floor) else -num, dims)
        out = graph.call_function(operator.floordiv, (top, emit(graph, den, dims)))  # sizes: a positive divisor
        return out if isinstance(expr, sympy.floor) else graph.call_function(operator.neg, (out,))
    name = type(expr).__name__
    if name in _FUNCTIONS:
        return graph.call_function(_FUNCTIONS[name], tuple(emit(graph, a, dims) for a in expr.args))
    raise Unwritable(f"{name} in a size ({expr})")
