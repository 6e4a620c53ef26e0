"""Whether the blocks left as written export to ONNX, asked of each block alone before the whole program.

A block left as written is exported by tracing its Python code, which fails for data-dependent expert loops and
for ops with no ONNX function (Hugging Face's ``grouped_mm`` experts on the CPU). Inside the whole program that
failure comes after everything else was traced and decomposed (17 s of a 4-layer model's 43 s compile); the
block alone fails in a fraction of it, and the program then goes straight to the split (``islands``).

One call per block class is probed: calls of one class run the same code. A probe that passes decides nothing:
the whole program is exported as before."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable

import torch
from torch import fx

from moecc.capture_cache import ValueInfo
from moecc.errors import first_line
from moecc.passes.graph_utils import block_path

log = logging.getLogger("moecc.codegen.onnx")


def block_program(gm: fx.GraphModule, call: fx.Node) -> fx.GraphModule | None:
    """A program of ``call`` alone, taking the tensors it reads; None where it reads a value that is no tensor
    (a size, a tuple), which no ONNX graph takes."""
    graph = fx.Graph()
    inputs: dict[fx.Node, fx.Node] = {}
    for value in call.all_input_nodes:
        if not isinstance(value.meta.get("val"), (torch.Tensor, ValueInfo)):
            return None
        inputs[value] = graph.placeholder(value.name)
        inputs[value].meta = dict(value.meta)
    graph.output(graph.node_copy(call, lambda value: inputs[value]))
    return fx.GraphModule(gm, graph)


class _AllReached(Exception):
    pass


class _CallInputs(fx.Interpreter):
    """Runs the program on example inputs up to the last of ``calls``, noting the tensors each reads."""

    def __init__(self, gm: fx.GraphModule, calls: list[fx.Node]) -> None:
        super().__init__(gm)
        self.calls = set(calls)
        self.inputs: dict[fx.Node, list] = {}

    def run_node(self, n: fx.Node):
        if n in self.calls:
            self.inputs[n] = [self.env[value] for value in n.all_input_nodes]
            if len(self.inputs) == len(self.calls):
                raise _AllReached
        return super().run_node(n)


def probed_calls(gm: fx.GraphModule, calls: list[fx.Node]) -> list[fx.Node]:
    """The first call of each block class among ``calls``."""
    first: dict[type, fx.Node] = {}
    for call in calls:
        first.setdefault(type(gm.get_submodule(call.target)), call)
    return list(first.values())


def block_that_does_not_export(gm: fx.GraphModule, example: list, calls: list[fx.Node], folder: str,
                               export: Callable[[fx.GraphModule, list, str], str]) -> str | None:
    """Why one of the blocks ``calls`` cannot go into an ONNX graph, found by ``export(program, example, path)``
    of each probed block alone (in a folder inside ``folder``, removed after); None where each exports or none
    can be cut out alone."""
    programs = {call: program for call in probed_calls(gm, calls)
                if (program := block_program(gm, call)) is not None}
    if not programs:
        return None
    recorder = _CallInputs(gm, list(programs))
    try:
        with torch.no_grad():
            recorder.run(*example)
    except _AllReached:
        pass
    except Exception as exc:  # noqa: BLE001 - no verdict: the whole export decides, as without the probe
        log.debug("the blocks left as written were not probed: the program failed on its example (%s)",
                  first_line(exc))
        return None
    with tempfile.TemporaryDirectory(prefix="probe_", dir=folder) as probes:
        for i, (call, program) in enumerate(programs.items()):
            os.makedirs(os.path.join(probes, str(i)))
            try:
                export(program, recorder.inputs[call], os.path.join(probes, str(i), "model.onnx"))
            except (OSError, MemoryError):
                raise  # the machine's, not the block's
            except Exception as exc:  # noqa: BLE001 - any other failure of the block alone is the reason to split
                return f"{block_path(call)} does not export to ONNX alone: {first_line(exc)}"
            log.debug("%s exports to ONNX alone", block_path(call))
    return None
