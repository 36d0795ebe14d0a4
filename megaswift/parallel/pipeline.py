"""Pipeline schedules: torch.distributed.pipelining stages and schedules, driven by the engine.

torch's schedules run on gloo as well as NCCL and cover every schedule megaswift offers, so none
is written here by hand: `1f1b` and `gpipe` (one stage per rank), `interleaved` (Interleaved 1F1B,
vpp stages per rank) and `zbv` (the zero-bubble V schedule, which splits backward into an
input-gradient and a weight-gradient pass and fills the bubble with the latter).

What this module adds:
- the micro batches the engine already built go in whole: their tensors are concatenated and the
  schedule splits them back into the same micro batches;
- the loss goes through a callback that sees the micro batch's index (the schedule's `target`
  is that index), so an algorithm's loss can use anything in the micro batch, not only labels;
- `scale_grads=False`: the engine's loss is already divided by the tokens of the whole global
  batch, and torch's default would divide again by the micro-batch count;
- the time each rank spends computing (forward, backward, weight-gradient passes), from which the
  engine reports the pipeline bubble: the share of the ranks' wall time spent waiting;
- progress beats for the watchdog (parallel/watchdog.py): the schedules wait on point-to-point
  work without a timeout, which on gloo never ends if the peer hangs.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleZBVZeroBubble)

from megaswift.device import ComputeTimer
from megaswift.errors import LayoutError

from megaswift.faults import inject_test_fault

from .watchdog import beat

SINGLE_STAGE = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
MULTI_STAGE = {"interleaved": ScheduleInterleaved1F1B, "zbv": ScheduleZBVZeroBubble}


def check_microbatches(schedule: str, pp: int, n_microbatches: int) -> None:
    """The micro-batch counts torch's schedules accept, checked before any process starts."""
    if schedule == "1f1b" and n_microbatches < pp:
        raise LayoutError(f"pp_schedule 1f1b needs at least pp = {pp} micro batches per step, got {n_microbatches}; "
                          f"raise train.global_batch_size or lower train.micro_batch_size")
    if schedule in MULTI_STAGE:
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise LayoutError(f"pp_schedule {schedule} needs the micro batches per step ({n_microbatches}) to be a "
                              f"multiple of {rounds} (= their count // pp {pp}); use a multiple of pp")


class PipelineRunner:
    """This rank's stages and the schedule that runs them, for a fixed number of micro batches."""

    def __init__(self, stage_modules: list[tuple[int, torch.nn.Module]], num_stages: int, schedule: str,
                 n_microbatches: int, pp_group, device: torch.device):
        self.stages = [PipelineStage(module, index, num_stages, device, group=pp_group)
                       for index, module in stage_modules]
        self.n_microbatches = n_microbatches
        if schedule in SINGLE_STAGE:
            self.schedule = SINGLE_STAGE[schedule](self.stages[0], n_microbatches, loss_fn=self._loss,
                                                   scale_grads=False)
        else:
            self.schedule = MULTI_STAGE[schedule](self.stages, n_microbatches, loss_fn=self._loss, scale_grads=False)
        self._loss_of: Callable[[torch.Tensor, int], torch.Tensor] | None = None
        self.timer = ComputeTimer()  # CUDA events, not a sync per chunk: see ComputeTimer
        self.steps_run = 0
        self.pp_rank = self.stages[0].group_rank
        for stage in self.stages:
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                if hasattr(stage, name):
                    setattr(stage, name, self._timed(getattr(stage, name), stage.stage_index))

    def _timed(self, fn, stage_index: int):
        def timed(*args, **kwargs):
            inject_test_fault(f"stage{stage_index}", self.steps_run + 1)
            beat()
            started = self.timer.start()
            out = fn(*args, **kwargs)
            self.timer.stop(started)
            beat()
            return out
        return timed

    def describe(self) -> str:
        return (f"pipeline step {self.steps_run + 1} on pp rank {self.pp_rank} "
                f"(stages {[s.stage_index for s in self.stages]})")

    def _loss(self, output, target):
        return self._loss_of(output, int(target.reshape(-1)[0]))

    def run(self, micro_batches: list[dict], loss_of: Callable[[torch.Tensor, int], torch.Tensor]) -> dict:
        """Forward and backward of every micro batch. `micro_batches[i]` maps the stage module's
        argument names to tensors ([mb, ...] each; the first entry is the first stage's
        positional input); `loss_of(output, i)` turns the last stage's output for micro batch i
        into the scalar to back-propagate. Returns this rank's compute and wall seconds."""
        if len(micro_batches) != self.n_microbatches:
            raise ValueError(f"the schedule was built for {self.n_microbatches} micro batches, got {len(micro_batches)}")
        keys = [k for k, v in micro_batches[0].items() if v is not None]
        whole = {k: torch.cat([mb[k] for mb in micro_batches]) for k in keys}
        first, rest = keys[0], keys[1:]
        device = whole[first].device
        target = torch.arange(self.n_microbatches, device=device)
        self._loss_of = loss_of
        self.timer.seconds()  # drop anything timed outside a step (torch's shape inference)
        t0 = time.perf_counter()
        try:
            self.schedule.step(whole[first], target=target, return_outputs=False, **{k: whole[k] for k in rest})
        except Exception as e:
            stages = [s.stage_index for s in self.stages]
            raise PipelineFailure(
                f"pipeline step {self.steps_run + 1} failed on pp rank {self.pp_rank} (stages {stages}): "
                f"{type(e).__name__}: {e}\nIf a neighbouring stage failed or died first, its log has the cause; "
                f"a peer that stops answering ends the job after parallel.timeout_s.") from e
        finally:
            self._loss_of = None
        self.steps_run += 1
        busy_s = self.timer.seconds()  # waits for the device: the wall time below includes it
        return {"busy_s": busy_s, "wall_s": time.perf_counter() - t0}


class PipelineFailure(RuntimeError):
    """A pipeline step did not complete on this rank: its own stage raised, or a peer stage
    failed, died or timed out (the cause chained below)."""
