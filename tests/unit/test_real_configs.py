"""megaswift reads the published config.json of real models and gets their size right.

tests/data/real_configs/<name>/config.json are the configuration files of five Hugging Face
models (configs only, no weights; where each copy came from is in SOURCES.md there). Each is read
with megaswift's own reader and family rules; the parameter count is then worked out from the
resulting ModelConfig with a formula written here, independently of the model code, and checked
against an exact integer and the count the model's authors publish. No model is built: it is
plain arithmetic on the config, so the test is fast.
"""
from __future__ import annotations

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
]


def read_model_config(name: str) -> ModelConfig:
    path = os.path.join(DATA, name)
    hf = read_hf_config(path)
    return family_for(hf).model_config(hf, 128, source=os.path.join(path, "config.json"))


def count_parameters(cfg: ModelConfig, active: bool = False) -> int:
    """Parameters of the HF model described by cfg: embedding, output layer unless tied, final
    norm, and per layer two RMSNorms, attention (q/k/v/o with GQA and head_dim, q/k norms over
    head_dim when qk_layernorm, biases when set) and an MLP: a SwiGLU of ffn_hidden_size, or the
    experts (each a SwiGLU of moe_ffn_hidden_size) plus a bias-free router and any shared expert.
    `active`: only the top-k experts a token goes through. The vocabulary is the real one, not
    the padded one megaswift allocates."""
    H, V, hd = cfg.hidden_size, cfg.vocab_size, cfg.kv_channels
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_query_groups * hd
    attn = H * q_out + 2 * H * kv_out + q_out * H
    if cfg.add_qkv_bias:
        attn += q_out + 2 * kv_out
    if cfg.add_proj_bias:
        attn += H
    if cfg.qk_layernorm:
        attn += 2 * hd
    swiglu = lambda width: 3 * H * width  # noqa: E731 -- gate, up, down
    total = V * H + (0 if cfg.tie_word_embeddings else V * H) + H
    for i in range(cfg.num_layers):
        if i in cfg.moe_layers:
            experts = cfg.moe_router_topk if active else cfg.num_moe_experts
            mlp = experts * swiglu(cfg.moe_ffn_hidden_size) + cfg.num_moe_experts * H
            if cfg.moe_shared_expert_ffn_hidden_size:
                mlp += swiglu(cfg.moe_shared_expert_ffn_hidden_size) + H
        else:
            mlp = swiglu(cfg.ffn_hidden_size)
        total += 2 * H + attn + mlp
    return total


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_real_config_parameter_count(case: Case):
    cfg = read_model_config(case.name)
    assert cfg.family == case.family
    # every layer of these MoE models has experts; the dense ones have none
    assert len(cfg.moe_layers) == (cfg.num_layers if case.active is not None else 0)

    total = count_parameters(cfg)
    assert total == case.total
    assert abs(total - case.published_total) <= 0.01 * case.published_total, (
        f"{case.name}: {total:,} parameters, published {case.published_total:,.0f}")

    if case.active is not None:
        active = count_parameters(cfg, active=True)
        assert active == case.active
        assert abs(active - case.published_active) <= 0.02 * case.published_active, (
            f"{case.name}: {active:,} active parameters, published {case.published_active:,.0f}")

    # the rope parameters megaswift kept (Llama-3.1's llama3 scaling included) are ones it can use
    inv = inv_frequencies(cfg.kv_channels, cfg.rope_theta, cfg.rope_scaling)
    assert tuple(inv.shape) == (cfg.kv_channels // 2,)


def test_real_config_shapes():
    """The fields the counts rest on, as published, so that a reader change that shifts a count
    names the field it moved."""
    got = {c.name: read_model_config(c.name) for c in CASES}
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
