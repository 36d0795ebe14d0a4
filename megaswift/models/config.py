"""ModelConfig: the decoder's hyper-parameters in Megatron's vocabulary.

Families (megaswift/convert/families.py) build it from a Hugging Face config.json; presets can
build it directly. Only what changes the maths lives here; parallel degrees live in the layout.
Which modules a layer is made of (token mixer, MLP, router) is named here and looked up in
models/blocks.py and models/routers.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(kw_only=True)
class ModelConfig:
    family: str
    """Name of the family spec (llama, qwen2, qwen3, mistral): decides conversion, not maths."""
    vocab_size: int
    """Real vocabulary size; the embedding is padded beyond it (see padded_vocab_size)."""
    hidden_size: int
    ffn_hidden_size: int
    """Width of the SwiGLU MLP (HF intermediate_size); linear_fc1 holds gate and up, 2x this."""
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA); equal to num_attention_heads for plain multi-head attention."""
    kv_channels: int
    """Per-head dimension (HF head_dim), which may differ from hidden_size / heads."""
    norm_epsilon: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """HF rope parameters beyond theta: {'rope_type': 'llama3' | 'linear', 'factor': ...}."""
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    add_qkv_bias: bool = False
    add_proj_bias: bool = False
    qk_layernorm: bool = False
    """RMSNorm over each query/key head before RoPE (Qwen3)."""
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    """Per layer 'full_attention' or 'sliding_attention'; None means every layer uses
    sliding_window when it is set (Mistral) and full attention otherwise."""
    attention_sinks: bool = False
    """Each attention head has a learned sink logit (`self_attention.sinks` [heads]; gpt-oss
    `self_attn.sinks`) that joins the softmax's denominator as a key without a value:
    p_ij = exp(s_ij) / (sum_j exp(s_ij) + exp(sink_h)). Sliding and full layers alike."""
    num_moe_experts: int = 0
    """Routed experts per MoE layer; 0 makes every layer a dense MLP."""
    moe_ffn_hidden_size: int = 0
    """Width of each expert's SwiGLU (HF moe_intermediate_size; Mixtral: intermediate_size)."""
    moe_router_topk: int = 1
    """Experts each token is sent to (HF num_experts_per_tok)."""
    moe_norm_topk_prob: bool = True
    """Renormalise the top-k router probabilities to sum to one (Mixtral always does)."""
    moe_shared_expert_ffn_hidden_size: int = 0
    """Width of the shared expert every token also goes through (Qwen2-MoE
    shared_expert_intermediate_size; DeepSeek-V3: n_shared_experts x moe_intermediate_size, one
    MLP as HF stores it); 0 means none."""
    moe_shared_expert_gate: bool = True
    """The shared expert's output is scaled by sigmoid(linear(x)) (Qwen2-MoE); DeepSeek-V3 and
    GLM-4.5 add it ungated."""
    moe_router_num_groups: int = 1
    """Expert groups of the group-limited router (HF n_group): a token picks experts only from
    its topk_group best groups, a group scored by the sum of its two best experts."""
    moe_router_group_topk: int = 1
    """Groups each token may route to (HF topk_group)."""
    moe_router_scaling_factor: float = 1.0
    """The routed experts' weights are multiplied by it (HF routed_scaling_factor)."""
    moe_router_expert_bias: bool = False
    """The router has a per-expert bias added to the scores only to choose experts (HF
    e_score_correction_bias, fp32), which aux-loss-free balancing moves (moe.bias_update_rate)."""
    moe_router_bias: bool = False
    """The router's linear layer has a bias (gpt-oss: `mlp.router.bias`)."""
    moe_expert_bias: bool = False
    """Each expert's two projections carry a bias (gpt-oss: `gate_up_proj_bias`, `down_proj_bias`)."""
    moe_activation: str = "swiglu"
    """The experts' activation: 'swiglu' (silu(gate) x up) or 'clamped_swiglu' (gpt-oss: gate
    clamped above at moe_swiglu_limit, up to +-limit, gate x sigmoid(moe_swiglu_alpha x gate) x
    (up + 1))."""
    moe_swiglu_limit: float = 7.0
    moe_swiglu_alpha: float = 1.702
    moe_layer_ids: list[int] | None = None
    """Layers with experts; None means every layer when num_moe_experts > 0. Qwen3-MoE derives it
    from decoder_sparse_step and mlp_only_layers."""
    moe_aux_loss_coef: float = 0.0
    """HF router_aux_loss_coef: weight of the load-balancing loss."""
    moe_output_router_logits: bool = False
    """HF output_router_logits: transformers adds the load-balancing loss only when it is set."""
    rotary_fraction: float = 1.0
    """Share of each q/k head's dims that RoPE rotates, from the front (HF partial_rotary_factor;
    GLM-4.5: 0.5); the rest passes unrotated."""
    # -- multi-latent attention (token_mixer 'mla'; DeepSeek-V2/V3, Kimi-K2) ---------------------
    q_lora_rank: int | None = None
    """Rank of the query down-projection (HF q_lora_rank); None: a plain query projection."""
    kv_lora_rank: int = 0
    """Rank of the compressed key/value latent (HF kv_lora_rank)."""
    qk_nope_head_dim: int = 0
    """Per-head q/k dims without RoPE (HF qk_nope_head_dim)."""
    qk_rope_head_dim: int = 0
    """Per-head q/k dims with RoPE; the key's part is one vector shared by every head."""
    v_head_dim: int = 0
    """Per-head value dim (HF v_head_dim); MLA's q/k heads are qk_nope + qk_rope wide."""
    rope_interleave: bool = False
    """RoPE pairs dims (0, 1), (2, 3), ... instead of (i, i + d/2) (HF rope_interleave)."""
    # -- Gated DeltaNet (layer_types 'linear_attention'; Qwen3-Next, Qwen3.5) -----------------
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4
    attn_output_gate: bool = False
    """The full-attention layers' q_proj also yields a per-head gate: out = attention x
    sigmoid(gate), before o_proj (Qwen3-Next)."""
    norm_zero_centered: bool = False
    """RMSNorm weights are stored as w - 1 and scale by (1 + w), in fp32 before the cast
    (Qwen3-Next's decoder, final and q/k norms)."""
    token_mixer: str = "gqa"
    """Token mixer of every layer, by name in models/blocks.py TOKEN_MIXERS: 'gqa' (grouped-query
    self-attention with RoPE) or 'mla' (multi-latent attention)."""
    dense_mlp: str = "swiglu"
    """MLP of the layers without experts, by name in models/blocks.py MLPS: 'swiglu'."""
    moe_mlp: str = "moe"
    """MLP of the layers in moe_layers, by name in models/blocks.py MLPS: 'moe' (routed SwiGLU
    experts, optional shared expert)."""
    moe_router: str = "softmax_topk"
    """Router of the MoE layers, by name in models/routers.py ROUTERS: 'softmax_topk' (softmax over
    a linear gate, top-k, optional renormalisation) or 'sigmoid_group' (DeepSeek-V3: sigmoid
    scores, expert bias, group-limited top-k, scaled weights)."""
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    extra_hf_config: dict = field(default_factory=dict)
    """Keys of the source config.json kept verbatim so export-hf writes them back."""
    hf_fused_experts: bool = False
    """The source checkpoint stores its experts fused, as transformers >= 5 holds them (Qwen3.5-MoE
    is published so): `experts.gate_up_proj` [experts, 2 x moe_ffn, hidden], each expert's gate
    rows then its up rows, and `experts.down_proj` [experts, hidden, moe_ffn], instead of one
    tensor per expert and projection. Found from the checkpoint's tensor names at import; export
    writes the same layout back."""

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def padded_vocab_size(self, tp: int) -> int:
        """Pad the vocabulary to a multiple of divisor * tp (Megatron's rule), so each rank's
        slice is equal and GEMM-friendly. The padded rows are zero and never predicted."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    @property
    def moe_layers(self) -> list[int]:
        """Global indices of the layers whose MLP is a mixture of experts."""
        if not self.num_moe_experts:
            return []
        return list(range(self.num_layers)) if self.moe_layer_ids is None else sorted(self.moe_layer_ids)

    @property
    def is_mla(self) -> bool:
        return self.token_mixer == "mla"

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of queries and keys (MLA: nope + rope dims; else kv_channels)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.kv_channels

    @property
    def value_head_dim(self) -> int:
        """Per-head width of values and of the attention output (MLA: v_head_dim)."""
        return self.v_head_dim if self.is_mla else self.kv_channels

    @property
    def rotary_dim(self) -> int:
        """Dims RoPE rotates per head (MLA: the rope part; else kv_channels x rotary_fraction)."""
        if self.is_mla:
            return self.qk_rope_head_dim
        return int(self.kv_channels * self.rotary_fraction)

    @property
    def softmax_scale(self) -> float:
        """The attention's score scale: qk_head_dim^-0.5, times YaRN's mscale(factor,
        mscale_all_dim)^2 for MLA under YaRN (DeepSeek's reference, as transformers'
        yarn_apply_mscale)."""
        from .rope import yarn_mscale

        scale = self.qk_head_dim ** -0.5
        s = self.rope_scaling or {}
        if self.is_mla and s.get("rope_type", s.get("type")) == "yarn" and s.get("mscale_all_dim"):
            m = yarn_mscale(s["factor"], s["mscale_all_dim"])
            scale = scale * m * m
        return scale

    def window_for_layer(self, i: int) -> int | None:
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    def token_mixer_for_layer(self, i: int) -> str:
        """The name of layer i's token mixer (models/blocks.py): a 'linear_attention' layer of
        layer_types is a Gated DeltaNet, the others `token_mixer`."""
        if self.layer_types is not None and self.layer_types[i] == "linear_attention":
            return "gated_deltanet"
        return self.token_mixer

    def mlp_for_layer(self, i: int) -> str:
        """The name of layer i's MLP block (models/blocks.py): moe_mlp for a layer with experts."""
        return self.moe_mlp if i in self.moe_layers else self.dense_mlp

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Also the dicts of checkpoints saved before a field existed: its default reproduces the
        model they were saved from (token_mixer, dense_mlp, moe_mlp, moe_router)."""
        return cls(**d)
