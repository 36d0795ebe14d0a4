"""The planner's step-time model: compute at a stated share of the GPU's peak, the collectives
megaswift runs over the links their groups span, the overlaps the engine really has, and the
pipeline schedule's bubble.

    step = compute x (1 + bubble) + exposed communication + optimizer

- compute: the model FLOPs of the heaviest pipeline stage (its layers; the output layer and loss
  on the last stage, the embedding is a gather) per token, x 3 for forward and backward, + one
  more forward of what is recomputed (all of it under `full`, the attention core under
  `selective`), over the stage's ranks, at `peak x compute_efficiency`. A layer's FLOPs are
  train/metrics.py's: its projections (multi-latent attention's down- and up-projections), the
  core over the q/k and the v head widths, a dense MLP or the router, top-k experts and shared
  expert; DeepSeek's dense first layers count as dense. Qwen3-Next's gated attention adds its
  query gates to the q projection; a sliding-window layer (gpt-oss, Mistral) attends to w -
  w^2 / (2 s) keys on average instead of s/2; a Gated DeltaNet layer (linear attention) counts
  its in_proj_qkvz, in_proj_ba and out_proj, and for its core the chunked delta rule's matmuls
  (kernels/gated_delta.py, chunks of C tokens, r value heads per key head), per token and value
  head C (2 dk / r + dk + 2 dv) + C^2 / 3 (the triangular solve) + 3 dk dv (the state's three
  products): linear in the sequence, where attention's core grows with it.
- bubble (micro batches m, pp ranks p): 1F1B and GPipe (p - 1) / m; interleaved with v stages
  per rank (p - 1) / (v m); zbv (p - 1) / (3 m), taking that the weight-gradient passes fill
  two thirds of the 1F1B bubble (an approximation of the zero-bubble schedule).
- communication, per collective class, from planner/comm.py's bytes: a ring all-reduce moves
  2 (n - 1) / n of the buffer per rank, all-gather, reduce-scatter and all-to-all (n - 1) / n,
  point-to-point all of it; over NVLink when the group lies within a node (ranks are laid out
  tp fastest, then cp, dp, pp; experts etp, ep, expert-dp), else over the network; at
  `comm_efficiency` of the link.
- overlaps the engine has: the dp reduction runs bucket by bucket during the last micro batch's
  backward (exposed: what exceeds that backward); ring attention sends the next K/V block while
  it computes on this one (exposed: what exceeds the attention compute). TP/SP, Ulysses and
  expert all-to-alls, the pipeline's sends and ZeRO's parameter all-gather are on the critical
  path.
- optimizer: AdamW (fused on CUDA) reads and writes the fp32 weight, gradient and two moments
  of each element it updates: 32 bytes per element at HBM bandwidth.
"""
from __future__ import annotations

from megaswift.parallel.pipeline_stages import num_stages, split_layers, stages_of_rank
from megaswift.train.metrics import mixer_macs, mlp_matmul_params

from .layer_terms import DELTANET, mixer_of

_FACTOR = {"allreduce": lambda n: 2 * (n - 1) / n, "allgather": lambda n: (n - 1) / n,
           "_allgather_base": lambda n: (n - 1) / n, "_reduce_scatter_base": lambda n: (n - 1) / n,
           "reduce_scatter": lambda n: (n - 1) / n, "alltoall_base": lambda n: (n - 1) / n,
           "alltoall": lambda n: (n - 1) / n, "send": lambda n: 1.0, "recv": lambda n: 0.0}
# a recv's bytes arrive while the peer's send is timed: counting both would count a transfer twice


def layer_flops_per_token(mc, seq_len: int, layer: int) -> tuple[float, float, float]:
    """Forward FLOPs per token of layer `layer`: (token mixer projections, its core, MLP), from
    train/metrics.py's count (the one MFU uses): attention's projections (gated attention's gate
    rows, multi-latent attention's down- and up-projections) and causal core over s/2 keys (a
    sliding-window layer's over at most its window), or Gated DeltaNet's projections and chunked
    delta rule; a dense MLP, or the router, top-k experts and shared expert."""
    proj, core = mixer_macs(mc, seq_len, layer)
    return 2 * proj, 2 * core, 2 * mlp_matmul_params(mc, layer)


def stage_flops_per_token(cfg, mc, pp_rank: int) -> float:
    """Forward + backward (+ recompute) FLOPs per token of the stages `pp_rank` runs."""
    p, seq = cfg.parallel, cfg.data.seq_len
    stages = num_stages(p.pp, p.vpp, p.pp_schedule) if p.pp > 1 else 1
    split = split_layers(mc.num_layers, stages, p.pp_layers if p.pp > 1 else None)
    mine = stages_of_rank(pp_rank, p.pp, stages, p.pp_schedule) if p.pp > 1 else [0]
    recompute = cfg.train.recompute
    total = 0.0
    for s in mine:
        for layer in split[s]:
            proj, core, mlp = layer_flops_per_token(mc, seq, layer)
            fwd = proj + core + mlp
            # selective recompute reruns the attention core (a Gated DeltaNet layer's runs once)
            selective = core if mixer_of(mc, layer) != DELTANET else 0.0
            extra = fwd if recompute == "full" else selective if recompute == "selective" else 0.0
            total += 3 * fwd + extra
        if s == stages - 1:
            total += 3 * 2 * mc.hidden_size * mc.vocab_size  # output layer
    return total


def attention_share(mc, seq_len: int) -> float:
    """The attention cores' share of the layers' forward FLOPs (what ring attention's transfers
    overlap with)."""
    parts = [layer_flops_per_token(mc, seq_len, i) for i in range(mc.num_layers)
             if mixer_of(mc, i) != DELTANET]
    total = sum(sum(layer_flops_per_token(mc, seq_len, i)) for i in range(mc.num_layers))
    return sum(core for _, core, _ in parts) / total if total else 0.0


def bubble(cfg, n_micro: int) -> float:
    p = cfg.parallel
    if p.pp == 1:
        return 0.0
    if p.pp_schedule == "interleaved":
        return (p.pp - 1) / (p.vpp * n_micro)
    if p.pp_schedule == "zbv":
        return (p.pp - 1) / (3 * n_micro)
    return (p.pp - 1) / n_micro


def group_span(cls: str, cfg, world: int) -> tuple[int, int]:
    """(ranks in the group, stride between neighbours) of a collective class, from the rank order
    (parallel/layout.py): dense tp, cp, dp, pp; experts etp, ep, expert-dp."""
    p = cfg.parallel
    dp = world // (p.tp * p.pp * p.cp)
    edp = world // (p.pp * p.ep * p.etp)
    return {"tp": (p.tp, 1), "cp": (p.cp, p.tp), "dp": (dp * p.cp, p.tp), "pp": (2, world // p.pp),
            "etp": (p.etp, 1), "ep": (p.ep, p.etp), "edp": (edp, p.ep * p.etp)}.get(cls, (1, 1))


def bandwidth(cls: str, cfg, world: int, gpus_per_node: int, hw) -> float:
    """Bytes/s a rank gets for this class's collectives: NVLink when the whole group lies within
    one node, else the network."""
    n, stride = group_span(cls, cfg, world)
    within = (n - 1) * stride + 1 <= gpus_per_node
    gbps = hw.nvlink_gbps if within else hw.network_gbps
    return gbps * 1e9 * hw.comm_efficiency


def step_time(cfg, mc, world: int, gpus_per_node: int, hw, comm: dict, pp_rank: int, shard_elements: int,
              global_tokens: int, reference_forward: bool = False) -> dict:
    """Seconds of one step on the rank at pp rank `pp_rank`, by part. `comm`: planner/comm.py's
    {class: {kind: bytes}} for that rank; `shard_elements`: the elements AdamW updates there;
    `reference_forward`: a reference model's forward over every row too (DPO), a third more."""
    p = cfg.parallel
    dp = world // (p.tp * p.pp * p.cp)
    n_micro = cfg.train.global_batch(dp) // (cfg.train.micro_batch_size * dp)
    ranks_per_stage = world // p.pp
    flops = stage_flops_per_token(cfg, mc, pp_rank) * global_tokens / ranks_per_stage
    if reference_forward:
        flops *= 4 / 3
    rate = hw.peak_tflops * 1e12 * hw.compute_efficiency
    compute = flops / rate
    b = bubble(cfg, n_micro)
    comm_s = {}
    for cls, kinds in comm.items():
        n, _ = group_span(cls, cfg, world)
        if n <= 1:
            continue
        moved = sum(nbytes * _FACTOR.get(kind, lambda n: 1.0)(n) for kind, nbytes in kinds.items())
        comm_s[cls] = moved / bandwidth(cls, cfg, world, gpus_per_node, hw)
    exposed = dict(comm_s)
    if "dp" in exposed or "edp" in exposed:  # overlapped with the last micro batch's backward
        last_backward = compute / n_micro * 2 / 3
        for cls in ("dp", "edp"):
            if cls in exposed:
                exposed[cls] = max(0.0, exposed[cls] - last_backward)
    if "cp" in exposed and p.cp_comm == "ring":  # overlapped with the attention blocks
        exposed["cp"] = max(0.0, exposed["cp"] - compute * attention_share(mc, cfg.data.seq_len))
    optimizer = 32 * shard_elements / (hw.hbm_tbps * 1e12)
    total = compute * (1 + b) + sum(exposed.values()) + optimizer
    return {"step_s": total, "compute_s": compute, "bubble": b, "comm_s": comm_s, "exposed_comm_s": exposed,
            "optimizer_s": optimizer, "flops_per_gpu": flops}
