"""Which decoder layers each pipeline stage holds, and which pp rank runs each stage.

A model of L layers is cut into S stages (consecutive layer ranges, in model order). The
schedule decides S and the stage -> rank map:

- `1f1b` and `gpipe`: one stage per rank, S = pp; rank r runs stage r.
- `interleaved` (Narayanan et al. 2021, https://arxiv.org/abs/2104.04473): vpp stages per rank,
  S = pp * vpp, dealt round-robin: rank r runs stages r, r + pp, r + 2 pp, ...
- `zbv` (torch.distributed.pipelining's ZBV zero-bubble schedule): two stages per rank in a
  V: rank r runs stages r and 2 pp - 1 - r, so rank 0 holds the first and the last stage.

The embedding goes with stage 0 and the final norm, output layer and loss with stage S - 1.
Pure arithmetic, so `megaswift launch` can refuse a split before any process starts.
"""
from __future__ import annotations

from megaswift.errors import LayoutError


def num_stages(pp: int, vpp: int, schedule: str) -> int:
    if schedule == "zbv":
        if vpp not in (1, 2):
            raise LayoutError(f"pp_schedule zbv runs exactly 2 stages per rank; parallel.vpp={vpp} must be 1 or 2")
        return 2 * pp
    if schedule == "interleaved":
        if vpp < 2:
            raise LayoutError("pp_schedule interleaved needs parallel.vpp >= 2 virtual stages per rank")
        return pp * vpp
    if vpp != 1:
        raise LayoutError(f"parallel.vpp={vpp} needs pp_schedule interleaved (or zbv); {schedule} runs one stage per rank")
    return pp


def split_layers(num_layers: int, stages: int, pp_layers: list[int] | None = None) -> list[range]:
    """Consecutive layer ranges, one per stage. Without `pp_layers` the split must be even."""
    if pp_layers is not None:
        if len(pp_layers) != stages:
            raise LayoutError(f"parallel.pp_layers has {len(pp_layers)} entries but the schedule runs {stages} "
                              f"stages; give one layer count per stage")
        if any(n < 1 for n in pp_layers):
            raise LayoutError(f"parallel.pp_layers={pp_layers}: every stage needs at least one layer")
        if sum(pp_layers) != num_layers:
            raise LayoutError(f"parallel.pp_layers={pp_layers} sums to {sum(pp_layers)}, but the model has "
                              f"{num_layers} layers")
        counts = list(pp_layers)
    else:
        if num_layers < stages:
            raise LayoutError(f"num_layers ({num_layers}) is smaller than the {stages} pipeline stages")
        if num_layers % stages:
            raise LayoutError(f"num_layers ({num_layers}) is not divisible by the {stages} pipeline stages; "
                              f"set parallel.pp_layers, e.g. {balanced(num_layers, stages)}")
        counts = [num_layers // stages] * stages
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


def balanced(num_layers: int, stages: int) -> list[int]:
    """An uneven split: the extra layers go to the middle stages first, then to the first stage,
    and to the last stage (which also runs the output layer and the loss) last."""
    base, extra = divmod(num_layers, stages)
    counts = [base] * stages
    middle_first = sorted(range(stages), key=lambda s: (s in (0, stages - 1), s))
    for s in middle_first[:extra]:
        counts[s] += 1
    return counts


def stages_of_rank(pp_rank: int, pp: int, stages: int, schedule: str) -> list[int]:
    """The stages pp rank `pp_rank` runs, in model order."""
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return list(range(pp_rank, stages, pp))


def single_stage_order(schedule: str, stage: int, num_stages: int, n: int) -> list[tuple[str, int, int]]:
    """The compute actions of a one-stage-per-rank schedule for the rank running `stage`, in
    the order torch's `_step_microbatches` runs them: (F | B, stage, micro batch). GPipe: every
    forward, then every backward; 1F1B: min(n, num_stages - stage) forwards, then a backward and
    a forward in turn. (torch's own `pipeline_order` for these schedules is only a description,
    and in torch 2.13 its 1F1B order for the last rank skips micro batch 0.)"""
    if schedule == "gpipe":
        return [("F", stage, i) for i in range(n)] + [("B", stage, i) for i in range(n)]
    warmup = min(n, num_stages - stage)
    out = [("F", stage, i) for i in range(warmup)]
    for i in range(n):
        out.append(("B", stage, i))
        if warmup + i < n:
            out.append(("F", stage, warmup + i))
    return out
