"""A model whose weights change after compile: the program's copies of them must not go stale
(``moecc/runtime/weights.py``)."""

import pytest
import torch
from hf_models import make_model
from torch import nn

import moecc

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(module, ids):
    with torch.no_grad():
        return module(input_ids=ids.to(next(module.parameters()).device), use_cache=False).logits.cpu()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "triton"])
def test_changed_weights_are_seen(backend):
    torch.manual_seed(0)
    model = make_model("mixtral").to(DEVICE if backend == "triton" else "cpu")
    tol = dict(rtol=2e-3, atol=2e-3) if backend == "triton" and DEVICE == "cuda" else dict(rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 97, (2, 6))
    # each check below compares with eager itself: the interpreter's own check of each capture would double them
    cm = moecc.compile(model, backend=backend, verify=backend != "triton")
    torch.testing.assert_close(_logits(cm, ids), _logits(model, ids), **tol)
    watched = cm._entries[-1].weights
    assert len(watched) > 0 and watched.changed() is None

    with torch.no_grad():  # in place: the expert banks, which every backend copies
        for p in model.parameters():
            p.mul_(1.25)
    torch.testing.assert_close(_logits(cm, ids), _logits(model, ids), **tol)
    assert cm.captures == 2

    state = {k: v * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    torch.testing.assert_close(_logits(cm, ids), _logits(model, ids), **tol)
    assert cm.captures == 3

    experts = model.model.layers[1].mlp.experts  # a parameter assigned anew
    experts.down_proj = torch.nn.Parameter(torch.randn_like(experts.down_proj))
    torch.testing.assert_close(_logits(cm, ids), _logits(model, ids), **tol)
    assert cm.captures == 4

    _logits(cm, ids)
    assert cm.captures == 4  # nothing changed: no compile


def test_parameters_the_program_reads_in_place():
    """The torch program reads attention and norm weights where the model keeps them: an update in place there is
    seen without compiling again; a parameter assigned anew is not, and compiles again."""
    torch.manual_seed(0)
    model = make_model("mixtral")
    ids = torch.randint(0, 97, (2, 6))
    cm = moecc.compile(model, backend="torch")
    _logits(cm, ids)
    copied = cm._entries[-1].weights.copied()
    assert copied and "model.layers.0.self_attn.q_proj.weight" not in copied
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(3.0)
    torch.testing.assert_close(_logits(cm, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert cm.captures == 1
    layer = model.model.layers[1].self_attn.o_proj  # assigned anew: the program held the old tensor
    layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))
    torch.testing.assert_close(_logits(cm, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert cm.captures == 2


def _compiled(family: str, backend: str):
    """(model, ids, compiled model after one call on ids)."""
    torch.manual_seed(0)
    model = make_model(family)
    ids = torch.randint(0, 97, (2, 6))
    cm = moecc.compile(model, backend=backend)
    _logits(cm, ids)
    return model, ids, cm


def test_a_converted_model_compiles_again():
    """``model.half()`` swaps each parameter's data and keeps its version counter."""
    model, ids, cm = _compiled("qwen3_moe", "torch")
    model.half()
    out = _logits(cm, ids)
    assert out.dtype == torch.float16 and cm.captures == 2
    torch.testing.assert_close(out, _logits(model, ids), rtol=2e-2, atol=2e-3)


def test_a_model_made_under_inference_mode():
    """Its parameters are inference tensors, which have no version counter."""
    torch.manual_seed(0)
    with torch.inference_mode():
        model = make_model("mixtral")
        ids = torch.randint(0, 97, (2, 6))
        cm = moecc.compile(model, backend="torch")
        torch.testing.assert_close(_logits(cm, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
        experts = model.model.layers[0].mlp.experts
        experts.gate_up_proj = torch.nn.Parameter(torch.randn_like(experts.gate_up_proj), requires_grad=False)
        torch.testing.assert_close(_logits(cm, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
        assert cm.captures == 2



def test_the_watch_can_be_turned_off_and_says_what_it_costs(monkeypatch, caplog):
    import logging

    from moecc.runtime import compiled

    torch.manual_seed(0)
    model = make_model("mixtral")
    ids = torch.randint(0, 97, (2, 6))
    cm = moecc.compile(model, backend="torch")  # sets the moecc loggers' level from MOECC_LOGS
    logger, level = logging.getLogger("moecc"), logging.getLogger("moecc").level
    logger.addHandler(caplog.handler)  # moecc's logger has a handler of its own and does not propagate
    logger.setLevel(logging.WARNING)
    monkeypatch.setattr(compiled, "WATCH_COST_WARNING_S", 0.0)
    try:
        _logits(cm, ids)
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
    assert any("MOECC_WATCH_WEIGHTS=0" in r.getMessage() for r in caplog.records)

    monkeypatch.setenv("MOECC_WATCH_WEIGHTS", "0")
    cm = moecc.compile(model, backend="torch")
    _logits(cm, ids)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.25)
    # not compiled again: the expert copies keep the values they were built with, as asked
    assert not torch.allclose(_logits(cm, ids), _logits(model, ids), rtol=1e-3, atol=1e-3)
    assert cm.captures == 1 and len(cm._entries[-1].weights) == 0


def test_a_deep_copy_keeps_its_program_and_watches_its_own_weights():
    """The copy's parameters are new tensors (other data pointers, fresh versions): its watch is stamped from them,
    so the copy runs without compiling again, and an update of the copy's weights (not the original's) is seen."""
    import copy

    model, ids, cm = _compiled("mixtral", "torch")
    copied = copy.deepcopy(cm)
    assert copied._entries[-1].weights.changed() is None
    torch.testing.assert_close(_logits(copied, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert copied.captures == 1
    with torch.no_grad():
        for p in copied.original_model.parameters():
            p.mul_(1.25)
    torch.testing.assert_close(_logits(copied, ids), _logits(copied.original_model, ids), rtol=1e-5, atol=1e-5)
    assert copied.captures == 2 and cm._entries[-1].weights.changed() is None


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_change_made_before_a_deep_copy_is_seen_in_the_copy(backend):
    """ONNX Runtime's program holds copies of every weight. The torch program's canonical modules hold the model's
    tensors themselves, detached: views of them made under no_grad, which torch refuses to copy once their base
    changed in place, would make the copy fail."""
    import copy

    model, ids, cm = _compiled("mixtral", backend)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj.mul_(2.0)
    copied = copy.deepcopy(cm)
    assert copied._entries[-1].weights.changed() == "model.layers.1.mlp.experts.down_proj"
    torch.testing.assert_close(_logits(copied, ids), _logits(copied.original_model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_buffers_changed_after_compile_are_seen(backend):
    """A buffer assigned anew is not the one the program reads, and ONNX Runtime holds a copy of every buffer: an
    update in place there, or a buffer assigned anew anywhere, compiles again."""
    from user_modules import LoopMoE, TinyModel

    class ScaledLogits(TinyModel):
        def __init__(self, block):
            super().__init__(block)
            self.register_buffer("scale", torch.ones(()))

        def forward(self, ids):
            return super().forward(ids) * self.scale

    torch.manual_seed(0)
    model = ScaledLogits(LoopMoE()).eval()
    cm = moecc.compile(model, backend=backend)
    ids = torch.randint(0, 50, (2, 8))
    cm(ids)
    with torch.no_grad():
        model.scale.fill_(2.0)
    torch.testing.assert_close(cm(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert cm.captures == (1 if backend == "torch" else 2)  # the torch program reads it in place
    model.scale = torch.tensor(3.0)
    torch.testing.assert_close(cm(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert cm.captures == (2 if backend == "torch" else 3)


def test_settings_of_a_block_changed_after_compile_are_seen():
    """``gate.top_k = 1`` after compile changes the function the program was built for; so does train()."""
    torch.manual_seed(0)
    model = make_model("qwen3_moe").eval()
    ids = torch.randint(0, 97, (2, 6))
    cm = moecc.compile(model, backend="torch")
    _logits(cm, ids)
    for layer in model.model.layers:
        layer.mlp.gate.top_k = 1
    torch.testing.assert_close(_logits(cm, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert cm.captures == 2
    assert cm.moe_layers[0].top_k == 1
    _logits(cm, ids)
    assert cm.captures == 2
    model.train()
    assert cm._entries[-1].weights.changed() == "training"


def _self_counting_moe():
    """A block no canonical form computes (a LayerNorm in each expert) that counts its calls and reads ``top_k``."""
    from user_modules import LoopMoE

    class SelfCountingMoE(LoopMoE):
        calls = 0

        def forward(self, x):
            self.calls += 1
            return super().forward(x)

    block = SelfCountingMoE()
    for i, expert in enumerate(block.experts):
        block.experts[i] = nn.Sequential(nn.LayerNorm(24), expert)
    return block


def test_settings_of_a_block_a_torch_program_calls_as_written_are_read_live():
    """Such a block runs as the module it is, reading its settings when it runs: ``top_k`` set by the user compiles
    nothing again, and the block still counts its calls (a compiled call runs it)."""
    from user_modules import TinyModel

    torch.manual_seed(0)
    model = TinyModel(_self_counting_moe()).eval()
    cm = moecc.compile(model, backend="torch")
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        cm(ids)
        (layer,) = cm.moe_layers
        assert not layer.fused and layer.reason
        calls = model.moe.calls
        model.moe.top_k = 1
        torch.testing.assert_close(cm(ids), model(ids), rtol=1e-5, atol=1e-6)
    assert cm.captures == 1 and model.moe.calls == calls + 2


def test_settings_of_blocks_left_as_written_stay_watched_where_the_program_holds_their_code():
    """An ONNX program holds a block's code exported, and a Triton one may replay it from a CUDA graph."""
    from moecc.capture import CaptureHints
    from moecc.ir import MoELayerInfo
    from moecc.runtime.compiled import _built_for_settings

    layers = {"fused": MoELayerInfo(name="fused", graph_prefix="moe_block_0_moe", fused=True),
              "as_written": MoELayerInfo(name="as_written", reason="no canonical form"),
              "routed_around_its_experts": MoELayerInfo(name="routed_around_its_experts", reason="its router")}
    hints = CaptureHints(routed_banks={"routed_around_its_experts": ("experts", "why")})
    assert _built_for_settings(layers, "torch", hints) == ["fused", "routed_around_its_experts"]
    for backend in ("onnxruntime", "triton"):
        assert _built_for_settings(layers, backend, hints) == list(layers)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_attributes_a_block_writes_on_every_call_are_state_not_settings(backend):
    """A fused block that records each call's token count (as NLLB-MoE's router sets its capacity from it): an
    eager call between compiled ones writes it anew, which compiles nothing again; a setting the user changes still
    does."""
    from user_modules import LoopMoE, TinyModel

    class RecordingMoE(LoopMoE):
        tokens_seen = 0

        def forward(self, x):
            self.tokens_seen = x.shape[0] * x.shape[1]
            return super().forward(x)

    torch.manual_seed(0)
    model = TinyModel(RecordingMoE()).eval()
    cm = moecc.compile(model, backend=backend)
    with torch.no_grad():
        cm(torch.randint(0, 50, (2, 9)))
        assert cm.moe_layers[0].fused
        for shape in ((3, 7), (2, 5)):
            ids = torch.randint(0, 50, shape)
            torch.testing.assert_close(cm(ids), model(ids), rtol=1e-4, atol=1e-5)
        assert cm.captures == 1
        model.moe.top_k = 1
        ids = torch.randint(0, 50, (3, 7))
        torch.testing.assert_close(cm(ids), model(ids), rtol=1e-4, atol=1e-5)
    assert cm.captures == 2 and cm.moe_layers[0].top_k == 1


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_settings_the_program_holds_compile_again_wherever_they_live(backend):
    """torch.export bakes every plain value the traced code reads: a norm's ``eps`` outside any MoE block, a class
    attribute the user then sets on the instance. Eager reads them anew at each call; the program did not, and
    gave the old function without a word."""
    import copy

    from user_modules import LoopMoE, TinyModel

    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval()
    cm = moecc.compile(model, backend=backend)
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        cm(ids)
        copied = copy.deepcopy(cm)
        model.norm.eps = 0.5
        assert cm._entries[-1].weights.changed() == "norm.eps"
        torch.testing.assert_close(cm(ids), model(ids), rtol=1e-4, atol=1e-5)
        assert cm.captures == 2
        model.moe.renormalize = False  # LoopMoE's class attribute, now shadowed
        torch.testing.assert_close(cm(ids), model(ids), rtol=1e-4, atol=1e-5)
        for _ in range(2):
            cm(ids)
        assert cm.captures == 3
        # the copy watches its own model, its block's settings too (it watched the dicts of the original's copy,
        # which no copied module reads)
        assert copied._entries[-1].weights.changed() is None
        copied.original_model.moe.top_k = 1
        assert copied._entries[-1].weights.changed() == "moe.top_k"
        copied.original_model.moe.top_k = 2
        copied.original_model.norm.eps = 0.25
        assert copied._entries[-1].weights.changed() == "norm.eps"


def test_a_config_value_read_at_each_call_compiles_again_when_changed():
    """Hugging Face models read some settings from their config in ``forward`` (Mixtral's sliding window)."""
    torch.manual_seed(0)
    model = make_model("mixtral").eval()
    ids = torch.randint(0, 97, (2, 40))
    cm = moecc.compile(model, backend="torch")
    _logits(cm, ids)
    model.config.sliding_window = 8
    torch.testing.assert_close(_logits(cm, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert cm.captures == 2
    _logits(cm, ids)
    assert cm.captures == 2


def test_a_counter_the_model_reads_and_bumps_is_no_setting():
    """What each call writes over after reading it is state: the compiled calls do not compile again."""
    from user_modules import LoopMoE, TinyModel

    class CountingModel(TinyModel):
        calls = 0

        def forward(self, ids):
            self.calls += 1
            return super().forward(ids)

    torch.manual_seed(0)
    model = CountingModel(LoopMoE()).eval()
    cm = moecc.compile(model, backend="torch")
    with torch.no_grad():
        for shape in ((2, 9), (2, 9), (3, 9)):
            ids = torch.randint(0, 50, shape)
            torch.testing.assert_close(cm(ids), model(ids), rtol=1e-4, atol=1e-5)
    assert cm.captures == 1


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_plain_tensor_attribute_the_code_reads_is_watched(backend):
    """A tensor held as a plain attribute (no buffer) is a constant of the program: torch's reads the tensor itself,
    so one assigned anew went unseen; ONNX Runtime's holds a copy, so an update in place went unseen too."""
    import copy

    from user_modules import LoopMoE, TinyModel

    class TableModel(TinyModel):
        def __init__(self, block):
            super().__init__(block)
            self.table = torch.ones(24)

        def forward(self, ids):
            return super().forward(ids) * self.table[: self.head.out_features].sum()

    torch.manual_seed(0)
    model = TableModel(LoopMoE()).eval()
    cm = moecc.compile(model, backend=backend)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        cm(ids)
        copied = copy.deepcopy(cm)
        model.table.mul_(2)
        torch.testing.assert_close(cm(ids), model(ids), rtol=1e-4, atol=1e-5)
        assert cm.captures == (1 if backend == "torch" else 2)
        model.table = torch.full((24,), 3.0)
        torch.testing.assert_close(cm(ids), model(ids), rtol=1e-4, atol=1e-5)
        assert cm.captures == (2 if backend == "torch" else 3)
        assert copied._entries[-1].weights.changed() is None
        copied.original_model.table = torch.zeros(24)
        assert copied._entries[-1].weights.changed() == "table"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_module_replaced_after_compile_compiles_again(backend):
    """A module assigned anew (an expert swapped in its list, a norm, a router) brings parameters of its own, which
    no watched slot held: the program ran the old ones."""
    import copy

    from user_modules import MLP, LoopMoE, TinyModel

    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval()
    cm = moecc.compile(model, backend=backend)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        cm(ids)
        copied = copy.deepcopy(cm)
        for captures, replace in enumerate((lambda: model.moe.experts.__setitem__(0, MLP(24, 40)),
                                            lambda: setattr(model, "norm", nn.LayerNorm(24, eps=0.3)),
                                            lambda: setattr(model.moe, "gate", nn.Linear(24, 6, bias=False))), 2):
            replace()
            torch.testing.assert_close(cm(ids), model(ids), rtol=1e-4, atol=1e-5)
            assert cm.captures == captures
        assert copied._entries[-1].weights.changed() is None
        copied.original_model.moe.experts[1] = MLP(24, 40)
        assert copied._entries[-1].weights.changed() == "moe.experts.1"
