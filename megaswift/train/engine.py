"""The training engine: one loop for every algorithm (train/algorithm.py is the contract).

An algorithm supplies the data (an object with `next_global_batch()`, `state_dict()`,
`load_state_dict()`) and, per micro batch, a loss *sum* and the number of units it is summed over.
The engine divides every micro batch's loss by the units of the whole global batch (all micro
batches, all dp ranks), so the result does not depend on the layout or on gradient accumulation,
then reduces gradients over dp (SUM), clips by the global norm and steps AdamW.

Under pipeline parallelism the model is this rank's stages (a PipelineModel) and the micro
batches go through a torch.distributed.pipelining schedule instead of a plain loop; the
algorithm's `loss_from_output` then runs on the last stage, and the loss and metrics are summed
over the pp group, where the other stages contribute zeros.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch

from megaswift import device, setup
from megaswift.checkpoint import train_state
from megaswift.checkpoint.model_state import SaveFailed
from megaswift.errors import CheckpointError, Interrupted, Stopped
from megaswift.faults import inject_test_fault
from megaswift.parallel import collectives
from megaswift.parallel.data_parallel import DataParallelSet
from megaswift.parallel.grads import finalize_grads
from megaswift.parallel.watchdog import Watchdog, beat

from . import expert_bias, optim, stopping
from .algorithm import Algorithm, TrainContext
from .metrics import MetricsLogger, StepTimer, peak_flops, train_flops_per_token
from .nonfinite import NonFiniteError, NonFiniteGuard, all_finite


class Trainer:
    def __init__(self, cfg, algorithm: Algorithm, model, st, *, source_dir: str | None, export_dtype: str,
                 resume_dir: str | None = None):
        self.cfg, self.alg, self.model, self.st = cfg, algorithm, model, st
        self.device = device.get_device()
        self.source_dir, self.export_dtype = source_dir, export_dtype
        self.output_dir = cfg.train.output_dir
        self.resume_dir = resume_dir
        self.step = 0
        self.saved_step: int | None = None  # the last step this run saved
        self.tokens_seen = 0
        self.resumed_elapsed_s = 0.0  # wall time of the run before the checkpoint it resumed
        model.set_attention_backend(cfg.model.attention_backend)
        model.set_recompute(cfg.train.recompute)
        self.dp = DataParallelSet(list(model.parameters()), st, zero=cfg.optim.zero,
                                  bucket_numel=cfg.parallel.ddp_bucket_size)
        self.optimizer = optim.build_optimizer(self.dp, cfg.optim, self.device.type == "cuda")
        self.norm_weights = model.grad_norm_weights()
        self.guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_skipped_steps, st.rank,
                                    st.layout.world_size, self.device)
        t = cfg.train
        self.n_micro = t.global_batch(st.dp_size) // (t.micro_batch_size * st.dp_size)
        self.moe_layers = model.cfg.moe_layers
        if self.moe_layers:  # the auxiliary losses of the step are the mean over its micro batches
            m = cfg.moe
            model.set_moe_options(aux_loss_coef=m.aux_loss_coef, z_loss_coef=m.z_loss_coef,
                                  capacity_factor=m.capacity_factor, backend=m.expert_backend,
                                  grad_scale=1.0 / self.n_micro, force_balance=m.router_force_balance,
                                  aux_loss_type=m.aux_loss_type)
        self._moe_step: dict[int, dict] = {}
        expert_bias.check_config(cfg, model.cfg)
        # decided by the model config, not by the layers held here: every pp rank must join the
        # same reduction in _moe_after_step, those without an MoE layer too
        self.expert_bias = (expert_bias.ExpertBias(model, cfg.moe.bias_update_rate)
                            if self.moe_layers and model.cfg.moe_router_expert_bias else None)
        self.pipeline = self._build_pipeline() if st.pp_size > 1 else None
        # point-to-point waits (pipeline, ring attention) never time out on gloo: see parallel/watchdog.py
        self.watchdog = (Watchdog(cfg.parallel.timeout_s, marker=device.progress_marker)
                         if st.layout.world_size > 1 else None)
        self.ctx = TrainContext(cfg=cfg, st=st, model=model, device=self.device, source_dir=source_dir,
                                output_dir=self.output_dir, resume_dir=resume_dir,
                                prepare_micro_batch=self.prepare_micro_batch)
        self.data = algorithm.build_data(self.ctx)
        if resume_dir is not None:
            self._resume(resume_dir)
        if cfg.model.dtype != "float32" and self.compute_dtype == torch.float32 and device.rank() == 0:
            print(f"note: model.dtype={cfg.model.dtype} is the autocast dtype on CUDA; this CPU run trains in float32 "
                  f"(model.cpu_autocast=true runs it in {cfg.model.dtype})", flush=True)
        self.flops_per_token = train_flops_per_token(model.cfg, cfg.data.seq_len)
        self.peak_flops = peak_flops()
        self.logger = MetricsLogger(self.output_dir, total_steps=cfg.train.steps, enabled=device.rank() == 0,
                                    run_config=cfg.to_dict(), wandb=cfg.log.wandb, tensorboard=cfg.log.tensorboard,
                                    every=cfg.log.every, name=os.path.basename(os.path.abspath(self.output_dir)),
                                    resumed_at=self.step if resume_dir is not None else None)
        cleaned = train_state.clean_interrupted_saves(self.output_dir)
        if cleaned:
            print(f"removed what interrupted saves left in {train_state.checkpoints_dir(self.output_dir)}: "
                  f"{', '.join(cleaned)}", flush=True)

    def _build_pipeline(self):
        from megaswift.parallel.pipeline import PipelineRunner

        return PipelineRunner(self.model.stage_modules(), self.model.num_stages, self.model.schedule, self.n_micro,
                              self.st.pp_group, self.device)

    # -- one optimizer step ----------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """What the forward and backward compute in (the master weights are always fp32)."""
        return setup.compute_dtype(self.cfg, self.device)

    def _autocast(self):
        return setup.autocast(self.cfg, self.device)

    def train_step(self, micro_batches: list[dict]) -> dict:
        """Forward/backward over this rank's micro batches, gradient reduction, clipping, step."""
        st, dp = self.st, self.dp
        local_tokens = sum(int(mb.get("num_tokens", mb["input_ids"].numel())) for mb in micro_batches)
        micro_batches = [self.prepare_micro_batch(mb) for mb in micro_batches]
        local_units = sum(self.alg.count(mb) for mb in micro_batches)  # a cp shard counts its own tokens
        total_units, total_tokens = collectives.all_reduce_values([local_units, local_tokens], self.device, group=st.dp_cp_group)
        total_tokens /= st.cp_size  # every cp rank counted the whole micro batches
        # a loss whole on every cp rank: each rank back-propagates it through its own tokens only,
        # so the gradient is normalised by one cp rank's units (the sums over cp reach the reports)
        grad_units = total_units / st.cp_size if self.alg.loss_replicated_over_cp else total_units
        with self._autocast():
            self.alg.before_step(micro_batches)
        lr = optim.lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        optim.set_lr(self.optimizer, lr)
        dp.zero_grad()
        with self._watched():
            inject_test_fault(f"rank{st.rank}", self.step + 1)
            loss_acc, extra_acc, timing = self.forward_backward(micro_batches, grad_units)
            loss_acc, extra_acc = float(loss_acc), {k: float(v) for k, v in extra_acc.items()}
            if self.pipeline is not None:
                timing = self._pipeline_metrics(timing)
        self._mark_computed()
        # gloo's waits on asynchronous collectives do not time out either (measured: a rank hung
        # in its step kept dp=4 peers in this wait past 80 s with a 20 s timeout)
        with self._watched_sync():
            self.reduce_gradients()
            # on CUDA the collectives above are only queued: this is where the host waits for them
            grad_norm = dp.grad_norm(self.norm_weights).item()
        nonfinite = None
        try:
            skip = self.guard.check(self.step + 1, loss_acc, grad_norm, self.last_good_checkpoint())
        except NonFiniteError as e:
            nonfinite, skip = e, True
        if not skip:
            clip = self.cfg.optim.clip_grad
            if clip > 0 and grad_norm > clip:
                dp.scale_grads(clip / (grad_norm + 1e-6))
            self.apply_update()
        # the routers' expert biases move after the weights (never on a skipped step)
        moe = self._moe_after_step(update_bias=not skip) if self.moe_layers else {}
        self.step += 1
        # declared, not read off extra_acc: under PP only the last stage computes them
        keys = sorted(set(self.alg.metrics) | set(extra_acc))
        sums = collectives.all_reduce_values([loss_acc] + [extra_acc.get(k, 0.0) for k in keys], self.device,
                                             group=st.dp_cp_group)
        if self.pipeline is not None:  # the losses live on the last stage; the others add zeros
            sums = collectives.all_reduce_values(sums, self.device, group=st.pp_group)
        out = {"loss": sums[0] / max(total_units, 1), "grad_norm": grad_norm, "lr": lr,
               "tokens": int(round(total_tokens)), "loss_tokens": int(round(grad_units))}
        out.update({k: v / max(total_units, 1) for k, v in zip(keys, sums[1:])})
        out.update(timing)
        out.update(moe)
        if self.guard.skipped:
            out.update(skipped=int(skip), skipped_steps=self.guard.skipped)
        if nonfinite is not None:
            nonfinite.metrics = out
            raise nonfinite
        return out

    # The parts of a step, without a host read, so that the dry run (planner/dry_run.py) runs the
    # same code on fake tensors: forward_backward, reduce_gradients, apply_update.
    def forward_backward(self, micro_batches: list[dict], grad_units: float) -> tuple:
        """Forward and backward of the prepared micro batches, each loss divided by `grad_units`.
        Returns (loss sum, {metric: sum}, timing), the sums as tensors or numbers: nothing here
        waits for the device."""
        if self.pipeline is None:
            return self._forward_backward(micro_batches, grad_units)
        return self._forward_backward_pipeline(micro_batches, grad_units)

    def reduce_gradients(self) -> None:
        """The gradient reduction over dp and the model's fix-ups (tied embeddings, TP partial
        sums: parallel/grads.py)."""
        if self.pipeline is None:
            self.dp.finish_grad_sync()
            finalize_grads(self.model)
        else:  # PP: the fix-ups are sums, so they run on the local gradients first; then dp reduces
            finalize_grads(self.model)
            self.dp.finish_grad_sync()

    def apply_update(self) -> None:
        """AdamW on this rank's pieces, then (ZeRO-1) the all-gather of the updated shards."""
        self.optimizer.step()
        self.dp.gather_params()

    def last_good_checkpoint(self) -> str | None:
        """The newest complete checkpoint of this run (every saved one is finite, see save()),
        else the one it resumed from."""
        steps = train_state.completed_steps(self.output_dir)
        return train_state.step_dir(self.output_dir, steps[-1]) if steps else self.resume_dir

    # -- mixture of experts ------------------------------------------------------------------------
    def _keep_moe_stats(self, i: int) -> None:
        if self.moe_layers:
            self._moe_step[i] = self.model.pop_moe_stats()

    def _moe_after_step(self, update_bias: bool) -> dict:
        """The step's router statistics, once per step: the load-balancing and z-loss (means over
        the step's micro batches), tokens routed to each expert of each MoE layer, and per layer
        the max/mean expert load (1 = perfect balance). The statistics are the global micro
        batches' (models/moe.py); under PP only the last stage has them, so they are summed over
        the pp group, which also hands the step's counts to the stages whose expert biases move
        here (moe.bias_update_rate, train/expert_bias.py) and gathers the biases for
        `moe_expert_bias_absmax`. One reduction and one host read per step."""
        n_layers, n_exp = len(self.moe_layers), self.model.cfg.num_moe_experts
        cells = n_layers * n_exp
        bias = self.expert_bias
        t = torch.zeros(2 + cells * (2 if bias else 1), dtype=torch.float64, device=self.device)
        for stats in self._moe_step.values():
            if stats:
                t[0] += stats["aux"]
                t[1] += stats["z"]
                t[2: 2 + cells] += stats["counts"].reshape(-1).to(t)
        self._moe_step = {}
        if bias:
            t[2 + cells:] = bias.gathered(self.device).reshape(-1)
        collectives.all_reduce(t, group=self.st.pp_group)
        counts = t[2: 2 + cells].view(n_layers, n_exp)
        load = counts.max(1).values / counts.mean(1).clamp_min(1e-9)
        host = [t[:2], counts.reshape(-1), load]
        if bias:
            after = t[2 + cells:].view(n_layers, n_exp)
            if update_bias and bias.rate > 0:  # in fp32 as the biases: the metric is their value
                after = (after.float() + bias.update(counts).float()).to(t.dtype)
            host.append(after.abs().max().view(1))
        values = torch.cat(host).tolist()
        aux, z = values[0], values[1]
        counts_l = [values[2 + i * n_exp: 2 + (i + 1) * n_exp] for i in range(n_layers)]
        load_l = values[2 + cells: 2 + cells + n_layers]
        out = {"moe_aux_loss": aux / self.n_micro, "moe_z_loss": z / self.n_micro,
               "moe_tokens_per_expert": {str(layer): [int(round(c)) for c in row]
                                         for layer, row in zip(self.moe_layers, counts_l)},
               "moe_load_max_mean": {str(layer): round(x, 4) for layer, x in zip(self.moe_layers, load_l)},
               "moe_max_load_ratio": max(load_l)}
        if bias:
            out["moe_expert_bias_absmax"] = values[-1]
        return out

    # -- which rank failed ------------------------------------------------------------------------
    def _mark_computed(self) -> None:
        """Record in the job's store that this rank finished the step's forward and backward, so
        a rank whose collective fails can name the ranks that never got there."""
        if self.st.layout.world_size > 1:
            collectives.store_set(f"computed/{self.st.rank}", str(self.step + 1))

    def _laggards(self) -> list[int]:
        """Ranks that have not finished this step's forward and backward, from the job's store."""
        return [r for r in range(self.st.layout.world_size)
                if int(collectives.store_get(f"computed/{r}", "0")) < self.step + 1]

    def _laggards_error(self, err: Exception) -> Exception:
        if self.st.layout.world_size == 1:
            return err
        try:
            behind = self._laggards()
        except Exception:  # noqa: BLE001 - the store may be gone with the job; keep the first error
            return err
        if not behind:
            return err
        return RuntimeError(f"step {self.step + 1} failed on rank {self.st.rank}: rank(s) {behind} never finished "
                            f"its forward and backward (dead, or hung past parallel.timeout_s="
                            f"{self.cfg.parallel.timeout_s}); their logs have the cause. First error: {err}")

    def _watched_sync(self):
        if self.watchdog is None:
            return contextlib.nullcontext()

        def detail():
            behind = self._laggards()
            return f"; rank(s) {behind} never finished its forward and backward" if behind else ""
        return self.watchdog.armed(f"step {self.step + 1} on rank {self.st.rank} (gradient sync)", detail)

    def _watched(self):
        # gloo: plain collectives time out by themselves (see _laggards_error), point-to-point
        # waits do not. CUDA: every wait is queued on the device and NCCL's timeout aborts
        # without naming anyone, so the whole forward and backward is watched
        p2p = self.st.pp_size > 1 or self.st.cp_size > 1
        if self.watchdog is None or not (p2p or self.device.type == "cuda"):
            return contextlib.nullcontext()
        if self.pipeline is not None:
            what = self.pipeline.describe()
        elif self.st.cp_size > 1:
            what = f"step {self.step + 1} on rank {self.st.rank} (cp rank {self.st.cp_rank})"
        else:
            what = f"step {self.step + 1} on rank {self.st.rank} (forward and backward)"
        return self.watchdog.armed(what)

    def prepare_micro_batch(self, mb: dict) -> dict:
        """This rank's part of a micro batch (its cp shard), on the device."""
        if self.st.cp_size > 1:  # each cp rank keeps its zigzag share of every row
            mb = self._cp_shard(mb)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}

    def _cp_shard(self, mb: dict) -> dict:
        from megaswift.parallel.context_parallel import shard_batch

        st = self.st
        return shard_batch(mb, st.cp_size, st.cp_rank, multiple=st.layout.seq_multiple(bool(self.moe_layers)))

    def _forward_backward(self, micro_batches, total_units):
        """Micro batches one after another; dp reduces during the last one's backward."""
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        extra_acc: dict[str, float] = {}
        for i, mb in enumerate(micro_batches):
            self.dp.sync = i == len(micro_batches) - 1
            with self._autocast():
                loss_sum, extra = self.alg.loss_sum(self.model, mb)
            self._keep_moe_stats(i)
            (loss_sum / max(total_units, 1)).backward()
            beat()  # progress for the watchdog (on CUDA: once the device gets here)
            loss_acc += loss_sum.detach().double()
            for k, v in extra.items():
                extra_acc[k] = extra_acc.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else v)
        return loss_acc, extra_acc, {}

    def _forward_backward_pipeline(self, micro_batches, total_units):
        """The pipeline schedule runs every micro batch; the loss callback runs on the last stage.
        dp reduces after the schedule: the schedule gives no hook at each stage's last backward."""
        results: dict[int, tuple] = {}

        def loss_of(output, i):
            loss_sum, extra = self.alg.loss_from_output(output, micro_batches[i])
            self._keep_moe_stats(i)
            # torch's shape inference calls this once more for micro batch 0: keyed, not added
            results[i] = (loss_sum.detach(), {k: v.detach() if isinstance(v, torch.Tensor) else v
                                              for k, v in extra.items()})
            return loss_sum / max(total_units, 1)

        self.dp.sync = False
        with self._autocast():
            timing = self.pipeline.run([self.alg.forward_inputs(mb) for mb in micro_batches], loss_of)
        loss_acc, extra_acc = 0.0, {}
        for loss_sum, extra in results.values():
            loss_acc = loss_acc + loss_sum
            for k, v in extra.items():
                extra_acc[k] = extra_acc.get(k, 0.0) + v
        return loss_acc, extra_acc, timing

    def _pipeline_metrics(self, timing: dict) -> dict:
        """Compute seconds of every pp rank, and the bubble: the share of the pp ranks' wall
        time (the slowest rank's) spent not computing."""
        st = self.st
        mine = torch.zeros(2 * st.pp_size, dtype=torch.float64, device=self.device)
        mine[st.pp_rank], mine[st.pp_size + st.pp_rank] = timing["busy_s"], timing["wall_s"]
        collectives.all_reduce(mine, group=st.pp_group)
        busy, wall = mine[: st.pp_size].tolist(), mine[st.pp_size:].tolist()
        return {"pp_bubble": 1.0 - sum(busy) / (st.pp_size * max(wall)), "pp_stage_compute_s": busy,
                "pp_schedule_s": max(wall)}

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> dict:
        """The loop, stopping after a step on a stop signal (stopping.py); Ctrl-C in one line."""
        try:
            return self._train(stopping.requests())
        except KeyboardInterrupt:
            raise Interrupted(f"Ctrl-C during step {self.step + 1}; the last complete checkpoint is "
                              f"{self.last_good_checkpoint() or 'none (none was saved yet)'}") from None

    def _train(self, stops: stopping.StopRequests) -> dict:
        cfg = self.cfg
        timer = StepTimer()
        start_elapsed = self.resumed_elapsed_s
        padded_tokens = cfg.train.micro_batch_size * cfg.data.seq_len
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            batches = self.data.next_global_batch()
            data_s = time.perf_counter() - t0
            try:
                m = self.train_step(batches)
            except NonFiniteError as e:  # the step's row goes to the log, then the run ends
                if e.metrics is not None:
                    self._log_step(e.metrics, timer.lap(), start_elapsed + timer.elapsed(), padded_tokens, len(batches))
                self.logger.close()
                raise
            except RuntimeError as e:  # a collective failed or timed out: say which ranks fell behind
                raise self._laggards_error(e) from e
            dt = timer.lap()
            m.update(self.alg.step_metrics(data_s=data_s, step_s=dt))
            self._log_step(m, dt, start_elapsed + timer.elapsed(), padded_tokens, len(batches))
            every = cfg.checkpoint.every
            if every and self.step % every == 0 and self.step < cfg.train.steps:
                self.save(start_elapsed + timer.elapsed())
            delay = float(os.environ.get("MEGASWIFT_TEST_STEP_DELAY_S", "0"))
            if delay:  # lets the tests stop a run of a tiny model in the middle
                time.sleep(delay)
            signal_name = stops.agreed(self.st.layout.world_size, self.device)
            if signal_name and self.step < cfg.train.steps:
                path = self.save(start_elapsed + timer.elapsed())
                self.logger.close()
                raise Stopped(f"{signal_name} after step {self.step}: saved {path}; the same command resumes from "
                              f"it (checkpoint.load latest, the default after a requeue)")
        last = self.save(start_elapsed + timer.elapsed()) if self.step > 0 else None
        summary = self.logger.summary()
        summary["checkpoint"] = last
        if cfg.checkpoint.export_hf and last:
            summary["export"] = self.export(last)
        self.logger.close()
        return summary

    def _log_step(self, m: dict, dt: float, elapsed_s: float, padded_tokens: int, n_micro: int) -> None:
        self.tokens_seen += m["tokens"]
        m.update(step=self.step, tokens_per_s=m["tokens"] / dt, step_time_s=dt, elapsed_s=elapsed_s,
                 peak_mem_gb=device.peak_memory_bytes() / 1e9)
        if self.peak_flops:
            computed = padded_tokens * n_micro * self.st.dp_size  # padding costs FLOPs too
            m["mfu"] = self.flops_per_token * computed / dt / (self.peak_flops * self.st.layout.world_size)
        self.logger.log(m)

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, elapsed_s: float) -> str:
        path = train_state.step_dir(self.output_dir, self.step)
        if self.saved_step == self.step:
            return path  # this run saved this step already (the final save after a periodic one)
        # a step_N left by an earlier run is written again: it may be one that `latest` skipped
        # as damaged, and must not be what this run ends on
        mc = self.model.cfg
        meta = {"family": mc.family, "model_config": mc.to_dict(), "dtype": "float32",
                "export_dtype": self.export_dtype, "saved_layout": self.st.layout.describe(),
                "source": self.source_dir,
                "train": {"algorithm": self.alg.name, "step": self.step, "data": self.data.state_dict(),
                          "tokens": self.tokens_seen, "elapsed_s": elapsed_s, "config": self.cfg.to_dict()}}
        if getattr(self.model, "lora_meta", None):  # adapters only: where the frozen base comes from
            meta["lora"] = self.model.lora_meta
        opt_state = optim.full_state(self.dp, self.optimizer)
        # the guard keeps inf/NaN out of the update; this is the last line of defence, so that a
        # checkpoint (and with `keep`, the only ones left) can never be poisoned
        tensors = [p.detach() for p in self.model.parameters()] + [t for d in opt_state.values() for t in d.values()]
        if not all_finite(tensors, self.device):
            raise NonFiniteError(f"refusing to save step {self.step}: its weights or AdamW state hold inf/NaN; "
                                 f"the last good checkpoint is {self.last_good_checkpoint() or 'none'}")
        meta["finite"] = True  # checked above; prune() never deletes the newest such checkpoint
        last_good = self.last_good_checkpoint()
        try:  # source_dir is a directory or None (plan_training checks)
            train_state.save_training(path, self.model, opt_state, meta, self.source_dir)
        except SaveFailed as e:
            raise CheckpointError(f"saving step {self.step} to {path} failed ({e}); the last complete checkpoint, "
                                  f"{last_good or 'none'}, is intact; free space there (or lower checkpoint.keep) "
                                  f"and resume with checkpoint.load latest") from e
        self.saved_step = self.step
        train_state.prune(self.output_dir, self.cfg.checkpoint.keep)
        return path

    def _resume(self, ckpt_dir: str) -> None:
        opt_state, meta = train_state.load_training(ckpt_dir, self.model, optim.STATE_KEYS)
        t = meta["train"]
        self.step, self.tokens_seen, self.resumed_elapsed_s = t["step"], t.get("tokens", 0), t.get("elapsed_s", 0.0)
        optim.load_full_state(self.dp, self.optimizer, opt_state, self.step)
        self.data.load_state_dict(t["data"])
        if device.rank() == 0:
            print(f"resumed from {ckpt_dir} at step {self.step} (saved with {meta.get('saved_layout')})", flush=True)

    def export(self, ckpt_dir: str) -> str:
        from megaswift.convert.hf_export import export_hf

        out = self.cfg.checkpoint.export_dir or os.path.join(self.output_dir, "hf")
        failed = None
        if device.rank() == 0:
            try:
                export_hf(ckpt_dir, out, overwrite=self.cfg.checkpoint.export_overwrite,
                          overwrite_option="set checkpoint.export_overwrite=true")
            except Exception as e:  # noqa: BLE001 - re-raised below, once the other ranks know
                failed = e
        # the other ranks learn of a failed export instead of waiting for rank 0 until the timeout
        any_failed = collectives.any_rank(failed is not None, self.device)
        if failed is not None:
            raise failed
        if any_failed:
            raise CheckpointError(f"the export to {out} failed on rank 0 (its message says why)")
        return out
