"""NLLB-MoE (an encoder-decoder with top-2 routing and expert capacity): its blocks were not found (its expert
ModuleDict also holds the token dropout) and its capture failed on the router casting its classifier inside forward.
Its experts in transformers 5.x one-hot an already one-hot mask, so that no canonical form computes them: the blocks
run as written, each with its reason, and the router's capacity, which it writes on every call, compiles nothing
again on the torch backend."""

import pytest
import torch

import moecc

transformers = pytest.importorskip("transformers")


def tiny_nllb_moe():
    from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

    torch.manual_seed(0)
    config = NllbMoeConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_experts=4,
                           expert_capacity=8, encoder_sparse_step=1, decoder_sparse_step=1,
                           max_position_embeddings=64, router_dtype="float32")
    return NllbMoeForConditionalGeneration(config).eval()


def test_nllb_moe_blocks_are_found_and_run_as_written_without_compiling_again_per_length():
    model = tiny_nllb_moe()
    cm = moecc.compile(model, backend="torch")
    with torch.no_grad():
        for seed, (batch, src, tgt) in enumerate(((2, 10, 7), (3, 12, 5), (2, 6, 9))):
            g = torch.Generator().manual_seed(seed)
            kwargs = dict(input_ids=torch.randint(3, 128, (batch, src), generator=g),
                          decoder_input_ids=torch.randint(3, 128, (batch, tgt), generator=g))
            torch.testing.assert_close(cm(**kwargs).logits, model(**kwargs).logits, rtol=1e-5, atol=1e-6)
    assert cm.captures == 1
    layers = {layer.name: layer for layer in cm.moe_layers}
    assert sorted(layers) == [f"model.{part}.layers.{i}.ffn" for part in ("decoder", "encoder") for i in (0, 1)]
    assert all(not layer.fused and layer.reason for layer in layers.values())
    # the encoder's blocks were probed through: the routing read off the forward got past the classifier's cast
    assert "Couldn't swap" not in layers["model.encoder.layers.0.ffn"].reason
