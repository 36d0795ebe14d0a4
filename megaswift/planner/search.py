"""The planner's search: every valid layout of a model on N x G GPUs, each predicted (memory by
category per rank position: planner/memory_model.py; communication: planner/comm.py; step time:
planner/timing.py), those that do not fit dropped, the rest ranked by step time.

A layout is tp (dividing the heads and a shared expert's width, within a node), pp (with `pp_layers` from
`pipeline_stages.balanced` when the layers do not divide; 1F1B, and interleaved with 2 stages
per rank and ZBV where the layers allow), cp (ring or Ulysses; the sequence must divide by
2 cp tp), ep (dividing the experts and the ranks of a stage) with etp 1 or tp, dp the rest,
ZeRO-1 wherever dp x cp (or expert-dp) > 1, sequence parallelism whenever tp > 1 (it only saves memory), micro batch
size 1 (more only lengthens the bubble in this model). For each, recompute is the least that fits: none, then selective, then full.
Ranking: predicted step time, where a layout's each parallel dimension in use (tp, pp, cp, ep,
vpp) adds 0.5%, so that near-ties go to the simpler layout.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megaswift.errors import LayoutError
from megaswift.parallel.layout import Layout
from megaswift.parallel.pipeline import check_microbatches
from megaswift.parallel.pipeline_stages import balanced, num_stages

from . import comm as comm_model
from . import memory_model
from .dry_run import positions
from .timing import step_time

RECOMPUTE = ("none", "selective", "full")


@dataclass
class Candidate:
    cfg: object                         # the run config of this layout
    world: int
    algorithm: str = "sft"
    memory: list[dict] = field(default_factory=list)   # per rank position (memory_model)
    ranks: list[int] = field(default_factory=list)
    time: dict = field(default_factory=dict)           # the slowest position's (timing.step_time)
    usable: float = 0.0

    @property
    def peak(self) -> int:
        return max(m["peak"] for m in self.memory)

    @property
    def worst(self) -> dict:
        return max(self.memory, key=lambda m: m["peak"])

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable

    def describe(self) -> str:
        p, dp = self.cfg.parallel, self.world // (self.cfg.parallel.tp * self.cfg.parallel.pp * self.cfg.parallel.cp)
        pp = f"pp{p.pp}" + (f"x{p.vpp}" if p.vpp > 1 else "") + ("zbv" if p.pp > 1 and p.pp_schedule == "zbv" else "")
        cp = f"cp{p.cp}" + ("u" if p.cp > 1 and p.cp_comm == "ulysses" else "")
        ep = f"ep{p.ep}" + (f"/etp{p.etp}" if p.etp > 1 else "")
        parts = [f"tp{p.tp}{'+sp' if p.sp else ''}", pp, cp, ep, f"dp{dp}", f"zero{self.cfg.optim.zero}",
                 self.cfg.train.recompute]
        return " ".join(parts)


def _replace(cfg, **sections):
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in sections.items()})


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(base_cfg, mc, world: int, gpus_per_node: int, global_sequences: int):
    """Every structurally valid layout (recompute left at none)."""
    seq = base_cfg.data.seq_len
    moe = bool(mc.moe_layers)
    experts = mc.num_moe_experts if moe else 1
    # tp splits the heads (multi-latent attention too: its up-projections by head, its latents
    # replicated) and every MLP's width, a shared expert's included
    shared = mc.moe_shared_expert_ffn_hidden_size if moe else 0
    for tp in [d for d in _divisors(mc.num_attention_heads)
               if d <= gpus_per_node and world % d == 0 and shared % d == 0]:
        for pp in [d for d in _divisors(world // tp) if d <= mc.num_layers]:
            for cp in [c for c in (1, 2, 4, 8) if (world // (tp * pp)) % c == 0]:
                dp = world // (tp * pp * cp)
                if global_sequences % dp:
                    continue
                for ep, etp, cp_comm in _expert_and_cp_choices(experts, moe, tp, cp, world // pp):
                    try:
                        layout = Layout(world_size=world, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, sp=tp > 1,
                                        ulysses=cp if cp_comm == "ulysses" else 1)
                        layout.check_model(mc)
                        layout.check_seq_len(seq, moe=moe)
                    except LayoutError:
                        continue
                    n_micro = global_sequences // dp
                    for schedule, vpp in _schedules(pp, mc.num_layers, n_micro):
                        stages = num_stages(pp, vpp, schedule) if pp > 1 else 1
                        pp_layers = balanced(mc.num_layers, stages) if mc.num_layers % stages else None
                        edp = world // (pp * ep * etp) if moe else 1  # expert-dp: only experts have it
                        # ZeRO-1 wherever there is a group to shard over: it equals plain DP in
                        # result (parallel/data_parallel.py), holds less, costs one all-gather
                        for zero in ((1,) if dp * cp > 1 or edp > 1 else (0,)):
                            yield _replace(base_cfg,
                                           parallel=dict(tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, sp=tp > 1, vpp=vpp,
                                                         pp_schedule=schedule, pp_layers=pp_layers, cp_comm=cp_comm),
                                           optim=dict(zero=zero),
                                           train=dict(micro_batch_size=1, global_batch_size=global_sequences))


def _expert_and_cp_choices(experts: int, moe: bool, tp: int, cp: int, per_stage: int):
    """(ep, etp, cp_comm): ep dividing the experts and the ranks of a stage; etp 1 or tp (the
    experts split like the dense layers); ring, and Ulysses where cp > 1."""
    for ep in [e for e in _divisors(experts) if per_stage % e == 0]:
        for etp in ((1, tp) if moe and tp > 1 else (1,)):
            for cp_comm in (("ring", "ulysses") if cp > 1 else ("ring",)):
                yield ep, etp, cp_comm


def _schedules(pp: int, layers: int, n_micro: int):
    """(schedule, vpp) for pp: 1F1B, interleaved with 2 stages per rank and ZBV where the layers
    allow, each only if it accepts the micro batches per step."""
    if pp == 1:
        yield "1f1b", 1
        return
    options = [("1f1b", 1)] + ([("interleaved", 2), ("zbv", 1)] if layers >= 2 * pp else [])
    for schedule, vpp in options:
        try:
            check_microbatches(schedule, pp, n_micro)
        except LayoutError:
            continue
        yield schedule, vpp


def evaluate(cfg, mc, world: int, gpus_per_node: int, hw, global_tokens: int, timed: bool = True,
             algorithm: str = "sft") -> Candidate:
    """Predict one layout: memory at every rank position, and (`timed`) time at the slowest."""
    cand = Candidate(cfg, world, usable=hw.usable_bytes, algorithm=algorithm)
    cand.ranks = positions(cfg, mc, world)
    cand.memory = [memory_model.predict_position(cfg, mc, world, r, algorithm=algorithm) for r in cand.ranks]
    if timed:
        time_candidate(cand, mc, gpus_per_node, hw, global_tokens)
    return cand


def time_candidate(cand: Candidate, mc, gpus_per_node: int, hw, global_tokens: int) -> None:
    cfg, world = cand.cfg, cand.world
    per_pp = world // cfg.parallel.pp
    times = []
    for rank, mem in zip(cand.ranks, cand.memory):
        comm = comm_model.predict_comm(cfg, mc, world, rank, device_type="cuda", algorithm=cand.algorithm)
        shard = mem["optimizer"] // 8  # AdamW keeps 8 bytes (two fp32 moments) per element it updates
        times.append(step_time(cfg, mc, world, gpus_per_node, hw, comm, rank // per_pp, shard, global_tokens,
                               reference_forward=memory_model.reference_mode(cfg, cand.algorithm) in ("copy", "adapters")))
    cand.time = max(times, key=lambda t: t["step_s"])


def complexity(cfg) -> int:
    """Parallel dimensions in use (pp with more than one stage per rank counts twice)."""
    p = cfg.parallel
    return sum(x > 1 for x in (p.tp, p.pp, p.cp, p.ep, p.vpp))


def search(base_cfg, mc, world: int, gpus_per_node: int, hw, global_tokens: int,
           algorithm: str = "sft") -> tuple[list, list]:
    """(layouts that fit, fastest first; those that do not, smallest overflow first). Each
    structural layout is tried with no recompute, then selective, then full, and kept at the
    first that fits."""
    seq = base_cfg.data.seq_len
    # the global batch counts sequences, or pairs (two rows each) for DPO
    global_sequences = global_tokens // seq // (2 if algorithm == "dpo" else 1)
    fit, over = [], []
    for cfg in layouts(base_cfg, mc, world, gpus_per_node, global_sequences):
        if cfg.parallel.pp > 1 and cfg.parallel.pp_schedule == "zbv" and cfg.model.lora.rank:
            continue  # LoRA under ZBV's split backward is not in the memory model yet
        # ZBV with recompute: the input-gradient pass rebuilds each layer's activations and keeps
        # them for the weight pass, so recompute saves far less than under 1F1B, and the memory
        # model does not yet predict it (measured: 21-32% under the dry run); only "none" is tried
        modes = ("none",) if cfg.parallel.pp > 1 and cfg.parallel.pp_schedule == "zbv" else RECOMPUTE
        for mode in modes:  # memory first: only a layout that fits is timed
            cand = evaluate(_replace(cfg, train=dict(recompute=mode)), mc, world, gpus_per_node, hw, global_tokens,
                            timed=False, algorithm=algorithm)
            if cand.fits:
                time_candidate(cand, mc, gpus_per_node, hw, global_tokens)
                fit.append(cand)
                break
            state = max(m["parameters"] + m["gradients"] + m["optimizer"] for m in cand.memory)
            if state > cand.usable:  # the weights alone overflow: no recompute mode can help
                over.append(cand)
                break
        else:
            over.append(cand)
    # near-ties go to the simpler layout: each parallel dimension in use costs 0.5% here
    fit.sort(key=lambda c: (c.time["step_s"] * (1 + 0.005 * complexity(c.cfg)), c.peak))
    over.sort(key=lambda c: c.peak - c.usable)
    if over:
        time_candidate(over[0], mc, gpus_per_node, hw, global_tokens)
    return fit, over
