"""Arithmetic with a scalar constant that the ONNX optimizer would take for a no-op, rewritten so that it survives.

onnxscript's optimizer, which ``torch.onnx.export(optimize=True)`` runs, has rules for ``x + 0``, ``x - 0``,
``x * 1`` (either order) and ``x / 1``. They match a scalar constant within ``math.isclose(rel_tol=1e-5,
abs_tol=1e-8)`` of 0 or 1, and drop the op:

- an epsilon of 1e-12 under a square root is lost, and a row of zeros (a left-padded position) normalizes to NaN
  where torch gives zeros (Ergo's RMSNorm);
- one of 1e-8 changes rows of values near 1e-4 by percents (Muse Spark's post-expert norm);
- a factor of ``1 + 5e-6`` (``1 / sqrt(1 + 1e-5)``, a norm folded into a scale) becomes 1.

``keep_scalar_constants`` runs on the exported model before the optimizer. It writes each such op with operands
scaled by powers of two, so that no constant is near 0 or 1:

- ``x + c`` as ``(x * 2**40 + c * 2**40) * 2**-40``, and ``x - c`` alike;
- ``x * c`` as ``(x * 2c) * 0.5``;
- ``x / c`` as ``(x * 0.5) / (c * 0.5)``.

Scaling by a power of two commutes with rounding, so each form gives the op's own result to the bit, short of
overflow (|x| > 3e26 for the add in fp32). Working on the ONNX graph catches every origin of such an op: ATen ops,
Python's operators in inlined modules, norms that torch.onnx decomposes, and blocks left as written, which the
export traces itself. Half-precision ops are left alone: 2**40 overflows them, and their constants round to 0 or 1
anyway."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

# wider than the rules' own window, so that a release that widens it stays covered: each rewritten form is exact,
# so a constant taken in needlessly costs a cheap op or two, and no accuracy
NEAR_REL, NEAR_ABS = 1e-4, 1e-7
ADD_SCALE = 2.0 ** 40
_FLOATS = {ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64}

# op type -> (input positions a constant may hold, the value that makes the op a no-op)
NO_OP_WHEN = {"Add": ((1, 0), 0.0), "Sub": ((1,), 0.0), "Mul": ((1, 0), 1.0), "Div": ((1,), 1.0)}


def _scalar(value: ir.Value | None) -> tuple[float, np.dtype, tuple] | None:
    """(value, numpy dtype, shape) of a one-element fp32/fp64 constant, else None."""
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    if tensor is None or tensor.dtype not in _FLOATS:
        return None
    array = tensor.numpy()
    return (float(array.reshape(-1)[0]), _FLOATS[tensor.dtype], array.shape) if array.size == 1 else None


def _near(c: float, target: float) -> bool:
    return c != target and math.isclose(c, target, rel_tol=NEAR_REL, abs_tol=NEAR_ABS)


def _constant(value: float, dtype, shape) -> ir.Node:
    return ir.node("Constant", [], {"value": ir.tensor(np.full(shape, value, dtype=dtype))})


def _kept(op: str, x: ir.Value, c: float, dtype, shape) -> list[ir.Node]:
    """Nodes computing ``op(x, c)`` exactly, with no constant near 0 or 1; the last one's output is the result."""
    if op in ("Add", "Sub"):
        up, scaled_c, down = (_constant(v, dtype, shape) for v in (ADD_SCALE, c * ADD_SCALE, 1 / ADD_SCALE))
        wide = ir.node("Mul", [x, up.outputs[0]])
        shifted = ir.node(op, [wide.outputs[0], scaled_c.outputs[0]])
        return [up, scaled_c, down, wide, shifted, ir.node("Mul", [shifted.outputs[0], down.outputs[0]])]
    if op == "Mul":
        twice, half = _constant(2 * c, dtype, shape), _constant(0.5, dtype, shape)
        doubled = ir.node("Mul", [x, twice.outputs[0]])
        return [twice, half, doubled, ir.node("Mul", [doubled.outputs[0], half.outputs[0]])]
    half, half_c = _constant(0.5, dtype, shape), _constant(0.5 * c, dtype, shape)
    halved = ir.node("Mul", [x, half.outputs[0]])
    return [half, half_c, halved, ir.node("Div", [halved.outputs[0], half_c.outputs[0]])]


def keep_scalar_constants(model: ir.Model) -> int:
    """Rewrite, in place, every op of ``NO_OP_WHEN`` whose scalar constant the optimizer would drop; returns how
    many."""
    rewritten = 0
    for graph in (model.graph, *model.functions.values()):
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            if node.domain not in ("", "ai.onnx") or node.op_type not in NO_OP_WHEN or len(node.inputs) != 2:
                continue
            positions, no_op = NO_OP_WHEN[node.op_type]
            for i in positions:
                scalar = _scalar(node.inputs[i])
                if scalar is None or not _near(scalar[0], no_op):
                    continue
                new = _kept(node.op_type, node.inputs[1 - i], *scalar)
                ir.convenience.replace_nodes_and_values(node.graph, node, [node], new, node.outputs,
                                                        new[-1].outputs)
                rewritten += 1
                break
    return rewritten
