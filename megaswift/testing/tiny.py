"""Tiny random-weight HF checkpoints and a locally trained tokenizer, for tests and the quickstart.

Nothing is downloaded: configs are built in code, weights are random, the tokenizer is a small
BPE trained on text generated here. Sizes are deliberately awkward, as real checkpoints are: a
vocabulary no TP degree divides, fewer KV heads than TP ranks, head_dim apart from
hidden/heads, llama3 rope scaling, tied embeddings, QKV bias, several safetensors shards; MoE
families mix dense and expert layers.
"""
from __future__ import annotations

import os

import torch

TINY_COMMON = dict(
    vocab_size=1001, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=2, head_dim=12, max_position_embeddings=256, rms_norm_eps=1e-5,
)

# family -> (HF config class name, extra config keys)
TINY_FAMILIES = {
    "llama": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=4, head_dim=16, rope_theta=1000000.0)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, sliding_window=16)),
    # experts on layer 0 only (layer 1 is dense, as mlp_only_layers allows), unnormalised top-2,
    # the load-balancing loss on (output_router_logits) with a coefficient large enough to matter
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=4, head_dim=16, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=24, mlp_only_layers=[1], norm_topk_prob=False,
                                         output_router_logits=True, router_aux_loss_coef=0.02)),
    # a shared expert beside 4 routed ones, QKV bias, top-2
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=32, rope_theta=1000000.0)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, rope_theta=1000000.0)),
    # multi-latent attention with a query down-projection (q/k heads 14 wide, v heads 10), YaRN
    # with mscale, interleaved RoPE; 8 experts in 4 groups (top-3 from 2 groups), a shared
    # expert, the first layer dense
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_key_value_heads=8, head_dim=6, q_lora_rank=20, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6,
        v_head_dim=10, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
        moe_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        rope_interleave=True, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.8,
            "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1})),
    # Gated DeltaNet in layers 0-2 (2 key heads of 8, each with 2 value heads of 6; conv kernel
    # 4), gated attention with a quarter of the head rotated in layer 3, zero-centred norms;
    # 4 experts (top-2) beside a gated shared expert on every layer
    "qwen3_next": ("Qwen3NextConfig", dict(
        num_hidden_layers=4, num_attention_heads=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=6, linear_conv_kernel_dim=4, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=32, decoder_sparse_step=1,
        mlp_only_layers=[], rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.25})),
    # sliding-window (8) and full layers alternating, attention sinks, q/k/v/o biases, YaRN;
    # 4 experts with biases (top-2), the clamped SwiGLU at a limit the tiny activations reach
    "gpt_oss": ("GptOssConfig", dict(
        num_attention_heads=4, head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], swiglu_limit=0.3,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})),
    # GQA with half the head dims rotated, QKV bias, q/k norms; the same router as DeepSeek-V3
    "glm4_moe": ("Glm4MoeConfig", dict(
        head_dim=16, attention_bias=True, use_qk_norm=True, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=1.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.5})),
}


# multimodal families: the language model's keys go into text_config (TINY_COMMON, then these),
# beside a one-block vision tower whose output width is the language model's hidden size
_QWEN35_TEXT = dict(
    num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"],
    num_attention_heads=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
    linear_value_head_dim=6, linear_conv_kernel_dim=4, mtp_num_hidden_layers=1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                     "mrope_section": [2, 1, 1], "mrope_interleaved": True})
TINY_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=24, patch_size=4, spatial_merge_size=2,
                   temporal_patch_size=2, num_position_embeddings=16, out_hidden_size=TINY_COMMON["hidden_size"])
TINY_MULTIMODAL = {
    # Qwen3.5: DeltaNet in layers 0 and 2 around a gated attention layer (half the head rotated,
    # interleaved multimodal RoPE sections), the dense MLP
    "qwen3_5": ("Qwen3_5Config", _QWEN35_TEXT),
    # Qwen3.5-MoE: the same, with 4 fused experts (top-2) and a gated shared expert on every layer
    "qwen3_5_moe": ("Qwen3_5MoeConfig", dict(_QWEN35_TEXT, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=24, shared_expert_intermediate_size=32)),
}


def _words(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "qu", "an", "el"]
    lines = []
    for _ in range(n):
        k = int(torch.randint(4, 12, (1,), generator=g))
        idx = torch.randint(0, len(syll), (k, 3), generator=g)
        lines.append(" ".join("".join(syll[j] for j in row[: 1 + int(row[0]) % 3]) for row in idx.tolist()))
    return lines


def save_tiny_tokenizer(out_dir: str, vocab_size: int = 400, seed: int = 0) -> None:
    """Train a byte-level BPE on generated text and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_words(2000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(out_dir)


def make_tiny_hf(family: str, out_dir: str, *, seed: int = 0, max_shard_size: str = "100KB",
                 dtype: torch.dtype = torch.float32, tokenizer: bool = True, **overrides) -> str:
    """Write a random-weight HF checkpoint of `family` to out_dir and return out_dir."""
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if family in TINY_MULTIMODAL:  # the whole multimodal model, so its checkpoint holds a vision tower
        cls_name, extra = TINY_MULTIMODAL[family]
        config = getattr(transformers, cls_name)(text_config={**TINY_COMMON, **extra, **overrides},
                                                 vision_config=TINY_VISION)
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=dtype)
    else:
        cls_name, extra = TINY_FAMILIES[family]
        config = getattr(transformers, cls_name)(**{**TINY_COMMON, **extra, **overrides})
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: randomise so they are tested
        biases = [(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
        for name, p in [*model.named_parameters(), *biases]:
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):  # a real bias, large enough to change choices
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks"):  # logits of the order of the scores, so they matter
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(("A_log", "dt_bias")):  # decays of order one, as trained models have
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if tokenizer:
        save_tiny_tokenizer(out_dir)
    return out_dir


def make_kimi_k2_style(out_dir: str, *, seed: int = 0, **overrides) -> str:
    """A tiny deepseek_v3 checkpoint dressed as Kimi-K2 publishes its config.json: model_type
    kimi_k2 (which transformers does not know) over architectures DeepseekV3ForCausalLM, an
    auto_map naming remote code (never run: megaswift reads tensors only), one expert group."""
    import json

    kw = dict(n_group=1, topk_group=1, routed_scaling_factor=2.827, **overrides)
    make_tiny_hf("deepseek_v3", out_dir, seed=seed, **kw)
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(model_type="kimi_k2", auto_map={
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def add_qwen_mtp(hf_dir: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Give a tiny Qwen3-Next / Qwen3.5 checkpoint a multi-token-prediction block as Qwen
    publishes it (`mtp.*`, which transformers skips on load): the fc that joins embedding and
    hidden state, its two pre-norms, a final norm and one attention projection of an odd shape,
    in a shard of their own. Returns them."""
    import json

    from safetensors.torch import save_file

    from megaswift.testing.fp8 import _weight_map, _write_index

    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    hidden = config.get("text_config", config)["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    shapes = {"mtp.fc.weight": (hidden, 2 * hidden), "mtp.pre_fc_norm_embedding.weight": (hidden,),
              "mtp.pre_fc_norm_hidden.weight": (hidden,), "mtp.norm.weight": (hidden,),
              "mtp.layers.0.self_attn.q_proj.weight": (37, hidden)}
    tensors = {k: 0.05 * torch.randn(s, generator=g) for k, s in shapes.items()}
    weight_map = _weight_map(hf_dir)
    save_file(tensors, os.path.join(hf_dir, "model-mtp.safetensors"), metadata={"format": "pt"})
    weight_map.update({k: "model-mtp.safetensors" for k in tensors})
    _write_index(hf_dir, weight_map)
    return tensors


def fuse_experts(src_dir: str, out_dir: str) -> str:
    """A copy of an HF checkpoint with its per-expert tensors stacked into transformers >= 5's
    fused layout (`experts.gate_up_proj` [E, 2F, H]: each expert's gate rows then its up rows;
    `experts.down_proj` [E, H, F]), as Qwen3.5-MoE is published. One shard; the other files
    copied."""
    import glob
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(src_dir, "*.safetensors"))):
        tensors.update(load_file(path))
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(src_dir):
        if not name.endswith(".safetensors") and name != "model.safetensors.index.json":
            shutil.copy2(os.path.join(src_dir, name), os.path.join(out_dir, name))
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, t in tensors.items():
        m = re.match(r"(.*\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = t
        else:
            out[name] = t
    for block, per in experts.items():
        order = sorted(per)
        out[block + "gate_up_proj"] = torch.stack([torch.cat([per[e]["gate_proj"], per[e]["up_proj"]]) for e in order])
        out[block + "down_proj"] = torch.stack([per[e]["down_proj"] for e in order])
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir
