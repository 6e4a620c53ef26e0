"""The runtime calls a program's moecc ops directly (moecc/runtime/direct.py), and export still sees the ops."""

import pytest
import torch
from user_modules import BmmMoE, TinyModel

import moecc
from moecc.runtime.direct import direct_body, direct_calls


def _moecc_ops(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "moecc"]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_runner_calls_moecc_ops_directly_with_the_same_numbers(backend):
    torch.manual_seed(0)
    model = TinyModel(BmmMoE()).eval()
    cm = moecc.compile(model, backend=backend)
    x = torch.randint(0, 50, (2, 8))
    out = cm(x)
    entry = cm._entries[0]
    assert _moecc_ops(entry.gm), "the program itself keeps its moecc ops (export and tracing need them)"
    assert not _moecc_ops(entry.runner)
    tensors = [x]
    torch.testing.assert_close(entry.runner(*tensors)[0], entry.gm(*tensors)[0], rtol=0, atol=0)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    assert dict(entry.runner.named_parameters()).keys() == dict(entry.gm.named_parameters()).keys()
    assert all(a is b for a, b in zip(entry.runner.parameters(), entry.gm.parameters())), "weights are shared"


def test_only_moecc_custom_ops_are_swapped():
    assert direct_body(torch.ops.aten.add.Tensor) is None
    assert direct_body(torch.add) is None
    assert direct_body(torch.ops.moecc.fused_moe.default) is not None
    gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 4))
    assert direct_calls(gm) is gm  # nothing to swap: the program runs as it is


def test_loaded_artifact_calls_moecc_ops_directly(tmp_path):
    torch.manual_seed(0)
    model = TinyModel(BmmMoE()).eval()
    x = torch.randint(0, 50, (2, 8))
    loaded = moecc.load(moecc.export(model, (x,), tmp_path / "m.moecc", backend="torch"))
    programs = [c.cell_contents for c in loaded.program.__closure__ or ()
                if isinstance(c.cell_contents, torch.fx.GraphModule)]  # the loaded program the runner calls
    assert len(programs) == 1 and not _moecc_ops(programs[0])
    fresh = torch.randint(0, 50, (3, 5))
    torch.testing.assert_close(loaded(fresh), model(fresh), rtol=1e-5, atol=1e-6)
