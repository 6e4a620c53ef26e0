"""What recognition found for a block, kept for the model's later captures.

A compiled model captures again for each new kind of call: a batch or a sequence of one, a decode step of
``generate``, a weight changed since compile. Its blocks are the same modules; probing them again (a second or more
per block, many for a failed search over a stacked bank) finds the same analysis while nothing it read has changed:
the block's parameters, buffers and tensor attributes (by version and address), its modules' classes, hooks and
plain settings (``top_k``, ``norm_topk_prob``) and the functions put on them, as well as the structure and the
call the recognizer keys its work by."""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor, nn

from moecc.logs import quiet_deepcopy
from moecc.match import MatchResult

_SETTING_TYPES = (bool, int, float, str)


def stamp(block: nn.Module) -> tuple | None:
    """What a block's analysis read of it, as a value that changes when any of it changes; None where a tensor
    made under ``torch.inference_mode()`` has no version counter to tell an update in place."""
    parts = []
    for module in block.modules():
        tensors = [*module._parameters.values(), *module._buffers.values(),
                   *(v for v in vars(module).values() if isinstance(v, Tensor))]
        for t in tensors:
            if t is None:
                continue
            if t.is_inference():
                return None
            try:
                parts.append((t._version, t.data_ptr(), t.device, t.dtype))
            except RuntimeError:  # a tensor without storage (a subclass): nothing tells its updates
                return None
        parts.append((type(module), tuple(module._forward_hooks), tuple(module._forward_pre_hooks),
                      # a ``forward`` on the instance is moecc's own while a blockwise call routes the block
                      tuple((k, _setting(v)) for k, v in vars(module).items()
                            if not k.startswith("_") and k != "forward")))
    return tuple(parts)


def _setting(v):
    """A plain attribute as itself; a function put on the module (an activation) by identity; anything else (a
    config, a module, a tensor: those are stamped apart) as nothing."""
    if type(v) in _SETTING_TYPES:
        return v
    if isinstance(v, (tuple, list)) and all(type(x) in _SETTING_TYPES for x in v):
        return tuple(v)
    if callable(v) and not isinstance(v, (nn.Module, Tensor, type)):
        return id(v)
    return None


class RecognitionMemo:
    """block -> (its stamp, {call key: MatchResult}), for blocks whose call reads nothing but their hidden states.
    Held by one compiled model: a result holds the block's tensors, which live as long as the model does."""

    def __init__(self) -> None:
        self._found: dict[int, tuple[nn.Module, tuple, dict]] = {}

    def __deepcopy__(self, memo: dict) -> RecognitionMemo:
        # a copy of a compiled model has blocks of its own, and the analyses hold views of the model's parameters
        # made under no_grad, which torch refuses to copy once their base changed in place
        return RecognitionMemo()

    def __getstate__(self) -> dict:
        return {"_found": {}}

    def get(self, block: nn.Module, key: tuple):
        held = self._found.get(id(block))
        if held is None or held[0] is not block or held[1] != stamp(block):
            return None
        found = held[2].get(key)
        return None if found is None else _fresh(found)

    def put(self, block: nn.Module, key: tuple, result) -> None:
        now = stamp(block)
        if now is None:
            return
        held = self._found.get(id(block))
        if held is None or held[0] is not block or held[1] != now:
            held = self._found[id(block)] = (block, now, {})
        held[2][key] = _fresh(result)


def _fresh(result: MatchResult) -> MatchResult:
    """``result`` with programs of its own: the passes after ``recognize`` rewrite the router and logits programs a
    capture inlines (``cleanup`` drops what fusion left unused), so a kept analysis holds copies that no capture
    touches, and gives each capture copies of those."""
    a = result.value if result else None
    if a is None or (a.router_program is None and a.logits_program is None):
        return result
    return MatchResult.success(replace(a, router_program=quiet_deepcopy(a.router_program),
                                      logits_program=quiet_deepcopy(a.logits_program)))
