"""The pipeline part of planner/memory_model.py: the largest live bytes in each phase of one pp
rank's schedule (`pipeline_peak`), by walking the actions that rank runs.

Pipeline (pp > 1, checked against the dry run for 1f1b, gpipe, interleaved and zbv): the rank's
actions of the schedule (`schedule_actions`: the order PipelineRunner._actions runs, torch's own
`pipeline_order` for the multi-stage schedules) are walked, keeping the saved activations of each
(stage, micro batch) from its forward to its backward (zbv: to its W, the input-gradient pass
frees nothing); the in-flight rule is therefore the schedule's, e.g. 1f1b min(m, pp - r) micro
batches, gpipe m. Per (stage, micro batch): its layers' terms (planner/layer_terms.py), cos/sin, the stage input
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
             and the loss's other fp32 copy, 2 T V + 4 T V), or where the stage's last
             sliding-window layer builds its mask (layer_terms.window_build, with what that
             micro batch holds by then);
  backward   the start of a backward (+ fc2's bf16 weight gradient and the MLP's input
             gradients; the last stage's micro batch 0: + the output layer's 6 V H), or its end
             (the other micro batches in flight + the drained weight gradients above); full
             recompute: + one layer rebuilt;
  grad_norm  after the schedule (memory_model.py); usually the first stage's end of a backward wins;
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

from megaswift.parallel.pipeline_stages import single_stage_order

from . import layer_terms
from .layer_terms import BF16, F32, bf16_copied, layer_of, merged_experts


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
        if layer_of(name) != layers[0] or not trainable:
            continue
        module = name.rsplit(".", 2)[-2]
        # its own node has run (and released what it saved: a per-micro-batch expert weight copy)
        # before the fp32 cast of its bf16 gradient
        most = max(most, (BF16 + F32) * n * (nd >= 2) - freed - (BF16 * n if expert else 0))
        freed += frees.get(module, 0) + (BF16 * n if expert else 0)
    return most


def pipeline_peak(cfg, mc, c, plist, split, mine, stages, n_micro, kinds, terms, rows) -> tuple[dict, float]:
    """The largest live bytes (beyond the state and the step's inputs) in each phase of this
    rank's schedule, by walking its actions (see the module docstring); and the most micro
    batches (in units of the rank's layers) in flight at once."""
    p = cfg.parallel
    T = rows * cfg.data.seq_len // p.cp
    Tq = T // p.tp if p.sp else T
    H, V = mc.hidden_size, mc.padded_vocab_size(p.tp) // p.tp
    frozen = bool(cfg.model.lora.rank)
    full = cfg.train.recompute == "full"
    per = {k: sum(t.values()) for k, t in kinds.items()}  # (mixer, moe, window) -> a layer's bytes
    cos_sin = 2 * F32 * T * mc.rotary_dim
    out_trainable = not frozen
    # per stage: saved activations per micro batch (A), per-micro-batch bf16 weight copies (Wu:
    # weights autocast does not cache: experts, frozen), the cached copies (Wc: one per step),
    # and the cached matrices in the order their casts were made (their gradients' order, reversed)
    A, Wu, Wc, casts, n_layers = {}, {}, {}, {}, {}
    for s in mine:
        ids = set(split[s])
        mats = [(name, n, t and not e) for name, n, nd, e, t in plist
                if nd >= 2 and layer_of(name) in ids and bf16_copied(name, mc)]
        cached = [n for _, n, keep in mats if keep]
        Wc[s] = BF16 * sum(cached)
        Wu[s] = BF16 * sum(n for _, n, keep in mats if not keep)
        casts[s] = cached
        n_layers[s] = len(ids)
        if full:
            a = F32 * Tq * H * len(ids)
            Wu[s] = 0
        else:
            a = sum(per[layer_terms.kind_of(mc, i)] for i in ids)
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
        mixers = {layer_terms.mixer_of(mc, i) for i in split[last_stage]}
        dense = {m: layer_terms.layer_terms(cfg, mc, False, rows, m) for m in mixers}  # a dense layer's casts
        freed = sum(dense[m]["casts"] + dense[m]["norms"] + layer_terms.core_out(cfg, mc, rows, i)
                    + (0 if i in mc.moe_layers else BF16 * T_ * F_)
                    for i in split[last_stage] for m in [layer_terms.mixer_of(mc, i)])
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
            i = layer_of(name)
            return i is not None and i in split[s] and (i > last_moe or (i == last_moe and ".shared_expert." in name))

        grads_before[s] = BF16 * (sum(n for name, n, nd, e, t in plist if t and not e and nd >= 2 and after(name)
                                      and bf16_copied(name, mc))
                                  + (V * H if s == stages - 1 and out_trainable else 0))
    one_layer = 0
    if full:  # one layer's activations rebuilt in each backward
        one_layer = max(per[layer_terms.kind_of(mc, i)] for s in mine for i in split[s])

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
    # the stage's last sliding-window layer building its mask in a forward: what the micro batch
    # holds by then instead of its whole A[s] (under full recompute, and in the rebuilt layer of
    # a backward: all of it, an upper bound)
    build = {s: layer_terms.window_build(cfg, mc, rows, split[s]) for s in mine}
    short = {s: 0 if not build[s] or full else
             sum(per[layer_terms.kind_of(mc, i)] for i in split[s])
             - layer_terms.held_at_window_build(cfg, mc, kinds, split[s], rows) for s in mine}
    rebuilt = {s: layer_terms.held_at_window_build(cfg, mc, kinds, layer_terms.windowed(mc, split[s])[-1:], rows)
               if build[s] else 0 for s in mine}
    merged = merged_experts(cfg, mc)
    # a stage's first layer in its token mixer's backward (the last thing a stage's backward
    # computes but the embedding): its mixer's tensors, ring attention's temporaries, and (after
    # micro batch 0) the stage's bf16 weight gradients but those of the mixer's input projections
    ring = layer_terms.ring_backward_temporaries(cfg, mc, rows)
    mixer_first = {}
    for s in mine:
        first_id = split[s][0] if len(split[s]) else None
        projections = sum(n for name, n, nd, e, t in plist if layer_of(name) == first_id and t and nd >= 2
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
            top = max(live + held_i + (logits if s == last_stage else 0),
                      live + held_i + build[s] - short[s] if build[s] else 0)
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
            if build[s]:  # a rebuilt sliding-window layer building its mask: its tensors before the core
                top = max(top, live + rebuilt[s] + build[s] + 2 * F32 * Tq * H + (BF16 * sum(casts[s]) if i > 0 else 0))
        if expert_wgrad[s]:  # an MoE layer's grouped weight gradient (bf16) and its fp32 cast; its own
            # per-micro-batch expert copies went with its grouped GEMM's node (rebuilt ones under full)
            # (the last stage's loss has freed its saved exp by then)
            top = max(top, held_i + live + expert_wgrad[s] - (0 if full else expert_copies)
                      + (one_layer if full else 0) + (grads_before[s] if i > 0 else 0)
                      - (F32 * T * V if s == last_stage else 0))
        out["backward"] = max(out["backward"], W + top)
        live = others
    return out, most_flight
