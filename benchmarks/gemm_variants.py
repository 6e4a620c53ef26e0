"""The grouped-GEMM kernel variants at large T (CUDA, bf16), each on the tiles that moecc picks, against
torch._grouped_mm (CUTLASS) on tokens sorted by expert.

    python benchmarks/gemm_variants.py --cases mixtral:4096,mixtral:16384,qwen3:16384
    python benchmarks/gemm_variants.py --cases qwen3:4096 --routing balanced   # no padded rows where T*k/E
                                                                             # is a multiple of the row block

GEMM 1: pointer loads with gate and up rows apart (``oi``, two dots), pointer loads on interleaved rows
(``oi_gu``), TMA weight tiles on interleaved rows (one ``tl.dot``), and the warp-specialized Gluon kernel (what
moecc runs on Hopper for 128-row blocks). GEMM 2: pointer loads, TMA for both operands, warp-specialized. TFLOP/s
count the useful pairs only."""

from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.testing import do_bench

from moecc.codegen.triton import configs
from moecc.codegen.triton.align import align
from moecc.codegen.triton.grouped_gemm import gemm1, gemm2
from moecc.experts import interleave_gate_up

SHAPES = {"mixtral": (8, 4096, 14336, 2), "qwen3": (128, 2048, 768, 8)}


def _with_tma(mode: str, fn, ws: str = "off"):
    def run():
        os.environ["MOECC_TRITON_TMA"] = mode
        os.environ["MOECC_TRITON_WS"] = ws
        return fn()
    return run


def grouped_mm_pair(x, w_up, w_down, ids, top_k):
    """HF's grouped_mm path: sort pairs by expert, two CUTLASS grouped GEMMs around the activation."""
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    offs = torch.bincount(flat, minlength=w_up.shape[0]).cumsum(0).to(torch.int32)
    up = torch._grouped_mm(x[order // top_k], w_up.transpose(1, 2), offs=offs)
    gate, up = up.chunk(2, dim=-1)
    return torch._grouped_mm(torch.nn.functional.silu(gate) * up, w_down.transpose(1, 2), offs=offs)


def balanced_ids(t: int, e: int, k: int, device) -> torch.Tensor:
    """Token i takes experts i*k .. i*k+k-1 (mod E): every expert gets T*k/E pairs, give or take one."""
    return (torch.arange(t, device=device)[:, None] * k + torch.arange(k, device=device)) % e


def run_case(name: str, t: int, routing: str = "random") -> None:
    e, hidden, inter, k = SHAPES[name]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(t, hidden, device=dev, dtype=torch.bfloat16)
    w_up = torch.randn(e, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) * 0.02
    w_gu = interleave_gate_up(w_up)
    w_down = torch.randn(e, hidden, inter, device=dev, dtype=torch.bfloat16) * 0.02
    weights, ids = torch.randn(t, e, device=dev).softmax(-1).topk(k, -1)
    if routing == "balanced":
        ids = balanced_ids(t, e, k, dev)
    weights = weights.reshape(-1).contiguous()
    n_pairs = t * k
    flops1, flops2 = 2 * n_pairs * hidden * 2 * inter, 2 * n_pairs * inter * hidden
    cfg1, cfg2 = configs.choose(torch.cuda.get_device_name(), torch.bfloat16, e, hidden, inter, t, n_pairs)
    aligned = align(ids, e, cfg1.block_m)
    live = ((torch.arange(aligned[0].numel(), device=dev) < aligned[2]) & (aligned[0] >= 0)
            & (aligned[0] < n_pairs))

    def g1(w, interleaved):
        return lambda: gemm1(x, w, w, None, aligned, n_pairs, k, True, "silu", 1.0, 0.0, cfg1, interleaved)

    h_ref = _with_tma("off", g1(w_up, False))()

    def g2():
        return gemm2(h_ref, w_down, w_down, None, weights, aligned, n_pairs, cfg2)

    out_ref = _with_tma("off", g2)()
    rows = []
    for label, fn, flops, check in (
            ("gemm1 pointer, gate|up apart (oi)", _with_tma("off", g1(w_up, False)), flops1, None),
            ("gemm1 pointer, interleaved (oi_gu)", _with_tma("off", g1(w_gu, True)), flops1, "h"),
            ("gemm1 TMA, interleaved (oi_gu)", _with_tma("on", g1(w_gu, True)), flops1, "h"),
            ("gemm1 warp-specialized (Gluon, oi_gu)", _with_tma("on", g1(w_gu, True), "on"), flops1, "h"),
            ("gemm2 pointer", _with_tma("off", g2), flops2, None),
            ("gemm2 TMA", _with_tma("on", g2), flops2, "out"),
            ("gemm2 warp-specialized (Gluon)", _with_tma("on", g2, "on"), flops2, "out")):
        got = fn()
        err = 0.0
        if check == "h":
            err = ((got[live].float() - h_ref[live].float()).norm() / h_ref[live].float().norm()).item()
        elif check == "out":
            err = ((got.float() - out_ref.float()).norm() / out_ref.float().norm()).item()
        rows.append((label, do_bench(fn, warmup=50, rep=200, return_mode="median"), flops, err))
    rows.append(("both, torch._grouped_mm (+sort, act)",
                 do_bench(lambda: grouped_mm_pair(x, w_up, w_down, ids, k), warmup=50, rep=200,
                          return_mode="median"), flops1 + flops2, 0.0))
    os.environ.pop("MOECC_TRITON_TMA", None)
    os.environ.pop("MOECC_TRITON_WS", None)
    padded = int(aligned[2].item()) if torch.is_tensor(aligned[2]) else int(aligned[2])
    print(f"\n## {name} T={t}, {routing} routing ({torch.cuda.get_device_name()}): gemm1 {cfg1}, gemm2 {cfg2}; "
          f"{n_pairs} pairs in {padded} block rows ({padded / n_pairs - 1:.1%} padding)")
    print(f"{'variant':<40} {'ms':>8} {'TFLOP/s':>8} {'err':>8}")
    for label, ms, flops, err in rows:
        print(f"{label:<40} {ms:8.3f} {flops / ms / 1e9:8.0f} {err:8.1e}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="mixtral:4096,mixtral:16384,qwen3:4096,qwen3:16384")
    ap.add_argument("--routing", nargs="+", choices=["random", "balanced"], default=["random"],
                    help="random: top-k of random scores; balanced: every expert the same number of pairs")
    a = ap.parse_args()
    for case in a.cases.split(","):
        name, t = case.split(":")
        for routing in a.routing:
            run_case(name, int(t), routing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
