"""The modules a decoder layer is made of, by name: token mixers and MLP blocks.

A TransformerLayer (models/layers.py) is `x + mixer(norm(x))`, then `x + mlp(norm(x))`. Which
mixer and which MLP each layer gets is data: ModelConfig names them (`token_mixer`, `dense_mlp`,
`moe_mlp`; the MoE router is `moe_router`, models/routers.py), a family spec
(convert/families.py) sets those names, and the tables below map a name to a module class. A new
architecture (multi-latent attention, attention sinks, linear attention, ...) adds its module and
one line here; GPTModel and TransformerLayer do not change.

The contracts (what the layer and GPTModel rely on):

- token mixer (`self_attention` of a layer): `cls(cfg, st, layer_idx, dtype, device)`;
  `forward(x, cos, sin, document_ids=None, cp_index=None, kv_cache=None) -> Tensor` shaped like
  x; attributes `backend` (kernels.attention backend, GPTModel.set_attention_backend) and
  `recompute_core` (selective recompute, GPTModel.set_recompute), set in __init__.
- MLP block (`mlp` of a layer): `cls(cfg, st, layer_idx, dtype, device)`;
  `forward(x, token_mask=None, moe_stats=None) -> (Tensor shaped like x, moe_stats)`: a block
  with a router adds its statistics to `moe_stats` (models/moe.py), others pass it on.

Parameter names follow Megatron under the layer's `self_attention.` and `mlp.`; their shard
layouts and HF names are keyed by those names (models/sharding.py, convert/families.py).
"""
from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from megaswift.errors import ConfigError
from megaswift.parallel.state import ParallelState

from .attention import SelfAttention
from .config import ModelConfig
from .deltanet import GatedDeltaNet
from .mla import MultiLatentAttention
from .mlp import MLP
from .moe import MoELayer


class TokenMixer(Protocol):
    backend: str
    recompute_core: bool

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, document_ids=None, cp_index=None,
                 kv_cache=None) -> Tensor: ...


class MLPBlock(Protocol):
    def __call__(self, x: Tensor, token_mask: Tensor | None = None,
                 moe_stats: Tensor | None = None) -> tuple[Tensor, Tensor | None]: ...


TOKEN_MIXERS: dict[str, type[nn.Module]] = {
    "gqa": SelfAttention,  # grouped-query attention: fused QKV, RoPE, optional q/k norms and window
    "mla": MultiLatentAttention,  # multi-latent attention (DeepSeek-V3): low-rank q and kv, shared rope key
    "gated_deltanet": GatedDeltaNet,  # linear attention with a recurrent state (Qwen3-Next's linear_attention layers)
}

MLPS: dict[str, type[nn.Module]] = {
    "swiglu": MLP,  # dense SwiGLU
    "moe": MoELayer,  # routed SwiGLU experts (router: ModelConfig.moe_router), optional shared expert
}


def register_token_mixer(name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Make `cls` the token mixer called `name` (ModelConfig.token_mixer)."""
    TOKEN_MIXERS[name] = cls
    return cls


def register_mlp(name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Make `cls` the MLP block called `name` (ModelConfig.dense_mlp / moe_mlp)."""
    MLPS[name] = cls
    return cls


def _lookup(table: dict, name: str, what: str) -> type[nn.Module]:
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}") from None


def token_mixer_class(cfg: ModelConfig, layer_idx: int) -> type[nn.Module]:
    return _lookup(TOKEN_MIXERS, cfg.token_mixer_for_layer(layer_idx), "token_mixer")


def mlp_class(cfg: ModelConfig, layer_idx: int) -> type[nn.Module]:
    what = "moe_mlp" if layer_idx in cfg.moe_layers else "dense_mlp"
    return _lookup(MLPS, cfg.mlp_for_layer(layer_idx), what)


def build_token_mixer(cfg: ModelConfig, st: ParallelState, layer_idx: int, dtype=None, device=None) -> nn.Module:
    return token_mixer_class(cfg, layer_idx)(cfg, st, layer_idx, dtype, device)


def build_mlp(cfg: ModelConfig, st: ParallelState, layer_idx: int, dtype=None, device=None) -> nn.Module:
    return mlp_class(cfg, layer_idx)(cfg, st, layer_idx, dtype, device)
