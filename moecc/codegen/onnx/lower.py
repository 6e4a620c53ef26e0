"""Lower a pipeline result to one ONNX model and an ONNX Runtime session."""

from __future__ import annotations

import logging
import operator
import os
import warnings

import onnxscript.optimizer
import torch
from torch import fx, nn

from moecc import knobs
from moecc.codegen.onnx import export_cache, repeated_layers
from moecc.codegen.onnx.block_probe import block_that_does_not_export
from moecc.codegen.onnx.complex_as_real import complex_as_real
from moecc.codegen.onnx.decompose import DECOMPOSITIONS
from moecc.codegen.onnx.grouped_nbits import grouped_matmul_nbits_onnx
from moecc.codegen.onnx.islands import blocks_on_torch
from moecc.codegen.onnx.optimize import optimize
from moecc.codegen.onnx.ort_forms import (
    bank_prefix,
    canonical_experts,
    held_buffers,
    ort_fc1,
    ort_form,
    param_of,
)
from moecc.codegen.onnx.ort_moe import (
    ort_computes_same,
    ort_moe_onnx,
    ort_qmoe_computes_same,
    ort_qmoe_onnx,
    session_options,
)
from moecc.codegen.onnx.ort_routed import (
    ort_moe_given_logits_onnx,
    ort_qmoe_given_routing_onnx,
    use_given_routing,
)
from moecc.codegen.onnx.quant import cannot_quantize, quantize
from moecc.codegen.onnx.scalar_constants import keep_scalar_constants
from moecc.codegen.onnx.sorted_experts import grouped_matmul_onnx, nbits_fit, sort_experts, sortable
from moecc.codegen.onnx.stitch import stitch
from moecc.errors import BackendError, first_line
from moecc.files import OwnedFolder
from moecc.logs import hush_torch_deprecations, quiet, slow_step, stderr_to_debug
from moecc.match import MatchResult
from moecc.module_state import program_writes
from moecc.passes.base import layers_of
from moecc.passes.graph_utils import (
    block_path,
    eliminate_dead_code,
    op_arguments,
    parameter_through_casts,
)
from moecc.passes.recognize.block import offloaded_weights

log = logging.getLogger("moecc.codegen.onnx")
PROVIDER = "CPUExecutionProvider"
ONNX_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
ROUTED_IN_PLAIN_OPS = "routed in plain ONNX ops, a MatMul per expert on its sorted rows"
ROUTED_QUANTIZED = "routed in plain ONNX ops, a com.microsoft.MatMulNBits per expert on its sorted rows"


def use_ort_moe(gm: fx.GraphModule, quant=None) -> dict[str, str]:
    """Swap each fused_moe for the sorted, routed form in plain ops (``sorted_experts``; with ``quant``, a
    QuantSpec, a MatMulNBits per expert), or for com.microsoft.MoE / QMoE (``ort_moe``, ``ort_routed``) where ORT
    computes the same and ``ops_first`` says they go first, saying why a form did not take a block. A block is
    quantized wherever one of the forms can."""
    import moecc.codegen.onnx.ort_moe  # noqa: F401 - registers moecc::ort_moe

    lowering = {}
    owner = {info.graph_prefix: info for info in layers_of(gm).values()}
    op_first = ops_first(quant)
    for moe in [n for n in gm.graph.nodes if n.target is torch.ops.moecc.fused_moe.default]:
        m = op_arguments(moe)
        prefix = bank_prefix(m)
        if not (found := sortable(gm, m)):  # every routed form, op or not, reads the weights as initializers
            lowering[prefix] = f"decomposed into every expert on every token ({found.reason})"
            if quant is not None and prefix in owner:
                owner[prefix].quantization = f"none: {found.reason}; weights stay float"
            continue
        reasons = []  # why the forms tried first did not take the block
        fits = None if quant is None else _quantized_sort_fit(gm, m, quant)
        if quant is not None and not op_first:
            if fits:
                lowering[prefix] = _sort_quantized(gm, moe, m, prefix, quant, owner)
                continue
            reasons.append(fits.reason)
        if quant is not None or op_first:
            # with quant, a float op only where no form holds the block quantized
            float_ok = quant is None or not fits
            routed_by_op = _use_ort_moe(gm, moe, m, prefix, quant, owner, float_ok)
            if routed_by_op:
                lowering[prefix] = routed_by_op.value
                continue
            given = use_given_routing(gm, moe, m, prefix, quant, float_ok)
            if given:
                op, float_why = given.value
                lowering[prefix] = f"{op} given moecc's routing ({routed_by_op.reason})"
                if quant is not None and prefix in owner:
                    owner[prefix].quantization = f"none: {float_why}" if float_why else quant.describe()
                continue
            reasons += [routed_by_op.reason, given.reason]
        if quant is not None and op_first:
            if fits:
                how = _sort_quantized(gm, moe, m, prefix, quant, owner)
                lowering[prefix] = f"{how}: {'; '.join(dict.fromkeys(reasons))}"
                continue
            reasons.append(fits.reason)
        reasons = list(dict.fromkeys(reasons))
        sort_experts(gm, moe, m)
        lowering[prefix] = ": ".join((ROUTED_IN_PLAIN_OPS, "; ".join(reasons))) if reasons else ROUTED_IN_PLAIN_OPS
        if quant is not None and prefix in owner and not owner[prefix].quantization:
            owner[prefix].quantization = f"none: {'; '.join(reasons)}; weights stay float"
    eliminate_dead_code(gm.graph)
    for prefix, how in lowering.items():
        if prefix in owner:
            owner[prefix].lowering = how
            if quant is not None and owner[prefix].quantization.startswith("none: "):
                log.warning("MoE block %s is not quantized (%s): %s", owner[prefix].name, quant.describe(),
                            owner[prefix].quantization[len("none: "):])
    return lowering


def ops_first(quant) -> bool:
    """Whether com.microsoft.MoE / QMoE are tried before the sorted form. On this project's CPU (RESULTS.md,
    sessions 46-47) the sorted form was 1.1x-2.5x faster than com.microsoft.MoE in 20 of 21 cells, and its
    MatMulNBits form 1.7x-7x faster than QMoE for int4 weights and 2x-15x with int8 activations; but ONNX Runtime
    has no float-activation kernel for int8 MatMulNBits (it dequantizes each call), where QMoE was 1.2x-4x
    faster: int8 weights with float activations go to QMoE first. ``MOECC_ORT_MOE_OP=1``: the ops first."""
    if knobs.ORT_MOE_OP.get():
        return True
    return quant is not None and quant.bits == 8 and not quant.int8_activations


def _quantized_sort_fit(gm: fx.GraphModule, m: dict, quant) -> MatchResult[None]:
    """Whether the sorted form holds this (``sortable``) block's experts quantized as ``quant``, or why not.
    Changes nothing."""
    w_up, w_down, _, _ = canonical_experts(gm, m)
    return nbits_fit(quant, w_up, w_down)


def _sort_quantized(gm: fx.GraphModule, moe: fx.Node, m: dict, prefix: str, quant, owner: dict) -> str:
    """The sorted form with experts quantized as ``quant`` (a MatMulNBits per expert), where
    ``_quantized_sort_fit`` said it fits: the lowering."""
    sort_experts(gm, moe, m, quant)
    if prefix in owner:
        owner[prefix].quantization = quant.describe()
    return ROUTED_QUANTIZED


# On onnxruntime 1.30 and 1.31, com.microsoft.MoE with normalize_routing_weights=0 matched its reference on probe
# graphs but not inside whole models (Qwen2-MoE, OLMoE: 1e-2 off; exposing its input or output as a graph output
# mended it, so it reads memory it did not write); 1.32 agrees (RESULTS.md, session 47)
UNNORMALIZED_MOE_FROM = (1, 32)


def ort_version() -> tuple[int, ...]:
    import onnxruntime

    return tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())


def unnormalized_moe_trusted() -> bool:
    """Whether the installed onnxruntime's MoE ops may route a block that does not renormalise (1.32 on)."""
    return ort_version() >= UNNORMALIZED_MOE_FROM


def unnormalized_moe_refused() -> str:
    """Why the installed onnxruntime's MoE ops do not route a block that does not renormalise (below 1.32)."""
    return (f"onnxruntime {'.'.join(map(str, ort_version()))}'s MoE ops without renormalisation can give other "
            "numbers inside whole models than on their probes (com.microsoft.MoE on 1.30 and 1.31; 1.32 agrees)")


def ort_routing(gm: fx.GraphModule, m: dict) -> MatchResult[tuple]:
    """Whether com.microsoft.MoE routes the fused_moe call of ``op_arguments`` ``m`` itself and computes its experts
    (a probe of the installed ORT): (route arguments, OrtForm, router weight, router bias, per-expert scale,
    canonical experts), or why not. Changes nothing."""
    weights = m["weights"]
    route = weights.args[0] if weights.target is operator.getitem else None
    if route is None or route.target is not torch.ops.moecc.fused_route.default:
        return MatchResult.fail("routing is not a fused moecc route")
    r = op_arguments(route)
    form = ort_form(r, m)
    w_up, w_down, b_up, b_down = canonical_experts(gm, m)
    if w_up is None:
        return MatchResult.fail("the expert weights are computed in the graph: com.microsoft.MoE takes initializers")
    router_b = param_of(gm, r["router_bias"])
    f = form.value
    num_experts = int(w_up.shape[0])
    router_w_node = parameter_through_casts(r["router_weight"])  # ORT scores in fp32 whatever the cast
    router_w = param_of(gm, router_w_node)
    if form and router_w is not None and int(router_w.shape[0]) != num_experts:
        form = MatchResult.fail(f"the router scores {int(router_w.shape[0])} experts and the bank holds "
                                f"{num_experts}: com.microsoft.MoE has no experts that compute nothing")
    if form and not ort_computes_same(f.activation_type, f.normalize, int(r["top_k"]),
                                      b_up is not None or b_down is not None, f.alpha, f.beta, f.limit,
                                      num_experts):
        form = MatchResult.fail(f"the installed onnxruntime's com.microsoft.MoE({form.value.activation_type}) "
                                "does not match on probe data")
    if form and not f.normalize and not unnormalized_moe_trusted():
        form = MatchResult.fail(unnormalized_moe_refused())
    per_expert = r["expert_scale"]
    per_expert_value = param_of(gm, per_expert)
    if form and per_expert is not None and per_expert_value is None:
        form = MatchResult.fail("the per-expert scale of the routing weights is computed in the graph")
    if not form or router_w_node is None or (r["router_bias"] is not None and router_b is None):
        return MatchResult.fail(form.reason or "router weights are not constants")
    return MatchResult.success((r, form.value, router_w, router_b, per_expert_value, (w_up, w_down, b_up, b_down)))


def _use_ort_moe(gm: fx.GraphModule, moe: fx.Node, m: dict, prefix: str, quant, owner: dict,
                 float_ok: bool = True) -> MatchResult[str]:
    """Swap ``moe`` and its fused_route for moecc::ort_moe or ort_qmoe (the float op where ``quant`` asked for
    quantized experts only with ``float_ok``): the lowering, or why ORT does not route this block itself."""
    routing = ort_routing(gm, m)
    if not routing:
        return MatchResult.fail(routing.reason)
    r, f, router_w, router_b, per_expert_value, (w_up, w_down, b_up, b_down) = routing.value
    num_experts = int(w_up.shape[0])
    scale = float(r["scale"])
    unfit = None if quant is None else cannot_quantize(quant, w_up, w_down)
    use_q = quant is not None and unfit is None and ort_qmoe_computes_same(
        f.activation_type, f.normalize, int(r["top_k"]), b_up is not None or b_down is not None, f.alpha,
        f.beta, f.limit, quant.bits, quant.block_size, quant.int8_activations, num_experts)
    if quant is not None and not use_q:
        float_why = unfit or f"com.microsoft.QMoE({f.activation_type}) does not match on probe data"
        if not float_ok:
            return MatchResult.fail(float_why)
        if prefix in owner:
            owner[prefix].quantization = f"none: {float_why}"
    fc1, fc1_b = ort_fc1(w_up, b_up, f.activation_type)
    # the routed scaling factor, and each expert's own (Gemma 4's), fold into the second projection, which ORT
    # holds in a copy of its own anyway: sum_j s_e(j)*w_j*f_e(j)(x) = sum_j w_j*(s_e(j)*f_e(j)(x))
    if per_expert_value is not None:  # one pass over the projection, both factors at once
        factor = scale * per_expert_value.detach().float().reshape(num_experts)
        fc2 = w_down.float() * factor[:, None, None]
        fc2_b = None if b_down is None else b_down.float() * factor[:, None]
    else:
        fc2, fc2_b = (w_down, b_down) if scale == 1.0 else (w_down * scale,
                                                             None if b_down is None else b_down * scale)
    tensors = [("ort_router_w_t", router_w.t()), ("ort_router_b", router_b)]
    if use_q:
        fc1_q, fc1_s = quantize(fc1.detach(), quant)
        fc2_q, fc2_s = quantize(fc2.detach(), quant)
        tensors += [("ort_fc1_q", fc1_q), ("ort_fc1_s", fc1_s), ("ort_fc1_b", fc1_b), ("ort_fc2_q", fc2_q),
                    ("ort_fc2_s", fc2_s), ("ort_fc2_b", fc2_b)]
    else:
        tensors += [("ort_fc1", fc1), ("ort_fc1_b", fc1_b), ("ort_fc2", fc2), ("ort_fc2_b", fc2_b)]
    names = held_buffers(gm, moe, prefix, tensors)
    # the router may read other tokens than the experts (a norm of its input alone)
    router_x = () if r["x"] is m["x"] else (r["x"],)
    common = (int(r["top_k"]), f.activation_type, f.normalize, f.alpha, f.beta, f.limit)
    with gm.graph.inserting_before(moe):
        if use_q:
            new = gm.graph.call_function(torch.ops.moecc.ort_qmoe.default, (
                m["x"], names["ort_router_w_t"], names["ort_router_b"], names["ort_fc1_q"],
                names["ort_fc1_s"], names["ort_fc1_b"], names["ort_fc2_q"], names["ort_fc2_s"],
                names["ort_fc2_b"], *common, quant.bits, quant.block_size, quant.int8_activations, *router_x))
        else:
            new = gm.graph.call_function(torch.ops.moecc.ort_moe.default, (
                m["x"], names["ort_router_w_t"], names["ort_router_b"], names["ort_fc1"],
                names["ort_fc1_b"], names["ort_fc2"], names["ort_fc2_b"], *common, *router_x))
    moe.replace_all_uses_with(new)
    gm.graph.erase_node(moe)
    if use_q and prefix in owner:
        owner[prefix].quantization = quant.describe()
    return MatchResult.success("com.microsoft.QMoE" if use_q else "com.microsoft.MoE")


def decompose(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in DECOMPOSITIONS:
            node.target = DECOMPOSITIONS[node.target]
        elif node.op == "call_function" and str(node.target).startswith("moecc."):
            if node.target not in (torch.ops.moecc.ort_moe.default, torch.ops.moecc.ort_qmoe.default,
                                   torch.ops.moecc.ort_moe_given_logits.default,
                                   torch.ops.moecc.ort_qmoe_given_routing.default):
                raise ValueError(f"the ONNX backend cannot lower {node.target} (node {node.name})")
    gm.recompile()


SKIP_LOWERING = "moecc.compile(..., backend='torch') runs the captured program without it"


def to_onnx(gm: fx.GraphModule, example: list[torch.Tensor], path: str) -> str:
    """Export the lowered graph with dynamic token dims; weights go to external data beside ``path``."""
    from moecc.capture import unaliased

    example = unaliased(example)
    cached = export_cache.lookup(gm, example, path)
    if cached is not None:
        if export_cache.restore(cached, path):
            return path
        if (failed := export_cache.failure(cached)) is not None:
            error, backend_error = failed
            log.info("not exporting to ONNX again: the export of this program failed before (%s); "
                     "MOECC_ONNX_CACHE=0 exports it again", error)
            raise (BackendError if backend_error else export_cache.FailedBefore)(error)
    try:
        prog = _exported(gm, example)
    except Exception as exc:
        if cached is not None:
            export_cache.remember_failure(cached, exc)
        raise
    with slow_step(log, f"writing {path}"):
        prog.save(path, external_data=True)
    if cached is not None:
        export_cache.store(cached, path)
    return path


def _exported(gm: fx.GraphModule, example: list) -> torch.onnx.ONNXProgram:
    prog = _export_by_layers(gm, example) if knobs.ONNX_REPEATS.get() else None
    if prog is None:
        prog = _export(gm, example, _ops(gm))
        _optimize(prog)
        if (why := _program_writes(prog)) is not None:
            raise BackendError(why)
    return prog


def _ops(gm: fx.GraphModule) -> str:
    ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module")
    return f"{ops} ops" + (f" and {calls} block call(s)" if calls else "")


def _export(gm: fx.GraphModule, example: list, what: str) -> torch.onnx.ONNXProgram:
    shapes = []
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        val = node.meta.get("val")
        symbolic = [] if val is None else [i for i, d in enumerate(val.shape) if not isinstance(d, int)]
        shapes.append({i: torch.export.Dim.AUTO for i in symbolic})
    with warnings.catch_warnings(), stderr_to_debug(log, "torch.onnx.export"), quiet(ONNX_REGISTRY_LOGGER), \
            slow_step(log, f"exporting {what} to ONNX (torch.onnx.export)", SKIP_LOWERING):
        # the graph's ops are fixed by now; an exported program's module refuses eval(), so it stays in train mode
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        hush_torch_deprecations()
        return torch.onnx.export(gm, tuple(example), dynamo=True, dynamic_shapes=tuple(shapes), optimize=False,
                                 custom_translation_table={torch.ops.moecc.ort_moe.default: ort_moe_onnx,
                                                           torch.ops.moecc.ort_qmoe.default: ort_qmoe_onnx,
                                                           torch.ops.moecc.ort_moe_given_logits.default:
                                                               ort_moe_given_logits_onnx,
                                                           torch.ops.moecc.ort_qmoe_given_routing.default:
                                                               ort_qmoe_given_routing_onnx,
                                                           torch.ops.moecc.grouped_matmul.default:
                                                               grouped_matmul_onnx,
                                                           torch.ops.moecc.grouped_matmul_nbits.default:
                                                               grouped_matmul_nbits_onnx},
                                 verbose=False)


def _optimize(prog: torch.onnx.ONNXProgram) -> None:
    with warnings.catch_warnings(), stderr_to_debug(log, "the ONNX optimizer"), quiet(ONNX_REGISTRY_LOGGER), \
            slow_step(log, f"optimizing an ONNX graph of {len(prog.model.graph)} nodes", SKIP_LOWERING):
        onnxscript.optimizer.fold_constants(prog.model)  # a constant computed from others (``alpha * c``)
        if rewritten := keep_scalar_constants(prog.model):
            log.debug("%d ops of a scalar constant near 0 or 1 written to survive the optimizer", rewritten)
        optimize(prog)


def _program_writes(prog: torch.onnx.ONNXProgram) -> str | None:
    """What the export made of writes ``program_writes`` missed, as ``_writes`` says it."""
    signature = prog.exported_program.graph_signature
    return _writes(list(signature.user_inputs_to_mutate.values()), list(signature.buffers_to_mutate.values()))


def _export_by_layers(gm: fx.GraphModule, example: list) -> torch.onnx.ONNXProgram | None:
    """The program exported one distinct segment at a time and stitched together (``repeated_layers``), or None
    where it does not repeat enough to pay, or cannot be cut (said at debug or info level)."""
    try:
        found = repeated_layers.plan(gm)
    except repeated_layers.NotRepeated as exc:
        log.debug("exporting the whole program: %s", exc)
        return None
    except Exception as exc:  # noqa: BLE001 - a graph the cut does not know must still export whole
        log.info("exporting the whole program, not layer by layer: %s", first_line(exc))
        return None
    try:
        examples = repeated_layers.segment_examples(gm, example, found)
        exports = {}
        for n, (signature, sub) in enumerate(found.programs.items()):
            prog = _export(sub, examples[signature], f"distinct segment {n + 1} of {len(found.programs)} "
                                                     f"({_ops(sub)}, {len(found.segments)} segments in all)")
            _optimize(prog)
            if (why := _program_writes(prog)) is not None:
                raise repeated_layers.NotRepeated(why)
            exports[signature] = prog.model
        with slow_step(log, f"stitching {len(found.segments)} segments into one ONNX graph"):
            model = stitch(gm, found, exports)
    except Exception as exc:  # noqa: BLE001 - a shortcut: the whole export below is the one that must work
        log.info("exporting the whole program, not layer by layer: %s", first_line(exc))
        return None
    log.debug("exported %d distinct segments for %d, %d ops not exported again", len(found.programs),
              len(found.segments), found.ops_saved)
    return torch.onnx.ONNXProgram(model, None)


def _writes(inputs: list[str], buffers: list[str]) -> str | None:
    """Why ONNX Runtime cannot run a program that writes into its inputs or the model's buffers, or None: its
    outputs are new arrays, so the writes (a cache filled in place, a step count) would be lost."""
    inputs = [f"tensor argument {n.removeprefix('tensors_')}" if n.removeprefix("tensors_").isdigit() else n
              for n in sorted(set(inputs))]
    buffers = sorted(set(buffers))
    if not inputs and not buffers:
        return None
    what = [f"its {', '.join(inputs)}"] if inputs else []
    what += [f"the model's buffer{'s' if len(buffers) > 1 else ''} "
             f"{', '.join(b.removeprefix('model.') for b in buffers)}"] if buffers else []
    return (f"the program writes into {' and '.join(what)} in place, and ONNX Runtime returns new arrays, so those "
            "writes would be lost: take backend='torch' (backend='auto' does)")


class OrtModule(nn.Module):
    """Runs an ONNX file with ONNX Runtime; inputs and outputs are torch tensors, in the graph's flat order."""

    def __init__(self, path: str, provider: str = PROVIDER, folder: OwnedFolder | None = None,
                 spin: bool = True) -> None:
        super().__init__()
        self.path = path
        self.folder = folder  # where ``path`` lies, when this module alone reads it: removed with the last copy
        self.provider = provider
        self.spin = spin  # ``session_options``
        self.session = self._open()
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _open(self):
        import onnxruntime as ort

        return ort.InferenceSession(self.path, session_options(self.spin), providers=[self.provider])

    def __getstate__(self):
        # a session cannot be pickled (copy.deepcopy of a compiled model pickles it): it is opened again from path
        return {k: v for k, v in super().__getstate__().items() if k != "session"}

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.session = self._open()

    def forward(self, *tensors):
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, tensors)}
        try:
            outputs = self.session.run(None, feeds)
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            # a kernel the provider lacks for a type (fp16 ScatterND with reduction add on the CPU, say) fails only
            # when the graph runs, not when it loads
            raise BackendError(f"ONNX Runtime could not run the exported program: {first_line(exc)}. "
                               f"{SKIP_LOWERING}") from exc
        return tuple(torch.from_numpy(o) for o in outputs)


def unsupported(gm: fx.GraphModule, example: list[torch.Tensor]) -> str | None:
    """Why ONNX Runtime cannot run this program, or None: a bfloat16 program on the CPU provider, or an empty
    input."""
    inputs = [t for t in example if isinstance(t, torch.Tensor)]
    tensors = [*gm.parameters(), *gm.buffers(), *inputs]
    if PROVIDER == "CPUExecutionProvider" and any(t.dtype == torch.bfloat16 for t in tensors):
        return ("ONNX Runtime's CPU provider has no bfloat16 kernels for MatMul or Gemm (and NumPy, which carries "
                "its inputs and outputs, has no bfloat16): run the model in float32 or float16 for ONNX Runtime, "
                "or take backend='torch'")
    if any(t.numel() == 0 for t in inputs):
        return ("the inputs are empty (a dim of size 0), and ONNX Runtime refuses the graph exported for them (a "
                "reshape of 0 elements with an inferred dim): take backend='torch' or 'auto' for empty batches")
    return None


def lower_to_ort(gm: fx.GraphModule, example: list[torch.Tensor], folder: str | None = None,
                 quant=None) -> OrtModule:
    from moecc.passes.cleanup import Cleanup

    if (why := unsupported(gm, example)) is not None:
        raise BackendError(why)
    written = program_writes(gm)
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    if (why := _writes([w for w in written if w not in attrs], [w for w in written if w in attrs])) is not None:
        raise BackendError(why)
    use_ort_moe(gm, quant)
    decompose(gm)
    as_real = complex_as_real(gm)
    if as_real.value:
        log.debug("%d ops on complex values written in real arithmetic", as_real.value)
    Cleanup()(gm)  # the canonical weights ort_moe replaced must not travel into the ONNX export
    owned = None if folder else OwnedFolder("moecc_onnx_")
    try:
        return _export_and_open(gm, example, folder or owned.path, owned, as_real)
    except BaseException:
        if owned is not None:
            owned.remove()
        raise


def _export_and_open(gm: fx.GraphModule, example: list[torch.Tensor], folder: str, owned: OwnedFolder | None,
                     as_real: MatchResult) -> nn.Module:
    """One ONNX Runtime session for the program; or, for a compile (``owned``), sessions for the parts between
    the blocks left as written that cannot go into an ONNX graph, which torch runs (``islands``)."""
    as_written = [n for n in gm.graph.nodes if n.op == "call_module"]
    offloaded = [n for n in as_written if offloaded_weights(gm.get_submodule(n.target))]
    if offloaded and owned is not None:
        # their export would copy the weights their hooks swap in into the graph
        return _blocks_on_torch(gm, example, folder, owned, offloaded, "their weights are offloaded")
    may_split = bool(as_written) and owned is not None
    if may_split and (why := block_that_does_not_export(gm, example, as_written, folder, to_onnx)) is not None:
        try:
            return _blocks_on_torch(gm, example, folder, owned, as_written, why)
        except Exception as exc:  # noqa: BLE001 - the whole export is the last resort, and its failure the one told
            log.debug("the program split at its blocks left as written did not lower: %s; exporting it whole",
                      first_line(exc))
            may_split = False
    try:
        return _open(gm, example, os.path.join(folder, "model.onnx"), owned)
    except BackendError:
        raise
    except Exception as exc:
        first = first_line(exc)
        if may_split:
            try:
                return _blocks_on_torch(gm, example, folder, owned, as_written, f"the whole export failed: {first}")
            except Exception as again:  # noqa: BLE001 - the first failure is the one to report
                log.debug("the program split at its blocks left as written did not lower either: %s",
                          first_line(again))
        names = [block_path(n) for n in as_written]
        hint = (f" MoE blocks left as written ({', '.join(names)}) are exported by tracing their Python code, "
                "which fails for data-dependent expert loops; moecc.compile with backend='torch' runs them as "
                "written.") if as_written else ""
        if not as_real:
            hint += f" Its complex values stayed complex: {as_real.reason}."
        raise BackendError(f"ONNX export failed: {first}.{hint}") from exc


def _blocks_on_torch(gm: fx.GraphModule, example: list, folder: str, owned: OwnedFolder, calls: list[fx.Node],
                     why: str) -> nn.Module:
    names = [block_path(n) for n in calls]
    log.info("%s run on torch between ONNX Runtime graphs: %s", ", ".join(names), why)
    # torch runs after each part: ONNX Runtime's threads spinning for more work would hold the cores it needs
    program = blocks_on_torch(gm, example, calls, folder,
                              lambda part, args, path: _open(part, args, path, owned, spin=False))
    layers = layers_of(gm)
    for name in names:
        if name in layers:
            layers[name].lowering = f"torch, between ONNX Runtime graphs ({why})"
    return program


def _open(gm: fx.GraphModule, example: list, path: str, owned: OwnedFolder | None, spin: bool = True) -> OrtModule:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    path = to_onnx(gm, example, path)
    try:
        with slow_step(log, "opening an ONNX Runtime session"):
            module = OrtModule(path, folder=owned, spin=spin)
    except Exception as exc:  # an op ONNX Runtime has no kernel for in this dtype (Softplus in bf16 on the CPU)
        raise BackendError(f"ONNX Runtime cannot load the exported graph: {first_line(exc)}") from exc
    takes = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(module.input_names) != takes:  # inputs are fed by position: one lost would shift the rest
        raise BackendError(f"the exported ONNX graph takes {len(module.input_names)} inputs where the program takes "
                           f"{takes}")
    return module
