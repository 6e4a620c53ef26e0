import json
import os
import subprocess
import sys

import pytest
import torch
from hf_models import make_inputs

from moecc.codegen.onnx.lower import ROUTED_QUANTIZED

HERE = os.path.dirname(__file__)


def moecc_cli(*args, cwd):
    # the tests' helpers beside moecc (a source tree on PYTHONPATH, as on the GPU machine, or an install)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "moecc.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env)


def test_cli_export_inspect_run(tmp_path):
    run = moecc_cli("export", "cli_factory:tiny_mixtral", "-o", str(tmp_path / "art"), cwd=HERE)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "art" / "manifest.json").exists()

    run = moecc_cli("inspect", str(tmp_path / "art"), "--html", str(tmp_path / "page.html"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "model.layers.0.mlp" in run.stdout and "recognize" in run.stdout
    page = (tmp_path / "page.html").read_text()
    assert "<svg" in page and "#f4a340" in page and "expert 0" in page

    torch.save(make_inputs("mixtral", 1, 6, seed=5), tmp_path / "in.pt")
    run = moecc_cli("run", str(tmp_path / "art"), "--input", str(tmp_path / "in.pt"), "--output",
                    str(tmp_path / "out.pt"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "logits: (1, 6, 97)" in run.stdout
    assert torch.load(tmp_path / "out.pt")["logits"].shape == (1, 6, 97)


def _folder_exported_and_run(tmp_path, *export_options):
    """A tiny Qwen3-MoE saved as a model folder, exported from it with ``export_options``, and run by ``moecc run``
    on ids saved on the CPU: (the model, those inputs, the artifact's manifest, the logits it saved)."""
    from hf_models import make_model

    model = make_model("qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    run = moecc_cli("export", str(tmp_path / "model"), "-o", str(tmp_path / "art"), *export_options, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    inputs = make_inputs("qwen3_moe", 2, 9, seed=3)
    torch.save(inputs, tmp_path / "in.pt")
    run = moecc_cli("run", str(tmp_path / "art"), "--input", str(tmp_path / "in.pt"), "--output",
                    str(tmp_path / "out.pt"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    return model.eval(), inputs, manifest, torch.load(tmp_path / "out.pt")["logits"]


def test_cli_exports_a_hugging_face_model_folder_with_random_token_ids_as_its_example(tmp_path):
    model, inputs, manifest, got = _folder_exported_and_run(tmp_path, "--batch", "3", "--seq-len", "5")
    assert [la["fused"] for la in manifest["moe_layers"]] == [True] * model.config.num_hidden_layers
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    (tmp_path / "empty").mkdir()
    run = moecc_cli("export", str(tmp_path / "empty"), "-o", str(tmp_path / "art2"), cwd=tmp_path)
    assert run.returncode != 0 and "folder without config.json" in run.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_exports_a_model_folder_for_triton_on_the_gpu_and_runs_inputs_saved_on_the_cpu(tmp_path):
    model, inputs, manifest, got = _folder_exported_and_run(tmp_path, "--device", "cuda", "--dtype", "bfloat16",
                                                            "--backend", "triton")
    assert manifest["device"] == "cuda" and got.device.type == "cpu"
    model = model.to("cuda", torch.bfloat16)
    with torch.no_grad():
        expected = model(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}).logits
    assert ((got.float() - expected.float().cpu()).norm() / expected.float().norm()).item() < 2e-2


def test_cli_inspect_dump_folder_and_errors(tmp_path):
    from user_modules import LoopMoE, TinyModel

    import moecc

    torch.manual_seed(0)
    cm = moecc.compile(TinyModel(LoopMoE()).eval(), backend="torch", dump_dir=tmp_path / "dumps")
    cm(torch.randint(0, 50, (2, 8)))
    run = moecc_cli("inspect", str(tmp_path / "dumps"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "fuse_experts" in run.stdout
    run = moecc_cli("inspect", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert run.returncode == 2 and "neither a moecc artifact" in run.stderr
    run = moecc_cli("run", str(tmp_path / "nowhere"), "--input", "x.pt", cwd=tmp_path)
    assert run.returncode == 2 and "no moecc artifact" in run.stderr


def test_cli_quantized_export_says_how_each_layer_is_quantized(tmp_path):
    # the tiny Mixtral's down projection reads 48 features: blocks of 32 do not tile them. MatMulNBits pads the last
    # block (int4 takes the sorted form first); int8 with float activations tries com.microsoft.QMoE first, which
    # cannot, and says so
    for bits, why in (("int4", ""), ("int8", ": block size 32 does not divide the expert input size 48")):
        art = tmp_path / f"art_{bits}"
        run = moecc_cli("export", "cli_factory:tiny_mixtral", "-o", str(art), "--quantize", bits, "--block-size",
                        "32", cwd=HERE)
        assert run.returncode == 0, run.stderr
        layers = json.loads((art / "manifest.json").read_text())["moe_layers"]
        assert [(la["lowering"], la["quantization"]) for la in layers] == [(ROUTED_QUANTIZED + why,
                                                                            f"{bits} block 32")] * 2
        run = moecc_cli("inspect", str(art), cwd=tmp_path)
        assert run.returncode == 0 and f"[{bits} block 32]" in run.stdout, run.stderr


def test_cli_inspect_a_blockwise_dump_folder_shows_each_block(tmp_path):
    from user_modules import LoopMoE, ValueBranchModel

    import moecc

    torch.manual_seed(0)
    cm = moecc.compile(ValueBranchModel(LoopMoE).eval(), backend="torch", dump_dir=tmp_path / "dumps")
    cm(torch.randint(0, 50, (2, 8)))
    run = moecc_cli("inspect", str(tmp_path / "dumps"), "--html", str(tmp_path / "page.html"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("fuse_experts") == 2 and "block_blocks.1" in run.stdout, run.stdout
    assert (tmp_path / "page.block_blocks.0.html").exists() and (tmp_path / "page.block_blocks.1.html").exists()
