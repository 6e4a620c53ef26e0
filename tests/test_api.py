import os

import pytest
import torch
from user_modules import BmmMoE, TinyModel

import moecc


def test_bad_arguments_are_named():
    model = TinyModel(BmmMoE())
    with pytest.raises(TypeError, match="model"):
        moecc.compile("not a model")
    with pytest.raises(ValueError, match="backend"):
        moecc.compile(model, backend="nope")
    with pytest.raises(TypeError, match="unknown option 'fusee'"):
        moecc.compile(model, fusee=True)
    with pytest.raises(TypeError, match="option 'fuse'"):
        moecc.compile(model, fuse="yes")


def test_capture_error_names_model_and_remedy():
    class Bad(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python control flow
                return x
            return -x

    cm = moecc.compile(Bad())
    with pytest.raises(moecc.CaptureError, match="(?s)Bad.*Try:"):
        cm(torch.randn(3, 4))


def test_recapture_at_most_once_per_bucket_and_reference_backend():
    torch.manual_seed(0)
    model = TinyModel(BmmMoE()).eval()
    cm = moecc.compile(model, backend="reference")
    for shape in ((2, 8), (3, 9), (4, 16), (2, 31), (5, 3)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-6)
    assert cm.captures == 1


def test_fuse_false_runs_as_written():
    torch.manual_seed(0)
    model = TinyModel(BmmMoE()).eval()
    cm = moecc.compile(model, fuse=False)
    x = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(cm(x), model(x))
    (layer,) = cm.moe_layers  # still listed, so a user sees which blocks moecc left alone and why
    assert not layer.fused and layer.reason == "fuse=False: run as written"


def test_dump_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECC_DUMP_DIR", str(tmp_path))
    torch.manual_seed(0)
    cm = moecc.compile(TinyModel(BmmMoE()).eval())
    cm(torch.randint(0, 50, (2, 8)))
    assert (tmp_path / "000_capture.py").exists()


def test_torch_compile_backend_entry_point():
    from importlib.metadata import PackageNotFoundError, distribution, entry_points

    try:
        distribution("moecc")
    except PackageNotFoundError:  # a source tree on PYTHONPATH: importing moecc registers the backend
        pass
    else:
        assert "moecc" in [ep.name for ep in entry_points(group="torch_dynamo_backends")]
    torch.manual_seed(0)
    model = TinyModel(BmmMoE()).eval()
    compiled = torch.compile(model, backend="moecc")
    x = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def _bf16_mixtral(layers: int):
    import transformers as tf

    cfg = tf.MixtralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=500)
    torch.manual_seed(0)
    return tf.MixtralForCausalLM(cfg).to(torch.bfloat16).eval()


def test_fresh_input_check_allows_bf16_rounding_but_not_wrong_results():
    from moecc.errors import MoeccError
    from moecc.runtime.verify import check_fresh

    model = _bf16_mixtral(4)
    ids = torch.randint(0, 500, (1, 256))
    cm = moecc.compile(model, backend="torch")  # verify=True: the check runs here and must pass
    cm(input_ids=ids, use_cache=False)
    entry = cm._entries[-1]
    program = entry.runner
    entry.runner = lambda *a: tuple(o * 1.5 if o.is_floating_point() else o for o in program(*a))  # a wrong program
    with pytest.raises(MoeccError, match="rounding sensitivity"):
        check_fresh(model, entry)


def test_hugging_face_call_without_use_cache():
    """A Hugging Face model returns a KV cache unless told not to: ``cm(ids)`` runs the forward with
    ``use_cache=False`` (same logits, no cache), and a call that asks for the cache gets eager's."""
    from hf_models import make_model

    model = make_model("mixtral")
    ids = torch.randint(0, 97, (2, 6))
    cm = moecc.compile(model, backend="reference")
    out = cm(ids)
    torch.testing.assert_close(out.logits, model(ids, use_cache=False).logits, rtol=1e-5, atol=1e-6)
    assert out.past_key_values is None
    torch.testing.assert_close(cm(input_ids=ids).logits, out.logits)
    with_cache, eager = cm(input_ids=ids, use_cache=True), model(input_ids=ids, use_cache=True)
    torch.testing.assert_close(with_cache.logits, eager.logits, rtol=1e-5, atol=1e-6)
    name = "cache" if "cache" in with_cache else "past_key_values"
    for mine, theirs in zip(with_cache[name].layers, eager[name].layers):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-6)


def test_a_model_with_active_dropout_is_told_to_call_eval():
    """A model built from its config is in training mode; with dropout its outputs are random, and the check must
    say so rather than call the difference a moecc bug."""
    from hf_models import make_config
    from transformers import MixtralForCausalLM

    from moecc import MoeccError

    torch.manual_seed(0)
    config = make_config("mixtral")
    config.attention_dropout = 0.3
    model = MixtralForCausalLM(config)
    assert model.training
    with pytest.raises(MoeccError, match=r"training mode: call model.eval\(\) first") as info:
        moecc.compile(model, backend="torch")(input_ids=torch.randint(0, 97, (2, 6)))
    assert "moecc bug" not in str(info.value)


def test_one_tensor_passed_as_two_arguments():
    """``labels=input_ids`` passes one tensor twice: the capture must still read each argument from its own input,
    or a later call with other labels gets logits computed from its labels (and the check on fresh inputs fails)."""
    from hf_models import make_model

    model = make_model("mixtral")
    ids = torch.randint(0, 97, (2, 6))
    cm = moecc.compile(model, backend="torch")
    out = cm(input_ids=ids, labels=ids)
    eager = model(input_ids=ids, labels=ids, use_cache=False)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    other_ids, labels = torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (2, 6))
    out, eager = cm(input_ids=other_ids, labels=labels), model(input_ids=other_ids, labels=labels, use_cache=False)
    assert cm.captures == 1
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,backend", [("mixtral", "torch"), ("mixtral", "onnxruntime"), ("qwen2_moe", "torch"),
                                            ("gpt_oss", "onnxruntime"), ("deepseek_v3", "torch"),
                                            ("llama4_text", "torch")])
def test_recorded_router_logits_are_outputs_of_the_fused_block(family, backend):
    """``output_router_logits=True`` makes the model return what each block's router computed, recorded by hooks on
    the router: each block is still fused, its call also giving the router's output, which the canonical block
    reproduces. Llama 4's block also returns its router logits itself."""
    from hf_models import make_model

    torch.manual_seed(0)
    model = make_model(family)
    ids = torch.randint(0, 97, (2, 6))
    cm = moecc.compile(model, backend=backend)
    out, eager = cm(input_ids=ids, output_router_logits=True), model(input_ids=ids, output_router_logits=True,
                                                                       use_cache=False)
    assert list(out.keys()) == list(eager.keys())
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-6)
    assert cm.moe_layers and all(layer.fused for layer in cm.moe_layers), [layer.reason for layer in cm.moe_layers]
    assert cm._entries[-1].backend == backend
    if getattr(eager, "router_logits", None) is None:  # Llama 4 in transformers 5.17 records none
        return
    assert len(out.router_logits) == len(eager.router_logits) > 0
    for mine, theirs in zip(out.router_logits, eager.router_logits):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    if "aux_loss" in eager:
        torch.testing.assert_close(out.aux_loss, eager.aux_loss, rtol=1e-5, atol=1e-6)


def test_recorded_router_logits_keep_the_routers_dtype():
    """A bf16 router fits with logits in fp32 (its block's routing reads them so); the logits the model records
    come back in the router's own dtype, as the graph was exported to expect."""
    from hf_models import make_model

    model = make_model("mixtral").to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 7))
    cm = moecc.compile(model, backend="torch")
    out = cm(input_ids=ids, output_router_logits=True)
    eager = model(input_ids=ids, output_router_logits=True, use_cache=False)
    assert all(layer.fused for layer in cm.moe_layers)
    for mine, theirs in zip(out.router_logits, eager.router_logits):
        assert mine.dtype == theirs.dtype == torch.bfloat16
        torch.testing.assert_close(mine, theirs)


def test_outputs_recorded_from_two_parts_of_a_block_leave_it_as_written():
    """A model that returns what two sub-modules of a block computed (its router's logits and an expert's output)
    gets the block as written, with the reason: a block's call carries one sub-module's output."""
    from user_modules import LoopMoE, TinyModel

    class TwoRecorded(TinyModel):
        def forward(self, ids):
            seen = []
            hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(o))
                     for m in (self.moe.gate, self.moe.experts[0].w2)]
            try:
                h = self.embed(ids)
                h = h + self.moe(self.norm(h))
            finally:
                for hook in hooks:
                    hook.remove()
            return self.head(h), tuple(seen)

    torch.manual_seed(0)
    model = TwoRecorded(LoopMoE()).eval()
    ids = torch.randint(0, 50, (2, 7))
    cm = moecc.compile(model, backend="torch")
    got, want = cm(ids), model(ids)
    torch.testing.assert_close(got[0], want[0])
    (layer,) = cm.moe_layers
    assert not layer.fused and "more than one sub-module's output" in layer.reason, layer.reason


def test_recorded_output_with_values_besides_tensors_leaves_the_block_as_written():
    """A recorded sub-module whose output holds a number beside its tensor cannot travel out of a graph leaf: the
    block runs as written, and the reason names what its output holds."""
    from user_modules import LoopMoE, TinyModel

    class Tag(torch.nn.Module):
        def forward(self, y):
            return y, 1.0

    class TaggedLoopMoE(LoopMoE):
        """Passes its output through a sub-module that returns a number beside it."""

        def __init__(self):
            super().__init__()
            self.tag = Tag()

        def forward(self, x):
            return self.tag(super().forward(x))[0]

    class Recording(TinyModel):
        def forward(self, ids):
            seen = []
            hook = self.moe.tag.register_forward_hook(lambda _m, _i, o: seen.append(o[0]))
            try:
                h = self.embed(ids)
                h = h + self.moe(self.norm(h))
            finally:
                hook.remove()
            return self.head(h), seen[0]

    torch.manual_seed(0)
    model = Recording(TaggedLoopMoE()).eval()
    ids = torch.randint(0, 50, (2, 7))
    cm = moecc.compile(model, backend="torch")
    got, want = cm(ids), model(ids)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    (layer,) = cm.moe_layers
    assert not layer.fused and "holds float values" in layer.reason, layer.reason


def test_encoder_decoder_call_without_use_cache():
    """An encoder-decoder whose forward takes ``use_cache`` through ``**kwargs`` (transformers 5.x) also gets
    ``use_cache=False`` when a call leaves it out: its cache is an ``EncoderDecoderCache``, which no capture returns."""
    from hf_models import make_model

    model = make_model("switch_transformers")
    cm = moecc.compile(model, backend="torch")
    ids, decoder_ids = torch.randint(3, 97, (2, 6)), torch.randint(3, 97, (2, 4))
    call = dict(input_ids=ids, decoder_input_ids=decoder_ids, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(cm(**call).logits, model(**call, use_cache=False).logits, rtol=1e-5, atol=1e-6)
    assert cm.moe_layers and all(layer.fused for layer in cm.moe_layers)


def test_export_of_a_hugging_face_call_without_use_cache(tmp_path):
    """``moecc.export`` adds ``use_cache=False`` as compile does, and the loaded artifact adds it to calls that
    leave it out, so both are called as the model is."""
    from hf_models import make_model

    model = make_model("qwen3_moe")
    ids = torch.randint(0, 97, (2, 6))
    moecc.export(model, (ids,), tmp_path / "art", backend="torch")
    loaded = moecc.load(tmp_path / "art")
    fresh = torch.randint(0, 97, (3, 4))
    want = model(fresh, use_cache=False).logits
    torch.testing.assert_close(loaded(fresh).logits, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded(fresh, use_cache=False).logits, want, rtol=1e-5, atol=1e-6)


def test_a_call_with_grad_enabled_gives_outputs_without_gradient(caplog):
    """The moecc ops have no backward: a program that let autograd record the rest of the model would give
    gradients that stop at every MoE block, with no error. Its outputs carry none, and the first such call says
    why."""
    import logging

    from hf_models import make_model

    torch.manual_seed(0)
    model = make_model("qwen3_moe")
    ids = torch.randint(0, 97, (2, 6))
    cm = moecc.compile(model, backend="torch")
    logger, level = logging.getLogger("moecc"), logging.getLogger("moecc").level
    logger.addHandler(caplog.handler)  # moecc's logger has a handler of its own and does not propagate
    logger.setLevel(logging.WARNING)
    try:
        out = cm(input_ids=ids)
        cm(input_ids=ids)
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
    assert not out.logits.requires_grad
    told = [r for r in caplog.records if "carry no gradient" in r.getMessage()]
    assert len(told) == 1
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.logits.sum().backward()


def test_keywords_named_in_another_order_reuse_the_capture():
    from hf_models import make_model

    model = make_model("mixtral")
    cm = moecc.compile(model, backend="torch")
    ids, labels = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    first = cm(input_ids=ids, labels=labels)
    second = cm(labels=labels, input_ids=ids)
    assert cm.captures == 1
    torch.testing.assert_close(second.loss, first.loss)


def test_a_knob_overridden_reads_its_value_inside_and_the_old_one_after(monkeypatch):
    from moecc import knobs

    monkeypatch.delenv("MOECC_TRITON_WS", raising=False)
    with knobs.TRITON_WS.overridden("off"):
        assert knobs.TRITON_WS.get() == "off"
    assert knobs.TRITON_WS.get() == "auto" and "MOECC_TRITON_WS" not in os.environ
    monkeypatch.setenv("MOECC_TRITON_WS", "on")
    with pytest.raises(RuntimeError), knobs.TRITON_WS.overridden("off"):
        raise RuntimeError
    assert knobs.TRITON_WS.get() == "on"


def test_a_knob_with_a_fixed_set_of_values_refuses_others_where_it_is_read(monkeypatch):
    from moecc import knobs

    monkeypatch.setenv("MOECC_TRITON_TMA", "yes")
    with pytest.raises(ValueError, match="MOECC_TRITON_TMA must be auto, on or off, got 'yes'"):
        knobs.TRITON_TMA.get()
    monkeypatch.setenv("MOECC_TRITON_TMA", "off")
    assert knobs.TRITON_TMA.get() == "off"


def test_calls_under_autocast_and_outside_it_get_captures_of_their_own():
    """torch.export traces autocast's casts into the program: a capture made under autocast ran for a call outside
    it and failed on a dtype mismatch (and one made outside would leave out the casts eager makes under it). Each
    autocast state gets its own capture and capture-cache key; a block whose fp32 matmuls autocast rounds to bf16 is
    left as written with that reason."""
    from hf_models import make_inputs, make_model

    from moecc.capture_key import parts

    model = make_model("mixtral")
    cm = moecc.compile(model, backend="torch")
    calls = [(True, make_inputs("mixtral", 2, 8)), (False, make_inputs("mixtral", 3, 5, 1)),
             (True, make_inputs("mixtral", 3, 5, 2)), (False, make_inputs("mixtral", 2, 8, 3))]
    for i, (autocast, inputs) in enumerate(calls):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got, want = cm(**inputs).logits, model(**inputs).logits
        assert got.dtype == want.dtype == (torch.bfloat16 if autocast else torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert len(cm._entries) == min(i + 1, 2)
        layers = cm.moe_layers  # the latest capture's
        if i == 0:
            assert all(not layer.fused and "torch.autocast('cpu', dtype=torch.bfloat16)" in layer.reason
                       for layer in layers), [layer.reason for layer in layers]
        elif i == 1:
            assert all(layer.fused for layer in layers), [layer.reason for layer in layers]
    inputs = make_inputs("mixtral", 2, 8)
    flat, spec = torch.utils._pytree.tree_flatten(((), inputs))
    outside = next(parts(model, flat, spec, []))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert next(parts(model, flat, spec, [])) != outside


def test_a_loaded_artifact_runs_its_program_as_exported_under_autocast(tmp_path):
    """An artifact holds the casts of its export's call (none here): autocast around a call of it adds none."""
    from hf_models import make_inputs, make_model

    model = make_model("mixtral")
    loaded = moecc.load(moecc.export(model, (), tmp_path / "art", kwargs=make_inputs("mixtral", 2, 8),
                                     backend="torch"))
    assert loaded.manifest["autocast"] == []
    inputs = make_inputs("mixtral", 3, 5, 1)
    outside = loaded(**inputs).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loaded(**inputs).logits
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def test_a_model_without_an_moe_block_says_nothing_is_fused(moecc_warnings, tmp_path):
    """A dense model (or one whose blocks moecc cannot find) runs as captured, and compile and export say once that
    no MoE block was found; a model with blocks does not hear it."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=48, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    cm = moecc.compile(model, backend="torch")
    for shape in [(2, 9), (1, 1)]:
        ids = torch.randint(0, 61, shape)
        with torch.no_grad():
            torch.testing.assert_close(cm(input_ids=ids, use_cache=False).logits,
                                       model(input_ids=ids, use_cache=False).logits)
    told = [r.getMessage() for r in moecc_warnings.records if "found no MoE block" in r.getMessage()]
    assert len(told) == 1 and "LlamaForCausalLM" in told[0] and "with torch" in told[0]
    assert cm.captures == 2 and cm.moe_layers == []

    moecc.export(model, (), tmp_path / "dense", {"input_ids": torch.randint(0, 61, (2, 9)), "use_cache": False},
                 backend="torch")
    assert sum("found no MoE block" in r.getMessage() for r in moecc_warnings.records) == 2

    moe = TinyModel(BmmMoE()).eval()
    moecc.compile(moe, backend="torch")(torch.randint(0, 50, (2, 9)))
    assert sum("found no MoE block" in r.getMessage() for r in moecc_warnings.records) == 2
