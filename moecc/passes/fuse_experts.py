"""fuse_experts: ``dispatch -> expert_ffn -> combine`` -> one ``moecc.fused_moe``."""

from __future__ import annotations

import operator

import torch
from torch import fx

from moecc.match import MatchResult
from moecc.passes.base import MoePass, PassResult, layers_of
from moecc.passes.graph_utils import eliminate_dead_code, nodes_calling, op_arguments, recompile


def _item(node, source: fx.Node, index: int) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and node.args[0] is source and node.args[1] == index)


def match_experts(combine: fx.Node) -> MatchResult[tuple[fx.Node, fx.Node]]:
    ffn = combine.args[0]
    if not (isinstance(ffn, fx.Node) and ffn.target is torch.ops.moecc.expert_ffn.default):
        return MatchResult.fail("combine does not read an expert_ffn")
    xs = ffn.args[0]
    dispatch = xs.args[0] if isinstance(xs, fx.Node) and xs.target is operator.getitem else None
    if dispatch is None or dispatch.target is not torch.ops.moecc.dispatch.default:
        return MatchResult.fail("expert_ffn does not read a dispatch")
    if not (_item(xs, dispatch, 0) and _item(ffn.args[1], dispatch, 2) and _item(combine.args[1], dispatch, 1)):
        return MatchResult.fail("dispatch outputs are wired in an unexpected way")
    if len(ffn.users) != 1 or any(len(u.users) != 1 for u in dispatch.users):
        return MatchResult.fail("dispatch or expert outputs are used outside the MoE block")
    return MatchResult.success((dispatch, ffn))


class FuseExperts(MoePass):
    name = "fuse_experts"

    def run(self, gm: fx.GraphModule) -> PassResult:
        fused, reasons = 0, []
        for combine in nodes_calling(gm, torch.ops.moecc.combine.default):
            m = match_experts(combine)
            if not m:
                reasons.append(m.reason)
                continue
            dispatch, ffn = m.value
            d = op_arguments(dispatch)
            _, _, w_up, w_down, b_up, b_down, act, gated, alpha, limit = ffn.args
            # the rounding travels only where it is not the default, as the dispatch call wrote it
            rounding = () if d["rounding"] == "ceil" else (d["rounding"],)
            with gm.graph.inserting_before(combine):
                new = gm.graph.call_function(torch.ops.moecc.fused_moe.default, (
                    d["x"], combine.args[2], d["ids"], w_up, w_down, b_up, b_down, act, gated, alpha, limit,
                    d["capacity"], d["capacity_factor"], d["capacity_min"], d["group_size"], d["priority"], "oi",
                    *rounding))
            new.meta.update(combine.meta)
            combine.replace_all_uses_with(new)
            fused += 1
        self.stats = {"fused": fused, "not_fused": reasons}
        if fused:
            eliminate_dead_code(gm.graph)
            recompile(gm)
            _mark_fused(gm)
        return PassResult(gm, fused > 0)


def _mark_fused(gm: fx.GraphModule) -> None:
    fused_prefixes = {n.args[3].target.rsplit(".", 1)[0] for n in nodes_calling(gm, torch.ops.moecc.fused_moe.default)
                      if isinstance(n.args[3], fx.Node) and n.args[3].op == "get_attr"}
    for info in layers_of(gm).values():
        if info.graph_prefix in fused_prefixes:
            info.fused = True
