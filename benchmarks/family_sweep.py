"""Recognition coverage: Hugging Face MoE families that no test names, built tiny from their configs.

    python benchmarks/family_sweep.py [--backend onnxruntime] [--families dbrx jamba ...]
    python benchmarks/family_sweep.py --compare-dtype bfloat16   # recognition in fp32 against bf16
    python benchmarks/family_sweep.py --backend triton --device cuda --dtype bfloat16 --with-tested
    python benchmarks/family_sweep.py --backend torch --with-tested --hidden 256   # recognition at larger sizes

``--with-tested`` adds the families the tests build (``tests/hf_models.py``: Mixtral, Qwen3-MoE, GPT-OSS, ...).

Each family gets a two-layer model with random weights (nothing is downloaded): routers and selection biases that
a family initializes to zero are drawn at random instead, as in a trained model (a zero router ties every score,
and any routing function then fits). It is compiled with moecc (the check against eager on fresh inputs on) and
compared with eager on three more shapes. Prints, per family, the MoE blocks found and fused, the largest relative
error, the routing recognized, and why a block was left as written or why the compile failed. Families with
linear attention or Mamba layers run their reference PyTorch kernels and take minutes each on a CPU."""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils import _pytree as pytree

FAMILIES = {
    "dbrx": ("DbrxConfig", "DbrxForCausalLM"),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM"),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM"),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM"),
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM"),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM"),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM"),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM"),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM"),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM"),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM"),
    "dots1": ("Dots1Config", "Dots1ForCausalLM"),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM"),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM"),
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM"),
    "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM"),
    "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM"),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM"),
    "jamba": ("JambaConfig", "JambaForCausalLM"),
    "axk1": ("AXK1Config", "AXK1ForCausalLM"),
    "axk2": ("AXK2Config", "AXK2ForCausalLM"),
    "bailing_hybrid": ("BailingHybridConfig", "BailingHybridForCausalLM"),
    "beam": ("BeamConfig", "BeamForCausalLM"),
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM"),
    "doge": ("DogeConfig", "DogeForCausalLM"),
    "dots3_note": ("Dots3NoteConfig", "Dots3NoteForCausalLM"),
    "flint": ("FlintConfig", "FlintForCausalLM"),
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM"),
    "granitemoe_swa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM"),
    "hy_v3": ("HYV3Config", "HYV3ForCausalLM"),
    "hy_v4": ("HYV4Config", "HYV4ForCausalLM"),
    "kimi_linear": ("KimiLinearConfig", "KimiLinearForCausalLM"),
    "kolibri1": ("Kolibri1Config", "Kolibri1ForCausalLM"),
    "laguna": ("LagunaConfig", "LagunaForCausalLM"),
    "lara_mini": ("LaraMiniConfig", "LaraMiniForCausalLM"),
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM"),
    "longcat_flash": ("LongcatFlashConfig", "LongcatFlashForCausalLM"),
    "mellum": ("MellumConfig", "MellumForCausalLM"),
    "mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM"),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM"),
    "qwen4_exp": ("Qwen4ExpConfig", "Qwen4ExpForCausalLM"),
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM"),
    "zaya": ("ZayaConfig", "ZayaForCausalLM"),
    "aria": ("AriaTextConfig", "AriaTextForCausalLM"),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM"),
    "inkling": ("InklingTextConfig", "InklingForCausalLM"),
    "inkling2": ("Inkling2TextConfig", "Inkling2ForCausalLM"),
    "inkling2_loop": ("Inkling2LoopTextConfig", "Inkling2LoopForCausalLM"),
    "mistral4": ("Mistral4Config", "Mistral4ForCausalLM"),
    "minimax_m3_vl": ("MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM"),
    "ergo": ("ErgoConfig", "ErgoForCausalLM"),
    "kolibri1_1": ("Kolibri1_1Config", "Kolibri1_1ForCausalLM"),
    "minicpm5_moe": ("MiniCPM5MoeConfig", "MiniCPM5MoeForCausalLM"),
    # configs of their own over another family's modeling code (the causal LM transformers' auto classes map them to)
    "sarvam_moe": ("SarvamMoEConfig", "Glm4MoeForCausalLM"),
    "param2moe": ("Param2MoeConfig", "Glm4MoeForCausalLM"),
    "sarvam_mla": ("SarvamMLAConfig", "DeepseekV3ForCausalLM"),
    # the text models of multimodal families (no causal LM of their own)
    "glm5_next": ("Glm5NextTextConfig", "Glm5NextTextModel"),
    "mistral_large4": ("MistralLarge4TextConfig", "MistralLarge4TextModel"),
    "muse_spark": ("MuseSparkTextConfig", "MuseSparkTextModel"),
    "step3p7": ("Step3p7TextConfig", "Step3p7TextModel"),
    "qwen3_vl_moe": ("Qwen3VLMoeTextConfig", "Qwen3VLMoeTextModel"),
    "qwen3_omni_moe": ("Qwen3OmniMoeTextConfig", "Qwen3OmniMoeThinkerTextModel"),
    "glm4v_moe": ("Glm4vMoeTextConfig", "Glm4vMoeTextModel"),
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeTextConfig", "Ernie4_5_VLMoeTextModel"),
    "hy_v4_vl": ("HYV4VLTextConfig", "HYV4VLTextModel"),
    "deepseek_ocr2": ("DeepseekOcr2TextConfig", "DeepseekOcr2TextModel"),
    "unlimited_ocr": ("UnlimitedOcrTextConfig", "UnlimitedOcrTextModel"),
    "diffusion_gemma": ("DiffusionGemmaTextConfig", "DiffusionGemmaEncoderTextModel"),
    # an encoder (token classification) of GPT-OSS's experts
    "openai_privacy_filter": ("OpenAIPrivacyFilterConfig", "OpenAIPrivacyFilterModel"),
}
# tiny sizes under every name the families use (a config takes those it has)
TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=48, moe_intermediate_size=24, num_experts=6, num_local_experts=6,
            n_routed_experts=6, num_experts_per_tok=2, moe_topk=2, max_position_embeddings=64,
            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, n_group=2, topk_group=1, moe_layer_freq=1, decoder_sparse_step=1, mlp_only_layers=[],
            moe_num_experts=6, moe_k=2, moe_num_shared_experts=1, n_shared_experts=1, kv_channels=8,
            num_shared_experts=1, shared_intermediate_size=40, moe_intermediate_size_shared=40, num_dense_layers=1,
            linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
            expert_ffn_hidden_size=24, mamba_d_state=8, mamba_expand=2, mamba_n_heads=4, mamba_d_head=16,
            index_head_dim=8, index_n_heads=2, index_topk=8, pad_token_id=0, num_layers=2, zero_expert_num=2,
            enable_moe_block=True, top_k_experts=2, sliding_window=16, is_moe=True)
CONSTRUCTOR = {"DbrxConfig": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                                  ffn_config=dict(ffn_hidden_size=48, moe_num_experts=6, moe_top_k=2),
                                  d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=97),
               "JambaConfig": dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=0,
                                   expert_layer_period=1),
               # its layer kinds default to none at all: one short-convolution layer, one attention layer
               "Lfm2MoeConfig": dict(layer_types=["conv", "full_attention"], num_hidden_layers=2)}
SHAPES = ((3, 5), (1, 13), (2, 16))
# rotary sections (time, height, width) of multimodal text models, as their modeling code defaults them: scaled to
# the tiny head (``_mrope_section``)
MROPE_SECTION = {"Glm4vMoeTextConfig": (8, 12, 12), "Ernie4_5_VLMoeTextConfig": (22, 22, 20)}


def _mrope_section(default: tuple[int, ...], half: int) -> list[int]:
    """``default`` scaled to sum to ``half``: each section but the last rounded down (equal ones stay equal, as
    Ernie's height and width must), the last taking the rest."""
    head = [d * half // sum(default) for d in default[:-1]]
    return [*head, half - sum(head)]


def _tested_families() -> tuple[str, ...]:
    import sys

    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import hf_models

    return tuple(f for f in hf_models.FAMILIES if f not in FAMILIES)


# ``--hidden``: sizes a family's config takes over the tiny ones, where it has them
SIZES: dict = {}


def sizes(hidden: int) -> dict:
    """Hidden size ``hidden``, four heads, routed experts of width ``hidden / 2`` (a square gate-and-up weight,
    ``2I == H``, as Llama 4 and others have at full size), dense MLPs and shared experts wider."""
    return dict(hidden_size=hidden, d_model=hidden, head_dim=hidden // 4, kv_channels=hidden // 4,
                intermediate_size=3 * hidden // 2, moe_intermediate_size=hidden // 2,
                expert_ffn_hidden_size=hidden // 2, shared_intermediate_size=hidden,
                moe_intermediate_size_shared=hidden, first_dense_intermediate_size=3 * hidden // 2,
                shared_expert_intermediate_size=hidden, intermediate_size_mlp=3 * hidden // 2)


def _sized(cfg) -> dict:
    """``SIZES`` that ``cfg`` has; latent attention (DeepSeek's MLA) keeps its head dims, which its rotary sizes
    follow."""
    mla = _read(cfg, "kv_lora_rank") is not None
    return {k: v for k, v in SIZES.items() if hasattr(cfg, k) and not (mla and k == "head_dim")}


def tiny_model(family: str):
    import transformers as tf

    if family not in FAMILIES:
        _tested_families()
        import hf_models

        cfg = hf_models.make_config(family)
        return hf_models.make_model(family, **_sized(cfg)).eval()

    config_name, model_name = FAMILIES[family]
    outer = getattr(tf, config_name)(**CONSTRUCTOR.get(config_name, {}))
    # a composite config (a text model inside a multimodal family's) is made tiny where its text model reads it
    cfg = getattr(outer, "text_config", None) or outer
    for key, value in {**TINY, **_sized(cfg)}.items():
        try:  # a config may refuse even to read a key (a per-layer attribute read globally)
            if hasattr(cfg, key) and key not in CONSTRUCTOR.get(config_name, {}):
                setattr(cfg, key, value)
        except Exception:  # noqa: BLE001, S110 - a key this family validates otherwise keeps its default
            pass
    if _read(cfg, "kv_lora_rank"):  # latent attention (DeepSeek's MLA) has one key/value head per head
        cfg.num_key_value_heads = cfg.num_attention_heads
        if hasattr(cfg, "qk_head_dim"):
            cfg.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
            if (_read(cfg, "rope_parameters") or {}).get("partial_rotary_factor"):
                cfg.head_dim = cfg.qk_head_dim  # Mistral 4 rotates a fraction of its whole head
    if _read(cfg, "layer_types") and config_name != "JambaConfig":
        cfg.layer_types = (list(cfg.layer_types) * 2)[:2]
    if _read(cfg, "mlp_layer_types"):  # one layer of each of the first two kinds the family's list names
        kinds = list(dict.fromkeys(cfg.mlp_layer_types))  # DeepSeek-V3.2's dense then sparse, V4's hash then top-k
        cfg.mlp_layer_types = (kinds * 2)[:2]
    if hasattr(cfg, "mlp_layer_types") and _read(cfg, "mlp_layer_types") is None:  # DeepSeek-OCR 2's, no default
        cfg.mlp_layer_types = ["dense", "sparse"]
    if type(cfg).__name__ in MROPE_SECTION:
        rope = dict(cfg.rope_parameters)
        head = _read(cfg, "head_dim") or cfg.hidden_size // cfg.num_attention_heads
        half = int(head * rope.get("partial_rotary_factor", 1.0)) // 2
        cfg.rope_parameters = {**rope, "mrope_section": _mrope_section(MROPE_SECTION[type(cfg).__name__], half)}
    if hasattr(cfg, "per_layer_config"):  # layer overrides at full size
        cfg.per_layer_config = {}
    torch.manual_seed(0)
    try:
        model = getattr(tf, model_name)(outer).eval()
    except AttributeError:  # a causal LM of the text model alone
        model = getattr(tf, model_name)(cfg).eval()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point() or t.numel() == 0 or t.abs().max() != 0:
                continue
            if name.endswith(("expert_bias", "e_score_correction_bias")):
                t.copy_(torch.randn_like(t) * 0.1)
            elif t.dim() == 2 and any(s in name for s in ("gate", "router")):
                t.normal_(0.0, 0.3)
        for name, t in model.named_parameters():
            if name.endswith("per_expert_scale"):  # Gemma 4's, ones at init: a trained model's differ
                t.uniform_(0.5, 1.5)
    return model


def _read(cfg, key: str):
    """A config value, or None where the config refuses to read it globally (a per-layer attribute)."""
    try:
        return getattr(cfg, key, None)
    except Exception:  # noqa: BLE001 - transformers' per-layer attributes raise their own errors
        return None


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(family: str, shape: tuple[int, int], g: torch.Generator, device: str) -> dict:
    if family in FAMILIES:
        return {"input_ids": torch.randint(0, 97, shape, generator=g).to(device), "use_cache": False}
    import hf_models

    kwargs = hf_models.make_inputs(family, *shape, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def sweep(family: str, backend: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    import moecc

    start = time.time()
    try:
        model = tiny_model(family).to(device, dtype)
    except Exception as exc:  # noqa: BLE001 - a config these tiny sizes do not fit
        return f"{family:<18} config not built: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    g = torch.Generator().manual_seed(0)
    try:
        cm = moecc.compile(model, backend=backend)
        worst = 0.0
        with torch.no_grad():
            cm(**_inputs(family, (2, 8), g, device))
            for shape in SHAPES:
                kwargs = _inputs(family, shape, g, device)
                ref = [t for t in pytree.tree_leaves(model(**kwargs))
                       if isinstance(t, torch.Tensor) and t.is_floating_point()]
                got = [t for t in pytree.tree_leaves(cm(**kwargs))
                       if isinstance(t, torch.Tensor) and t.is_floating_point()]
                worst = max([worst] + [_rel(x, y) for x, y in zip(got, ref)])
    except Exception as exc:  # noqa: BLE001 - reported, the sweep goes on
        return f"{family:<18} compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    layers = cm.moe_layers
    routing = "; ".join(sorted({f"{info.routing}, shared {info.shared_experts}" for info in layers if info.fused}))
    reasons = "; ".join(sorted({info.reason[:120] for info in layers if not info.fused}))
    backends = ",".join(sorted({e.backend for e in cm._entries}))
    # how the fused blocks were lowered, up to the first detail: "com.microsoft.MoE given moecc's routing", ...
    lowered = "; ".join(sorted({info.lowering.split(" (")[0].split(":")[0] for info in layers
                                if info.fused and info.lowering}))
    return (f"{family:<18} {len(layers)} blocks, {sum(info.fused for info in layers)} fused, max rel. err "
            f"{worst:.1e}, {cm.captures} captures ({backends}), {time.time() - start:.0f} s | {routing}"
            + (f" | lowered: {lowered}" if lowered else "") + (f" | left as written: {reasons}" if reasons else ""))


def compare_dtypes(family: str, dtype: torch.dtype) -> str:
    """Each MoE block recognized in fp32 and in ``dtype``: a low-precision bound that admits a neighbour of the
    right function shows up as two descriptions (equal forms aside: top-k then softmax is softmax then top-k
    renormalised)."""
    import copy

    from moecc.discover import find_moe_blocks
    from moecc.passes.recognize.block import analyze_block

    try:
        model = tiny_model(family)
    except Exception as exc:  # noqa: BLE001 - a config these tiny sizes do not fit
        return f"{family:<18} config not built: {type(exc).__name__}"
    hidden = getattr(model.config, "hidden_size", None) or model.config.d_model
    lines = []
    for name, block in find_moe_blocks(model)[:1]:
        found = []
        for dt in (torch.float32, dtype):
            r = analyze_block(copy.deepcopy(block).to(dt), torch.empty(1, 2, hidden, dtype=dt))
            found.append(f"{r.value.routing.describe()} | {r.value.expert.describe()}" if r else
                         f"left as written: {r.reason[:100]}")
        lines.append(f"{'same' if found[0] == found[1] else 'DIFF'} {family:<18} {name}: fp32 {found[0]} || "
                     f"{str(dtype).removeprefix('torch.')} {found[1]}")
    return "\n".join(lines) or f"{family:<18} no MoE block"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--with-tested", action="store_true", help="also the families tests/hf_models.py builds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--hidden", type=int, help="models of this hidden size (``sizes``) instead of the tiny ones")
    ap.add_argument("--compare-dtype", choices=["bfloat16", "float16"],
                    help="instead of compiling, recognize each family's first MoE block in fp32 and in this dtype")
    args = ap.parse_args()
    os.environ.setdefault("MOECC_LOGS", "error")
    if args.hidden:
        SIZES.update(sizes(args.hidden))
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, backend {args.backend}, "
          f"{args.device}, {args.dtype}")
    families = [*(_tested_families() if args.with_tested else ()), *args.families]
    for family in families:
        if args.compare_dtype:
            print(compare_dtypes(family, getattr(torch, args.compare_dtype)), flush=True)
        else:
            print(sweep(family, args.backend, args.device, getattr(torch, args.dtype)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
