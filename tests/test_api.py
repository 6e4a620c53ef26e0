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
    from importlib.metadata import entry_points

    names = [ep.name for ep in entry_points(group="torch_dynamo_backends")]
    assert "moecc" in names
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
