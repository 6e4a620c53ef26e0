"""Probe: the decode GEMVs streaming their weights through TMA, pipelined in shared memory (CUDA, bf16).

    python benchmarks/decode_tma_probe.py --shapes qwen3_moe mixtral --tokens 1

Triton pipelines plain pointer loads only in loops that feed a ``tl.dot``; the shipped GEMVs
(``moecc/codegen/triton/decode.py``) therefore hold the next step's tile in registers. Tensor-descriptor loads are
pipelined in any loop (``num_stages``), so a program can keep several steps in flight through shared memory. Times
each GEMV alone and both together, shipped against TMA variants over a sweep of tiles, L2 flushed before each call
(the tuner's timer), interleaved gate/up rows, SiLU, no bias."""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moecc.codegen.triton import decode
from moecc.codegen.triton.grouped_gemm import ACT_IDS
from moecc.codegen.triton.tune import _graph_timer

SHAPES = {"mixtral": (8, 4096, 14336, 2), "qwen3_moe": (128, 2048, 768, 8)}


@triton.jit
def _up_tma(x_ptr, ids_ptr, w_desc, h_ptr, top_k, N, K, stride_xm, stride_hm, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64)
    e = tl.load(ids_ptr + pair)
    row0 = (e * 2 * N + tl.program_id(1) * 2 * BLOCK_N).to(tl.int32)
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + (pair // top_k) * stride_xm
    acc = tl.zeros((2 * BLOCK_N, BLOCK_K), tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        x = tl.load(x_row + k + offs_k, mask=k + offs_k < K, other=0.0).to(tl.float32)
        acc += w_desc.load([row0, k]).to(tl.float32) * x[None, :]
    g, u = tl.split(tl.reshape(tl.sum(acc, 1), (BLOCK_N, 2)))
    h = g / (1.0 + tl.exp(-g)) * u
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(h_ptr + pair * stride_hm + offs_n, h.to(h_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _down_tma(h_ptr, ids_ptr, weights_ptr, w_desc, out_ptr, N, K, stride_hm, stride_om, TOP_K: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)
    steps = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for i in tl.range(0, TOP_K * steps, num_stages=STAGES):
        s = i // steps
        k = (i - s * steps) * BLOCK_K
        pair = t * TOP_K + s
        e = tl.load(ids_ptr + pair).to(tl.int32)
        weight = tl.load(weights_ptr + pair)
        h = tl.load(h_ptr + pair * stride_hm + k + offs_k, mask=k + offs_k < K, other=0.0).to(tl.float32)
        acc += w_desc.load([e * N + n0, k]).to(tl.float32) * (h * weight)[None, :]
    offs_n = n0 + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + t * stride_om + offs_n, tl.sum(acc, 1).to(out_ptr.dtype.element_ty), mask=offs_n < N)


def _shipped_up(x, ids, w_up, h):
    t, k = ids.shape
    inter, hidden = h.shape[1], x.shape[1]
    block_n, block_k = decode._blocks(2, hidden, inter)
    decode._up_kernel[(t * k, triton.cdiv(inter, block_n))](
        x, ids, w_up, w_up, w_up, h, k, w_up.shape[0], w_up.shape[0], inter, hidden, x.stride(0), *w_up.stride(), 0,
        h.stride(0), 1.0, 0.0, GATED=True, INTERLEAVED=True, ACT=ACT_IDS["silu"], HAS_BIAS=False, CLAMP=False,
        BLOCK_N=block_n, BLOCK_K=block_k, PDL=False, num_warps=decode.NUM_WARPS)


def _shipped_down(h, ids, weights, w_down, out):
    t, k = ids.shape
    hidden, inter = out.shape[1], h.shape[1]
    k_pad = triton.next_power_of_2(k)
    block_n, block_k = decode._blocks(k_pad, inter, hidden)
    decode._down_kernel[(t, triton.cdiv(hidden, block_n))](
        h, ids, weights, w_down, w_down, w_down, out, w_down.shape[0], w_down.shape[0], hidden, inter, h.stride(0),
        *w_down.stride(), 0, out.stride(0), TOP_K=k, K_PAD=k_pad, HAS_BIAS=False, BLOCK_N=block_n,
        BLOCK_K=block_k, PDL=False, num_warps=decode.NUM_WARPS)


def _tma_up(x, ids, w_up, h, block_n, block_k, stages, warps):
    t, k = ids.shape
    inter, hidden = h.shape[1], x.shape[1]
    rows = w_up.shape[0] * w_up.shape[1]
    desc = TensorDescriptor(w_up.view(-1, hidden), [rows, hidden], [hidden, 1], [2 * block_n, block_k])
    _up_tma[(t * k, triton.cdiv(inter, block_n))](x, ids, desc, h, k, inter, hidden, x.stride(0), h.stride(0),
                                                  BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps)


def _tma_down(h, ids, weights, w_down, out, block_n, block_k, stages, warps):
    t, k = ids.shape
    hidden, inter = out.shape[1], h.shape[1]
    rows = w_down.shape[0] * hidden
    desc = TensorDescriptor(w_down.view(-1, inter), [rows, inter], [inter, 1], [block_n, block_k])
    _down_tma[(t, triton.cdiv(hidden, block_n))](h, ids, weights, desc, out, hidden, inter, h.stride(0),
                                                 out.stride(0), TOP_K=k, BLOCK_N=block_n, BLOCK_K=block_k,
                                                 STAGES=stages, num_warps=warps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    ap.add_argument("--block-n", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--block-k", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4, 6])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--top", type=int, default=5, help="settings printed per GEMV")
    args = ap.parse_args()
    timer = _graph_timer()
    settings = list(itertools.product(args.block_n, args.block_k, args.stages, args.warps))
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}: us per call (TB/s of the weights read)")
    for shape in args.shapes:
        for t in args.tokens:
            _probe(shape, t, settings, timer, args.top)
    return 0


def _probe(shape, t, settings, timer, top):
    e, hidden, inter, k = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(t)
    w_up = torch.randn(e, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w_down = torch.randn(e, hidden, inter, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    w, ids = torch.topk(torch.softmax(torch.randn(t, e, device="cuda", generator=g), -1), k, -1)
    w = (w / w.sum(-1, keepdim=True)).float()
    ids = ids.to(torch.int32)
    up_bytes, down_bytes = t * k * 2 * inter * hidden * 2, t * k * hidden * inter * 2
    h_ref = torch.empty(t * k, inter, device="cuda", dtype=torch.bfloat16)
    out_ref = torch.empty(t, hidden, device="cuda", dtype=torch.bfloat16)
    _shipped_up(x, ids, w_up, h_ref)
    _shipped_down(h_ref, ids, w, w_down, out_ref)
    both = timer(lambda: decode.experts(x, w, ids, w_up, w_down, None, None, "silu", True, 1.0, 0.0, w_up, w_down,
                                        True))
    up = timer(lambda: _shipped_up(x, ids, w_up, h_ref))
    down = timer(lambda: _shipped_down(h_ref, ids, w, w_down, out_ref))
    print(f"{shape} T={t}: shipped both (PDL as shipped) {both * 1e3:.1f} us "
          f"({(up_bytes + down_bytes) / both / 1e9:.2f}); up {up * 1e3:.1f} ({up_bytes / up / 1e9:.2f}); "
          f"down {down * 1e3:.1f} ({down_bytes / down / 1e9:.2f})", flush=True)
    results = {"up": [], "down": []}
    h = torch.empty_like(h_ref)
    out = torch.empty_like(out_ref)
    for setting in settings:
        block_n, block_k = setting[:2]
        if block_k > hidden or 2 * block_n > 256 or block_n * block_k > 16384:
            continue
        try:
            _tma_up(x, ids, w_up, h, *setting)
            err = ((h.float() - h_ref.float()).norm() / h_ref.float().norm()).item()
            results["up"].append((timer(lambda a=setting: _tma_up(x, ids, w_up, h, *a)), setting, err))
        except Exception as exc:  # noqa: BLE001 - a setting that does not compile is skipped
            print(f"  up {setting}: {type(exc).__name__}")
        if block_k > inter:
            continue
        try:
            _tma_down(h_ref, ids, w, w_down, out, *setting)
            err = ((out.float() - out_ref.float()).norm() / out_ref.float().norm()).item()
            results["down"].append((timer(lambda a=setting: _tma_down(h_ref, ids, w, w_down, out, *a)), setting, err))
        except Exception as exc:  # noqa: BLE001
            print(f"  down {setting}: {type(exc).__name__}")
    for name, nbytes in (("up", up_bytes), ("down", down_bytes)):
        for ms, setting, err in sorted(results[name])[:top]:
            print(f"  tma {name} (n, k, stages, warps) {setting}: {ms * 1e3:.1f} us ({nbytes / ms / 1e9:.2f}) "
                  f"err {err:.1e}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
