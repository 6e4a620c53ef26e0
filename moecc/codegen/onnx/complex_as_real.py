"""Complex-valued tensors of a program rewritten as real ones, for the ONNX export.

Some families compute their rotary embedding in complex numbers (DeepSeek-V2's and Llama 4's ``torch.polar`` and
``view_as_complex(x) * freqs_cis``). ONNX has no complex arithmetic, and torch.onnx translates only some ATen ops on
complex inputs: an ``unsqueeze`` of one fails the whole export, and ``backend='auto'`` then runs the torch program.

``complex_as_real`` holds each complex value ``z`` of shape ``S`` as the real tensor ``view_as_real(z)`` of shape
``S + [2]`` (real and imaginary parts last), as ``view_as_real`` lays it out, and writes each op on it in real
arithmetic: ``view_as_complex`` and ``view_as_real`` become nothing, a product of two complex values four real ones,
a dim ``d < 0`` becomes ``d - 1``. Every op that touches a complex value must have a rule here; where one has none
(or the program takes or returns a complex tensor) the graph is left as it was, and the exporter tries its own
translation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from moecc.match import MatchResult
from moecc.passes.graph_utils import attr_of

_aten = torch.ops.aten
_REAL_DTYPE = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}


def _value_dtype(node: fx.Node) -> torch.dtype | None:
    """The dtype of a node's value where its meta records one (a fake tensor, or a cached capture's ValueInfo)."""
    dtype = getattr(node.meta.get("val"), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _is_complex_val(node: fx.Node) -> bool:
    dtype = _value_dtype(node)
    return dtype is not None and dtype.is_complex


class _Rewriter:
    """One graph's rewrite: ``real[n]`` is the real form of each complex value ``n`` rewritten so far."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.real: dict[fx.Node, fx.Node] = {}

    # --- building blocks: ``None`` stands for an exact zero (the imaginary part of a real value) ---------------
    def call(self, op, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(op, args, kwargs)

    def part(self, z: fx.Node, i: int) -> fx.Node:
        return self.call(_aten.select.int, self.real[z], -1, i)

    def parts(self, arg) -> tuple:
        """(real part, imaginary part) of an operand: a complex value, a real tensor or a Python number."""
        if isinstance(arg, fx.Node):
            return (self.part(arg, 0), self.part(arg, 1)) if arg in self.real else (arg, None)
        if isinstance(arg, complex):
            return arg.real, arg.imag
        return arg, None

    def mul(self, a, b):
        if a is None or b is None:
            return None
        if not isinstance(a, fx.Node):
            a, b = b, a
        if not isinstance(a, fx.Node):
            return a * b
        return self.call(_aten.mul.Tensor, a, b)

    def add(self, a, b, sign: int = 1):
        if b is None:
            return a
        if a is None:
            return b if sign > 0 else self.neg(b)
        if not isinstance(a, fx.Node) and not isinstance(b, fx.Node):
            return a + sign * b
        if not isinstance(a, fx.Node):  # number + tensor
            return self.call(_aten.add.Tensor, b, a) if sign > 0 else self.call(_aten.rsub.Scalar, b, a)
        return self.call(_aten.add.Tensor if sign > 0 else _aten.sub.Tensor, a, b)

    def neg(self, a):
        if a is None:
            return None
        return -a if not isinstance(a, fx.Node) else self.call(_aten.neg.default, a)

    def stack(self, re, im) -> fx.Node:
        """The real form of ``re + i*im``, the two broadcast to one shape."""
        if im is None:
            im = self.call(_aten.zeros_like.default, re)
        elif not isinstance(re, fx.Node):
            re = self.call(_aten.add.Tensor, self.call(_aten.zeros_like.default, im), re)
        elif isinstance(im, fx.Node):  # ``complex(re, im)`` and sums of parts may broadcast one against the other
            re, im = (self.call(_aten.add.Tensor, re, self.call(_aten.zeros_like.default, im)),
                      self.call(_aten.add.Tensor, im, self.call(_aten.zeros_like.default, re)))
        else:
            im = self.call(_aten.add.Tensor, self.call(_aten.zeros_like.default, re), im)
        return self.call(_aten.stack.default, [re, im], -1)

    def stack_same_shape(self, re, im) -> fx.Node:
        """``stack`` for parts known to have one shape (each a product or sum over both operands' parts)."""
        return self.call(_aten.stack.default, [re, im], -1)


def _dim(d: int) -> int:
    return d - 1 if d < 0 else d


# Each rule takes the rewriter and the node, builds the node's value in real arithmetic before it, and returns
# (that value, whether it is the real form of a complex value). The node's complex arguments are already in
# ``rw.real``.
Rule = Callable[[_Rewriter, fx.Node], tuple[fx.Node, bool]]


def _args_with(rw: _Rewriter, node: fx.Node) -> tuple[list, dict]:
    args = [rw.real.get(a, a) if isinstance(a, fx.Node) else a for a in node.args]
    return args, dict(node.kwargs)


def _same_op(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    args, kwargs = _args_with(rw, node)
    return rw.graph.call_function(node.target, tuple(args), kwargs), True


def _dim_at(position: int, name: str = "dim", default: int | None = None) -> Rule:
    def rule(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
        args, kwargs = _args_with(rw, node)
        if len(args) > position:
            args[position] = _dim(args[position])
        elif name in kwargs:
            kwargs[name] = _dim(kwargs[name])
        elif default is not None:
            kwargs[name] = _dim(default)
        return rw.graph.call_function(node.target, tuple(args), kwargs), True
    return rule


def _dims_at(position: int) -> Rule:
    def rule(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
        args, kwargs = _args_with(rw, node)
        args[position] = [_dim(d) for d in args[position]]
        return rw.graph.call_function(node.target, tuple(args), kwargs), True
    return rule


def _flatten(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    args, kwargs = _args_with(rw, node)
    start = args[1] if len(args) > 1 else kwargs.pop("start_dim", 0)
    end = args[2] if len(args) > 2 else kwargs.pop("end_dim", -1)
    return rw.call(_aten.flatten.using_ints, args[0], _dim(start), _dim(end)), True


def _transpose(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    args, _ = _args_with(rw, node)
    return rw.call(_aten.transpose.int, args[0], _dim(args[1]), _dim(args[2])), True


def _permute(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    args, _ = _args_with(rw, node)
    dims = list(args[1])
    n = len(dims)
    return rw.call(_aten.permute.default, args[0], [d % n for d in dims] + [n]), True


def _sizes_at(position: int, extra: int) -> Rule:
    """An op whose size list gains the parts' dim: ``view``, ``reshape``, ``expand`` (2), ``repeat`` (1)."""
    def rule(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
        args, kwargs = _args_with(rw, node)
        args[position] = [*args[position], extra]
        return rw.graph.call_function(node.target, tuple(args), kwargs), True
    return rule


def _list_dim(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    """``cat`` and ``stack``: every tensor in the list in its real form, the dim moved."""
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    real = [rw.real[t] if t in rw.real else rw.stack(t, None) for t in tensors]
    return rw.call(node.target, real, _dim(dim)), True


def _dtype_cast(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    """``to`` and ``_to_copy``: a complex dtype is its parts' real dtype; a real value cast to complex gains a zero
    imaginary part, a complex one cast to real keeps its real part (as torch does)."""
    src = node.args[0]
    args, kwargs = _args_with(rw, node)
    position = 1 if node.target is _aten.to.dtype else None
    dtype = args[position] if position is not None and len(args) > 1 else kwargs.get("dtype")
    if dtype is not None and dtype.is_complex:
        if position is not None:
            args[position] = _REAL_DTYPE[dtype]
        else:
            kwargs["dtype"] = _REAL_DTYPE[dtype]
    if src not in rw.real:  # real -> complex
        return rw.stack(rw.graph.call_function(node.target, tuple(args), kwargs), None), True
    if dtype is None or dtype.is_complex:
        return rw.graph.call_function(node.target, tuple(args), kwargs), True
    args[0] = rw.part(src, 0)  # complex -> real
    return rw.graph.call_function(node.target, tuple(args), kwargs), False


def _mul(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    a, b = node.args[:2]
    for x, y in ((a, b), (b, a)):  # a complex value times a real tensor or number scales both parts alike
        if x in rw.real and not (isinstance(y, fx.Node) and y in rw.real) and not isinstance(y, complex):
            if isinstance(y, fx.Node):
                y = rw.call(_aten.unsqueeze.default, y, -1)
            return rw.call(_aten.mul.Tensor, rw.real[x], y), True
    (ar, ai), (br, bi) = rw.parts(a), rw.parts(b)
    re = rw.add(rw.mul(ar, br), rw.mul(ai, bi), -1)
    im = rw.add(rw.mul(ar, bi), rw.mul(ai, br))
    return rw.stack_same_shape(re, im) if ai is not None and bi is not None else rw.stack(re, im), True


def _div(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    a, b = node.args[:2]
    if a in rw.real and not (isinstance(b, fx.Node) and b in rw.real) and not isinstance(b, complex):
        if isinstance(b, fx.Node):
            b = rw.call(_aten.unsqueeze.default, b, -1)
        return rw.call(_aten.div.Tensor, rw.real[a], b), True
    # a / b = a * conj(b) / |b|^2
    (ar, ai), (br, bi) = rw.parts(a), rw.parts(b)
    norm = rw.add(rw.mul(br, br), rw.mul(bi, bi))
    re = rw.add(rw.mul(ar, br), rw.mul(ai, bi))
    im = rw.add(rw.mul(ai, br), rw.mul(ar, bi), -1)
    re, im = (rw.call(_aten.div.Tensor, re, norm) if isinstance(re, fx.Node) else re / norm,
              None if im is None else rw.call(_aten.div.Tensor, im, norm))
    return rw.stack(re, im), True


def _add_sub(sign: int) -> Rule:
    def rule(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
        a, b = node.args[:2]
        alpha = node.kwargs.get("alpha", 1)
        if isinstance(b, fx.Node) and isinstance(a, fx.Node):  # tensors: broadcast in the real form
            real_a = rw.real[a] if a in rw.real else rw.stack(a, None)
            real_b = rw.real[b] if b in rw.real else rw.stack(b, None)
            kwargs = {"alpha": alpha} if alpha != 1 else {}
            return rw.graph.call_function(_aten.add.Tensor if sign > 0 else _aten.sub.Tensor, (real_a, real_b),
                                          kwargs), True
        (ar, ai), (br, bi) = rw.parts(a), rw.parts(b)
        br, bi = rw.mul(br, alpha), rw.mul(bi, alpha)
        return rw.stack(rw.add(ar, br, sign), rw.add(ai, bi, sign)), True
    return rule


def _polar(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    magnitude, angle = node.args[:2]
    re = rw.call(_aten.mul.Tensor, magnitude, rw.call(_aten.cos.default, angle))
    im = rw.call(_aten.mul.Tensor, magnitude, rw.call(_aten.sin.default, angle))
    return rw.stack_same_shape(re, im), True


def _complex(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    return rw.stack(*node.args[:2]), True


def _view_as_complex(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    return node.args[0], True


def _view_as_real(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    return rw.real[node.args[0]], False


def _part_of(i: int) -> Rule:
    def rule(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
        return rw.part(node.args[0], i), False
    return rule


def _conj(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    z = node.args[0]
    return rw.stack_same_shape(rw.part(z, 0), rw.neg(rw.part(z, 1))), True


def _abs(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    z = rw.real[node.args[0]]
    return rw.call(_aten.sqrt.default, rw.call(_aten.sum.dim_IntList, rw.call(_aten.mul.Tensor, z, z), [-1])), False


def _angle(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    z = node.args[0]
    return rw.call(_aten.atan2.default, rw.part(z, 1), rw.part(z, 0)), False


def _exp(rw: _Rewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    z = node.args[0]
    magnitude, angle = rw.call(_aten.exp.default, rw.part(z, 0)), rw.part(z, 1)
    re = rw.call(_aten.mul.Tensor, magnitude, rw.call(_aten.cos.default, angle))
    im = rw.call(_aten.mul.Tensor, magnitude, rw.call(_aten.sin.default, angle))
    return rw.stack_same_shape(re, im), True


RULES: dict = {
    **{op: _same_op for op in (_aten.clone.default, _aten.contiguous.default, _aten.alias.default,
                               _aten.detach.default, _aten.lift_fresh_copy.default, _aten.index.Tensor,
                               _aten.resolve_conj.default, _aten.resolve_neg.default, _aten.neg.default)},
    _aten.unsqueeze.default: _dim_at(1),
    _aten.squeeze.dim: _dim_at(1),
    _aten.squeeze.dims: _dims_at(1),
    _aten.select.int: _dim_at(1),
    _aten.slice.Tensor: _dim_at(1, default=0),
    _aten.narrow.default: _dim_at(1),
    _aten.index_select.default: _dim_at(1),
    _aten.sum.dim_IntList: _dims_at(1),
    _aten.mean.dim: _dims_at(1),
    _aten.flatten.using_ints: _flatten,
    _aten.transpose.int: _transpose,
    _aten.permute.default: _permute,
    _aten.view.default: _sizes_at(1, 2),
    _aten.reshape.default: _sizes_at(1, 2),
    _aten._unsafe_view.default: _sizes_at(1, 2),
    _aten.expand.default: _sizes_at(1, 2),
    _aten.repeat.default: _sizes_at(1, 1),
    _aten.cat.default: _list_dim,
    _aten.stack.default: _list_dim,
    _aten.to.dtype: _dtype_cast,
    _aten.to.dtype_layout: _dtype_cast,
    _aten._to_copy.default: _dtype_cast,
    _aten.mul.Tensor: _mul,
    _aten.div.Tensor: _div,
    _aten.add.Tensor: _add_sub(1),
    _aten.sub.Tensor: _add_sub(-1),
    _aten.polar.default: _polar,
    _aten.complex.default: _complex,
    _aten.view_as_complex.default: _view_as_complex,
    _aten.view_as_real.default: _view_as_real,
    _aten.real.default: _part_of(0),
    _aten.imag.default: _part_of(1),
    _aten.conj.default: _conj,
    _aten._conj.default: _conj,
    _aten.conj_physical.default: _conj,
    _aten.abs.default: _abs,
    _aten.angle.default: _angle,
    _aten.exp.default: _exp,
}
_ASSERTS = (_aten._assert_tensor_metadata.default,)
_CASTS = (_aten.to.dtype, _aten.to.dtype_layout, _aten._to_copy.default)
_REAL_RESULT = (_aten.view_as_real.default, _aten.real.default, _aten.imag.default, _aten.abs.default,
                _aten.angle.default)
_COMPLEX_RESULT = (_aten.polar.default, _aten.complex.default, _aten.view_as_complex.default)


def _result_is_complex(node: fx.Node, complex_values: set[fx.Node]) -> bool:
    if node.target in _ASSERTS:
        return False
    if (dtype := _value_dtype(node)) is not None:  # else (a node a pass made) inferred from the op
        return dtype.is_complex
    if node.target in _REAL_RESULT:
        return False
    if node.target in _COMPLEX_RESULT or any(isinstance(a, complex) for a in node.args):
        return True
    if node.target in _CASTS:
        dtype = node.args[1] if node.target is _aten.to.dtype and len(node.args) > 1 else node.kwargs.get("dtype")
        if isinstance(dtype, torch.dtype):
            return dtype.is_complex
    return bool(set(node.all_input_nodes) & complex_values)


def complex_nodes(gm: fx.GraphModule) -> MatchResult[list[fx.Node]]:
    """The nodes that take or make a complex value, in graph order, if each has a rule; else why not."""
    complex_values: set[fx.Node] = set()
    ordered = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = attr_of(gm, node)
            if isinstance(value, torch.Tensor) and value.dtype.is_complex:
                complex_values.add(node)
                ordered.append(node)
            continue
        makes = node.op == "call_function" and _result_is_complex(node, complex_values)
        if not makes and not set(node.all_input_nodes) & complex_values and not _is_complex_val(node):
            continue
        if node.op == "placeholder":
            return MatchResult.fail(f"the program takes a complex tensor ({node.name})")
        if node.op == "output":
            return MatchResult.fail("the program returns a complex tensor")
        if node.op != "call_function" or (node.target not in RULES and node.target not in _ASSERTS):
            return MatchResult.fail(f"no real form of {node.target} on complex values (node {node.name})")
        ordered.append(node)
        if makes:
            complex_values.add(node)
    return MatchResult.success(ordered)


def complex_as_real(gm: fx.GraphModule) -> MatchResult[int]:
    """Rewrite every complex value of ``gm`` as its real form (see the module's doc): the number of ops rewritten,
    or why the graph was left as it was (it is then left whole, even where a rule fails part way)."""
    found = complex_nodes(gm)
    if not found:
        return MatchResult.fail(found.reason)
    nodes = found.value
    if not nodes:
        return MatchResult.success(0)
    before = set(gm.graph.nodes)
    buffers: list[str] = []
    rw = _Rewriter(gm)
    replaced: list[tuple[fx.Node, fx.Node]] = []
    try:
        for node in nodes:
            if node.op == "get_attr":
                name = f"{node.target.replace('.', '_')}_as_real"
                gm.register_buffer(name, torch.view_as_real(attr_of(gm, node)).clone(), persistent=False)
                buffers.append(name)
                with gm.graph.inserting_after(node):
                    rw.real[node] = gm.graph.get_attr(name)
                continue
            if node.target in _ASSERTS:
                continue
            with gm.graph.inserting_before(node):
                value, is_complex = RULES[node.target](rw, node)
            if is_complex:
                rw.real[node] = value
            else:
                replaced.append((node, value))
    except Exception as exc:  # noqa: BLE001 - a rule that cannot take this node's arguments: leave the graph whole
        failed = node.format_node()
        for new in reversed([n for n in gm.graph.nodes if n not in before]):
            gm.graph.erase_node(new)
        for name in buffers:
            delattr(gm, name)
        return MatchResult.fail(f"no real form of {failed}: {type(exc).__name__}: {exc}")
    for node, value in replaced:
        node.replace_all_uses_with(value)
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return MatchResult.success(len(nodes))
