"""A block called with arguments besides its hidden states (DeepSeek-V4 hands every MoE block the token ids):
the canonical ops read the hidden states only, so such a block is lifted when its outputs are shown not to depend
on the others, or when only a router module kept as written reads them (``OtherArgs`` feeds them to it).

The evidence of independence is the block's own example call, recorded at capture: the block called with its
hidden states alone must give the outputs it gives with each of three versions of the other arguments (as they
were, all zeros, and their values shuffled). A mask or a padding flag shows itself through the zeros, token ids
through the shuffle."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import _pytree as pytree

from moecc.match import MatchResult
from moecc.passes.recognize.probe import close, tensor_leaves


def _variants(others: list, generator: torch.Generator):
    yield "as called", others
    yield "zeros", [torch.zeros_like(t) if isinstance(t, torch.Tensor) else t for t in others]
    yield "shuffled", [t.flatten()[torch.randperm(t.numel(), generator=generator).to(t.device)].reshape(t.shape)
                       if isinstance(t, torch.Tensor) and t.numel() > 1 else t for t in others]


def independent_of_other_args(block: nn.Module, call: tuple | None, names: str) -> MatchResult[None]:
    """Success when ``block(x)`` equals ``block(*args, **kwargs)`` of its example ``call`` (x its first positional
    argument), however the other arguments are varied; ``names`` describes them in a reason."""
    if call is None:
        return MatchResult.fail(f"block is called with other arguments ({names}) whose example values moecc did not "
                                "record")
    args, kwargs = call
    leaves, spec = pytree.tree_flatten((args[1:], kwargs))
    g = torch.Generator().manual_seed(7)
    x = args[0]
    scale = max(float(x.float().std()), 1e-3) if x.numel() > 1 else 1.0
    fresh = (torch.randn(x.shape, generator=g) * scale).to(x)
    with torch.no_grad():
        for hidden in (x, fresh):
            try:
                alone = tensor_leaves(block(hidden))
            except Exception as exc:  # noqa: BLE001 - the block needs its other arguments
                why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
                return MatchResult.fail(f"block's outputs need its other arguments ({names}): called without them "
                                        f"it fails ({why})")
            for what, values in _variants(leaves, g):
                other_args, other_kwargs = pytree.tree_unflatten(values, spec)
                full = tensor_leaves(block(hidden, *other_args, **other_kwargs))
                if len(full) != len(alone) or not all(close(a, b) for a, b in zip(alone, full)):
                    return MatchResult.fail(f"block's outputs depend on its other arguments ({names}; seen with "
                                            f"them {what}); the canonical form reads the hidden states only")
    return MatchResult.success(None)


class OtherArgs:
    """A block's arguments besides its hidden states, from its example call, redrawn for probe inputs of other
    shapes: a tensor whose leading dims are the hidden states' token dims (token ids, say) gets fresh values of
    its kind at the probe's token dims (ids below the example's largest), any other argument stays as it was.
    ``positions``: where the token-shaped tensors sit among the flat leaves of ``(args[1:], kwargs)``, in the
    example call as in the captured call node."""

    def __init__(self, call: tuple):
        args, kwargs = call
        self.x = args[0]
        self.leaves, self.spec = pytree.tree_flatten((args[1:], kwargs))
        lead = tuple(self.x.shape[:-1])
        self.positions = tuple(i for i, v in enumerate(self.leaves) if isinstance(v, torch.Tensor)
                               and tuple(v.shape[:len(lead)]) == lead and v.dim() >= len(lead))

    def for_input(self, x: torch.Tensor, seed: int) -> tuple[tuple, dict, list[torch.Tensor]]:
        """(args after x, kwargs, the token-shaped tensors among them) to call the block with on ``x``."""
        g = torch.Generator().manual_seed(seed)
        leaves = list(self.leaves)
        lead = self.x.dim() - 1
        for i in self.positions:
            v = leaves[i]
            shape = (*x.shape[:-1], *v.shape[lead:])
            if v.is_floating_point():
                new = torch.randn(shape, generator=g) * (float(v.float().std()) if v.numel() > 1 else 1.0)
            elif v.numel() and v.max() > 1:
                new = torch.randint(0, int(v.max()) + 1, shape, generator=g)
            else:  # a mask or flag: its first value everywhere
                new = torch.full(shape, v.flatten()[0].item() if v.numel() else 0)
            leaves[i] = new.to(device=v.device, dtype=v.dtype)
        rest, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return tuple(rest), kwargs, [leaves[i] for i in self.positions]
