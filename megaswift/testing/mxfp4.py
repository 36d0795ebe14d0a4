"""Tiny MXFP4 checkpoints (gpt-oss's published format), for tests.

`make_tiny_gpt_oss` saves a tiny GptOssForCausalLM from transformers itself (its experts as
save_pretrained writes them: `mlp.experts.gate_up_proj` [E, hidden, 2F], `mlp.experts.down_proj`
[E, F, hidden], fp32). `make_mxfp4_hf` turns such a checkpoint into the format gpt-oss publishes:
each 3-D expert weight as `_blocks` / `_scales` (convert/mxfp4.py's quantizer, the one export
uses), the rest bf16, config.json's quantization_config as gpt-oss-20b's.
"""
from __future__ import annotations

import torch

from megaswift.convert import mxfp4

from .fp8 import quantized_copy

# hidden and intermediate are multiples of 32 (MXFP4's block); two layers, sliding then full
TINY_GPT_OSS = dict(vocab_size=1001, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                    max_position_embeddings=256)


def make_tiny_gpt_oss(out_dir: str, seed: int = 0, **overrides) -> str:
    """A tiny gpt-oss checkpoint (fp32) saved by transformers, in `out_dir`; returns `out_dir`."""
    import transformers

    cfg = transformers.GptOssConfig(**{**TINY_GPT_OSS, **overrides})
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out_dir)
    return out_dir


def make_mxfp4_hf(src_dir: str, out_dir: str) -> str:
    """Write an MXFP4 copy of the HF checkpoint in `src_dir` (gpt-oss-style 3-D expert weights
    [E, in, out]) to `out_dir`, same shards, and return `out_dir`. Which tensors are quantized,
    and how, is export's rule (convert/mxfp4.py); every other floating tensor becomes bf16."""
    def quantize(name, t):
        if not mxfp4.quantizable(name, t.shape):
            return None
        blocks, scales = mxfp4.quantize(name, t)
        return {name + mxfp4.BLOCKS_SUFFIX: blocks, name + mxfp4.SCALES_SUFFIX: scales}
    return quantized_copy(src_dir, out_dir, quantize, mxfp4.quantization_config())
