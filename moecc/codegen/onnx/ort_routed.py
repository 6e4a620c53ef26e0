"""``com.microsoft.MoE`` for a block whose routing it cannot compute itself, handed the block's own routing.

The op routes by a softmax over the logits it is given, a top-k and a renormalisation. A block routed otherwise
(sigmoid scores, a selection bias, group-limited top-k, a capacity, per-expert scales) has its weights ``w`` and
expert ids computed by moecc's routing, as graph ops. Given ``log(w)`` for each token's chosen experts and a very
low logit for the others, the op chooses those experts and weighs them ``w / sum(w)``. Its output times ``sum(w)``
is then ``sum(w * expert(x))``, the block's output: the combine is linear.

With quantized experts, ``com.microsoft.QMoE`` takes the mixing weights as an input of their own
(``router_weights``): the logits then only choose the experts, and no sum is scaled back.

Both hold for weights that are not negative (a negative one has no logarithm; QMoE mixes by negative weights
otherwise than it is handed them), which ``use_given_routing`` proves of the graph before it takes either form.
Slots of no expert (ids out of the bank, pairs past a capacity) get no logit; a token left with none at all gets
zeros, so that the op's softmax stays finite, and its sum of 0 then gives the block's zero row. Without this form
such a block was decomposed: every expert on every token, ``E / k`` times the work (a DeepSeek-V3-shaped layer on
the CPU was 5x slower than Hugging Face's eager loop)."""

from __future__ import annotations

import functools
import logging
import operator

import torch
from torch import Tensor, fx

from moecc.codegen.onnx.decompose import kept_pairs
from moecc.codegen.onnx.ort_forms import canonical_experts, held_buffers, ort_experts_form, ort_fc1, param_of
from moecc.codegen.onnx.ort_moe import (
    _in_fp32,
    _moe_attrs,
    _qmoe_attrs,
    _rel_error,
    _run_one_node,
    contrib_schema,
    dequantized_experts,
    expert_ffn,
    experts_by_ids,
    experts_by_logits,
)
from moecc.codegen.onnx.quant import cannot_quantize, quantize
from moecc.match import MatchResult
from moecc.passes.graph_utils import op_arguments

log = logging.getLogger("moecc.codegen.onnx")

UNCHOSEN_LOGIT = -1.0e4  # exp() of it is 0 in fp32, next to any log of a weight (-104 for the smallest)


def routing_as_logits(weights: Tensor, ids: Tensor, num_experts: int, capacity: int, capacity_factor: float,
                      capacity_min: int, group_size, priority: str, rounding: str) -> tuple[Tensor, Tensor]:
    """(logits [T, E] that make the op choose and weigh each token's experts as ``weights`` does, the sum of each
    token's weights [T, 1]), in fp32; plain torch, which the export translates."""
    dense = _dense_weights(weights, ids, num_experts, capacity, capacity_factor, capacity_min, group_size, priority,
                           rounding)
    return _choice_logits(dense), dense.sum(-1, keepdim=True)


def _choice_logits(dense: Tensor) -> Tensor:
    """The log of each positive weight of ``dense`` [T, E], ``UNCHOSEN_LOGIT`` elsewhere; zeros in a row of none,
    whose softmax must stay finite."""
    chosen = dense > 0
    logits = torch.where(chosen, torch.log(torch.where(chosen, dense, 1.0)), UNCHOSEN_LOGIT)
    return torch.where(chosen.any(-1, keepdim=True), logits, 0.0)


def _dense_weights(weights: Tensor, ids: Tensor, num_experts: int, capacity: int, capacity_factor: float,
                   capacity_min: int, group_size, priority: str, rounding: str) -> Tensor:
    """Each token's weight of each expert [T, E] in fp32: zero for experts it does not choose, for slots of no
    expert and for pairs past a capacity; an expert repeated in a token's slots adds up, as the combine adds its
    outputs."""
    keep = kept_pairs(ids, num_experts, capacity, capacity_factor, capacity_min, group_size, priority, rounding)
    slot = torch.where(keep, ids, num_experts)
    dense = torch.zeros(ids.shape[0], num_experts + 1, dtype=torch.float32, device=weights.device)
    return dense.scatter_add(1, slot, torch.where(keep, weights.float(), 0.0))[:, :num_experts]


@torch.library.custom_op("moecc::ort_moe_given_logits", mutates_args=())
def ort_moe_given_logits(x: Tensor, logits: Tensor, fc1_w: Tensor, fc1_b: Tensor | None, fc2_w: Tensor,
                         fc2_b: Tensor | None, k: int, activation_type: str, alpha: float, beta: float,
                         limit: float) -> Tensor:
    """``com.microsoft.MoE`` with renormalised routing on the ``logits`` [T, E] it is handed (``ort_moe``'s
    semantics past its router matmul). Weights, and the output, are fp32: ``weighted_by_total`` scales it before
    the one cast back to ``x``'s dtype, as the combine of ``fused_moe`` sums in fp32."""
    return experts_by_logits(x.float(), logits, fc1_w, fc1_b, fc2_w, fc2_b, k, activation_type, True, alpha, beta,
                             limit)


@ort_moe_given_logits.register_fake
def _ort_moe_given_logits_fake(x, *args):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def ort_moe_given_logits_onnx(x, logits, fc1_w, fc1_b, fc2_w, fc2_b, k, activation_type, alpha, beta, limit):
    """The translation torch.onnx uses for ``moecc::ort_moe_given_logits``."""
    import onnxscript
    from onnxscript import opset18 as op

    moe_op = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MoE", contrib_schema("MoE"))
    inputs = [_in_fp32(op, x, fc1_w), logits, fc1_w, fc1_b, fc2_w, fc2_b]
    while inputs[-1] is None:
        inputs.pop()
    return moe_op(*inputs, **_moe_attrs(k, activation_type, True, alpha, beta, limit))


def weighted_by_total(y: Tensor, total: Tensor | None, like: Tensor) -> Tensor:
    """The op's fp32 output ``y`` times each token's sum of weights (None: mixed already), in the dtype of ``like``
    (the block's input)."""
    return (y if total is None else y * total).to(like.dtype)


def _probe_routing(g: torch.Generator, t: int, k: int, e: int) -> tuple[Tensor, Tensor]:
    """Expert ids [t, k] of ``e`` experts with slots of no expert (id ``e``) and a token of none, and positive
    weights that do not sum to 1: what a probe of a given routing feeds its op."""
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[: t // 4, -1] = e
    ids[0] = e
    return ids, torch.sigmoid(torch.randn(t, k, generator=g) * 3) * 2.5


@functools.lru_cache(maxsize=None)
def ort_takes_weights_as_logits(activation_type: str, k: int, has_bias: bool, alpha: float, beta: float,
                                limit: float, num_experts: int, provider: str = "CPUExecutionProvider") -> bool:
    """Run one com.microsoft.MoE node on ``routing_as_logits`` of random weights (sigmoid-sized, some pairs of no
    expert, a token of none) and compare its output times the weights' sum with the weighted experts."""
    g = torch.Generator().manual_seed(11)
    t, h, inter, e = 48, 16, 8, max(num_experts, k + 1)
    fusion = 2 if activation_type == "swiglu" else 1
    x = torch.randn(t, h, generator=g)
    fc1 = torch.randn(e, fusion * inter, h, generator=g) * 0.3
    fc2 = torch.randn(e, h, inter, generator=g) * 0.3
    b1 = torch.randn(e, fusion * inter, generator=g) if has_bias else None
    b2 = torch.randn(e, h, generator=g) if has_bias else None
    ids, weights = _probe_routing(g, t, k, e)
    logits, total = routing_as_logits(weights, ids, e, -1, 0.0, 0, 0, "token", "ceil")
    ref = torch.zeros(t, h)
    for expert in range(e):
        tok, slot = torch.where(ids == expert)
        y = expert_ffn(x[tok], expert, fc1, b1, fc2, b2, activation_type, alpha, beta, limit)
        ref.index_add_(0, tok, y * weights[tok, slot, None])
    names = ["x", "logits", "fc1", "b1" if has_bias else "", "fc2", "b2" if has_bias else ""]
    y = _run_one_node("MoE", names, _moe_attrs(k, activation_type, True, alpha, beta, limit),
                      {"fc1": fc1, "fc2": fc2, "b1": b1, "b2": b2}, {"x": x, "logits": logits}, provider)
    if isinstance(y, Exception):
        log.info("com.microsoft.MoE(%s) not usable on %s: %s", activation_type, provider, y)
        return False
    got = torch.from_numpy(y) * total
    err = _rel_error(got.numpy(), ref)
    same = err < 1e-5 and bool(got[0].abs().max() == 0)
    log.info("com.microsoft.MoE(%s, k=%d, bias=%s) on %s given weights as logits: relative error %.1e -> %s",
             activation_type, k, has_bias, provider, err, "used" if same else "decomposed")
    return same


def routing_as_mixing(weights: Tensor, ids: Tensor, num_experts: int, capacity: int, capacity_factor: float,
                      capacity_min: int, group_size, priority: str, rounding: str) -> tuple[Tensor, Tensor]:
    """(logits [T, E] that make the op choose each token's experts, their weights [T, E]) in fp32, for
    com.microsoft.QMoE, which mixes by weights it is handed (``router_weights``): no renormalisation to undo. It
    mixes by negative weights otherwise than it is handed them (seen on ONNX Runtime 1.32, CPU): weights must not
    be negative here either."""
    dense = _dense_weights(weights, ids, num_experts, capacity, capacity_factor, capacity_min, group_size, priority,
                           rounding)
    return _choice_logits(dense), dense


@torch.library.custom_op("moecc::ort_qmoe_given_routing", mutates_args=())
def ort_qmoe_given_routing(x: Tensor, logits: Tensor, mixing: Tensor, fc1_q: Tensor, fc1_scales: Tensor,
                           fc1_b: Tensor | None, fc2_q: Tensor, fc2_scales: Tensor, fc2_b: Tensor | None, k: int,
                           activation_type: str, alpha: float, beta: float, limit: float, bits: int, block_size: int,
                           int8_activations: bool) -> Tensor:
    """``com.microsoft.QMoE`` choosing the top-k of ``logits`` [T, E] and mixing them by ``mixing`` [T, E]; the
    experts dequantized (ORT also rounds int8 activations, which this does not model); fp32 out."""
    fc1, fc2 = dequantized_experts(fc1_q, fc1_scales, fc2_q, fc2_scales, x.shape[-1], activation_type, bits,
                                   block_size, int8_activations)
    ids = torch.topk(logits.float(), k, dim=-1)[1]
    return experts_by_ids(x.float(), ids, mixing.float().gather(1, ids), fc1, fc1_b, fc2, fc2_b, activation_type,
                          alpha, beta, limit)


@ort_qmoe_given_routing.register_fake
def _ort_qmoe_given_routing_fake(x, *args):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def ort_qmoe_given_routing_onnx(x, logits, mixing, fc1_q, fc1_scales, fc1_b, fc2_q, fc2_scales, fc2_b, k,
                                activation_type, alpha, beta, limit, bits, block_size, int8_activations):
    """The translation torch.onnx uses for ``moecc::ort_qmoe_given_routing``."""
    import onnxscript
    from onnxscript import opset18 as op

    qmoe = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "QMoE", contrib_schema("QMoE"))
    inputs = [_in_fp32(op, x, mixing), logits, fc1_q, fc1_scales, fc1_b, fc2_q, fc2_scales, fc2_b,
              *[None] * 6, mixing]
    return qmoe(*inputs, **_qmoe_attrs(k, activation_type, False, alpha, beta, limit, bits, block_size,
                                       int8_activations))


@functools.lru_cache(maxsize=None)
def ort_qmoe_takes_given_routing(activation_type: str, k: int, has_bias: bool, alpha: float, beta: float,
                                 limit: float, bits: int, block_size: int, int8_activations: bool, num_experts: int,
                                 provider: str = "CPUExecutionProvider") -> bool:
    """Run one com.microsoft.QMoE node on ``routing_as_mixing`` of random weights (sigmoid-sized, some pairs of no
    expert, a token of none) and compare it with ``ort_qmoe_given_routing``'s dequantized reference."""
    from moecc.codegen.onnx.quant import QuantSpec, quantize

    spec = QuantSpec(bits, block_size, int8_activations)
    g = torch.Generator().manual_seed(13)
    t, h, inter, e = 48, 64, 32, max(num_experts, k + 1)
    fusion = 2 if activation_type == "swiglu" else 1
    x = torch.randn(t, h, generator=g)
    fc1_q, fc1_s = quantize(torch.randn(e, fusion * inter, h, generator=g) * 0.2, spec)
    fc2_q, fc2_s = quantize(torch.randn(e, h, inter, generator=g) * 0.2, spec)
    b1 = torch.randn(e, fusion * inter, generator=g) if has_bias else None
    b2 = torch.randn(e, h, generator=g) if has_bias else None
    ids, weights = _probe_routing(g, t, k, e)
    logits, mixing = routing_as_mixing(weights, ids, e, -1, 0.0, 0, 0, "token", "ceil")
    ref = ort_qmoe_given_routing(x, logits, mixing, fc1_q, fc1_s, b1, fc2_q, fc2_s, b2, k, activation_type, alpha,
                                 beta, limit, bits, block_size, int8_activations)
    names = ["x", "logits", "fc1", "s1", "b1" if has_bias else "", "fc2", "s2", "b2" if has_bias else "",
             *[""] * 6, "rw"]
    y = _run_one_node("QMoE", names, _qmoe_attrs(k, activation_type, False, alpha, beta, limit, bits, block_size,
                                                 int8_activations),
                      {"fc1": fc1_q, "fc2": fc2_q, "s1": fc1_s, "s2": fc2_s, "b1": b1, "b2": b2},
                      {"x": x, "logits": logits, "rw": mixing}, provider)
    if isinstance(y, Exception):
        log.info("com.microsoft.QMoE(int%d) not usable on %s: %s", bits, provider, y)
        return False
    err = _rel_error(y, ref)
    same = err < (3e-2 if int8_activations else 1e-4) and bool(abs(y[0]).max() == 0)
    log.info("com.microsoft.QMoE(%s, int%d, block %d) on %s handed the routing: relative error %.1e -> %s",
             activation_type, bits, block_size, provider, err, "used" if same else "float op")
    return same


def use_given_routing(gm: fx.GraphModule, moe: fx.Node, m: dict, prefix: str, quant=None,
                      float_ok: bool = True) -> MatchResult[tuple[str, str]]:
    """Swap ``moe`` for com.microsoft.QMoE handed its routing (``quant``, a QuantSpec, where it quantizes these
    experts and computes them on probe data), else (where ``quant`` is None or ``float_ok``) for
    moecc::ort_moe_given_logits, the routing kept as graph ops: (the op, why the experts stay float where ``quant``
    asked otherwise, else ""), or why neither."""
    given = given_routing_form(gm, m)
    if not given:
        return MatchResult.fail(given.reason)
    f, (w_up, w_down, b_up, b_down), top_k = given.value
    num_experts = int(w_up.shape[0])
    has_bias = b_up is not None or b_down is not None
    capacity = [m[a] for a in ("capacity", "capacity_factor", "capacity_min", "group_size", "priority", "rounding")]
    float_why = ""
    if quant is not None:
        float_why = cannot_quantize(quant, w_up, w_down) or (
            "" if ort_qmoe_takes_given_routing(f.activation_type, top_k, has_bias, f.alpha, f.beta, f.limit,
                                               quant.bits, quant.block_size, quant.int8_activations, num_experts)
            else f"com.microsoft.QMoE({f.activation_type}) handed the routing does not match on probe data")
        if not float_why:
            fc1, fc1_b = ort_fc1(w_up, b_up, f.activation_type)
            fc1_q, fc1_s = quantize(fc1.detach(), quant)
            fc2_q, fc2_s = quantize(w_down.detach(), quant)
            names = held_buffers(gm, moe, prefix, [("ort_fc1_q", fc1_q), ("ort_fc1_s", fc1_s), ("ort_fc1_b", fc1_b),
                                                   ("ort_fc2_q", fc2_q), ("ort_fc2_s", fc2_s), ("ort_fc2_b", b_down)])
            with gm.graph.inserting_before(moe):
                route = gm.graph.call_function(routing_as_mixing, (m["weights"], m["ids"], num_experts, *capacity))
                y = gm.graph.call_function(torch.ops.moecc.ort_qmoe_given_routing.default, (
                    m["x"], gm.graph.call_function(operator.getitem, (route, 0)),
                    gm.graph.call_function(operator.getitem, (route, 1)), names["ort_fc1_q"], names["ort_fc1_s"],
                    names["ort_fc1_b"], names["ort_fc2_q"], names["ort_fc2_s"], names["ort_fc2_b"], top_k,
                    f.activation_type, f.alpha, f.beta, f.limit, quant.bits, quant.block_size,
                    quant.int8_activations))
                new = gm.graph.call_function(weighted_by_total, (y, None, m["x"]))
            moe.replace_all_uses_with(new)
            gm.graph.erase_node(moe)
            return MatchResult.success(("com.microsoft.QMoE", ""))
        if not float_ok:
            return MatchResult.fail(float_why)
    if not (logits := _logits_probe(f, top_k, has_bias, num_experts)):
        return MatchResult.fail(logits.reason)
    fc1, fc1_b = ort_fc1(w_up, b_up, f.activation_type)
    names = held_buffers(gm, moe, prefix, [("ort_fc1", fc1), ("ort_fc1_b", fc1_b), ("ort_fc2", w_down),
                                           ("ort_fc2_b", b_down)])
    with gm.graph.inserting_before(moe):
        route = gm.graph.call_function(routing_as_logits, (m["weights"], m["ids"], num_experts, *capacity))
        logits = gm.graph.call_function(operator.getitem, (route, 0))
        total = gm.graph.call_function(operator.getitem, (route, 1))
        y = gm.graph.call_function(torch.ops.moecc.ort_moe_given_logits.default, (
            m["x"], logits, names["ort_fc1"], names["ort_fc1_b"], names["ort_fc2"], names["ort_fc2_b"], top_k,
            f.activation_type, f.alpha, f.beta, f.limit))
        new = gm.graph.call_function(weighted_by_total, (y, total, m["x"]))
    moe.replace_all_uses_with(new)
    gm.graph.erase_node(moe)
    return MatchResult.success(("com.microsoft.MoE", float_why))


def given_routing_form(gm: fx.GraphModule, m: dict) -> MatchResult[tuple]:
    """Whether the experts of the fused_moe call of ``op_arguments`` ``m`` can be handed its routing: (OrtForm,
    canonical experts, top-k), or why not. Changes nothing and probes nothing."""
    form = ort_experts_form(m)
    if not form:
        return MatchResult.fail(form.reason)
    w_up, w_down, b_up, b_down = canonical_experts(gm, m)
    if w_up is None or w_down is None or (m["b_up"] is not None and b_up is None) or (
            m["b_down"] is not None and b_down is None):
        return MatchResult.fail("the expert weights are not constants")
    top_k, num_experts = ids_width(m["ids"]), int(w_up.shape[0])
    if not isinstance(top_k, int) or not 0 < top_k <= num_experts:
        return MatchResult.fail(f"the routing's top-k ({top_k}) is no fixed count of at most {num_experts} experts")
    if (why := _may_be_negative(gm, m["weights"])) is not None:
        return MatchResult.fail(why)
    return MatchResult.success((form.value, (w_up, w_down, b_up, b_down), top_k))


def takes_given_routing(gm: fx.GraphModule, m: dict) -> MatchResult[None]:
    """Whether ``use_given_routing`` hands com.microsoft.MoE this call's routing (no quantization), or why not.
    Changes nothing."""
    given = given_routing_form(gm, m)
    if not given:
        return MatchResult.fail(given.reason)
    f, (w_up, _, b_up, b_down), top_k = given.value
    return _logits_probe(f, top_k, b_up is not None or b_down is not None, int(w_up.shape[0]))


def _logits_probe(f, top_k: int, has_bias: bool, num_experts: int) -> MatchResult[None]:
    if ort_takes_weights_as_logits(f.activation_type, top_k, has_bias, f.alpha, f.beta, f.limit, num_experts):
        return MatchResult.success(None)
    return MatchResult.fail(f"the installed onnxruntime's com.microsoft.MoE({f.activation_type}) does not match "
                            "when handed the routing weights as logits")


def ids_width(ids) -> int | None:
    """The width of the expert ids ``ids`` [T, k] (a node): from its value, the route it is read from, or the
    reshape that makes it (``ids.reshape(-1, 1)``, the pairs of experts with a post-expert norm); else None."""
    if not isinstance(ids, fx.Node):
        return None
    if (val := ids.meta.get("val")) is not None:
        return val.shape[-1] if val.dim() == 2 and isinstance(val.shape[-1], int) else None
    if ids.target is operator.getitem and ids.args[1] == 1 and ids.args[0].target in (
            torch.ops.moecc.fused_route.default, torch.ops.moecc.route.default):
        return int(op_arguments(ids.args[0])["top_k"])
    shape = ids.args[1:] if ids.op == "call_method" and ids.target in ("reshape", "view") else ()
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return shape[-1] if len(shape) == 2 and isinstance(shape[-1], int) and shape[-1] > 0 else None


# ops that keep their input's values, only its shape, layout or float type
_VALUE_KEEPING = {"reshape", "view", "contiguous", "float", "to", "flatten", "squeeze", "unsqueeze", "clone"}


def _may_be_negative(gm: fx.GraphModule, weights) -> str | None:
    """Why the routing weights ``weights`` (a node) may be negative, or None where the graph shows they are not:
    the weights of a moecc route (every score is), times its scale and a per-expert scale that are not negative;
    or ones (the pairs of experts with a post-expert norm)."""
    node = weights
    while isinstance(node, fx.Node) and node.op in ("call_method", "call_function") and (
            str(getattr(node.target, "__name__", node.target)).split(".")[0] in _VALUE_KEEPING):
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return "the routing weights are no value of the graph"
    if node.op == "call_function" and node.target in (torch.ones_like, torch.ops.aten.ones_like.default):
        return None
    route = node.args[0] if node.target is operator.getitem and node.args[1] == 0 else None
    if route is None or route.target not in (torch.ops.moecc.fused_route.default, torch.ops.moecc.route.default):
        return "the routing weights are computed by the model's own ops, which may make them negative"
    r = op_arguments(route)
    if float(r["scale"]) < 0:
        return f"the routing scale {r['scale']} makes the weights negative"
    if r["expert_scale"] is not None:
        per_expert = param_of(gm, r["expert_scale"])
        if per_expert is None:
            return "the per-expert scale of the routing weights is computed in the graph"
        if bool((per_expert < 0).any()):
            return "a per-expert scale of the routing weights is negative"
    return None
