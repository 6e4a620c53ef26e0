"""Tiny random-weight Hugging Face MoE models built from configs (nothing is downloaded)."""

from __future__ import annotations

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "afmoe", "cohere2_moe", "dbrx",
            "ernie4_5_moe", "llama4_text", "switch_transformers")
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
EAGER_EXPERTS_ONLY = ("dbrx", "llama4_text", "switch_transformers")  # no experts_implementation to switch

# families that some transformers 5.x releases lack (5.17 has neither), by the class that shows they are there
NEWER_FAMILIES = {"kolibri1": "Kolibri1Config", "deepseek_v4": "DeepseekV4Config", "gemma4": "Gemma4TextConfig",
                  "inkling": "InklingTextConfig", "ergo": "ErgoConfig", "muse_spark": "MuseSparkTextConfig"}

_COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64)


def make_config(family: str):
    import transformers as tf

    if family in NEWER_FAMILIES and not hasattr(tf, NEWER_FAMILIES[family]):
        import pytest

        pytest.skip(f"transformers {tf.__version__} has no {family}")

    if family == "mixtral":
        return tf.MixtralConfig(**_COMMON, intermediate_size=48, num_local_experts=5, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=24, num_experts=6,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=40, norm_topk_prob=False,
                                 decoder_sparse_step=1, mlp_only_layers=[])
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                 num_experts_per_tok=3, norm_topk_prob=True, head_dim=8)
    if family == "olmoe":
        return tf.OlmoeConfig(**_COMMON, intermediate_size=24, num_experts=7, num_experts_per_tok=2)
    if family == "deepseek_v3":
        common = dict(_COMMON, num_key_value_heads=4)
        return tf.DeepseekV3Config(**common, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
                                   num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
                                   routed_scaling_factor=2.5, first_k_dense_replace=1, kv_lora_rank=16,
                                   q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                   norm_topk_prob=True)
    if family == "deepseek_v2":  # DeepSeek-V2's group_limited_greedy: each group scored by its best expert
        common = dict(_COMMON, num_key_value_heads=4)
        return tf.DeepseekV2Config(**common, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
                                   num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4,
                                   topk_group=2, n_shared_experts=1, routed_scaling_factor=16.0,
                                   first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                   qk_nope_head_dim=8, v_head_dim=8)
    if family == "gpt_oss":
        return tf.GptOssConfig(**_COMMON, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                               head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    if family == "afmoe":
        return tf.AfmoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                              num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=1, head_dim=8,
                              route_scale=2.5, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    if family == "cohere2_moe":  # its shared expert and routed experts are averaged, not summed
        return tf.Cohere2MoeConfig(**_COMMON, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                                   num_shared_experts=1, shared_expert_combination_strategy="average", head_dim=8)
    if family == "ernie4_5_moe":  # its selection bias sits in a child of the router module, shaped [1, E]
        return tf.Ernie4_5_MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=16, moe_num_experts=6,
                                     moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1,
                                     moe_layer_end_index=1)
    if family == "dbrx":  # experts stored flat, [E * F, H]; a router module that returns logits only
        return tf.DbrxConfig(vocab_size=97, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                             attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                             ffn_config=dict(ffn_hidden_size=24, moe_num_experts=5, moe_top_k=2))
    if family == "llama4_text":  # routing weights scale the experts' inputs; the block returns [T, H]
        return tf.Llama4TextConfig(**_COMMON, head_dim=8, intermediate_size=24, intermediate_size_mlp=48,
                                   num_local_experts=5, num_experts_per_tok=1, interleave_moe_layer_step=1)
    if family == "jetmoe":  # up and down projections in two sub-modules, an output bias once per block
        return tf.JetMoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
                               kv_channels=8, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                               max_position_embeddings=64)
    if family == "kolibri1":  # top-k of the logits plus a selection bias, then sigmoid of the chosen ones
        return tf.Kolibri1Config(**_COMMON, head_dim=8, moe_intermediate_size=24, num_experts=6,
                                 num_experts_per_tok=2, norm_topk_prob=True, shared_expert_intermediate_size=40)
    if family == "deepseek_v4":  # a hash-routed layer (experts from the token ids), then sqrt-softplus scores
        return tf.DeepseekV4Config(**_COMMON, head_dim=8, moe_intermediate_size=24, q_lora_rank=24,
                                   n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
                                   routed_scaling_factor=1.5, mlp_layer_types=["hash_moe", "moe"],
                                   layer_types=["heavily_compressed_attention"] * 2, o_lora_rank=16,
                                   index_n_heads=2, index_head_dim=8, index_topk=8)
    if family == "longcat_flash":  # identity experts past the bank: gate_up_proj holds them, down_proj does not
        return tf.LongcatFlashConfig(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4,
                                     max_position_embeddings=64, ffn_hidden_size=48, q_lora_rank=24, kv_lora_rank=16,
                                     qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=8, moe_topk=3,
                                     n_routed_experts=6, zero_expert_num=3, expert_ffn_hidden_size=24,
                                     routed_scaling_factor=2.0)
    if family == "gemma4":  # router and experts called by the decoder layer, beside attention and a dense MLP
        return tf.Gemma4TextConfig(**_COMMON, head_dim=8, global_head_dim=8, intermediate_size=48,
                                   moe_intermediate_size=16, num_experts=6, top_k_experts=2, enable_moe_block=True,
                                   sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                   hidden_size_per_layer_input=0)
    if family == "inkling":  # the router scores the shared expert too, and renormalises it with the routed ones
        return tf.InklingTextConfig(**_COMMON, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                                    swa_head_dim=8, sliding_window_size=16, rel_extent=32, d_rel=4,
                                    intermediate_size=48, moe_intermediate_size=24, n_routed_experts=6,
                                    num_experts_per_tok=2, n_shared_experts=1,
                                    layer_types=["sliding_attention", "full_attention"])
    if family == "ergo":  # each route's expert output RMS-normalized with a weight per expert, before weighting
        return tf.ErgoConfig(**_COMMON, first_dense_intermediate_size=48, num_dense_blocks=1, moe_intermediate_size=24,
                             shared_intermediate_size=24, num_experts=6, num_experts_per_tok=2, sliding_window=16)
    if family == "muse_spark":  # experts in a width of their own, projected in and out; a post-expert norm
        return tf.MuseSparkTextConfig(**_COMMON, intermediate_size=48, head_dim=8, moe_intermediate_size=16,
                                      num_local_experts=6, num_experts_per_tok=2, moe_hidden_size=24,
                                      sliding_window=16, bos_token_id=None, eos_token_id=None)
    if family == "switch_transformers":
        return tf.SwitchTransformersConfig(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                           num_decoder_layers=2, num_heads=4, num_experts=4, expert_capacity=6,
                                           encoder_sparse_step=1, decoder_sparse_step=1)
    raise ValueError(f"unknown family {family!r}")


def make_model(family: str, experts_implementation: str = "eager", seed: int = 0, **config):
    """``config``: attributes of the family's config to set (``hidden_act="gelu"``)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = make_config(family)
    for name, value in config.items():
        setattr(cfg, name, value)
    cls = getattr(tf, {
        "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
        "olmoe": "OlmoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
        "deepseek_v2": "DeepseekV2ForCausalLM", "gpt_oss": "GptOssForCausalLM",
        "afmoe": "AfmoeForCausalLM", "cohere2_moe": "Cohere2MoeForCausalLM", "dbrx": "DbrxForCausalLM",
        "ernie4_5_moe": "Ernie4_5_MoeForCausalLM", "llama4_text": "Llama4ForCausalLM",
        "switch_transformers": "SwitchTransformersForConditionalGeneration", "kolibri1": "Kolibri1ForCausalLM",
        "deepseek_v4": "DeepseekV4ForCausalLM", "jetmoe": "JetMoeForCausalLM",
        "longcat_flash": "LongcatFlashForCausalLM", "gemma4": "Gemma4ForCausalLM", "inkling": "InklingForCausalLM",
        "ergo": "ErgoForCausalLM", "muse_spark": "MuseSparkTextModel",
    }[family])
    model = cls(cfg)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            # A zero selection bias would hide one that is ignored, and some families start their routers at zero
            # (every score ties, so that any routing function fits): make both matter, as in a trained model.
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                p.copy_(torch.randn_like(p) * 0.1)
            elif name.endswith("gate.weight") and not p.any():
                p.normal_(0.0, 0.3)  # a router that starts at zero (AFMoE's, ERNIE's)
            elif name.endswith("per_expert_scale"):  # Gemma 4's, ones at init: a trained model's differ
                p.uniform_(0.5, 1.5)
            elif name.endswith("tid2eid"):  # DeepSeek-V4's token id -> experts table
                p.copy_(torch.stack([torch.randperm(cfg.n_routed_experts)[:p.shape[1]] for _ in range(p.shape[0])]))
    if experts_implementation != "eager":
        model.set_experts_implementation(experts_implementation)
    return model.eval()


def make_inputs(family: str, batch: int, seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (batch, seq), generator=g)
    if family == "switch_transformers":
        dec = torch.randint(0, 97, (batch, max(1, seq // 2)), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": dec,
                "use_cache": False}
    return {"input_ids": ids, "use_cache": False}


def switch_drops_past_capacity(model) -> bool:
    """Whether this transformers' Switch block drops the tokens past an expert's capacity: 5.17 counts each
    token's priority over a dimension of size one, so its capacity never binds (later versions count per sequence)."""
    block = model.encoder.block[0].layer[1].mlp
    same = torch.randn(1, 1, model.config.d_model).expand(1, 16, -1).contiguous()  # 16 tokens, one expert
    with torch.no_grad():
        out = block(same)
    return bool((out[0, model.config.expert_capacity:] == 0).all())
