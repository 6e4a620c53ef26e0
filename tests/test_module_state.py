"""State a call changes (buffers, tensors written in place): compiling leaves it as found, each compiled call
changes it as eager does, and ONNX Runtime, which cannot write it, is not taken for such a program."""

import pytest
import torch
from user_modules import CacheWritingModel, CountingMoE, LoopMoE, StepScaledModel, TinyModel

import moecc
from moecc import module_state


def _twins(make):
    torch.manual_seed(0)
    model, twin = make().eval(), make().eval()
    twin.load_state_dict(model.state_dict())
    return model, twin


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_step_count_changes_once_per_compiled_call(backend):
    """Compiling calls the model many times; the count is 1 after the first compiled call, and every output,
    which the count scales, is eager's."""
    model, twin = _twins(lambda: StepScaledModel(LoopMoE()))
    cm = moecc.compile(model, backend=backend)
    for step in range(1, 4):
        ids = torch.randint(0, 50, (2, 16))
        torch.testing.assert_close(cm(ids), twin(ids), rtol=1e-5, atol=1e-5)
        assert model.steps.item() == twin.steps.item() == step
    (layer,) = cm.moe_layers
    assert layer.fused, layer.reason
    assert layer.lowering != "com.microsoft.MoE"  # ONNX Runtime would drop the count: auto falls back to torch


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_tensors_a_call_writes_into_are_written_once_as_eager_writes_them(backend):
    model = CacheWritingModel(LoopMoE()).eval()
    cm = moecc.compile(model, backend=backend)
    mine, eager = (torch.zeros(2, 20, 24), torch.zeros(3)), (torch.zeros(2, 20, 24), torch.zeros(3))
    for _ in range(2):
        ids = torch.randint(0, 50, (2, 16))
        torch.testing.assert_close(cm(ids, *mine), model(ids, *eager), rtol=1e-5, atol=1e-4)
        for a, b in zip(mine, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert eager[1].abs().sum() > 0


def test_onnxruntime_refuses_a_program_that_writes_into_its_inputs_or_buffers():
    cm = moecc.compile(StepScaledModel(LoopMoE()).eval(), backend="onnxruntime")
    with pytest.raises(moecc.BackendError, match="writes into the model's buffer steps in place"):
        cm(torch.randint(0, 50, (2, 16)))
    cm = moecc.compile(CacheWritingModel(LoopMoE()).eval(), backend="onnxruntime")
    with pytest.raises(moecc.BackendError, match="writes into its tensor argument 1, tensor argument 2 in place"):
        cm(torch.randint(0, 50, (2, 16)), torch.zeros(2, 20, 24), torch.zeros(3))


def test_a_block_that_updates_its_buffers_runs_as_written_and_its_count_is_eagers():
    """Recognition's probes call the block hundreds of times: its count is put back after them, and the block,
    whose count no fused op would update, runs as written."""
    model, twin = _twins(lambda: TinyModel(CountingMoE()))
    cm = moecc.compile(model, backend="torch")
    for _ in range(2):
        ids = torch.randint(0, 50, (3, 11))
        torch.testing.assert_close(cm(ids), twin(ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.moe.expert_tokens, twin.moe.expert_tokens)
    (layer,) = cm.moe_layers
    assert not layer.fused
    assert "updates its buffer expert_tokens" in layer.reason


def test_export_leaves_the_models_state_as_found(tmp_path):
    model, twin = _twins(lambda: StepScaledModel(LoopMoE()))
    ids = torch.randint(0, 50, (2, 16))
    loaded = moecc.load(moecc.export(model, (ids,), tmp_path / "art", backend="torch"))
    assert model.steps.item() == 0
    torch.testing.assert_close(loaded(ids), twin(ids), rtol=1e-5, atol=1e-5)


def test_a_snapshot_tells_buffers_changed_in_place_or_anew_and_puts_them_back():
    module = torch.nn.Module()
    module.register_buffer("count", torch.zeros(3))
    module.register_buffer("flag", torch.ones((), dtype=torch.bool))
    module.sub = torch.nn.Module()
    module.sub.register_buffer("nan", torch.tensor([float("nan"), 1.0]))
    handed = torch.arange(4.0)
    count = module.count
    with module_state.kept(module, [handed]) as before:
        assert before.changed() == []
        module.count += 1
        module.sub.nan = torch.tensor([float("nan"), 2.0])
        handed.mul_(2)
        assert before.changed() == ["count", "sub.nan"]
    assert module.count is count and torch.equal(module.count, torch.zeros(3))
    assert module.sub.nan[1] == 1.0 and module.sub.nan[0].isnan()
    assert torch.equal(handed, torch.arange(4.0))


def test_buffers_past_the_copy_budget_are_told_changed_and_keep_the_change(monkeypatch):
    """Copies go to the smallest tensors first (a step count before a quantized model's weights held as buffers)."""
    monkeypatch.setattr(module_state, "COPY_BUDGET_BYTES", 80)
    told = []
    monkeypatch.setattr(module_state.log, "warning", lambda msg, *args: told.append(msg % args))
    module = torch.nn.Module()
    module.register_buffer("big", torch.zeros(16))  # 64 bytes
    module.register_buffer("bigger", torch.zeros(32))
    module.register_buffer("count", torch.zeros(2))
    with module_state.kept(module) as before:
        module.big += 1
        module.bigger += 1
        module.count += 1
        assert before.changed() == ["big", "bigger", "count"]
    assert module.big.sum() == 0 and module.count.sum() == 0 and module.bigger.sum() == 32
    assert len(told) == 1 and "bigger changed while compiling" in told[0]


class _StepScaledHF(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, input_ids):
        self.steps += 1
        return self.model(input_ids=input_ids).logits * self.steps


def test_a_step_count_through_torch_compile_changes_once_per_call():
    """Dynamo hands moecc a graph whose buffer update ONNX Runtime would drop: backend 'auto' takes torch, and
    the fused blocks' outputs are scaled by eager's count."""
    from hf_models import make_inputs, make_model

    torch._dynamo.reset()
    model, twin = _twins(lambda: _StepScaledHF(make_model("mixtral")))
    compiled = torch.compile(model, backend="moecc", options={"backend": "auto"})
    with torch.no_grad():
        for step in range(1, 3):
            ids = make_inputs("mixtral", 2, 8, seed=step)["input_ids"]
            torch.testing.assert_close(compiled(ids), twin(ids), rtol=1e-4, atol=1e-5)
            assert model.steps.item() == twin.steps.item() == step
    torch._dynamo.reset()


def test_the_inputs_and_buffers_a_program_writes_are_named():
    """A replayed CUDA graph would copy the caller's tensors in and never back: programs that write them run as
    launched (``_Entry.writes``); programs of the usual models write nothing."""
    from hf_models import make_inputs, make_model

    writes = {}
    for name, model, call in [
        ("steps", StepScaledModel(LoopMoE()), (torch.randint(0, 50, (2, 8)),)),
        ("cache", CacheWritingModel(LoopMoE()), (torch.randint(0, 50, (2, 8)), torch.zeros(2, 20, 24),
                                                 torch.zeros(3))),
    ]:
        cm = moecc.compile(model.eval(), backend="torch")
        cm(*call)
        writes[name] = cm._entries[0].writes
    assert writes == {"steps": ["model.steps"], "cache": ["tensors_1", "tensors_2"]}
    cm = moecc.compile(make_model("mixtral").eval(), backend="torch")
    with torch.no_grad():
        cm(**make_inputs("mixtral", 2, 8))
    assert cm._entries[0].writes == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_programs_that_write_state_write_it_once_per_call_on_the_gpu():
    pytest.importorskip("triton")
    model, twin = _twins(lambda: StepScaledModel(LoopMoE()))
    model, twin = model.cuda(), twin.cuda()
    cm = moecc.compile(model, backend="triton")
    for step in range(1, 4):
        ids = torch.randint(0, 50, (2, 8), device="cuda")
        torch.testing.assert_close(cm(ids), twin(ids), rtol=1e-4, atol=1e-4)
        assert model.steps.item() == twin.steps.item() == step
    model = CacheWritingModel(LoopMoE()).eval().cuda()
    cm = moecc.compile(model, backend="triton")
    for _ in range(3):
        ids = torch.randint(0, 50, (2, 8), device="cuda")
        mine, eager = [(torch.zeros(2, 20, 24, device="cuda"), torch.zeros(3, device="cuda")) for _ in range(2)]
        torch.testing.assert_close(cm(ids, *mine), model(ids, *eager), rtol=1e-4, atol=1e-4)
        for a, b in zip(mine, eager):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
