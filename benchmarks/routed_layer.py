"""What experts fused without their block cost against the whole block fused, on the GPU.

    python benchmarks/routed_layer.py [--shapes qwen3_moe mixtral] [--tokens 1 64 512 4096]

Both models compute ``h = x + mix(x); h + moe(h)`` with one Hugging Face MoE block's weights (``moe_layer.py``'s
shapes, bf16). In ``block`` the MoE block is a module of its own, so moecc fuses it whole (routing in the fused
gating kernel). In ``inline`` one layer holds the token mixer, the router and the experts and calls
``experts(x, ids, weights)`` itself (Gemma 4's layout): no canonical block, so moecc fuses the experts alone and the
routing runs as the model's own ops, unless ``lift_routing`` proves them a canonical routing. Prints ms per call
of each, HF eager of ``block`` as a reference, and the two compiled models' relative difference.
``--expert-scale``: the inline layer also multiplies each chosen weight by its expert's factor (Gemma 4's
``per_expert_scale``, drawn in U(0.5, 1.5)); the difference is then the compiled inline layer's from its own
eager run, as the block computes another function."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from moe_layer import INPUT_SETS, cuda_time, make_block, rel, set_impl  # beside this file
from torch import nn

import moecc


class BlockLayer(nn.Module):
    def __init__(self, block: nn.Module, hidden: int):
        super().__init__()
        self.mix = nn.Linear(hidden, hidden, bias=False)
        self.moe = block

    def forward(self, x):
        h = x + self.mix(x)
        return h + self.moe(h)


class InlineLayer(nn.Module):
    """The same function, the router and the experts called by the layer itself (a Qwen3-MoE / Mixtral block's
    softmax, top-k and renormalisation written out)."""

    def __init__(self, layer: BlockLayer, top_k: int, renormalize: bool, expert_scale: torch.Tensor | None = None):
        super().__init__()
        self.mix, self.router, self.experts = layer.mix, layer.moe.gate, layer.moe.experts
        self.top_k, self.renormalize = top_k, renormalize
        self.expert_scale = None if expert_scale is None else nn.Parameter(expert_scale, requires_grad=False)

    def forward(self, x):
        h = x + self.mix(x)
        flat = h.reshape(-1, h.shape[-1])
        probs = F.softmax(F.linear(flat, self.router.weight).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.expert_scale is not None:
            weights = weights * self.expert_scale[ids]
        return h + self.experts(flat, ids, weights.to(h.dtype)).reshape(h.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["qwen3_moe", "mixtral"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 64, 512, 4096])
    ap.add_argument("--expert-scale", action="store_true", help="a per-expert scale of the inline layer's weights")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, ms per call of back-to-back calls "
          f"cycling {INPUT_SETS} inputs")
    print(f"{'shape':10} {'T':>6} {'hf eager':>9} {'block':>9} {'inline':>9} {'inline/block':>13} {'diff':>8}  "
          "fused as")
    for shape in args.shapes:
        block, cfg = make_block(shape, "cuda", torch.bfloat16)
        set_impl(block, "grouped_mm")
        hidden = cfg.hidden_size
        whole = BlockLayer(block, hidden).to("cuda", torch.bfloat16).eval()
        with torch.no_grad():
            whole.mix.weight.normal_(0, 0.02)
        renorm = bool(getattr(cfg, "norm_topk_prob", True))
        num_experts = whole.moe.gate.weight.shape[0]
        scale = torch.rand(num_experts, device="cuda", dtype=torch.bfloat16) + 0.5 if args.expert_scale else None
        inline = InlineLayer(whole, cfg.num_experts_per_tok, renorm, scale).eval()
        compiled = {}
        for name, model in (("block", whole), ("inline", inline)):
            cm = moecc.compile(model, backend="triton", verify=False)
            with torch.no_grad():
                cm(torch.randn(1, 2, hidden, device="cuda", dtype=torch.bfloat16))
            compiled[name] = cm
        how = "; ".join(f"{n}: {layer.name} {'fused' if layer.fused else 'as written'} ({layer.routing})"
                        for n, cm in compiled.items() for layer in cm.moe_layers)
        for t in args.tokens:
            xs = [torch.randn(1, t, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(INPUT_SETS)]
            with torch.no_grad():
                eager = cuda_time([lambda m=whole, x=x: m(x) for x in xs])
                times = {n: cuda_time([lambda c=cm, x=x: c(x) for x in xs]) for n, cm in compiled.items()}
                diff = rel(compiled["inline"](xs[0]), inline(xs[0]) if args.expert_scale else compiled["block"](xs[0]))
            print(f"{shape:10} {t:6d} {eager:9.3f} {times['block']:9.3f} {times['inline']:9.3f} "
                  f"{times['inline'] / times['block']:13.2f} {diff:8.1e}  {how if t == args.tokens[0] else ''}",
                  flush=True)
        compiled = block = whole = inline = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
