"""fuse_gating: router matmul + ``moecc.route`` (scoring, top-k, renormalisation, scaling) -> ``moecc.fused_route``."""

from __future__ import annotations

import torch
from torch import fx

from moecc.match import MatchResult
from moecc.passes.base import MoePass, PassResult
from moecc.passes.graph_utils import attr_of, eliminate_dead_code, nodes_calling, recompile

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)


def _unwrap_float(node):
    """(source, cast_to_fp32): ``x.float()`` is how an fp32 router reads its input and weight."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "float":
        return node.args[0], True
    return node, False


_RESHAPES = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.reshape)


def _flattened_linear(node) -> fx.Node | None:
    """The linear whose output ``node`` reshapes to ``[tokens, E]``, when that is all the reshape does: a router
    module called on ``[B, S, H]`` (a router MLP kept as its own program) gives ``[B, S, E]`` logits, flattened."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _RESHAPES):
        return None
    source, shape = node.args[0], node.args[1] if len(node.args) > 1 else None
    if not (isinstance(source, fx.Node) and source.op == "call_function" and source.target in _LINEAR
            and len(source.users) == 1 and isinstance(shape, (list, tuple)) and len(shape) == 2):
        return None
    # the last dim must stay E: a reshape that also moves values between columns is no flatten
    return source if isinstance(shape[-1], int) and shape[-1] == _rows(source.args[1]) else None


def _rows(weight) -> int | None:
    """The output features of a linear's weight node, read off the module that owns the graph."""
    weight, _ = _unwrap_float(weight)
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    try:
        return int(attr_of(weight.graph.owning_module, weight).shape[0])
    except (AttributeError, IndexError):
        return None


def match_gating(route: fx.Node) -> MatchResult[dict]:
    logits = route.args[0]
    flatten = _flattened_linear(logits)
    if flatten is not None:
        if len(logits.users) != 1:
            return MatchResult.fail("router logits are also used outside routing (e.g. returned by the block)")
        logits = flatten
    if not (isinstance(logits, fx.Node) and logits.op == "call_function" and logits.target in _LINEAR):
        return MatchResult.fail("router logits do not come from a linear layer (router kept as graph ops)")
    if len(logits.users) != 1:
        return MatchResult.fail("router logits are also used outside routing (e.g. returned by the block)")
    x, fp32_x = _unwrap_float(logits.args[0])
    w, fp32_w = _unwrap_float(logits.args[1])
    b = logits.args[2] if len(logits.args) > 2 else logits.kwargs.get("bias")
    b, _ = _unwrap_float(b)
    if fp32_x != fp32_w:
        return MatchResult.fail("router reads input and weight in different precisions")
    return MatchResult.success({"x": x, "w": w, "b": b, "fp32": fp32_x, "logits": logits,
                                "flatten": flatten is not None})


class FuseGating(MoePass):
    name = "fuse_gating"

    def run(self, gm: fx.GraphModule) -> PassResult:
        fused, reasons = 0, []
        for route in nodes_calling(gm, torch.ops.moecc.route.default):
            m = match_gating(route)
            if not m:
                reasons.append(m.reason)
                continue
            v = m.value
            # the optional tail (group_top, expert_scale) travels as the call wrote it
            _, sel, k, score, topk_first, renorm, n_group, topk_group, scale, *tail = route.args
            with gm.graph.inserting_before(route):
                x = v["x"]
                if v["flatten"]:  # the linear acts on the last dim alone, so it commutes with flattening the rest
                    x = gm.graph.call_function(torch.ops.aten.flatten.using_ints, (x, 0, -2))
                new = gm.graph.call_function(torch.ops.moecc.fused_route.default, (
                    x, v["w"], v["b"], sel, k, score, topk_first, renorm, n_group, topk_group, scale, v["fp32"],
                    *tail), dict(route.kwargs))
            new.meta.update(route.meta)
            route.replace_all_uses_with(new)
            gm.graph.erase_node(route)
            fused += 1
        self.stats = {"fused": fused, "not_fused": reasons}
        if fused:
            eliminate_dead_code(gm.graph)
            recompile(gm)
        return PassResult(gm, fused > 0)
