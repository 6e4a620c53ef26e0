"""The tree's tile choice against another ``configs.py`` (with the ``configs.json`` beside it), on the whole MoE
layer, interleaved (CUDA, bf16).

    git archive <commit> moecc | tar -x -C /tmp/old
    python benchmarks/configs_ab.py /tmp/old/moecc/codegen/triton/configs.py --shapes olmoe custom --tokens 512 2048

Each choice has a program of its own: a CUDA graph the runtime replays (small token counts) keeps the tiles of its
capture. Each round times both choices once, back to back as ``moe_layer.py`` times a layer;
the table shows the medians over rounds, the spread (max/min) of each and the tiles each chose."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys

import torch
from moe_layer import INPUT_SETS, cuda_time, make_block  # the layer benchmark's helpers, beside this file

import moecc
from moecc.codegen.triton import configs, moe


def load_configs(path: str):
    spec = importlib.util.spec_from_file_location("moecc_configs_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", help="another configs.py")
    ap.add_argument("--shapes", nargs="+", default=["mixtral", "qwen3_moe"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    choosers = {"tree": configs.choose, "reference": load_configs(args.reference).choose}
    picked = {}

    def pick_with(name):
        def pick(x, num_experts, hidden, inter, pairs):
            cfgs = choosers[name](moe._device_name(x), x.dtype, num_experts, hidden, inter, x.shape[0], pairs)
            picked[name] = cfgs
            return cfgs
        return pick

    print(f"{torch.cuda.get_device_name()}: tile choice of the tree against {args.reference}, "
          f"{args.rounds} interleaved rounds, ms")
    print(f"{'shape':<10} {'T':>6} {'tree':>16} {'reference':>16}  tiles (GEMM 1 / GEMM 2: m n k group warps stages)")
    for shape in args.shapes:
        block, cfg = make_block(shape, "cuda", torch.bfloat16)
        programs = {name: moecc.compile(block, backend="triton", verify=False) for name in choosers}
        for t in args.tokens:
            xs = [torch.randn(1, t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16) for _ in range(INPUT_SETS)]
            times: dict[str, list[float]] = {name: [] for name in choosers}
            with torch.no_grad():
                for _ in range(args.rounds):
                    for name in choosers:
                        moe.pick_configs = pick_with(name)
                        times[name].append(cuda_time([lambda x=x, p=programs[name]: p(x) for x in xs]))
            cells = []
            for name in choosers:
                med = statistics.median(times[name])
                cells.append(f"{med:8.3f} (±{100 * (max(times[name]) / min(times[name]) - 1) / 2:3.0f} %)")
            tiles = " | ".join(" / ".join(" ".join(str(v) for v in vars(c).values()) for c in picked[name])
                               for name in choosers)
            print(f"{shape:<10} {t:6d} " + " ".join(f"{c:>16}" for c in cells) + f"  {tiles}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
