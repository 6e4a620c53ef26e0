"""ORT backend and ahead-of-time artifacts: export -> load in a fresh process -> equal to eager."""

import copy
import json
import logging
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from hf_models import FAMILIES, make_inputs, make_model, switch_drops_past_capacity

import moecc
from moecc.codegen.onnx.lower import unnormalized_moe_refused, unnormalized_moe_trusted
from moecc.logs import hush_torch_deprecations


@pytest.fixture(autouse=True)
def _ort_moe_op(monkeypatch):
    """These tests check where ONNX Runtime's com.microsoft.MoE runs a block, or is handed its routing: the op is
    taken only with MOECC_ORT_MOE_OP on (the faster default, the sorted form in plain ops: test_sorted_experts)."""
    monkeypatch.setenv("MOECC_ORT_MOE_OP", "1")


# Where com.microsoft.MoE computes the block's routing itself on the CPU provider, and where it is handed moecc's
# (sigmoid scores, a selection bias, group-limited top-k, a capacity: ``ort_routed``).
ROUTES_ITSELF = {"mixtral": True, "qwen2_moe": True, "qwen3_moe": True, "olmoe": True, "gpt_oss": True,
                 "deepseek_v3": False, "switch_transformers": False, "afmoe": False, "cohere2_moe": True,
                 "dbrx": True, "ernie4_5_moe": False, "llama4_text": False, "deepseek_v2": False}
# top-k of a softmax, not renormalised: the op routes these itself only from onnxruntime 1.32 (lower.ort_routing)
UNNORMALIZED = ("qwen2_moe", "olmoe", "switch_transformers")
ONNX_FAMILIES = [*FAMILIES, "deepseek_v2"]  # DeepSeek-V2's and Llama 4's rotary embeddings are complex-valued

LOAD_AND_CHECK = textwrap.dedent("""
    import sys, torch
    import moecc
    m = moecc.load(sys.argv[1])
    kwargs, ref = torch.load(sys.argv[2], weights_only=False)
    out = m(**kwargs)
    got = out.logits
    err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    assert "transformers" not in sys.modules, "loading imported transformers"
    print("ERR", err)
""")


@pytest.mark.parametrize("family", ONNX_FAMILIES)
def test_export_then_load_in_fresh_process(family, tmp_path):
    model = make_model(family)
    path = moecc.export(model, (), tmp_path / "art", kwargs=make_inputs(family, 2, 8), backend="onnxruntime")
    fresh = make_inputs(family, 3, 5, seed=7)
    with torch.no_grad():
        ref = model(**fresh).logits
    torch.save((fresh, ref), tmp_path / "check.pt")
    (tmp_path / "check.py").write_text(LOAD_AND_CHECK)
    # nothing of this process but where moecc lives (a tree on PYTHONPATH, as on the GPU machine, or installed)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(moecc.__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "check.py", str(path), "check.pt"], cwd=tmp_path, capture_output=True,
                         text=True, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    err = float(run.stdout.split("ERR")[1])
    assert err < 1e-4

    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    moe_ops = [n for n in graph.node if n.domain == "com.microsoft" and n.op_type == "MoE"]
    manifest = json.loads((path / "manifest.json").read_text())
    layers = manifest["moe_layers"]
    assert len(moe_ops) == len(layers)
    # Switch's capacity binds in transformers after 5.17 only (and com.microsoft.MoE has none)
    routes_itself = ROUTES_ITSELF[family] or (family == "switch_transformers" and not switch_drops_past_capacity(model))
    if routes_itself and (family not in UNNORMALIZED or unnormalized_moe_trusted()):
        assert all(layer["lowering"] == "com.microsoft.MoE" for layer in layers)
    else:  # the routing's top-k is an op of the graph, beside the MoE op
        assert all(layer["lowering"].startswith("com.microsoft.MoE given moecc's routing (") for layer in layers)
        assert "TopK" in {n.op_type for n in graph.node}


def _small_artifact(tmp_path):
    model = make_model("mixtral")
    return moecc.export(model, (), tmp_path / "art", kwargs=make_inputs("mixtral", 2, 8), backend="onnxruntime")


def test_tampered_weights_are_refused(tmp_path):
    path = _small_artifact(tmp_path)
    data = path / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(moecc.ArtifactError, match="model.onnx.data.*SHA-256"):
        moecc.load(path)


def test_missing_file_and_version_mismatch_are_refused(tmp_path):
    path = _small_artifact(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 999
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(moecc.ArtifactError, match="format 999.*Re-export"):
        moecc.load(path)
    manifest["format_version"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "model.onnx").unlink()
    with pytest.raises(moecc.ArtifactError, match="missing model.onnx"):
        moecc.load(path)
    with pytest.raises(moecc.ArtifactError, match="no moecc artifact"):
        moecc.load(tmp_path / "nothing")


def test_single_file_artifact_and_torch_backend(tmp_path):
    model = make_model("olmoe")
    kwargs = make_inputs("olmoe", 2, 8)
    calibration = make_inputs("olmoe", 4, 16, seed=9)
    path = moecc.export(model, (), tmp_path / "m.moecc", kwargs=kwargs, backend="torch",
                        calibration=((), calibration))
    loaded = moecc.load(path)
    fresh = make_inputs("olmoe", 1, 11, seed=3)
    torch.testing.assert_close(loaded(**fresh).logits, model(**fresh).logits, rtol=1e-5, atol=1e-5)
    assert loaded.manifest["backend"] == "torch" and len(loaded.moe_layers) == 2
    assert "weights.safetensors" in loaded.manifest["files"]  # the .pt2 holds the program, not the weights
    top_k = loaded.moe_layers[0]["top_k"]
    assert all(sum(layer["expert_load"]) == 4 * 16 * top_k for layer in loaded.moe_layers)


def test_quantization_is_opt_in_and_reported():
    model = make_model("mixtral")
    kwargs, fresh = make_inputs("mixtral", 2, 8), make_inputs("mixtral", 3, 5, 1)
    ref = model(**fresh).logits
    errors = {}
    for q in (None, "int8", "int4"):
        cm = moecc.compile(model, backend="onnxruntime", quantize=q)
        cm(**kwargs)
        layers = cm.moe_layers
        if q is None:
            assert all(layer.lowering == "com.microsoft.MoE" and layer.quantization == "" for layer in layers)
        else:
            assert all(layer.lowering == "com.microsoft.QMoE" and layer.quantization.startswith(q) for layer in layers)
        got = cm(**fresh).logits
        errors[q] = ((got - ref).norm() / ref.norm()).item()
    assert errors[None] < 1e-5 < errors["int8"] < 5e-3 and errors["int8"] < errors["int4"] < 5e-2
    with pytest.raises(ValueError, match="quantize"):
        moecc.compile(model, quantize="int3")
    with pytest.raises(ValueError, match="onnxruntime"):
        moecc.compile(model, backend="torch", quantize="int8")(**kwargs)


def test_a_block_routed_otherwise_than_by_softmax_is_quantized_handed_its_routing():
    """DeepSeek-V3's block (sigmoid scores, a selection bias, groups) goes to com.microsoft.QMoE with moecc's
    routing as graph ops, handed as the op's selection logits and mixing weights (``router_weights``)."""
    model = make_model("deepseek_v3")
    kwargs, fresh = make_inputs("deepseek_v3", 2, 8), make_inputs("deepseek_v3", 3, 5, 1)
    ref = model(**fresh).logits
    cm = moecc.compile(model, backend="onnxruntime", quantize="int8")
    cm(**kwargs)
    (layer,) = cm.moe_layers
    assert layer.lowering == "com.microsoft.QMoE given moecc's routing (com.microsoft.MoE routes with softmax, " \
        "this block with sigmoid)", layer.lowering
    assert layer.quantization.startswith("int8"), layer.quantization
    err = ((cm(**fresh).logits - ref).norm() / ref.norm()).item()
    assert 1e-6 < err < 5e-3


def test_fp16_model_runs_the_moe_op_in_fp32():
    """The MoE ops' weights are fp32 (the dtype their probes prove them in): an fp16 model's hidden states are cast
    to fp32 around each op, where they used to meet fp32 weights in a MatMul ONNX Runtime refused to load."""
    model = make_model("mixtral").half()
    for q in (None, "int8"):
        cm = moecc.compile(model, backend="onnxruntime", quantize=q)
        cm(**make_inputs("mixtral", 2, 8))
        assert all(layer.lowering == ("com.microsoft.QMoE" if q else "com.microsoft.MoE") for layer in cm.moe_layers)
        fresh = make_inputs("mixtral", 3, 5, 1)
        got, want = cm(**fresh).logits, model(**fresh).logits
        assert got.dtype == torch.float16
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 5e-3


def test_fp16_router_logits_round_once_as_eager_rounds_them(tmp_path):
    """The ONNX form of an fp16 router rounds its logits once, bias added first, as torch's GEMM does: ONNX's MatMul
    then Add rounded twice, one last bit away from eager in about a quarter of the logits, which moves the routing
    weights and can swap two experts a bit apart."""
    import onnxruntime as ort

    from moecc.codegen.onnx.decompose import DECOMPOSITIONS

    route = DECOMPOSITIONS[torch.ops.moecc.fused_route.default]

    class Router(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = torch.nn.Linear(24, 8).half()

        def forward(self, x):
            return route(x, self.router.weight, self.router.bias, None, 2, "softmax", False, False, 1, 1, 1.0, False)

    torch.manual_seed(0)
    model = Router()
    x = torch.randn(256, 24, dtype=torch.float16) * 4
    path = str(tmp_path / "router.onnx")
    with warnings.catch_warnings():
        hush_torch_deprecations()  # torch's warning about its own code, which moecc's exports hush too
        torch.onnx.export(model, (x,), dynamo=True).save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    weights, ids = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    want_weights, want_ids = torch.ops.moecc.fused_route(x, model.router.weight, model.router.bias, None, 2,
                                                         "softmax", False, False, 1, 1, 1.0, False)
    assert torch.equal(torch.from_numpy(ids), want_ids)
    torch.testing.assert_close(torch.from_numpy(weights), want_weights, rtol=1e-6, atol=1e-7)


def test_fp16_routing_on_onnxruntime_agrees_with_eager_wherever_eager_has_no_tie():
    """Experts whose router rows are nearly alike: many tokens' two best experts are a last bit apart, or tie.
    Every token but the tied ones reaches eager's expert. Where eager's own fp16 logits tie exactly, torch.topk's
    choice is its own (by no rule: neither always the lower nor the higher index) and ONNX's TopK takes the lower
    index, so those tokens are left out."""
    from user_modules import LoopMoE, TinyModel

    torch.manual_seed(0)
    block = LoopMoE(num_experts=8, top_k=1)
    block.gate = torch.nn.Linear(24, 8)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(1, 24) * 2 + torch.randn(8, 24) * 0.02)
    model = TinyModel(block, vocab=2000).eval().half()
    cm = moecc.compile(model, backend="onnxruntime")
    ids = torch.randint(0, 2000, (16, 128))
    with torch.no_grad():
        got, want = cm(ids).float(), model(ids).float()
        best = block.gate(model.norm(model.embed(ids))).float().topk(2, -1).values
    untied = best[..., 0] != best[..., 1]
    assert 0 < int(untied.logical_not().sum()) < 0.1 * untied.numel()
    per_token = (got - want).abs().amax(-1) / want.abs().amax()
    assert per_token[untied].max().item() < 5e-3, per_token[untied].max().item()


def test_a_kernel_onnx_runtime_lacks_for_a_type_falls_back_under_auto_and_says_so_otherwise():
    """ONNX Runtime loads a graph whose kernel it lacks for a type (the CPU provider's ScatterND with reduction add
    has no fp16) and fails only when it runs: under ``auto`` the check's run makes the capture a torch program,
    with a warning; with ``backend='onnxruntime'`` moecc says why, as a BackendError."""
    from user_modules import LoopMoE, TinyModel

    class ScatterAddModel(TinyModel):
        def __init__(self):
            super().__init__(LoopMoE())
            self.register_buffer("idx", torch.tensor([0, 0, 5, 7]))

        def forward(self, ids):
            h = self.embed(ids)
            h = h.index_add(-1, self.idx, h[..., :4])  # exported as ScatterND(reduction="add")
            return self.head(h + self.moe(self.norm(h)))

    torch.manual_seed(0)
    model = ScatterAddModel().eval().half()
    x = torch.randint(0, 50, (2, 9))
    cm = moecc.compile(model, backend="auto")
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), rtol=5e-3, atol=5e-3)
    assert cm._entries[-1].backend == "torch" and cm.moe_layers[0].fused
    with pytest.raises(moecc.BackendError, match="ONNX Runtime could not run the exported program: .*ScatterND"):
        moecc.compile(model, backend="onnxruntime")(x)


def test_many_experts_top8_uses_the_moe_op():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=16, num_experts_per_tok=8, norm_topk_prob=False)
    model = tf.Qwen3MoeForCausalLM(cfg).eval()
    for q in (None, "int4"):
        cm = moecc.compile(model, backend="onnxruntime", quantize=q, quant_block_size=16 if q else 0)
        cm(**make_inputs("qwen3_moe", 2, 8))
        op = "com.microsoft.QMoE" if q else "com.microsoft.MoE"
        # norm_topk_prob=False: below onnxruntime 1.32 the op is handed moecc's routing
        assert cm.moe_layers[0].lowering == (op if unnormalized_moe_trusted() else
                                             f"{op} given moecc's routing ({unnormalized_moe_refused()})")
        fresh = make_inputs("qwen3_moe", 3, 5, 1)
        err = ((cm(**fresh).logits - model(**fresh).logits).norm() / model(**fresh).logits.norm()).item()
        assert err < (5e-2 if q else 1e-5)


def test_a_bf16_softplus_graph_runs_on_torch_under_auto_and_onnxruntime_refuses_it():
    """ONNX Runtime's CPU kernels have no bf16 Softplus (nor MatMul): `auto` runs torch; an explicit backend says
    why it cannot, before exporting (b834247: it exported, and the session did not load)."""
    from user_modules import LoopMoE

    class SoftplusThenMoE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 24)
            self.moe = LoopMoE()

        def forward(self, ids):
            h = torch.nn.functional.softplus(self.embed(ids))
            return h + self.moe(h)

    torch.manual_seed(0)
    model = SoftplusThenMoE().eval().to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 16))
    cm = moecc.compile(model)
    cm(ids)
    assert [e.backend for e in cm._entries] == ["torch"] and cm.moe_layers[0].fused
    with pytest.raises(moecc.BackendError, match="no bfloat16 kernels"):
        moecc.compile(model, backend="onnxruntime")(ids)


def test_bfloat16_programs_run_with_torch_under_auto_and_onnxruntime_says_why_not(monkeypatch):
    """ONNX Runtime's CPU provider has no bf16 MatMul or Gemm: an explicit ``onnxruntime`` says what to do instead,
    and ``auto`` takes torch at once, exporting nothing to ONNX (it used to export, fail to load, warn and fall
    back)."""
    from user_modules import LoopMoE, TinyModel

    import moecc.codegen.onnx.lower as onnx_lower

    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval().to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 16))
    with pytest.raises(moecc.BackendError, match="no bfloat16 kernels .* float32 or float16 .* backend='torch'"):
        moecc.compile(model, backend="onnxruntime")(ids)
    monkeypatch.setattr(onnx_lower, "to_onnx", lambda *a, **k: pytest.fail("auto exported a bf16 program to ONNX"))
    cm = moecc.compile(model)
    with torch.no_grad():
        got, ref = cm(ids), model(ids)
    assert cm._entries[-1].backend == "torch" and cm.moe_layers[0].fused
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def test_a_compiled_model_on_onnxruntime_can_be_deep_copied():
    """An ONNX Runtime session cannot be pickled: the copy opens its own from the same file."""
    from user_modules import LoopMoE, TinyModel

    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval()
    cm = moecc.compile(model, backend="onnxruntime")
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        cm(ids)
        copied = copy.deepcopy(cm)
        torch.testing.assert_close(copied(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_onnxruntime_sessions_take_their_thread_count_from_the_knob(monkeypatch):
    """``MOECC_ORT_THREADS`` sets each session's intra-op threads (several processes on one host), in a compile and
    in a session opened again from its file (a deep copy, as ``moecc.load`` opens one); 0 leaves ONNX Runtime's."""
    import onnxruntime as ort
    from user_modules import LoopMoE, TinyModel

    opened = []

    class Recorded(ort.InferenceSession):
        def __init__(self, path, options=None, **kwargs):
            opened.append(options.intra_op_num_threads)
            super().__init__(path, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Recorded)
    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval()
    ids = torch.randint(0, 50, (2, 9))
    monkeypatch.setenv("MOECC_ORT_THREADS", "1")
    cm = moecc.compile(model, backend="onnxruntime")
    with torch.no_grad():
        torch.testing.assert_close(cm(ids), model(ids), rtol=1e-5, atol=1e-5)
        assert opened and set(opened) == {1}
        opened.clear()
        monkeypatch.setenv("MOECC_ORT_THREADS", "0")
        copy.deepcopy(cm)
        assert opened and set(opened) == {0}
        monkeypatch.setenv("MOECC_ORT_THREADS", "-1")
        with pytest.raises(ValueError, match="MOECC_ORT_THREADS"):
            copy.deepcopy(cm)


@pytest.mark.parametrize("spin,entry", [("1", None), ("0", "0")])
def test_onnxruntime_sessions_spin_after_a_run_unless_the_knob_says_not(spin, entry, monkeypatch):
    """``MOECC_ORT_SPIN=0`` lets the threads of each session moecc opens sleep after a run (torch work between
    calls gets the cores); by default ONNX Runtime's own choice, spinning, stays."""
    from moecc.codegen.onnx.ort_moe import session_options

    monkeypatch.setenv("MOECC_ORT_SPIN", spin)
    options = session_options()
    if entry is None:
        with pytest.raises(RuntimeError, match="does not have configuration"):
            options.get_session_config_entry("session.intra_op.allow_spinning")
    else:
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == entry


def test_an_empty_batch_runs_with_torch_under_auto(monkeypatch):
    """ONNX Runtime refuses the graph exported for 0 tokens (a reshape of 0 elements with an inferred dim), so
    ``auto`` does not export one; the batch gets its empty output as eager gives it."""
    from user_modules import LoopMoE, TinyModel

    import moecc.codegen.onnx.lower as onnx_lower

    exports = []
    real = onnx_lower.to_onnx
    monkeypatch.setattr(onnx_lower, "to_onnx", lambda *a, **k: exports.append(a) or real(*a, **k))
    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval()
    cm = moecc.compile(model)
    with torch.no_grad():
        cm(torch.randint(0, 50, (2, 5)))
        assert len(exports) == 1
        empty = torch.randint(0, 50, (0, 5))
        assert cm(empty).shape == model(empty).shape == (0, 5, 50)
    assert len(exports) == 1 and cm._entries[-1].backend == "torch"


@pytest.mark.parametrize("split", [True, False])
def test_a_fallback_to_torch_says_once_why_a_block_is_left_as_written(split, monkeypatch):
    """Where the ONNX export of a block left as written fails, the block runs on torch between ONNX Runtime graphs
    (``islands``); where that fails too, ``auto`` falls back to torch, and recognizing again for torch does not
    repeat the warning."""
    from user_modules import MLPRoutedMoE, TinyModel

    import moecc.codegen.onnx.lower as onnx_lower

    if not split:
        monkeypatch.setattr(onnx_lower, "blocks_on_torch", lambda *args: 1 / 0)

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    recognize_log = logging.getLogger("moecc.passes.recognize")
    level = recognize_log.level
    recognize_log.setLevel(logging.WARNING)  # the tests' MOECC_LOGS=error holds the moecc loggers above it
    recognize_log.addHandler(handler)
    try:
        torch.manual_seed(0)
        model = TinyModel(MLPRoutedMoE()).eval()
        cm = moecc.compile(model)
        ids = torch.randint(0, 50, (2, 7))
        with torch.no_grad():
            torch.testing.assert_close(cm(ids), model(ids))
    finally:
        recognize_log.removeHandler(handler)
        recognize_log.setLevel(level)
    assert cm._entries[-1].backend == ("onnxruntime" if split else "torch")
    assert len([m for m in seen if "left as written" in m]) == 1, seen


def test_one_tensor_passed_as_two_inputs_stays_two_graph_inputs(tmp_path):
    # model(input_ids=ids, labels=ids) is the usual LM loss call: the ONNX exporter made one input of the two, and
    # the session then read later labels as token ids
    model = make_model("mixtral")
    ids = torch.randint(0, 97, (2, 9))
    cm = moecc.compile(model, backend="onnxruntime")
    cm(input_ids=ids, labels=ids)
    artifact = moecc.load(moecc.export(model, (), tmp_path / "art", kwargs={"input_ids": ids, "labels": ids},
                                       backend="onnxruntime"))
    ids, labels = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    labels[:, :3] = -100
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels)
    for out in (cm(input_ids=ids, labels=labels), artifact(input_ids=ids, labels=labels)):
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-5)


def test_a_loaded_artifact_takes_keywords_in_any_order_and_names_the_ones_missing(tmp_path):
    # the export adds use_cache=False after the caller's keywords; a call gets it first
    model = make_model("qwen3_moe")
    ids = torch.randint(0, 97, (2, 9))
    m = moecc.load(moecc.export(model, (), tmp_path / "art", kwargs={"input_ids": ids, "labels": ids},
                                backend="torch"))
    ids, labels = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels)
    for out in (m(input_ids=ids, labels=labels), m(labels=labels, input_ids=ids)):
        torch.testing.assert_close(out.loss, ref.loss)
    with pytest.raises(TypeError, match="missing keyword arguments: labels"):
        m(input_ids=ids)


@pytest.mark.parametrize("form", ["bool", "float_inf", "float_min", "causal", "gqa", "none"])
def test_attention_lowered_for_onnx_is_torchs_where_a_query_sees_no_key(form, tmp_path):
    """Rows of the mask that hide every key (left padding) give zeros in torch; torch.onnx's own translation gave an
    even mix of every value there. moecc's lowering of attention matches torch in each form a model passes."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from moecc.codegen.onnx.decompose import scaled_dot_product_attention
    from moecc.codegen.onnx.lower import OrtModule, to_onnx

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    keep[1, :, :2] = False  # two queries of the second batch see no key
    kwargs = {"bool": {"attn_mask": keep},
              "float_inf": {"attn_mask": torch.where(keep, 0.0, float("-inf"))},
              "float_min": {"attn_mask": torch.where(keep, 0.0, torch.finfo(torch.float32).min)},
              "causal": {"is_causal": True, "scale": 0.3},
              "gqa": {"attn_mask": keep, "enable_gqa": True},
              "none": {}}[form]
    if form == "gqa":
        k, v = k[:, :2], v[:, :2]

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return sdpa(q, k, v, **kwargs)

    want = Attention()(q, k, v)
    mine = scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(mine, want)
    assert mine.transpose(1, 2).is_contiguous()  # as torch's: models view it after a transpose (AFMoE does)
    gm = torch.export.export(Attention(), (q, k, v)).module()
    gm.graph.eliminate_dead_code()
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.scaled_dot_product_attention.default:
            node.target = scaled_dot_product_attention
    gm.recompile()
    got = OrtModule(to_onnx(gm, [q, k, v], str(tmp_path / "attention.onnx")))(q, k, v)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [1e-12, 1e-6, None])
def test_a_tiny_epsilon_survives_the_onnx_export(eps, tmp_path):
    """onnxscript's optimizer drops an Add of a constant within 1e-8 of zero, so an RMSNorm's epsilon of 1e-12
    (Ergo's) was lost and a row of zeros (a left-padded position) normalized to NaN, and one of 1e-8 (Muse Spark's
    post-expert norm) changed rows of values near 1e-4 by percents. Both forms a model writes, ``F.rms_norm`` and
    by hand, now give torch's numbers; other epsilons export as before."""
    from moecc.codegen.onnx.lower import OrtModule, decompose, to_onnx

    class Norms(torch.nn.Module):
        def forward(self, x, weight):
            rows = x * (x[..., :1] > 0) * torch.where(x[..., 1:2] > 0, 1.0, 1e-4)  # zero rows and tiny ones
            by_hand = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + (eps or 1e-8))
            return torch.nn.functional.rms_norm(rows, (x.shape[-1],), weight, eps) + by_hand

    x, weight = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0)), torch.rand(8) + 0.5
    want = Norms()(x, weight)
    assert (want == 0).all(-1).any() and want.isfinite().all()
    gm = torch.export.export(Norms(), (x, weight)).module()
    decompose(gm)
    got = OrtModule(to_onnx(gm, [x, weight], str(tmp_path / "norms.onnx")))(x, weight)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


SCALAR_FORMS = {  # written in the graph as an ATen op, or as Python's operator where modules are inlined
    "x + c": lambda x, c: x + c, "c + x": lambda x, c: c + x, "torch.add(x, c, alpha=2)": lambda x, c: torch.add(
        x, c, alpha=2), "x - c": lambda x, c: x - c, "x * c": lambda x, c: x * c, "c * x": lambda x, c: c * x,
    "x / c": lambda x, c: x / c, "RMSNorm(eps=c)": None,  # a module of the model
}


@pytest.mark.parametrize(("form", "c"), [("x + c", 5e-9), ("c + x", 5e-9), ("torch.add(x, c, alpha=2)", 4e-9),
                                         ("x - c", 5e-9), ("x * c", 1 + 5e-6), ("c * x", 1 - 5e-6),
                                         ("x / c", 1 + 5e-6), ("x * c", 1.0), ("x - c", 0.0),
                                         ("RMSNorm(eps=c)", 5e-9)])
@pytest.mark.parametrize("traced", ["export", "fx"])
def test_a_scalar_constant_near_zero_or_one_survives_the_onnx_export(form, c, traced, tmp_path):
    """onnxscript's no-op rules drop ``x + c``, ``x - c``, ``x * c`` and ``x / c`` for a scalar within 1e-8 of 0,
    or 1e-5 relative of 1 (``1 / sqrt(1 + 1e-5)``, a norm folded into a scale): rows near 1e-4 moved by 5e-5, or
    5e-6 everywhere, where the ONNX program must give torch's numbers to the bit. The rewrite works on the exported
    ONNX graph, so it also reaches a constant computed from others (``alpha * c``) and a module that the graph
    calls whole, which the export traces itself (FX tracing keeps ``nn.RMSNorm``, as moecc keeps a block left as
    written)."""
    from moecc.codegen.onnx.lower import OrtModule, decompose, to_onnx

    class Scalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(8, eps=c)  # a module FX tracing keeps whole, which the export traces

        def forward(self, x):
            return self.norm(x) if form.startswith("RMSNorm") else SCALAR_FORMS[form](x, c)

    x = torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) * 1e-3 + 1e-4
    want = Scalar()(x)
    gm = torch.export.export(Scalar(), (x,)).module() if traced == "export" else torch.fx.symbolic_trace(Scalar())
    decompose(gm)
    got = OrtModule(to_onnx(gm, [x], str(tmp_path / "scalar.onnx")))(x)[0]
    if form.startswith("RMSNorm"):  # ONNX writes rsqrt as Sqrt and Reciprocal: an ulp apart, the epsilon's 5 %
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    else:
        assert torch.equal(got, want), float(((got - want) / want).abs().max())


@pytest.mark.parametrize("capacity", [-1, 5])
def test_routing_handed_to_the_moe_op_as_logits_gives_the_weighted_experts(capacity, tmp_path):
    """A routing com.microsoft.MoE cannot compute is handed to it as the logs of the weights (``ort_routed``), its
    output scaled by their sum. Exported and run by ONNX Runtime, that equals ``fused_moe`` for weights summing to
    other than 1, a slot of no expert, a token of none, an expert repeated in one token's slots, and pairs past a
    capacity."""
    from moecc.codegen.onnx.lower import OrtModule, to_onnx
    from moecc.codegen.onnx.ort_routed import ort_moe_given_logits, routing_as_logits, weighted_by_total

    g = torch.Generator().manual_seed(0)
    t, h, inter, e, k = 24, 16, 12, 6, 3
    x = torch.randn(t, h, generator=g)
    w_up, w_down = torch.randn(e, inter, h, generator=g) * 0.3, torch.randn(e, h, inter, generator=g) * 0.3
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[:6, -1] = e  # no expert
    ids[6] = e  # a token of none
    ids[7, 1] = ids[7, 0]  # one expert twice
    weights = torch.sigmoid(torch.randn(t, k, generator=g)) * 2.5
    capacity_args = (capacity, 0.0, 0, 0, "token")
    want = torch.ops.moecc.fused_moe(x, weights, ids, w_up, w_down, None, None, "relu", False, 1.0, 0.0,
                                     *capacity_args, "oi", "ceil")

    class Given(torch.nn.Module):
        def forward(self, x, weights, ids):
            logits, total = routing_as_logits(weights, ids, e, *capacity_args, "ceil")
            return weighted_by_total(ort_moe_given_logits(x, logits, w_up, None, w_down, None, k, "relu", 1.0, 0.0,
                                                          0.0), total, x)

    torch.testing.assert_close(Given()(x, weights, ids), want, rtol=1e-5, atol=1e-6)  # the op's reference
    assert (want[6] == 0).all() and (capacity < 0 or not torch.equal(want, torch.ops.moecc.fused_moe(
        x, weights, ids, w_up, w_down, None, None, "relu", False, 1.0, 0.0, -1, 0.0, 0, 0, "token", "oi", "ceil")))
    gm = torch.export.export(Given(), (x, weights, ids)).module()
    path = to_onnx(gm, [x, weights, ids], str(tmp_path / "given.onnx"))
    assert [n.op_type for n in onnx.load(path).graph.node if n.domain == "com.microsoft"] == ["MoE"]
    torch.testing.assert_close(OrtModule(path)(x, weights, ids)[0], want, rtol=1e-5, atol=1e-6)


def test_weights_that_may_be_negative_are_not_handed_as_logits():
    """A negative routed scaling factor makes every weight negative, which has no logarithm: the block is routed in
    plain ONNX ops instead (``sorted_experts``), says why, and computes eager's numbers."""
    model = make_model("deepseek_v3", routed_scaling_factor=-2.5)
    cm = moecc.compile(model, backend="onnxruntime")
    with torch.no_grad():
        cm(**make_inputs("deepseek_v3", 2, 9))
        fresh = make_inputs("deepseek_v3", 3, 5, seed=4)
        torch.testing.assert_close(cm(**fresh).logits, model(**fresh).logits, rtol=1e-4, atol=1e-5)
    (layer,) = cm.moe_layers
    assert layer.lowering.startswith("routed in plain ONNX ops") and "the routing scale -2.5 makes the weights " \
        "negative" in layer.lowering, layer.lowering


def _tied_topk_model():
    from user_modules import LoopMoE, TiedTopkModel

    torch.manual_seed(0)
    return TiedTopkModel(LoopMoE()).eval(), torch.randint(0, 50, (3, 7))


def test_an_onnx_program_that_breaks_ties_its_own_way_is_refused_naming_the_op():
    """A top-k outside the MoE blocks over tied scores keeps other features in ONNX Runtime than in torch. The
    check finds the ONNX program wrong where the torch program of the same graph is right, and says so, naming the
    op, instead of calling it a moecc bug."""
    model, ids = _tied_topk_model()
    with pytest.raises(moecc.MoeccError) as info:
        moecc.compile(model, backend="onnxruntime")(ids)
    message = str(info.value)
    assert "where the torch program of the same graph agrees" in message
    assert "topk in indexer" in message and "moecc bug" not in message


def test_an_expert_choice_block_left_as_written_is_named_where_onnx_breaks_its_ties(moecc_warnings):
    """Expert-choice routing is no token-choice form: the block is left as written, and the export traces it whole.
    Repeated token ids tie in each expert's top-k over tokens, which ONNX breaks its own way: ``onnxruntime``
    refuses, naming the block; ``auto`` runs the torch program, equal to eager."""
    from user_modules import ExpertChoiceMoE, TinyModel

    torch.manual_seed(0)
    model = TinyModel(ExpertChoiceMoE()).eval()
    ids = torch.randint(0, 50, (2, 16))
    with pytest.raises(moecc.MoeccError) as info:
        moecc.compile(model, backend="onnxruntime")(ids)
    assert "MoE blocks left as written (moe)" in str(info.value) and "moecc bug" not in str(info.value)
    cm = moecc.compile(model)
    for shape in [(2, 16), (3, 5), (1, 1)]:
        ids = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(ids), model(ids))
    (layer,) = cm.moe_layers
    assert not layer.fused and "expert ids" in layer.reason


def test_auto_runs_an_onnx_program_that_breaks_ties_its_own_way_with_torch(moecc_warnings, tmp_path):
    model, ids = _tied_topk_model()
    cm = moecc.compile(model)
    got = cm(ids)
    assert cm._entries[0].backend == "torch"
    torch.testing.assert_close(got, model(ids))
    assert cm.moe_layers[0].fused
    assert any("topk in indexer" in r.getMessage() and "runs it with torch" in r.getMessage()
               for r in moecc_warnings.records)
    path = moecc.export(model, (ids,), str(tmp_path / "artifact"))  # export takes the torch program as well
    assert not list((tmp_path / "artifact").glob("*.onnx"))
    torch.testing.assert_close(moecc.load(path)(ids), model(ids))


def test_a_fallback_to_torch_says_once_why_capture_left_a_block_as_written(moecc_warnings, monkeypatch):
    """A block that returns Python values beside its output is left as written by capture; when the ONNX export
    fails, ``auto`` captures again for torch, without repeating capture's warning."""
    from user_modules import OtherOutputsDenseMoE, OtherOutputsModel

    from moecc.codegen.onnx import lower

    def refuse(*args, **kwargs):
        raise RuntimeError("no ONNX function found")

    monkeypatch.setattr(lower, "to_onnx", refuse)
    torch.manual_seed(0)
    model = OtherOutputsModel(OtherOutputsDenseMoE()).eval()
    ids = torch.randint(0, 50, (2, 7))
    cm = moecc.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(cm(ids), model(ids))
    assert cm._entries[-1].backend == "torch"
    told = [r.getMessage() for r in moecc_warnings.records if "left as written" in r.getMessage()]
    assert len(told) == 1, told


def test_probes_write_an_ir_version_older_onnxruntimes_read(monkeypatch):
    """The installed onnx writes its newest IR version unless told; ONNX Runtime 1.30 refused IR 14, so every probe
    failed there and no MoE op (or MatMulNBits) ran. Probes write IR 10, as torch.onnx's exports."""
    import onnxruntime as ort

    from moecc.codegen.onnx.grouped_nbits import matmul_nbits_computes_same

    seen = []
    real = ort.InferenceSession

    def session(model, *args, **kwargs):
        if isinstance(model, bytes):
            seen.append(onnx.load_from_string(model).ir_version)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    assert matmul_nbits_computes_same.__wrapped__(4, 32, 0)
    assert seen == [10]


def test_onnxruntime_before_1_32_is_handed_the_routing_of_blocks_that_do_not_renormalise(monkeypatch):
    """On onnxruntime 1.30 and 1.31 com.microsoft.MoE without renormalisation matched its probe but not inside whole
    models (1e-2 off); there the op is handed moecc's routing (renormalising, which it does right), and says why."""
    from moecc.codegen.onnx import lower

    monkeypatch.setattr(lower, "ort_version", lambda: (1, 31))
    model = make_model("olmoe")
    cm = moecc.compile(model, backend="onnxruntime")
    fresh = make_inputs("olmoe", 3, 5, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(cm(**fresh).logits, model(**fresh).logits, rtol=1e-4, atol=1e-5)
    assert [layer.lowering for layer in cm.moe_layers] == [
        "com.microsoft.MoE given moecc's routing (onnxruntime 1.31's MoE ops without renormalisation can give other "
        "numbers inside whole models than on their probes (com.microsoft.MoE on 1.30 and 1.31; 1.32 agrees))"] * 2
