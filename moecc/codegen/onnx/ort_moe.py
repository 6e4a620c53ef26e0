"""``moecc::ort_moe``: a MoE block in the exact form of ONNX Runtime's ``com.microsoft.MoE``.

Its reference is ORT's documented semantics (softmax over all experts, top-k, optional renormalisation; SwiGLU
``clamp(g, max=limit) * sigmoid(alpha * g) * (clamp(l, -limit, limit) + beta)`` on interleaved gate/up rows).
Whether the installed ORT really computes that is probed once per configuration, never assumed."""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("moecc.codegen.onnx")

ORT_ACTIVATIONS = ("relu", "gelu", "silu", "swiglu", "identity")


def _act(h: Tensor, activation_type: str, alpha: float, beta: float, limit: float) -> Tensor:
    if activation_type == "swiglu":
        g, lin = h[..., 0::2], h[..., 1::2]
        if limit > 0:
            g = g.clamp(max=limit)
            lin = lin.clamp(min=-limit, max=limit)
        return g * torch.sigmoid(alpha * g) * (lin + beta)
    if activation_type == "relu":
        return torch.relu(h)
    if activation_type == "gelu":
        return torch.nn.functional.gelu(h)
    if activation_type == "silu":
        return torch.nn.functional.silu(h)
    return h


@torch.library.custom_op("moecc::ort_moe", mutates_args=())
def ort_moe(x: Tensor, router_w_t: Tensor, router_b: Tensor | None, fc1_w: Tensor, fc1_b: Tensor | None,
            fc2_w: Tensor, fc2_b: Tensor | None, k: int, activation_type: str, normalize: bool, alpha: float,
            beta: float, limit: float, router_x: Tensor | None = None) -> Tensor:
    """x [T, H]; router_w_t [H, E]; fc1_w [E, F, H] (F = 2I interleaved for swiglu); fc2_w [E, H, I]. The weights
    are fp32 (the dtype the probes prove the op in): an x of another dtype is computed in fp32, as the ONNX
    translation does. ``router_x`` [T, H]: what the router reads, where it is not ``x`` (a norm of the router's
    input alone)."""
    x32 = x.to(router_w_t.dtype)
    logits = (x32 if router_x is None else router_x.to(router_w_t.dtype)) @ router_w_t
    if router_b is not None:
        logits = logits + router_b
    return experts_by_logits(x, logits, fc1_w, fc1_b, fc2_w, fc2_b, k, activation_type, normalize, alpha, beta,
                             limit)


def experts_by_logits(x: Tensor, logits: Tensor, fc1_w: Tensor, fc1_b: Tensor | None, fc2_w: Tensor,
                      fc2_b: Tensor | None, k: int, activation_type: str, normalize: bool, alpha: float, beta: float,
                      limit: float) -> Tensor:
    """The op past its router: softmax of ``logits``, top-k, optional renormalisation, the weighted experts; in the
    weights' dtype, cast back to ``x``'s."""
    probs = torch.softmax(logits.float(), -1)
    w, ids = torch.topk(probs, k, dim=-1)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    return experts_by_ids(x, ids, w, fc1_w, fc1_b, fc2_w, fc2_b, activation_type, alpha, beta, limit)


def experts_by_ids(x: Tensor, ids: Tensor, w: Tensor, fc1_w: Tensor, fc1_b: Tensor | None, fc2_w: Tensor,
                   fc2_b: Tensor | None, activation_type: str, alpha: float, beta: float, limit: float) -> Tensor:
    """Each token's experts ``ids`` [T, k] weighted by ``w`` [T, k] and summed, in the weights' dtype, cast back
    to ``x``'s."""
    dtype = x.dtype
    x = x.to(fc1_w.dtype)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(fc1_w.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        y = expert_ffn(x[tok], e, fc1_w, fc1_b, fc2_w, fc2_b, activation_type, alpha, beta, limit)
        out.index_add_(0, tok, y.float() * w[tok, slot, None])
    return out.to(dtype)


def expert_ffn(xs: Tensor, e: int, fc1_w: Tensor, fc1_b: Tensor | None, fc2_w: Tensor, fc2_b: Tensor | None,
               activation_type: str, alpha: float, beta: float, limit: float) -> Tensor:
    """Expert ``e`` of the op on rows ``xs``."""
    h = xs @ fc1_w[e].t()
    if fc1_b is not None:
        h = h + fc1_b[e]
    y = _act(h, activation_type, alpha, beta, limit) @ fc2_w[e].t()
    return y if fc2_b is None else y + fc2_b[e]


@ort_moe.register_fake
def _ort_moe_fake(x, *args):
    return torch.empty_like(x)


@functools.lru_cache(maxsize=None)
def contrib_schema(name: str, domain: str = "com.microsoft"):
    """ORT's own schema of a contrib op, registered with onnx so onnxscript can emit the op."""
    import onnx
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    try:
        return onnx.defs.get_schema(name, 1, domain)
    except onnx.defs.SchemaError:
        pass
    src = next(s for s in ort_c.get_all_operator_schema() if s.name == name and s.domain == domain)
    option = {str(o): o for o in onnx.defs.OpSchema.FormalParameterOption.__members__.values()}
    attr_type = onnx.defs.OpSchema.AttrType.__members__

    def formal(p):
        return onnx.defs.OpSchema.FormalParameter(
            p.name, p.typeStr, param_option=option[str(p.option)])

    schema = onnx.defs.OpSchema(
        name, domain, src.since_version, inputs=[formal(p) for p in src.inputs],
        outputs=[formal(p) for p in src.outputs],
        type_constraints=[(c.type_param_str, list(c.allowed_type_strs), "") for c in src.type_constraints],
        attributes=[onnx.defs.OpSchema.Attribute(a.name, attr_type[str(a.type).split(".")[-1]], required=False)
                    for a in src.attributes.values()])
    onnx.defs.register_schema(schema)
    return onnx.defs.get_schema(name, src.since_version, domain)


def ort_moe_onnx(x, router_w_t, router_b, fc1_w, fc1_b, fc2_w, fc2_b, k, activation_type, normalize, alpha, beta,
                 limit, router_x=None):
    """The translation torch.onnx uses for ``moecc::ort_moe``."""
    import onnxscript
    from onnxscript import opset18 as op

    moe_op = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MoE", contrib_schema("MoE"))
    x_in, x = x, _in_fp32(op, x, router_w_t)
    logits = op.MatMul(x if router_x is None else _in_fp32(op, router_x, router_w_t), router_w_t)
    if router_b is not None:
        logits = op.Add(logits, router_b)
    inputs = [x, logits, fc1_w, fc1_b, fc2_w, fc2_b]
    while inputs[-1] is None:
        inputs.pop()
    return _back(op, moe_op(*inputs, **_moe_attrs(k, activation_type, normalize, alpha, beta, limit)), x_in, x)


def _in_fp32(op, x, router_w_t):
    """x in the dtype of the (fp32) weights: ONNX Runtime's MoE ops take one type for all their float inputs, and
    fp16 or bf16 blocks get fp32 weights (the dtype the probes checked)."""
    return x if getattr(x, "dtype", None) == getattr(router_w_t, "dtype", None) else op.CastLike(x, router_w_t)


def _back(op, y, x_in, x):
    return y if x is x_in else op.CastLike(y, x_in)


def _moe_attrs(k, activation_type, normalize, alpha, beta, limit) -> dict:
    """com.microsoft.MoE/QMoE attributes: routing, activation, and SwiGLU on interleaved gate/up rows."""
    attrs = dict(k=k, activation_type=activation_type, normalize_routing_weights=int(normalize))
    if activation_type == "swiglu":
        attrs.update(swiglu_fusion=1, activation_alpha=alpha, activation_beta=beta)
        if limit > 0:
            attrs["swiglu_limit"] = limit
    return attrs


LOGIT_SCALES = (0.05, 1.0)  # near-uniform and peaked router logits: an op must match on both


def session_options(spin: bool = True):
    """ONNX Runtime session options for every session moecc opens: intra-op threads from ``MOECC_ORT_THREADS``,
    spin-waiting after a run from ``MOECC_ORT_SPIN``. Spinning threads took a torch matmul run right after an ORT
    call to twice its time, while a generate loop (little torch work between calls) was 8 % faster with them
    (RESULTS.md, session 44). ONNX Runtime's own log prints fatal errors only, unless moecc's log is at debug: a
    run that fails raises its status as an exception, which moecc reports or acts on (a probe, ``auto``'s torch
    program), so the error ONNX Runtime also prints would stand beside a compile that went on. ``spin=False``:
    never spin, whatever the knob (a session that torch work follows at every call)."""
    import onnxruntime as ort

    from moecc import knobs

    options = ort.SessionOptions()
    if not logging.getLogger("moecc").isEnabledFor(logging.DEBUG):
        options.log_severity_level = 4
    threads = knobs.ORT_THREADS.get()
    if threads < 0:
        raise ValueError(f"MOECC_ORT_THREADS must be 0 (ONNX Runtime's default) or a thread count, got {threads}")
    if threads:
        options.intra_op_num_threads = threads
    if not spin or not knobs.ORT_SPIN.get():
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


PROBE_IR_VERSION = 10


def _run_one_node(op: str, input_names: list[str], attrs: dict, inits: dict, feeds: dict, provider: str,
                  out_shape: list[int] | None = None):
    """Run a single com.microsoft node on ``feeds`` (torch tensors); its output (of ``out_shape``, else of x's), or
    the exception ORT raised."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node(op, input_names, ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], "probe", [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in feeds.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape or list(feeds["x"].shape))],
        [numpy_helper.from_array(v.numpy(), n) for n, v in inits.items() if v is not None])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    try:
        # the installed onnx writes its newest IR version by default, which an older ORT refuses (IR 14 on ORT
        # 1.30: every probe failed there, and no MoE op ran); opset 18 needs IR 8
        model = helper.make_model(graph, opset_imports=opsets, ir_version=PROBE_IR_VERSION)
        sess = ort.InferenceSession(model.SerializeToString(),
                                    session_options(), providers=[provider])
        return sess.run(None, {n: v.numpy() for n, v in feeds.items()})[0]
    except Exception as exc:  # noqa: BLE001 - not implemented on this provider: the caller decomposes
        return exc


def _rel_error(y: np.ndarray, ref: Tensor) -> float:
    return float(np.linalg.norm(y - ref.numpy()) / np.linalg.norm(ref.numpy()))


@functools.lru_cache(maxsize=None)
def ort_computes_same(activation_type: str, normalize: bool, k: int, has_bias: bool, alpha: float, beta: float,
                      limit: float, num_experts: int = 0, provider: str = "CPUExecutionProvider") -> bool:
    """Run one com.microsoft.MoE node on random data and compare it with ``ort_moe``'s reference."""
    g = torch.Generator().manual_seed(7)
    # the block's own E and k, enough tokens, and both near-uniform logits (as from a real router, where a
    # renormalisation the op does or skips shows) and peaked ones
    t, h, inter, e = 48, 16, 8, max(num_experts, 2 * k, 4)
    fusion = 2 if activation_type == "swiglu" else 1
    x = torch.randn(t, h, generator=g)
    router = torch.randn(h, e, generator=g)
    fc1 = torch.randn(e, fusion * inter, h, generator=g) * 0.3
    fc2 = torch.randn(e, h, inter, generator=g) * 0.3
    b1 = torch.randn(e, fusion * inter, generator=g) if has_bias else None
    b2 = torch.randn(e, h, generator=g) if has_bias else None
    names = ["x", "logits", "fc1", "b1" if has_bias else "", "fc2", "b2" if has_bias else ""]
    err = 0.0
    for r in (router * LOGIT_SCALES[0], router * LOGIT_SCALES[1]):
        ref = ort_moe(x, r, None, fc1, b1, fc2, b2, k, activation_type, normalize, alpha, beta, limit)
        y = _run_one_node("MoE", names, _moe_attrs(k, activation_type, normalize, alpha, beta, limit),
                          {"fc1": fc1, "fc2": fc2, "b1": b1, "b2": b2}, {"x": x, "logits": x @ r}, provider)
        if isinstance(y, Exception):
            log.info("com.microsoft.MoE(%s) not usable on %s: %s", activation_type, provider, y)
            return False
        err = max(err, _rel_error(y, ref))
    same = err < 1e-5
    log.info("com.microsoft.MoE(%s, normalize=%s, k=%d, bias=%s) on %s: relative error %.1e -> %s", activation_type,
             normalize, k, has_bias, provider, err, "used" if same else "decomposed")
    return same


@torch.library.custom_op("moecc::ort_qmoe", mutates_args=())
def ort_qmoe(x: Tensor, router_w_t: Tensor, router_b: Tensor | None, fc1_q: Tensor, fc1_scales: Tensor,
             fc1_b: Tensor | None, fc2_q: Tensor, fc2_scales: Tensor, fc2_b: Tensor | None, k: int,
             activation_type: str, normalize: bool, alpha: float, beta: float, limit: float, bits: int,
             block_size: int, int8_activations: bool, router_x: Tensor | None = None) -> Tensor:
    """``com.microsoft.QMoE``: ``ort_moe`` with weights dequantized from packed uint8 (with int8 activations ORT
    also rounds the activations, which this reference does not model)."""
    fc1, fc2 = dequantized_experts(fc1_q, fc1_scales, fc2_q, fc2_scales, x.shape[-1], activation_type, bits,
                                   block_size, int8_activations)
    return ort_moe(x, router_w_t, router_b, fc1, fc1_b, fc2, fc2_b, k, activation_type, normalize, alpha, beta, limit,
                   router_x)


def dequantized_experts(fc1_q: Tensor, fc1_scales: Tensor, fc2_q: Tensor, fc2_scales: Tensor, hidden: int,
                        activation_type: str, bits: int, block_size: int,
                        int8_activations: bool) -> tuple[Tensor, Tensor]:
    """The float first and second projections of packed QMoE experts."""
    from moecc.codegen.onnx.quant import QuantSpec, dequantize

    spec = QuantSpec(bits, block_size, int8_activations)
    fc1 = dequantize(fc1_q, fc1_scales, spec, hidden)
    return fc1, dequantize(fc2_q, fc2_scales, spec, fc1.shape[1] // (2 if activation_type == "swiglu" else 1))


@ort_qmoe.register_fake
def _ort_qmoe_fake(x, *args):
    return torch.empty_like(x)


def _qmoe_attrs(k, activation_type, normalize, alpha, beta, limit, bits, block_size, int8_activations=False):
    attrs = _moe_attrs(k, activation_type, normalize, alpha, beta, limit)
    attrs["expert_weight_bits"] = bits
    if int8_activations:
        attrs["accuracy_level"] = 4
    if block_size:
        attrs["block_size"] = block_size
    return attrs


def ort_qmoe_onnx(x, router_w_t, router_b, fc1_q, fc1_scales, fc1_b, fc2_q, fc2_scales, fc2_b, k, activation_type,
                  normalize, alpha, beta, limit, bits, block_size, int8_activations, router_x=None):
    import onnxscript
    from onnxscript import opset18 as op

    qmoe = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "QMoE", contrib_schema("QMoE"))
    x_in, x = x, _in_fp32(op, x, router_w_t)
    logits = op.MatMul(x if router_x is None else _in_fp32(op, router_x, router_w_t), router_w_t)
    if router_b is not None:
        logits = op.Add(logits, router_b)
    inputs = [x, logits, fc1_q, fc1_scales, fc1_b, fc2_q, fc2_scales, fc2_b]
    if not normalize:
        # QMoE renormalises the gathered top-k weights whatever the attribute says (seen on ORT 1.32, CPU); mixing
        # weights given as router_weights are used as they are
        inputs += [None] * 6 + [op.Softmax(logits, axis=-1)]
    while inputs[-1] is None:
        inputs.pop()
    return _back(op, qmoe(*inputs, **_qmoe_attrs(k, activation_type, normalize, alpha, beta, limit, bits,
                                                  block_size, int8_activations)), x_in, x)


@functools.lru_cache(maxsize=None)
def ort_qmoe_computes_same(activation_type: str, normalize: bool, k: int, has_bias: bool, alpha: float,
                           beta: float, limit: float, bits: int, block_size: int, int8_activations: bool = False,
                           num_experts: int = 0, provider: str = "CPUExecutionProvider") -> bool:
    """Probe com.microsoft.QMoE against ``ort_qmoe``'s dequantized reference, as for the float op."""
    from moecc.codegen.onnx.quant import QuantSpec, quantize

    spec = QuantSpec(bits, block_size, int8_activations)
    g = torch.Generator().manual_seed(9)
    t, h, inter, e = 48, 64, 32, max(num_experts, 2 * k, 4)  # as for the float probe
    fusion = 2 if activation_type == "swiglu" else 1
    x = torch.randn(t, h, generator=g)
    router = torch.randn(h, e, generator=g)
    fc1_q, fc1_s = quantize(torch.randn(e, fusion * inter, h, generator=g) * 0.2, spec)
    fc2_q, fc2_s = quantize(torch.randn(e, h, inter, generator=g) * 0.2, spec)
    b1 = torch.randn(e, fusion * inter, generator=g) if has_bias else None
    b2 = torch.randn(e, h, generator=g) if has_bias else None
    names = ["x", "logits", "fc1", "s1", "b1" if has_bias else "", "fc2", "s2", "b2" if has_bias else ""]
    if not normalize:  # as ort_qmoe_onnx emits it
        names += [""] * 6 + ["rw"]
    attrs = _qmoe_attrs(k, activation_type, normalize, alpha, beta, limit, bits, block_size, int8_activations)
    err = 0.0
    for r in (router * LOGIT_SCALES[0], router * LOGIT_SCALES[1]):
        ref = ort_qmoe(x, r, None, fc1_q, fc1_s, b1, fc2_q, fc2_s, b2, k, activation_type, normalize, alpha, beta,
                       limit, bits, block_size, int8_activations)
        feeds = {"x": x, "logits": x @ r}
        if not normalize:
            feeds["rw"] = torch.softmax(x @ r, -1)
        y = _run_one_node("QMoE", names, attrs, {"fc1": fc1_q, "fc2": fc2_q, "s1": fc1_s, "s2": fc2_s, "b1": b1,
                                                  "b2": b2}, feeds, provider)
        if isinstance(y, Exception):
            log.info("com.microsoft.QMoE(int%d) not usable on %s: %s", bits, provider, y)
            return False
        err = max(err, _rel_error(y, ref))
    log.info("com.microsoft.QMoE(%s, int%d, block %d) on %s: relative error %.1e", activation_type, bits, block_size,
             provider, err)
    # int8 activations are rounded by ORT only: the probe then checks layout and semantics, not the last digits
    return err < (3e-2 if int8_activations else 1e-4)
