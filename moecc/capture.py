"""Capture a whole model as one flat FX graph with ``torch.export``; MoE blocks stay whole, as ``call_module``.

While exporting, each MoE block runs as an opaque leaf op so that ``torch.export`` never traces its
data-dependent expert loop (which would bake the example's routing into the graph). After export the leaf is
swapped for a ``call_module`` of the original block, which the recognize pass later lifts into moecc ops."""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import inspect
import itertools
import logging
import math
import types
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

from moecc import capture_cache, capture_check, hooks, knobs
from moecc.capture_key import fingerprint
from moecc.capture_reads import Read, recording
from moecc.capture_recorded import RecordingBlock, recordable, run_forward_hooks
from moecc.discover import expert_owners, find_moe_blocks
from moecc.errors import CaptureError, ExportError
from moecc.logs import EXPORT_LOGGERS, quiet, stderr_to_debug
from moecc.module_casts import idle_module_casts
from moecc.passes.graph_utils import fresh_container, output_leaves
from moecc.passes.recognize.block import OFFLOADED, offloaded_weights
from moecc.passes.recognize.memo import RecognitionMemo
from moecc.runtime.weights import storage_of

log = logging.getLogger("moecc.capture")

_LEAVES: dict[str, list[tuple]] = {}  # key -> output templates, read by the fake function
_counter = itertools.count()


# key of one call -> (its (args, kwargs) spec, its leaves (_TENSOR for tensors), its (args, kwargs))
_CALLS: dict[str, tuple] = {}
_TENSOR = object()
# the (args, kwargs) each MoE block was last called with in eager before a capture, for recognition to read the
# values of a block's other arguments (the graph holds their shapes only)
EXAMPLE_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.library.custom_op("moecc::opaque_block", mutates_args=())
def opaque_block(x: torch.Tensor, others: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    """Stand-in for a MoE block during export only; never left in a captured graph. ``others``: the tensors among
    the block's other arguments."""
    raise CaptureError(f"moecc::opaque_block({key}) ran outside of capture")


@opaque_block.register_fake
def _opaque_block_fake(x, others, key):
    outs = []
    for template, dtype in _LEAVES[key.rsplit("@", 1)[0]]:
        shape = []
        for kind, value in template:
            if kind == "x":
                shape.append(x.shape[value])
            elif kind == "tokens":
                shape.append(math.prod(x.shape[:-1]))
            else:
                shape.append(value)
        outs.append(x.new_empty(shape, dtype=dtype))
    return outs


def _template(x: torch.Tensor, out: torch.Tensor) -> list[tuple[str, int]]:
    tokens = math.prod(x.shape[:-1])
    dims = []
    for i, size in enumerate(out.shape):
        if i < x.dim() and size == x.shape[i] and (i == x.dim() - 1 or size > 1):
            dims.append(("x", i))
        elif size == tokens and tokens > 1:
            dims.append(("tokens", 0))
        else:
            dims.append(("const", int(size)))
    return dims


@dataclass
class Captured:
    gm: torch.fx.GraphModule  # flat: forward(*tensor_inputs) -> tuple(flat_outputs)
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    blocks: dict[str, str] = field(default_factory=dict)  # submodule target -> module path in the model
    flat_inputs: list = field(default_factory=list)  # all leaves of (args, kwargs), tensors or constants
    flat_reference: list = field(default_factory=list)
    tensor_pos: list = field(default_factory=list)  # where the graph's inputs sit among flat_inputs
    unfused: dict[str, str] = field(default_factory=dict)  # module path -> why capture traced the block as written
    reads: list[Read] = field(default_factory=list)  # the plain settings the model's code read (``capture_reads``)

    @property
    def tensor_inputs(self) -> list[torch.Tensor]:
        return [self.flat_inputs[i] for i in self.tensor_pos]


@dataclass
class CaptureHints:
    """What the caller knows of a model before its capture; torch.compile's graphs come with both."""

    # per tensor input, the dims that may vary (None: capture's own rule, every token dim)
    dynamic_dims: list[set[int]] | None = None
    # module path -> why a MoE block is no longer a module of the model (dynamo traced it into ops)
    unfused: dict[str, str] = field(default_factory=dict)
    # block path -> (path of the expert bank it calls as ``bank(x, ids, weights)``, why the block was left as
    # written): the bank is the leaf instead, and the block's routing is traced as the model's own ops
    routed_banks: dict[str, tuple[str, str]] = field(default_factory=dict)
    # block path -> why no canonical routing may serve it (the check on fresh inputs found one to differ from the
    # block's): recognition takes its routing as written
    refused_routing: dict[str, str] = field(default_factory=dict)
    # what recognition found in the model's earlier captures (``passes.recognize.memo``), shared by every capture
    # these hints serve: kept apart from ``==``
    recognized: RecognitionMemo = field(default_factory=RecognitionMemo, compare=False, repr=False)


class _FlatCall(nn.Module):
    """Calls the model from its flat tensor inputs; non-tensor inputs are constants of this capture."""

    def __init__(self, model: nn.Module, in_spec: pytree.TreeSpec, flat: list):
        super().__init__()
        self.model = model
        self.in_spec = in_spec
        self.tensor_pos = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
        self.consts = [None if isinstance(v, torch.Tensor) else v for v in flat]

    def forward(self, *tensors):
        flat = list(self.consts)
        for i, t in zip(self.tensor_pos, tensors):
            flat[i] = t
        args, kwargs = pytree.tree_unflatten(flat, self.in_spec)
        return tuple(pytree.tree_leaves(self.model(*args, **kwargs)))


def _dynamic_shapes(tensors: list[torch.Tensor], dynamic_dims: list[set[int]] | None = None):
    """Every token dim may vary: all dims of integer inputs, all but the last (feature) dim of float inputs; or the
    ``dynamic_dims`` given."""
    if dynamic_dims is not None:
        return tuple({i: torch.export.Dim.AUTO for i in sorted(dims)} for dims in dynamic_dims)
    return tuple({i: torch.export.Dim.AUTO for i in range(t.dim()) if not t.is_floating_point() or i < t.dim() - 1}
                 for t in tensors)


def _first_parameter(block: nn.Module) -> str | None:
    try:
        params = list(inspect.signature(block.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    return params[0].name if params and params[0].kind != params[0].VAR_POSITIONAL else None


def _hidden_states_first(args: tuple, kwargs: dict, first: str | None) -> tuple[tuple, dict]:
    """A block's call with its hidden states positional, also when they were passed by keyword (``first``: the
    name of the block's first parameter)."""
    if not args and first in kwargs:
        return (kwargs[first],), {k: v for k, v in kwargs.items() if k != first}
    return tuple(args), dict(kwargs)


@contextlib.contextmanager
def _blocks_as_leaves(blocks: list[tuple[str, nn.Module]], examples: dict[str, tuple], recorded: dict[str, str]):
    """Each block's forward replaced by its leaf op. A block in ``recorded`` (name -> sub-module path) also outputs
    that sub-module's output (its example is (block output, sub-module output)), handed to the sub-module's hooks."""
    patched = []
    try:
        for name, block in blocks:
            x, out = examples[name]
            sub = block.get_submodule(recorded[name]) if name in recorded else None
            key = f"{name}#{next(_counter)}"
            leaves, spec = pytree.tree_flatten(out)
            _LEAVES[key] = [(_template(x, t), t.dtype) for t in leaves if t is not None]
            nones = [t is None for t in leaves]  # a None output stays None, as the example gave it

            first = _first_parameter(block)

            def forward(self, *args, _key=key, _spec=spec, _name=name, _first=first, _nones=nones, _sub=sub,
                        **kwargs):
                args, kwargs = _hidden_states_first(args, kwargs, _first)
                if not args or not isinstance(args[0], torch.Tensor):
                    raise CaptureError(
                        f"MoE block {_name!r} is called without its hidden states as first positional argument; "
                        "moecc handles blocks called as block(hidden_states, ...). Try compiling with blocks=[] to "
                        "capture the model without MoE fusion.")
                call_key = f"{_key}@{next(_counter)}"
                leaves, call_spec = pytree.tree_flatten((args[1:], kwargs))
                # the argument objects too: blocks handed one mutable container share one in the graph
                _CALLS[call_key] = (call_spec, [_TENSOR if isinstance(v, torch.Tensor) else v for v in leaves],
                                    (args[1:], dict(kwargs)))
                others = [v for v in leaves if isinstance(v, torch.Tensor)]
                outs = iter(torch.ops.moecc.opaque_block(args[0], others, call_key))
                result = pytree.tree_unflatten([None if none else next(outs) for none in _nones], _spec)
                if _sub is None:
                    return result
                run_forward_hooks(_sub, (args[0],), result[1])
                return result[0]

            # a forward set on the instance (a blockwise program's router, a user's patch) comes back after
            patched.append((block, key, vars(block).get("forward")))
            block.forward = types.MethodType(forward, block)
        yield
    finally:
        for block, key, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own
            _LEAVES.pop(key, None)


def _uncarried(call: tuple) -> str | None:
    """Why a graph leaf cannot take a block's call (``(args, kwargs)``): its arguments besides the hidden states are
    rebuilt around graph values, and a container whose own unflattening reads its tensors (a Hugging Face
    ``DynamicCache`` rebuilds its layers from them) cannot be; None where they can."""
    args, kwargs = call
    leaves, spec = pytree.tree_flatten((tuple(args[1:]), dict(kwargs)))
    try:
        pytree.tree_unflatten([_TENSOR if isinstance(v, torch.Tensor) else v for v in leaves], spec)
    except Exception as exc:  # noqa: BLE001 - whatever the container's own code raises
        kinds = sorted({type(v).__name__ for v in (*args[1:], *kwargs.values())
                        if not isinstance(v, (torch.Tensor, bool, int, float, str, type(None), tuple, list, dict))})
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"it is called with {', '.join(kinds) or 'arguments'} that a graph leaf cannot rebuild around the "
                f"graph's values ({first[:200]})")
    return None


def _other_outputs(out) -> list[str]:
    """The types of what a block returns besides tensors and None (a leaf of the graph returns tensors only)."""
    return sorted({type(t).__name__ for t in pytree.tree_leaves(out)
                   if not isinstance(t, torch.Tensor) and t is not None})


def _record_examples(model, blocks, args, kwargs):
    """Each block's first call (its hidden states and output), the model's output, the blocks whose internals
    the model returns (``observed``: block -> {sub-module path: its output in the block's first call}), and the
    plain settings the call read (``capture_reads``)."""
    examples, handles, inside, sub_outputs = {}, [], {}, {}
    for name, block in blocks:
        first = _first_parameter(block)

        def hook(mod, inp, kwargs, out, _name=name, _first=first):
            inp, kwargs = _hidden_states_first(inp, kwargs, _first)
            if _name not in examples and inp:
                examples[_name] = (inp[0], out)
                if len(inp) > 1 or kwargs:  # kept until the compile has recognized the block (forget_calls)
                    EXAMPLE_CALLS[mod] = (inp, kwargs)
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
        for sub_name, sub in block.named_modules():
            if sub is not block:
                # weak references: an id alone may be a dead tensor's, reused by the model's output
                def sub_hook(mod, inp, out, _name=name, _sub=sub_name):
                    inside.setdefault(_name, {}).update({id(t): (weakref.ref(t), _sub) for t in pytree.tree_leaves(out)
                                                         if isinstance(t, torch.Tensor)})
                    sub_outputs.setdefault((_name, _sub), out)
                handles.append(sub.register_forward_hook(sub_hook))
    try:
        try:
            with torch.no_grad(), recording(model) as reads:
                ref = model(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the call again as it is: if it fails too, that is the error
            # code that dynamo traces as it runs (torch.cond, a part under torch.compile) cannot trace the recording
            # classes' __getattribute__
            log.info("the settings %s reads were not recorded (%s): a change to them after compile will not be "
                     "seen", type(model).__name__, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else
                     type(exc).__name__)
            for found in (examples, inside, sub_outputs):
                found.clear()
            with torch.no_grad():
                ref = model(*args, **kwargs)
            reads = []
    finally:
        for h in handles:
            h.remove()
    returned = {id(t): t for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)}
    observed = {}
    for name, produced in inside.items():
        # a block that is the model returns its own outputs, which a child may have computed; a block inside a
        # model that returns one of its outputs unchanged rarely does, and Llama 4's router logits are both an
        # output of its block and recorded by a hook on its router (which a fused block never calls)
        own = [] if name else pytree.tree_leaves(examples.get(name, (None, None))[1])
        own = {id(t) for t in own if isinstance(t, torch.Tensor)}
        escaped = sorted({sub for key, (alive, sub) in produced.items()
                          if key in returned and key not in own and alive() is returned[key]})
        if escaped:
            observed[name] = {sub: sub_outputs[(name, sub)] for sub in escaped}
    return examples, ref, observed, reads


def forget_calls() -> None:
    """Drop the example calls kept for recognition (they hold activations)."""
    EXAMPLE_CALLS.clear()


def _routed_without_block(model: nn.Module, found: list, hints: CaptureHints) -> list[tuple[str, nn.Module]]:
    """The routed banks of ``hints`` whose block is no module of ``model`` (a graph torch.compile traced the block
    into, with its experts' calls given back: ``dynamo_blocks``), as leaves of their own."""
    names = {n for n, _ in found}
    out = []
    for block, (bank, _) in hints.routed_banks.items():
        if block in names:
            continue
        try:
            out.append((bank, model.get_submodule(bank)))
        except AttributeError:
            continue
    return out


def capture(model: nn.Module, args: tuple, kwargs: dict, fuse: bool = True,
            hints: CaptureHints | None = None, holds_all_weights: bool = False) -> Captured:
    """``holds_all_weights``: the program must hold every weight it reads (an artifact). A block whose weights
    are offloaded (hooks swap them in for each call) is then traced through, its weights taken as they are at
    capture; otherwise it stays a leaf that calls the block, hooks and all, so the program holds no copy of them."""
    hints = hints or CaptureHints()
    found = find_moe_blocks(model) if fuse else []  # kept apart from ``blocks``, which gains the expert owners
    alone = _routed_without_block(model, found, hints) if fuse else []
    # a module holding such experts is no block of its own (the graph module itself, whose router-shaped
    # constants beside them made it look like one)
    found = [(n, b) for n, b in found if not any(not n or bank.startswith(f"{n}.") for bank, _ in alone)]
    blocks = found + alone
    log.info("found %d MoE block(s): %s", len(blocks), ", ".join(n for n, _ in blocks) or "-")
    owners = expert_owners(model, [n for n, _ in blocks]) if fuse else []
    if owners:
        log.info("expert banks without a router found beside them, kept whole: %s", ", ".join(n for n, _ in owners))
    blocks += owners
    routed = {n: hints.routed_banks[n][0] for n, _ in blocks if n in hints.routed_banks}
    if routed:
        log.info("expert banks captured without their blocks, routed by the model's own ops: %s",
                 ", ".join(routed.values()))
    blocks = [(routed[n], model.get_submodule(routed[n])) if n in routed else (n, b) for n, b in blocks]
    flat_inputs, in_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    hooks.tell_traced(model)
    try:
        # on a copy of the call's containers: eager updates a KV cache it is given in place
        examples, reference, observed, reads = _record_examples(model, blocks,
                                                                *pytree.tree_unflatten(flat_inputs, in_spec))
    except Exception as exc:
        raise CaptureError(f"{type(model).__name__} failed on the example inputs before capture: {exc}") from exc
    # one sub-module's output the model returns travels as more outputs of the block's call (``RecordingBlock``)
    recorded = {}
    unfused = {n: OFFLOADED for n, b in blocks if offloaded_weights(b)} if holds_all_weights else {}
    for name, block in blocks:
        if (call := EXAMPLE_CALLS.get(block)) is not None and (why := _uncarried(call)) is not None:
            unfused[name] = why
    for name, subs in observed.items():
        what = (f"the model returns what its {', '.join(subs)} computed (a recorded output such as "
                "output_router_logits=True)")
        if len(subs) > 1:
            unfused[name] = (f"{what}, more than one sub-module's output of a block, which a fused block does not "
                             "compute apart")
            continue
        (sub, sub_out), = subs.items()
        if not recordable(sub_out):
            kinds = ", ".join(_other_outputs(sub_out)) or "no tensor"
            unfused[name] = f"{what}, whose output holds {kinds} values a leaf of the graph cannot carry"
            continue
        recorded[name] = sub
        x, out = examples[name]
        examples[name] = (x, (out, sub_out))
    for name, _ in blocks:
        if name in examples and (kinds := _other_outputs(examples[name][1])):
            unfused[name] = (f"it returns {', '.join(kinds)} values besides tensors, which a leaf of the graph "
                             "cannot carry")
    blocks = [(n, b) for n, b in blocks if n not in unfused and n not in hints.unfused]
    for name, why in unfused.items():
        log.warning("MoE block %s left as written: %s", name, why)
    missing = [n for n, _ in blocks if n not in examples]
    blocks = [(n, b) for n, b in blocks if n in examples]
    if missing:
        log.info("MoE blocks not called by this input, left as they are: %s", ", ".join(missing))
    wrapper = _FlatCall(model, in_spec, flat_inputs)
    flat_ref, out_spec = pytree.tree_flatten(reference)
    key = (fingerprint(model, flat_inputs, in_spec, [n for n, _ in blocks], hints.dynamic_dims)
           if knobs.CAPTURE_CACHE.get() else None)
    if recorded:  # the cache holds blocks by their paths, not the recording wrapper
        key = None
    cached = capture_cache.load(key, model) if key else None
    refused = cached.reason if isinstance(cached, capture_cache.Refusal) else None
    if cached is not None and refused is None:
        log.info("capture from the cache (%s)", key[:12])
        gm, targets = cached
    else:
        try:
            if refused is not None:
                log.info("capture refused before, from the cache (%s)", key[:12])
                first, _, rest = refused.partition("\n")
                raise ExportError(f"{first} (as when it was captured before: the capture cache keeps refusals; "
                                  f"MOECC_CAPTURE_CACHE=0 exports it again)" + (f"\n{rest}" if rest else ""))
            gm, targets = _export(model, wrapper, flat_inputs, blocks, examples, hints.dynamic_dims, recorded)
        except ExportError as exc:
            if key and refused is None and not _for_lack_of_memory(exc):
                capture_cache.save_refusal(key, str(exc))
            if not fuse:
                more = " With fuse=False each MoE block is traced as written, and its expert loop with it."
            elif found:
                more = (" moecc.compile still runs such a model, as written with each MoE block compiled alone; "
                        "moecc.export needs it captured whole.")
            else:
                more = (f" No MoE block was found in {type(model).__name__} (by structure: a router [E, H] beside "
                        "a bank of E >= 2 experts), so moecc.compile has none to compile alone: if it has one, its "
                        "expert loop is data-dependent code that torch.export cannot trace.")
            if unfused:
                why = "; ".join(f"{n}: {reason}" for n, reason in unfused.items())
                more += f"\nThese MoE blocks were traced as written: {why}."
            exc = ExportError(f"{exc}{more}").with_traceback(exc.__traceback__)
            exc.unfused = {**hints.unfused, **unfused}
            exc.blocks = [(n, b) for n, b in found if n not in exc.unfused]
            raise exc from exc.__cause__
        if key:
            capture_cache.save(key, gm, targets, model)
    return Captured(gm, in_spec, out_spec, targets, flat_inputs, flat_ref, wrapper.tensor_pos,
                    {**hints.unfused, **unfused}, reads)


def _for_lack_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` or an error it came from ran out of memory: a refusal of the moment, not of the model."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def unaliased(tensors: list) -> list:
    """The tensors, each later one that shares memory with an earlier one cloned. torch.export (and the ONNX
    exporter) give one tensor passed twice (``labels=input_ids``) a single graph input, so the program would read
    the first argument for both whenever a later call passes two different tensors. Every export of a program
    whose example inputs a caller passed goes through this."""
    seen, out = set(), []
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        storage = storage_of(t)
        if storage is not None and storage in seen:
            t = t.clone()
        elif storage is not None:
            seen.add(storage)
        out.append(t)
    return out


def _export(model, wrapper: _FlatCall, flat_inputs: list, blocks, examples,
            dynamic_dims: list[set[int]] | None = None,
            recorded: dict[str, str] | None = None) -> tuple[torch.fx.GraphModule, dict]:
    recorded = recorded or {}
    tensors = unaliased([v for v in flat_inputs if isinstance(v, torch.Tensor)])
    try:
        # a block's leaf runs it as ``block(...)``, its own hooks with it: traced around the leaf they would run twice
        with _blocks_as_leaves(blocks, examples, recorded), hooks.set_aside(b for _, b in blocks), torch.no_grad(), \
                quiet(*EXPORT_LOGGERS), stderr_to_debug(log, "torch.export"), idle_module_casts():
            ep = torch.export.export(wrapper, tuple(tensors), dynamic_shapes=(_dynamic_shapes(tensors, dynamic_dims),),
                                     strict=False)
    except CaptureError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"torch.export could not capture {type(model).__name__}: {first}\n"
            "Try: pass plain tensors and Python constants as inputs (for Hugging Face models, use_cache=False), "
            "put the model in eval() mode, or set MOECC_LOGS=debug for the full trace."
        ) from exc
    gm = ep.module()
    for node in gm.graph.nodes:
        paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()
                 if path == "model" or path.startswith("model.")]
        if paths:  # where in the model it ran (the path under _FlatCall's ``model``): error messages name it
            node.meta["moecc_module"] = paths[-1].removeprefix("model").removeprefix(".")
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        # export's input-guard check; the runtime matches inputs to a capture itself
        gm.graph.erase_node(node)
    by_name = {n: RecordingBlock(b, recorded[n]) if n in recorded else b for n, b in blocks}
    single = {n: not isinstance(examples[n][1], (tuple, list, dict)) for n in by_name}
    nested = {n: not single[n] and not _flat_sequence(examples[n][1]) for n in by_name}
    try:
        targets = _leaves_to_modules(gm, by_name, single, nested)
    finally:
        _CALLS.clear()
    gm.recompile()
    _runs(gm, tensors, model, wrapper)
    return gm, targets


def _runs(gm: torch.fx.GraphModule, tensors: list, model: nn.Module, eager: _FlatCall) -> None:
    """Raise ExportError unless the exported program runs on the inputs it was exported on and gives eager's
    numbers there (``eager``: the model called from the same flat tensors). torch.export can return a program that
    does not run (a ``torch.vmap`` traced into it, as some attention-mask builders use, leaves batching ops that
    fail outside vmap), or one of code that took another path while traced (``capture_check``); every later stage
    runs it."""
    name = type(model).__name__
    try:
        with quiet(*EXPORT_LOGGERS):
            got = capture_check.call(model, gm, tensors)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.export captured {name}, but the program it made fails to run on "
                          f"the inputs it was made from: {first[:300]}") from exc
    flat = list(eager.consts)
    for i, t in zip(eager.tensor_pos, tensors):
        flat[i] = t
    if (apart := capture_check.traced_apart(model, eager.in_spec, flat, eager.tensor_pos, got)) is not None:
        raise ExportError(f"torch.export captured {name}, but the program it made computes other numbers than "
                          f"{name} does in eager, on the very inputs it was made from ({apart}): the model's code "
                          "takes another path while traced (a branch on torch.compiler.is_exporting(), or a "
                          "mask built otherwise under tracing)")


def _flat_sequence(out) -> bool:
    return isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out)


def _made_per_run(graph: torch.fx.Graph, value, passed, made: dict):
    """``value`` (an argument of a block's call in the graph, ``passed`` the object eager passed), or a node that
    copies it at every run where it is a mutable container (``fresh_container``): one node per object passed, so
    that blocks handed one container in eager share one in the graph too."""
    if not isinstance(passed, (collections.abc.MutableMapping, collections.abc.MutableSequence,
                               collections.abc.MutableSet)):
        return value
    if id(passed) not in made:
        snapshot = value if any(isinstance(v, torch.fx.Node) for v in pytree.tree_leaves(value)) else copy.copy(value)
        made[id(passed)] = graph.call_function(fresh_container, (snapshot,))
    return made[id(passed)]


def _leaves_to_modules(gm: torch.fx.GraphModule, blocks: dict[str, nn.Module], single: dict[str, bool],
                       nested: dict[str, bool]) -> dict[str, str]:
    targets, target_of, made = {}, {}, {}
    leaves = [n for n in gm.graph.nodes if n.target is torch.ops.moecc.opaque_block.default]
    for node in leaves:
        name = node.args[2].rsplit("#", 1)[0]
        if name not in target_of:  # a block the model calls more than once is one module, its weights held once
            target_of[name] = target = f"moe_block_{len(target_of)}"
            gm.add_submodule(target, blocks[name])
            targets[target] = name
        target = target_of[name]
        spec, consts, (passed_args, passed_kwargs) = _CALLS[node.args[2]]
        others = iter(node.args[1])
        args, kwargs = pytree.tree_unflatten([next(others) if v is _TENSOR else v for v in consts], spec)
        with gm.graph.inserting_before(node):
            args = tuple(_made_per_run(gm.graph, v, p, made) for v, p in zip(args, passed_args))
            kwargs = {k: _made_per_run(gm.graph, v, passed_kwargs[k], made) for k, v in kwargs.items()}
            call = gm.graph.call_module(target, (node.args[0], *args), kwargs)
        call.meta["moecc_block"] = name
        read = call
        if nested[name]:
            with gm.graph.inserting_after(call):
                read = gm.graph.call_function(output_leaves, (call,))
        for user in list(node.users):  # each user is getitem(leaf, j), j counting the block's tensor leaves
            if single[name]:
                user.replace_all_uses_with(call)
                call.meta["val"] = user.meta.get("val")
                gm.graph.erase_node(user)
            else:
                user.args = (read, user.args[1])
        gm.graph.erase_node(node)
    return targets
