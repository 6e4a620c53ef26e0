"""Keyword arguments in the order a capture flattened them: a Python call may name them in any order, and pytree
specs of dicts compare their keys in order."""

from __future__ import annotations

import torch.utils._pytree as pytree


def keyword_order(spec: pytree.TreeSpec) -> tuple[str, ...] | None:
    """The keys of the keyword arguments of ``spec``, a flattened ``(args, kwargs)``; None for another structure."""
    if spec.type is not tuple or spec.num_children != 2:
        return None
    kwargs = spec.child(1) if hasattr(spec, "child") else spec.children_specs[1]  # child() from torch 2.12 on
    return tuple(kwargs.context) if kwargs.type is dict else None


def in_order(kwargs: dict, order: tuple[str, ...] | None) -> dict:
    """``kwargs`` with its keys in ``order`` when it names the same keys, else ``kwargs`` unchanged."""
    if order is None or tuple(kwargs) == order or len(kwargs) != len(order) or set(kwargs) != set(order):
        return kwargs
    return {k: kwargs[k] for k in order}
