"""The Triton fused MoE: ``moecc::fused_moe_triton`` and ``moecc::fused_route_triton`` (same contracts as
``moecc::fused_moe`` and ``moecc::fused_route``)."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from moecc import knobs
from moecc.codegen.triton import configs, decode
from moecc.codegen.triton.align import align
from moecc.codegen.triton.configs import INTERPRET
from moecc.codegen.triton.gating import GEMV_MAX_TOKENS, fused_gating, gating
from moecc.codegen.triton.grouped_gemm import combine, gemm1, gemm2
from moecc.experts import to_canonical
from moecc.routing import apply_capacity, router_logits


@functools.cache
def _device_name_of(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _device_name(x: Tensor) -> str:
    return _device_name_of(configs.device_index(x)) if x.is_cuda else "cpu"


def pick_configs(x: Tensor, num_experts: int, hidden: int, inter: int, pairs: int):
    """(GEMM 1, GEMM 2) tiles for this call: tuned or shipped for the device, else the heuristic; one block_m."""
    if INTERPRET:
        cfg = configs.heuristic(0, x.dtype, True)
        return cfg, cfg
    return configs.choose(_device_name(x), x.dtype, num_experts, hidden, inter, x.shape[0], pairs)


def _maybe_tune(x: Tensor, num_experts: int, hidden: int, inter: int, top_k: int, gated: bool) -> None:
    from moecc import knobs

    if INTERPRET or not x.is_cuda or not knobs.AUTOTUNE.get() or torch.cuda.is_current_stream_capturing():
        return
    bucket = configs.token_bucket(x.shape[0])
    if configs.lookup(_device_name(x), x.dtype, num_experts, inter, hidden, bucket, "gemm1", top_k) is None:
        from moecc.codegen.triton.tune import tune

        tune([(num_experts, hidden, inter, top_k)], [bucket], x.dtype)


def run_experts(x, weights, ids, w_up, w_down, b_up, b_down, activation, gated, alpha, limit, cfg1, cfg2,
                shared_up=None, shared_down=None, interleaved: bool = False):
    """The launches after gating: align, GEMM 1 (+activation), GEMM 2 (+weights), combine; for a few tokens the
    two pair-wise GEMVs of ``decode`` instead. Ids ``>= E`` address ``shared_up``/``shared_down`` (same per-expert
    shapes, strides and layout) when given. ``interleaved``: gated up weights in the ``oi_gu`` layout."""
    t, k = ids.shape
    x = x.contiguous()
    b_up, b_down = (None if b is None else b.contiguous() for b in (b_up, b_down))  # read along rows, stride 1
    if shared_up is not None and (shared_up.stride() != w_up.stride() or shared_down.stride() != w_down.stride()):
        # one set of strides addresses routed and shared experts alike; place_experts leaves both contiguous
        w_up, w_down, shared_up, shared_down = (w.contiguous() for w in (w_up, w_down, shared_up, shared_down))
    num_routed = w_up.shape[0]
    num_shared = 0 if shared_up is None else shared_up.shape[0]
    if decode.use_decode(t, k - num_shared, num_routed, num_shared):
        return decode.experts(x, weights, ids, w_up, w_down, b_up, b_down, activation, gated, alpha, limit,
                              w_up if shared_up is None else shared_up, w_down if shared_down is None else shared_down,
                              interleaved)
    num_experts = num_routed + num_shared
    n_pairs = t * k
    aligned = align(ids, num_experts, cfg1.block_m)
    h = gemm1(x, w_up, w_up if shared_up is None else shared_up, b_up, aligned, n_pairs, k, gated, activation,
              alpha, limit, cfg1, interleaved)
    pairs = gemm2(h, w_down, w_down if shared_down is None else shared_down, b_down, weights.reshape(-1), aligned,
                  n_pairs, cfg2)
    return combine(pairs, ids, num_experts)


def on_the_device_of_x(body):
    """``body`` run with the CUDA device of its first argument ``x`` current. Triton launches on the current device
    and its current stream, whatever device the tensors are on: a model moved to ``cuda:1``, or split over GPUs,
    had its kernels launched on ``cuda:0`` (one thread's default) against memory of another GPU, on a stream
    ordered with none of that GPU's work."""

    @functools.wraps(body)
    def launch(*args, **kwargs):
        x = args[0] if args else kwargs["x"]
        elsewhere = x.is_cuda and x.get_device() != torch.cuda.current_device()
        with torch.cuda.device(x.device) if elsewhere else contextlib.nullcontext():
            return body(*args, **kwargs)

    return launch


@torch.library.custom_op("moecc::fused_moe_triton", mutates_args=())
@on_the_device_of_x
def fused_moe_triton(
    x: Tensor, weights: Tensor, ids: Tensor, w_up: Tensor, w_down: Tensor, b_up: Tensor | None,
    b_down: Tensor | None, activation: str, gated: bool, alpha: float, limit: float, capacity: int,
    capacity_factor: float, capacity_min: int, group_size: int, priority: str, weight_layout: str,
    rounding: str = "ceil",
) -> Tensor:
    """Same contract as ``moecc::fused_moe``. The kernels read ``oi`` or ``oi_gu`` weights (contiguous); other
    layouts are converted on every call, which the place-experts pass avoids."""
    t, k = ids.shape
    if t == 0 or k == 0:
        return torch.zeros_like(x)
    if weight_layout not in ("oi", "oi_gu"):
        w_up, w_down, b_up = (None if w is None else w.contiguous() for w in to_canonical(w_up, w_down, b_up,
                                                                                           weight_layout))
        weight_layout = "oi"
    if capacity >= 0 or capacity_factor > 0:
        ids = apply_capacity(ids, w_up.shape[0], capacity, capacity_factor, capacity_min, group_size, priority,
                             rounding)
    num_experts, up_rows, hidden = w_up.shape
    inter = up_rows // 2 if gated else up_rows
    _maybe_tune(x, num_experts, hidden, inter, k, gated)
    cfg1, cfg2 = pick_configs(x, num_experts, hidden, inter, t * k)
    return run_experts(x, weights.float().contiguous(), ids.contiguous(), w_up.to(x.dtype), w_down.to(x.dtype),
                       b_up, b_down, activation, gated, alpha, limit, cfg1, cfg2,
                       interleaved=weight_layout == "oi_gu")


@fused_moe_triton.register_fake
def _fused_moe_triton_fake(x, *args):
    return torch.empty_like(x)


# bf16 logits of the Qwen3-MoE router on an H200 (benchmarks/knob_ab.py, MOECC_TRITON_ROUTER_GEMV): the fused
# launch 2-4 % faster per layer at 1-2 tokens, 1 % at 8, 2 % slower at 64 than cuBLAS's GEMM and a gating launch
LOW_PRECISION_GEMV_MAX_TOKENS = 16


@torch.library.custom_op("moecc::fused_route_triton", mutates_args=())
@on_the_device_of_x
def fused_route_triton(
    x: Tensor, router_weight: Tensor, router_bias: Tensor | None, selection_bias: Tensor | None, top_k: int,
    score: str, topk_first: bool, renormalize: bool, n_group: int, topk_group: int, scale: float, logits_fp32: bool,
    group_top: int = 2, expert_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract as ``moecc::fused_route``: one fused GEMV+gating launch for small T (the GEMV accumulates
    in fp32; bf16/fp16 logits are then rounded once, as the eager GEMM rounds them, unless the knob keeps those
    on a GEMM of their own), else the router GEMM then one gating kernel."""
    low_precision = not logits_fp32 and x.dtype != torch.float32
    if low_precision:
        gemv_tokens = LOW_PRECISION_GEMV_MAX_TOKENS if knobs.TRITON_ROUTER_GEMV.get() else 0
    else:
        gemv_tokens = GEMV_MAX_TOKENS
    if x.shape[0] <= gemv_tokens:
        return fused_gating(x, router_weight, router_bias, selection_bias, top_k, score, topk_first, renormalize,
                            n_group, topk_group, scale, round_logits=low_precision, group_top=group_top,
                            expert_scale=expert_scale)
    logits = router_logits(x, router_weight, router_bias, logits_fp32)
    return gating(logits, selection_bias, top_k, score, topk_first, renormalize, n_group, topk_group, scale, group_top,
                  expert_scale)


@fused_route_triton.register_fake
def _fused_route_triton_fake(x, router_weight, router_bias, selection_bias, top_k, *args):
    k = min(top_k, router_weight.shape[0])
    return x.new_empty((x.shape[0], k), dtype=torch.float32), x.new_empty((x.shape[0], k), dtype=torch.int64)


@torch.library.custom_op("moecc::fused_moe_shared_triton", mutates_args=())
@on_the_device_of_x
def fused_moe_shared_triton(
    x: Tensor, weights: Tensor, ids: Tensor, w_up: Tensor, w_down: Tensor, activation: str, gated: bool,
    alpha: float, limit: float, shared_up: Tensor, shared_down: Tensor, shared_gate: Tensor | None,
    weight_layout: str,
) -> Tensor:
    """Dropless routed experts plus shared experts in one grouped GEMM: the shared FFN, split into ``m`` chunks of
    the routed intermediate size (``shared_up [m, U, H]``, ``shared_down [m, H, I]``), joins every token as
    always-selected experts ``E .. E+m-1`` with weight 1, or ``sigmoid(x @ shared_gate^T)`` when gated. Routed and
    shared weights share ``weight_layout``, ``oi`` or ``oi_gu``."""
    t, k = ids.shape
    if t == 0:
        return torch.zeros_like(x)
    num_routed, up_rows, hidden = w_up.shape
    m = shared_up.shape[0]
    shared_w = torch.ones((t, 1), dtype=torch.float32, device=x.device) if shared_gate is None else torch.sigmoid(
        (x @ shared_gate.t().to(x.dtype)).float())
    all_ids = torch.cat([ids, torch.arange(num_routed, num_routed + m, device=x.device).expand(t, m)], 1)
    all_w = torch.cat([weights.float(), shared_w.expand(t, m)], 1)
    inter = up_rows // 2 if gated else up_rows
    _maybe_tune(x, num_routed + m, hidden, inter, k + m, gated)
    cfg1, cfg2 = pick_configs(x, num_routed + m, hidden, inter, t * (k + m))
    return run_experts(x, all_w.contiguous(), all_ids.contiguous(), w_up.to(x.dtype), w_down.to(x.dtype), None,
                       None, activation, gated, alpha, limit, cfg1, cfg2, shared_up.to(x.dtype),
                       shared_down.to(x.dtype), interleaved=weight_layout == "oi_gu")


@fused_moe_shared_triton.register_fake
def _fused_moe_shared_triton_fake(x, *args):
    return torch.empty_like(x)
