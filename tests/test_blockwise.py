"""Models torch.export cannot capture whole run as written, each MoE block compiled alone (``runtime.blockwise``)."""

import pytest
import torch
from user_modules import GeluMLP, LoopMoE, OtherOutputsMoE, TracedOtherwiseModel, UnevenWidthMoE, ValueBranchModel

import moecc


def _device(backend: str) -> str:
    if backend != "triton":
        return "cpu"
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["auto", "torch", "onnxruntime", "triton"])
def test_a_model_export_refuses_runs_with_each_block_compiled_alone(backend, moecc_warnings):
    torch.manual_seed(0)
    device = _device(backend)
    model = ValueBranchModel(LoopMoE).eval().to(device)
    cm = moecc.compile(model, backend=backend)
    first = torch.randint(0, 50, (2, 16), device=device)
    torch.testing.assert_close(cm(first), model(first), rtol=1e-4, atol=1e-5)
    assert "each of its 2 MoE block(s) compiled alone" in moecc_warnings.text
    assert [(layer.name, layer.fused) for layer in cm.moe_layers] == [("blocks.0", True), ("blocks.1", True)]
    assert cm.moe_layers[0].routing == "softmax->top2 renorm"
    # both sides of the model's branch, on fresh shapes
    for shape, scale in (((3, 11), 1.0), ((1, 7), 10.0), ((4, 32), 0.1)):
        with torch.no_grad():
            model.embed.weight.mul_(scale)
        x = torch.randint(0, 50, shape, device=device)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
    # outside its calls the model is its own
    assert "forward" not in vars(model.blocks[0])


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_model_traced_otherwise_than_it_runs_runs_with_each_block_compiled_alone(backend, moecc_warnings):
    """A capture whose program computes other numbers than eager on the inputs it was made from is refused like
    one export cannot make (no pass could make its programs agree): the model runs as written, its block fused."""
    torch.manual_seed(0)
    model = TracedOtherwiseModel(LoopMoE()).eval()
    cm = moecc.compile(model, backend=backend)
    for shape in ((2, 16), (3, 11), (1, 1)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
    assert "computes other numbers than TracedOtherwiseModel does in eager" in moecc_warnings.text
    assert "each of its 1 MoE block(s) compiled alone" in moecc_warnings.text
    assert [(layer.name, layer.fused) for layer in cm.moe_layers] == [("moe", True)]


def test_a_bf16_model_traced_otherwise_is_found_by_the_check_and_runs_blockwise(moecc_warnings):
    """In bf16 the capture is not checked on its own example (a deep model's rounding can pass any fixed bound
    there); the check on fresh inputs then finds no fused block to blame, runs the capture itself, finds it
    computing otherwise, and the model runs as written, its block compiled alone."""
    torch.manual_seed(0)
    model = TracedOtherwiseModel(LoopMoE()).eval().to(torch.bfloat16)
    cm = moecc.compile(model, backend="torch")
    for shape in ((2, 16), (3, 11)):
        x = torch.randint(0, 50, shape)
        torch.testing.assert_close(cm(x), model(x), rtol=2e-2, atol=2e-2)
    assert "every MoE block run as written, computes other numbers" in moecc_warnings.text
    assert [(layer.name, layer.fused) for layer in cm.moe_layers] == [("moe", True)]


def test_a_model_traced_otherwise_without_moe_blocks_says_why():
    torch.manual_seed(0)
    model = TracedOtherwiseModel(GeluMLP(24, 24)).eval()
    with pytest.raises(moecc.ExportError, match="computes other numbers than TracedOtherwiseModel does in eager"):
        moecc.compile(model, backend="torch")(torch.randint(0, 50, (2, 8)))


def test_a_block_that_cannot_be_fused_runs_as_written_beside_the_others():
    torch.manual_seed(0)

    model = ValueBranchModel(UnevenWidthMoE).eval()
    model.blocks[1].experts[2] = GeluMLP(24, 24)
    cm = moecc.compile(model, backend="torch")
    x = torch.randint(0, 50, (3, 9))
    torch.testing.assert_close(cm(x), model(x))
    fused = {layer.name: (layer.fused, layer.reason) for layer in cm.moe_layers}
    assert fused["blocks.0"] == (True, "")
    assert not fused["blocks.1"][0] and "differ in activation" in fused["blocks.1"][1]


def test_blockwise_dumps_are_one_folder_per_block(tmp_path):
    torch.manual_seed(0)
    cm = moecc.compile(ValueBranchModel(LoopMoE).eval(), backend="torch", dump_dir=tmp_path)
    cm(torch.randint(0, 50, (2, 8)))
    for block in ("blocks.0", "blocks.1"):
        names = sorted(p.name for p in (tmp_path / f"block_{block}").iterdir())
        assert names[0] == "000_capture.py" and any(n.endswith("_fuse_experts.py") for n in names), names


def test_export_of_a_model_export_refuses_says_why(tmp_path):
    model = ValueBranchModel(LoopMoE).eval()
    ids = torch.randint(0, 50, (2, 8))
    with pytest.raises(moecc.CaptureError, match="torch.export could not capture ValueBranchModel"):
        moecc.export(model, (ids,), tmp_path / "art", backend="torch")


def test_a_model_without_moe_blocks_that_export_refuses_says_why():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else -x

    with pytest.raises(moecc.CaptureError, match="torch.export could not capture Branchy"):
        moecc.compile(Branchy())(torch.ones(2, 4))

def checked_mixtral():
    """A tiny Hugging Face Mixtral whose forward checks its token ids first: control flow torch.export refuses."""
    transformers = pytest.importorskip("transformers")
    from hf_models import make_config

    class CheckedMixtral(transformers.MixtralForCausalLM):
        def forward(self, input_ids=None, **kwargs):
            if input_ids is not None and (input_ids >= self.config.vocab_size).any():
                raise ValueError("token id out of range")
            return super().forward(input_ids=input_ids, **kwargs)

    torch.manual_seed(0)
    return CheckedMixtral(make_config("mixtral")).eval()


def test_generate_of_a_hugging_face_model_export_refuses():
    model = checked_mixtral()
    cm = moecc.compile(model, backend="torch")
    ids = torch.randint(0, 97, (1, 6))
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(cm.generate(ids, max_new_tokens=8, do_sample=False), expected)
    assert cm.blockwise is not None and [layer.fused for layer in cm.moe_layers] == [True, True]


def test_every_blockwise_call_of_a_hugging_face_model_leaves_the_cache_out():
    model = checked_mixtral()
    cm = moecc.compile(model, backend="torch")
    for shape in ((2, 7), (1, 5)):
        ids = torch.randint(0, 97, shape)
        out = cm(input_ids=ids)
        assert out.past_key_values is None
        torch.testing.assert_close(out.logits, model(input_ids=ids).logits)


def test_blockwise_calls_that_record_router_logits_get_eagers_logits():
    """``output_router_logits=True`` records each router's logits by a hook on the router, inside the block: a
    call that asks for them runs the block as written (its program does not run the hook), and a block compiled
    at its first call records nothing from the compile's own calls of it. Before, the first call returned 18
    router logits for 2 layers (the compile's calls of the blocks added theirs)."""
    model = checked_mixtral()
    cm = moecc.compile(model, backend="torch")
    for shape, record in [((2, 6), True), ((2, 7), False), ((3, 5), True)]:
        ids = torch.randint(0, 97, shape)
        with torch.no_grad():
            out = cm(input_ids=ids, output_router_logits=record, use_cache=False)
            eager = model(input_ids=ids, output_router_logits=record, use_cache=False)
        assert list(out.keys()) == list(eager.keys())
        torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-6)
        if record:
            assert len(out.router_logits) == len(eager.router_logits) == 2
            for mine, theirs in zip(out.router_logits, eager.router_logits):
                torch.testing.assert_close(mine, theirs)
            torch.testing.assert_close(out.aux_loss, eager.aux_loss)
    assert cm.blockwise is not None and [layer.fused for layer in cm.moe_layers] == [True, True]


class CheckedModel(ValueBranchModel):
    """Checks its ids only when asked: calls with ``check=True`` are refused by torch.export, the others are not."""

    def forward(self, ids, check: bool = False):
        if check and (ids >= self.embed.num_embeddings).any():
            raise ValueError("token id out of range")
        h = self.embed(ids)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.head(h)


def test_only_the_call_structure_export_refused_runs_blockwise():
    torch.manual_seed(0)
    model = CheckedModel(LoopMoE).eval()
    cm = moecc.compile(model, backend="torch")
    x = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(cm(x, check=True), model(x, check=True))
    assert cm.blockwise is not None and cm.captures == 1
    torch.testing.assert_close(cm(x), model(x))  # captured whole
    assert cm.captures == 2 and [layer.name for layer in cm.moe_layers] == ["blocks.0", "blocks.1"]
    y = torch.randint(0, 50, (3, 5))
    torch.testing.assert_close(cm(y, check=True), model(y, check=True))
    assert cm.captures == 2  # the refused structure is not captured again


def test_a_block_returning_other_values_runs_as_written_and_says_why():
    class Model(ValueBranchModel):
        def forward(self, ids):
            h = self.embed(ids)
            for norm, block in zip(self.norms, self.blocks):
                y, info = block(norm(h))
                h = h + y * info["scale"]
            return self.head(h)

    torch.manual_seed(0)
    model = Model(OtherOutputsMoE).eval()
    cm = moecc.compile(model, backend="torch")
    x = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(cm(x), model(x))
    reasons = [layer.reason for layer in cm.moe_layers]
    assert len(reasons) == 2 and all("returns float, str values besides tensors" in r for r in reasons), reasons


def test_a_refused_model_without_a_block_found_says_so():
    """A single-expert block is no MoE block by structure (a bank needs two experts): export traces its expert loop
    and refuses the model, and with no block to compile alone, compile raises, saying that no block was found."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=48, num_local_experts=1, num_experts_per_tok=1,
                           max_position_embeddings=64)
    model = tf.AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").eval()
    with pytest.raises(moecc.ExportError, match="No MoE block was found in MixtralForCausalLM") as info:
        moecc.compile(model)(input_ids=torch.randint(0, 61, (2, 9)))
    assert "compiled alone;" not in str(info.value)


@pytest.mark.parametrize("model_of", [lambda: ValueBranchModel(LoopMoE), lambda: TracedOtherwiseModel(LoopMoE())],
                         ids=["export_fails", "traced_otherwise"])
def test_a_refused_capture_is_remembered_by_the_capture_cache(model_of, tmp_path, monkeypatch, moecc_warnings):
    """Compiling a refused model again runs it blockwise without exporting it again, and says the refusal was
    remembered; with the cache off it is exported again."""
    monkeypatch.setenv("MOECC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = model_of().eval()
    x = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(moecc.compile(model, backend="torch")(x), model(x), rtol=1e-4, atol=1e-5)
    entries = [p.read_text() for p in (tmp_path / "captures").glob("*.json")]  # the model's and its blocks'
    assert sum('"refused"' in text for text in entries) == 1 and len(entries) > 1
    exports = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(a) or real(*a, **k))
    cm = moecc.compile(model, backend="torch")
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
    assert [(layer.name, layer.fused) for layer in cm.moe_layers] and all(layer.fused for layer in cm.moe_layers)
    whole = [a for a in exports if type(a[0]).__name__ == "_FlatCall" and a[0].model is model]
    assert not whole and "the capture cache keeps refusals" in moecc_warnings.text
    monkeypatch.setenv("MOECC_CAPTURE_CACHE", "0")
    moecc.compile(model, backend="torch")(x)
    assert [a for a in exports if type(a[0]).__name__ == "_FlatCall" and a[0].model is model]


def test_a_capture_refused_for_lack_of_memory_is_not_remembered():
    from moecc.capture import _for_lack_of_memory

    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as oom:
            raise moecc.ExportError("torch.export could not capture M: CUDA out of memory") from oom
    except moecc.ExportError as exc:
        assert _for_lack_of_memory(exc)
    assert not _for_lack_of_memory(moecc.ExportError("data-dependent branch"))
