"""Blockwise programs: the model runs as written, each MoE block as a program of its own.

Where ``torch.export`` cannot capture the whole model (control flow on tensor values outside the MoE blocks,
``.item()``, a NumPy round trip), the model cannot become one program; its MoE blocks still can, since capture
keeps each one opaque. Each block is then compiled alone, as a model of one block (``BlockCall``): recognition,
passes, lowering and the check on fresh inputs are the same as for a whole model. While the compiled model runs,
each block's ``forward`` is routed to its program; outside those calls the model is untouched. A block whose
compile fails runs as written, with a warning saying why, and so does a block whose internals the model reads
(``observed`` by capture: a fused block does not compute them apart)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable

from torch import nn

from moecc import hooks
from moecc.errors import MoeccError, first_line
from moecc.ir import MoELayerInfo

log = logging.getLogger("moecc.runtime")


class BlockCall(nn.Module):
    """One MoE block as a model: its calls, its outputs."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return self.block(*args, **kwargs)


class Blockwise:
    """Routes each of ``blocks`` to a program that ``compile_block(BlockCall, name)`` makes (a ``CompiledModule``,
    compiled on the block's first call) while a model runs (``routed``). ``unfused``: blocks that run as written,
    and why."""

    def __init__(self, blocks: list[tuple[str, nn.Module]], compile_block: Callable[[nn.Module, str], nn.Module],
                 unfused: dict[str, str]):
        self.blocks = dict(blocks)
        self.programs = {name: compile_block(BlockCall(block), name) for name, block in blocks}
        self.unfused = dict(unfused)
        self._inside: set[str] = set()  # blocks whose program is running
        self._told_recording: set[str] = set()

    @contextlib.contextmanager
    def routed(self):
        """Each block's ``forward`` routed to its program while the model runs."""
        saved = {}
        for name, block in self.blocks.items():
            saved[name] = vars(block).get("forward")
            block.forward = self._router(name, block.forward)
        try:
            yield
        finally:
            for name, block in self.blocks.items():
                if saved[name] is None:
                    del block.forward
                else:
                    block.forward = saved[name]

    def _router(self, name: str, own):
        def forward(*args, **kwargs):
            program = self.programs.get(name)
            # the program's compile (capture, recognition probes, the check) and a program that left the block as
            # written call the block itself
            if program is None or name in self._inside:
                return own(*args, **kwargs)
            block = self.blocks[name]
            if hooks.records_inside(block):
                # the call records outputs of modules inside the block (its router's logits) by their hooks, which
                # the block's program does not run: this call runs the block as written
                if name not in self._told_recording:
                    self._told_recording.add(name)
                    log.info("MoE block %s runs as written in calls that record outputs of its modules (Hugging "
                             "Face's output_router_logits, say): its program does not run their hooks", name)
                return own(*args, **kwargs)
            self._inside.add(name)
            try:
                with hooks.recording_paused():  # the compile's calls of the block, and the program's, record nothing
                    return program(*args, **kwargs)
            except MoeccError as exc:
                log.warning("MoE block %s runs as written: %s", name, first_line(exc))
                del self.programs[name]
                self.unfused[name] = f"its compile failed: {first_line(exc)}"
                return own(*args, **kwargs)
            finally:
                self._inside.discard(name)

        return forward

    @property
    def layers(self) -> list[MoELayerInfo]:
        """One record per block, named by its path in the model."""
        out = [MoELayerInfo(name=name, reason=why) for name, why in self.unfused.items()]
        for name, program in self.programs.items():
            # the program's records name its blocks inside ``BlockCall``: "block", or "block.<sub>"
            out += [dataclasses.replace(info, name=f"{name}{info.name.removeprefix('block')}")
                    for info in program.moe_layers]
        return out
