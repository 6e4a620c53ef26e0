"""The forms in which ONNX Runtime's ``com.microsoft.MoE`` computes a block: its attributes, and its copies of the
expert weights, held as buffers of the block's module."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from moecc.experts import to_canonical
from moecc.match import MatchResult
from moecc.passes.graph_utils import attr_of


@dataclass
class OrtForm:
    activation_type: str
    normalize: bool
    alpha: float = 1.0
    beta: float = 0.0
    limit: float = 0.0


def ort_form(r: dict, m: dict) -> MatchResult[OrtForm]:
    """The com.microsoft.MoE attributes that compute exactly this (route, experts) pair, given as their calls'
    ``op_arguments``, or why none do."""
    score = r["score"]
    if score != "softmax":
        return MatchResult.fail(f"com.microsoft.MoE routes with softmax, this block with {score}")
    if r["selection_bias"] is not None or r["n_group"] > 1:
        return MatchResult.fail("com.microsoft.MoE has no selection bias or group-limited top-k")
    if m["capacity"] >= 0 or m["capacity_factor"] > 0:
        return MatchResult.fail("com.microsoft.MoE is dropless, this block has a capacity")
    experts = ort_experts_form(m)
    if experts:  # top-k then softmax over the chosen == softmax, top-k, renormalise
        experts.value.normalize = bool(r["renormalize"] or r["topk_first"])
    return experts


def ort_experts_form(m: dict) -> MatchResult[OrtForm]:
    """The com.microsoft.MoE activation attributes that compute these experts (``fused_moe``'s ``op_arguments``),
    its routing aside (``normalize`` left False), or why none does."""
    act, gated, alpha, limit = m["activation"], m["gated"], m["alpha"], m["limit"]
    if gated and act == "silu":
        return MatchResult.success(OrtForm("swiglu", False, 1.0, 0.0, limit))
    if gated and act == "swiglu_oai":
        return MatchResult.success(OrtForm("swiglu", False, alpha, 1.0, limit))
    if not gated and act in ("silu", "gelu", "relu", "identity") and limit <= 0:
        return MatchResult.success(OrtForm(act, False))
    return MatchResult.fail(f"no com.microsoft.MoE activation computes {'gated ' if gated else ''}{act}")


def param_of(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor a get_attr ``node`` reads, else None (a value computed in the graph, or no node)."""
    return None if node is None or node.op != "get_attr" else attr_of(gm, node)


def bank_prefix(m: dict) -> str:
    """The module path of a fused_moe call's expert weights (its ``op_arguments`` ``m``): the key of its block in
    ``layers_of``, from whichever projection the graph reads as a parameter; "" where it computes both."""
    node = next((n for n in (m["w_up"], m["w_down"]) if isinstance(n, fx.Node) and n.op == "get_attr"), None)
    return "" if node is None else node.target.rsplit(".", 1)[0]


def canonical_experts(gm: fx.GraphModule, m: dict):
    """(w_up, w_down, b_up, b_down) of a fused_moe call (its ``op_arguments``) in the canonical layout, each None
    where the graph computes it."""
    w_up, w_down, b_up = param_of(gm, m["w_up"]), param_of(gm, m["w_down"]), param_of(gm, m["b_up"])
    if w_up is None or w_down is None:
        return None, None, None, None
    w_up, w_down, b_up = to_canonical(w_up, w_down, b_up, m["weight_layout"])
    return w_up, w_down, b_up, param_of(gm, m["b_down"])


def ort_fc1(w_up: torch.Tensor, b_up, activation_type: str):
    """The first projection as ORT reads it: canonical [gate | up] rows -> interleaved [g0, u0, g1, u1, ...] for
    swiglu."""
    if activation_type != "swiglu":
        return w_up, b_up
    inter = w_up.shape[1] // 2
    fc1 = torch.stack([w_up[:, :inter], w_up[:, inter:]], 2).reshape(w_up.shape)
    return fc1, None if b_up is None else torch.stack([b_up[:, :inter], b_up[:, inter:]], 2).reshape(b_up.shape)


def held_buffers(gm: fx.GraphModule, moe: fx.Node, prefix: str, tensors: list) -> dict:
    """Register each (name, tensor) as a buffer of the block's module (fp32, but packed uint8), and read it into
    the graph before ``moe``: name -> get_attr node, or None for a tensor that is None."""
    module = gm.get_submodule(prefix)
    names = {}
    for name, value in tensors:
        if value is None:
            names[name] = None
            continue
        value = value.detach().contiguous()
        module.register_buffer(name, value if value.dtype == torch.uint8 else value.float())
        with gm.graph.inserting_before(moe):
            names[name] = gm.graph.get_attr(f"{prefix}.{name}")
    return names
