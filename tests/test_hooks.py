"""Forward hooks (``moecc/hooks.py``): an MoE block's own hooks run once, around the block as written, and hooks
added or removed after compile make the model compile again instead of being missed."""

import pytest
import torch
from hf_models import make_inputs, make_model

import moecc
from moecc.hooks import HookWatch, set_aside


def _doubled(module, args, out):
    return tuple(None if o is None else o * 2 for o in out) if isinstance(out, tuple) else out * 2


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_hook_on_a_block_at_compile_runs_once(backend):
    """A hook that changes its block's output: the capture leaves it out of what it traces around the block's
    leaf, so it is not also run by the leaf, and the block stays as written (no fused op runs hooks)."""
    model = make_model("mixtral").eval()
    model.model.layers[0].mlp.register_forward_hook(_doubled)
    inputs = make_inputs("mixtral", 2, 9)
    cm = moecc.compile(model, backend=backend)
    torch.testing.assert_close(_logits(cm, inputs), _logits(model, inputs), rtol=1e-4, atol=1e-4)
    fused = {layer.name: layer.fused for layer in cm.moe_layers}
    # its routing runs as written, with the hook; its experts alone are fused
    assert fused == {"model.layers.0.mlp.experts": True, "model.layers.1.mlp": True}


def test_hooks_added_or_removed_after_compile_compile_again(moecc_warnings):
    model = make_model("mixtral").eval()
    inputs = make_inputs("mixtral", 2, 9)
    cm = moecc.compile(model, backend="torch")
    _logits(cm, inputs)
    block = model.model.layers[0].mlp
    handle = block.register_forward_hook(_doubled)
    torch.testing.assert_close(_logits(cm, inputs), _logits(model, inputs), rtol=1e-4, atol=1e-4)
    assert "forward hooks of model.layers.0.mlp changed since compile" in moecc_warnings.text
    attention = model.model.layers[1].self_attn.register_forward_hook(_doubled)
    torch.testing.assert_close(_logits(cm, inputs), _logits(model, inputs), rtol=1e-4, atol=1e-4)
    handle.remove()
    attention.remove()
    torch.testing.assert_close(_logits(cm, inputs), _logits(model, inputs), rtol=1e-4, atol=1e-4)
    assert "forward hooks of model.layers.1.self_attn changed" in moecc_warnings.text
    told = [r.getMessage() for r in moecc_warnings.records if "has forward hooks on" in r.getMessage()]
    # once per set of hooks, the user's only (not Hugging Face's output recorders on every layer)
    assert len(told) == 2 and "hooks on model.layers.0.mlp." in told[0]
    assert "hooks on model.layers.0.mlp, model.layers.1.self_attn." in told[1]


def test_hook_watch_sees_additions_removals_and_global_hooks_but_not_others():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    kept = model[1].register_forward_pre_hook(lambda m, a: None)
    watch = HookWatch(model)
    assert watch.changed() is None
    torch.zeros(1, requires_grad=True).register_hook(lambda g: g)  # a tensor's hook: not the model's
    assert watch.changed() is None
    added = model[0].register_forward_hook(lambda m, a, o: o)
    assert watch.changed() == "forward hooks of 0"
    added.remove()
    assert watch.changed() is None
    kept.remove()
    assert watch.changed() == "forward hooks of 1"
    watch = HookWatch(model)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: o)
    try:
        assert watch.changed() == "global forward hooks"
    finally:
        handle.remove()


def test_set_aside_puts_hooks_back_in_order():
    lin = torch.nn.Linear(2, 2)
    calls = []
    lin.register_forward_hook(lambda m, a, o: calls.append("a"))
    lin.register_forward_hook(lambda m, a, kw, o: calls.append("b"), with_kwargs=True, always_call=True)
    lin.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    with set_aside([lin, lin]):
        lin(torch.ones(2))
        assert calls == []
    lin(torch.ones(2))
    assert calls == ["pre", "a", "b"]


def _recorder(module, args, out):
    return None


_recorder.__module__ = "transformers.utils.output_capturing"  # as Hugging Face's output recorders are


def test_hooks_are_told_once_per_set_of_the_users_hooks(moecc_warnings):
    from moecc.hooks import tell_traced

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    tell_traced(model)  # no hooks: nothing to tell
    model[0].register_forward_hook(lambda m, a, o: o)
    tell_traced(model)
    model[1].register_forward_hook(_recorder)  # a library's recorder, installed between two captures
    tell_traced(model)
    told = [r.getMessage() for r in moecc_warnings.records if "has forward hooks on" in r.getMessage()]
    assert len(told) == 1 and "hooks on 0." in told[0]
    model[1].register_forward_pre_hook(lambda m, a: None)
    tell_traced(model)
    told = [r.getMessage() for r in moecc_warnings.records if "has forward hooks on" in r.getMessage()]
    assert len(told) == 2 and "hooks on 0, 1." in told[1]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_an_output_recorder_on_a_block_leaves_it_fused_and_records_its_output(backend):
    """Hugging Face's output recorders that sit on the MoE block itself (Llama 4's ``router_logits`` in
    transformers 5.17, Ernie 4.5 VL's): the recorder is traced around the block's leaf, so the fused program
    returns what it records, and it does nothing at run time. Set aside with the other hooks, the program lacked
    the recorded outputs, and compile failed on the output structure."""
    import transformers.utils.output_capturing as capturing
    from transformers.models.llama4 import modeling_llama4

    model = make_model("llama4_text").eval()
    key = str(model.model.__class__)
    before = dict.get(capturing._CAN_RECORD_REGISTRY, key)
    dict.__setitem__(capturing._CAN_RECORD_REGISTRY, key, {**before, "router_logits": modeling_llama4.Llama4TextMoe})
    try:
        ids = torch.randint(0, 97, (2, 6))
        with torch.no_grad():
            model(input_ids=ids, output_router_logits=True, use_cache=False)  # installs the recorders
        blocks = [layer.feed_forward for layer in model.model.layers]
        assert all(len(b._forward_hooks) == 1 for b in blocks)
        cm = moecc.compile(model, backend=backend)
        for shape in [(2, 6), (3, 5)]:
            ids = torch.randint(0, 97, shape)
            with torch.no_grad():
                out = cm(input_ids=ids, output_router_logits=True)
                eager = model(input_ids=ids, output_router_logits=True, use_cache=False)
            assert list(out.keys()) == list(eager.keys())
            torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)
            if "router_logits" not in eager:  # transformers 5.17's Llama 4 records them and returns none
                continue
            assert len(out.router_logits) == len(eager.router_logits) == len(blocks)
            for mine, theirs in zip(out.router_logits, eager.router_logits):
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        assert [layer.fused for layer in cm.moe_layers] == [True] * len(blocks)
        assert {e.backend for e in cm._entries} == {backend}
    finally:
        dict.__setitem__(capturing._CAN_RECORD_REGISTRY, key, before)


def test_set_aside_keeps_output_recorders():
    """``set_aside`` removes a block's own hooks but not Hugging Face's output recorders, and puts all back."""
    from transformers.utils.output_capturing import install_output_capuring_hook

    block = torch.nn.Linear(4, 4)
    mine = block.register_forward_hook(_doubled)
    install_output_capuring_hook(block, "router_logits", 1)
    ids = list(block._forward_hooks)
    with set_aside([block]):
        assert list(block._forward_hooks) == ids[1:]
    assert list(block._forward_hooks) == ids and mine.id == ids[0]
