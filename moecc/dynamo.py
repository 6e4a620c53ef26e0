"""``torch.compile(model, backend="moecc")``: each graph dynamo hands over is compiled by moecc.

The MoE blocks dynamo traced into the graph get their modules back first (``dynamo_blocks.lift_blocks``), so they
are recognized and fused as under ``moecc.compile``; a graph without one runs as dynamo traced it.
``torch.compile(..., options={...})`` takes moecc.compile's backend and options:
``options={"backend": "triton", "cuda_graphs": False}``."""

from __future__ import annotations

import logging
import weakref

from torch import fx

log = logging.getLogger("moecc.dynamo")

_COMPILED: list[weakref.ref] = []


def register_unless_installed() -> None:
    """Name the backend for torch.compile where moecc runs from a source tree: installed, its entry point does
    (and torch._dynamo, which registering imports, takes a second to import)."""
    from importlib.metadata import entry_points

    if "moecc" in entry_points(group="torch_dynamo_backends").names:
        return
    from torch._dynamo import register_backend

    register_backend(moecc_backend, name="moecc")


def compiled_graphs() -> list:
    """The CompiledModules of the graphs torch.compile handed to moecc in this process that are still alive, oldest
    first: ``[g.moe_layers for g in moecc.dynamo.compiled_graphs()]`` says what each fused, or why not."""
    alive = [ref() for ref in _COMPILED]
    return [c for c in alive if c is not None]


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule of its own over a copy of ``gm``'s graph: dynamo still reads the graph it handed over."""
    from moecc.passes.graph_utils import copy_graph

    return fx.GraphModule(gm, copy_graph(gm.graph))


def moecc_backend(gm: fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    from moecc import api, logs
    from moecc.capture import CaptureHints
    from moecc.dynamo_blocks import lift_blocks
    from moecc.dynamo_inputs import take_inputs
    from moecc.errors import MoeccError

    if mode not in (None, "default"):
        raise ValueError(f"torch.compile(backend='moecc') takes no mode ({mode!r}); moecc's Triton backend replays "
                         "CUDA graphs for small token counts by itself (options={'cuda_graphs': False} turns that off)")
    options = dict(options or {})
    backend = options.pop("backend", "auto")
    dump_dir = options.pop("dump_dir", None)
    api._check_args(gm, backend, dump_dir, options)
    logs.configure()
    original = gm
    lifted = lift_blocks(_copy(gm), example_inputs)
    for name, why in lifted.unfused.items():
        log.warning("MoE block %s runs as dynamo traced it: %s", name, why)
    for name, (bank, why) in lifted.routed.items():
        log.info("MoE block %s runs as dynamo traced it (%s), but for its experts %s, given back alone", name, why,
                 bank)
    if not lifted.blocks:
        log.info("torch.compile graph of %d nodes: no MoE block, run as dynamo traced it", len(gm.graph.nodes))
        return gm.forward
    log.info("torch.compile graph: MoE blocks %s given back their modules", ", ".join(lifted.blocks))
    gm = lifted.gm
    gm.training = False  # dynamo traced the model in its own mode; the check's messages read this flag
    inputs = take_inputs(gm, example_inputs)
    compiled = api.compile(gm, backend=backend, dump_dir=dump_dir, **options)
    compiled.hints = CaptureHints(inputs.dynamic_dims, dict(lifted.unfused), dict(lifted.routed))
    _COMPILED.append(weakref.ref(compiled))

    traced = original.forward
    failed = False

    def run(*args):
        nonlocal failed
        if failed:
            return traced(*args)
        try:
            return compiled(*inputs.select(gm, args))
        except MoeccError as exc:
            # torch.compile promises the model's numbers: a graph moecc cannot compile runs as dynamo traced it
            failed = True
            log.warning("moecc could not compile a torch.compile graph holding MoE blocks %s, which runs as dynamo "
                        "traced it from now on: %s", ", ".join(lifted.blocks), exc)
            return traced(*args)

    return run
