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
(the residual stream and norms, the token mixer's tensors for GQA and for multi-latent attention,
the dense MLP, the MoE router (softmax or DeepSeek's fp32 sigmoid router), dispatch and shared
expert), plus
  weights      2 x matmul params   autocast's bf16 weight copies, saved by every matmul (not of
                                   the fp32 sigmoid router's weight); dense ones cached once per
                                   step, the experts' cast per micro batch (grouped GEMM)
Full recompute keeps only each layer's input (4 Tq H) and reruns one layer in backward.

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

Pipeline (pp > 1, checked against the dry run for 1f1b, gpipe, interleaved and zbv): the rank's
actions of the schedule (`schedule_actions`: the order PipelineRunner._actions runs, torch's own
`pipeline_order` for the multi-stage schedules) are walked, keeping the saved activations of each
(stage, micro batch) from its forward to its backward (zbv: to its W, the input-gradient pass
frees nothing); the in-flight rule is therefore the schedule's, e.g. 1f1b min(m, pp - r) micro
batches, gpipe m. Per (stage, micro batch): its layers' terms above, cos/sin, the stage input
(the embedding's output on the first stage, the fp32 hidden states received on the others) and on
the last stage the final norm, the output layer's bf16 input and the loss's saved fp32 exp
(4 T V). The whole schedule runs in one autocast region, so autocast caches one bf16 copy of each
trainable dense matrix for the step (the rank's, plus the output layer's 2 V H on the last
stage; experts and frozen weights are cast per micro batch). That cache changes the backward: the
cast nodes belong to micro batch 0's graph and autograd's ready queue runs the lowest sequence
numbers last, so in the backward of every later micro batch all of the stage's bf16 weight
gradients (2 x its cached elements) stay until the end, where the casts run (each adds its fp32
gradient and frees its bf16 one); on the first stage the embedding's dense fp32 gradient (4 V H)
comes first. The peak is the largest of
  forward    the in-flight activations at the end of a forward (last stage: + the bf16 logits
             and the loss's other fp32 copy, 2 T V + 4 T V);
  backward   the start of a backward (+ fc2's bf16 weight gradient and the MLP's input
             gradients; the last stage's micro batch 0: + the output layer's 6 V H), or its end
             (the other micro batches in flight + the drained weight gradients above); full
             recompute: + one layer rebuilt;
  grad_norm  after the schedule (above); usually the first stage's end of a backward wins;
  grad_sync  (ZeRO-1) finish_grad_sync starts the reduce-scatters after the schedule, one dp part
             (dense, then experts) at a time: the larger part's fp32 shards;
  an MoE layer's fc1 weight gradient (bf16 + fp32) counts the in-flight micro batches' expert
  copies less its own.
zbv's split backward (torch's stage_backward_input / stage_backward_weight; the first stage's I
does nothing and its W is a whole backward): an I (stage s > 0) keeps, until its W, the gradient
at every param group's intermediate (`_input_pass_grads`: each trainable weight's output
gradient, bf16 for matmuls, fp32 for norms, the last stage's bf16 logits gradient) and the stage
input's .grad; detaching the root frees what only nodes above every intermediate saved (the
output sent on; the last stage's saved exp). The output handed to stage s + 1 on the same rank is
counted once, as that stage's input. A W runs one param group at a time, in parameter order
(`_weight_pass_top`: a bf16 weight gradient and its fp32 cast, less what the groups before it
freed; the last stage's output layer comes last). Measured on zbv (Llama-3.1-70B cut tp8 sp pp4,
Qwen3-8B cut pp2 cp4 and tp2 sp pp4, Qwen3-30B-A3B cut tp2 ep2 pp2): every rank within 1.2%.
"""
from __future__ import annotations

from functools import lru_cache

from megaswift.models.sharding import layer_param_names, layout_on
from megaswift.parallel.pipeline_stages import single_stage_order

from . import layer_terms
from .layer_terms import BF16, F32, bf16_copied



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
        for j, name in enumerate(names):
            if name in seen:  # zbv: the tied embedding of the first and last stage is one Parameter
                continue
            seen.add(name)
            module = name.rsplit(".", 2)[-2]
            has_bias = j + 1 < len(names) and names[j + 1].endswith(module + ".bias")
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


def schedule_actions(schedule: str, pp: int, vpp: int, r: int, m: int) -> tuple:
    """pp rank r's compute actions in one step, in order: (F | B | I | W, stage, micro batch),
    as PipelineRunner._actions runs them (torch's own `pipeline_order` for the multi-stage
    schedules, computed here without stages)."""
    return _schedule_actions(schedule, pp, vpp, r, m)


@lru_cache(maxsize=4096)
def _schedule_actions(schedule: str, pp: int, vpp: int, r: int, m: int) -> tuple:
    if schedule in ("1f1b", "gpipe"):
        return tuple(single_stage_order(schedule, r, pp, m))
    from torch.distributed.pipelining import ScheduleInterleaved1F1B, ScheduleZBVZeroBubble

    if schedule == "interleaved":
        sched = object.__new__(ScheduleInterleaved1F1B)
        sched.n_local_stages = vpp
        rounds = max(1, m // pp)
        sched.microbatches_per_round = m // rounds
    else:
        sched = object.__new__(ScheduleZBVZeroBubble)
        sched.num_stages = 2 * pp
    sched.pp_group_size, sched._n_microbatches = pp, m
    return tuple((a.computation_type.value, a.stage_index, a.microbatch_index)
                 for a in sched._calculate_single_rank_operations(r)
                 if a is not None and a.computation_type.value in ("F", "B", "I", "W"))


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("decoder.layers.") else None


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
    layer_ids = sorted({_layer_of(n) for n in names if n.startswith("decoder.layers.")})
    n_moe = sum(1 for i in layer_ids if i in mc.moe_layers)
    dense, moe = layer_terms.layer_terms(cfg, mc, False, rows), layer_terms.layer_terms(cfg, mc, True, rows)
    weights = BF16 * state["matmul_params"]  # autocast's bf16 copies of every layer's matmul weights
    frozen = bool(cfg.model.lora.rank)
    per_dense, per_moe = sum(dense.values()), sum(moe.values())
    n_micro = cfg.train.global_batch(c.dp) // (cfg.train.micro_batch_size * c.dp)
    terms = {f"layer_{k}": v * (len(layer_ids) - n_moe) for k, v in dense.items()}
    for k, v in moe.items():
        terms[f"layer_{k}"] = terms.get(f"layer_{k}", 0) + v * n_moe
    terms["layer_weight_copies"] = weights
    full = cfg.train.recompute == "full"
    one = max(per_dense if n_moe < len(layer_ids) else 0, per_moe if n_moe else 0) + weights // max(1, len(layer_ids))
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
        layers = (n_moe * per_moe + (len(layer_ids) - n_moe) * per_dense) + weights
        if full:
            layers = terms["layer_inputs"] + terms["layer_weight_copies"]
        common = inputs + cos_sin + emb + final
        candidates["forward"] = layers + common + F32 * Tq * H + out_in + BF16 * V * H + logits
        if _merged_experts(cfg, mc):  # LoRA on the experts: the last MoE layer's merged fp32 weights
            candidates["lora_expert_merge"] = layers + common + _merged_experts(cfg, mc)
        candidates["backward"] = layers + common + wgrad + F32 * T * H
        if full:
            candidates["backward"] -= terms["layer_weight_copies"]
            candidates["recompute"] = layers - terms["layer_weight_copies"] + common + one + 2 * F32 * Tq * H
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
                i = _layer_of(name)
                return (i is not None and i > last) or name.startswith(done)

            candidates["expert_weight_grad"] = (layers - (terms["layer_weight_copies"] if full else 0) + common
                                                + (one if full else 0) + (BF16 + F32) * fc1 - own
                                                + _zero_shards_ready(cfg, c, plist, ready))
        terms["micro_batches_in_flight"] = 1
    else:
        pp_candidates, flight = _pipeline_peak(cfg, mc, c, plist, split, mine, stages, n_micro, dense, moe, terms, rows)
        terms["micro_batches_in_flight"] = flight
        candidates.update({k: v + inputs for k, v in pp_candidates.items()})
    when = max(candidates, key=candidates.get)
    act = candidates[when]
    return {"params": state["params"], "trainable": state["trainable"], "parameters": state["parameters"],
            "gradients": state["gradients"], "optimizer": state["optimizer"],
            "activations": 0 if when == "optimizer" else act, "temporaries": act if when == "optimizer" else 0,
            "peak": held + act, "peak_at": when, "candidates": candidates, "terms": terms}


def _merged_experts(cfg, mc) -> int:
    """LoRA on the experts (linear_fc1 / linear_fc2 targets): each MoE layer's forward merges
    W + B A in fp32 for all of a rank's experts (parallel/lora.py), and the merged weights live
    until its dispatch returns: the bytes of one layer's."""
    if not mc.moe_layers or not cfg.model.lora.rank:
        return 0
    p, adapted = cfg.parallel, layer_terms.adapted_targets(cfg, mc)
    e_local, Fe = mc.num_moe_experts // p.ep, mc.moe_ffn_hidden_size // p.etp
    return F32 * e_local * Fe * mc.hidden_size * (2 * ("linear_fc1" in adapted) + ("linear_fc2" in adapted))


def _input_pass_grads(cfg, mc, c, layers, s, stages, rows) -> int:
    """zbv: what stage s's input-gradient pass (stage_backward_input) keeps for its weight pass,
    per micro batch: the gradient at every param group's intermediate (each trainable weight's
    output gradient, planner/layer_terms.py) and the stage input's .grad (the retained graph
    keeps the leaf alive)."""
    p = cfg.parallel
    if cfg.model.lora.rank:
        return 0
    T, Tq, _ = layer_terms.tokens(cfg, rows)
    H = mc.hidden_size
    total = sum(layer_terms.input_pass_grads(cfg, mc, i, rows) for i in layers)
    if s > 0:
        total += F32 * Tq * H
    if s == stages - 1:  # the final norm's and the output layer's output gradients
        total += F32 * Tq * H + BF16 * T * (mc.padded_vocab_size(p.tp) // p.tp)
    return total


def _weight_pass_top(cfg, mc, c, plist, layers, rows) -> int:
    """zbv: the most a weight pass (stage_backward_weight) adds, beyond the activations and the
    held input-pass gradients: it runs one param group at a time, in parameter order, each making
    a bf16 weight gradient and its fp32 cast while the groups before it have freed their output
    gradients and the inputs (and per-micro-batch weight copies) their matmuls saved. The stage's
    first layer has freed the least."""
    if cfg.model.lora.rank or not layers:
        return 0
    frees = layer_terms.weight_pass_frees(cfg, mc, rows)
    freed, most = 0, 0
    for name, n, nd, expert, trainable in plist:
        if _layer_of(name) != layers[0] or not trainable:
            continue
        module = name.rsplit(".", 2)[-2]
        # its own node has run (and released what it saved: a per-micro-batch expert weight copy)
        # before the fp32 cast of its bf16 gradient
        most = max(most, (BF16 + F32) * n * (nd >= 2) - freed - (BF16 * n if expert else 0))
        freed += frees.get(module, 0) + (BF16 * n if expert else 0)
    return most


def _pipeline_peak(cfg, mc, c, plist, split, mine, stages, n_micro, dense, moe, terms, rows) -> tuple[dict, float]:
    """The largest live bytes (beyond the state and the step's inputs) in each phase of this
    rank's schedule, by walking its actions (see the module docstring); and the most micro
    batches (in units of the rank's layers) in flight at once."""
    p = cfg.parallel
    T = rows * cfg.data.seq_len // p.cp
    Tq = T // p.tp if p.sp else T
    H, V = mc.hidden_size, mc.padded_vocab_size(p.tp) // p.tp
    frozen = bool(cfg.model.lora.rank)
    full = cfg.train.recompute == "full"
    per_dense, per_moe = sum(dense.values()), sum(moe.values())
    cos_sin = 2 * F32 * T * mc.rotary_dim
    out_trainable = not frozen
    # per stage: saved activations per micro batch (A), per-micro-batch bf16 weight copies (Wu:
    # weights autocast does not cache: experts, frozen), the cached copies (Wc: one per step),
    # and the cached matrices in the order their casts were made (their gradients' order, reversed)
    A, Wu, Wc, casts, n_layers = {}, {}, {}, {}, {}
    for s in mine:
        ids = set(split[s])
        mats = [(name, n, t and not e) for name, n, nd, e, t in plist
                if nd >= 2 and _layer_of(name) in ids and bf16_copied(name, mc)]
        cached = [n for _, n, keep in mats if keep]
        Wc[s] = BF16 * sum(cached)
        Wu[s] = BF16 * sum(n for _, n, keep in mats if not keep)
        casts[s] = cached
        n_m = sum(1 for i in ids if i in mc.moe_layers)
        n_layers[s] = len(ids)
        if full:
            a = F32 * Tq * H * len(ids)
            Wu[s] = 0
        else:
            a = n_m * per_moe + (len(ids) - n_m) * per_dense
        # the stage's input: the embedding's output (first stage) or what the stage before sent
        a += cos_sin + (F32 * Tq * H if s > 0 else (0 if frozen else F32 * Tq * H))
        if s == stages - 1:  # the final norm, the output layer's bf16 input, the loss's saved exp
            a += F32 * ((0 if frozen else Tq * H) + Tq) + (0 if frozen else BF16 * T * H) + F32 * T * V
            Wc[s] += BF16 * V * H
            if out_trainable:
                casts[s] = casts[s] + [V * H]
        if p.pp_schedule == "zbv" and s + 1 in mine:  # handed to stage s + 1 here: its input, counted there
            a -= F32 * Tq * H
        A[s] = a
    W = sum(Wc.values())
    last_stage = stages - 1
    igrad = {s: _input_pass_grads(cfg, mc, c, split[s], s, stages, rows) for s in mine}
    w_pass = {s: _weight_pass_top(cfg, mc, c, plist, list(split[s]), rows) for s in mine}
    if last_stage in mine and not frozen:  # the output layer's group comes last: the layers'
        # groups have freed their output gradients and saved inputs, its own (the logits') stays
        T_, F_ = T, mc.ffn_hidden_size // p.tp
        core = layer_terms.core_out(cfg, mc, rows)
        freed = sum(dense["casts"] + dense["norms"] + core + (0 if i in mc.moe_layers else BF16 * T_ * F_)
                    for i in split[last_stage])
        w_pass[last_stage] = max(w_pass[last_stage], (BF16 + F32) * V * H + BF16 * T * V
                                 - igrad[last_stage] - freed)
    # the experts' weights are cast by hand for the grouped GEMM (parallel/experts.py), so their
    # weight gradient comes out of the GEMM in bf16 for all of a rank's experts at once and is
    # cast to the fp32 master gradient: both live together, for fc1, the larger of the two
    e_local = (mc.num_moe_experts or 0) // p.ep
    fc1 = e_local * 2 * ((mc.moe_ffn_hidden_size or 0) // p.etp) * H
    expert_copies = BF16 * fc1 * 3 // 2  # one MoE layer's bf16 fc1 and fc2 copies
    expert_wgrad = {s: (BF16 + F32) * fc1 if not frozen and any(i in mc.moe_layers for i in split[s]) else 0
                    for s in mine}
    # the cached matrices whose bf16 gradients a backward has made (and, after micro batch 0,
    # keeps) before the stage's last MoE layer's fc1: the output layer, the layers after it, its
    # shared expert
    grads_before = {}
    for s in mine:
        last_moe = max((i for i in split[s] if i in mc.moe_layers), default=-1)

        def after(name):
            i = _layer_of(name)
            return i is not None and i in split[s] and (i > last_moe or (i == last_moe and ".shared_expert." in name))

        grads_before[s] = BF16 * (sum(n for name, n, nd, e, t in plist if t and not e and nd >= 2 and after(name)
                                      and bf16_copied(name, mc))
                                  + (V * H if s == stages - 1 and out_trainable else 0))
    one_layer = 0
    if full:  # one layer's activations rebuilt in each backward
        one_layer = max(per_moe if any(i in mc.moe_layers for s in mine for i in split[s]) else 0, per_dense)

    def drain(s):
        """The most the bf16 weight gradients of stage s plus their fp32 casts hold when the casts
        run last (every cast node made before this micro batch's graph): all bf16 gradients
        first, then each cast in reverse order of creation frees its bf16 input."""
        held, most = BF16 * sum(casts[s]), 0
        for n in reversed(casts[s]):
            most = max(most, held + F32 * n)
            held -= BF16 * n
        return most

    grad_drain = {s: drain(s) for s in mine}
    merged = _merged_experts(cfg, mc)
    # a stage's first layer in its token mixer's backward (the last thing a stage's backward
    # computes but the embedding): its mixer's tensors, ring attention's temporaries, and (after
    # micro batch 0) the stage's bf16 weight gradients but those of the mixer's input projections
    ring = layer_terms.ring_backward_temporaries(cfg, mc, rows)
    mixer_first = {}
    for s in mine:
        first_id = split[s][0] if len(split[s]) else None
        projections = sum(n for name, n, nd, e, t in plist if _layer_of(name) == first_id and t and nd >= 2
                          and ".self_attention." in name and not name.endswith("linear_proj.weight"))
        mixer_first[s] = (layer_terms.mixer_saved(cfg, mc, rows) + ring, BF16 * (sum(casts[s]) - projections))
    prompt = {s: max([(BF16 + F32) * n for n in casts[s]] or [0]) for s in mine}
    emb_grad = 0 if frozen else F32 * V * H
    logits = BF16 * T * V + F32 * T * V  # bf16 logits and the loss's other fp32 copy (its exp is saved)
    # a backward's first layer (MLP first): fc2's bf16 weight gradient and the MLP's input gradients
    F_mlp = (mc.moe_ffn_hidden_size // p.etp if any(i in mc.moe_layers for s in mine for i in split[s])
             else mc.ffn_hidden_size // p.tp)
    first_layer = 2 * BF16 * H * F_mlp + 2 * BF16 * T * F_mlp + F32 * Tq * H
    out = {"forward": 0, "backward": 0}
    live, flight, most_flight = 0, {}, 0.0
    per_rank_layers = max(1, sum(n_layers.values()))
    # every schedule but GPipe reaches its most micro batches in flight within the first 2 pp
    # (the dry run's cap, planner/dry_run.py): walking more would repeat the steady state
    walked = n_micro if p.pp_schedule == "gpipe" else min(n_micro, 2 * p.pp)
    flight_layers = 0
    pending, held_i = {}, 0  # zbv: what each input-gradient pass (I) keeps until its W
    for kind, s, i in schedule_actions(p.pp_schedule, p.pp, p.vpp, c.pp_rank, walked):
        if kind == "F":
            flight[(s, i)] = A[s] + Wu[s]
            live += flight[(s, i)]
            flight_layers += n_layers[s]
            most_flight = max(most_flight, flight_layers / per_rank_layers)
            top = live + held_i + (logits if s == last_stage else 0)
            if merged and any(j in mc.moe_layers for j in split[s]):  # during its last MoE layer
                top = max(top, live + held_i + merged)
            out["forward"] = max(out["forward"], W + top)
            continue
        if kind == "I" and s == 0:  # torch's first stage leaves its whole backward to W
            continue
        if kind == "I":  # the input gradients: the graph (and so the activations) stays for W,
            # with the gradients of the param groups' intermediates and the stage input's .grad
            pending[(s, i)] = igrad[s]
            held_i += igrad[s]
            out["backward"] = max(out["backward"], W + live + held_i + (BF16 + F32) * T * H)
            # the root is detached: what only the nodes above every param group's intermediate
            # saved goes, i.e. the output sent on, or on the last stage the loss's saved exp
            drop = F32 * T * V if s == last_stage else (F32 * Tq * H if s + 1 not in mine else 0)
            flight[(s, i)] -= drop
            live -= drop
            continue
        mb = flight.pop((s, i))
        flight_layers -= n_layers[s]
        others = live - mb
        if kind == "W" and s > 0:  # weight gradients, one param group (one fp32 dW) at a time
            out["backward"] = max(out["backward"], W + live + held_i + w_pass[s])
            held_i -= pending.pop((s, i))
            live = others
            continue
        if s == 0:  # the embedding's dense fp32 gradient, made before the casts' gradients
            end = max(emb_grad + (BF16 * sum(casts[s]) if i > 0 else 0), grad_drain[s] if i > 0 else prompt[s])
        else:
            end = grad_drain[s] if i > 0 else prompt[s]
        top = held_i + max(others + end, live + first_layer)
        if ring and n_layers[s]:  # the mixer's backward of the stage's first layer under ring attention
            top = max(top, held_i + others + mixer_first[s][0] + (mixer_first[s][1] if i > 0 else 0))
        if s == last_stage and i == 0 and not frozen:  # the output layer's weight gradient, first
            top = max(top, live - F32 * T * V + (BF16 + F32) * V * H + F32 * T * H)
        if full:  # the last layer rebuilt: the stage's other weight gradients are already made
            top = max(top, live + one_layer + 2 * F32 * Tq * H + (BF16 * sum(casts[s]) if i > 0 else 0))
        if expert_wgrad[s]:  # an MoE layer's grouped weight gradient (bf16) and its fp32 cast; its own
            # per-micro-batch expert copies went with its grouped GEMM's node (rebuilt ones under full)
            # (the last stage's loss has freed its saved exp by then)
            top = max(top, held_i + live + expert_wgrad[s] - (0 if full else expert_copies)
                      + (one_layer if full else 0) + (grads_before[s] if i > 0 else 0)
                      - (F32 * T * V if s == last_stage else 0))
        out["backward"] = max(out["backward"], W + top)
        live = others
    return out, most_flight
