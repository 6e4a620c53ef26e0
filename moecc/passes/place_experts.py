"""place_experts: lay out expert weights the way the chosen kernels read them, and record the placement plan.

On one device this is a layout transform (``moecc.experts.WEIGHT_LAYOUTS``: ``oi`` ``[E, out, in]``, ``io``
``[E, in, out]``, ``oi_gu`` ``oi`` with gate and up rows interleaved, all contiguous); ``oi_gu`` applies to gated
experts only, others get ``oi``. The plan names the device of every expert so that multi-device placement can
extend it."""

from __future__ import annotations

import logging

import torch
from torch import fx

from moecc.experts import WEIGHT_LAYOUTS, from_canonical, to_canonical
from moecc.passes.base import MoePass, PassResult, layers_of
from moecc.passes.graph_utils import nodes_calling

log = logging.getLogger("moecc.passes")

LAYOUTS = WEIGHT_LAYOUTS
GATE_UP = {"oi": "concatenated, gate first", "io": "concatenated, gate first", "oi_gu": "interleaved, gate first"}


class PlaceExperts(MoePass):
    name = "place_experts"

    def __init__(self, layout: str = "oi") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"expert_layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout

    def run(self, gm: fx.GraphModule) -> PassResult:
        modified, plans, kept = False, {}, []
        prefixes = {info.graph_prefix: info for info in layers_of(gm).values()}
        for node in nodes_calling(gm, torch.ops.moecc.fused_moe.default):
            w_up_node, w_down_node, b_up_node, current = node.args[3], node.args[4], node.args[5], node.args[16]
            if w_up_node.op != "get_attr" or w_down_node.op != "get_attr":
                kept.append(f"{node.name}: expert weights are computed in the graph, not parameters; left as they are")
                continue
            wanted = self.layout if self.layout != "oi_gu" or node.args[8] else "oi"
            if wanted == "oi_gu" and b_up_node is not None and b_up_node.op != "get_attr":
                kept.append(f"{node.name}: the up-projection bias is computed in the graph; gate/up kept apart (oi)")
                wanted = "oi"
            prefix = w_up_node.target.rsplit(".", 1)[0]
            w_up = gm.get_parameter(w_up_node.target)
            if current != wanted:
                attrs = (w_up_node, w_down_node, b_up_node if wanted == "oi_gu" or current == "oi_gu" else None)
                tensors = [None if n is None else _attr(gm, n).detach() for n in attrs]
                canonical = to_canonical(*tensors, current)
                placed = from_canonical(*canonical, wanted)
                for attr_node, t in zip(attrs, placed):
                    if attr_node is None:
                        continue
                    owner, _, leaf = attr_node.target.rpartition(".")
                    name = f"{leaf}_{wanted}"
                    gm.get_submodule(owner).register_parameter(
                        name, torch.nn.Parameter(t.contiguous(), requires_grad=False))
                    attr_node.target = f"{owner}.{name}"
                node.args = node.args[:16] + (wanted,)
                modified = True
            plan = {
                "layout": wanted,
                "gate_up": GATE_UP[wanted],
                "devices": {str(w_up.device): list(range(int(w_up.shape[0])))},
            }
            plans[node.name] = plan
            if prefix in prefixes:
                prefixes[prefix].placement = plan
        self.stats = {"placed": len(plans)}
        if kept:
            self.stats["kept"] = kept
            for why in kept:
                log.info("place_experts: %s", why)
        if modified:
            gm.recompile()
        return PassResult(gm, modified)


def _attr(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    owner, _, name = node.target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)
