"""CompiledModule: captures on the first call, then runs the compiled graph; re-captures per shape bucket."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from moecc import knobs, module_state
from moecc.autocast import autocast_state
from moecc.capture import CaptureHints, capture, forget_calls
from moecc.capture_reads import Read, baked
from moecc.codegen.lower import EXPERT_LAYOUT, lower, resolve_backend
from moecc.errors import BackendError, CacheError, CaptureError, DisagreementError, ExportError, MoeccError
from moecc.ir import MoELayerInfo
from moecc.logs import quiet, quiet_deepcopy, slow_step
from moecc.passes import DumpIR, PassManager, Recognize, Timing, default_pipeline
from moecc.passes.base import layers_of
from moecc.passes.graph_utils import blocks_left_as_written
from moecc.passes.recognize import REFUSED_ROUTING
from moecc.passes.recognize.routed import forget_reads
from moecc.report import graph_summary
from moecc.runtime import kv_cache
from moecc.runtime.blockwise import Blockwise
from moecc.runtime.cudagraphs import GraphCache, graphed_ops, replays
from moecc.runtime.direct import direct_calls
from moecc.runtime.keywords import in_order, keyword_order
from moecc.runtime.localize import capture_to_blame, verify_leaving_blocks
from moecc.runtime.turns import runs_alone
from moecc.runtime.verify import tie_breaking_ops, verify
from moecc.runtime.weights import (
    WeightWatch,
    called_live,
    offloaded_calls,
    plain_attributes,
    written_by_calls,
)

log = logging.getLogger("moecc.runtime")

WATCH_COST_WARNING_S = 5e-4  # a weight check this long is a tenth of a decode step or more


@dataclass
class _Entry:
    gm: fx.GraphModule | nn.Module  # the lowered program: a GraphModule or a backend's runner
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    tensor_pos: list[int]
    consts: list
    shapes: list[tuple]  # per tensor input: int for a static dim, None for a symbolic one
    symbols: list[tuple]  # per tensor input: the size of a symbolic dim as a string ("s0"), else None
    dtypes: list[torch.dtype]
    layers: dict
    backend: str
    example_inputs: list  # the flat inputs of the capture
    # per tensor input, per dim: the smallest size a symbolic dim was traced for (export assumes 2 and more: a
    # size of 0 or 1 may take other branches and broadcasts), 0 for a static dim
    lowest: list[tuple]
    weights: WeightWatch  # whether the model changed its parameters since the program was built from them
    graphs: GraphCache | None = None  # CUDA graphs per input shape (decode fast path)
    runner: object = None  # what calls run: ``gm`` with its moecc ops called directly (``direct_calls``)
    op_graphs: object = None  # ``runner`` with a CUDA graph per moecc op call (``graphed_ops``): calls with a KV cache
    autocast: tuple = ()  # the autocast regions of the calls it was captured for (``autocast_state``)
    settings_of: list = field(default_factory=list)  # the MoE layers whose settings ``weights`` watches
    reads: list[Read] = field(default_factory=list)  # the plain settings the capture's eager call read

    def __post_init__(self) -> None:
        self.writes = module_state.program_writes(self.gm)  # a program writing its inputs replays no graph
        # nor does one calling a block whose weights its hooks load at each call: a graph replays no host work (and
        # such calls take turns, ``_forward``)
        self.calls_offloaded = bool(offloaded_calls(self.gm))
        if self.runner is None:
            self.runner = direct_calls(self.gm)
        # positional tensors only: calls are matched without flattening (pytree's flatten took 9 us of a 79 us
        # decode call on an H100 host)
        n = len(self.tensor_pos)
        plain = self.tensor_pos == list(range(n)) and len(self.consts) == n
        self.plain_arity = n if plain and self.in_spec == pytree.tree_flatten(((0,) * n, {}))[1] else None
        self.keywords = keyword_order(self.in_spec)

    def matches_tensors(self, tensors) -> bool:
        for t, shape, lowest, dtype in zip(tensors, self.shapes, self.lowest, self.dtypes):
            if not isinstance(t, torch.Tensor) or t.dim() != len(shape) or t.dtype != dtype:
                return False
            if any(d < low if s is None else s != d for s, low, d in zip(shape, lowest, t.shape)):
                return False
        return True

    def matches(self, flat: list, spec: pytree.TreeSpec) -> bool:
        return same_structure(flat, spec, self.in_spec, self.consts) and self.matches_tensors(
            [flat[i] for i in self.tensor_pos])


def same_structure(flat: list, spec: pytree.TreeSpec, seen_spec: pytree.TreeSpec, consts: list) -> bool:
    """Whether a call flattened to ``flat, spec`` has the containers ``seen_spec`` and, where it passes no tensor,
    the values ``consts`` (None at a tensor's position)."""
    if spec != seen_spec or len(flat) != len(consts):
        return False
    return all(isinstance(v, torch.Tensor) or (c is not None and _same(v, c)) for v, c in zip(flat, consts))


def data_dependent_sizes(gm: fx.GraphModule) -> list[str]:
    """Nodes whose output sizes depend on tensor values (export's unbacked symbols, ``u0``...), as
    ``node: size``. ONNX Runtime ran JetMoE's expert loop, whose split sizes come from ``tolist()``, with other
    numbers than eager on some inputs; ``backend="auto"`` keeps such programs on torch."""
    found = []
    nodes = [n for m in gm.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes]
    for node in nodes:
        val = node.meta.get("val")
        for v in val if isinstance(val, (list, tuple)) else [val]:
            for d in getattr(v, "shape", ()):
                if not isinstance(d, int) and any(part.startswith("u") for part in re.findall(r"[a-z]+\d+", str(d))):
                    found.append(f"{node.name}: {d}")
                    break
    return found


def _static_size(d) -> int | None:
    """A dim's size when the capture fixed it: an int, or a symbolic size that export specialized to a number (a
    Mamba layer's sequence length, say, which the program then only handles at that length)."""
    if isinstance(d, int):
        return d
    expr = getattr(getattr(d, "node", None), "expr", None)
    return int(expr) if expr is not None and expr.is_number else None


def _lowest_size(d) -> int:
    """The smallest size the capture traced a dim for: 0 for a static dim, else the lower bound export kept for its
    expression (2 for a plain symbol, 3 for ``s0 + 1``), 2 when the graph no longer says (no shape environment,
    or no recorded size at all: ``d`` is None)."""
    if _static_size(d) is not None:
        return 0
    try:
        lower = d.node.shape_env.bound_sympy(d.node.expr).lower
        return max(0, int(lower))
    except Exception:  # noqa: BLE001 - no shape environment (a graph loaded from the capture cache, no size)
        return 2


def cache_argument(model: nn.Module) -> int | None:
    """The position of ``use_cache`` among the model's forward parameters when the model returns a KV cache by
    default (a Hugging Face model whose config says ``use_cache``), else None."""
    if not getattr(getattr(model, "config", None), "use_cache", False):
        return None
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    names = list(params)
    if "use_cache" in names:
        return names.index("use_cache")
    # taken through ``**kwargs`` (an encoder-decoder's forward in transformers 5.x): by keyword only
    return len(names) if any(p.kind is p.VAR_KEYWORD for p in params.values()) else None


def cache_defaults(cache_arg: int | None, args: tuple, kwargs: dict) -> dict:
    """``{"use_cache": False}`` when a call of a model that returns a KV cache by default (``cache_argument``)
    leaves ``use_cache`` out: the logits are the same, and the program does not return every layer's keys and
    values on each call. A call that asks for the cache (``use_cache=True``, a cache passed in) gets it."""
    if cache_arg is None or len(args) > cache_arg or "use_cache" in kwargs:
        return {}
    if any(kv_cache.is_cache(v) for v in (*args, *kwargs.values())):
        return {}
    return {"use_cache": False}


class CompiledModule(nn.Module):
    def __init__(self, model: nn.Module, backend: str, dump_dir: str | None, options: dict):  # noqa: D107
        super().__init__()
        self.original_model = model
        self.backend = backend
        self.dump_dir = dump_dir
        self.options = dict(options)
        self.verify = options.get("verify", knobs.VERIFY.get())
        self._entries: list[_Entry] = []
        self.captures = 0
        self._cache_arg = cache_argument(model)
        self._own_forward = False  # the model's own forward runs: while compiling, and in blockwise calls
        self._told_no_grad = False
        # per call structure that torch.export refused whole: (input spec, its non-tensor values, Blockwise)
        self._blockwise_calls: list[tuple[pytree.TreeSpec, list, Blockwise]] = []
        self._latest: _Entry | Blockwise | None = None  # the last program compiled, whose layers moe_layers gives
        self.hints = CaptureHints()
        # a Hugging Face model's calls may carry a KV cache (``kv_cache``)
        self._takes_caches = getattr(model, "config", None) is not None and kv_cache.register()
        # calls from several threads run one at a time: a capture's tracing state is global, and the program's
        # caches (captures, CUDA graphs and their static buffers) are shared
        self._lock = threading.RLock()

    def __getstate__(self):
        # a lock cannot be pickled (copy.deepcopy of a compiled model pickles it): the copy makes its own
        return {k: v for k, v in super().__getstate__().items() if k != "_lock"}

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    def __deepcopy__(self, memo: dict) -> CompiledModule:
        # what copy.deepcopy does for a class with __getstate__, where torch's warning about copying the pytree
        # specs of its own programs is hushed
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(quiet_deepcopy(self.__getstate__(), memo))
        return new

    @property
    def moe_layers(self) -> list[MoELayerInfo]:
        if isinstance(self._latest, Blockwise):
            return self._latest.layers
        if not self._entries:
            return []
        return list(self._entries[-1].layers.values())

    @property
    def blockwise(self) -> Blockwise | None:
        """The blocks compiled alone for the last call structure torch.export refused whole, if any."""
        return self._blockwise_calls[-1][2] if self._blockwise_calls else None

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            if not self._told_no_grad:
                self._told_no_grad = True
                log.warning("moecc programs are for inference: the outputs of %s carry no gradient (its MoE ops have "
                            "no backward). Call it under torch.no_grad() or torch.inference_mode(); to train, call the "
                            "model itself", type(self.original_model).__name__)
            with torch.no_grad():
                return self.forward(*args, **kwargs)
        with self._lock:
            finish = self._forward(args, kwargs)
        return finish()

    def _forward(self, args: tuple, kwargs: dict):
        """What the call returns, as a function to call once the lock is released: the program of a call that
        shares nothing with others (``turns.runs_alone``) runs there, so that calls from several threads overlap in it;
        everything else (lookup, capture, checks, CUDA graphs, caches, blockwise calls) runs here, under the lock."""
        kwargs.update(cache_defaults(self._cache_arg, args, kwargs))
        if self._blockwise_calls and (blockwise := self._blockwise_for(args, kwargs)) is not None:
            return _done(self._run_blockwise(blockwise, args, kwargs))
        try:
            entry, tensors, caches = self._entry_for(args, kwargs)
        except ExportError as exc:
            blockwise = self._blockwise(exc)
            flat, spec = pytree.tree_flatten((args, kwargs))
            self._blockwise_calls.append((spec, [None if isinstance(v, torch.Tensor) else v for v in flat],
                                          blockwise))
            self._latest = blockwise
            return _done(self._run_blockwise(blockwise, args, kwargs))
        if (changed := entry.weights.changed()) is not None:
            why = ("the program ran the hooks there were when it was captured"
                   if changed.startswith(("forward hooks", "global forward hooks")) else
                   "the program holds a copy of it, reads the one it replaced, or was built for its old value")
            log.warning("%s's %s changed since compile (%s): compiling again", type(self.original_model).__name__,
                        changed, why)
            self._entries.clear()
            entry, tensors, caches = self._entry_for(args, kwargs)
        if caches:
            outs = self._run_with_cache(entry, tensors)
            return _done(kv_cache.write_back(caches, pytree.tree_unflatten(list(outs), entry.out_spec)))
        if not entry.writes and not entry.calls_offloaded and replays(entry.backend, tensors,
                                                                      self.options.get("cuda_graphs")):
            if entry.graphs is None:
                entry.graphs = GraphCache(entry.runner)
            return _done(pytree.tree_unflatten(list(entry.graphs(tensors)), entry.out_spec))

        def run():
            return pytree.tree_unflatten(list(entry.runner(*tensors)), entry.out_spec)

        # offloading hooks swap a block's weights in and out around each call: two calls must not overlap there
        return run if runs_alone(entry.backend, entry.writes or entry.calls_offloaded, tensors) else _done(run())

    def _blockwise(self, exc: ExportError) -> Blockwise:
        """The model run as written with each MoE block compiled alone (``blockwise``), once ``torch.export``
        refused the whole model; ``exc`` again where no block is left to compile."""
        if not (exc.blocks or exc.unfused) or not self.options.get("fuse", True):
            raise exc
        name = type(self.original_model).__name__
        log.warning("%s runs as written, each of its %d MoE block(s) compiled alone (%d left as written): %s", name,
                    len(exc.blocks), len(exc.unfused), str(exc).splitlines()[0])

        def compile_block(call: nn.Module, block: str) -> CompiledModule:
            folder = None if not self.dump_dir else str(Path(self.dump_dir) / f"block_{block}")
            compiled = CompiledModule(call, self.backend, folder, self.options)
            # the block is the module the whole model's captures analyzed: their findings serve it
            compiled.hints = replace(compiled.hints, recognized=self.hints.recognized)
            return compiled

        return Blockwise(exc.blocks, compile_block, exc.unfused)

    def _blockwise_for(self, args: tuple, kwargs: dict) -> Blockwise | None:
        """The blockwise program of calls structured as this one (same containers, same non-tensor values): a
        structure torch.export refused once is not captured again, other calls still are."""
        flat, spec = pytree.tree_flatten((args, kwargs))
        return next((blockwise for seen, consts, blockwise in self._blockwise_calls
                     if same_structure(flat, spec, seen, consts)), None)

    def _run_blockwise(self, blockwise: Blockwise, args: tuple, kwargs: dict):
        self._own_forward = True
        try:
            with blockwise.routed():
                return self.original_model(*args, **kwargs)
        finally:
            self._own_forward = False

    def _entry_for(self, args: tuple, kwargs: dict) -> tuple[_Entry, list, list]:
        """The capture a call runs (compiled now if none fits), its tensor inputs and the KV caches it passes."""
        autocast = autocast_state()
        if not kwargs:
            entry = next((e for e in self._entries if e.plain_arity == len(args) and e.autocast == autocast
                          and e.matches_tensors(args)), None)
            if entry is not None:
                return entry, list(args), []
        caches = self._caches(args, kwargs)
        if kwargs:  # the same keywords named in another order reuse a capture
            kwargs = next((in_order(kwargs, e.keywords) for e in self._entries if e.keywords is not None
                           and e.autocast == autocast and set(e.keywords) == set(kwargs)), kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        entry = next((e for e in self._entries if e.autocast == autocast and e.matches(flat, spec)), None)
        if entry is None:
            entry = self._compile(args, kwargs)
        return entry, [flat[i] for i in entry.tensor_pos], caches

    def _run_with_cache(self, entry: _Entry, tensors: list):
        """A KV cache grows by a token per call, so a graph of the whole program would be captured once and never
        replayed; its MoE ops, though, see the same tokens at every decode step, and replay graphs of their own
        (``graphed_ops``) on the Triton backend."""
        if entry.backend != "triton" or self.options.get("cuda_graphs") is False:
            return entry.runner(*tensors)
        if entry.op_graphs is None:
            entry.op_graphs = graphed_ops(entry.runner, self.options.get("cuda_graphs"))
        return entry.op_graphs(*tensors)

    def _caches(self, args, kwargs) -> list:
        """The KV caches a call passes, after checking a capture can carry them (``kv_cache``)."""
        if not self._takes_caches:
            return []
        caches = kv_cache.caches_in((args, kwargs))
        for cache in caches:
            why = kv_cache.unsupported(cache)
            if why is not None:
                raise CacheError(f"moecc cannot compile this call of {type(self.original_model).__name__}: {why}. "
                                 "Call the model itself, or leave the cache out (use_cache=False).")
        return caches

    def generate(self, *args, **kwargs):
        """The model's own ``generate`` (a Hugging Face model's), each forward it makes run compiled: one capture
        for the prompt and one for every decode step, whose cache length is symbolic. A cache moecc cannot carry
        (``kv_cache.unsupported``) makes the whole call run as the model's own, with a warning saying why."""
        model = self.original_model
        if not hasattr(model, "generate"):
            raise AttributeError(f"{type(model).__name__} has no generate method")
        # one generate at a time, holding the calls' lock throughout: it patches ``model.forward``, which another
        # thread's generate would restore under it, and a capture inside it runs the model's own forward
        with self._lock:
            with self._forward_compiled():
                try:
                    return model.generate(*args, **kwargs)
                except CacheError as exc:
                    log.warning("%s; generate runs uncompiled", exc)
            return model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _forward_compiled(self):
        """``model.forward`` routed through this module while the block runs; inside a compile (capture, check)
        and a blockwise call the model's own forward runs."""
        model = self.original_model
        own = model.forward  # bound now: a forward set on the instance before this stays the one that runs
        patched = vars(model).get("forward")

        def forward(*args, **kwargs):
            if self._own_forward:
                return own(*args, **kwargs)
            return self(*args, **kwargs)

        forward.__signature__ = inspect.signature(own)  # generate reads which arguments forward takes
        model.forward = forward
        try:
            yield
        finally:
            if patched is None:
                del model.forward
            else:
                model.forward = patched

    def _compile(self, args, kwargs) -> _Entry:
        """Capture, lower and check a program for this call. Compiling calls the model many times: its buffers and
        the call's tensors are put back as they were after, so that the call changes them once, as eager does."""
        self._own_forward = True
        attributes = plain_attributes(self.original_model)
        watch = knobs.WATCH_WEIGHTS.get()
        try:
            with module_state.kept(self.original_model, pytree.tree_leaves((args, kwargs))):
                entry = self._capture_and_check(args, kwargs)
        finally:
            self._own_forward = False
        state = written_by_calls(self.original_model, attributes)
        live = {id(m) for m in called_live(entry.gm)} if entry.backend == "torch" else set()
        # the buffers as they are put back: one the compile's eager calls assigned anew is the model's again
        entry.weights = WeightWatch(self.original_model, entry.gm, watch, entry.settings_of, state,
                                    baked(entry.reads, live, state))
        entry.reads = []  # the watch holds those it needs
        return entry

    def _capture_and_check(self, args, kwargs) -> _Entry:
        self.captures += 1
        log.info("capture %d of %s", self.captures, type(self.original_model).__name__)
        folder = None
        if self.dump_dir:
            folder = Path(self.dump_dir) if self.captures == 1 else Path(self.dump_dir) / f"capture_{self.captures}"
        entry, info = build(self.original_model, args, kwargs, self.backend, self.options, folder,
                            hints=self.hints)
        if folder is not None:
            print(f"moecc: pass dumps in {folder}")
        if self.verify:
            # quantized experts are approximate by design: the check then only catches gross errors
            tolerance = 0.25 if self.options.get("quantize") else None

            def rebuild(left: dict[str, str], refused: dict[str, str]):
                # what the check found holds for every later capture too
                self.hints = replace(self.hints, unfused={**self.hints.unfused, **left},
                                     refused_routing={**self.hints.refused_routing, **refused})
                with quiet("moecc.passes.recognize", "moecc.capture"):
                    return build(self.original_model, args, kwargs, self.backend, self.options, folder,
                                 hints=self.hints)

            def recapture():
                with quiet("moecc.passes.recognize", "moecc.capture"):
                    return capture(self.original_model, args, kwargs, hints=self.hints)

            with slow_step(log, "checking on fresh inputs"):
                try:
                    try:
                        entry, info = verify_leaving_blocks(self.original_model, entry, info, tolerance, rebuild,
                                                            verify)
                    except DisagreementError as exc:
                        if entry.backend != "onnxruntime" or tolerance is not None:
                            raise
                        entry, _ = torch_instead(self.original_model, exc, info, self.backend, lambda: build(
                            self.original_model, args, kwargs, "torch", self.options, None, hints=self.hints))
                    except BackendError as exc:
                        if entry.backend != "onnxruntime" or self.backend != "auto":
                            raise
                        log.warning("%s; backend='auto' runs it with torch", exc)
                        with quiet("moecc.passes.recognize", "moecc.capture"):
                            entry, _ = build(self.original_model, args, kwargs, "torch", self.options, None,
                                             hints=self.hints)
                        verify(self.original_model, entry, tolerance)
                except DisagreementError as exc:
                    if (refused := capture_to_blame(self.original_model, exc, recapture, tolerance)) is not None:
                        raise refused from exc
                    raise
        if self.captures == 1 and self.options.get("fuse", True):
            say_if_no_block(self.original_model, entry)
        self._entries.append(entry)
        self._latest = entry
        return entry


def say_if_no_block(model: nn.Module, entry: _Entry) -> None:
    """Warn where a program has no MoE block at all: a model moecc compiles for its MoE blocks, none of which was
    found, would otherwise run unfused without a word (blocks found and left as written say why on their own)."""
    if not entry.layers:
        log.warning("moecc found no MoE block in %s, so nothing is fused: it runs as captured, with %s. A block is "
                    "a module that holds a bank of experts (two or more stacked [E, ., .] weights, or a ModuleList "
                    "of MLPs) and a router over them", type(model).__name__, entry.backend)


def _done(result):
    return lambda: result


def torch_instead(model: nn.Module, exc: DisagreementError, info: BuildInfo, requested: str,
                  rebuild) -> tuple[_Entry, BuildInfo]:
    """The torch program (``rebuild()``) of a capture whose ONNX Runtime program disagreed with eager, when it
    agrees. What the torch program computes is eager's code on the same ops; an exported ONNX graph can differ from
    it outside the fused MoE blocks (ONNX Runtime's top-k breaks ties its own way). ``backend='auto'`` takes the
    torch program, with a warning; ``backend='onnxruntime'`` raises, saying so. When the torch program disagrees
    as well, that is moecc's own error, raised as such."""
    with quiet("moecc.passes.recognize", "moecc.capture"):  # their warnings were given once already
        built = rebuild()
    try:
        verify(model, built[0])
    except DisagreementError:
        raise exc from None
    ties = tie_breaking_ops(info.captured.gm)
    why = (f"the ONNX Runtime program of {type(model).__name__} disagrees with eager on fresh inputs ({exc.detail}), "
           "where the torch program of the same graph agrees: an op outside the fused MoE blocks computes other "
           "numbers once exported to ONNX")
    if value_sized := data_dependent_sizes(info.captured.gm):
        why += (f". Its sizes depend on values ({', '.join(value_sized[:3])}): an expert loop left in the graph, "
                "which ONNX can run with other numbers than eager")
    if ties:
        why += (f". Ops that pick among equal values ({', '.join(ties[:4])}) are the usual cause: ONNX takes the "
                "lower index where torch promises none")
    as_written = blocks_left_as_written(info.captured.gm)
    if as_written:
        why += (f". The MoE blocks left as written ({', '.join(as_written[:4])}) are traced whole by the export, "
                "their ops unseen here: one that picks among equal values (a top-k over tied scores) or an expert "
                "loop may be the cause")
    if requested == "auto":
        log.warning("%s; backend='auto' runs it with torch", why)
        return built
    raise MoeccError(f"{why}. Take backend='torch', or 'auto', which then runs it with torch") from exc


def _same(value, const) -> bool:
    try:
        return bool(value == const)
    except Exception:  # noqa: BLE001 - objects whose == is no plain answer are not the same value
        return value is const


@dataclass
class BuildInfo:
    captured: object
    passes: list
    backend: str
    graph: list
    canonical: dict = field(default_factory=dict)  # ``Recognize.canonical``: what ``runtime.localize`` checks


def _bank_path(model: nn.Module, name: str) -> str:
    """The experts of block ``name`` callable alone (``recognize.routed_bank_path``), or ""."""
    from moecc.passes.recognize import routed_bank_path

    try:
        return routed_bank_path(name, model.get_submodule(name))
    except AttributeError:
        return ""


def _built_for_settings(layers: dict[str, MoELayerInfo], backend: str, hints: CaptureHints) -> list[str]:
    """The MoE layers whose settings (``top_k``, flags) the program was built for, so that a change compiles again:
    all but the blocks a torch program calls as they are (left as written, no routing of theirs traced around their
    experts), which read their settings when they run. A Triton program may replay such a block from a CUDA graph
    and an ONNX one holds its code exported, so there every block's settings stay watched. (What the model's own
    calls write, as NLLB-MoE's capacity, is no setting on any backend: ``weights.written_by_calls``.)"""
    if backend != "torch":
        return list(layers)
    return [name for name, info in layers.items()
            if info.graph_prefix or info.block or name in hints.routed_banks]


def _routed_banks(model: nn.Module, layers: dict[str, MoELayerInfo], hints: CaptureHints) -> dict:
    """Blocks left as written whose experts ``recognize`` found callable alone (``MoELayerInfo.routed_bank``):
    block path -> (bank path, why the block was left as written), for a capture that keeps the bank as the leaf."""
    found = {}
    for name, info in layers.items():
        if not info.routed_bank or name in hints.routed_banks or name in hints.unfused:
            continue
        try:
            model.get_submodule(info.routed_bank)
        except AttributeError:
            continue
        found[name] = (info.routed_bank, info.reason)
    return found


def _dense_on_ort(gm):
    """Why the torch program of ``gm`` should run rather than ONNX Runtime's (a ``DenseWork``), or None: ORT
    decomposes blocks its MoE op cannot run into every expert on every token, and past
    ``MOECC_AUTO_MAX_DENSE_WORK`` times the torch program's weight reads per token that costs more than ORT's
    faster kernels gain (``dense_work``). The pipeline laid the experts out for ORT; the torch kernels read that
    layout as well."""
    limit = knobs.AUTO_MAX_DENSE_WORK.get()
    if limit <= 0:
        return None
    from moecc.codegen.onnx.dense_work import dense_work

    work = dense_work(gm)
    return work if work.decomposed and work.ratio > limit else None


def build(model: nn.Module, args, kwargs, backend: str, options: dict, dump_folder: Path | None,
          program_folder: str | None = None, calibration: tuple | None = None,
          hints: CaptureHints | None = None) -> tuple[_Entry, BuildInfo]:
    """Capture, run the pass pipeline (with dumps when asked) and lower to a backend."""
    from moecc.codegen.onnx.quant import quant_spec

    hints = hints or CaptureHints()
    quant = quant_spec(options.get("quantize"), options.get("quant_block_size", 0),
                       options.get("quant_int8_activations", False))
    with slow_step(log, f"capturing {type(model).__name__}"):
        cap = capture(model, args, kwargs, fuse=options.get("fuse", True), hints=hints,
                      holds_all_weights=program_folder is not None)
    for node in cap.gm.graph.nodes:
        if node.op == "call_module" and "moecc_block" in node.meta:
            node.meta.pop(REFUSED_ROUTING, None)
            if (why := hints.refused_routing.get(node.meta["moecc_block"])) is not None:
                node.meta[REFUSED_ROUTING] = why
    timing = Timing()
    instruments: list = [timing]
    if dump_folder is not None:
        instruments.append(DumpIR(dump_folder, cap.tensor_inputs, cap.flat_reference, timing))
    requested, backend = backend, resolve_backend(backend, cap.flat_inputs)
    value_sized = data_dependent_sizes(cap.gm)
    if requested == "auto" and backend == "onnxruntime" and value_sized and quant is None:
        log.info("the captured program has sizes that depend on values (%s): backend='auto' runs it with torch",
                 ", ".join(value_sized[:3]))
        backend = "torch"
    if requested == "auto" and backend == "onnxruntime":
        from moecc.codegen.onnx.lower import unsupported

        if (why := unsupported(cap.gm, cap.tensor_inputs)) is not None:
            log.info("backend='auto' runs this program with torch: %s", why)
            backend = "torch"
    for name, why in cap.unfused.items():
        # its experts alone may still be a leaf (a block called with a cache no leaf can carry)
        bank = "" if name in hints.unfused or not options.get("fuse", True) else _bank_path(model, name)
        layers_of(cap.gm)[name] = MoELayerInfo(name=name, reason=why, routed_bank=bank)
    for block, (bank, _) in hints.routed_banks.items():
        layers_of(cap.gm)[bank] = MoELayerInfo(name=bank, block=block)
    pipeline = default_pipeline(EXPERT_LAYOUT[backend], options.get("copy_expert_weights"), hints.recognized)
    manager = PassManager(pipeline, instruments, repro_dir=dump_folder)
    try:
        gm = manager(cap.gm).graph_module
    finally:
        forget_calls()
    layers = gm.meta.get("moecc_layers", {})
    routed = _routed_banks(model, layers, hints) if options.get("fuse", True) else {}
    try:  # the experts' readings serve the capture that may follow, and no further
        if routed:
            for block, (bank, why) in routed.items():
                log.info("MoE block %s left as written (%s); capturing again with its experts %s as the leaf, routed "
                         "by the model's own ops", block, why, bank)
            return build(model, args, kwargs, requested, options, dump_folder, program_folder, calibration,
                         replace(hints, routed_banks={**hints.routed_banks, **routed}))
    except (ExportError, CaptureError) as exc:
        # the routing the block's leaf hid may be code torch.export cannot trace: the blocks stay as written
        forget_calls()
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        for name in routed:
            layers[name].reason += f"; its experts alone could not be captured: {why}"
    finally:
        forget_reads()
    for name, info in layers.items():
        if info.routed_bank and name not in hints.routed_banks:  # recognize said it only where a capture may follow
            log.warning("MoE block %s left as written: %s", name, info.reason)
    for block, (bank, why) in hints.routed_banks.items():
        if (info := layers.get(bank)) is not None:
            info.reason = f"{info.reason}; its block {block}: {why}" if info.reason else ""
    if not options.get("fuse", True):
        from moecc.discover import find_moe_blocks

        layers = {name: MoELayerInfo(name=name, reason="fuse=False: run as written")
                  for name, _ in find_moe_blocks(model)}
    graph = graph_summary(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sizes = [tuple(n.meta["val"].shape) if "val" in n.meta else (None,) * cap.tensor_inputs[i].dim()
             for i, n in enumerate(placeholders)]
    shapes = [tuple(_static_size(d) for d in dims) for dims in sizes]
    lowest = [tuple(_lowest_size(d) for d in dims) for dims in sizes]
    symbols = [tuple(None if d is None or _static_size(d) is not None else str(d) for d in dims) for dims in sizes]
    from moecc.calibration import expert_load

    batch = cap.tensor_inputs
    if calibration is not None:
        flat, spec = pytree.tree_flatten((tuple(calibration[0]), dict(calibration[1])))
        if spec != cap.in_spec:
            raise ValueError(f"the calibration batch has another structure than the example: {spec}")
        batch = [flat[i] for i in cap.tensor_pos]
    load = expert_load(gm, batch)
    for info in layers.values():
        info.expert_load = load.get(info.graph_prefix, [])
    if requested == "auto" and backend == "onnxruntime" and quant is None and (work := _dense_on_ort(gm)):
        log.info("backend='auto' runs this program with torch: %s", work.describe())
        backend = "torch"
        for name, (ratio, why) in work.decomposed.items():
            if name in layers:
                layers[name].lowering = (f"torch kernels: ONNX Runtime would run every expert on every token, "
                                         f"{ratio:.1f}x the routed work ({why}); the whole program "
                                         f"{work.ratio:.1f}x torch's weight reads per token")
    try:
        hint = ""
        if backend == "onnxruntime":
            from moecc.codegen.onnx.lower import SKIP_LOWERING

            hint = SKIP_LOWERING
        with slow_step(log, f"lowering to {backend}", hint):
            program = lower(gm, backend, cap.tensor_inputs, program_folder, quant)
    except BackendError as exc:
        if requested != "auto" or quant is not None:
            raise
        log.warning("backend %s failed (%s); backend='auto' falls back to torch", backend, exc)
        # their warnings (blocks left as written) were given once already
        with quiet("moecc.passes.recognize", "moecc.capture"):
            return build(model, args, kwargs, "torch", options, None, program_folder, calibration, hints)
    for info in layers.values():
        if not info.fused and not info.reason:
            info.reason = "experts were recognized but not fused (see the fuse_experts pass summary)"
    settings_of = _built_for_settings(layers, backend, hints)
    weights = WeightWatch(model, program, knobs.WATCH_WEIGHTS.get(), settings_of)
    if (cost := weights.cost()) > WATCH_COST_WARNING_S:
        log.warning("checking the %d parameters of %s for changes takes %.2f ms before each call; set "
                    "MOECC_WATCH_WEIGHTS=0 if its weights do not change after compile", len(weights),
                    type(model).__name__, cost * 1e3)
    entry = _Entry(program, cap.in_spec, cap.out_spec, cap.tensor_pos,
                   [None if isinstance(v, torch.Tensor) else v for v in cap.flat_inputs], shapes, symbols,
                   [t.dtype for t in cap.tensor_inputs], layers, backend, cap.flat_inputs, lowest, weights,
                   autocast=autocast_state(), settings_of=settings_of, reads=cap.reads)
    recognized = next((p.canonical for p in pipeline if isinstance(p, Recognize)), {})
    return entry, BuildInfo(cap, timing.records, backend, graph, recognized)
