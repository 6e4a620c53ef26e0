"""One pattern test per pass, on a captured user model."""

import os
import subprocess
import sys

import pytest
import torch
from user_modules import LoopMoE, TinyModel

import moecc
from moecc.capture import capture
from moecc.passes import (
    Cleanup,
    FuseExperts,
    FuseGating,
    PassManager,
    PlaceExperts,
    Recognize,
    SpecializeCapacity,
    Timing,
)
from moecc.passes.fuse_gating import match_gating
from moecc.passes.graph_utils import op_arguments

OPS = torch.ops.moecc


def _captured():
    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval()
    x = torch.randint(0, 50, (2, 8))
    return model, x, capture(model, (x,), {})


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _same(model, gm, x):
    torch.testing.assert_close(gm(x)[0], model(x), rtol=1e-5, atol=1e-6)


def test_pipeline_passes_one_by_one():
    model, x, cap = _captured()
    gm = cap.gm
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    fresh = torch.randint(0, 50, (3, 5))
    r = Recognize()(gm)
    assert r.modified and OPS.route.default in _targets(gm) and OPS.dispatch.default in _targets(gm)
    _same(model, gm, fresh)
    r = FuseGating()(gm)
    assert r.modified and OPS.fused_route.default in _targets(gm) and OPS.route.default not in _targets(gm)
    _same(model, gm, fresh)
    r = FuseExperts()(gm)
    assert r.modified and OPS.fused_moe.default in _targets(gm) and OPS.combine.default not in _targets(gm)
    _same(model, gm, fresh)
    p = SpecializeCapacity()
    r = p(gm)
    assert list(p.stats["capacity"].values()) == ["2*T"]
    r = PlaceExperts("io")(gm)
    node = next(n for n in gm.graph.nodes if n.target is OPS.fused_moe.default)
    assert r.modified and node.args[16] == "io"
    _same(model, gm, fresh)
    r = PlaceExperts("oi_gu")(gm)  # from io: gate/up rows interleaved for one-tile GEMM 1
    assert r.modified and node.args[16] == "oi_gu"
    assert gm.get_parameter(node.args[3].target).shape == (6, 2 * 40, 24)  # [E, 2I, H]
    assert gm.get_parameter(node.args[4].target).shape == (6, 24, 40)  # [E, H, I], oi
    _same(model, gm, fresh)
    assert not PlaceExperts("oi_gu")(gm).modified
    r = Cleanup()(gm)
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    _same(model, gm, fresh)


def test_place_experts_keeps_weights_the_model_holds():
    model, _, cap = _captured()
    gm = cap.gm
    for p in (Recognize(), FuseGating(), FuseExperts(), SpecializeCapacity()):
        p(gm)
    node = next(n for n in gm.graph.nodes if n.target is OPS.fused_moe.default)
    gm.register_parameter("held_by_the_model", gm.get_parameter(node.args[3].target))
    kept = PlaceExperts("io", copy_weights=False)
    assert not kept(gm).modified and node.args[16] == "oi" and "model's own tensors" in kept.stats["kept"][0]
    _same(model, gm, torch.randint(0, 50, (3, 5)))
    assert PlaceExperts("io", copy_weights=True)(gm).modified and node.args[16] == "io"
    _same(model, gm, torch.randint(0, 50, (3, 5)))


def test_place_experts_lays_out_weights_that_are_views():
    """Stacked ``[E, in, out]`` weights an einsum reads are recognized as transposed views in ``oi``: the layout
    wanted, but not contiguous. They get a contiguous copy (TMA reads contiguous tiles only), unless copies are
    off, and the reason says so."""
    from user_modules import DenseEinsumMoE

    for copies in (None, False):
        torch.manual_seed(0)
        model = TinyModel(DenseEinsumMoE()).eval()
        gm = capture(model, (torch.randint(0, 50, (2, 8)),), {}).gm
        for p in (Recognize(), FuseGating(), FuseExperts(), SpecializeCapacity()):
            p(gm)
        node = next(n for n in gm.graph.nodes if n.target is OPS.fused_moe.default)
        assert node.args[16] == "oi" and not gm.get_parameter(node.args[3].target).is_contiguous()
        place = PlaceExperts("oi", copy_weights=copies)
        assert place(gm).modified == (copies is None)
        laid_out = [gm.get_parameter(n.target).is_contiguous() for n in node.args[3:5]]
        assert laid_out == [copies is None] * 2 and node.args[16] == "oi"
        if copies is False:
            assert "contiguous oi copy" in place.stats["kept"][0]
        _same(model, gm, torch.randint(0, 50, (3, 5)))


def test_fuse_gating_says_why_not():
    _, _, cap = _captured()
    Recognize()(cap.gm)
    route = next(n for n in cap.gm.graph.nodes if n.target is OPS.route.default)
    route.args = (route.args[0].args[0],) + route.args[1:]  # logits no longer from a linear
    assert "linear" in match_gating(route).reason


def test_failing_pass_is_named_and_input_saved(tmp_path):
    class Boom(Recognize):
        name = "boom"

        def run(self, gm):
            raise RuntimeError("kaboom")

    _, _, cap = _captured()
    with pytest.raises(moecc.PassError, match="boom.*kaboom") as info:
        PassManager([Boom()], [Timing()], repro_dir=tmp_path)(cap.gm)
    assert "001_failed_boom_input" in str(info.value)


def test_the_pipeline_regenerates_code_once_when_nothing_reads_it_between_passes(monkeypatch):
    model, x, cap = _captured()
    gm = cap.gm
    calls = []
    real = type(gm).recompile
    monkeypatch.setattr(type(gm), "recompile", lambda self: calls.append(self) or real(self))
    result = PassManager(moecc.passes.default_pipeline(), [Timing()])(gm)
    assert result.modified and calls == [gm]
    assert gm.code == gm.graph.python_code("self").src  # the code is the graph the last pass left
    _same(model, gm, x)
    _same(model, gm, torch.randint(0, 50, (3, 5)))


def test_an_instrument_that_runs_the_module_sees_each_pass_s_code():
    class RunsEachStage(moecc.passes.manager.Instrument):
        def __init__(self):
            self.stale = []

        def after_pass(self, index, p, result, seconds):
            gm = result.graph_module
            if gm.code != gm.graph.python_code("self").src:
                self.stale.append(p.name)

    _, _, cap = _captured()
    runs = RunsEachStage()
    PassManager(moecc.passes.default_pipeline(), [Timing(), runs])(cap.gm)
    assert runs.stale == []


def test_a_pass_run_alone_leaves_its_code_current():
    model, x, cap = _captured()
    assert Recognize()(cap.gm).modified
    assert cap.gm.code == cap.gm.graph.python_code("self").src
    _same(model, cap.gm, x)


def test_the_repro_of_a_failing_pass_holds_what_it_left_of_the_graph(tmp_path):
    class HalfDone(Recognize):
        name = "half_done"

        def run(self, gm):
            super().run(gm)
            raise RuntimeError("stopped after recognizing")

    _, _, cap = _captured()
    with pytest.raises(moecc.PassError, match="half_done"):
        PassManager([HalfDone()], [Timing()], repro_dir=tmp_path)(cap.gm)
    assert "moecc.route" in (tmp_path / "001_failed_half_done_input.py").read_text()


def test_dumps_rerun(tmp_path):
    torch.manual_seed(0)
    model = TinyModel(LoopMoE()).eval()
    cm = moecc.compile(model, dump_dir=tmp_path)
    cm(torch.randint(0, 50, (2, 8)))
    stages = sorted(tmp_path.glob("[0-9][0-9][0-9]_*.py"))
    assert [p.name.split("_", 1)[1] for p in stages] == [
        "capture.py", "recognize.py", "lift_routing.py", "fuse_gating.py", "fuse_experts.py", "specialize_capacity.py",
        "place_experts.py", "cleanup.py"]
    assert (tmp_path / "passes.json").exists() and (tmp_path / "weights.safetensors").exists()
    # Stage 000 still holds the user's own block, so its class must be importable (like any pickle).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    for stage in stages:
        run = subprocess.run([sys.executable, stage.name], cwd=tmp_path, capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "OK" in run.stdout
    # without it, the stage says what it needs
    # (moecc itself stays importable: a source tree run through PYTHONPATH has no installed moecc)
    moecc_root = os.path.dirname(os.path.dirname(os.path.abspath(moecc.__file__)))
    bare = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": moecc_root}
    run = subprocess.run([sys.executable, stages[0].name], cwd=tmp_path, capture_output=True, text=True, env=bare)
    assert run.returncode != 0 and "modules of your own code" in run.stderr and "PYTHONPATH" in run.stderr


def test_bf16_router_is_fitted_on_bf16_logits():
    """Near-tie experts: bf16 logits round each pair together (the lower index wins), fp32 logits order it; the
    router must still be recognized (not kept as its own ops), with logits in bf16 and no fitted scale."""
    import transformers as tf
    import transformers.models.qwen3_moe.modeling_qwen3_moe as qwen3

    cfg = tf.Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=3,
                            norm_topk_prob=True)
    torch.manual_seed(0)
    block = qwen3.Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    block = block.to(torch.bfloat16).eval()
    with torch.no_grad():
        w = block.gate.weight
        for i in range(0, 16, 2):
            w[i + 1] = w[i]
            w[i + 1, i] += 1e-3
    cm = moecc.compile(block, backend="torch")
    cm(torch.randn(1, 64, 64, dtype=torch.bfloat16))
    layer = cm.moe_layers[0]
    assert layer.fused and layer.routing == "softmax->top3 renorm", layer.routing
    routes = [n for n in cm._entries[-1].gm.graph.nodes if n.target is torch.ops.moecc.fused_route.default]
    assert routes and routes[0].args[11] is False  # logits_fp32


def test_op_arguments_reads_a_call_by_its_schema_names():
    graph = torch.fx.Graph()
    logits, scale = graph.placeholder("logits"), graph.placeholder("expert_scale")
    bare = graph.call_function(OPS.route.default, (logits, None, 2, "softmax", False, True, 1, 1, 1.0))
    tail = graph.call_function(OPS.route.default, (logits, None, 2, "softmax", False, True, 1, 1, 1.0),
                               {"group_top": 1, "expert_scale": scale})
    assert op_arguments(bare)["group_top"] == 2 and op_arguments(bare)["expert_scale"] is None
    assert op_arguments(tail)["group_top"] == 1 and op_arguments(tail)["expert_scale"] is scale
    assert op_arguments(tail)["top_k"] == 2
    short = graph.call_function(OPS.route.default, (logits, None, 2))
    with pytest.raises(TypeError, match="'score'"):
        op_arguments(short)
