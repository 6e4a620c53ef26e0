"""Hugging Face KV caches through a compiled forward: what a call with a cache needs from the runtime.

A capture sees only tensors, so a ``DynamicCache`` travels as its key and value tensors (Hugging Face's own pytree
registration for ``torch.export``, which ``register`` turns on). A cache's length then is a symbolic dim of those
tensors: one capture serves every decode step. Eager code updates the caller's cache object in place, and
``generate`` relies on it; a compiled call returns a new cache, whose tensors ``write_back`` moves into the caller's.

Only a ``DynamicCache`` whose layers are all plain ``DynamicLayer`` is taken. A sliding-window layer keeps a Python
count of the tokens it has seen (``cumulative_length``) that its tensors do not carry, so a capture would rebuild it
wrong once the window is full; other caches (an encoder-decoder's, a static one, a hybrid model's) are no pytree
nodes and would be constants of the capture. ``unsupported`` says why such a cache is refused."""

from __future__ import annotations

import sys

from torch.utils import _pytree as pytree

_registered = False


def _cache_types() -> tuple[type, type, type] | None:
    """(Cache, DynamicCache, DynamicLayer) when transformers is loaded (never imported here for models that are not
    its)."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    if cache_utils is None or not hasattr(cache_utils, "DynamicLayer"):
        return None
    return cache_utils.Cache, cache_utils.DynamicCache, cache_utils.DynamicLayer


def register() -> bool:
    """Make ``DynamicCache`` a pytree node (Hugging Face's registration, idempotent); False without transformers."""
    global _registered
    if _registered:
        return True
    if _cache_types() is None:
        return False
    from transformers.integrations.executorch import register_dynamic_cache_export_support

    register_dynamic_cache_export_support()
    _registered = True
    return True


def is_cache(value) -> bool:
    """Any Hugging Face cache object (``unsupported`` says which of them a compiled call takes)."""
    types = _cache_types()
    return types is not None and isinstance(value, types[0])


def caches_in(tree) -> list:
    """The Hugging Face cache objects in a call's arguments or outputs, in pytree order."""
    if _cache_types() is None:
        return []
    return [v for v in pytree.tree_leaves(tree, is_leaf=is_cache) if is_cache(v)]


def unsupported(cache) -> str | None:
    """Why a compiled call cannot take ``cache``, or None. Only a ``DynamicCache`` itself is a pytree node: any
    other cache (a subclass included) would be a constant of the capture."""
    _, cache_type, layer_type = _cache_types()
    if type(cache) is not cache_type:
        return (f"its cache is a {type(cache).__name__}; moecc compiles calls with a DynamicCache of plain "
                "DynamicLayer layers only")
    kinds = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not layer_type})
    if kinds:
        return (f"its cache has {', '.join(kinds)} layers, whose state is more than their tensors (a sliding window "
                "counts the tokens it has seen); moecc compiles calls with plain DynamicLayer caches only")
    if getattr(cache, "offloading", False):
        return "its cache offloads layers to the CPU, which a captured program cannot do"
    return None


def write_back(inputs: list, result):
    """Move each new cache of ``result`` into the caller's cache object it replaces (pairs in order, when the call
    passed as many caches as it returns) and return ``result`` holding the caller's objects, as eager does."""
    outputs = caches_in(result)
    if not inputs or len(outputs) != len(inputs):
        return result
    for old, new in zip(inputs, outputs):
        old.layers = new.layers
    mapping = {id(new): old for old, new in zip(inputs, outputs)}
    if isinstance(result, dict):  # a ModelOutput keeps its class when its fields are set in place
        for key, value in list(result.items()):
            if id(value) in mapping:
                result[key] = mapping[id(value)]
        return result
    return pytree.tree_map(lambda v: mapping.get(id(v), v), result, is_leaf=is_cache)
