"""bf16 (or fp16) quality of user-written MoE blocks compiled for a backend, against the same model in fp32 eager.

Each block of ``tests/user_modules.py`` (``USER_BLOCKS`` and the expert forms named below) sits in a ``TinyModel``;
the model is compiled in the low dtype on one capture length and called on fresh token counts. The table gives, per
block, whether it was fused, the compiled model's relative L2 error against fp32 eager, and eager's own error in the
low dtype (the conditioning of the toy, which bounds what any kernel can reach).

    PYTHONPATH=. python benchmarks/bf16_forms.py --backend triton --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _blocks() -> dict:
    import user_modules as um

    blocks = {name: cls for name, cls in um.USER_BLOCKS.items()}
    blocks.update({
        "bare_parameters": lambda: um.ParameterExpertsMoE(),
        "bare_parameters_matmul_bias": lambda: um.ParameterExpertsMoE(matmul=True, bias=True),
        "bare_parameters_plain_bias": lambda: um.ParameterExpertsMoE(gated=False, bias=True),
        "clamped_shared": um.ClampedSharedMoE,
        "softcapped": um.SoftcappedMoE,
        "softcapped_stacked": um.SoftcappedStackedMoE,
        # experts fused without their block (the layer routes inline): routing as the model's own ops
        "routed_list": um.InlineRoutedLayer,
        "routed_stacked": lambda: um.InlineRoutedLayer(um.StackedRoutedExperts()),
        "routed_on_inputs": lambda: um.InlineRoutedLayer(um.InputWeightedRoutedExperts()),
        # a norm of the router's input alone; per-expert scales written inline; a router weight cast to fp32
        "router_norm": um.RouterNormMoE,
        "router_norm_stacked": um.RouterNormBmmMoE,
        "inline_expert_scale": um.InlineExpertScaledMoE,
        "routed_fp32_router": lambda: um.InlineRoutedLayer(routing="softmax_fp32"),
        # a temperature on the k logits a top-k kept; routers that score by code of their own
        "temperature": lambda: um.ScaledLogitsMoE(1 / 0.7),
        "temperature_after_topk": lambda: um.ScaledLogitsMoE(1 / 0.7, after_topk=True),
        "router_mlp": um.ScoringModuleMoE,
        "router_mlp_h_wide": lambda: um.ScoringModuleMoE(width=24, returns="routing"),
        "router_cosine": lambda: um.ScoringModuleMoE("cosine", 8),
    })
    return blocks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def measure(name: str, make, backend: str, dtype: torch.dtype, device: str, tokens: list[int]) -> str:
    from user_modules import TinyModel

    import moecc

    torch.manual_seed(0)
    ref_model = TinyModel(make()).eval().to(device)
    model = copy.deepcopy(ref_model).to(dtype)
    start = time.time()
    try:
        cm = moecc.compile(model, backend=backend)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            cm(torch.randint(0, 50, (1, 32), generator=g).to(device))
            errs, eager_errs = [], []
            for t in tokens:
                ids = torch.randint(0, 50, (1, t), generator=g).to(device)
                ref = ref_model(ids)
                errs.append(_rel(cm(ids).float(), ref))
                eager_errs.append(_rel(model(ids).float(), ref))
    except Exception as exc:  # noqa: BLE001 - reported, the table goes on
        return f"| {name} | error | {type(exc).__name__}: {str(exc).splitlines()[0][:100]} | |"
    layer = cm.moe_layers[0]
    ran_on = ",".join(sorted({e.backend for e in cm._entries}))
    return (f"| {name} | {'yes' if layer.fused else 'no: ' + layer.reason[:60]} | {max(errs):.1e} | "
            f"{max(eager_errs):.1e} | {ran_on} | {time.time() - start:.0f} s |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 900])
    ap.add_argument("--blocks", nargs="+", help="names of the blocks to run (all by default)")
    args = ap.parse_args()
    os.environ.setdefault("MOECC_LOGS", "error")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    blocks = _blocks()
    print(f"backend {args.backend}, {args.dtype} on {device}, tokens {args.tokens}; relative L2 error of the logits "
          "against fp32 eager")
    print("| block | fused | compiled | eager in the dtype | ran on | time |")
    print("|---|---|---|---|---|---|")
    for name in args.blocks or blocks:
        print(measure(name, blocks[name], args.backend, dtype, device, args.tokens), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
