"""Where each rank's parameter slice sits inside the TP-independent ("canonical") tensor.

A canonical tensor is what a parameter would be with tp=1, in Megatron's layout: linear_qkv is
grouped per query group [q of group 0, k0, v0, q of group 1, k1, v1, ...], linear_fc1 is
[gate; up], and embeddings are unpadded. Conversion and checkpoints speak canonical tensors, so
neither depends on the layout a run used, and a checkpoint saved at tp=2 loads at tp=4.

A rank's local tensor is the concatenation, along one dimension, of ranges of the canonical
tensor, followed by `pad` zero rows (vocab padding). With more TP ranks than KV heads, the
ranges of a KV head are held by several ranks (replicas); everything else is held once.

Experts are 3-D canonical tensors [experts, rows, cols] (Megatron's grouped `linear_fc1` /
`linear_fc2`): a rank holds the experts of its ep rank (`outer`, along dim 0) and, under expert
tensor parallelism, its etp slice of each of them (`ranges`, along dim 1 or 2).

`fill_from_canonical` assembles a rank's local tensor from boxes of a canonical tensor, and
`local_pieces` takes them back out. `read(offsets, sizes)` returns the box of the canonical tensor
that starts at `offsets`, from wherever the canonical tensor lives (an HF safetensors file, a
tensor in memory), so the same code serves import, random init and checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import ModelConfig

Box = tuple[int, ...]


@dataclass(frozen=True)
class ShardLayout:
    canonical_shape: tuple[int, ...]
    dim: int = 0
    ranges: tuple[tuple[int, int], ...] = ()
    """(start, length) along `dim`, in the order they are concatenated locally."""
    pad: int = 0
    """Zero rows appended after the ranges (padded vocabulary)."""
    outer: tuple[int, int] | None = None
    """Experts: (first, count) along dim 0, while `ranges` run along `dim` >= 1."""

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.canonical_shape)
        shape[self.dim] = sum(n for _, n in self.ranges) + self.pad
        if self.outer is not None:
            shape[0] = self.outer[1]
        return tuple(shape)

    def boxes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(offsets, sizes) in the canonical tensor of each range, in local order."""
        out = []
        for start, n in self.ranges:
            offsets, sizes = [0] * len(self.canonical_shape), list(self.canonical_shape)
            offsets[self.dim], sizes[self.dim] = start, n
            if self.outer is not None:
                offsets[0], sizes[0] = self.outer
            out.append((tuple(offsets), tuple(sizes)))
        return out

    @classmethod
    def replicated(cls, shape) -> "ShardLayout":
        shape = tuple(shape)
        return cls(shape, 0, ((0, shape[0]),) if shape else ())


def split_range(total: int, tp: int, tp_rank: int) -> tuple[int, int]:
    per = total // tp
    return tp_rank * per, per


def qkv_rows(cfg: ModelConfig, tp: int, tp_rank: int) -> tuple[tuple[int, int], ...]:
    """Canonical rows of linear_qkv held by one TP rank, local order [q, k, v] per local group."""
    hd, ng, qpg = cfg.kv_channels, cfg.num_query_groups, cfg.queries_per_group
    qh = query_rows_per_head(cfg)
    group_rows = qpg * qh + 2 * hd
    if tp <= ng:  # whole query groups per rank: one contiguous block
        per = ng // tp
        return ((tp_rank * per * group_rows, per * group_rows),)
    # more ranks than KV heads: `rep` ranks share group g, each with qpg/rep of its query heads
    rep = tp // ng
    g, j = divmod(tp_rank, rep)
    q_per = qpg // rep
    base = g * group_rows
    # Kept as two pieces even when adjacent: the KV piece must be the same chunk on every replica,
    # so that a checkpoint stores it once (DCP deduplicates identical chunks, rejects overlaps).
    return ((base + j * q_per * qh, q_per * qh), (base + qpg * qh, 2 * hd))


def query_rows_per_head(cfg: ModelConfig) -> int:
    """Rows of linear_qkv per query head: its query, and with attn_output_gate its gate after it
    (HF Qwen3-Next's q_proj layout per head)."""
    return cfg.kv_channels * (2 if cfg.attn_output_gate else 1)


def local_heads(cfg: ModelConfig, tp: int) -> tuple[int, int]:
    """(query heads, kv heads) computed on one TP rank."""
    return cfg.num_attention_heads // tp, max(1, cfg.num_query_groups // tp)


def flat_rows(shape: tuple[int, ...]) -> tuple[int, ...]:
    """An expert tensor [experts, rows, cols] seen as [experts x rows, cols], the view in which
    HF conversion lists its per-expert tensors; other shapes unchanged."""
    return (shape[0] * shape[1], *shape[2:]) if len(shape) == 3 else tuple(shape)


def _expert_layout(name: str, cfg: ModelConfig, ep: int, ep_rank: int, etp: int, etp_rank: int) -> ShardLayout:
    E, F, H = cfg.num_moe_experts, cfg.moe_ffn_hidden_size, cfg.hidden_size
    mine = (ep_rank * (E // ep), E // ep)
    s, n = split_range(F, etp, etp_rank)
    if name.endswith("experts.linear_fc1.weight"):  # [E, gate; up, H], column-parallel over etp
        return ShardLayout((E, 2 * F, H), 1, ((s, n), (F + s, n)), outer=mine)
    if name.endswith("experts.linear_fc2.weight"):  # [E, H, F], row-parallel over etp
        return ShardLayout((E, H, F), 2, ((s, n),), outer=mine)
    if name.endswith("experts.linear_fc1.bias"):  # [E, gate; up], split as linear_fc1's rows
        return ShardLayout((E, 2 * F), 1, ((s, n), (F + s, n)), outer=mine)
    if name.endswith("experts.linear_fc2.bias"):  # [E, H], whole on every etp rank
        return ShardLayout((E, H), 1, ((0, H),), outer=mine)
    raise KeyError(f"no shard layout for expert parameter {name!r}")


# multi-latent attention (models/mla.py): the down-projections and their norms are replicated,
# the up-projections split by head (rows; HF's per-head order [nope, rope] / [nope, v] is kept),
# the output projection by head along its input
def _mla_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """leaf -> (canonical shape, rows per head for a head-split weight; None: replicated)."""
    H, n, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
    out = {"linear_kv_down_proj.weight": ((cfg.kv_lora_rank + cfg.qk_rope_head_dim, H), None),
           "kv_layernorm.weight": ((cfg.kv_lora_rank,), None),
           "linear_kv_up_proj.weight": ((n * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
                                        cfg.qk_nope_head_dim + cfg.v_head_dim),
           "linear_proj.weight": ((H, n * cfg.v_head_dim), cfg.v_head_dim)}
    if cfg.q_lora_rank is None:
        out["linear_q_proj.weight"] = ((n * qk, H), qk)
    else:
        out.update({"linear_q_down_proj.weight": ((cfg.q_lora_rank, H), None),
                    "q_layernorm.weight": ((cfg.q_lora_rank,), None),
                    "linear_q_up_proj.weight": ((n * qk, cfg.q_lora_rank), qk)})
    return out


def _mla_layout(name: str, cfg: ModelConfig, tp: int, tp_rank: int) -> ShardLayout:
    leaf = ".".join(name.split(".")[-2:])
    try:
        shape, per_head = _mla_shapes(cfg)[leaf]
    except KeyError:
        raise KeyError(f"no shard layout for multi-latent attention parameter {name!r}") from None
    if per_head is None:
        return ShardLayout.replicated(shape)
    n = cfg.num_attention_heads // tp
    dim = 1 if leaf == "linear_proj.weight" else 0
    return ShardLayout(shape, dim, ((tp_rank * n * per_head, n * per_head),))


# Gated DeltaNet (models/deltanet.py), split by key head (each with its value heads) over tp. HF's
# in_proj_qkvz and in_proj_ba are grouped per key head, so a rank's rows are one range; the conv's
# channels are [q of every key head; k of every key head; v of every value head], three ranges.
_DELTANET_LEAVES = ("in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight", "dt_bias", "A_log",
                    "out_norm.weight", "out_proj.weight")


def _deltanet_layout(leaf: str, cfg: ModelConfig, tp: int, tp_rank: int) -> ShardLayout:
    hk, hv, dk, dv, H = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                         cfg.linear_value_head_dim, cfg.hidden_size)
    r, nk, nv = hv // hk, hk // tp, hv // tp

    def mine(per_key_head: int) -> tuple[tuple[int, int], ...]:
        return ((tp_rank * nk * per_key_head, nk * per_key_head),)

    if leaf == "in_proj_qkvz.weight":
        return ShardLayout((hk * (2 * dk + 2 * r * dv), H), 0, mine(2 * dk + 2 * r * dv))
    if leaf == "in_proj_ba.weight":
        return ShardLayout((hk * 2 * r, H), 0, mine(2 * r))
    if leaf == "conv1d.weight":
        q, k, v = (tp_rank * nk * dk, nk * dk), (hk * dk + tp_rank * nk * dk, nk * dk), \
            (2 * hk * dk + tp_rank * nv * dv, nv * dv)
        return ShardLayout((2 * hk * dk + hv * dv, cfg.linear_conv_kernel_dim), 0, (q, k, v))
    if leaf in ("dt_bias", "A_log"):
        return ShardLayout((hv,), 0, mine(r))
    if leaf == "out_norm.weight":
        return ShardLayout.replicated((dv,))
    return ShardLayout((H, hv * dv), 1, mine(r * dv))  # out_proj, row-parallel


def shard_layout(name: str, cfg: ModelConfig, tp: int, tp_rank: int, *, ep: int = 1, ep_rank: int = 0,
                 etp: int = 1, etp_rank: int = 0) -> ShardLayout:
    """The layout of parameter `name` (a Megatron-style name) on TP rank `tp_rank` (and, for
    experts, on expert-parallel rank `ep_rank` and expert-TP rank `etp_rank`)."""
    H, F, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels
    qkv_out = cfg.num_attention_heads * query_rows_per_head(cfg) + 2 * cfg.num_query_groups * hd
    if ".experts." in name:
        return _expert_layout(name, cfg, ep, ep_rank, etp, etp_rank)
    if cfg.is_mla and ".self_attention." in name:
        return _mla_layout(name, cfg, tp, tp_rank)
    if ".self_attention." in name and name.rsplit(".self_attention.", 1)[1] in _DELTANET_LEAVES:
        return _deltanet_layout(name.rsplit(".self_attention.", 1)[1], cfg, tp, tp_rank)
    if ".shared_expert." in name:  # a dense SwiGLU MLP of its own width, split over tp
        F = cfg.moe_shared_expert_ffn_hidden_size
    leaf = ".".join(name.split(".")[-2:])
    if leaf in ("word_embeddings.weight", "output_layer.weight"):
        vp = cfg.padded_vocab_size(tp) // tp
        start = tp_rank * vp
        n = max(0, min(cfg.vocab_size, start + vp) - start)
        return ShardLayout((cfg.vocab_size, H), 0, ((start, n),) if n else (), vp - n)
    if leaf == "linear_qkv.weight":
        return ShardLayout((qkv_out, H), 0, qkv_rows(cfg, tp, tp_rank))
    if leaf == "linear_qkv.bias":
        return ShardLayout((qkv_out,), 0, qkv_rows(cfg, tp, tp_rank))
    if leaf == "linear_fc1.weight":
        s, n = split_range(F, tp, tp_rank)
        return ShardLayout((2 * F, H), 0, ((s, n), (F + s, n)))
    if leaf == "linear_proj.weight":
        return ShardLayout((H, cfg.num_attention_heads * hd), 1, (split_range(cfg.num_attention_heads * hd, tp, tp_rank),))
    if leaf == "linear_fc2.weight":
        return ShardLayout((H, F), 1, (split_range(F, tp, tp_rank),))
    if leaf == "linear_proj.bias":
        return ShardLayout.replicated((H,))
    if leaf == "self_attention.sinks":  # a logit per query head (attention_sinks): split by head
        return ShardLayout((cfg.num_attention_heads,), 0, (split_range(cfg.num_attention_heads, tp, tp_rank),))
    if leaf == "router.weight":  # replicated: every rank routes its own tokens
        return ShardLayout.replicated((cfg.num_moe_experts, H))
    if leaf in ("router.expert_bias", "router.bias"):
        return ShardLayout.replicated((cfg.num_moe_experts,))
    if leaf == "shared_expert_gate.weight":
        return ShardLayout.replicated((1, H))
    if leaf.endswith("layernorm.weight"):
        size = hd if ("q_layernorm" in leaf or "k_layernorm" in leaf) else H
        return ShardLayout.replicated((size,))
    raise KeyError(f"no shard layout for parameter {name!r}")


def layer_param_names(cfg: ModelConfig, i: int) -> list[str]:
    p = f"decoder.layers.{i}."
    if cfg.is_mla:
        names = [p + "input_layernorm.weight"] + [p + "self_attention." + leaf for leaf in _mla_shapes(cfg)]
        names.append(p + "pre_mlp_layernorm.weight")
        return names + _mlp_param_names(cfg, i)
    if cfg.token_mixer_for_layer(i) == "gated_deltanet":
        names = [p + "input_layernorm.weight"] + [p + "self_attention." + leaf for leaf in _DELTANET_LEAVES]
        return names + [p + "pre_mlp_layernorm.weight"] + _mlp_param_names(cfg, i)
    names = [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight"]
    if cfg.add_qkv_bias:
        names.append(p + "self_attention.linear_qkv.bias")
    if cfg.qk_layernorm:
        names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
    if cfg.attention_sinks:
        names.append(p + "self_attention.sinks")
    names.append(p + "self_attention.linear_proj.weight")
    if cfg.add_proj_bias:
        names.append(p + "self_attention.linear_proj.bias")
    names.append(p + "pre_mlp_layernorm.weight")
    return names + _mlp_param_names(cfg, i)


def _mlp_param_names(cfg: ModelConfig, i: int) -> list[str]:
    p, names = f"decoder.layers.{i}.", []
    if i in cfg.moe_layers:
        names.append(p + "mlp.router.weight")
        if cfg.moe_router_expert_bias:
            names.append(p + "mlp.router.expert_bias")
        if cfg.moe_router_bias:
            names.append(p + "mlp.router.bias")
        # in the model's own order (fc1's weight and bias, then fc2's): the planner's buckets follow it
        for fc in ("linear_fc1", "linear_fc2"):
            names.append(p + f"mlp.experts.{fc}.weight")
            if cfg.moe_expert_bias:
                names.append(p + f"mlp.experts.{fc}.bias")
        if cfg.moe_shared_expert_ffn_hidden_size:
            names += [p + "mlp.shared_expert.linear_fc1.weight", p + "mlp.shared_expert.linear_fc2.weight"]
            if cfg.moe_shared_expert_gate:
                names.append(p + "mlp.shared_expert_gate.weight")
    else:
        names += [p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    return names


def lora_layout(name: str, cfg: ModelConfig, rank: int, tp: int, tp_rank: int, **expert) -> ShardLayout:
    """Layout of an adapter `<layer>.lora.A` [r, in] or `<layer>.lora.B` [out, r] (experts:
    [experts, r, in], [experts, out, r]): each follows its layer's split (parallel/lora.py) and
    is replicated where the layer's other side is split."""
    layer, which = name.rsplit(".lora.", 1)
    base = shard_layout(layer + ".weight", cfg, tp, tp_rank, **expert)
    shape, outer = base.canonical_shape, base.outer
    out_dim, in_dim = len(shape) - 2, len(shape) - 1
    lead = shape[:-2]
    canonical = (*lead, rank, shape[-1]) if which == "A" else (*lead, shape[-2], rank)
    if base.dim == out_dim:  # column-parallel: B split like the weight's rows, A whole
        if which == "B":
            return ShardLayout(canonical, out_dim, base.ranges, base.pad, outer)
        return ShardLayout(canonical, out_dim, ((0, rank),), 0, outer)
    if which == "A":  # row-parallel (base.dim == in_dim): A split like the weight's columns, B whole
        return ShardLayout(canonical, in_dim, base.ranges, 0, outer)
    return ShardLayout(canonical, out_dim, ((0, shape[-2]),), 0, outer)


def layout_on(name: str, cfg: ModelConfig, st, lora_rank: int = 0, tp_rank: int | None = None) -> ShardLayout:
    """`shard_layout` (or `lora_layout`) at the coordinates of a ParallelState, or of another tp
    rank of its grid."""
    tp_rank = st.tp_rank if tp_rank is None else tp_rank
    expert = dict(ep=st.ep_size, ep_rank=st.ep_rank, etp=st.etp_size, etp_rank=st.etp_rank)
    if ".lora." in name:
        return lora_layout(name, cfg, lora_rank, st.tp_size, tp_rank, **expert)
    return shard_layout(name, cfg, st.tp_size, tp_rank, **expert)


def canonical_names(cfg: ModelConfig) -> list[list[str]]:
    """Every parameter of the whole model, grouped so a group (a layer) can be streamed at once."""
    groups = [["embedding.word_embeddings.weight"]]
    groups += [layer_param_names(cfg, i) for i in range(cfg.num_layers)]
    groups.append(["decoder.final_layernorm.weight"] + ([] if cfg.tie_word_embeddings else ["output_layer.weight"]))
    return groups


# -- local tensors <-> boxes of the canonical tensor ------------------------------------------------
def fill_from_canonical(read: Callable[[Box, Box], torch.Tensor], layout: ShardLayout) -> torch.Tensor:
    pieces = [read(offsets, sizes) for offsets, sizes in layout.boxes()]
    if layout.pad:
        shape = list(layout.local_shape)
        shape[layout.dim] = layout.pad
        ref = pieces[0] if pieces else None
        pieces.append(torch.zeros(shape, dtype=ref.dtype if ref is not None else torch.float32))
    return torch.cat(pieces, dim=layout.dim) if len(pieces) > 1 else pieces[0]


def local_pieces(local: torch.Tensor, layout: ShardLayout) -> list[tuple[Box, torch.Tensor]]:
    """(canonical offsets, view of `local`) for every range the rank holds; the padding rows are
    left out because they are not part of the canonical tensor."""
    out, at = [], 0
    for (offsets, _), (_, n) in zip(layout.boxes(), layout.ranges):
        out.append((offsets, local.narrow(layout.dim, at, n)))
        at += n
    return out


def box_of(full: torch.Tensor, offsets: Box, sizes: Box) -> torch.Tensor:
    return full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
