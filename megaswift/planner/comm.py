"""The bytes one training step sends, per collective class and kind, predicted by arithmetic.

`predict_comm(cfg, model_cfg, world_size, rank, algorithm=...)` returns {class: {kind: bytes}}
for one steady-state SFT or DPO step (full fine-tuning or LoRA) of global rank `rank`, counted
as planner/accountant.py counts a real step (all-reduce: the tensor; all-gather: the gathered
output; reduce-scatter: the full input; all-to-all: what this rank sends; send and recv: the
tensor). tests/dist/test_comm_volume.py
holds it to the accountant's count of real gloo steps. `formulas()` is the table below.

FORMULAS
Notation: b rows of a micro batch, s = seq_len / cp tokens of a cp rank, h hidden, n micro batches per step
(global batch / (b dp)), X = b s h, c bytes of the compute dtype (2 under autocast, else 4),
f = 4: fp32 is what the residual stream (started by the fp32 embedding), the norms' outputs, the
gradients flowing into them and every master gradient are. "fwd" terms repeat under recompute
(below); every term is per micro batch and summed over n unless it says "per step".
  tp   (tp > 1; sp moves the same bytes, as all-gathers + reduce-scatters instead of all-reduces)
       per layer: attention and dense MLP each fwd X c (row-parallel sum) [+ X f all-gather
       under sp], bwd X f (column-parallel input grad) [+ X c all-gather under sp]: without sp
       4 all-reduces = 2 X (c + f); an MoE layer without sp: fwd all-gather X c, bwd all-gather
       X f (each tp rank routes s / tp tokens); a shared expert as a dense MLP
       multi-latent attention instead of linear_qkv's X f: the q latent b s rq f (after its norm;
       without q_lora_rank linear_q_proj's X f), the kv latent b s rkv f and the rope key
       b s dr c, each all-gathered forward under sp and reduce-scattered backward, else
       all-reduced backward (the down-projections are replicated: they gather nothing)
       embedding fwd X f [+ bwd X f under sp]; output layer bwd X f [+ fwd X f under sp];
       cross entropy fwd 3 b s f (max; target logit and sum of exps)
       MoE router statistics on the last stage: L_moe (2E + 2) f (also over dp x cp)
       per step: partial grads 4 x (the 2 norms per layer and the final norm under sp, q/k norms,
       routers (and gpt-oss's router bias), a proj bias or shared-expert gate under sp; MLA under sp: the replicated
       down-projections and latent norms, rq (h + 1) + (rkv + dr) h + rkv); replicated KV rows
       4 ng sum_layers 2 hd (h + qkv bias) when tp > kv heads; grad norm 4
  cp   per layer, U Ulysses x R ring ranks, hq = heads / tp, hk = kv heads / tp replicated up to U
       under Ulysses, dqk / dv the q-k and v head widths (hd both, or MLA's nope + rope and v):
       Ulysses all-to-all fwd and bwd each (hq dqk + hk (dqk + dv) + hq dv) b s c; ring: KV block
       K = b s hk (dqk + dv): fwd (R - 1) K c sent and as much received, bwd (R - 1) K c + R K f
       (fp32 dK/dV accumulators) sent and as much received
  ep   per MoE layer: T = b s / tp tokens routed, A = T k assignments, A_e of them for this
       rank's experts from each rank (force-balanced: assignment i to expert i mod E):
       all-to-all fwd (A + ep A_e) h c (dispatch + combine) and bwd the same; per step grad norm 4
       unbalanced routing (no moe.router_force_balance) adds the count exchange E x 8 and assumes
       balanced volumes, which real routing only approximates
  etp  per MoE layer: 2 all-gathers + 2 reduce-scatters of etp ep A_e h c; per step grad norm 4;
       gpt-oss: per step the experts' linear_fc2 biases (whole on every etp rank, added by the
       first), 4 x E / ep x h per MoE layer, summed over etp
  dp   (dp x cp ranks) per step: each gradient bucket padded to a multiple of dp cp, B x 4:
       all-reduce, or under ZeRO-1 reduce-scatter B 4 + all-gather B 4 + grad norm 4; the
       engine's scalars 16 + 8 (float64 units/tokens and loss sum); MoE statistics as in tp
  edp  (expert-dp ranks) per step: the expert buckets, as dp
  pp   per stage boundary on another rank: the hidden states b s h f (s / tp under sp), plus the
       MoE statistics L_moe (2E + 2) f: sent and received once forward and once backward (their
       gradient only once an MoE layer sits before the boundary);
       per step: tied-embedding grad sum 4 V/tp h on the first and last stage, grad norm 4,
       the engine's float64 scalars 8 (loss) + 16 pp (pipeline timings) + 8 (2 + L_moe E) (MoE;
       + 8 L_moe E for routers with an expert bias: the biases travel with the counts)
  other (the world group): the non-finite check, 4 world per step
Recompute: full reruns each layer's forward inside backward (its tp, cp, ep, etp fwd terms twice),
selective the core attention (the cp fwd terms twice); torch's checkpoint stops rerunning once
the last tensor backward needs is rebuilt, so a dense layer's linear_fc2 sum and, under
selective, Ulysses' all-to-all of the output back run once.
LoRA (model.lora, r its rank; parallel/lora.py): the base is frozen, so
  - backward collectives run only where a tensor needs a gradient: the embedding's output does
    not, a layer's activations do from the first targeted linear on (linear_qkv's input
    gradient of layer 0 is not summed; with all-linear everything after it is as above);
  - each adapted row-parallel linear (linear_proj, linear_fc2) sums its partial A x over tp:
    fwd b s r c (reduce-scatter under sp) [+ bwd all-gather b s r c under sp]; under full
    recompute an adapted linear_fc2's base sum reruns too (the adapter's sum follows it);
  - dp / edp buckets hold the adapters alone; finalize_grads sums over tp only their partial
    gradients: A [r, h] of linear_qkv and linear_fc1 (tp > 1), B [h, r] of linear_proj and
    linear_fc2 (sp), and B's replicated KV rows 4 ng L 2 hd r when tp > kv heads; no
    tied-embedding sum over pp.
DPO (algorithm="dpo", train/dpo.py): every term above with b = 2 micro_batch_size rows (chosen
and rejected), n unchanged; and per micro batch
  - the reference forward (dpo.reference copy, or adapters: the policy with adapters off; none
    when dpo.precompute_ref): every forward collective once (no recompute, no backward, no
    adapter sums): tp, cp, ep / etp, the embedding, output layer and cross entropy; under pp
    forward_stages sends the fp32 hidden states b s h f (s / tp under sp) forward only, no
    MoE statistics;
  - cp: sequence_logps all-reduces each row's log-probability and token count, 2 x 2 b f, for
    the policy and again for the reference;
  - per step: the engine's six metric sums, 6 x 8 more over dp x cp and over pp.
Not modelled: GRPO (rollouts); DPO's reference under MoE and LoRA with MoE or recompute are
built from the same rules but not checked against a real step, nor LoRA on multi-latent
attention (its adapters' partial sums); moe.aux_loss_type seq (statistics per batch row, their
reductions over tp x cp and dp) is not modelled: the global loss's are counted.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from megaswift import setup
from megaswift.parallel.experts import balanced_counts
from megaswift.parallel.pipeline_stages import num_stages, split_layers, stages_of_rank

F = 4  # fp32
AR, AG, RS, A2A = "allreduce", "_allgather_base", "_reduce_scatter_base", "alltoall_base"
TIED = "embedding.word_embeddings.weight"


def formulas() -> str:
    """The closed-form formula of each class (`megaswift plan --explain`)."""
    return __doc__.split("FORMULAS\n", 1)[1].strip()


class _Tally:
    def __init__(self):
        self.out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, cls: str, kind: str, nbytes: int, group: int = 2) -> None:
        if group > 1 and nbytes:  # a one-rank group makes every collective a no-op
            self.out[cls][kind] += int(nbytes)

    def result(self) -> dict[str, dict[str, int]]:
        return {cls: dict(kinds) for cls, kinds in sorted(self.out.items())}


def predict_comm(cfg, model_cfg, world_size: int, rank: int, *, device_type: str = "cpu",
                 algorithm: str = "sft") -> dict[str, dict[str, int]]:
    """{class: {kind: bytes}} of one step of `algorithm` ("sft" or "dpo") on `rank` (see the
    module docstring). The compute dtype is setup.compute_dtype's on `device_type` (the dry
    run's "cpu": model.dtype under model.cpu_autocast, else fp32; pass "cuda" for a GPU run's
    autocast)."""
    from megaswift.models.lora import target_set
    from megaswift.planner.memory_model import _Coords, param_list, reference_mode

    lay, m, p, t = setup.plan_layout(cfg, world_size, model_cfg), model_cfg, cfg.parallel, _Tally()
    tp, cp, pp, ep, etp, dpc, edp = lay.tp, lay.cp, lay.pp, lay.ep, lay.etp, lay.dp * lay.cp, lay.edp
    sp, h, E = lay.sp and tp > 1, m.hidden_size, m.num_moe_experts
    c = torch.empty((), dtype=setup.compute_dtype(cfg, torch.device(device_type))).element_size()
    dpo = algorithm == "dpo"
    rows = cfg.train.micro_batch_size * (2 if dpo else 1)  # DPO: a micro batch's chosen, then rejected rows
    b, s = rows, cfg.data.seq_len // cp
    n = cfg.train.global_batch(lay.dp) // (cfg.train.micro_batch_size * lay.dp)
    X = b * s * h
    lora = cfg.model.lora
    adapted = target_set(lora.targets) if lora.rank else set()
    Xr = b * s * lora.rank  # an adapter's rank-wide activations
    pp_rank, ep_rank = rank // (world_size // pp), (rank // etp) % ep
    stages = num_stages(pp, p.vpp, p.pp_schedule) if pp > 1 else 1
    split = split_layers(m.num_layers, stages, p.pp_layers if pp > 1 else None)
    mine = stages_of_rank(pp_rank, pp, stages, p.pp_schedule) if pp > 1 else [0]
    moe = m.moe_layers
    stats = len(moe) * (2 * E + 2) * F  # the router statistics that travel with a micro batch
    # recompute reruns forward collectives inside backward: full the layer's, selective the core
    # attention's; torch's checkpoint stops rerunning once the last tensor backward needs is
    # rebuilt, so a last collective whose output nothing saves runs once (module docstring)
    layer_fwd = n * (2 if cfg.train.recompute == "full" else 1)
    core_fwd = n * (1 if cfg.train.recompute == "none" else 2)

    def column(times, bwd, width=X, nbytes=F):  # a column-parallel input (fp32 norm outputs): f / all-gather fwd
        t.add("tp", AG, times * width * nbytes, tp if sp else 1)
        t.add("tp", RS if sp else AR, bwd * width * nbytes, tp)

    def row(times, nbytes, bwd, width=X):  # a row-parallel sum g / reduce-scatter forward, its adjoint backward
        t.add("tp", RS if sp else AR, times * width * nbytes, tp)
        t.add("tp", AG, bwd * width * nbytes, tp if sp else 1)

    def mla(fwd, bwd, grad_in, adapters):
        """Multi-latent attention's column-parallel inputs (models/mla.py): the q and kv latents
        after their norms (fp32) and the shared rope key (compute dtype), gathered under SP
        instead of the hidden states (the down-projections are replicated), their gradients
        summed. Returns whether q, k or v needs a gradient."""
        S = b * s
        kv_grad = grad_in or "linear_kv_down_proj" in adapters
        if m.q_lora_rank:
            q_grad = grad_in or "linear_q_down_proj" in adapters
            column(fwd, bwd if q_grad else 0, S * m.q_lora_rank)  # linear_q_up_proj
            q_out = q_grad or "linear_q_up_proj" in adapters
        else:
            column(fwd, bwd if grad_in else 0)  # linear_q_proj
            q_out = grad_in or "linear_q_proj" in adapters
        column(fwd, bwd if kv_grad else 0, S * m.kv_lora_rank)  # linear_kv_up_proj
        column(fwd, bwd if kv_grad else 0, S * m.qk_rope_head_dim, c)  # the rope key
        return q_out or kv_grad or "linear_kv_up_proj" in adapters

    def layers_pass(layers, fwd, core, bwd, grad_in, adapters):
        """The collectives of `layers` run `fwd` times forward (`core`: the core attention's
        forwards) and `bwd` times backward. A backward collective runs only where its tensor
        needs a gradient: `grad_in`, whether the layer's input does (a frozen base's embedding
        output does not), grows by the adapters met (`adapters`: the targeted linears)."""
        for i in layers:
            if m.token_mixer_for_layer(i) == "gated_deltanet":  # models/deltanet.py
                # in_proj_qkvz and in_proj_ba gather (and sum the gradients of) their input each;
                # out_proj sums like linear_proj; cp is refused for these layers
                qkv_out = grad_in or bool({"in_proj_qkvz", "in_proj_ba"} & adapters)
                column(fwd, bwd if grad_in else 0)  # in_proj_qkvz
                column(fwd, bwd if grad_in else 0)  # in_proj_ba
                row(fwd, c, bwd if qkv_out else 0)  # out_proj
                if "out_proj" in adapters:
                    row(fwd, c, bwd, Xr)
                grad_in = grad_in or qkv_out or "out_proj" in adapters
                grad_in = mlp_pass(i, fwd, bwd, grad_in, adapters)
                continue
            if m.is_mla:
                qkv_out = mla(fwd, bwd, grad_in, adapters)
            else:
                qkv_out = grad_in or "linear_qkv" in adapters
                column(fwd, bwd if grad_in else 0)  # linear_qkv
            proj_out = qkv_out or "linear_proj" in adapters
            row(fwd, c, bwd if qkv_out else 0)  # linear_proj
            if "linear_proj" in adapters:  # the adapter's partial A x, summed (its B is replicated)
                row(fwd, c, bwd, Xr)
            _context_parallel(t, m, lay, b, s, c, core, fwd, bwd if qkv_out else 0)
            grad_in = mlp_pass(i, fwd, bwd, grad_in or proj_out, adapters)
        return grad_in

    def mlp_pass(i, fwd, bwd, grad_in, adapters):
        """Layer i's MLP (dense or experts); returns whether its output needs a gradient."""
        if i in moe:
            if tp > 1 and not sp:  # each tp rank routes 1/tp of the replicated tokens
                t.add("tp", AG, fwd * X * c)  # the experts' outputs joined
                t.add("tp", AG, bwd * X * F)  # the input gradient joined
            if m.moe_shared_expert_ffn_hidden_size:  # a dense MLP beside the experts
                column(fwd, bwd if grad_in else 0)
                row(fwd, c, bwd if grad_in or "linear_fc1" in adapters else 0)
                if "linear_fc2" in adapters:
                    row(fwd, c, bwd, Xr)
            _experts(t, cfg, m, lay, ep_rank, b * s // tp, c, fwd, bwd)
            grad_in = grad_in or bool(adapters)
        else:
            fc1_out = grad_in or "linear_fc1" in adapters
            column(fwd, bwd if grad_in else 0)  # linear_fc1
            # linear_fc2's sum: the layer's last op that backward needs nothing of (unless an
            # adapter's sum follows it: then recompute reruns it too)
            row(fwd if "linear_fc2" in adapters else min(fwd, n), c, bwd if fc1_out else 0)
            if "linear_fc2" in adapters:
                row(fwd, c, bwd, Xr)
            grad_in = grad_in or fc1_out or "linear_fc2" in adapters
        return grad_in

    # the reference model of DPO: forward only (no_grad), once per micro batch, before the step
    ref = reference_mode(cfg, algorithm)
    ref_runs = n if ref in ("copy", "adapters") else 0

    c_ = _Coords(cfg, world_size, rank)
    plist = param_list(cfg, m, c_)
    dense = [(name, k) for name, k, _, e, tr in plist if tr and not e]  # trainable, model.parameters() order
    expert = [(name, k) for name, k, _, e, tr in plist if tr and e]
    grad_in = not lora.rank  # a frozen embedding's output needs no gradient
    for stage in mine:
        pre, post, layers = stage == 0, stage == stages - 1, list(split[stage])
        if pre:
            row(n + ref_runs, F, n if not lora.rank else 0)  # the vocab-parallel embedding's sum, fp32
        # a stage after the first gets its input from another stage: it needs a gradient (the
        # runner asks for one) unless the stages before hold nothing trainable
        stage_in = grad_in if pre else (not lora.rank or bool(adapted))
        grad_in = layers_pass(layers, layer_fwd, core_fwd, n, stage_in, adapted)
        if ref_runs:
            layers_pass(layers, ref_runs, ref_runs, 0, False, set())  # a copy has no adapters; the policy's are off
        if post:
            column(n + ref_runs, n if grad_in else 0)  # output layer
            t.add("tp", AR, (n + ref_runs) * 3 * b * s * F, tp)  # vocab-parallel cross entropy
            if moe:
                t.add("tp", AR, n * stats, tp)
                t.add("dp", AR, n * stats, dpc)
            if dpo:  # sequence_logps: each row's log-probability and token count summed over cp
                t.add("cp", AR, (n + ref_runs) * 2 * b * F, cp)
        # hidden states (and MoE statistics) to a neighbour stage on another rank: fwd + bwd;
        # the reference's forward_stages sends the fp32 hidden states alone, forward only
        act = b * (s // tp if sp else s) * h * F
        for nb in ([stage - 1] if not pre else []) + ([stage + 1] if not post else []):
            if pp_rank not in _owners(nb, pp, stages, p.pp_schedule):
                ahead = nb > stage
                # the statistics travel forward always, their gradient only once an MoE layer
                # (before the boundary) has added to them
                moe_before = any(i in moe for j in range(min(stage, nb) + 1) for i in split[j])
                t.add("pp", "send" if ahead else "recv", n * (act + (stats if moe else 0)))
                t.add("pp", "recv" if ahead else "send", n * (act + (stats if moe_before else 0)))
                t.add("pp", "send" if ahead else "recv", ref_runs * act)
        _finalize_grads(t, m, lay, sp, layers, post, lora.rank, adapted)

    # per step: gradient buckets, norms and the engine's scalars
    for part, cls, group, mp_groups in ((dense, "dp", dpc, (("tp", tp),)),
                                        (expert, "edp", edp, (("etp", etp), ("ep", ep)))):
        if not part:
            continue
        for nbytes in _bucket_bytes([k for _, k in part], p.ddp_bucket_size, group):
            if cfg.optim.zero:
                t.add(cls, RS, nbytes, group)
                t.add(cls, AG, nbytes, group)  # the updated parameter shards
            else:
                t.add(cls, AR, nbytes, group)
        if cfg.optim.zero:
            t.add(cls, AR, F, group)  # sum of squares of the disjoint shards
        for mp_cls, size in mp_groups:
            t.add(mp_cls, AR, F, size)
    has_first, has_last = 0 in mine, stages - 1 in mine
    if m.tie_word_embeddings and pp > 1 and has_first != has_last and not lora.rank:  # frozen: nothing to sum
        t.add("pp", AR, m.padded_vocab_size(tp) // tp * h * F)
    metrics = 8 * (6 if dpo else 0)  # DPO's metric sums (rewards, accuracies, margins, logps), float64
    # MoE: aux and z sums, the step's counts and (routers with an expert bias) the biases, float64
    moe_scalars = 8 * (2 + len(moe) * E * (2 if m.moe_router_expert_bias else 1)) if moe else 0
    t.add("pp", AR, F + 8 + metrics + 16 * pp + moe_scalars, pp)
    t.add("dp", AR, 16 + 8 + metrics, dpc)
    t.add("other", AR, 4 * world_size, world_size)
    return t.result()


def _owners(stage: int, pp: int, stages: int, schedule: str) -> list[int]:
    return [r for r in range(pp) if stage in stages_of_rank(r, pp, stages, schedule)]


def _bucket_bytes(numels: list[int], bucket_numel: int, group: int) -> list[int]:
    """data_parallel.DataParallel's buckets: parameters in reverse order, closed once they reach
    bucket_numel elements, each padded to a multiple of the group size; fp32."""
    out, cur = [], 0
    for k in reversed(numels):
        cur += k
        if cur >= bucket_numel:
            out.append(cur)
            cur = 0
    if cur:
        out.append(cur)
    return [-(-x // group) * group * F for x in out]


def _context_parallel(t, m, lay, b, s, c, fwd, out_fwd, n) -> None:
    """`fwd`: forward runs of the core attention; `out_fwd`: of Ulysses' last all-to-all (the
    output back to its tokens), which selective recompute's early stop leaves out."""
    U, R, tp = lay.ulysses, lay.cp // lay.ulysses, lay.tp
    hq, hk = m.num_attention_heads // tp, max(1, m.num_query_groups // tp)
    qk, dv = m.qk_head_dim, m.value_head_dim  # MLA: q/k heads nope + rope wide, v heads v_head_dim
    if U > 1:
        hk = hk if hk % U == 0 else U  # KV heads fewer than U are replicated up to U
        t.add("cp", A2A, ((fwd + n) * (hq * qk + hk * (qk + dv)) + (out_fwd + n) * hq * dv) * b * s * c)  # q, k, v; out
    if R > 1:
        # a K/V block (U ranks' tokens, hk / U heads under Ulysses): stacked, or concatenated
        # along the head dim when v's differs
        K = b * s * hk * (qk + dv)
        for kind in ("send", "recv"):
            t.add("cp", kind, fwd * (R - 1) * K * c + n * ((R - 1) * K * c + R * K * F))


def _experts(t, cfg, m, lay, ep_rank, T, c, fwd, n) -> None:
    ep, etp, E, h = lay.ep, lay.etp, m.num_moe_experts, m.hidden_size
    A = T * m.moe_router_topk
    e_local = E // ep
    a_e = sum(balanced_counts(A, E)[ep_rank * e_local: (ep_rank + 1) * e_local])  # from each rank
    t.add("ep", A2A, (fwd + n) * (A + ep * a_e) * h * c, ep)
    for kind in (AG, RS):
        t.add("etp", kind, (fwd + n) * etp * ep * a_e * h * c, etp)
    if not cfg.moe.router_force_balance:  # the data-dependent path exchanges counts first
        t.add("ep", A2A, fwd * E * 8, ep)
        t.add("etp", AG, fwd * etp * E * 8, etp)


def _finalize_grads(t, m, lay, sp, layers, post, lora_rank=0, adapted=frozenset()) -> None:
    """parallel/grads.finalize_grads for one chunk: one all-reduce of the tp-partial gradients,
    one of the replicated KV rows; only of trainable parameters (under LoRA: the adapters' A of a
    column-parallel linear, B of a row-parallel one under sp, B's replicated KV rows)."""
    tp, h, hd = lay.tp, m.hidden_size, m.kv_channels
    r, dense = lora_rank, [i for i in layers if i not in m.moe_layers]
    # Gated DeltaNet layers (models/deltanet.py) have no linear_qkv / linear_proj, q/k norms or
    # replicated KV rows: in_proj_qkvz / in_proj_ba, out_proj and the per-head gated norm instead
    linear = sum(1 for i in layers if m.token_mixer_for_layer(i) == "gated_deltanet")
    attn = len(layers) - linear
    if r:
        partial = 0
        if tp > 1:  # A [r, h] of linear_qkv (DeltaNet: in_proj_qkvz, in_proj_ba), a dense or shared linear_fc1
            fc1 = len(dense) + (len(layers) - len(dense)) * bool(m.moe_shared_expert_ffn_hidden_size)
            partial += r * h * (attn * ("linear_qkv" in adapted) + fc1 * ("linear_fc1" in adapted)
                                + linear * (("in_proj_qkvz" in adapted) + ("in_proj_ba" in adapted)))
        if sp:  # B [h, r] of linear_proj (out_proj) and of linear_fc2
            fc2 = len(dense) + (len(layers) - len(dense)) * bool(m.moe_shared_expert_ffn_hidden_size)
            partial += r * h * (attn * ("linear_proj" in adapted) + fc2 * ("linear_fc2" in adapted)
                                + linear * ("out_proj" in adapted))
        t.add("tp", AR, F * partial, tp)
        if tp > m.num_query_groups and "linear_qkv" in adapted and attn:
            t.add("tp", AR, F * m.num_query_groups * attn * 2 * hd * r, tp)
        return
    partial = h if post and sp else 0
    # MLA under SP: the replicated down-projections and latent norms see this rank's tokens only
    latent = ((m.q_lora_rank or 0) * (h + 1) + (m.kv_lora_rank + m.qk_rope_head_dim) * h + m.kv_lora_rank
              if m.is_mla and sp else 0)
    for i in layers:
        if m.token_mixer_for_layer(i) == "gated_deltanet":  # the gated norm's weight, each rank's heads
            partial += 2 * h * sp + m.linear_value_head_dim * (tp > 1)
        else:
            partial += 2 * h * sp + 2 * hd * (tp > 1 and m.qk_layernorm) + h * (sp and m.add_proj_bias) + latent
        if i in m.moe_layers:
            gate = sp and m.moe_shared_expert_ffn_hidden_size and m.moe_shared_expert_gate
            partial += m.num_moe_experts * (h + m.moe_router_bias) * (tp > 1) + h * bool(gate)
    t.add("tp", AR, F * partial, tp)
    if m.moe_expert_bias:  # linear_fc2's bias, whole on every etp rank, added by the first: summed over etp
        n_moe = sum(1 for i in layers if i in m.moe_layers)
        t.add("etp", AR, F * n_moe * (m.num_moe_experts // lay.ep) * h, lay.etp)
    if tp > m.num_query_groups and attn:
        rows = attn * 2 * hd * (h + m.add_qkv_bias)
        t.add("tp", AR, F * m.num_query_groups * rows, tp)
