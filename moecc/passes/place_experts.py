"""place_experts: lay out expert weights the way the chosen kernels read them, and record the placement plan.

On one device this is a layout transform (``moecc.experts.WEIGHT_LAYOUTS``: ``oi`` ``[E, out, in]``, ``io``
``[E, in, out]``, ``oi_gu`` ``oi`` with gate and up rows interleaved, all contiguous); ``oi_gu`` applies to gated
experts only, others get ``oi``. Weights already in the wanted layout but not contiguous (a view: ``[E, in, out]``
parameters an einsum reads, recognized as a transposed ``oi``) are laid out too: kernels that read tiles through
TMA take contiguous weights only.

Weights that the model still holds (the canonical weights are often the model's own tensors) are re-laid out only
as a copy, which doubles their memory while the model lives. ``copy_weights``: True always copies, False never
does (those blocks keep their layout; every kernel reads every layout), None (default) copies when all such copies
together take at most ``COPY_BUDGET`` of the memory free on their device, so that a small model gets the faster
layout and a large one keeps its headroom. The plan names the device of every expert so that multi-device
placement can extend it."""

from __future__ import annotations

import logging
import os

import torch
from torch import fx

from moecc.experts import WEIGHT_LAYOUTS, from_canonical, to_canonical
from moecc.passes.base import MoePass, PassResult, layers_of
from moecc.passes.graph_utils import attr_of, nodes_calling, recompile

log = logging.getLogger("moecc.passes")

LAYOUTS = WEIGHT_LAYOUTS
GATE_UP = {"oi": "concatenated, gate first", "io": "concatenated, gate first", "oi_gu": "interleaved, gate first"}


class PlaceExperts(MoePass):
    name = "place_experts"

    def __init__(self, layout: str = "oi", copy_weights: bool | None = None) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"expert_layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.copy_weights = copy_weights
        self._why_not = ""

    def _wanted(self, node: fx.Node) -> str:
        return self.layout if self.layout != "oi_gu" or node.args[8] else "oi"  # interleaving needs a gate

    def _allow_copies(self, gm: fx.GraphModule, storage_names: dict[int, set[str]]) -> bool:
        if self.copy_weights is not None:
            self._why_not = "copy_expert_weights=False"
            return self.copy_weights
        need: dict[torch.device, int] = {}
        for node in nodes_calling(gm, torch.ops.moecc.fused_moe.default):
            attrs = [n for n in node.args[3:7] if isinstance(n, fx.Node) and n.op == "get_attr"]
            if len(attrs) >= 2 and _relaid(gm, node, self._wanted(node)) and _shared(gm, attrs[:2], storage_names):
                for n in attrs:
                    t = attr_of(gm, n)
                    need[t.device] = need.get(t.device, 0) + t.numel() * t.element_size()
        short = {d: b for d, b in need.items() if b > COPY_BUDGET * _free_bytes(d)}
        if short:
            device, size = next(iter(short.items()))
            self._why_not = (f"the copies would take {size / 2**30:.1f} GiB, more than {COPY_BUDGET:.0%} of the free "
                             f"memory on {device}; copy_expert_weights=True forces them")
        return not short

    def run(self, gm: fx.GraphModule) -> PassResult:
        modified, plans, kept, laid_out = False, {}, [], {}
        prefixes = {info.graph_prefix: info for info in layers_of(gm).values()}
        storage_names = _storage_names(gm)
        copies = self._allow_copies(gm, storage_names)
        for node in nodes_calling(gm, torch.ops.moecc.fused_moe.default):
            w_up_node, w_down_node, b_up_node, current = node.args[3], node.args[4], node.args[5], node.args[16]
            if w_up_node.op != "get_attr" or w_down_node.op != "get_attr":
                kept.append(f"{node.name}: expert weights are computed in the graph, not parameters; left as they are")
                continue
            wanted = self._wanted(node)
            if wanted == "oi_gu" and b_up_node is not None and b_up_node.op != "get_attr":
                kept.append(f"{node.name}: the up-projection bias is computed in the graph; gate/up kept apart (oi)")
                wanted = "oi"
            prefix = w_up_node.target.rsplit(".", 1)[0]
            w_up = gm.get_parameter(w_up_node.target)
            relaid = _relaid(gm, node, wanted)
            if relaid and not copies and _shared(gm, (w_up_node, w_down_node), storage_names):
                kept.append(f"{node.name}: expert weights are the model's own tensors; kept {current} rather than "
                            f"a contiguous {wanted} copy ({self._why_not})")
                wanted = current
            elif relaid:
                bias = b_up_node is not None and (b_up_node.op == "get_attr" or "oi_gu" in (wanted, current))
                attrs = (w_up_node, w_down_node, b_up_node if bias else None)
                key = (tuple(None if n is None else n.target for n in attrs), current, wanted)
                if key not in laid_out:  # one block the model calls twice: both calls read one bank
                    tensors = [None if n is None else attr_of(gm, n).detach() for n in attrs]
                    placed = from_canonical(*to_canonical(*tensors, current), wanted)
                    laid_out[key] = [None if n is None else _register(gm, n.target, f"_{wanted}", t)
                                     for n, t in zip(attrs, placed)]
                for attr_node, target in zip(attrs, laid_out[key]):
                    if attr_node is not None:
                        attr_node.target = target
                node.args = node.args[:16] + (wanted,) + node.args[17:]
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
            recompile(gm)
        return PassResult(gm, modified)


def _relaid(gm: fx.GraphModule, node: fx.Node, wanted: str) -> bool:
    """Whether the expert weights of a ``fused_moe`` node need a copy: another layout, or not contiguous."""
    return node.args[16] != wanted or not all(attr_of(gm, n).is_contiguous() for n in node.args[3:5])


def _register(gm: fx.GraphModule, target: str, suffix: str, t: torch.Tensor) -> str:
    """Register ``t`` beside the weight at ``target``, under its name plus ``suffix``; the new target."""
    owner, _, leaf = target.rpartition(".")
    gm.get_submodule(owner).register_parameter(f"{leaf}{suffix}", torch.nn.Parameter(t.contiguous(),
                                                                                     requires_grad=False))
    return f"{owner}.{leaf}{suffix}"


COPY_BUDGET = 0.25  # the share of a device's free memory that automatic copies of expert weights may take


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _storage_names(gm: fx.GraphModule) -> dict[int, set[str]]:
    """Every parameter's and buffer's name, by the storage it lives in."""
    names: dict[int, set[str]] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        names.setdefault(t.untyped_storage().data_ptr(), set()).add(name)
    return names


def _shared(gm: fx.GraphModule, nodes, storage_names: dict[int, set[str]]) -> bool:
    """Whether any of these weights shares storage with another tensor of the graph module (the model's own
    weights, still held by the original block until cleanup)."""
    targets = {n.target for n in nodes}
    return any(storage_names.get(attr_of(gm, n).untyped_storage().data_ptr(), set()) - targets for n in nodes)


