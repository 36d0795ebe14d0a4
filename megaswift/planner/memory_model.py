"""What one rank holds in a training step, by arithmetic: the analytic twin of the dry run.

`predict_position(cfg, model_cfg, world_size, rank, algorithm=...)` predicts what
`dry_run_position` measures (planner/dry_run.py) for SFT or DPO, without tensors (thousands of
layouts a second). Bytes, b = rows of a micro batch (train.micro_batch_size; DPO: 2 x, see below),
s = seq_len / cp, T = b s tokens per rank, Tq = T / tp under sequence parallelism (else T),
H hidden, V = padded vocab / tp, hd head dim, nq / nkv the heads this tp rank computes, F the
MLP width / tp, L the decoder layers of this rank.

State (exact, mirrors parallel/data_parallel.py): trainable parameters go, in reverse module
order, into buckets closed once they hold >= parallel.ddp_bucket_size elements, each padded to a
multiple of its dp group (dense: dp x cp; experts: edp). parameters = 4 x padded buckets + 4 x
frozen parameters (LoRA's base; the routers' fp32 expert bias, which has no gradient) + RoPE's
inv_freq (rotary dims / 2: MLA's rope part, GLM-4.5's partial RoPE; one per pipeline chunk);
gradients = 4 x padded buckets; optimizer = 2 x 4 x this rank's elements (ZeRO-1: its dp shard
of every bucket).

Saved activations, per layer, under bf16 autocast with fp32 master weights: planner/layer_terms.py
(the residual stream and norms, the token mixer's tensors for GQA (Qwen3-Next's gated attention
too; gpt-oss's sinks and sliding-window masks), multi-latent attention and Gated DeltaNet (the chunked delta rule's [C, C] matrices and
chunk states; a hybrid model's layers each by their own mixer), the dense MLP, the MoE router
(softmax or DeepSeek's fp32 sigmoid router), dispatch and shared expert), plus
  weights      2 x matmul params   autocast's bf16 weight copies, saved by every matmul (not of
                                   the fp32 sigmoid router's weight); dense ones cached once per
                                   step, the experts' cast per micro batch (grouped GEMM)
Full recompute keeps only each layer's input (4 Tq H) and reruns one layer in backward (the
rank's largest). Also returned, not part of the peak: `recurrent_state_per_sequence`, what
decoding keeps per sequence for the rank's Gated DeltaNet layers (layer_terms.recurrent_state).

Per micro batch: the embedding output (4 Tq H), cos/sin (2 x 4 T rotary dims), the final norm (8 Tq H:
x * rsqrt and its output, still a local of GPTModel.forward), the output layer's bf16 input and
weight (2 T H + 2 V H), the bf16 logits (2 T V) and, inside the vocab-parallel cross entropy,
two fp32 copies of them (8 T V: x - max, then exp).

The peak (non-pipeline). Every micro batch but the last has finished its backward before the
next forward starts, so micro batches add nothing; the peak is state plus the largest of
  forward    all L layers' activations + the per-micro-batch terms, at the cross entropy's exp
             of the last micro batch (the usual peak, when 8 T V > 6 V H);
  backward   the layers' activations + the output layer's weight gradient in bf16 and its fp32
             cast (6 V H), when the sequence is short (T < 3/4 H);
  recompute  (full) the saved layer inputs + one layer rerun in backward;
  expert wgrad the last MoE layer's grouped fc1 weight gradient in bf16 and its fp32 cast, once
             that layer's own expert copies are gone (its grouped GEMM's node released them)
             and, under ZeRO-1, with the reduce-scatter shards of the buckets already complete
             (the output layer's, that layer's fc2);
  grad_sync  (ZeRO-1) every bucket's fp32 reduce-scatter output (bucket / dp), started during
             the last backward and alive until finish_grad_sync copies them back: the
             gradient shard, all at once (DeepSeek-scale experts with small activations);
  window_build a sliding-window layer building its mask (layer_terms.window_build: 10 s^2
             bytes at once) with the layers before it held: at long sequences over a small
             vocabulary share; under full recompute also its rebuild in the backward;
  optimizer  CUDA's fused AdamW (what the GPU and, by default, the dry run step with) allocates
             nothing; CPU's foreach AdamW (cuda_optimizer=False) allocates exp_avg_sq.sqrt() of
             every tensor of a parameter group at once (4 bytes per element of the larger group).

DPO (algorithm="dpo", train/dpo.py): a micro batch holds micro_batch_size pairs, 2 rows each
(chosen, then rejected), so b above is 2 x micro_batch_size (activations and the step's token
tensors double; the micro batches per step do not). The reference (dpo.reference /
dpo.precompute_ref): `copy` holds a frozen fp32 model sharded like the policy: + 4 x the rank's
base parameter elements (adapters excluded) + its RoPE buffers, labelled parameters as the dry
run labels them; `adapters` (LoRA) is the policy with its adapters off and `precompute` a table
lookup: nothing held. The reference forward runs under no_grad in before_step, before the
policy's first forward: it saves nothing, and its transient (one layer's temporaries, then the
bf16 logits and the loss's fp32 copies) is at most the policy forward's per-micro-batch terms
without any saved layer, so it is never the peak and is not a candidate. Measured: within 0.3%
without a pipeline (tp, sp, cp ring/Ulysses, recompute, LoRA, MoE), within 2.5% with one.

After the backward (every layout): dp's grad_norm squares the gradient one piece (a parameter's
part of this rank's shard) at a time, pow(2) and its weighted copy: 2 x 4 bytes of the largest
piece, with only the state alive. It is the peak when the activations are small (high cp, pp).

Pipeline (pp > 1): planner/pipeline_walk.py walks the rank's actions of the schedule, keeping
each (stage, micro batch)'s activations from its forward to its backward (the in-flight rule
is the schedule's), with autocast's step-long weight cache, the drained weight gradients and
zbv's split backward; its candidates (forward, backward) join grad_norm and grad_sync above.
"""
from __future__ import annotations

from megaswift.models.sharding import layer_param_names, layout_on

from . import layer_terms
from .layer_terms import BF16, F32, bf16_copied, layer_of, merged_experts
from .pipeline_walk import pipeline_peak



class _Coords:
    """The ParallelState attributes `layout_on` reads, for one global rank."""

    def __init__(self, cfg, world_size: int, rank: int):
        p = cfg.parallel
        self.tp_size, self.ep_size, self.etp_size = p.tp, p.ep, p.etp
        self.cp, self.pp = p.cp, p.pp
        self.dp = world_size // (p.tp * p.pp * p.cp)
        per_stage = world_size // p.pp
        i = rank % per_stage
        self.pp_rank = rank // per_stage
        self.tp_rank, self.dp_cp_rank = i % p.tp, i // p.tp
        self.etp_rank, self.ep_rank = i % p.etp, (i // p.etp) % p.ep
        self.edp, self.edp_rank = per_stage // (p.ep * p.etp), i // (p.ep * p.etp)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def param_list(cfg, mc, c: _Coords) -> list[tuple[str, int, int, bool, bool]]:
    """(name, numel, ndim, expert, trainable) of this rank's parameters, in module order."""
    from megaswift.models.lora import target_set
    from megaswift.parallel.pipeline_stages import num_stages, split_layers, stages_of_rank

    p, lora = cfg.parallel, cfg.model.lora
    targets = target_set(lora.targets) if lora.rank else set()
    stages = num_stages(p.pp, p.vpp, p.pp_schedule) if p.pp > 1 else 1
    split = split_layers(mc.num_layers, stages, p.pp_layers) if p.pp > 1 else [range(mc.num_layers)]
    mine = stages_of_rank(c.pp_rank, p.pp, stages, p.pp_schedule) if p.pp > 1 else [0]
    out, seen, shapes = [], set(), {}

    def shape_of(name):  # every layer's parameter of one name has one shape: ask once
        key = name.split(".", 3)[-1] if name.startswith("decoder.layers.") else name
        if key not in shapes:
            shapes[key] = layout_on(name, mc, c, lora.rank).local_shape
        return shapes[key]

    def add(name, adapt=False):
        shape = shape_of(name)
        # the router's expert bias has no gradient (models/routers.py): state, not a trainable
        trainable = not lora.rank and not name.endswith(".expert_bias")
        out.append((name, _numel(shape), len(shape), ".experts." in name, trainable))
        if adapt:
            base = name.rsplit(".", 1)[0]
            for w in "AB":
                shape = shape_of(f"{base}.lora.{w}")
                out.append((f"{base}.lora.{w}", _numel(shape), len(shape), ".experts." in name, True))

    for s in mine:
        names = (["embedding.word_embeddings.weight"] if s == 0 or (s == stages - 1 and mc.tie_word_embeddings)
                 else [])
        for i in split[s]:
            names += layer_param_names(mc, i)
        if s == stages - 1:
            names += ["decoder.final_layernorm.weight"] + ([] if mc.tie_word_embeddings else ["output_layer.weight"])
        listed = set(names)
        for name in names:
            if name in seen:  # zbv: the tied embedding of the first and last stage is one Parameter
                continue
            seen.add(name)
            module = name.rsplit(".", 2)[-2]
            # an adapter follows its layer's bias where it has one (gpt-oss's expert biases are
            # listed after both expert weights)
            has_bias = name.endswith(".weight") and name[: -len("weight")] + "bias" in listed
            adapt = module in targets and (name.endswith(".bias") or not has_bias) and "shared_expert_gate" not in name
            add(name, adapt and (name.endswith(".weight") or name.endswith(".bias")))
    return out


def _zero_shards_ready(cfg, c: _Coords, params, ready) -> int:
    """Under ZeRO-1 the last micro batch's backward reduce-scatters each bucket as soon as all
    its gradients are in, into a new fp32 shard (bucket / dp elements) that lives until the
    step's finish_grad_sync: the bytes of those shards once the parameters `ready(name)` have
    their gradients."""
    if not cfg.optim.zero:
        return 0
    total = 0
    for expert, dp, _ in _parts(c):
        if dp == 1:
            continue
        for b in _buckets(cfg, params, expert):
            if all(ready(name) for name, _, _ in b):
                total += F32 * -(-sum(n for _, n, _ in b) // dp)
    return total


def _inv_freq(mc) -> int:
    """RoPE's inv_freq buffer (fp32): half the rotated dims (the rope part of MLA's heads, a
    fraction of GLM-4.5's)."""
    return mc.rotary_dim // 2 * F32


def _chunks(cfg, c: _Coords) -> int:
    """The model chunks (pipeline stages) this rank holds."""
    from megaswift.parallel.pipeline_stages import num_stages

    p = cfg.parallel
    return 1 if p.pp == 1 else num_stages(p.pp, p.vpp, p.pp_schedule) // p.pp


def _parts(c: _Coords):
    """(expert, group size, rank in it) of the two dp parts: dense over dp x cp, experts over edp."""
    return ((False, c.dp * c.cp, c.dp_cp_rank), (True, c.edp, c.edp_rank))


def _buckets(cfg, params, expert: bool) -> list[list[tuple[str, int, int]]]:
    """parallel/data_parallel.py's buckets of one part: (name, numel, ndim) of its trainable
    parameters in reverse order, closed once they hold >= ddp_bucket_size elements."""
    buckets, current = [], []
    for name, n, nd, e, t in reversed(params):
        if not t or e != expert:
            continue
        current.append((name, n, nd))
        if sum(x for _, x, _ in current) >= cfg.parallel.ddp_bucket_size:
            buckets.append(current)
            current = []
    if current:
        buckets.append(current)
    return buckets


def state_bytes(cfg, mc, c: _Coords, params=None) -> dict:
    """parameters / gradients / optimizer bytes (exact), and the foreach AdamW temporaries."""
    params = param_list(cfg, mc, c) if params is None else params
    frozen = sum(n for _, n, _, _, t in params if not t)
    buf_total, opt, decay, no_decay, piece = 0, 0, 0, 0, 0
    shards = []  # per dp part: its buckets' ZeRO reduce-scatter outputs (fp32)
    for expert, dp, dp_rank in _parts(c):
        shards.append(0)
        for b in _buckets(cfg, params, expert):
            total = sum(n for _, n, _ in b)
            padded = -(-total // dp) * dp
            buf_total += padded
            if cfg.optim.zero and dp > 1:
                shards[-1] += F32 * padded // dp
            lo, hi = ((dp_rank * padded // dp, (dp_rank + 1) * padded // dp) if cfg.optim.zero else (0, padded))
            off = 0
            for _, n, nd in b:
                mine = max(0, min(off + n, hi) - max(off, lo))
                opt += mine
                piece = max(piece, mine)
                decay, no_decay = (decay + mine, no_decay) if nd >= 2 else (decay, no_decay + mine)
                off += n
    inv_freq = _inv_freq(mc) * _chunks(cfg, c)  # one RoPE buffer per pipeline chunk
    return {"params": sum(n for _, n, _, _, _ in params), "trainable": sum(n for _, n, _, _, t in params if t),
            "parameters": F32 * (buf_total + frozen) + inv_freq, "gradients": F32 * buf_total,
            "optimizer": 2 * F32 * opt, "adam_temporaries": F32 * max(decay, no_decay),
            # grad_norm squares one piece at a time: piece.grad.pow(2), then * its weight
            "grad_norm_temporaries": 2 * F32 * piece,
            "zero_shards": shards,
            # matrices of the decoder layers (and adapters): autocast's bf16 copies are of these
            "matmul_params": sum(n for name, n, nd, _, _ in params if nd >= 2 and "word_embeddings" not in name
                                 and "output_layer" not in name and bf16_copied(name, mc)),
            # what autocast's weight cache keeps until the forward ends: trainable F.linear weights
            "cached_params": sum(n for name, n, nd, e, t in params if nd >= 2 and t and not e
                                 and "word_embeddings" not in name and "output_layer" not in name
                                 and bf16_copied(name, mc)),
            "adapters": sum(1 for name, *_ in params if name.endswith(".lora.A"))}


def reference_mode(cfg, algorithm: str) -> str | None:
    """What the algorithm holds as its reference: None (SFT), "precompute", "copy" or "adapters"
    (train/dpo.py, train/reference.py)."""
    if algorithm != "dpo":
        return None
    if cfg.dpo.precompute_ref:
        return "precompute"
    from megaswift.train.reference import reference_mode as resolve

    return resolve(cfg, "dpo")


def predict_position(cfg, model_cfg, world_size: int, rank: int, cuda_optimizer: bool = True,
                     algorithm: str = "sft") -> dict:
    """Predicted bytes of `rank` in a steady-state step of `algorithm` ("sft" or "dpo", see the
    module docstring); `cuda_optimizer` as in dry_run_position (fused AdamW: no foreach
    temporaries)."""
    from megaswift.parallel.pipeline_stages import num_stages, split_layers, stages_of_rank

    mc, p = model_cfg, cfg.parallel
    c = _Coords(cfg, world_size, rank)
    plist = param_list(cfg, mc, c)
    state = state_bytes(cfg, mc, c, plist)
    ref = reference_mode(cfg, algorithm)
    if ref == "copy":  # a frozen fp32 copy of the base, sharded like the policy, with its RoPE buffers
        state["reference"] = F32 * sum(n for name, n, *_ in plist if ".lora." not in name) + \
            _inv_freq(mc) * _chunks(cfg, c)
        state["parameters"] += state["reference"]
    rows = cfg.train.micro_batch_size * (2 if algorithm == "dpo" else 1)  # DPO: chosen and rejected rows
    T = rows * cfg.data.seq_len // p.cp
    Tq = T // p.tp if p.sp else T
    H, V = mc.hidden_size, mc.padded_vocab_size(p.tp) // p.tp
    stages = num_stages(p.pp, p.vpp, p.pp_schedule) if p.pp > 1 else 1
    mine = stages_of_rank(c.pp_rank, p.pp, stages, p.pp_schedule) if p.pp > 1 else [0]
    split = split_layers(mc.num_layers, stages, p.pp_layers) if p.pp > 1 else [range(mc.num_layers)]
    first, last = 0 in mine, stages - 1 in mine
    names = [n for n, *_ in plist]
    layer_ids = sorted({layer_of(n) for n in names if n.startswith("decoder.layers.")})
    n_moe = sum(1 for i in layer_ids if i in mc.moe_layers)
    kinds = _layer_kinds(cfg, mc, rows, range(mc.num_layers))  # (mixer, moe, window) -> its terms
    per = {k: sum(t.values()) for k, t in kinds.items()}
    weights = BF16 * state["matmul_params"]  # autocast's bf16 copies of every layer's matmul weights
    frozen = bool(cfg.model.lora.rank)
    n_micro = cfg.train.global_batch(c.dp) // (cfg.train.micro_batch_size * c.dp)
    terms = {}
    for i in layer_ids:
        for k, v in kinds[layer_terms.kind_of(mc, i)].items():
            terms[f"layer_{k}"] = terms.get(f"layer_{k}", 0) + v
    terms["layer_weight_copies"] = weights
    full = cfg.train.recompute == "full"
    one = max((per[layer_terms.kind_of(mc, i)] for i in layer_ids), default=0) + weights // max(1, len(layer_ids))
    if full:  # only each layer's input stays; one layer reruns in backward
        terms = {"layer_inputs": F32 * Tq * H * len(layer_ids), "layer_weight_copies": BF16 * state["cached_params"],
                 "recompute_one_layer": one}
    inputs = n_micro * 4 * 8 * rows * cfg.data.seq_len  # the step's token tensors
    cos_sin = 2 * F32 * T * mc.rotary_dim
    # the embedding's output is saved by the first norm (not when frozen); the final norm keeps
    # x * rsqrt (not when frozen) and its output lives on as a local of GPTModel.forward
    emb = 0 if frozen else F32 * Tq * H
    final = F32 * ((0 if frozen else Tq * H) + Tq)
    out_in = 0 if frozen else BF16 * T * H  # the output layer's bf16 input, saved for its weight
    wgrad = 0 if frozen else (BF16 + F32) * V * H  # the output layer's weight gradient, bf16 and fp32
    logits = BF16 * T * V + 2 * F32 * T * V  # bf16 logits, then the cross entropy's two fp32 copies
    terms.update(inputs=inputs, cos_sin=cos_sin)
    if first:
        terms["embedding_out"] = emb
    if last:
        terms.update(final_norm=final + F32 * Tq * H, output_input_bf16=out_in, output_weight_bf16=BF16 * V * H,
                     logits_bf16=BF16 * T * V, cross_entropy_fp32=2 * F32 * T * V, output_weight_grad=wgrad)
    held = state["parameters"] + state["gradients"] + state["optimizer"]
    # after the backward: dp's grad_norm squares each piece of the gradient (two fp32 temporaries)
    candidates = {"optimizer": 0 if cuda_optimizer else state["adam_temporaries"],
                  "grad_norm": inputs + state["grad_norm_temporaries"]}
    if any(state["zero_shards"]):
        # ZeRO-1's reduce-scatter outputs: without a pipeline every bucket starts during the last
        # backward, so all of them are alive at its end; under pp finish_grad_sync starts them
        # after the schedule, one dp part (dense, then experts) at a time
        candidates["grad_sync"] = inputs + (sum(state["zero_shards"]) if p.pp == 1 else max(state["zero_shards"]))
    if p.pp == 1:
        layers = sum(per[layer_terms.kind_of(mc, i)] for i in layer_ids) + weights
        if full:
            layers = terms["layer_inputs"] + terms["layer_weight_copies"]
        common = inputs + cos_sin + emb + final
        candidates["forward"] = layers + common + F32 * Tq * H + out_in + BF16 * V * H + logits
        build = layer_terms.window_build(cfg, mc, rows, layer_ids)
        if build:  # the last sliding-window layer building its mask in the forward
            at_build = (terms["layer_inputs"] if full else
                        layer_terms.held_at_window_build(cfg, mc, kinds, layer_ids, rows) + weights)
            candidates["window_build"] = at_build + inputs + cos_sin + emb + build
        if merged_experts(cfg, mc):  # LoRA on the experts: the last MoE layer's merged fp32 weights
            candidates["lora_expert_merge"] = layers + common + merged_experts(cfg, mc)
        candidates["backward"] = layers + common + wgrad + F32 * T * H
        if full:
            candidates["backward"] -= terms["layer_weight_copies"]
            candidates["recompute"] = layers - terms["layer_weight_copies"] + common + one + 2 * F32 * Tq * H
            if build:  # the last sliding-window layer rebuilt in the backward, building its mask
                # again: the saved inputs of the layers up to it (the embedding's output is layer
                # 0's), the layer's own tensors before the core, the gradient flowing back
                last_w = layer_terms.windowed(mc, layer_ids)[-1]
                inputs_left = sum(1 for i in layer_ids if i <= last_w and not (first and i == 0))
                rebuilt = layer_terms.held_at_window_build(cfg, mc, kinds, [last_w], rows)
                candidates["window_build"] = max(candidates["window_build"], F32 * Tq * H * inputs_left
                                                 + terms["layer_weight_copies"]
                                                 + inputs + cos_sin + emb + rebuilt + 2 * F32 * Tq * H + build)
        if n_moe and not frozen:  # the last MoE layer's grouped fc1 weight gradient in bf16 and its fp32 cast
            e_local, Fe = mc.num_moe_experts // p.ep, mc.moe_ffn_hidden_size // p.etp
            fc1, fc2 = e_local * 2 * Fe * H, e_local * H * Fe
            # its grouped GEMM's node has released the layer's bf16 expert copies before the cast
            # (full recompute: the rebuilt layer's, which `one` counts as an average layer's copies)
            own = min(BF16 * (fc1 + fc2), weights // max(1, len(layer_ids))) if full else BF16 * (fc1 + fc2)
            # what the backward has finished by then: the output layer, the layers after the last
            # MoE one, that layer's shared expert (it runs first) and its experts' fc2
            last = max(i for i in layer_ids if i in mc.moe_layers)
            done = (f"decoder.layers.{last}.mlp.shared_expert.", f"decoder.layers.{last}.mlp.experts.linear_fc2.",
                    "output_layer.", "decoder.final_layernorm.")

            def ready(name):
                i = layer_of(name)
                return (i is not None and i > last) or name.startswith(done)

            candidates["expert_weight_grad"] = (layers - (terms["layer_weight_copies"] if full else 0) + common
                                                + (one if full else 0) + (BF16 + F32) * fc1 - own
                                                + _zero_shards_ready(cfg, c, plist, ready))
        terms["micro_batches_in_flight"] = 1
    else:
        pp_candidates, flight = pipeline_peak(cfg, mc, c, plist, split, mine, stages, n_micro, kinds, terms, rows)
        terms["micro_batches_in_flight"] = flight
        candidates.update({k: v + inputs for k, v in pp_candidates.items()})
    when = max(candidates, key=candidates.get)
    act = candidates[when]
    return {"params": state["params"], "trainable": state["trainable"], "parameters": state["parameters"],
            "gradients": state["gradients"], "optimizer": state["optimizer"],
            "activations": 0 if when == "optimizer" else act, "temporaries": act if when == "optimizer" else 0,
            "peak": held + act, "peak_at": when, "candidates": candidates, "terms": terms,
            # what decoding (rollouts) keeps per sequence for this rank's linear-attention layers
            "recurrent_state_per_sequence": layer_terms.recurrent_state(mc, p.tp, layer_ids)}


def _layer_kinds(cfg, mc, rows: int, layers) -> dict:
    """The saved-activation terms (planner/layer_terms.py) of each kind of layer among `layers`:
    (token mixer, MoE, sliding window) -> terms."""
    out = {}
    for i in layers:
        kind = layer_terms.kind_of(mc, i)
        if kind not in out:
            out[kind] = layer_terms.layer_terms(cfg, mc, kind[1], rows, kind[0], kind[2])
    return out
