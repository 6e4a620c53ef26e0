"""Models whose weights are not all on one device: blocks offloaded to the meta device, a model on a second GPU, a
model split over two GPUs."""

import pytest
import torch
from hf_models import make_inputs, make_model
from torch import nn

import moecc
from moecc.routing import route_reference

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def offload(block: nn.Module) -> None:
    """``block``'s parameters kept on the meta device between calls and swapped in for each call, as accelerate's
    offloading hooks do."""
    store = {name: p.detach().clone() for name, p in block.named_parameters()}

    def swap(to_meta: bool):
        for name, t in store.items():
            owner, _, leaf = name.rpartition(".")
            block.get_submodule(owner)._parameters[leaf] = nn.Parameter(t.to("meta") if to_meta else t,
                                                                      requires_grad=False)

    swap(True)
    block.register_forward_pre_hook(lambda module, args: swap(False))
    block.register_forward_hook(lambda module, args, out: swap(True))


@pytest.mark.parametrize("offloader", ["hooks", "accelerate"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_blocks_with_offloaded_weights_run_as_written_and_say_why(backend, offloader):
    """A compiled block holds its weights; an offloaded one has none between calls (they were the first thing a
    fused block's probes read, and its compile failed on "Tensor.item() cannot be called on meta tensors")."""
    model = make_model("mixtral").eval()
    if offloader == "accelerate":
        pytest.importorskip("accelerate").cpu_offload(model.model.layers[1].mlp, execution_device="cpu")
    else:
        offload(model.model.layers[1].mlp)
    cm = moecc.compile(model, backend=backend)
    with torch.no_grad():
        for seed, (batch, seq) in enumerate([(2, 8), (3, 5), (1, 1)]):
            kwargs = make_inputs("mixtral", batch, seq, seed)
            torch.testing.assert_close(cm(**kwargs).logits, model(**kwargs).logits, rtol=1e-4, atol=1e-5)
    layers = {layer.name: layer for layer in cm.moe_layers}
    assert layers["model.layers.0.mlp"].fused, layers["model.layers.0.mlp"].reason
    offloaded = layers["model.layers.1.mlp"]
    assert not offloaded.fused and "offloaded (on the meta device" in offloaded.reason, offloaded



def _held_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor a program module holds: parameters, buffers and lifted constants, in it and its sub-modules."""
    out = []
    for m in module.modules():
        out += [t for t in vars(m).values() if isinstance(t, torch.Tensor)]
        out += [t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
    return out


def _onnx_initializers(module: nn.Module) -> list[torch.Tensor]:
    """The initializers of every ONNX graph a program module runs with ONNX Runtime."""
    import onnx
    from onnx import numpy_helper

    from moecc.codegen.onnx.lower import OrtModule

    return [torch.from_numpy(numpy_helper.to_array(init).copy())
            for m in module.modules() if isinstance(m, OrtModule)
            for init in onnx.load(m.path, load_external_data=True).graph.initializer]


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_compiled_model_holds_no_copy_of_offloaded_weights_and_an_artifact_holds_them(tmp_path, backend):
    """An offloaded block was traced through, hooks and all, so the program held the weights the hooks swapped in
    as constants: offloading saved no memory once compiled. It is now a leaf that calls the block: on torch, and
    on ONNX Runtime (``auto``), which runs the graphs before and after it and none of its weights. An artifact must
    hold every weight, so ``moecc.export`` still traces it through."""
    model = make_model("mixtral").eval()
    block = model.model.layers[1].mlp
    weights = [p.detach().clone() for p in block.parameters()]
    offload(block)
    kwargs = make_inputs("mixtral", 2, 8, 0)
    fresh = make_inputs("mixtral", 3, 5, 1)
    with torch.no_grad():
        cm = moecc.compile(model, backend=backend)
        torch.testing.assert_close(cm(**fresh).logits, model(**fresh).logits, rtol=1e-4, atol=1e-5)
        assert [entry.backend for entry in cm._entries] == ["torch" if backend == "torch" else "onnxruntime"]
        held = [t for entry in cm._entries for t in _held_tensors(entry.gm) if not t.is_meta]
        held += [t for entry in cm._entries for t in _onnx_initializers(entry.gm)]
        assert backend == "torch" or len(held) > 10  # the ONNX graphs' own weights were read
        copies = [t for t in held for w in weights if t.shape == w.shape and torch.equal(t, w)]
        assert not copies, [tuple(t.shape) for t in copies]
        moecc.export(model, (), tmp_path / "artifact", kwargs=kwargs, backend=backend)
        loaded = moecc.load(tmp_path / "artifact")
        torch.testing.assert_close(loaded(**fresh).logits, model(**fresh).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("offloader", ["hooks", "accelerate"])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_model_with_an_offloaded_block_compiles_once(backend, offloader):
    """Offloading hooks assign the block's parameters anew at every call; the weight check took that for a change
    and compiled the model again at every call (0.2 to 3.7 s a call on the CPU, for 4 ms). The program calls the
    block, which reads its weights as it runs, so they are not watched. Nor does such a program replay CUDA
    graphs: a graph replays no host work, and the hooks' is loading the weights."""
    model = make_model("mixtral").eval()
    block = model.model.layers[1].mlp
    if offloader == "accelerate":
        pytest.importorskip("accelerate").cpu_offload(block, execution_device="cpu")
    else:
        offload(block)
    calls = []
    block.register_forward_pre_hook(lambda module, args: calls.append(1))
    cm = moecc.compile(model, backend=backend)
    with torch.no_grad():
        for seed, (batch, seq) in enumerate([(3, 5), (3, 5), (2, 7), (3, 5)]):
            kwargs = make_inputs("mixtral", batch, seq, seed)
            calls.clear()
            torch.testing.assert_close(cm(**kwargs).logits, model(**kwargs).logits, rtol=1e-4, atol=1e-5)
            assert len(calls) == 2 or seed == 0  # the compiled call's and eager's
    assert cm.captures == 1
    (entry,) = cm._entries
    assert entry.backend == backend and entry.calls_offloaded


def test_calls_through_an_offloaded_block_take_turns():
    """Its hooks swap the block's weights in and out around each call, so two threads in it at once would read
    the other's meta weights: such a program runs under the compiled model's lock."""
    import threading

    model = make_model("mixtral").eval()
    offload(model.model.layers[1].mlp)
    cm = moecc.compile(model, backend="onnxruntime")
    kwargs = make_inputs("mixtral", 4, 16, 0)
    with torch.no_grad():
        ref = model(**kwargs).logits
        cm(**kwargs)
    failures = []

    def work():
        try:
            with torch.no_grad():
                for _ in range(8):
                    torch.testing.assert_close(cm(**kwargs).logits, ref, rtol=1e-4, atol=1e-5)
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


def _moe_args(t: int, device: str) -> list:
    g = torch.Generator().manual_seed(t)
    e, k, h, inter = 8, 2, 64, 48
    x = torch.randn(t, h, generator=g)
    w, ids = route_reference(torch.randn(t, e, generator=g), None, k, "softmax", False, True, 1, 1, 1.0)
    w_up, w_down = torch.randn(e, 2 * inter, h, generator=g) * 0.2, torch.randn(e, h, inter, generator=g) * 0.2
    args = [x, w, ids, w_up, w_down, None, None, "silu", True, 1.702, 0.0, -1, 0.0, 0, 0, "token", "oi"]
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


@two_gpus
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_triton_ops_launch_on_the_device_of_their_inputs(tokens):
    """Triton launches on the current device: inputs on cuda:1 while cuda:0 is current ran against another GPU's
    memory, on a stream ordered with none of its work."""
    from moecc.codegen.triton.moe import fused_moe_triton, fused_route_triton

    assert torch.cuda.current_device() == 0
    args = _moe_args(tokens, "cuda:1")
    ref = torch.ops.moecc.fused_moe(*args)
    got = fused_moe_triton(*args)
    assert got.device == torch.device("cuda:1")
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    x, router = args[0], torch.randn(8, args[0].shape[1], device="cuda:1")
    route = (x, router, None, None, 2, "softmax", False, True, 1, 1, 1.0, True)
    ref_w, ref_ids = torch.ops.moecc.fused_route(*route)
    got_w, got_ids = fused_route_triton(*route)
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_w, ref_w)


def _matches_eager(cm, model, device: str, shapes) -> None:
    with torch.no_grad():
        for seed, (batch, seq) in enumerate(shapes):
            kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                      for k, v in make_inputs("qwen3_moe", batch, seq, seed).items()}
            for _ in range(2):  # the second call of a small shape replays a CUDA graph
                ref, got = model(**kwargs).logits.float(), cm(**kwargs).logits.float()
                assert ((got - ref).norm() / ref.norm()).item() < 2e-2, (batch, seq)


@two_gpus
def test_a_model_on_the_second_gpu_compiles_for_triton_and_matches_eager():
    model = make_model("qwen3_moe").eval().to("cuda:1", torch.bfloat16)
    cm = moecc.compile(model, backend="triton")
    _matches_eager(cm, model, "cuda:1", [(2, 8), (1, 1), (3, 40), (2, 300)])
    assert all(layer.fused for layer in cm.moe_layers), cm.moe_layers


@two_gpus
def test_a_model_split_over_two_gpus_matches_eager():
    """Layers on two GPUs, as ``device_map="auto"`` places them (accelerate moves the activations between them). No
    CUDA graph is captured for a program on two devices: a graph records the work of one device's stream."""
    accelerate = pytest.importorskip("accelerate")
    model = make_model("qwen3_moe").eval().to(torch.bfloat16)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1}
    model = accelerate.dispatch_model(model, device_map=device_map)
    cm = moecc.compile(model, backend="triton")
    _matches_eager(cm, model, "cuda:0", [(2, 8), (1, 1), (3, 40), (2, 300)])
    layers = cm.moe_layers
    assert len(layers) == 2 and all(layer.fused for layer in layers), layers


class _OnDevice:
    """Stands in for a CUDA tensor on one device: all the graph cache asks of its inputs."""

    def __init__(self, index: int):
        self.index = index

    def get_device(self) -> int:
        return self.index


@pytest.mark.parametrize("weights,inputs,several", [({1}, [1, 1], False), ({0, 1}, [0], True), ({0}, [0, 1], True),
                                                    ({1}, [0], True), (set(), [1], False)])
def test_graph_caches_refuse_programs_on_several_gpus(weights, inputs, several):
    """Which calls a graph cache runs without graphs: a program whose weights or inputs span GPUs (its CPU half;
    the GPU tests above run it)."""
    from moecc.runtime.cudagraphs import GraphCache

    cache = GraphCache(lambda *tensors: tensors)
    cache.devices = weights
    tensors = [_OnDevice(i) for i in inputs]
    assert cache._on_several_devices(inputs[0], tensors) is several
    assert cache.spans_devices is several


def test_an_artifact_holds_each_weight_once(tmp_path):
    """The program file holds code: its weights are inputs, stored once in weights.safetensors (torch.export lifted
    the wrapped program's parameters into the .pt2's state_dict as well, a second copy of every weight)."""
    model = make_model("mixtral").eval()
    moecc.export(model, (), tmp_path / "art", kwargs=make_inputs("mixtral", 2, 8), backend="torch")
    program = torch.export.load(tmp_path / "art" / "program.pt2")
    assert not program.state_dict and not program.constants
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (tmp_path / "art" / "weights.safetensors").stat().st_size < 1.1 * weight_bytes


def _exported_and_loaded_elsewhere(tmp_path, backend: str, exported_on: str, loaded_on: str) -> None:
    model = make_model("qwen3_moe").eval().to(exported_on)
    example = {k: v.to(exported_on) if isinstance(v, torch.Tensor) else v
               for k, v in make_inputs("qwen3_moe", 2, 8).items()}
    moecc.export(model, (), tmp_path / "art", kwargs=example, backend=backend)
    loaded = moecc.load(tmp_path / "art", device=loaded_on)
    model = model.to(loaded_on)
    with torch.no_grad():
        for seed, (batch, seq) in enumerate([(3, 5), (1, 1)]):
            kwargs = {k: v.to(loaded_on) if isinstance(v, torch.Tensor) else v
                      for k, v in make_inputs("qwen3_moe", batch, seq, seed).items()}
            got, ref = loaded(**kwargs).logits, model(**kwargs).logits
            assert got.device == ref.device
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("exported_on,loaded_on", [("cpu", "cuda"), ("cuda", "cpu")])
def test_an_artifact_loaded_to_another_device_runs_there(tmp_path, exported_on, loaded_on):
    """``moecc.load(path, device=...)``: the program traced on one device named it in its ops (``arange``, checks of
    outputs' devices), which now follow the weights to the device asked for."""
    _exported_and_loaded_elsewhere(tmp_path, "torch", exported_on, loaded_on)


@two_gpus
def test_a_triton_artifact_exported_on_one_gpu_runs_on_another(tmp_path):
    _exported_and_loaded_elsewhere(tmp_path, "triton", "cuda:0", "cuda:1")
