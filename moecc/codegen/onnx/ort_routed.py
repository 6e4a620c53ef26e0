"""``com.microsoft.MoE`` for a block whose routing it cannot compute itself, handed the block's own routing.

The op routes by a softmax over the logits it is given, a top-k and a renormalisation. A block routed otherwise
(sigmoid scores, a selection bias, group-limited top-k, a capacity, per-expert scales) has its weights ``w`` and
expert ids computed by moecc's routing, as graph ops. Given ``log(w)`` for each token's chosen experts and a very
low logit for the others, the op chooses those experts and weighs them ``w / sum(w)``. Its output times ``sum(w)``
is then ``sum(w * expert(x))``, the block's output: the combine is linear.

This holds for weights that are not negative (a negative one has no logarithm), which is what ``lower.use_ort_moe``
proves of the graph before it takes this form. Slots of no expert (ids out of the bank, pairs past a capacity) get
no logit; a token left with none at all gets zeros, so that the op's softmax stays finite, and its sum of 0 then
gives the block's zero row. Without this form such a block was decomposed: every expert on every token, ``E / k``
times the work (a DeepSeek-V3-shaped layer on the CPU was 5x slower than Hugging Face's eager loop)."""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from moecc.codegen.onnx.decompose import _kept_pairs
from moecc.codegen.onnx.ort_moe import (
    _in_fp32,
    _moe_attrs,
    _rel_error,
    _run_one_node,
    contrib_schema,
    expert_ffn,
    experts_by_logits,
)

log = logging.getLogger("moecc.codegen.onnx")

UNCHOSEN_LOGIT = -1.0e4  # exp() of it is 0 in fp32, next to any log of a weight (-104 for the smallest)


def routing_as_logits(weights: Tensor, ids: Tensor, num_experts: int, capacity: int, capacity_factor: float,
                      capacity_min: int, group_size, priority: str, rounding: str) -> tuple[Tensor, Tensor]:
    """(logits [T, E] that make the op choose and weigh each token's experts as ``weights`` does, the sum of each
    token's weights [T, 1]), in fp32; plain torch, which the export translates. Repeated ids of one token add up,
    as the combine adds their outputs."""
    keep = _kept_pairs(ids, num_experts, capacity, capacity_factor, capacity_min, group_size, priority, rounding)
    slot = torch.where(keep, ids, num_experts)
    w = torch.where(keep, weights.float(), 0.0)
    dense = torch.zeros(ids.shape[0], num_experts + 1, dtype=torch.float32, device=weights.device)
    dense = dense.scatter_add(1, slot, w)[:, :num_experts]
    total = dense.sum(-1, keepdim=True)
    chosen = dense > 0
    logits = torch.where(chosen, torch.log(torch.where(chosen, dense, 1.0)), UNCHOSEN_LOGIT)
    return torch.where(total > 0, logits, 0.0), total


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


def weighted_by_total(y: Tensor, total: Tensor, like: Tensor) -> Tensor:
    """The op's fp32 output ``y`` times each token's sum of weights, in the dtype of ``like`` (the block's input)."""
    return (y * total).to(like.dtype)


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
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[: t // 4, -1] = e  # a slot of no expert
    ids[0] = e  # a token of none
    weights = torch.sigmoid(torch.randn(t, k, generator=g) * 3) * 2.5
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
