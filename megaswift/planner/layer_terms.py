"""What one decoder layer keeps for backward, by arithmetic: the per-layer half of
planner/memory_model.py (which adds the micro batches, the pipeline schedule and the state).

Bytes per micro batch of `rows` rows, under bf16 autocast with fp32 master weights, as the code
saves them (read off the saved-tensor hooks of a real layer and the dry run's live tensors).
T = rows x seq_len / cp tokens of this rank, Tq = T / tp under sequence parallelism (else T),
Tm the tokens an MoE layer routes here (T / tp when tp > 1: each tp rank routes its share),
H hidden, n = heads / tp.

Common to every layer
  residual     2 x 4 Tq H          the layer input and the mid-layer residual (fp32)
  norms        2 x (4 Tq H + 4 Tq) RMSNorm's x * rsqrt and rsqrt (fp32), kept for the weight's
                                   gradient (a frozen weight keeps only rsqrt)

Token mixer `gqa` (models/attention.py), hd = kv_channels, nkv the KV heads of this rank
  casts        2 T H               linear_qkv's bf16 input (SP gathers the fp32 norm output, then
                                   autocast casts it)
  qkv          2 T (n + 2 nkv) hd  linear_qkv's output (v is a view of it)
  qk norms     6 T (n + nkv) hd    fp32 input + bf16 output of the q/k RMSNorms (+ rsqrt)
  rope         2 T (n + nkv) hd    q and k cast back to bf16 for the kernel; partial RoPE
                                   (GLM-4.5) rotates a slice and concatenates: the same bytes
  core         2 T n hd + 4 T n    the kernel's out (linear_proj's saved input) and lse; ring
                                   CP: + 4 T n hd (fp32 out); selective recompute drops the lse

Token mixer `mla` (models/mla.py), rq / rkv the q / kv latent ranks, dn + dr = qk the q/k head
width, dv the value head width. The down-projections are replicated and run on this rank's
tokens (Tq); the up-projections gather the latent (SP) and compute this rank's heads on T:
  casts        2 Tq H + 2 Tq H     the bf16 inputs of linear_q_down_proj and linear_kv_down_proj
                                   (two casts of the same norm output); without q_lora_rank
                                   linear_q_proj is column-parallel: 2 T H for it
  q latent     6 Tq rq + 4 Tq      q_layernorm on the bf16 latent: its fp32 copy, the bf16
               + 2 T rq            normalised x (weight gradient), rsqrt; linear_q_up_proj's
                                   bf16 input
  kv latent    6 Tq rkv + 4 Tq     the same for kv_layernorm and linear_kv_up_proj
               + 2 T rkv
  kv           2 T n (dn + dv)     linear_kv_up_proj's output (v is a view of it)
  rope         2 x 2 T n qk        q = [q_nope, rope(q_rope)] and k = [k_nope, rope(k_rope)
                                   expanded over the heads], new bf16 tensors the kernel keeps;
                                   RoPE itself keeps only cos/sin
  core         2 T n dv + 4 T n    as for gqa, with the value width

MLP of a dense layer (`swiglu`), F = ffn_hidden_size / tp
  casts        2 T H               linear_fc1's bf16 input
  mlp          2 T (2F + F + F)    fc1's output, silu(gate), silu(gate) * up (fc2's input)
MoE layer, E experts, top-k, R = Tm k assignments, Re = R etp rows computed here, Fe =
moe_ffn_hidden_size / etp
  router       softmax_topk: 2 Tm H + 8 Tm E (bf16 input; fp32 logits for the z-loss and
               the softmax kept by the gather); sigmoid_group (DeepSeek-V3, GLM-4.5), fp32
               throughout: 4 Tm H + 12 Tm E (its fp32 input, logits, sigmoid, normalised
               probabilities); + 12 R (ids, weights) + 12 Tm
  dispatch     2 Re (H + 4 Fe) + 4 R H + 8 (2 R + 2 Re) + 2 R   the dispatched rows and the
               experts' intermediates, the combined rows and their weighted copy, indices (each
               assignment's token and place, the rows' permutation and its inverse)
  shared       2 T (H + 4 Fs) (Fs = shared width / tp) as a dense MLP; its sigmoid gate
               (Qwen2-MoE) + 2 T H + 8 T; DeepSeek-V3's and GLM-4.5's are ungated
Qwen3-Next's gated attention (attn_output_gate) and zero-centred q/k norms (norm_zero_centered)
  qkv          + 2 T n hd          linear_qkv's output holds each query head's gate too
  core         + 2 x 2 T n hd      sigmoid(gate) and the gated output (linear_proj's input)
  qk norms     the normalised copy is fp32 (scaled by 1 + w in fp32), not bf16: 8 T (n + nkv) hd
gpt-oss's attention sinks and sliding windows (kernels/attention.py's steps after the kernel;
neither under ring / Ulysses attention, whose kernel handles both inside, nor under selective
recompute, which reruns them; b rows, s = seq_len)
  core         + 2 T n hd          sinks or a window: the kernel's own output, which its node keeps,
                                   is no longer linear_proj's input (the rescaled or masked one is)
               + 4 T n hd + 4 T n  sinks: its fp32 copy and sigmoid(lse - sink), the rescale
  window_mask  2 b s^2 + b s       a window: the additive mask [b, 1, s, s] (bf16) the CPU (and
                                   CUDA sdpa) kernel keeps, whatever the window, and the rows-seen
                                   flags; flash-attn takes the window itself and keeps neither
  building the mask is a transient of 10 s^2 (the int64 query - key distances beside two
  boolean masks; `window_build`), a peak candidate of its own at long sequences
gpt-oss's experts: the clamped SwiGLU keeps 7 intermediates of Fe per routed row (fc1's output
  counts 2; the clamped gate, its sigmoid, their product and the shifted clamped up; fc2's input)
  where silu(gate) x up keeps 4; the expert biases add a row -> expert index (int64) per GEMM
  and routed row; the router's bias and the biases' adds keep nothing

Token mixer `gated_deltanet` (models/deltanet.py; Qwen3-Next's and Qwen3.5's linear_attention
layers), nk / nv the key / value heads of this rank, dk / dv their widths, ch = 2 nk dk + nv dv
the conv's channels, K its kernel, b the rows (cp is refused for these layers: s = seq_len).
The delta rule runs in kernels/gated_delta.py's chunked torch form (the dry run's and the CPU
run's; flash-linear-attention's kernels on CUDA keep their own set, recomputing the chunk states
in backward: not modelled, this is then an upper bound) with chunks of C = 64 tokens:
n = ceil(s / C) chunks, P = b n C the padded tokens. Read off the autograd graph of a real layer
(fp32 weights, bf16 autocast, where the kernel's matmuls run in bf16), exact to a few bytes over
b, s, heads and widths (tests/unit/test_memory_model.py):
  casts        2 x 2 T H           the bf16 inputs of in_proj_qkvz and in_proj_ba (two casts)
  conv         2 ch b (K s + K (K-1) / 2)   the bf16 conv input and its K-1 shifted copies (each
               + 2 x 4 T ch        a slice of its padded storage), kept for the conv weight's
                                   gradient; the fp32 conv output (silu's input) and silu's output
                                   (q, k, v, read by the l2 norms and the chunking)
  gates        2 T nv + 2 x 4 T nv sigmoid(b) (bf16); softplus's input and output (fp32); the
               + 5 x 4 T nk        l2 norms' [T, nk] factors of q and k
  delta_rule   4 P nv C (4 x 4 + 3 x 2) + 2 x 2 P nk C + C^2   per chunk and value head the
                                   fp32 [C, C] decay, K K^T o decay, the system and its inverse
                                   (the UT transform), the bf16 casts of the transform (twice) and
                                   of Q K^T o decay; per key head the bf16 K K^T and Q K^T; the mask
               + P nk dk (2 x 4 + 4 x 2)   q and k chunked (fp32) and their bf16 casts (q, k, k^T twice)
               + P nv dv (4 + 2 x 2)       v chunked (fp32), beta v and the stacked writes U (bf16)
               + P nv dk (2 + 2 x 2 [n > 1])  W's right factor beta e^G K (bf16); with more than
                                   one chunk W itself and Q e^G (bf16)
               + 2 b nv (n-1) C (dk + dv)  each chunk's K^T and U but the last's (the last
                                   chunk's state update feeds nothing that is kept)
               + 4 P nv (4 [n > 1] or 3) + 4 b nv n   the per-token decays, beta and their
                                   products (fp32), the per-chunk e^{G_C}
  chunk_states (2 n + 4 (n-1) + 2 n) b nv dk dv    the state entering each chunk: a bf16 cast for
                                   W S, the fp32 state kept by the decay's product (not the
                                   last), the bf16 cast of all of them stacked for Q S
  out_norm     5 x 4 T nv dv + 4 T nv   the gated RMSNorm in fp32: the kernel's output, the
               + 2 T nv dv         normalised x (weight gradient), w x, the gate and silu(gate),
                                   rsqrt; out_proj's bf16 input
  Qwen3-Next-80B-A3B (nv 32, dk = dv = 128, ch 8192) on a 4096-token row at tp 1: 1.72 GiB a
  layer (conv 512 MiB, delta_rule 609, chunk_states 254, out_norm 353), 4.8 times what its
  gated-attention layers' mixer keeps (365 MiB), about 14 KB per token and value head.
  LoRA (frozen base): the conv input copies, the normalised x and softplus's output go; an
  unadapted projection's input too. Packed documents (document_ids) add a few [C, C] masks per
  chunk (not modelled: the dry run's rows are unpacked).
  What decoding keeps instead (rollouts, models/kv_cache.py), per sequence and layer: the
  recurrent state, nv dk dv in fp32, and the conv state, (K-1) ch in the compute dtype
  (`recurrent_state`); independent of the sequence's length.
The matmul weights' bf16 copies are the memory model's (autocast caches one per step); the
sigmoid router's weight is used in fp32: no copy.
"""
from __future__ import annotations

from megaswift.train.metrics import delta_chunk

F32, BF16 = 4, 2
DELTANET = "gated_deltanet"
DELTANET_TARGETS = {"in_proj_qkvz", "in_proj_ba", "out_proj"}


def mixer_of(mc, i: int) -> str:
    """Layer i's token mixer: 'gqa', 'mla' or 'gated_deltanet' (models/config.py)."""
    return mc.token_mixer_for_layer(i)


def kind_of(mc, i: int) -> tuple[str, bool, int | None]:
    """(token mixer, MoE, sliding window) of layer i: what its terms depend on (the window of an
    attention layer that has one, gpt-oss's and Mistral's, else None)."""
    mixer = mixer_of(mc, i)
    return mixer, i in mc.moe_layers, (mc.window_for_layer(i) if mixer == "gqa" else None)


def tokens(cfg, rows: int | None = None) -> tuple[int, int, int]:
    """(T, Tq, Tm): the tokens of this rank in one micro batch, its sequence shard under SP, and
    the tokens an MoE layer routes here."""
    p, tp = cfg.parallel, cfg.parallel.tp
    T = (rows or cfg.train.micro_batch_size) * cfg.data.seq_len // p.cp
    Tq = T // tp if p.sp else T
    return T, Tq, (Tq if p.sp else T // tp)


def adapted_targets(cfg, mc, mixer: str | None = None) -> set[str]:
    """The LoRA targets a layer with this token mixer has (None: the model's own mixer; all-linear
    names every family's)."""
    lora = cfg.model.lora
    if not lora.rank:
        return set()
    from megaswift.models.lora import target_set

    if mixer == DELTANET:
        mixer = DELTANET_TARGETS
    elif mc.is_mla:
        mixer = {"linear_q_down_proj", "linear_q_up_proj"} if mc.q_lora_rank else {"linear_q_proj"}
        mixer |= {"linear_kv_down_proj", "linear_kv_up_proj"}
    else:
        mixer = {"linear_qkv"}
    return target_set(lora.targets) & (mixer | {"linear_proj", "linear_fc1", "linear_fc2"})


def bf16_copied(name: str, mc) -> bool:
    """Whether autocast makes a bf16 copy of this matrix for its matmul: the sigmoid router runs
    in fp32 (models/routers.py GroupLimitedRouter), Gated DeltaNet's conv weight [channels, K]
    is no matmul's (an elementwise product, in fp32), and gpt-oss's expert biases [experts,
    out] are cast per forward, added and let go (nothing saves them)."""
    if name.endswith(("conv1d.weight", ".bias")):
        return False
    return not (name.endswith("router.weight") and mc.moe_router == "sigmoid_group")


def layer_terms(cfg, mc, moe: bool, rows: int | None = None, mixer: str | None = None,
                window: int | None = None) -> dict:
    """Saved-for-backward bytes of one decoder layer (an MoE one if `moe`, with token mixer
    `mixer`: None the model's own, or 'gated_deltanet'; an attention layer's sliding `window`,
    if it has one) on one micro batch of `rows` rows
    (default train.micro_batch_size; DPO's hold two per pair), by term (module docstring). LoRA
    freezes the base: a frozen norm weight needs no normalised input saved, a frozen linear
    saves its bf16 weight (for the input's gradient) but not its input: an adapted linear's
    input is saved by the adapter's A instead."""
    p = cfg.parallel
    T, Tq, Tm = tokens(cfg, rows)
    H = mc.hidden_size
    lora = cfg.model.lora
    frozen = bool(lora.rank)
    adapted = adapted_targets(cfg, mc, mixer)
    saved = (lambda name: name in adapted) if frozen else (lambda name: True)
    t = {"residual": 2 * F32 * Tq * H, "norms": 2 * ((0 if frozen else F32 * Tq * H) + F32 * Tq)}
    if mixer == DELTANET:
        t.update(_deltanet_terms(cfg, mc, rows or cfg.train.micro_batch_size, T, frozen, saved))
    else:
        t.update(_mixer_terms(cfg, mc, T, Tq, frozen, saved, rows or cfg.train.micro_batch_size, window))
    if frozen:  # each adapter keeps its rank-wide middle A x
        t["lora"] = BF16 * T * lora.rank * len(adapted)
    if moe:
        t.update(_moe_terms(cfg, mc, T, Tm))
    else:
        F = mc.ffn_hidden_size // p.tp
        t["casts"] += BF16 * T * H * int(saved("linear_fc1"))
        t["mlp"] = BF16 * T * F * (3 + int(saved("linear_fc2")))
    return t


def _mixer_terms(cfg, mc, T, Tq, frozen, saved, rows=1, window=None) -> dict:
    """The token mixer's saved tensors (the casts of its inputs only); `window` a sliding
    window's (module docstring: sinks and windows)."""
    p = cfg.parallel
    t = _mla_terms(cfg, mc, T, Tq, frozen, saved) if mc.is_mla else _gqa_terms(cfg, mc, T, frozen, saved)
    n = mc.num_attention_heads // p.tp
    t["core"] = BF16 * T * n * mc.value_head_dim
    if mc.attn_output_gate:  # sigmoid(gate) and the gated output, linear_proj's input
        t["core"] += 2 * BF16 * T * n * mc.value_head_dim
    if cfg.train.recompute != "selective":
        t["core"] += F32 * T * n  # the lse
    if p.cp > 1:
        t["core"] += F32 * T * n * mc.value_head_dim  # ring attention keeps its fp32 out
    elif cfg.train.recompute != "selective":  # kernels/attention.py's steps after the kernel
        if mc.attention_sinks or window is not None:  # the kernel's own output, kept by its node
            t["core"] += BF16 * T * n * mc.value_head_dim
        if mc.attention_sinks:  # its fp32 copy and the rescale sigmoid(lse - sink)
            t["core"] += F32 * T * n * mc.value_head_dim + F32 * T * n
        if window is not None:  # the additive mask [b, 1, s, s] and the rows-seen flags [b, s]
            t["window_mask"] = BF16 * rows * cfg.data.seq_len ** 2 + rows * cfg.data.seq_len
    return t


def window_build(cfg, mc, rows: int, layers) -> int:
    """The transient of building a sliding window's mask (kernels/attention.py _visible_keys and
    the additive mask), beyond what the layer then saves: the query - key distances as int64 [s,
    s] beside two boolean [s, s] masks, 10 s^2 bytes, or, for more than 4 rows, the expanded
    mask's negation [b, s, s] beside the boolean mask, (1 + b) s^2. 0 where none of `layers` has a
    window, or under context parallelism (ring attention masks its own blocks)."""
    if cfg.parallel.cp > 1 or not windowed(mc, layers):
        return 0
    return max(10, 1 + rows) * cfg.data.seq_len ** 2


def windowed(mc, layers) -> list[int]:
    """The sliding-window attention layers among `layers`."""
    return [i for i in layers if kind_of(mc, i)[2] is not None]


def held_at_window_build(cfg, mc, kinds: dict, layers, rows: int) -> int:
    """What a micro batch's layers among `layers` hold when the last sliding-window layer of them
    builds its mask (`window_build`): the layers before it, and its own tensors saved before the
    attention core (its input, the input norm's, linear_qkv's cast input and output, q and k
    after RoPE, the q/k norms'). `kinds`: kind_of -> the layer's terms (memory_model)."""
    last = windowed(mc, layers)[-1]
    t = kinds[kind_of(mc, last)]
    T, _, _ = tokens(cfg, rows)
    adapted = adapted_targets(cfg, mc)
    cast = BF16 * T * mc.hidden_size * int(not cfg.model.lora.rank or "linear_qkv" in adapted)
    own = t["residual"] // 2 + t["norms"] // 2 + cast + t["qkv"] + t["rope"] + t.get("qk_norms", 0)
    return sum(sum(kinds[kind_of(mc, i)].values()) for i in layers if i < last) + own


def mixer_saved(cfg, mc, rows: int) -> int:
    """What a layer still keeps while its token mixer's backward runs: its input and the input
    norm's tensors, and the mixer's own (its MLP's are gone). Ring attention's (cp > 1): no
    window mask or sink tensors outside its kernel."""
    T, Tq, _ = tokens(cfg, rows)
    frozen = bool(cfg.model.lora.rank)
    adapted = adapted_targets(cfg, mc)
    saved = (lambda name: name in adapted) if frozen else (lambda name: True)
    norm = (0 if frozen else F32 * Tq * mc.hidden_size) + F32 * Tq
    return F32 * Tq * mc.hidden_size + norm + sum(_mixer_terms(cfg, mc, T, Tq, frozen, saved).values())


def ring_backward_temporaries(cfg, mc, rows: int) -> int:
    """Ring attention's backward (parallel/context_parallel.py _RingAttention, CPU kernel) at a
    block's kernel call: the fp32 dq accumulator and dout, this and the previous block's fp32
    dq, dk, dv, four fp32 K/V-shaped gradient buffers (the accumulator, the one arriving, the one
    passed on, its packing), the bf16 K/V block and the next in flight, and the kernel's bf16
    gradients padded to the wider head dim. 0 without a ring."""
    p = cfg.parallel
    U = {"ulysses": p.cp, "hybrid": p.ulysses}.get(p.cp_comm, 1)
    if p.cp // U < 2:
        return 0
    T, _, _ = tokens(cfg, rows)
    nq, hk = mc.num_attention_heads // p.tp, max(1, mc.num_query_groups // p.tp)
    hk = hk if hk % U == 0 else U  # Ulysses replicates fewer KV heads up to U
    qk, dv = mc.qk_head_dim, mc.value_head_dim
    Q, V, K = T * nq * qk, T * nq * dv, T * hk * qk
    KV = K + T * hk * dv
    return F32 * (3 * Q + 2 * KV + V + 4 * KV) + BF16 * (2 * KV + T * (nq + 2 * hk) * max(qk, dv))


def _gqa_terms(cfg, mc, T, frozen, saved) -> dict:
    tp, hd, H = cfg.parallel.tp, mc.kv_channels, mc.hidden_size
    nq, nkv = mc.num_attention_heads // tp, max(1, mc.num_query_groups // tp)
    gates = nq if mc.attn_output_gate else 0  # each query head's gate rows (Qwen3-Next)
    t = {"casts": BF16 * T * H * int(saved("linear_qkv")), "qkv": BF16 * T * (nq + gates + 2 * nkv) * hd,
         "rope": BF16 * T * (nq + nkv) * hd}
    if mc.qk_layernorm:  # zero-centred: the normalised copy (the weight's gradient) stays fp32
        normalised = 0 if frozen else (F32 if mc.norm_zero_centered else BF16)
        t["qk_norms"] = (F32 + normalised) * T * (nq + nkv) * hd + F32 * T * (nq + nkv)
    return t


def _deltanet_shape(cfg, mc, rows: int) -> tuple:
    """(b, s, nk, nv, dk, dv, ch, K, C, n, P) of a Gated DeltaNet layer on this rank."""
    tp, b, s = cfg.parallel.tp, rows, cfg.data.seq_len // cfg.parallel.cp
    nk, nv = mc.linear_num_key_heads // tp, mc.linear_num_value_heads // tp
    dk, dv = mc.linear_key_head_dim, mc.linear_value_head_dim
    C = delta_chunk()
    n = -(-s // C)
    return b, s, nk, nv, dk, dv, 2 * nk * dk + nv * dv, mc.linear_conv_kernel_dim, C, n, b * n * C


def _deltanet_terms(cfg, mc, rows, T, frozen, saved) -> dict:
    """Gated DeltaNet's saved tensors (module docstring: the formula, term by term)."""
    b, s, nk, nv, dk, dv, ch, K, C, n, P = _deltanet_shape(cfg, mc, rows)
    H, more = mc.hidden_size, n > 1
    conv_in = 0 if frozen else BF16 * ch * b * (K * s + K * (K - 1) // 2)
    rule = (2 * F32 + 4 * BF16) * P * nk * dk + (F32 + 2 * BF16) * P * nv * dv
    rule += BF16 * P * nv * dk * (1 + 2 * more) + BF16 * b * nv * (n - 1) * C * (dk + dv)
    rule += (4 * F32 + 3 * BF16) * P * nv * C + 2 * BF16 * P * nk * C + C * C
    rule += F32 * P * nv * (4 if more else 3) + F32 * b * nv * n
    return {"casts": BF16 * T * H * (int(saved("in_proj_qkvz")) + int(saved("in_proj_ba"))),
            "conv": conv_in + 2 * F32 * T * ch,
            "gates": BF16 * T * nv + (1 if frozen else 2) * F32 * T * nv + 5 * F32 * T * nk,
            "delta_rule": rule,
            "chunk_states": (2 * BF16 * n + F32 * (n - 1)) * b * nv * dk * dv,
            "out_norm": (4 + (0 if frozen else 1)) * F32 * T * nv * dv + F32 * T * nv
            + BF16 * T * nv * dv * int(saved("out_proj"))}


def recurrent_state(mc, tp: int, layers) -> int:
    """Bytes a decoding rank keeps per sequence for its Gated DeltaNet layers among `layers`:
    each layer's recurrent state (its nv value heads' [dk, dv], fp32) and conv state (the last
    K-1 conv inputs of its channels, in the compute dtype, bf16). 0 without such layers."""
    n = sum(1 for i in layers if mixer_of(mc, i) == DELTANET)
    if not n:
        return 0
    nk, nv = mc.linear_num_key_heads // tp, mc.linear_num_value_heads // tp
    dk, dv = mc.linear_key_head_dim, mc.linear_value_head_dim
    return n * (F32 * nv * dk * dv + BF16 * (mc.linear_conv_kernel_dim - 1) * (2 * nk * dk + nv * dv))


def _mla_terms(cfg, mc, T, Tq, frozen, saved) -> dict:
    n, H = mc.num_attention_heads // cfg.parallel.tp, mc.hidden_size
    rq, rkv = mc.q_lora_rank, mc.kv_lora_rank

    def latent(local, r):  # RMSNorm of a bf16 latent: fp32 copy, bf16 normalised x, rsqrt
        return (F32 + (0 if frozen else BF16)) * local * r + F32 * local

    if rq:
        t = {"casts": BF16 * Tq * H * int(saved("linear_q_down_proj")),
             "q_latent": latent(Tq, rq) + BF16 * T * rq * int(saved("linear_q_up_proj"))}
    else:
        t = {"casts": BF16 * T * H * int(saved("linear_q_proj"))}
    t["casts"] += BF16 * Tq * H * int(saved("linear_kv_down_proj"))
    t["kv_latent"] = latent(Tq, rkv) + BF16 * T * rkv * int(saved("linear_kv_up_proj"))
    t["kv"] = BF16 * T * n * (mc.qk_nope_head_dim + mc.v_head_dim)
    t["rope"] = 2 * BF16 * T * n * mc.qk_head_dim
    return t


def _moe_terms(cfg, mc, T, Tm) -> dict:
    p, H = cfg.parallel, mc.hidden_size
    E, k, etp = mc.num_moe_experts, mc.moe_router_topk, p.etp
    R = Tm * k
    Re, Fe = R * etp, mc.moe_ffn_hidden_size // etp
    if mc.moe_router == "sigmoid_group":  # fp32: input, logits, sigmoid, normalised probabilities
        router = F32 * Tm * H + 3 * F32 * Tm * E
    else:  # bf16 input; fp32 logits (z-loss) and softmax
        router = BF16 * Tm * H + 2 * F32 * Tm * E
    # the experts' activation: silu(gate) x up keeps fc1's output, silu's and the product (fc2's
    # input); gpt-oss's clamped one three more: the clamped gate, its sigmoid, their product and
    # the shifted clamped up instead of silu's output
    act = 7 if mc.moe_activation == "clamped_swiglu" else 4
    # int64 indices: each assignment's token and its place in the expert order (R each), the
    # rows' permutation to expert-major order and back (Re each); with expert biases (gpt-oss)
    # the row -> expert index that spreads each GEMM's bias over its rows (Re each)
    index = 2 * R + 2 * Re + (2 * Re if mc.moe_expert_bias else 0)
    t = {"router": router + Tm * k * (8 + 4) + 3 * F32 * Tm,
         "dispatch": BF16 * Re * (H + act * Fe) + 2 * BF16 * R * H + 8 * index + BF16 * R}
    if mc.moe_shared_expert_ffn_hidden_size:
        Fs = mc.moe_shared_expert_ffn_hidden_size // p.tp
        t["shared_expert"] = BF16 * T * (H + 4 * Fs)
        if mc.moe_shared_expert_gate:
            t["shared_expert"] += BF16 * T * H + F32 * T * 2
    return t


def core_out(cfg, mc, rows: int, layer: int | None = None) -> int:
    """The token mixer's output its output projection keeps (bf16): linear_proj's, or a Gated
    DeltaNet layer's out_proj's."""
    T, _, _ = tokens(cfg, rows)
    if layer is not None and mixer_of(mc, layer) == DELTANET:
        return BF16 * T * (mc.linear_num_value_heads // cfg.parallel.tp) * mc.linear_value_head_dim
    return BF16 * T * (mc.num_attention_heads // cfg.parallel.tp) * mc.value_head_dim


def input_pass_grads(cfg, mc, layer: int, rows: int) -> int:
    """zbv: what one layer's input-gradient pass keeps for its weight pass, per micro batch: the
    gradient at the output of every trainable weight (bf16 for the matmuls, fp32 for the norms
    and the fp32 router)."""
    p = cfg.parallel
    T, Tq, Tm = tokens(cfg, rows)
    H, n = mc.hidden_size, mc.num_attention_heads // p.tp
    g = 2 * F32 * Tq * H + BF16 * T * H  # the two norms, linear_proj (out_proj)
    if mixer_of(mc, layer) == DELTANET:  # in_proj_qkvz, in_proj_ba; the conv, the gated norm, A_log / dt_bias (fp32)
        _, _, nk, nv, dk, dv, ch, _, _, _, _ = _deltanet_shape(cfg, mc, rows)
        g += BF16 * T * (2 * nk * dk + 2 * nv * dv + 2 * nv) + F32 * T * (ch + nv * dv + 2 * nv)
    elif mc.is_mla:
        rq, rkv, qk = mc.q_lora_rank, mc.kv_lora_rank, mc.qk_head_dim
        g += (BF16 + F32) * Tq * rq + BF16 * T * n * qk if rq else BF16 * T * n * qk
        g += BF16 * Tq * (rkv + mc.qk_rope_head_dim) + F32 * Tq * rkv
        g += BF16 * T * n * (mc.qk_nope_head_dim + mc.v_head_dim)
    else:
        hd, nkv = mc.kv_channels, max(1, mc.num_query_groups // p.tp)
        g += BF16 * T * (n * (2 if mc.attn_output_gate else 1) + 2 * nkv) * hd
        if mc.qk_layernorm:
            g += F32 * T * (n + nkv) * hd
    if layer in mc.moe_layers:
        R = Tm * mc.moe_router_topk
        Re, Fe = R * p.etp, mc.moe_ffn_hidden_size // p.etp
        g += F32 * Tm * mc.num_moe_experts + BF16 * Re * (2 * Fe + H)
        if mc.moe_shared_expert_ffn_hidden_size:
            g += BF16 * T * (2 * mc.moe_shared_expert_ffn_hidden_size // p.tp + H)
    else:
        g += BF16 * T * (2 * mc.ffn_hidden_size // p.tp + H)  # fc1, fc2
    return g


def weight_pass_frees(cfg, mc, rows: int) -> dict:
    """zbv: what a param group's weight pass frees once it has run, by module name: the inputs
    its matmul (or norm) saved and its output gradient."""
    p = cfg.parallel
    T, Tq, _ = tokens(cfg, rows)
    H, n = mc.hidden_size, mc.num_attention_heads // p.tp
    out = {"input_layernorm": 2 * F32 * Tq * H, "pre_mlp_layernorm": 2 * F32 * Tq * H,
           "linear_proj": BF16 * T * (H + n * mc.value_head_dim)}
    if mc.is_mla:
        rq, rkv, qk = mc.q_lora_rank, mc.kv_lora_rank, mc.qk_head_dim
        if rq:
            out.update(linear_q_down_proj=BF16 * Tq * (H + rq), q_layernorm=(2 * F32 + BF16) * Tq * rq,
                       linear_q_up_proj=BF16 * T * (rq + n * qk))
        else:
            out["linear_q_proj"] = BF16 * T * (H + n * qk)
        out.update(linear_kv_down_proj=BF16 * Tq * (H + rkv + mc.qk_rope_head_dim),
                   kv_layernorm=(2 * F32 + BF16) * Tq * rkv,
                   linear_kv_up_proj=BF16 * T * (rkv + n * (mc.qk_nope_head_dim + mc.v_head_dim)))
    else:
        hd, nkv = mc.kv_channels, max(1, mc.num_query_groups // p.tp)
        out["linear_qkv"] = BF16 * T * ((n * (2 if mc.attn_output_gate else 1) + 2 * nkv) * hd + H)
    if any(mixer_of(mc, i) == DELTANET for i in range(mc.num_layers)):  # a hybrid model's linear-attention modules
        b, s, nk, nv, dk, dv, ch, K, _, _, _ = _deltanet_shape(cfg, mc, rows)
        out.update(in_proj_qkvz=BF16 * T * (H + 2 * nk * dk + 2 * nv * dv), in_proj_ba=BF16 * T * (H + 2 * nv),
                   conv1d=BF16 * ch * b * (K * s + K * (K - 1) // 2) + F32 * T * ch,
                   out_norm=2 * F32 * T * nv * dv, out_proj=BF16 * T * (nv * dv + H))
    return out


def layer_of(name: str) -> int | None:
    """The decoder layer a parameter name belongs to (None: the embedding, final norm, output layer)."""
    return int(name.split(".")[2]) if name.startswith("decoder.layers.") else None


def merged_experts(cfg, mc) -> int:
    """LoRA on the experts (linear_fc1 / linear_fc2 targets): each MoE layer's forward merges
    W + B A in fp32 for all of a rank's experts (parallel/lora.py), and the merged weights live
    until its dispatch returns: the bytes of one layer's."""
    if not mc.moe_layers or not cfg.model.lora.rank:
        return 0
    p, adapted = cfg.parallel, adapted_targets(cfg, mc)
    e_local, Fe = mc.num_moe_experts // p.ep, mc.moe_ffn_hidden_size // p.etp
    return F32 * e_local * Fe * mc.hidden_size * (2 * ("linear_fc1" in adapted) + ("linear_fc2" in adapted))
