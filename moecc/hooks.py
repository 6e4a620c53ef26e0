"""Forward hooks: those an MoE block holds stay outside its leaf in a capture, and a compiled model notices hooks
added or removed after compile.

``torch.export`` runs a module's forward hooks while it traces, so what a hook computes becomes part of the program,
and a hook added or removed later is not. A block's leaf runs the block as ``block(...)``, hooks and all, so the
capture leaves the block's own hooks out of what it traces (``set_aside``) and recognition leaves such a block as
written (a fused block would not run them). Hugging Face's output recorders are traced instead (``own_hooks``)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import weakref
from collections.abc import Iterable, Iterator

from torch import nn
from torch.nn.modules import module as module_mod
from torch.utils.hooks import RemovableHandle

log = logging.getLogger("moecc.capture")

# a hook's extra flags live in dicts keyed by the same handle ids; emptied and refilled with the hooks themselves
_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called")


def forward_hooks(module: nn.Module) -> tuple[tuple, tuple]:
    """The handle ids of ``module``'s forward pre-hooks and forward hooks."""
    return tuple(module._forward_pre_hooks), tuple(module._forward_hooks)


def _global_hooks() -> tuple[tuple, tuple]:
    return tuple(module_mod._global_forward_pre_hooks), tuple(module_mod._global_forward_hooks)


RECORDER_MODULE = "transformers.utils.output_capturing"


def recording_hook(hook) -> bool:
    """A Hugging Face output recorder: it appends a module's output to the model's collection of outputs (hidden
    states, router logits) during a call that asks for them, and does nothing at any other time."""
    return getattr(hook, "__module__", None) == RECORDER_MODULE


def own_hooks(module: nn.Module) -> tuple[list, list]:
    """``module``'s forward pre-hooks and forward hooks other than output recorders: those a fused block would not
    run. A recorder stays in what capture traces around the block's leaf, so the program records what it records;
    at run time, with no collection asked for, the one the leaf's call runs does nothing."""
    pre, post = forward_hooks(module)
    return ([i for i in pre if not recording_hook(module._forward_pre_hooks[i])],
            [i for i in post if not recording_hook(module._forward_hooks[i])])


def _collector():
    """Hugging Face's context variable of the outputs a call records, where transformers is loaded and has one."""
    collector = getattr(sys.modules.get(RECORDER_MODULE), "_active_collector", None)
    return collector if all(hasattr(collector, f) for f in ("get", "set", "reset")) else None


def _recorded_key(hook) -> str | None:
    """The output a recorder adds to (``router_logits``), read from its closure; None where it cannot be read."""
    code, cells = getattr(hook, "__code__", None), getattr(hook, "__closure__", None) or ()
    names = dict(zip(getattr(code, "co_freevars", ()), cells))
    try:
        key = names["key"].cell_contents
    except (KeyError, ValueError):
        return None
    return key if isinstance(key, str) else None


def records_inside(module: nn.Module) -> bool:
    """Whether the running Hugging Face call records an output that a recorder on a module inside ``module`` (not
    ``module`` itself) adds to: the router's logits of a call with ``output_router_logits=True``, say."""
    collector = _collector()
    asked = collector.get() if collector is not None else None
    if not asked:
        return False
    for m in module.modules():
        if m is module:
            continue
        for hook in itertools.chain(m._forward_pre_hooks.values(), m._forward_hooks.values()):
            if recording_hook(hook) and ((key := _recorded_key(hook)) is None or key in asked):
                return True
    return False


@contextlib.contextmanager
def recording_paused() -> Iterator[None]:
    """Run the body with Hugging Face's output recording off: a compile inside a recording call (a block compiled
    at its first call, while the model runs as written) calls the block many times, and each call's recorders would
    add to the call's outputs."""
    collector = _collector()
    if collector is None or collector.get() is None:
        yield
        return
    token = collector.set(None)
    try:
        yield
    finally:
        collector.reset(token)


@contextlib.contextmanager
def set_aside(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run the body with these modules' forward hooks and pre-hooks removed, but output recorders (``own_hooks``),
    then put them back in their order."""
    kept = []
    for module in {id(m): m for m in modules}.values():
        gone = set(itertools.chain(*own_hooks(module)))
        for name in _DICTS:
            hooks = getattr(module, name, None)
            if hooks:
                kept.append((hooks, dict(hooks)))
                for i in gone & hooks.keys():
                    del hooks[i]
    try:
        yield
    finally:
        for hooks, before in kept:
            hooks.clear()
            hooks.update(before)


class HookWatch:
    """Whether forward hooks of a model's modules (or global module hooks) were added or removed since it was made.
    A check costs one integer comparison while no hook was registered anywhere (every registration takes a new
    handle id), a length per hook dict that held hooks at the start (a removal; Hugging Face models hold their
    output-recording hooks on every layer), and a pass over every module only after some registration."""

    __slots__ = ("_next_id", "_all", "_held", "_global")

    def __init__(self, model: nn.Module) -> None:
        self._next_id = RemovableHandle.next_id
        self._all = [(name, m, forward_hooks(m)) for name, m in model.named_modules()]
        self._held = [(name, d, len(d)) for name, m, _ in self._all
                      for d in (m._forward_pre_hooks, m._forward_hooks) if d]
        self._global = _global_hooks()

    def changed(self) -> str | None:
        """Where hooks changed: ``forward hooks of <path>`` (``of the model`` for the root, ``global forward
        hooks``), else None."""
        for name, hooks, count in self._held:
            if len(hooks) != count:
                return _where(name)
        if RemovableHandle.next_id == self._next_id:
            return None
        for name, module, ids in self._all:
            if forward_hooks(module) != ids:
                return _where(name)
        if _global_hooks() != self._global:
            return "global forward hooks"
        self._next_id = RemovableHandle.next_id  # hooks of something else (a tensor, another model)
        return None


def _where(name: str) -> str:
    return f"forward hooks of {name}" if name else "forward hooks of the model"


_TOLD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# hooks whose library means them to be traced: Hugging Face's output recorders (inactive unless a call asks for
# hidden states or router logits, which capture handles) and torch's own
_LIBRARIES = ("transformers.", "torch.")


def _library_hook(hook) -> bool:
    return (getattr(hook, "__module__", None) or "").startswith(_LIBRARIES)


def tell_traced(model: nn.Module) -> None:
    """Warn, once per model and set of hooks, that forward hooks run while the model is captured: what they return
    is part of the program, but what else they do (record an activation, print) may not happen at each call."""
    users = tuple((name, ids) for name, m in model.named_modules()
                  if (ids := tuple(i for d in (m._forward_pre_hooks, m._forward_hooks) for i, h in d.items()
                                   if not _library_hook(h))))
    held = [name or "the model" for name, _ in users]
    if _global_hooks() != ((), ()):
        held.append("every module (global hooks)")
    if not held:
        return
    # the user's hooks only: a library's recorders, installed between two captures, are no news
    seen = (users, _global_hooks())
    if _TOLD.get(model) == seen:
        return
    _TOLD[model] = seen
    more = f" and {len(held) - 5} more" if len(held) > 5 else ""
    log.warning("%s has forward hooks on %s%s. They run while it is captured: what they return is part of the "
                "program, but anything else they do (recording an activation, printing) may not happen at each "
                "call. Hooks added or removed later make it compile again.", type(model).__name__,
                ", ".join(held[:5]), more)
