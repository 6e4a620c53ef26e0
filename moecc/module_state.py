"""The state a module's call can change: its buffers (a step counter, an expert-load statistic) and the tensors it
is handed (a cache written in place).

Compiling calls the model many times (the capture, recognition's probes, the check on fresh inputs). Those calls
must leave the model and the caller's tensors as they found them, so that the first compiled call changes them once,
as an eager call does (``kept``). A block whose call changes its own buffers is no canonical block: the fused ops
would compute its outputs and never update them (``StateSnapshot.changed``)."""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn

log = logging.getLogger("moecc.state")

# the copies a snapshot keeps, smallest tensors first, add up to at most this: a quantized model holds its weights
# as buffers (GBs), which no call writes; the others' version counters still tell whether a call changed them, but
# such a change cannot be undone
COPY_BUDGET_BYTES = 256 << 20


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(),
                                                                                       b.nan_to_num())


@dataclass
class _Kept:
    owner: nn.Module | None  # the module holding it as a buffer, or None for a tensor handed to the call
    name: str
    tensor: torch.Tensor
    version: int | None
    copy: torch.Tensor | None
    path: str = ""  # the buffer's path in the module snapshot was taken of

    @classmethod
    def of(cls, owner: nn.Module | None, name: str, t: torch.Tensor, copied: bool) -> _Kept:
        return cls(owner, name, t, _version(t), t.detach().clone() if copied else None)

    def changed(self) -> bool:
        if self.owner is not None and self.owner._buffers.get(self.name) is not self.tensor:
            return True
        if self.version is not None and _version(self.tensor) == self.version:
            return False
        if self.copy is not None:
            return not _same(self.tensor, self.copy)
        return self.version is not None

    def restore(self) -> None:
        if self.owner is not None:
            self.owner._buffers[self.name] = self.tensor
        if self.copy is None:
            log.warning("%s changed while compiling, and did not fit in the copies kept of the model's state (%d "
                        "MiB in all, smallest first): it keeps the change", self.path or self.name,
                        COPY_BUDGET_BYTES >> 20)
        elif self.tensor.shape != self.copy.shape:
            self.tensor.set_(self.copy)
        else:
            self.tensor.copy_(self.copy)


class StateSnapshot:
    """A module's buffers and some tensors as they were: which changed since, and putting them back."""

    def __init__(self, module: nn.Module, tensors: Iterable[torch.Tensor] = ()) -> None:
        paths = {id(buf): name for name, buf in module.named_buffers(remove_duplicate=False)}
        found = [(owner, name, buf) for owner in module.modules() for name, buf in owner._buffers.items()
                 if buf is not None]
        seen = {id(buf) for *_, buf in found}
        for i, t in enumerate(tensors):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                found.append((None, f"input tensor {i}", t))
        copied, budget = set(), COPY_BUDGET_BYTES
        for _, _, t in sorted(found, key=lambda f: _nbytes(f[2])):
            if _nbytes(t) > budget:
                break
            budget -= _nbytes(t)
            copied.add(id(t))
        self.kept = [_Kept.of(owner, name, t, id(t) in copied) for owner, name, t in found]
        for k in self.kept:
            k.path = paths.get(id(k.tensor), k.name)

    def changed(self) -> list[str]:
        """The module paths of the buffers updated in place or assigned anew since the snapshot."""
        return [k.path for k in self.kept if k.owner is not None and k.changed()]

    def restore(self) -> None:
        with torch.no_grad():
            for k in self.kept:
                if k.changed():
                    k.restore()


@contextlib.contextmanager
def kept(module: nn.Module, tensors: Iterable[torch.Tensor] = ()) -> Iterator[StateSnapshot]:
    """Run the body, then put ``module``'s buffers and ``tensors`` back as they were before it."""
    snapshot = StateSnapshot(module, tensors)
    try:
        yield snapshot
    finally:
        snapshot.restore()


def _written_root(node):
    """The placeholder or attribute a write into ``node`` lands in, through views of it; None for a tensor the
    program made itself."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        returns = schema.returns if schema is not None else ()
        if not returns or returns[0].alias_info is None or not node.args:
            return None
        node = node.args[0]  # a view (or an in-place op's result): the tensor it aliases
    return node if isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr") else None


def program_writes(program) -> list[str]:
    """The inputs (by placeholder name) and attributes (by path) a program (a GraphModule; anything else writes
    none) writes into in place. A replay of a CUDA graph copies its inputs in and runs its warm-up calls unseen, so
    such a program runs as launched; ONNX Runtime returns new arrays, so it is not lowered there."""
    if not isinstance(program, fx.GraphModule):
        return []
    written = {}
    for node in program.graph.nodes:
        targets = []
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            schema = node.target._schema
            for i, arg in enumerate(schema.arguments):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    targets.append(node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
        elif node.op == "call_function" and node.target is operator.setitem and node.args:
            targets.append(node.args[0])
        elif node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_") and node.args:
            targets.append(node.args[0])
        for t in targets:
            root = _written_root(t)
            if root is not None:
                written[root.target if root.op == "get_attr" else root.name] = None
    return list(written)
