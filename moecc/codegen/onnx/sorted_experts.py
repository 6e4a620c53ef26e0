"""MoE blocks exported to ONNX as routed work in plain ops: the pairs sorted by expert, a MatMul per expert.

The form every float block takes on ONNX Runtime (``MOECC_ORT_MOE_OP=1`` takes ``com.microsoft.MoE`` where it
computes a block). Before it, a block the op could not run (an activation it lacks: gated gelu, squared relu, ...;
weights that may be negative) was decomposed into every expert on every token (``decompose.fused_moe``): ``E / k``
times the routed work. Here the (token, slot) pairs are sorted by expert, as the torch kernels sort them:

- the sort and the offsets of each expert's rows are static-shaped torch ops (a ``TopK`` over unique keys and a
  ``ScatterElements`` count), so ``torch.export`` traces them without data-dependent sizes;
- ``moecc::grouped_matmul`` takes the rows (or the tokens' indices), the offsets and one weight per expert.
  torch.export sees one op of a known output shape; its ONNX translation splits the indices by the experts' counts
  at run time (one ``Split``), each expert gathers its own tokens and runs one ``MatMul`` on its weight, held as an
  initializer of its own (a slice of a stacked initializer would be copied on every call);
- the activation runs once over all rows, in the ops torch.onnx translates it to, so every expert activation the
  torch program computes exports here as well.

On this project's CPU (RESULTS.md, session 46) it was 7-8x faster than the every-expert form on a model of 64
gelu experts, and 1.1x-2.5x faster than ``com.microsoft.MoE`` on Mixtral-, DeepSeek- and OLMoE-shaped layers at 1
to 512 tokens but in one cell of 21."""

from __future__ import annotations

import torch
from torch import Tensor, fx

from moecc.codegen.onnx.decompose import kept_pairs
from moecc.codegen.onnx.grouped_nbits import accuracy_level, grouped_matmul_nbits, matmul_nbits_computes_same
from moecc.codegen.onnx.ort_forms import canonical_experts, param_of
from moecc.codegen.onnx.quant import QuantSpec, nbits_block, pack_nbits
from moecc.experts import expert_activation
from moecc.match import MatchResult


@torch.library.custom_op("moecc::grouped_matmul", mutates_args=())
def grouped_matmul(x: Tensor, offsets: Tensor, weights: list[Tensor], rows: Tensor | None = None) -> Tensor:
    """x [T, K]; offsets [E + 1], where expert e's rows start (the last: where rows of no expert start); weights E
    tensors [K, M]. Row i of the input is ``x[rows[i]]``, or ``x[i]`` without ``rows`` [N]. -> [N, M]: each expert's
    rows times its weight, rows past ``offsets[E]`` zero."""
    xs = x if rows is None else x[rows]
    out = xs.new_zeros((xs.shape[0], weights[0].shape[1]))
    bounds = offsets.tolist()
    for e, w in enumerate(weights):
        if bounds[e + 1] > bounds[e]:
            out[bounds[e]:bounds[e + 1]] = xs[bounds[e]:bounds[e + 1]] @ w
    return out


@grouped_matmul.register_fake
def _grouped_matmul_fake(x, offsets, weights, rows=None):
    return x.new_empty(((x if rows is None else rows).shape[0], weights[0].shape[1]))


def split_by_expert(x, offsets, experts: int, rows=None):
    """In an ONNX translation: the rows of each of ``experts`` experts (one Split of the rows, or of their indices
    ``rows``, each expert then gathering its own rows of ``x``: no sorted copy), and a function of an output width
    giving the zeros of the rows of no expert."""
    from onnxscript import opset18 as op

    def ints(*values):
        return op.Constant(value_ints=list(values))

    starts = op.Slice(offsets, ints(0), ints(experts))
    ends = op.Slice(offsets, ints(1), ints(experts + 1))
    source = x if rows is None else rows
    rest = op.Sub(op.Shape(source, start=0, end=1), op.Slice(offsets, ints(experts), ints(experts + 1)))
    parts = op.Split(source, op.Concat(op.Sub(ends, starts), rest, axis=0), axis=0, num_outputs=experts + 1)
    # torch.onnx's builder counts a Split's outputs by this attribute; ONNX forbids it beside the sizes input
    parts[0].producer().attributes.pop("num_outputs", None)
    parts = list(parts[:experts])
    if rows is not None:
        parts = [op.Gather(x, part, axis=0) for part in parts]

    def zeros(width):
        return op.Expand(op.CastLike(op.Constant(value_float=0.0), x), op.Concat(rest, ints(width), axis=0))

    return parts, zeros


def grouped_matmul_onnx(x, offsets, weights, rows=None):
    """The translation torch.onnx uses for ``moecc::grouped_matmul``: ``split_by_expert``, a MatMul per expert,
    zeros for the rows of no expert."""
    from onnxscript import opset18 as op

    parts, zeros = split_by_expert(x, offsets, len(weights), rows)
    width = weights[0].shape[1]
    return op.Concat(*[op.MatMul(part, w) for part, w in zip(parts, weights)], zeros(width), axis=0)


def sorted_fused_moe(x, weights, ids, ups, downs, b_up, b_down, activation, gated, alpha, limit, capacity,
                     capacity_factor, capacity_min, group_size, priority, rounding="ceil", up_scales=None,
                     down_scales=None, bits=0, accuracy=0):
    """``moecc::fused_moe`` in export-friendly torch ops, routed: ``ups`` / ``downs`` are each expert's weights
    laid out [in, out], or with ``bits`` packed by ``pack_nbits`` (scales ``up_scales`` / ``down_scales``,
    MatMulNBits' ``accuracy``); ``b_up`` [E, 2I or I] and ``b_down`` [E, H] canonical or None."""
    t, k = ids.shape
    num_experts, pairs = len(ups), t * k
    keep = kept_pairs(ids, num_experts, capacity, capacity_factor, capacity_min, group_size, priority, rounding)
    flat = torch.where(keep, ids, num_experts).reshape(-1).long()  # keys and counts in int64, whatever the ids
    # unique keys: a TopK's order among equal keys is not a stable sort's
    order = torch.argsort(flat * pairs + torch.arange(pairs, device=x.device))
    counts = torch.zeros(num_experts + 1, dtype=flat.dtype, device=x.device).scatter_add(0, flat,
                                                                                       torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    sorted_ids = flat[order]
    expert_of_row = sorted_ids.clamp(max=num_experts - 1)
    tokens = torch.div(order, k, rounding_mode="floor")

    def project(rows_in, ws, scales, rows=None):
        if bits:  # MatMulNBits computes in float32 (the scales' dtype) on the CPU
            return grouped_matmul_nbits(rows_in.float(), offsets, ws, scales, bits, accuracy,
                                        rows).to(rows_in.dtype)
        return grouped_matmul(rows_in, offsets, [w if w.dtype == rows_in.dtype else w.to(rows_in.dtype)
                                                 for w in ws], rows)

    h = project(x, ups, up_scales, tokens)
    if b_up is not None:
        h = h + b_up.to(h.dtype)[expert_of_row]
    h = expert_activation(h, activation, gated, alpha, limit)
    y = project(h, downs, down_scales)
    if b_down is not None:
        y = y + b_down.to(y.dtype)[expert_of_row]
    # a row of no expert is finite (zeros, or a bias's activation): its weight of 0 makes it 0
    w = torch.where(sorted_ids < num_experts, weights.reshape(-1)[order].float(), 0.0)
    rows = y.float() * w.unsqueeze(1)
    pair = rows[torch.argsort(order)]  # back in (token, slot) order: a gather, where a scatter is slower
    return pair.view(t, k, x.shape[1]).sum(1).to(x.dtype)


_WEIGHTS = ("w_up", "w_down", "b_up", "b_down")


def sortable(gm: fx.GraphModule, m: dict) -> MatchResult[None]:
    """Whether ``sort_experts`` can rewrite the fused_moe call of ``op_arguments`` ``m``, or why not (weights
    computed in the graph, which no initializer holds). Changes nothing."""
    computed = [name for name in _WEIGHTS if m[name] is not None and param_of(gm, m[name]) is None]
    if computed:
        return MatchResult.fail(f"its expert weights ({', '.join(computed)}) are computed in the graph")
    return MatchResult.success(None)


def nbits_fit(spec: QuantSpec, w_up: Tensor, w_down: Tensor) -> MatchResult[None]:
    """Whether the installed ONNX Runtime's MatMulNBits runs experts of these weights ([E, N, K] each) quantized as
    ``spec``, or why not."""
    for w in (w_up, w_down):
        block = nbits_block(spec, int(w.shape[-1]))
        if not matmul_nbits_computes_same(spec.bits, block, accuracy_level(spec)):
            return MatchResult.fail(f"the installed onnxruntime's com.microsoft.MatMulNBits(int{spec.bits}, block "
                                    f"{block}) does not match on probe data")
    return MatchResult.success(None)


def sort_experts(gm: fx.GraphModule, moe: fx.Node, m: dict, quant: QuantSpec | None = None) -> MatchResult[str]:
    """Replace the fused_moe call ``moe`` (its ``op_arguments`` ``m``) with ``sorted_fused_moe``, each expert's
    weights registered as buffers of their own beside the block's, quantized as ``quant`` where it is given (the
    caller asks ``nbits_fit`` first); or why not (``sortable``)."""
    if not (found := sortable(gm, m)):
        return MatchResult.fail(found.reason)
    w_up, w_down, b_up, _ = canonical_experts(gm, m)
    # named after the bank's weight: two banks held by one module keep theirs apart
    prefix, _, base = m["w_up"].target.rpartition(".")
    module = gm.get_submodule(prefix)

    def read(name: str, value: Tensor) -> fx.Node:
        module.register_buffer(name, value.detach().contiguous())
        return gm.graph.get_attr(f"{prefix}.{name}" if prefix else name)

    x_val = m["x"].meta.get("val") if isinstance(m["x"], fx.Node) else None
    dtype = getattr(x_val, "dtype", None) or w_up.dtype
    ups, downs, up_scales, down_scales = [], [], [], []
    with gm.graph.inserting_before(moe):
        for e in range(int(w_up.shape[0])):
            if quant is None:
                ups.append(read(f"{base}_sorted_up_{e}", w_up[e].t().to(dtype)))
                downs.append(read(f"{base}_sorted_down_{e}", w_down[e].t().to(dtype)))
                continue
            for kind, w, packed, scales in (("up", w_up, ups, up_scales), ("down", w_down, downs, down_scales)):
                q, s = pack_nbits(w[e].detach(), quant)
                packed.append(read(f"{base}_sorted_{kind}_{e}_q", q))
                scales.append(read(f"{base}_sorted_{kind}_{e}_scales", s))
        bias_up = None if b_up is None else read(f"{base}_sorted_b_up", b_up)
        extra = {} if quant is None else dict(up_scales=up_scales, down_scales=down_scales, bits=quant.bits,
                                              accuracy=accuracy_level(quant))
        new = gm.graph.call_function(sorted_fused_moe, (
            m["x"], m["weights"], m["ids"], ups, downs, bias_up, m["b_down"], m["activation"], m["gated"],
            m["alpha"], m["limit"], m["capacity"], m["capacity_factor"], m["capacity_min"], m["group_size"],
            m["priority"], m["rounding"]), extra)
    new.meta.update(moe.meta)
    moe.replace_all_uses_with(new)
    gm.graph.erase_node(moe)
    return MatchResult.success(f"{int(w_up.shape[0])} experts")
