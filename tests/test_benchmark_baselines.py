"""The vLLM-style baseline of the layer benchmark (``benchmarks/vllm_style.py``) computes what the HF block does,
so that its times compare like with like (Triton's interpreter on CPU, fp32)."""

import os
import sys

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import moe_layer  # noqa: E402
from vllm_style import VllmStyleMoE  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 5e-3 if DEVICE == "cuda" else 1e-4  # tl.dot takes fp32 operands as tf32 on the GPU


@pytest.mark.parametrize("shape", ["mixtral_tiny", "qwen3_moe_tiny"])
@pytest.mark.parametrize("tokens", [1, 37])
def test_vllm_style_matches_the_hf_block(shape, tokens, monkeypatch):
    family, cfg_cls, kwargs, cls = moe_layer.SHAPES[shape.replace("_tiny", "_cpu")]
    small = {k: (v // 16 if k in ("hidden_size", "intermediate_size", "moe_intermediate_size") else v)
             for k, v in kwargs.items()}
    monkeypatch.setitem(moe_layer.SHAPES, shape, (family, cfg_cls, small, cls))
    block, cfg = moe_layer.make_block(shape, DEVICE, torch.float32)
    x = torch.randn(1, tokens, cfg.hidden_size, device=DEVICE)
    vllm = VllmStyleMoE(block)
    with torch.no_grad():
        want = block(x)
        runs = [vllm.run] + ([vllm.replayed] if DEVICE == "cuda" else [])
        for run in runs:
            got = run(x)
            assert got.shape == want.shape
            assert ((got - want).norm() / want.norm()).item() < TOLERANCE
