"""Find the MoE blocks of a model by structure: the innermost modules that own an expert bank and its router."""

from __future__ import annotations

from torch import nn

from moecc.passes.recognize.bank import experts_of_one_kind, is_moe_block, listed_experts
from moecc.passes.recognize.mlp import dense_mlps
from moecc.passes.recognize.stacked import stacked_params


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    candidates = {name: mod for name, mod in model.named_modules() if is_moe_block(mod)}
    inner = []
    for name, mod in candidates.items():
        prefix = f"{name}." if name else ""
        if not any(other != name and other.startswith(prefix) for other in candidates):
            inner.append((name, mod))
    return inner


MIN_LISTED_EXPERTS = 4  # fewer MLPs in a list are sub-layers (LongCat-Flash's decoder layer holds two), not experts


def _bank_size(module: nn.Module) -> int:
    """E when ``module`` holds experts: two or more stacked ``[E, ., .]`` weights (the smallest E when they differ:
    LongCat-Flash's up projections also count its identity experts), or a list of E >= ``MIN_LISTED_EXPERTS``
    modules that are dense MLPs; else 0."""
    stacked_sizes = [p.shape[0] for p in stacked_params(module, materialize=False).values()]
    stacked = min(stacked_sizes) if len(stacked_sizes) >= 2 else 0
    if stacked or not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return stacked
    kids = listed_experts(module)
    if len(kids) < MIN_LISTED_EXPERTS:
        return 0
    # experts of one type: the first stands for all
    one_type = len({type(k) for k in kids}) == 1
    bank = dense_mlps(kids[:1]) if one_type else experts_of_one_kind(kids)
    return len(kids) if bank else 0


def expert_owners(model: nn.Module, blocks: list[str]) -> list[tuple[str, nn.Module]]:
    """The modules that hold an expert bank outside ``blocks`` (no router was found beside it): capture keeps them
    whole too, so that no example's routing is traced into the graph, and recognition says why they run as
    written. The model itself is never one, nor a module that holds one of ``blocks``."""
    inside = lambda name, outer: name == outer or name.startswith(f"{outer}.")  # noqa: E731
    owners: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if not name or "." not in name or any(inside(name, b) for b in blocks) or not _bank_size(mod):
            continue
        owner = name.rsplit(".", 1)[0]
        if not any(inside(b, owner) for b in blocks) and not any(inside(owner, o) for o in owners):
            owners[owner] = model.get_submodule(owner)
    return list(owners.items())
