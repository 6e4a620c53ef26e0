"""The decode GEMVs (``moecc/codegen/triton/decode.py``) against the grouped path at few tokens (CUDA, bf16).

    python benchmarks/decode_ab.py --tokens 1 2 4 8 16

Times the experts and the combine only (no gating), from CUDA graphs with the L2 flushed before every call (as in
the tuner: a decode step's weights are not L2-resident in a model), for the grouped path (align, GEMM 1, GEMM 2,
combine, with the shipped or tuned tiles) and for the GEMVs under a few launch settings (tile size, K step of both
GEMVs and of GEMV 2 alone, warps, GEMV 2 as a programmatic dependent launch or not). Prints us per call, the
weight bytes streamed per us (TB/s) and each setting's ratio to the grouped path."""

from __future__ import annotations

import argparse
import itertools
import os

import torch

from moecc import knobs
from moecc.codegen.triton import decode
from moecc.codegen.triton.moe import pick_configs, run_experts
from moecc.codegen.triton.tune import _graph_timer

SHAPES = {"mixtral": (8, 4096, 14336, 2), "qwen3_moe": (128, 2048, 768, 8)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--tile-elements", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--block-k", type=int, nargs="+", default=[0, 512, 2048], help="0: the shipped rule")
    ap.add_argument("--down-block-k", type=int, nargs="+", default=[0], help="GEMV 2's K step; 0: as GEMV 1")
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--pdl", nargs="+", default=["1", "0"], help="MOECC_TRITON_PDL values")
    ap.add_argument("--every", action="store_true", help="print every setting, not only the default and the best")
    args = ap.parse_args()
    timer = _graph_timer()
    settings = list(itertools.product(args.tile_elements, args.block_k, args.down_block_k, args.warps, args.pdl))
    print(f"{torch.cuda.get_device_name()}: us per call (TB/s of expert weights), L2 flushed before each call")
    for shape in args.shapes:
        e, hidden, inter, k = SHAPES[shape]
        g = torch.Generator(device="cuda").manual_seed(0)
        w_up = torch.randn(e, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        w_down = torch.randn(e, hidden, inter, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        for t in args.tokens:
            x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
            w, ids = torch.topk(torch.softmax(torch.randn(t, e, device="cuda", generator=g), -1), k, -1)
            w = (w / w.sum(-1, keepdim=True)).float()
            active = torch.unique(ids).numel()
            weight_bytes = active * 3 * hidden * inter * 2
            cfg1, cfg2 = pick_configs(x, e, hidden, inter, t * k)
            common = (x, w, ids, w_up, w_down, None, None, "silu", True, 1.0, 0.0)
            grouped = timer(lambda c=common, c1=cfg1, c2=cfg2: _grouped(c, c1, c2))
            ref = _grouped(common, cfg1, cfg2).float()
            row = [f"grouped {grouped * 1e3:7.1f} ({weight_bytes / grouped / 1e9:4.2f})"]
            best = None
            shipped = (decode.TILE_ELEMENTS, decode.BLOCK_K, decode.DOWN_BLOCK_K, decode.NUM_WARPS, "1")
            for setting in settings:
                tile, block_k, down_block_k, warps, pdl = setting
                decode.TILE_ELEMENTS, decode.BLOCK_K, decode.DOWN_BLOCK_K, decode.NUM_WARPS = setting[:4]
                os.environ["MOECC_TRITON_PDL"] = pdl
                run = lambda c=common: decode.experts(*c, c[3], c[4], True)
                err = ((run().float() - ref).norm() / ref.norm()).item()
                ms = timer(run)
                if best is None or ms < best[0]:
                    best = (ms, setting, err)
                if args.every:
                    print(f"    {shape} T={t} tile {tile} block_k {block_k} down {down_block_k} {warps} warps "
                          f"pdl {pdl}: {ms * 1e3:7.1f} us")
                if setting == shipped:
                    row.append(f"gemv default {ms * 1e3:7.1f} ({weight_bytes / ms / 1e9:4.2f}) {grouped / ms:4.2f}x")
            decode.TILE_ELEMENTS, decode.BLOCK_K, decode.DOWN_BLOCK_K, decode.NUM_WARPS = shipped[:4]
            os.environ.pop("MOECC_TRITON_PDL")
            ms, (tile, block_k, down_block_k, warps, pdl), err = best
            row.append(f"gemv best {ms * 1e3:7.1f} ({weight_bytes / ms / 1e9:4.2f}) {grouped / ms:4.2f}x "
                       f"[tile {tile}, block_k {block_k}, down {down_block_k}, {warps} warps, pdl {pdl}; "
                       f"rel. err vs grouped {err:.1e}]")
            print(f"{shape:<10} T={t:<3} " + "  ".join(row), flush=True)
    return 0


def _grouped(common, cfg1, cfg2):
    with knobs.TRITON_DECODE_MAX_TOKENS.overridden("0"):
        return run_experts(*common, cfg1, cfg2, interleaved=True)


if __name__ == "__main__":
    raise SystemExit(main())
