"""place_experts: lay out expert weights the way the chosen kernels read them, and record the placement plan.

On one device this is a layout transform (``oi``: ``[E, out, in]``, ``io``: ``[E, in, out]``, both contiguous);
the plan names the device of every expert so that multi-device placement can extend it."""

from __future__ import annotations

import torch
from torch import fx

from moecc.passes.base import MoePass, PassResult, layers_of
from moecc.passes.graph_utils import nodes_calling

LAYOUTS = ("oi", "io")


class PlaceExperts(MoePass):
    name = "place_experts"

    def __init__(self, layout: str = "oi") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"expert_layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout

    def run(self, gm: fx.GraphModule) -> PassResult:
        modified, plans = False, {}
        prefixes = {info.graph_prefix: info for info in layers_of(gm).values()}
        for node in nodes_calling(gm, torch.ops.moecc.fused_moe.default):
            w_up_node, w_down_node, current = node.args[3], node.args[4], node.args[16]
            if w_up_node.op != "get_attr" or w_down_node.op != "get_attr":
                continue
            prefix = w_up_node.target.rsplit(".", 1)[0]
            w_up = gm.get_parameter(w_up_node.target)
            w_down = gm.get_parameter(w_down_node.target)
            if current != self.layout:
                for attr_node, w in ((w_up_node, w_up), (w_down_node, w_down)):
                    placed = torch.nn.Parameter(w.detach().transpose(1, 2).contiguous(), requires_grad=False)
                    name = attr_node.target.rsplit(".", 1)[1] + f"_{self.layout}"
                    gm.get_submodule(prefix).register_parameter(name, placed)
                    attr_node.target = f"{prefix}.{name}"
                node.args = node.args[:16] + (self.layout,)
                modified = True
            plan = {
                "layout": self.layout,
                "gate_up": "concatenated, gate first",
                "devices": {str(w_up.device): list(range(int(w_up.shape[0])))},
            }
            plans[node.name] = plan
            if prefix in prefixes:
                prefixes[prefix].placement = plan
        self.stats = {"placed": len(plans)}
        if modified:
            gm.recompile()
        return PassResult(gm, modified)
