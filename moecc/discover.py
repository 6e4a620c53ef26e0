"""Find the MoE blocks of a model by structure: the innermost modules that own an expert bank and its router."""

from __future__ import annotations

from torch import nn

from moecc.passes.recognize.block import is_moe_block


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    candidates = {name: mod for name, mod in model.named_modules() if is_moe_block(mod)}
    inner = []
    for name, mod in candidates.items():
        prefix = f"{name}." if name else ""
        if not any(other != name and other.startswith(prefix) for other in candidates):
            inner.append((name, mod))
    return inner
