"""megaswift reads the published config.json of real models and gets their size right.

tests/data/real_configs/<name>/config.json are the configuration files of ten Hugging Face
models (configs only, no weights; where each copy came from is in SOURCES.md there). Each is read
with megaswift's own reader and family rules; the parameter count is then worked out from the
resulting ModelConfig with a formula written here, independently of the model code, and checked
against an exact integer and the count the model's authors publish. No model is built: it is
plain arithmetic on the config, so the test is fast. Qwen3-Next (hybrid Gated DeltaNet and gated
attention) and gpt-oss (attention sinks, biases, sliding windows) are also counted by transformers
itself, on the meta device.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import pytest

from megaswift.convert.families import family_for
from megaswift.convert.hf_io import read_hf_config
from megaswift.models.config import ModelConfig
from megaswift.models.rope import inv_frequencies

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "real_configs")


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    total: int
    """Exact count from the formula below (unpadded vocabulary)."""
    published_total: float
    active: int | None = None
    """Exact parameters used per token (MoE only)."""
    published_active: float | None = None
    active_counts_embedding: bool = True
    """Whether the published active count includes the input embedding (a lookup, no matmul):
    Qwen and Mistral count it, DeepSeek and Moonshot do not."""
    total_rtol: float = 0.01


CASES = [
    # Qwen3-8B: "Number of Parameters: 8.2B" (model card).
    Case("Qwen3-8B", "qwen3", 8_190_735_360, 8.2e9),
    # Llama-3.1-70B: 70.6B on the hub (safetensors metadata: 70,553,706,496).
    Case("Llama-3.1-70B", "llama", 70_553_706_496, 70.6e9),
    # Qwen3-30B-A3B: "30.5B in total and 3.3B activated" (model card).
    Case("Qwen3-30B-A3B", "qwen3_moe", 30_532_122_624, 30.5e9, 3_353_032_704, 3.3e9),
    # Qwen3-235B-A22B: "235B in total and 22B activated" (model card).
    Case("Qwen3-235B-A22B", "qwen3_moe", 235_093_634_560, 235e9, 22_190_763_520, 22e9),
    # Mixtral-8x22B: "141B parameters, 39B active" (Mistral AI announcement).
    Case("Mixtral-8x22B-v0.1", "mixtral", 140_620_634_112, 141e9, 39_152_031_744, 39e9),
    # DeepSeek-V3: "671B total parameters with 37B activated for each token" (paper, model
    # card). The multi-token-prediction module (num_nextn_predict_layers, stored as layer 61 of
    # the 685B checkpoint) is excluded: megaswift does not train it (test_deepseek_v3_mtp below).
    # Activated without the input embedding: the model card's 36.7B including the output head.
    Case("DeepSeek-V3", "deepseek_v3", 671_026_419_200, 671e9, 36_625_618_432, 37e9, active_counts_embedding=False),
    # Kimi-K2 (Instruct; Base has the same shapes): "1.04 trillion total parameters, 32 billion
    # activated" (model card, technical report); the checkpoint's tensors hold 1,026,470,731,056,
    # exactly this count plus the fp8 weights' scales (SOURCES.md), so the card's 1.04T is 1.3%
    # above; no MTP layer.
    Case("Kimi-K2-Instruct", "deepseek_v3", 1_026_408_232_448, 1.04e12, 31_687_095_808, 32e9,
         active_counts_embedding=False, total_rtol=0.015),
    # Qwen3-Next-80B-A3B: "80B in total and 3B activated" (model card); transformers' own count
    # on the meta device is this total exactly (test_qwen3_next_count_equals_transformers). The
    # "3B" is the name's rounding: 3.87B with the embedding, 3.56B without (no published figure
    # is checked for it); no MTP layer is counted (megaswift keeps `mtp.*` aside).
    Case("Qwen3-Next-80B-A3B-Instruct", "qwen3_next", 79_674_391_296, 80e9, 3_874_929_408),
    # gpt-oss-20b / -120b: "21B parameters with 3.6B active" and "117B parameters with 5.1B
    # active" (OpenAI's announcement; the model card's table: 20.91B / 3.61B and 116.83B /
    # 5.13B). The active counts leave out the input embedding (the card's active figure is its
    # attention + top-4 of the MLP + the unembedding); transformers' own count on the meta device
    # is the total exactly (test_gpt_oss_count_equals_transformers).
    Case("gpt-oss-20b", "gpt_oss", 20_914_757_184, 21e9, 3_608_307_264, 3.6e9, active_counts_embedding=False),
    Case("gpt-oss-120b", "gpt_oss", 116_829_156_672, 117e9, 5_132_849_472, 5.1e9, active_counts_embedding=False),
]


def read_model_config(name: str) -> ModelConfig:
    path = os.path.join(DATA, name)
    hf = read_hf_config(path)
    return family_for(hf).model_config(hf, 128, source=os.path.join(path, "config.json"))


def count_parameters(cfg: ModelConfig, active: bool = False) -> int:
    """Parameters of the HF model described by cfg: embedding, output layer unless tied, final
    norm, and per layer two RMSNorms, attention (q/k/v/o with GQA and head_dim, q/k norms over
    head_dim when qk_layernorm, biases when set; or multi-latent attention: q_a_proj, its norm and
    q_b_proj (or one q_proj), kv_a_proj_with_mqa (latent + rope key), its norm, kv_b_proj,
    o_proj; Qwen3-Next: q_proj twice as wide (each head's output gate), and in its linear_attention
    layers Gated DeltaNet: in_proj_qkvz, in_proj_ba, the depthwise conv [channels, K], dt_bias and
    A_log per value head, the gated norm over a value head, out_proj) and an MLP: a SwiGLU of ffn_hidden_size, or the
    experts (each a SwiGLU of moe_ffn_hidden_size) plus a bias-free router (with DeepSeek's
    per-expert score bias) and any shared expert (with Qwen2-MoE's gate); gpt-oss: a sink logit
    per query head, the router's bias [E], each expert's biases ([2F] on gate_up, [H] on down).
    `active`: only the
    top-k experts a token goes through. The vocabulary is the real one, not the padded one
    megaswift allocates."""
    H, V, hd = cfg.hidden_size, cfg.vocab_size, cfg.kv_channels
    if cfg.is_mla:
        n, rq, rkv = cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        attn = H * rq + rq + rq * n * qk if rq else H * n * qk
        attn += H * (rkv + cfg.qk_rope_head_dim) + rkv + rkv * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        attn += n * cfg.v_head_dim * H
    else:
        q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_query_groups * hd
        attn = H * q_out * (2 if cfg.attn_output_gate else 1) + 2 * H * kv_out + q_out * H
        if cfg.add_qkv_bias:
            attn += q_out + 2 * kv_out
        if cfg.add_proj_bias:
            attn += H
        if cfg.qk_layernorm:
            attn += 2 * hd
        if cfg.attention_sinks:
            attn += cfg.num_attention_heads
    hk, hv, dk, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, \
        cfg.linear_value_head_dim
    channels = 2 * hk * dk + hv * dv  # the conv's: q, k and v
    linear = (H * (2 * hk * dk + 2 * hv * dv) + H * 2 * hv + channels * cfg.linear_conv_kernel_dim + 2 * hv + dv
              + hv * dv * H)
    swiglu = lambda width: 3 * H * width  # noqa: E731 -- gate, up, down
    total = V * H + (0 if cfg.tie_word_embeddings else V * H) + H
    for i in range(cfg.num_layers):
        mixer = linear if cfg.token_mixer_for_layer(i) == "gated_deltanet" else attn
        if i in cfg.moe_layers:
            experts = cfg.moe_router_topk if active else cfg.num_moe_experts
            mlp = experts * swiglu(cfg.moe_ffn_hidden_size) + cfg.num_moe_experts * H
            if cfg.moe_router_expert_bias or cfg.moe_router_bias:
                mlp += cfg.num_moe_experts
            if cfg.moe_expert_bias:
                mlp += experts * (2 * cfg.moe_ffn_hidden_size + H)
            if cfg.moe_shared_expert_ffn_hidden_size:
                mlp += swiglu(cfg.moe_shared_expert_ffn_hidden_size) + (H if cfg.moe_shared_expert_gate else 0)
        else:
            mlp = swiglu(cfg.ffn_hidden_size)
        total += 2 * H + mixer + mlp
    return total


@pytest.mark.parametrize("case", CASES, ids=[getattr(c, "name", None) for c in CASES])
def test_real_config_parameter_count(case: Case):
    cfg = read_model_config(case.name)
    assert cfg.family == case.family
    # every layer of these MoE models has experts but DeepSeek's first_k_dense_replace ones; the
    # dense models have none
    dense_first = read_hf_config(os.path.join(DATA, case.name)).get("first_k_dense_replace") or 0
    assert cfg.moe_layers == (list(range(dense_first, cfg.num_layers)) if case.active is not None else [])

    total = count_parameters(cfg)
    assert total == case.total
    assert abs(total - case.published_total) <= case.total_rtol * case.published_total, (
        f"{case.name}: {total:,} parameters, published {case.published_total:,.0f}")

    if case.active is not None:
        active = count_parameters(cfg, active=True) - (0 if case.active_counts_embedding else
                                                       cfg.vocab_size * cfg.hidden_size)
        assert active == case.active
        if case.published_active is not None:
            assert abs(active - case.published_active) <= 0.02 * case.published_active, (
                f"{case.name}: {active:,} active parameters, published {case.published_active:,.0f}")

    # the rope parameters megaswift kept (Llama-3.1's llama3 scaling, DeepSeek's YaRN included)
    # are ones it can use, over the dims it rotates (MLA: the rope part of each head)
    inv = inv_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    assert tuple(inv.shape) == (cfg.rotary_dim // 2,)


def test_real_config_shapes():
    """The fields the counts rest on, as published, so that a reader change that shifts a count
    names the field it moved."""
    got = {c.name: read_model_config(c.name) for c in (getattr(c, "values", [c])[0] for c in CASES)}
    shape = lambda m: (m.vocab_size, m.hidden_size, m.num_layers, m.num_attention_heads,  # noqa: E731
                       m.num_query_groups, m.kv_channels, m.tie_word_embeddings, m.qk_layernorm)
    assert shape(got["Qwen3-8B"]) == (151936, 4096, 36, 32, 8, 128, False, True)
    assert got["Qwen3-8B"].ffn_hidden_size == 12288
    assert shape(got["Llama-3.1-70B"]) == (128256, 8192, 80, 64, 8, 128, False, False)
    assert got["Llama-3.1-70B"].ffn_hidden_size == 28672
    assert got["Llama-3.1-70B"].rope_theta == 500000.0
    assert got["Llama-3.1-70B"].rope_scaling == {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    assert shape(got["Qwen3-30B-A3B"]) == (151936, 2048, 48, 32, 4, 128, False, True)
    assert shape(got["Qwen3-235B-A22B"]) == (151936, 4096, 94, 64, 4, 128, False, True)
    for name, experts, width in (("Qwen3-30B-A3B", 128, 768), ("Qwen3-235B-A22B", 128, 1536)):
        m = got[name]
        assert (m.num_moe_experts, m.moe_ffn_hidden_size, m.moe_router_topk, m.moe_norm_topk_prob) == (
            experts, width, 8, True)
        assert m.rope_theta == 1e6 and m.rope_scaling is None
    mixtral = got["Mixtral-8x22B-v0.1"]
    assert shape(mixtral) == (32000, 6144, 56, 48, 8, 128, False, False)
    assert (mixtral.num_moe_experts, mixtral.moe_ffn_hidden_size, mixtral.moe_router_topk) == (8, 16384, 2)
    assert mixtral.rope_theta == 1e6 and mixtral.sliding_window is None
    # multi-latent attention: the latent ranks and head widths, the router, the dense first layers;
    # Kimi-K2 is read as deepseek_v3 (model_type kimi_k2 over DeepseekV3ForCausalLM)
    mla = lambda m: (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim,  # noqa: E731
                     m.v_head_dim, m.token_mixer, m.rotary_dim)
    router = lambda m: (m.num_moe_experts, m.moe_router_topk, m.moe_router_num_groups,  # noqa: E731
                        m.moe_router_group_topk, m.moe_router_scaling_factor, m.moe_router, m.moe_router_expert_bias,
                        m.moe_shared_expert_ffn_hidden_size, m.moe_shared_expert_gate, m.moe_ffn_hidden_size)
    ds, kimi = got["DeepSeek-V3"], got["Kimi-K2-Instruct"]
    assert shape(ds) == (129280, 7168, 61, 128, 128, 192, False, False) and ds.ffn_hidden_size == 18432
    assert mla(ds) == (1536, 512, 128, 64, 128, "mla", 64) and ds.moe_layers[0] == 3
    assert router(ds) == (256, 8, 8, 4, 2.5, "sigmoid_group", True, 2048, False, 2048)
    assert ds.rope_scaling["factor"] == 40 and ds.rope_theta == 10000
    assert shape(kimi) == (163840, 7168, 61, 64, 64, 192, False, False) and kimi.ffn_hidden_size == 18432
    assert mla(kimi) == (1536, 512, 128, 64, 128, "mla", 64) and kimi.moe_layers[0] == 1
    assert router(kimi) == (384, 8, 1, 1, 2.827, "sigmoid_group", True, 2048, False, 2048)
    assert kimi.rope_scaling["factor"] == 32.0 and kimi.rope_theta == 50000.0
    # Gated DeltaNet beside gated attention (a quarter of each 256-wide head rotated), 512 experts
    # top-10 beside a gated shared expert on every layer
    nxt = got["Qwen3-Next-80B-A3B-Instruct"]
    assert shape(nxt) == (151936, 2048, 48, 16, 2, 256, False, True) and nxt.ffn_hidden_size == 5120
    assert (nxt.linear_num_key_heads, nxt.linear_num_value_heads, nxt.linear_key_head_dim, nxt.linear_value_head_dim,
            nxt.linear_conv_kernel_dim) == (16, 32, 128, 128, 4)
    assert (nxt.attn_output_gate, nxt.norm_zero_centered, nxt.rotary_dim, nxt.rope_theta) == (True, True, 64, 1e7)
    assert (nxt.num_moe_experts, nxt.moe_router_topk, nxt.moe_ffn_hidden_size, nxt.moe_shared_expert_ffn_hidden_size,
            nxt.moe_shared_expert_gate, nxt.moe_layers) == (512, 10, 512, 512, True, list(range(48)))
    # gpt-oss: sliding windows of 128 on the even layers, sinks and biases, every layer routed
    # (top-4, the router with a bias, experts with biases and the clamped SwiGLU), YaRN x32
    for name, layers, experts in (("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128)):
        oss = got[name]
        assert shape(oss) == (201088, 2880, layers, 64, 8, 64, False, False)
        assert [oss.window_for_layer(i) for i in range(4)] == [128, None, 128, None]
        assert (oss.attention_sinks, oss.add_qkv_bias, oss.add_proj_bias, oss.moe_router_bias, oss.moe_expert_bias,
                oss.moe_activation, oss.moe_swiglu_limit) == (True, True, True, True, True, "clamped_swiglu", 7.0)
        assert (oss.num_moe_experts, oss.moe_router_topk, oss.moe_ffn_hidden_size, oss.moe_layers) == (
            experts, 4, 2880, list(range(layers)))
        assert oss.rope_theta == 150000 and oss.rope_scaling["rope_type"] == "yarn" and oss.rope_scaling["factor"] == 32


def test_qwen3_next_count_equals_transformers():
    """transformers' Qwen3NextForCausalLM built from the published config on the meta device (no
    memory): its layer types (3 linear_attention, then full_attention, from full_attention_interval)
    are megaswift's, and its parameter count is the formula's exactly."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.join(DATA, "Qwen3-Next-80B-A3B-Instruct")
    hf = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    cfg = read_model_config("Qwen3-Next-80B-A3B-Instruct")
    assert [cfg.token_mixer_for_layer(i) for i in range(cfg.num_layers)] == [
        "gated_deltanet" if t == "linear_attention" else "gqa" for t in hf.layer_types]
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg) == 79_674_391_296


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_gpt_oss_count_equals_transformers(name):
    """transformers' GptOssForCausalLM built from the published config on the meta device: its
    sliding layers are megaswift's windowed ones, and its parameter count (sinks, the q/k/v/o,
    router and expert biases included) is the formula's exactly."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.from_pretrained(os.path.join(DATA, name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    cfg = read_model_config(name)
    assert [cfg.window_for_layer(i) for i in range(cfg.num_layers)] == [
        hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]
    case = next(c for c in CASES if c.name == name)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg) == case.total


def test_deepseek_v3_mtp():
    """The published 685B of the DeepSeek-V3 checkpoint = the 671B main model + the MTP module
    (model card: "14B of the Multi-Token Prediction (MTP) Module weights", 11.5B of them unique):
    one more MoE decoder layer, its two input norms and eh_proj [H, 2H], the shared head's norm,
    and copies of the embedding and output head stored with it."""
    cfg = read_model_config("DeepSeek-V3")
    H, V = cfg.hidden_size, cfg.vocab_size
    one_moe_layer = (count_parameters(cfg) - count_parameters(dataclasses.replace(cfg, num_layers=cfg.num_layers - 1)))
    unique = one_moe_layer + 2 * H + 2 * H * H + H
    assert unique == 11_610_068_224 and abs(unique - 11.5e9) <= 0.01 * 11.5e9
    checkpoint = count_parameters(cfg) + unique + 2 * V * H
    assert checkpoint == 684_489_845_504 and abs(checkpoint - 685e9) <= 0.005 * 685e9
