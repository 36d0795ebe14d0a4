"""Model families as data: how an HF config maps to ModelConfig and HF tensors to canonical ones.

Adding a family is adding a FamilySpec (and a test). Nothing else in the code branches on the
family name. The four dense families share HF's Llama tensor names, so they share one weight map
and differ only in config rules (QKV bias, q/k norms, sliding window). A spec also names the
modules its layers are made of (token mixer, MLPs, MoE router: models/blocks.py and
models/routers.py); a new architecture adds modules there and names them here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from megaswift.errors import CheckpointError
from megaswift.models.config import ModelConfig


@dataclass(frozen=True)
class HFKey:
    """Read `key` (or the first of `aliases` present) from config.json, or use `default` when
    it is absent or null; a key with no default (None) is required. Export writes `key`."""
    key: str
    default: object = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Segment:
    """Canonical rows [canon_start, canon_start + length) come from HF rows [hf_start, ...)."""
    canon_start: int
    length: int
    hf_name: str
    hf_start: int


@dataclass(frozen=True)
class Rearranged:
    """A canonical expert tensor stored whole in one HF tensor in another arrangement, expert by
    expert (gpt-oss: [experts, in, out] with gate and up interleaved, where megaswift holds
    [experts, out, in] with [gate; up] rows). `to_canonical` / `to_hf` map a run of experts
    [n, ...] between the two; both are exact (index moves only). Conversion reads whole experts
    of it and takes the canonical box from them."""
    hf_name: str
    to_canonical: object
    to_hf: object


@dataclass(frozen=True)
class Derived:
    """A ModelConfig field computed from several config.json keys; export writes those keys back
    verbatim (they stay in extra_hf_config), not this field."""
    fn: object


@dataclass(frozen=True)
class MoENames:
    """Where an MoE layer's tensors live in HF checkpoints: `<block>gate.weight` is the router
    (`<block>gate.e_score_correction_bias` its expert bias), `<block>experts.<e>.<gate|up|
    down>.weight` the experts (the hub's per-expert layout), `<block><shared>` the shared
    expert's MLP and `<block>shared_expert_gate.weight` its gate."""
    block: str
    gate: str
    up: str
    down: str
    shared: str = "shared_expert."
    router: str = "gate"
    """`<block><router>.weight` is the router (gpt-oss: `router`, with a `.bias`)."""
    interleaved: bool = False
    """gpt-oss's expert tensors: `<block>experts.gate_up_proj` [experts, hidden, 2 x width] (in x
    out, gate and up columns interleaved), its bias `gate_up_proj_bias` [experts, 2 x width],
    `<block>experts.down_proj` [experts, width, hidden] and `down_proj_bias` (see Rearranged)."""

    def expert(self, prefix: str, e: int, which: str) -> str:
        return f"{prefix}{self.block}experts.{e}.{getattr(self, which)}.weight"


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]
    architecture: str
    """The HF class written into an exported config.json."""
    flags: dict = field(default_factory=dict)
    """ModelConfig fields that differ per family: a constant, an HFKey or a Derived."""
    moe: MoENames | None = None
    """Tensor names of the MoE layers, for families with experts."""
    token_mixer: str = "gqa"
    """Every layer's token mixer (models/blocks.py TOKEN_MIXERS)."""
    dense_mlp: str = "swiglu"
    """The MLP of layers without experts (models/blocks.py MLPS)."""
    moe_mlp: str = "moe"
    """The MLP of layers with experts (models/blocks.py MLPS)."""
    router: str = "softmax_topk"
    """The router of MoE layers (models/routers.py ROUTERS)."""
    hf_prefix: str = "model."
    """Where the language model's tensors live: `<hf_prefix>embed_tokens.weight`,
    `<hf_prefix>layers.<i>.`, `<hf_prefix>norm.weight` (`lm_head.weight` beside it)."""
    text_config: str | None = None
    """A multimodal checkpoint's config.json nests the language model's config under this key
    (Qwen3.5: `text_config`); megaswift trains that model and exports the config as it was."""
    passthrough: tuple[str, ...] = ()
    """Prefixes of tensors kept verbatim besides the MTP layers (Qwen: `mtp.`; Qwen3.5's vision
    tower `model.visual.`): see passthrough_prefixes."""
    split_linear_projections: bool = False
    """Gated DeltaNet's input projections stored as Qwen3.5 does (in_proj_qkv = [all q; all k; all
    v], in_proj_z, in_proj_b, in_proj_a) instead of Qwen3-Next's per-key-head in_proj_qkvz and
    in_proj_ba; megaswift holds the latter layout either way (see _deltanet_segments)."""

    def language_config(self, hf: dict) -> dict:
        """The config.json keys of the language model: the file's own, or for a multimodal
        checkpoint its `text_config`, with the top level's tie_word_embeddings (which is what
        transformers' ForConditionalGeneration ties by)."""
        if self.text_config is None:
            return hf
        text = hf.get(self.text_config)
        if not isinstance(text, dict):
            raise CheckpointError(f"a {self.name} config.json nests the language model's config under "
                                  f"{self.text_config!r}, and this one has none; restore config.json from the "
                                  "original checkpoint")
        text = dict(text)
        if "tie_word_embeddings" in hf:
            text["tie_word_embeddings"] = hf["tie_word_embeddings"]
        return text

    def passthrough_prefixes(self, hf: dict) -> tuple[str, ...]:
        """Name prefixes of HF tensors megaswift does not train but must keep: import stores them
        verbatim beside the checkpoint and export writes them back (convert/passthrough.py). The
        multi-token-prediction layers of DeepSeek-V3 / GLM-4.5 (`num_nextn_predict_layers`,
        stored as the layers after the last decoder layer), which serving engines use for
        speculative decoding and transformers ignores, and the family's own `passthrough`
        prefixes (Qwen3-Next's and Qwen3.5's `mtp.*`, Qwen3.5's vision tower)."""
        text = self.language_config(hf)
        n_mtp = text.get("num_nextn_predict_layers") or text.get("num_mtp_layers") or 0
        layers = text.get("num_hidden_layers", 0)
        return tuple(f"{self.hf_prefix}layers.{layers + i}." for i in range(n_mtp)) + self.passthrough

    def required_keys(self) -> list[str]:
        """config.json keys without which the model's shape is unknown."""
        flags = [r.key for r in self.flags.values() if isinstance(r, HFKey) and r.default is None]
        return [*_REQUIRED_HF_KEYS, *flags]

    def model_config(self, hf: dict, make_vocab_size_divisible_by: int = 128,
                     source: str = "config.json") -> ModelConfig:
        """`source` names the file in errors."""
        outer, hf = hf, self.language_config(hf)
        aliases = {r.key: r.aliases for r in self.flags.values() if isinstance(r, HFKey)}
        missing = [k for k in self.required_keys()
                   if all(hf.get(a) is None for a in (k, *aliases.get(k, ())))]
        if missing:
            raise CheckpointError(f"{source} lacks {', '.join(missing)}, which a {self.name} checkpoint needs; "
                                  "restore config.json from the original checkpoint")
        heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        # transformers >= 5 keeps partial_rotary_factor among the rope parameters, older
        # configs (GLM-4.5's published one) at the top level
        rotary_fraction = rope.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor") or 1.0
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        flags = {k: _resolve_rule(v, hf) for k, v in self.flags.items()}
        unsupported = [k for k in ("mlp_bias", "router_jitter_noise") if hf.get(k)]
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):
            unsupported.append(f"hidden_act={hf['hidden_act']}")
        if unsupported:
            raise CheckpointError(f"{self.name} checkpoints with {', '.join(unsupported)} are not supported")
        fields = dict(
            family=self.name,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
            norm_epsilon=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope or None,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            init_method_std=hf.get("initializer_range", 0.02),
            # HF stores null here when a family's use_sliding_window is off; layer_types (newer
            # configs) says which layers slide, and without it every layer slides (Mistral).
            sliding_window=hf.get("sliding_window"),
            layer_types=hf.get("layer_types"),
            # a nested config is kept whole: export writes it back as it was (hf_config)
            extra_hf_config=({k: v for k, v in hf.items() if k not in _DERIVED_HF_KEYS}
                             if self.text_config is None else dict(outer)),
            token_mixer=self.token_mixer,
            dense_mlp=self.dense_mlp,
            moe_mlp=self.moe_mlp,
            moe_router=self.router,
            rotary_fraction=float(rotary_fraction),
        )
        fields.update(flags)  # a family's rules override the common reading (MLA's head dims)
        return ModelConfig(**fields)

    def hf_config(self, cfg: ModelConfig, dtype: str) -> dict:
        """config.json for an exported checkpoint: the source's own keys plus the model's maths.
        A nested (multimodal) config is the source's, as it was, in the export's dtype: training
        changes no key of it, and rewriting its text part would lose what megaswift does not
        model (Qwen3.5's multimodal RoPE sections, the vision config)."""
        if self.text_config is not None:
            hf = copy.deepcopy(cfg.extra_hf_config)
            for part in (hf, hf.get(self.text_config) or {}):  # the dtype keys it has (newer: dtype)
                part.update({k: dtype for k in ("torch_dtype", "dtype") if k in part} or {"dtype": dtype})
            return hf
        hf = dict(cfg.extra_hf_config)
        rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
        if cfg.rotary_fraction != 1.0:
            rope["partial_rotary_factor"] = hf["partial_rotary_factor"] = cfg.rotary_fraction
        # a checkpoint keeps the model_type and architectures it came with (Kimi-K2: kimi_k2 over
        # DeepseekV3ForCausalLM), and its auto_map with them
        hf.setdefault("architectures", [self.architecture])
        hf.setdefault("model_type", self.model_types[0])
        hf.update(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_query_groups, head_dim=cfg.kv_channels, rms_norm_eps=cfg.norm_epsilon,
            # transformers >= 5 reads rope_parameters, older releases rope_theta/rope_scaling
            rope_parameters=rope, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
            max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
            sliding_window=cfg.sliding_window, torch_dtype=dtype, dtype=dtype,
        )
        if cfg.is_mla:  # transformers' DeepseekV3Config: head_dim is the rope part
            hf["head_dim"] = cfg.qk_rope_head_dim
        if cfg.layer_types is not None:
            hf["layer_types"] = cfg.layer_types
        for field_name, rule in self.flags.items():
            if isinstance(rule, HFKey):
                hf[rule.key] = getattr(cfg, field_name)
        return hf

    # -- weights -------------------------------------------------------------------------------
    def segments(self, name: str, cfg: ModelConfig) -> list[Segment]:
        """Where the rows of canonical tensor `name` come from in the HF checkpoint."""
        if name in _TOP_LEVEL:
            hf = _TOP_LEVEL[name].replace("model.", self.hf_prefix, 1)
            return [Segment(0, _rows(name, cfg), hf, 0)]
        parts = name.split(".")  # decoder.layers.<i>.<module path>
        i, local = parts[2], ".".join(parts[3:])
        prefix = f"{self.hf_prefix}layers.{i}."
        if cfg.is_mla and local in _MLA_NAMES:
            return [Segment(0, _rows(name, cfg), prefix + _MLA_NAMES[local], 0)]
        if self.split_linear_projections and local in _SPLIT_DELTANET:
            return _SPLIT_DELTANET[local](cfg, prefix + "linear_attn.")
        if local in _DELTANET_NAMES:
            return [Segment(0, _rows(name, cfg), prefix + _DELTANET_NAMES[local], 0)]
        if local in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            return _qkv_segments(cfg, prefix + "self_attn.", local.rsplit(".", 1)[1])
        if local.startswith(("mlp.router.", "mlp.experts.", "mlp.shared_expert")):
            return self._moe_segments(local, prefix, cfg)
        if local == "mlp.linear_fc1.weight":
            f = cfg.ffn_hidden_size
            return [Segment(0, f, prefix + "mlp.gate_proj.weight", 0), Segment(f, f, prefix + "mlp.up_proj.weight", 0)]
        if local not in _LAYER_NAMES:
            raise KeyError(f"{self.name}: no HF source for {name!r}")
        return [Segment(0, _rows(name, cfg), prefix + _LAYER_NAMES[local], 0)]

    def _moe_segments(self, local: str, prefix: str, cfg: ModelConfig) -> list[Segment]:
        """Expert tensors are 3-D [experts, rows, cols]; segments index their rows flattened
        to [experts x rows, cols], so expert e's rows start at e x rows."""
        names, E, F, H = self.moe, cfg.num_moe_experts, cfg.moe_ffn_hidden_size, cfg.hidden_size
        if names is None:
            raise KeyError(f"{self.name}: family has no experts, but the model asks for {local!r}")
        if local == "mlp.router.weight":
            return [Segment(0, E, f"{prefix}{names.block}{names.router}.weight", 0)]
        if local == "mlp.router.bias":
            return [Segment(0, E, f"{prefix}{names.block}{names.router}.bias", 0)]
        if names.interleaved and local in _INTERLEAVED:
            hf, to_canonical, to_hf = _INTERLEAVED[local]
            return [Rearranged(f"{prefix}{names.block}experts.{hf}", to_canonical, to_hf)]
        if local == "mlp.router.expert_bias":
            return [Segment(0, E, f"{prefix}{names.block}gate.e_score_correction_bias", 0)]
        # experts stored fused (ModelConfig.hf_fused_experts): the same [gate; up] rows per expert
        if cfg.hf_fused_experts and local == "mlp.experts.linear_fc1.weight":
            return [Segment(0, E * 2 * F, f"{prefix}{names.block}experts.gate_up_proj", 0)]
        if cfg.hf_fused_experts and local == "mlp.experts.linear_fc2.weight":
            return [Segment(0, E * H, f"{prefix}{names.block}experts.down_proj", 0)]
        if local == "mlp.experts.linear_fc1.weight":
            return [Segment(e * 2 * F + half * F, F, names.expert(prefix, e, which), 0)
                    for e in range(E) for half, which in enumerate(("gate", "up"))]
        if local == "mlp.experts.linear_fc2.weight":
            return [Segment(e * H, H, names.expert(prefix, e, "down"), 0) for e in range(E)]
        shared, S = f"{prefix}{names.block}{names.shared}", cfg.moe_shared_expert_ffn_hidden_size
        if local == "mlp.shared_expert.linear_fc1.weight":
            return [Segment(0, S, shared + "gate_proj.weight", 0), Segment(S, S, shared + "up_proj.weight", 0)]
        if local == "mlp.shared_expert.linear_fc2.weight":
            return [Segment(0, H, shared + "down_proj.weight", 0)]
        if local == "mlp.shared_expert_gate.weight":
            return [Segment(0, 1, f"{prefix}{names.block}shared_expert_gate.weight", 0)]
        raise KeyError(f"{self.name}: no HF source for {local!r}")


def _deinterleave(t):
    """[..., 2F] with gate and up alternating -> [..., gate; up]."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)


def _interleave(t):
    """[..., gate; up] -> [..., 2F] with gate and up alternating."""
    gate, up = t.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


# gpt-oss's expert tensors (MoENames.interleaved): canonical name -> (HF tensor, to canonical, to HF)
_INTERLEAVED = {
    "mlp.experts.linear_fc1.weight": ("gate_up_proj", lambda t: _deinterleave(t).transpose(1, 2),
                                      lambda t: _interleave(t.transpose(1, 2))),
    "mlp.experts.linear_fc1.bias": ("gate_up_proj_bias", _deinterleave, _interleave),
    "mlp.experts.linear_fc2.weight": ("down_proj", lambda t: t.transpose(1, 2), lambda t: t.transpose(1, 2)),
    "mlp.experts.linear_fc2.bias": ("down_proj_bias", lambda t: t, lambda t: t),
}

_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

_DERIVED_HF_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "tie_word_embeddings", "attention_bias", "sliding_window", "layer_types",
    "transformers_version", "torch_dtype", "dtype", "partial_rotary_factor",
}

# multi-latent attention (models/mla.py): megaswift (Megatron-Core) name -> HF DeepseekV3 name
_MLA_NAMES = {
    "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
    "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
    "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
}

_TOP_LEVEL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}

_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.linear_proj.bias": "self_attn.o_proj.bias",
    "self_attention.sinks": "self_attn.sinks",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


# HF tensors with a singleton middle dim that megaswift holds without it: a depthwise Conv1d's
# weight [channels, 1, K] is [channels, K] inside megaswift; conversion adds and drops the 1
SQUEEZED_HF_SUFFIXES = ("conv1d.weight",)


# fused expert tensors (ModelConfig.hf_fused_experts): 3-D [experts, rows, cols], which segments index as
# [experts x rows, cols]
FUSED_EXPERT_SUFFIXES = ("experts.gate_up_proj", "experts.down_proj")


def hf_shape(hf_name: str, shape: tuple[int, ...], cfg: ModelConfig | None = None) -> tuple[int, ...]:
    """The HF shape of a tensor whose rows megaswift's segments index as `shape` (2-D)."""
    if hf_name.endswith(SQUEEZED_HF_SUFFIXES) and len(shape) == 2:
        return (shape[0], 1, shape[1])
    if hf_name.endswith(FUSED_EXPERT_SUFFIXES) and len(shape) == 2 and cfg is not None:
        E = cfg.num_moe_experts
        return (E, shape[0] // E, shape[1])
    return tuple(shape)


def _rows(name: str, cfg: ModelConfig) -> int:
    from megaswift.models.sharding import flat_rows, shard_layout

    return flat_rows(shard_layout(name, cfg, 1, 0).canonical_shape)[0]


def _resolve_rule(rule, hf: dict):
    if isinstance(rule, HFKey):
        for key in (rule.key, *rule.aliases):
            if hf.get(key) is not None:
                return hf[key]
        return rule.default
    if isinstance(rule, Derived):
        return rule.fn(hf)
    return rule


def _qwen3_moe_layers(hf: dict) -> list[int]:  # Qwen2-MoE's rule too
    """transformers' rule: a layer has experts unless it is in mlp_only_layers, and only every
    decoder_sparse_step-th layer (1-based) does."""
    step, dense = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or [])
    return [i for i in range(hf["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0]


def _qkv_segments(cfg: ModelConfig, attn: str, kind: str) -> list[Segment]:
    """Megatron groups QKV per query group: [q heads of group g, k_g, v_g] for each g. With
    attn_output_gate a query head's rows are [query, gate], as in HF's q_proj."""
    from megaswift.models.sharding import query_rows_per_head

    hd, qpg, qh = cfg.kv_channels, cfg.queries_per_group, query_rows_per_head(cfg)
    out, row = [], 0
    for g in range(cfg.num_query_groups):
        out.append(Segment(row, qpg * qh, f"{attn}q_proj.{kind}", g * qpg * qh))
        out.append(Segment(row + qpg * qh, hd, f"{attn}k_proj.{kind}", g * hd))
        out.append(Segment(row + qpg * qh + hd, hd, f"{attn}v_proj.{kind}", g * hd))
        row += qpg * qh + 2 * hd
    return out


# Gated DeltaNet (models/deltanet.py): megaswift name -> HF Qwen3NextGatedDeltaNet name
_DELTANET_NAMES = {
    "self_attention.in_proj_qkvz.weight": "linear_attn.in_proj_qkvz.weight",
    "self_attention.in_proj_ba.weight": "linear_attn.in_proj_ba.weight",
    "self_attention.conv1d.weight": "linear_attn.conv1d.weight",
    "self_attention.dt_bias": "linear_attn.dt_bias",
    "self_attention.A_log": "linear_attn.A_log",
    "self_attention.out_norm.weight": "linear_attn.norm.weight",
    "self_attention.out_proj.weight": "linear_attn.out_proj.weight",
}


def _split_qkvz(cfg: ModelConfig, attn: str) -> list[Segment]:
    """Qwen3.5's in_proj_qkv ([q of every key head; k of every key head; v of every value head])
    and in_proj_z, regrouped per key head as megaswift (and Qwen3-Next) holds them: [q_h, k_h,
    v of its r value heads, z of them] for each key head h."""
    hk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // hk
    out, row = [], 0
    for h in range(hk):
        for length, name, start in ((dk, "in_proj_qkv", h * dk), (dk, "in_proj_qkv", hk * dk + h * dk),
                                    (r * dv, "in_proj_qkv", 2 * hk * dk + h * r * dv),
                                    (r * dv, "in_proj_z", h * r * dv)):
            out.append(Segment(row, length, f"{attn}{name}.weight", start))
            row += length
    return out


def _split_ba(cfg: ModelConfig, attn: str) -> list[Segment]:
    """Qwen3.5's in_proj_b and in_proj_a (one row per value head), as [b of key head h's r value
    heads, a of them] for each key head h."""
    hk = cfg.linear_num_key_heads
    r = cfg.linear_num_value_heads // hk
    return [Segment(h * 2 * r + i * r, r, f"{attn}{name}.weight", h * r)
            for h in range(hk) for i, name in enumerate(("in_proj_b", "in_proj_a"))]


_SPLIT_DELTANET = {
    "self_attention.in_proj_qkvz.weight": _split_qkvz,
    "self_attention.in_proj_ba.weight": _split_ba,
}


_ATTN_BIAS = HFKey("attention_bias", False)

def _hybrid_layer_types(hf: dict) -> list[str]:
    """Qwen3-Next / Qwen3.5: layer_types as written, else transformers' rule (the published
    Qwen3-Next config has only full_attention_interval): every interval-th layer full attention,
    the others linear."""
    if hf.get("layer_types"):
        return hf["layer_types"]
    n = hf.get("full_attention_interval") or 4
    return ["linear_attention" if (i + 1) % n else "full_attention" for i in range(hf["num_hidden_layers"])]


_LINEAR_ATTENTION = {  # Gated DeltaNet's shape (Qwen3-Next, Qwen3.5)
    "linear_num_key_heads": HFKey("linear_num_key_heads"), "linear_num_value_heads": HFKey("linear_num_value_heads"),
    "linear_key_head_dim": HFKey("linear_key_head_dim"), "linear_value_head_dim": HFKey("linear_value_head_dim"),
    "linear_conv_kernel_dim": HFKey("linear_conv_kernel_dim", 4), "layer_types": Derived(_hybrid_layer_types),
}


def _dense_first_layers(hf: dict) -> list[int]:
    """DeepSeek-V3 / GLM-4.5 (transformers' rule): the first first_k_dense_replace layers are
    dense, every later one has experts."""
    return list(range(hf.get("first_k_dense_replace") or 0, hf["num_hidden_layers"]))


def _shared_width(hf: dict) -> int:
    """n_shared_experts shared experts are stored as one MLP of their summed width."""
    return (hf.get("n_shared_experts") or 0) * hf["moe_intermediate_size"]


# the sigmoid, group-limited router with an expert bias and ungated shared experts (DeepSeek-V3,
# Kimi-K2, GLM-4.5)
_GROUP_ROUTED = {
    "num_moe_experts": HFKey("n_routed_experts", aliases=("num_local_experts",)),
    "moe_ffn_hidden_size": HFKey("moe_intermediate_size"), "moe_router_topk": HFKey("num_experts_per_tok"),
    "moe_norm_topk_prob": HFKey("norm_topk_prob", True), "moe_router_num_groups": HFKey("n_group", 1),
    "moe_router_group_topk": HFKey("topk_group", 1), "moe_router_scaling_factor": HFKey("routed_scaling_factor", 1.0),
    "moe_router_expert_bias": True, "moe_shared_expert_ffn_hidden_size": Derived(_shared_width),
    "moe_shared_expert_gate": False, "moe_layer_ids": Derived(_dense_first_layers),
}

_MLA = {
    "q_lora_rank": Derived(lambda hf: hf.get("q_lora_rank")),  # null: a plain query projection
    "kv_lora_rank": HFKey("kv_lora_rank"), "qk_nope_head_dim": HFKey("qk_nope_head_dim"),
    "qk_rope_head_dim": HFKey("qk_rope_head_dim"), "v_head_dim": HFKey("v_head_dim"),
    # the published DeepSeek-V3 config has no rope_interleave key; its weights are interleaved,
    # which transformers' default (True) assumes
    "rope_interleave": HFKey("rope_interleave", True),
    "kv_channels": Derived(lambda hf: hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]),
    "add_proj_bias": _ATTN_BIAS,  # models/mla.py refuses it: no published MLA model has one
    "num_query_groups": Derived(lambda hf: hf["num_attention_heads"]),
}

_ROUTER_LOSS = {"moe_aux_loss_coef": HFKey("router_aux_loss_coef", 0.001),
                "moe_output_router_logits": HFKey("output_router_logits", False)}

_QWEN35_TEXT = {"add_qkv_bias": _ATTN_BIAS, "add_proj_bias": _ATTN_BIAS, "qk_layernorm": True,
                "attn_output_gate": True, "norm_zero_centered": True, **_LINEAR_ATTENTION}
_QWEN35_LAYOUT = dict(hf_prefix="model.language_model.", text_config="text_config",
                      passthrough=("mtp.", "model.visual."), split_linear_projections=True)

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec for spec in (
        FamilySpec("llama", ("llama",), "LlamaForCausalLM",
                   {"add_qkv_bias": _ATTN_BIAS, "add_proj_bias": _ATTN_BIAS}),
        FamilySpec("qwen2", ("qwen2",), "Qwen2ForCausalLM",
                   {"add_qkv_bias": True}),
        FamilySpec("qwen3", ("qwen3",), "Qwen3ForCausalLM",
                   {"add_qkv_bias": _ATTN_BIAS, "add_proj_bias": _ATTN_BIAS, "qk_layernorm": True}),
        FamilySpec("mistral", ("mistral",), "MistralForCausalLM"),
        FamilySpec("qwen3_moe", ("qwen3_moe",), "Qwen3MoeForCausalLM",
                   {"add_qkv_bias": _ATTN_BIAS, "add_proj_bias": _ATTN_BIAS, "qk_layernorm": True,
                    "num_moe_experts": HFKey("num_experts", aliases=("num_local_experts",)), "moe_ffn_hidden_size": HFKey("moe_intermediate_size"),
                    "moe_router_topk": HFKey("num_experts_per_tok"), "moe_norm_topk_prob": HFKey("norm_topk_prob", False),
                    "moe_layer_ids": Derived(_qwen3_moe_layers), **_ROUTER_LOSS},
                   moe=MoENames("mlp.", "gate_proj", "up_proj", "down_proj")),
        FamilySpec("qwen2_moe", ("qwen2_moe",), "Qwen2MoeForCausalLM",
                   {"add_qkv_bias": HFKey("qkv_bias", True), "num_moe_experts": HFKey("num_experts", aliases=(
                       "num_local_experts",)), "moe_ffn_hidden_size": HFKey("moe_intermediate_size"),
                    "moe_router_topk": HFKey("num_experts_per_tok"), "moe_norm_topk_prob": HFKey("norm_topk_prob", False),
                    "moe_shared_expert_ffn_hidden_size": HFKey("shared_expert_intermediate_size", 0),
                    "moe_layer_ids": Derived(_qwen3_moe_layers), **_ROUTER_LOSS},
                   moe=MoENames("mlp.", "gate_proj", "up_proj", "down_proj")),
        # DeepSeek-V3 / R1; Kimi-K2 is this architecture under model_type kimi_k2 (family_for
        # finds it by its architectures, export keeps its model_type and auto_map)
        FamilySpec("deepseek_v3", ("deepseek_v3",), "DeepseekV3ForCausalLM", {**_MLA, **_GROUP_ROUTED},
                   moe=MoENames("mlp.", "gate_proj", "up_proj", "down_proj", shared="shared_experts."),
                   token_mixer="mla", router="sigmoid_group"),
        # GLM-4.5 / 4.5-Air: GQA with partial RoPE, QKV bias (o_proj never has one), optional
        # q/k norms, and DeepSeek-V3's router and shared experts
        FamilySpec("glm4_moe", ("glm4_moe",), "Glm4MoeForCausalLM",
                   {"add_qkv_bias": _ATTN_BIAS, "qk_layernorm": HFKey("use_qk_norm", False), **_GROUP_ROUTED},
                   moe=MoENames("mlp.", "gate_proj", "up_proj", "down_proj", shared="shared_experts."),
                   router="sigmoid_group"),
        # Qwen3-Next: Gated DeltaNet in the layers layer_types calls linear_attention, gated
        # attention with q/k norms and partial RoPE in the others, zero-centred norms, and
        # Qwen2-MoE's experts beside a sigmoid-gated shared expert
        FamilySpec("qwen3_next", ("qwen3_next",), "Qwen3NextForCausalLM",
                   {"add_qkv_bias": _ATTN_BIAS, "add_proj_bias": _ATTN_BIAS, "qk_layernorm": True,
                    "attn_output_gate": True, "norm_zero_centered": True, **_LINEAR_ATTENTION,
                    "num_moe_experts": HFKey("num_experts"), "moe_ffn_hidden_size": HFKey("moe_intermediate_size"),
                    "moe_router_topk": HFKey("num_experts_per_tok"), "moe_norm_topk_prob": HFKey("norm_topk_prob", True),
                    "moe_shared_expert_ffn_hidden_size": HFKey("shared_expert_intermediate_size", 0),
                    "moe_layer_ids": Derived(_qwen3_moe_layers), **_ROUTER_LOSS},
                   moe=MoENames("mlp.", "gate_proj", "up_proj", "down_proj"), passthrough=("mtp.",)),
        # Qwen3.5: Qwen3-Next's layers inside a multimodal checkpoint (text_config; the vision
        # tower and the MTP layer kept verbatim), DeltaNet's in-projections stored split; the
        # MoE variant has fused experts, every layer routed, top-k always renormalised
        FamilySpec("qwen3_5", ("qwen3_5",), "Qwen3_5ForConditionalGeneration", {**_QWEN35_TEXT},
                   **_QWEN35_LAYOUT),
        FamilySpec("qwen3_5_moe", ("qwen3_5_moe",), "Qwen3_5MoeForConditionalGeneration",
                   {**_QWEN35_TEXT, "num_moe_experts": HFKey("num_experts"),
                    "moe_ffn_hidden_size": HFKey("moe_intermediate_size"), "moe_router_topk": HFKey("num_experts_per_tok"),
                    "moe_norm_topk_prob": True,
                    "moe_shared_expert_ffn_hidden_size": HFKey("shared_expert_intermediate_size", 0),
                    "moe_layer_ids": Derived(lambda hf: list(range(hf["num_hidden_layers"]))), **_ROUTER_LOSS},
                   moe=MoENames("mlp.", "gate_proj", "up_proj", "down_proj"), **_QWEN35_LAYOUT),
        # gpt-oss: sliding-window layers alternating with full ones, attention sinks and biases,
        # YaRN; every layer routed: a router with a bias, softmax over the chosen logits,
        # experts with biases and a clamped SwiGLU, stored [experts, in, out] with gate and up
        # interleaved (MoENames.interleaved); MXFP4 checkpoints read through convert/mxfp4.py
        FamilySpec("gpt_oss", ("gpt_oss",), "GptOssForCausalLM",
                   {"add_qkv_bias": HFKey("attention_bias", True), "add_proj_bias": HFKey("attention_bias", True),
                    "attention_sinks": True, "num_moe_experts": HFKey("num_local_experts"),
                    "moe_ffn_hidden_size": HFKey("intermediate_size"), "moe_router_topk": HFKey("num_experts_per_tok"),
                    "moe_norm_topk_prob": True, "moe_router_bias": True, "moe_expert_bias": True,
                    "moe_activation": "clamped_swiglu", "moe_swiglu_limit": HFKey("swiglu_limit", 7.0),
                    "moe_swiglu_alpha": HFKey("swiglu_alpha", 1.702), **_ROUTER_LOSS},
                   moe=MoENames("mlp.", "gate_proj", "up_proj", "down_proj", router="router", interleaved=True)),
        FamilySpec("mixtral", ("mixtral",), "MixtralForCausalLM",
                   {"num_moe_experts": HFKey("num_local_experts"), "moe_ffn_hidden_size": HFKey("intermediate_size"),
                    "moe_router_topk": HFKey("num_experts_per_tok"), "moe_norm_topk_prob": True, **_ROUTER_LOSS},
                   moe=MoENames("block_sparse_moe.", "w1", "w3", "w2")),
    )
}


def family_for(hf_config: dict) -> FamilySpec:
    """The family of a config.json: by its model_type, else (a model_type of its own over a known
    architecture, as Kimi-K2's kimi_k2 over DeepseekV3ForCausalLM) by its architectures.
    megaswift never runs a checkpoint's own code (auto_map); it only reads its tensors."""
    model_type = hf_config.get("model_type")
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    architectures = hf_config.get("architectures") or []
    if not known_to_transformers(model_type):  # a model_type transformers knows is what it says
        for spec in FAMILIES.values():
            if spec.architecture in architectures:
                return spec
    supported = ", ".join(t for s in FAMILIES.values() for t in s.model_types)
    raise CheckpointError(f"unsupported model_type {model_type!r} (architectures {architectures}); "
                          f"supported: {supported}")


def known_to_transformers(model_type) -> bool:
    """Whether transformers has a config class for this model_type (else the checkpoint relies on
    its own code, which megaswift never runs)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING
