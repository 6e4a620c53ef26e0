"""specialize_capacity: derive each MoE op's per-expert capacity as a sympy formula of the token count.

The token count stays symbolic. The formula is recorded on the node and the layer; where the token count of a
capacity group is a known constant, the factor form is folded into a fixed capacity."""

from __future__ import annotations

import sympy
import torch
from torch import fx

from moecc.passes.base import MoePass, PassResult, layers_of
from moecc.passes.graph_utils import nodes_calling, op_arguments, recompile

T = sympy.Symbol("T", positive=True, integer=True)  # tokens in the batch
S = sympy.Symbol("S", positive=True, integer=True)  # tokens in one sequence (a capacity group)


def capacity_formula(top_k: int, num_experts: int, capacity: int, capacity_factor: float, capacity_min: int,
                     per_sequence: bool, rounding: str = "ceil") -> sympy.Expr:
    group = S if per_sequence else T
    if capacity >= 0:
        return sympy.Integer(capacity)
    if capacity_factor > 0:
        cf = sympy.nsimplify(capacity_factor)
        round_ = sympy.ceiling if rounding == "ceil" else sympy.floor
        return sympy.Max(sympy.Integer(capacity_min), round_(top_k * group * cf / num_experts))
    return top_k * group  # dropless: the bound no expert can exceed


class SpecializeCapacity(MoePass):
    name = "specialize_capacity"

    def run(self, gm: fx.GraphModule) -> PassResult:
        modified, formulas = False, {}
        prefixes = {info.graph_prefix: info for info in layers_of(gm).values()}
        for node in nodes_calling(gm, torch.ops.moecc.fused_moe.default):
            a = op_arguments(node)
            x, weights, w_up = a["x"], a["weights"], a["w_up"]
            capacity, cf, cmin, group = a["capacity"], a["capacity_factor"], a["capacity_min"], a["group_size"]
            prefix = w_up.target.rsplit(".", 1)[0] if w_up.op == "get_attr" else ""
            top_k = prefixes[prefix].top_k if prefix in prefixes and prefixes[prefix].top_k else _top_k(weights)
            num_experts = _attr_shape(gm, node)
            per_seq = not (isinstance(group, int) and group == 0)
            expr = capacity_formula(int(top_k), int(num_experts), capacity, cf, cmin, per_seq, a["rounding"])
            node.meta["moecc_capacity"] = str(expr)
            group_tokens = group if per_seq else x.meta["val"].shape[0] if "val" in x.meta else None
            if capacity < 0 and cf > 0 and isinstance(group_tokens, int):
                fixed = int(expr.subs({S: group_tokens, T: group_tokens}))
                node.args = node.args[:11] + (fixed, 0.0) + node.args[13:]
                modified = True
            if prefix in prefixes:
                prefixes[prefix].capacity = f"C = {expr}"
            formulas[node.name] = str(expr)
        self.stats = {"capacity": formulas}
        if modified:
            recompile(gm)
        return PassResult(gm, modified)


def _top_k(weights: fx.Node) -> int:
    """k of the routing that produced ``weights`` (getitem 0 of a route or fused_route)."""
    if "val" in weights.meta:
        return int(weights.meta["val"].shape[1])
    producer = weights.args[0]
    if producer.target in (torch.ops.moecc.fused_route.default, torch.ops.moecc.route.default):
        return int(op_arguments(producer)["top_k"])
    raise ValueError(f"cannot tell top_k of {weights.name}: it is not produced by a moecc routing op")


def _attr_shape(gm: fx.GraphModule, node: fx.Node) -> int:
    return int(gm.get_parameter(node.args[3].target).shape[0])
