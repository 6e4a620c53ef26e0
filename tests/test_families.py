import pytest
import torch
from hf_models import (
    EAGER_EXPERTS_ONLY,
    EXPERTS_IMPLEMENTATIONS,
    FAMILIES,
    make_inputs,
    make_model,
    switch_drops_past_capacity,
)
from torch.utils import _pytree as pytree

import moecc

CASES = [(f, impl) for f in FAMILIES for impl in EXPERTS_IMPLEMENTATIONS
         if f not in EAGER_EXPERTS_ONLY or impl == "eager"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("family,impl", CASES)
def test_family_compiles_fused_and_matches_eager_on_fresh_shapes(family, impl):
    model = make_model(family, impl)
    cm = moecc.compile(model)
    cm(**make_inputs(family, 2, 8))
    layers = cm.moe_layers
    assert layers, "no MoE block found"
    assert all(layer.fused for layer in layers), [(layer.name, layer.reason) for layer in layers]
    for batch, seq, seed in ((3, 5, 1), (1, 13, 2)):
        kwargs = make_inputs(family, batch, seq, seed)
        ref = pytree.tree_leaves(model(**kwargs))
        got = pytree.tree_leaves(cm(**kwargs))
        assert len(ref) == len(got)
        for r, g in zip(ref, got):
            if isinstance(r, torch.Tensor) and r.is_floating_point():
                assert rel(g, r) < 1e-5
    assert cm.captures <= 2


def test_layer_records_describe_the_block():
    model = make_model("deepseek_v3")
    cm = moecc.compile(model)
    cm(**make_inputs("deepseek_v3", 2, 8))
    (layer,) = cm.moe_layers
    assert layer.name == "model.layers.1.mlp"
    assert (layer.num_experts, layer.top_k, layer.hidden_size, layer.intermediate_size) == (8, 3, 32, 16)
    assert "sigmoid" in layer.routing and "groups 2/4" in layer.routing and "x2.5" in layer.routing
    assert layer.activation == "gated-silu" and layer.shared_experts == 1 and layer.reason == ""


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_deepseek_v2_group_limited_greedy_routing_is_fused(backend):
    """DeepSeek-V2 (and V2.5) keep the top groups by each group's best score, not by its best two summed as
    DeepSeek-V3 does, and have no selection bias: a routing of its own, which was left as the router's graph ops."""
    model = make_model("deepseek_v2")
    cm = moecc.compile(model, backend=backend)
    cm(**make_inputs("deepseek_v2", 2, 8))
    (layer,) = cm.moe_layers
    assert layer.fused and "softmax->top3" in layer.routing and "groups 2/4 by top-1" in layer.routing, layer
    assert "x16" in layer.routing
    _matches_eager_on_fresh_shapes("deepseek_v2", model, cm)


def _matches_eager_on_fresh_shapes(family, model, cm):
    for batch, seq, seed in ((3, 5, 1), (1, 13, 2)):
        kwargs = make_inputs(family, batch, seq, seed)
        ref = [t for t in pytree.tree_leaves(model(**kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        got = [t for t in pytree.tree_leaves(cm(**kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        assert len(ref) == len(got) and all(rel(g, r) < 1e-5 for g, r in zip(got, ref))


def test_deepseek_v4_hash_and_top_k_layers_are_fused():
    """Every MoE block is handed the token ids: the hash-routed one's router reads them (its experts come from a
    table of them) and is kept as its own graph ops, reading them in the graph; the top-k one does not read them,
    and its sqrt(softplus) scores are a canonical routing."""
    model = make_model("deepseek_v4")
    cm = moecc.compile(model)
    cm(**make_inputs("deepseek_v4", 2, 8))
    hashed, top_k = cm.moe_layers
    assert hashed.fused and "router kept as its own graph ops" in hashed.routing, (hashed.routing, hashed.reason)
    assert top_k.fused and top_k.routing == "sqrtsoftplus->top2 renorm selection-bias x1.5", top_k.routing
    _matches_eager_on_fresh_shapes("deepseek_v4", model, cm)


@pytest.mark.parametrize("family,norm", [("ergo", "ErgoExpertNorm per expert"),
                                         ("muse_spark", "MuseSparkTextInputScaledRMSNorm")])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_experts_with_a_post_expert_norm_are_fused(family, norm, backend):
    """Ergo's experts RMS-normalize each route's output with a weight per expert (an [E, H] weight, once taken for
    a router, which made the experts module a block of its own); Muse Spark's scale and normalize it, and read a
    projection of the block's input. Their experts fuse alone, the norm running on their unweighted pair rows."""
    model = make_model(family)
    cm = moecc.compile(model, backend=backend)
    cm(**make_inputs(family, 2, 8))
    layers = cm.moe_layers
    assert layers and all(layer.fused and layer.activation.endswith(f"then {norm} on each expert's output")
                          for layer in layers), [(layer.activation, layer.reason) for layer in layers]
    if family == "ergo":  # its router's ops (sigmoid, selection bias, renorm, scale) lift into moecc's route
        assert layers[0].routing.startswith("sigmoid->top2 renorm selection-bias x2.8"), layers[0].routing
        assert layers[0].routing.endswith("lifted from the model's own routing ops"), layers[0].routing
    _matches_eager_on_fresh_shapes(family, model, cm)


def test_selection_bias_on_the_logits_before_the_scores_of_the_chosen_ones():
    model = make_model("kolibri1")
    cm = moecc.compile(model)
    cm(**make_inputs("kolibri1", 2, 8))
    assert all(layer.fused and layer.routing == "top2->sigmoid renorm selection-bias" for layer in cm.moe_layers), \
        [(layer.routing, layer.reason) for layer in cm.moe_layers]
    _matches_eager_on_fresh_shapes("kolibri1", model, cm)


def test_experts_split_over_two_modules_with_one_output_bias():
    """JetMoE: ``input_linear`` and ``output_linear`` hold one [E, ., .] weight each, its router returns pairs
    sorted by expert (not the tokens' weights and ids), and the block adds one [H] bias to its output."""
    model = make_model("jetmoe")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.bias.normal_()  # zero at init: make it count
    cm = moecc.compile(model)
    cm(**make_inputs("jetmoe", 2, 8))
    assert len(cm.moe_layers) == 2
    assert all(layer.fused and layer.routing == "softmax->top2 renorm" for layer in cm.moe_layers), \
        [(layer.routing, layer.reason) for layer in cm.moe_layers]
    _matches_eager_on_fresh_shapes("jetmoe", model, cm)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_longcat_flash_identity_experts_are_fused(backend):
    """LongCat-Flash's router scores 6 experts and 3 identity (zero-compute) experts, which pass their input on
    scaled by their weight; its up projections hold all 9, its down projections the 6 that compute."""
    model = make_model("longcat_flash")
    cm = moecc.compile(model, backend=backend)
    cm(**make_inputs("longcat_flash", 2, 8))
    assert len(cm.moe_layers) == 2
    assert all(layer.fused and layer.num_experts == 6
               and layer.routing == "softmax->top3 selection-bias x2 +3 identity experts" for layer in cm.moe_layers), \
        [(layer.routing, layer.reason) for layer in cm.moe_layers]
    _matches_eager_on_fresh_shapes("longcat_flash", model, cm)


def test_switch_capacity_formula_recorded():
    """The capacity the block is recognized with is the one the installed transformers' Switch block applies."""
    model = make_model("switch_transformers")
    cm = moecc.compile(model)
    cm(**make_inputs("switch_transformers", 2, 8))
    want = "C = 6" if switch_drops_past_capacity(model) else "C = T"
    assert all(layer.capacity == want for layer in cm.moe_layers), [layer.capacity for layer in cm.moe_layers]


def test_top_k_equal_to_num_experts():
    """k == E: the router's logits and weights have the same shape and must not be confused."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.OlmoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=16, num_experts=4, num_experts_per_tok=4)
    model = tf.OlmoeForCausalLM(cfg).eval()
    cm = moecc.compile(model, backend="torch")
    cm(**make_inputs("olmoe", 2, 8))
    assert cm.moe_layers[0].fused and cm.moe_layers[0].top_k == 4
    fresh = make_inputs("olmoe", 3, 5, 1)
    assert rel(cm(**fresh).logits, model(**fresh).logits) < 1e-5


@pytest.mark.parametrize("hidden,inter", [(32, 16), (24, 24), (32, 24)])
def test_expert_biases_told_apart_when_shapes_agree(hidden, inter):
    """GPT-OSS experts with H = 2I have an up bias [E, 2I] and a down bias [E, H] of one shape: each assignment
    is tried (one was taken at random and the block left as written); with H = I the down weight is square."""
    import transformers as tf
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    torch.manual_seed(0)
    block = GptOssMLP(tf.GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=6,
                                      num_experts_per_tok=2)).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    cm = moecc.compile(block, backend="torch")
    cm(torch.randn(1, 4, hidden))
    assert cm.moe_layers[0].fused, cm.moe_layers[0].reason
    x = torch.randn(2, 9, hidden)
    assert rel(cm(x)[0], block(x)[0]) < 1e-5


def test_unknown_router_stays_as_graph_ops_and_experts_fuse():
    """PhiMoE's sparsemixer matches no routing pattern: it runs as written, the experts are still fused."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.PhimoeConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=64)
    model = tf.PhimoeForCausalLM(cfg).eval()
    for backend in ("torch", "onnxruntime"):
        cm = moecc.compile(model, backend=backend)
        cm(**make_inputs("mixtral", 2, 8))
        for layer in cm.moe_layers:
            assert layer.fused and "kept as its own graph ops" in layer.routing, layer
        fresh = make_inputs("mixtral", 3, 5, 1)
        assert rel(cm(**fresh).logits, model(**fresh).logits) < 1e-5


@pytest.mark.parametrize("family,bias_home", [("ernie4_5_moe", "a child of the router module, shaped [1, E]"),
                                              ("afmoe", "the block, passed to its router module")])
def test_selection_bias_found_where_the_family_keeps_it(family, bias_home):
    model = make_model(family)
    cm = moecc.compile(model, backend="reference")
    cm(**make_inputs(family, 2, 8))
    assert all("selection-bias" in layer.routing for layer in cm.moe_layers), (bias_home, cm.moe_layers)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "cohere2_moe", "deepseek_v3", "llama4_text", "mixtral"])
def test_bf16_recognition_finds_the_function_fp32_finds(family):
    """bf16 needs a loose bound (near-tied logits round apart), and a loose bound admits neighbours of the right
    function on a random router's nearly uniform scores: the renormalised top-2 of 7 softmax scores times 0.37
    lies within 16 % of the scores themselves, and a fitted 0.5 comes out as 0.499. Each block must be fitted
    to the same routing in bf16 as in fp32."""
    import copy

    from moecc.discover import find_moe_blocks
    from moecc.passes.recognize.block import analyze_block

    model = make_model(family)
    hidden = model.config.hidden_size
    for _, block in find_moe_blocks(model):
        found = []
        for dtype in (torch.float32, torch.bfloat16):
            result = analyze_block(copy.deepcopy(block).to(dtype), torch.empty(1, 2, hidden, dtype=dtype))
            assert result, result.reason
            found.append((result.value.routing.describe(), result.value.routing.weights_on_inputs))
        assert found[0] == found[1]


def test_experts_probed_through_the_module_that_takes_the_routing(monkeypatch):
    """DBRX keeps its expert weights in an MLP that is called with each expert's slices; the module above it takes
    (x, ids, weights), so its layout is found by probing that module, and routing is then searched alone (it tried
    4401 routing and layout pairs per block before, 4.7 s of the tiny model's compile)."""
    from moecc.passes.recognize import block as recognize_block

    calls = []
    verify = recognize_block._verify
    monkeypatch.setattr(recognize_block, "_verify", lambda *a, **k: calls.append(1) or verify(*a, **k))
    model = make_model("dbrx", "eager")
    cm = moecc.compile(model, backend="torch")
    cm(**make_inputs("dbrx", 2, 8))
    assert all(layer.fused for layer in cm.moe_layers)
    assert len(calls) < 200 * len(cm.moe_layers)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_flat_experts_routed_in_tokens_flattened_fuse_alone_under_a_routing_no_canonical_form_has(backend):
    """DBRX's routing renormalizes its top-k weights by their L``p`` norm, ``moe_normalize_expert_weights``: 1 in
    released models, which is canonical. Any other ``p`` is not, so the block stays as written; its experts still
    fuse alone, called as ``experts(x, ids, weights)``. Two things kept them apart: their expert count, read before
    off a router beside the flat ``[E*F, H]`` weights, and the bank holds none (now its ``num_experts``, proven on
    probes), and its routing, handed over flattened to ``[tokens, k]`` beside hidden states ``[B, S, H]``."""
    model = make_model("dbrx", "eager")
    for block in model.transformer.blocks:
        block.ffn.moe_normalize_expert_weights = 2.0
    cm = moecc.compile(model, backend=backend)
    cm(**make_inputs("dbrx", 2, 8))
    layers = cm.moe_layers
    assert [layer.name for layer in layers] == [f"transformer.blocks.{i}.ffn.experts" for i in range(2)]
    for i, layer in enumerate(layers):
        assert layer.fused and layer.block == f"transformer.blocks.{i}.ffn", (layer.name, layer.reason)
        assert layer.routing == "top2 ids and weights computed by the model's own ops, handed to the experts"
        assert (layer.num_experts, layer.top_k, layer.activation) == (5, 2, "gated-silu")
    _matches_eager_on_fresh_shapes("dbrx", model, cm)


@pytest.mark.parametrize("family,act,expected", [("mixtral", "gelu", {"gated-gelu"}),
                                                 ("mixtral", "silu", {"gated-silu"}),
                                                 ("qwen3_moe", "gelu_pytorch_tanh", {"gated-gelu_tanh", "gated-gelu"}),
                                                 ("deepseek_v3", "gelu", {"gated-gelu"})])
def test_the_experts_activation_is_told_apart_in_bf16(family, act, expected):
    """At initial weights (std 0.02) the pre-activations of a unit probe are a few hundredths, where silu and gelu
    differ by less than bf16's probe bound: bf16 GELU experts were fused as silu. The probes now spread the
    pre-activations (``probe.PROBE_PRE_ACTIVATION_STD``) and the best-fitting candidate is taken, in the stacked
    experts (probed through the module) and in the shared expert (an MLP module) alike. gelu and its tanh form
    differ by less than bf16's rounding: either is the function in bf16 (the first within it is taken)."""
    model = make_model(family, hidden_act=act).to(torch.bfloat16)
    cm = moecc.compile(model, backend="torch")
    cm(**make_inputs(family, 2, 8))
    assert cm.moe_layers and all(layer.fused and layer.activation in expected for layer in cm.moe_layers), \
        [(layer.activation, layer.reason) for layer in cm.moe_layers]


@pytest.mark.parametrize("family,block", [("gemma4", "model.layers.{}"), ("inkling", "model.layers.{}.mlp")])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_experts_fused_alone_where_their_block_is_not_canonical(family, block, backend):
    """Gemma 4's decoder layer calls its router and its experts itself, beside attention and a dense MLP; Inkling's
    router also weighs its shared expert. Neither block is a canonical MoE block, but each calls its experts as
    ``experts(x, ids, weights)``: capture keeps that module as the leaf instead, the routing runs as the model's
    own graph ops, and the experts are fused. Gemma 4's routing ops compute a canonical routing with a per-expert
    scale (drawn at random here, as a trained model's): ``lift_routing`` replaces them with moecc's route; Inkling's
    normalize the routed scores together with the shared expert's, which no canonical routing does, and stay."""
    model = make_model(family)
    cm = moecc.compile(model, backend=backend)
    cm(**make_inputs(family, 2, 8))
    layers = cm.moe_layers
    assert [layer.name for layer in layers] == [f"{block.format(i)}.experts" for i in range(2)]
    for i, layer in enumerate(layers):
        assert layer.fused and layer.block == block.format(i), (layer.name, layer.reason)
        assert layer.routing == {
            "gemma4": "softmax->top2 renorm per-expert-scale, lifted from the model's own routing ops",
            "inkling": "top2 ids and weights computed by the model's own ops, handed to the experts"}[family]
        assert (layer.num_experts, layer.top_k, layer.activation) == (6, 2, "gated-silu" if family == "inkling"
                                                                       else "gated-gelu_tanh")
    _matches_eager_on_fresh_shapes(family, model, cm)
