"""How much more work ONNX Runtime's program does than the torch program of the same graph.

A fused MoE block is exported routed, by com.microsoft.MoE or its pairs sorted by expert (``sorted_experts``), but
where its expert weights are computed in the graph (dequantized or merged there), which both need as initializers:
then it is decomposed into plain ONNX ops that run every expert on every token
(``decompose.fused_moe``), E/k times the routed work. The torch program runs only the chosen experts.
``backend="auto"`` weighs the two by the weights each reads per token (a GEMM reads its weight once per token;
attention over the context and elementwise work are left out). On this project's CPU (RESULTS.md, session 44, a
4-layer model) ORT's program at 1.7x torch's reads still beat torch at 1-16 tokens and lost from 128 on; at 3.0x
it tied at 1 token and lost from 16 on, 1.8x at 512 tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from moecc.codegen.onnx.ort_forms import bank_prefix, param_of
from moecc.codegen.onnx.ort_routed import ids_width
from moecc.codegen.onnx.sorted_experts import sortable
from moecc.passes.base import layers_of
from moecc.passes.graph_utils import DTYPE_CASTS, op_arguments

_aten = torch.ops.aten
# ops whose weight operand each token reads whole
_GEMMS = {_aten.linear.default, _aten.matmul.default, _aten.mm.default, _aten.addmm.default, _aten.bmm.default,
          _aten.baddbmm.default, _aten.einsum.default, _aten.convolution.default, _aten.conv1d.default,
          _aten.conv2d.default, torch.nn.functional.linear, torch.matmul, torch.mm, torch.bmm, torch.einsum,
          torch.addmm, torch.baddbmm}
_GEMM_METHODS = {"matmul", "__matmul__", "mm", "bmm"}
# ops a weight passes through unchanged in size on its way to a GEMM
_VIEWS = {_aten.t.default, _aten.transpose.int, _aten.permute.default, _aten.view.default, _aten.reshape.default,
          _aten.contiguous.default, _aten.alias.default, _aten.clone.default, _aten.expand.default,
          _aten.unsqueeze.default, *DTYPE_CASTS}
_VIEW_METHODS = {"t", "transpose", "permute", "view", "reshape", "to", "float", "half", "bfloat16", "contiguous",
                 "type_as", "expand", "unsqueeze"}


@dataclass
class DenseWork:
    """Weights read per token: by ONNX Runtime's program and by the torch program, and the decomposed blocks
    (name -> (E / k, why they are not routed))."""

    ort: float
    torch: float
    decomposed: dict

    @property
    def ratio(self) -> float:
        return self.ort / self.torch if self.torch else 1.0

    def describe(self) -> str:
        groups: dict = {}
        for name, (ratio, why) in self.decomposed.items():
            groups.setdefault((ratio, why), []).append(name)
        parts = []
        for (ratio, why), names in groups.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            parts.append(f"{shown}: {ratio:.1f}x {'their' if len(names) > 1 else 'its'} routed experts' work, as "
                         f"{why}")
        count = len(self.decomposed)
        return (f"ONNX Runtime would run every expert on every token in {count} MoE block{'s' if count > 1 else ''} "
                f"({'; '.join(parts)}), {self.ratio:.1f}x the weights the torch program reads per token")


def dense_work(gm: fx.GraphModule) -> DenseWork:
    """The weights each program of ``gm`` (a pipeline result in the ``oi`` layout, before lowering) reads per
    token, and the blocks ONNX Runtime would decompose. Changes nothing."""
    moe_weights = set()
    ort = torch_reads = 0.0
    decomposed = {}
    names = {info.graph_prefix: info.name for info in layers_of(gm).values()}
    for moe in [n for n in gm.graph.nodes if n.target is torch.ops.moecc.fused_moe.default]:
        m = op_arguments(moe)
        w_up, w_down = _weight(gm, m["w_up"]), _weight(gm, m["w_down"])
        if w_up is None or w_down is None:
            continue
        moe_weights.update((m["w_up"], m["w_down"]))
        num_experts = int(w_up.shape[0])
        top_k = ids_width(m["ids"]) or num_experts
        per_expert = (w_up.numel() + w_down.numel()) / num_experts
        torch_reads += top_k * per_expert
        # routed, in the sorted form or by ORT's MoE op, wherever initializers hold the weights, as both need
        if sorted_form := sortable(gm, m):
            ort += top_k * per_expert
            continue
        ort += num_experts * per_expert
        prefix = bank_prefix(m) or moe.name
        decomposed[names.get(prefix, prefix)] = (num_experts / top_k, sorted_form.reason)
    rest = _gemm_weights(gm, moe_weights)
    return DenseWork(ort + rest, torch_reads + rest, decomposed)


def _weight(gm: fx.GraphModule, node):
    """The tensor a get_attr ``node`` reads, or the value of one the graph computes (its shape is what counts)."""
    value = param_of(gm, node)
    if value is None and isinstance(node, fx.Node):
        value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) and all(isinstance(d, int) for d in value.shape) else None


def _gemm_weights(gm: fx.GraphModule, skip: set) -> float:
    """Elements of the weights (2-D or more) that GEMMs and moecc ops of ``gm`` read, and of the modules it calls
    as leaves (embeddings aside), ``skip`` aside."""
    total = 0.0
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node not in skip:
            value = param_of(gm, node)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and _feeds_gemm(node):
                total += value.numel()
        elif node.op == "call_module":
            for module in gm.get_submodule(node.target).modules():
                if not isinstance(module, nn.Embedding):
                    total += sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2)
    return total


def _feeds_gemm(node: fx.Node, depth: int = 0) -> bool:
    for user in node.users:
        if user.op == "call_function" and (user.target in _GEMMS or str(user.target).startswith("moecc.")):
            return True  # moecc's ops read their weights (a router's, shared experts') once per token
        if user.op == "call_method" and user.target in _GEMM_METHODS:
            return True
        through = (user.op == "call_function" and user.target in _VIEWS) or (
            user.op == "call_method" and user.target in _VIEW_METHODS)
        if through and user.args and user.args[0] is node and depth < 8 and _feeds_gemm(user, depth + 1):
            return True
    return False
