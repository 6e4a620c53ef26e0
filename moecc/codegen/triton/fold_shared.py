"""Fold a block's shared experts into its routed grouped GEMM (Triton lowering).

``fused_moe(x, ...) + shared_ffn(x, ...)`` becomes one ``fused_moe_shared_triton`` when the shared FFN has the
routed experts' activation and no biases, and the routing is dropless. The shared intermediate dimension is
split into chunks of the routed size (zero-padded): an FFN's output is the sum over its intermediate channels,
so the chunks summed with weight 1 (or the shared gate) give exactly the shared output."""

from __future__ import annotations

import operator

import torch
from torch import fx

from moecc.experts import interleave_gate_up
from moecc.match import MatchResult
from moecc.passes.graph_utils import attr_of, eliminate_dead_code, op_arguments

_ACTIVATION = ("activation", "gated", "alpha", "limit")


def chunk_shared(s_up: torch.Tensor, s_down: torch.Tensor, inter: int, gated: bool):
    """[1, U_s, H], [1, H, I_s] -> [m, U, H], [m, H, I]: chunks of the routed intermediate size ``inter``."""
    i_s = s_down.shape[2]
    m = -(-i_s // inter)
    pad = m * inter - i_s
    hidden = s_down.shape[1]
    if gated:
        gate, up = s_up[0, :i_s], s_up[0, i_s:]
        gate = torch.cat([gate, gate.new_zeros(pad, hidden)]).reshape(m, inter, hidden)
        up = torch.cat([up, up.new_zeros(pad, hidden)]).reshape(m, inter, hidden)
        w_up = torch.cat([gate, up], 1)
    else:
        w_up = torch.cat([s_up[0], s_up.new_zeros(pad, hidden)]).reshape(m, inter, hidden)
    down = torch.cat([s_down[0], s_down.new_zeros(hidden, pad)], 1)
    w_down = down.reshape(hidden, m, inter).permute(1, 0, 2)
    return w_up.contiguous(), w_down.contiguous()


def match_fold(add: fx.Node) -> MatchResult[tuple[fx.Node, fx.Node, dict, dict]]:
    """(routed node, shared node, their ``op_arguments``) of a sum of routed and shared experts that one grouped
    GEMM can compute, or why not."""
    a, b = add.args[:2]
    nodes = {getattr(n, "target", None): n for n in (a, b) if isinstance(n, fx.Node)}
    moe = nodes.get(torch.ops.moecc.fused_moe.default)
    shared = nodes.get(torch.ops.moecc.shared_ffn.default)
    if moe is None or shared is None:
        return MatchResult.fail("not routed + shared")
    m, s = op_arguments(moe), op_arguments(shared)
    if m["x"] is not s["x"]:
        return MatchResult.fail("routed and shared experts read different inputs")
    if len(moe.users) != 1 or len(shared.users) != 1:
        return MatchResult.fail("routed or shared output is used elsewhere")
    if any(a[name] is not None for a in (m, s) for name in ("b_up", "b_down")):
        return MatchResult.fail("expert biases are not folded")
    if m["capacity"] >= 0 or m["capacity_factor"] > 0:
        return MatchResult.fail("a capacity could drop shared experts")
    if any(m[name] != s[name] for name in _ACTIVATION):
        return MatchResult.fail("shared and routed experts differ in activation")
    if m["weight_layout"] not in ("oi", "oi_gu"):
        return MatchResult.fail(f"expert weights are in the {m['weight_layout']} layout; the kernels read oi or "
                                "oi_gu")
    return MatchResult.success((moe, shared, m, s))


def fold_shared_experts(gm: fx.GraphModule) -> int:
    from moecc.codegen.triton.moe import fused_moe_shared_triton

    folded = 0
    for add in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]:
        m = match_fold(add)
        if not m:
            continue
        moe, shared, r, s = m.value
        w_up, w_down = attr_of(gm, r["w_up"]), attr_of(gm, r["w_down"])
        inter = w_down.shape[2]
        gated, layout = r["gated"], r["weight_layout"]
        s_up, s_down = chunk_shared(attr_of(gm, s["w_up"]), attr_of(gm, s["w_down"]), inter, gated)
        if layout == "oi_gu" and gated:
            s_up = interleave_gate_up(s_up)
        if s_up.shape[1:] != w_up.shape[1:]:
            continue
        prefix = r["w_up"].target.rpartition(".")[0]
        owner = gm.get_submodule(prefix)
        owner.register_buffer("shared_chunks_up", s_up)
        owner.register_buffer("shared_chunks_down", s_down)
        with gm.graph.inserting_before(add):
            up_node = gm.graph.get_attr(f"{prefix}.shared_chunks_up")
            down_node = gm.graph.get_attr(f"{prefix}.shared_chunks_down")
            new = gm.graph.call_function(fused_moe_shared_triton._opoverload, (
                r["x"], r["weights"], r["ids"], r["w_up"], r["w_down"], *(r[name] for name in _ACTIVATION), up_node,
                down_node, s["gate"], layout))
        add.replace_all_uses_with(new)
        for n in (add, moe, shared):
            gm.graph.erase_node(n)
        folded += 1
    eliminate_dead_code(gm.graph)
    gm.recompile()
    return folded
