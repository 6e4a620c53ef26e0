"""Per-expert load of each MoE block on a batch: how many (token, slot) pairs each expert receives."""

from __future__ import annotations

import operator

import torch
from torch import fx

_ROUTES = (torch.ops.moecc.fused_route.default, torch.ops.moecc.route.default)


def expert_load(gm: fx.GraphModule, inputs: list[torch.Tensor]) -> dict[str, list[int]]:
    """{graph prefix of the block: counts per expert}, by running the graph and watching its routing ops."""
    prefix_of = {}
    for moe in gm.graph.nodes:
        is_moe = moe.op == "call_function" and moe.target is torch.ops.moecc.fused_moe.default
        if is_moe and moe.args[3].op == "get_attr":
            ids = moe.args[2]
            if ids.op == "call_function" and ids.target is operator.getitem:
                prefix_of[ids.args[0]] = (moe.args[3].target.rsplit(".", 1)[0], moe)
    counts: dict[str, list[int]] = {}

    class Watch(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in prefix_of:
                prefix, moe = prefix_of[n]
                num_experts = self.fetch_attr(moe.args[3].target).shape[0]
                ids = out[1].reshape(-1)
                ids = ids[(ids >= 0) & (ids < num_experts)]
                counts[prefix] = torch.bincount(ids, minlength=num_experts).tolist()
            return out

    with torch.no_grad():
        Watch(gm).run(*inputs)
    return counts
