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
  work without a timeout, which on gloo never ends if the peer hangs;
- `fake_neighbours`, for the dry run (megaswift/planner/): torch's schedules start with a
  handshake and shape exchange that need real peers, so on the fake process group this rank's
  actions (torch's own `pipeline_order` for it) run here in the schedule's order, with what the
  neighbours would send stood in by empty tensors of the right shape. The sends and receives
  still go through the pp group, so they are counted.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleZBVZeroBubble)
from torch.distributed.pipelining._backward import stage_backward, stage_backward_input, stage_backward_weight

from megaswift.device import ComputeTimer
from megaswift.errors import LayoutError

from megaswift.faults import inject_test_fault

from .pipeline_stages import single_stage_order

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
        self.pp_group, self.pp_size = pp_group, dist.get_world_size(pp_group)
        self.num_stages = num_stages
        self.fake_neighbours: Callable[[int], tuple] | None = None
        """The dry run: micro batch index -> the tensors a stage receives from the stage before
        (empty, shaped as they would arrive); see run_with_fake_neighbours."""
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
        if self.fake_neighbours is not None:
            return self.run_with_fake_neighbours(whole, keys, loss_of)
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


    # -- the dry run -------------------------------------------------------------------------------
    def run_with_fake_neighbours(self, whole: dict, keys: list[str], loss_of) -> dict:
        """This rank's actions of the schedule, in torch's order (`pipeline_order`), on this
        rank's stages, without real neighbours. Forward, full backward, and the zero-bubble
        schedules' split backward (input gradients, then weight gradients later) run through
        torch's own autograd helpers, so what stays alive between actions is what torch keeps."""
        F, B, I = "F", "B", "I"  # forward, full backward, input-gradient backward; else W (weights)
        t0 = time.perf_counter()
        stages = {s.stage_index: s for s in self.stages}
        n = self.n_microbatches
        split = {k: torch.tensor_split(v, n) for k, v in whole.items()}
        first, rest = keys[0], keys[1:]
        fwd: dict[tuple[int, int], tuple] = {}  # (stage, mb) -> (inputs, outputs or loss)
        outputs: dict[tuple[int, int], tuple] = {}  # a stage's outputs, for the next stage on this rank
        weight_todo: dict[tuple[int, int], tuple] = {}  # split backward: what the W action needs
        for kind, s, i in self._actions():
            stage = stages[s]
            module = stage.submod
            if kind == F:
                kwargs = {k: split[k][i] for k in rest}
                if s == 0:
                    inputs = (split[first][i],)
                elif (s - 1, i) in outputs:  # the stage before runs on this rank: handed over here
                    inputs = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in outputs.pop((s - 1, i)))
                else:
                    inputs = tuple(t.requires_grad_(t.is_floating_point()) for t in self.fake_neighbours(i))
                    self._p2p("recv", inputs, s - 1)
                out = module(*inputs, **kwargs)
                if s == self.num_stages - 1:
                    fwd[(s, i)] = (inputs, loss_of(out, i))
                    continue
                out = out if isinstance(out, tuple) else (out,)
                fwd[(s, i)] = (inputs, out)
                if s + 1 in stages:
                    outputs[(s, i)] = out
                else:
                    self._p2p("send", out, s + 1)
            elif kind in (B, I):
                inputs, out = fwd.pop((s, i))
                last = s == self.num_stages - 1
                grads = None
                if not last:
                    grads = tuple(torch.empty_like(t) for t in out)
                    if s + 1 not in stages:
                        self._p2p("recv", grads, s + 1)
                inputs_with_grad = [t for t in inputs if t.requires_grad]
                if kind == B:
                    grad_in = stage_backward(out, grads, inputs_with_grad)
                elif s == 0:  # torch's first stage leaves its whole backward to W
                    weight_todo[(s, i)] = (out, grads)
                    grad_in = ()
                else:
                    grad_in, groups = stage_backward_input([out] if last else list(out), grads and list(grads),
                                                           inputs_with_grad, module.parameters())
                    weight_todo[(s, i)] = groups
                sent = tuple(g for g in grad_in if g is not None)
                if s > 0 and s - 1 not in stages and sent:
                    self._p2p("send", sent, s - 1)
            else:  # W
                todo = weight_todo.pop((s, i))
                if isinstance(todo, tuple):
                    stage_backward(*todo, [])
                else:
                    stage_backward_weight(module.parameters(), todo)
        self.steps_run += 1
        wall = time.perf_counter() - t0
        return {"busy_s": wall, "wall_s": wall}

    def _actions(self) -> list[tuple[str, int, int]]:
        """This rank's compute actions in execution order: (F | B | I | W, stage, micro batch).
        The multi-stage schedules execute torch's `pipeline_order`; the single-stage ones run as
        `pipeline_stages.single_stage_order` says."""
        if not isinstance(self.schedule, (Schedule1F1B, ScheduleGPipe)):
            return [(a.computation_type.value, a.stage_index, a.microbatch_index)
                    for a in self.schedule.pipeline_order[self.pp_rank]
                    if a is not None and a.computation_type.value in ("F", "B", "I", "W")]
        name = "gpipe" if isinstance(self.schedule, ScheduleGPipe) else "1f1b"
        return single_stage_order(name, self.stages[0].stage_index, self.num_stages, self.n_microbatches)

    def _p2p(self, kind: str, tensors, stage: int) -> None:
        """Send to / receive from the pp rank that runs `stage` (on the fake process group: moves
        nothing, but the collective is counted like the real one)."""
        pp = self.pp_size
        zbv = isinstance(self.schedule, ScheduleZBVZeroBubble)  # stages in a V: s and 2 pp - 1 - s share a rank
        peer = dist.get_global_rank(self.pp_group, stage if stage < pp else (2 * pp - 1 - stage if zbv else stage % pp))
        op = dist.isend if kind == "send" else dist.irecv
        for work in dist.batch_isend_irecv([dist.P2POp(op, t.contiguous(), peer, self.pp_group) for t in tensors]):
            work.wait()


class PipelineFailure(RuntimeError):
    """A pipeline step did not complete on this rank: its own stage raised, or a peer stage
    failed, died or timed out (the cause chained below)."""
