"""Rotary position embeddings with HF's layouts.

The frequencies follow transformers' rope types `default`, `linear`, `llama3` and `yarn`, so
logits match the HF model bit for bit in fp32. cos/sin are computed from position_ids, which
packed sequences reset at each document start. Pairs are (i, i + d/2) (rotate_half), or (2i,
2i + 1) with `interleave` (DeepSeek's rope_interleave); RoPE may cover only the first dims of a
head (partial_rotary_factor: `apply_rotary` rotates as many dims as cos has).
"""
from __future__ import annotations

import math

import torch

from megaswift.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type(scaling: dict | None) -> str:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None,
                    max_position_embeddings: int | None = None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope_type(scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, max_position_embeddings)
    raise ConfigError(f"rope type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (Peng et al. 2023, eq. 21): 0.1 mscale ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(scaling: dict | None) -> float:
    """What YaRN multiplies cos and sin by: `attention_factor` when given, else
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set (DeepSeek: 1), else
    mscale(factor). 1 for the other rope types."""
    if rope_type(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return float(yarn_mscale(factor, m) / yarn_mscale(factor, m_all))
    return yarn_mscale(factor)


def _yarn(dim: int, theta: float, s: dict, max_position_embeddings: int | None) -> torch.Tensor:
    """YaRN ("NTK-by-parts"): frequencies that turn fewer than beta_slow times over the original
    context are interpolated (divided by factor), those that turn more than beta_fast times are
    kept, with a linear ramp between, as transformers computes it."""
    factor = s["factor"]
    old_len = s.get("original_max_position_embeddings") or max_position_embeddings
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend the band between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin of the rotated dims (`head_dim` of them), times YaRN's attention factor."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, device=None,
                 max_position_embeddings: int | None = None):
        super().__init__()
        self.scale = attention_factor(scaling)
        # Computed on the CPU, as transformers does, and then moved: the same bits on every
        # device. It must live where the model lives, because nothing moves the model after it
        # is built (a CPU buffer under a CUDA model fails every forward). Not persistent: it is
        # derived from the config, never a checkpointed weight.
        inv_freq = inv_frequencies(head_dim, theta, scaling, max_position_embeddings).to(device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] -> cos, sin [b, s, head_dim] in `dtype` (angles in fp32)."""
        freqs = position_ids[:, :, None].float() * self.inv_freq.float()[None, None, :]  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.scale != 1.0:
            return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """x [b, s, heads, d]; cos/sin [b, s, r] (r <= d) broadcast over heads: the first r dims of
    each head are rotated, the rest pass (partial rotary). With `interleave` the rotated dims
    are pairs (2i, 2i + 1) and come out de-interleaved ([evens, odds], rotated), as transformers'
    apply_rotary_pos_emb_interleave returns them; q and k get the same order, so q.k is the
    interleaved rotation's."""
    r = cos.shape[-1]
    rot, rest = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
    if interleave:
        rot = torch.cat((rot[..., 0::2], rot[..., 1::2]), dim=-1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    out = rot * cos + rotate_half(rot) * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)
