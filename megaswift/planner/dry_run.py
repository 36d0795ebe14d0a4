"""The dry run: megaswift's own training step at the real world size, in one CPU process.

For one rank position of a layout, the process joins torch's fake process group as that rank of
the whole world (`torch.testing._internal.distributed.fake_pg`: every group of the rank grid
exists and collectives return at once without moving data), builds the real model, dp buckets,
optimizer, pipeline stages and whatever the algorithm holds (DPO's reference) under
`FakeTensorMode` (tensors with shapes, dtypes and devices but no data), creates AdamW's state
with an optimizer step, then runs one whole training step on the algorithm's micro batches
(`Algorithm.dry_run_batches`) through the engine's own parts (Trainer.forward_backward,
reduce_gradients, apply_update), measured by `StepAccountant` (planner/accountant.py): peak
bytes by category and the bytes of every collective by class. `measure_step(fake=False)` runs
the same on real tensors through `Trainer.train_step` (the parity tests, the GPU check).

What the fake tensors cannot do is read data, so the dry run
- routes MoE tokens with `moe.router_force_balance` (an even spread; real routing is data-
  dependent);
- skips the host reads of a real step (loss and gradient-norm values, the non-finite check,
  clipping, metrics): those hold scalars only;
- runs SFT and DPO, not GRPO: its rollouts stop on the tokens they sample.

Rank positions: ranks that differ in what they hold are the pipeline positions (the first stage
holds the embedding, the last the output layer and loss, middle stages may hold more layers);
tp, cp, dp and ep ranks of one stage hold the same shapes (experts evenly split, force-balanced
routing). `positions` picks the pp ranks to run: the first, the last, and the middle one with
the most layers.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from megaswift.errors import ConfigError

from .accountant import CATEGORIES, StepAccountant

GIB = 1024 ** 3
DRY_RUN_ALGORITHMS = ("sft", "dpo")  # GRPO's rollouts stop on sampled tokens: data the fake tensors lack


@dataclass
class PositionResult:
    """What one rank position holds and sends in a training step."""
    rank: int
    world_size: int
    pp_rank: int
    stages: list[int]
    layers: int                 # decoder layers on this rank
    micro_batches: int          # micro batches the measured step ran (see micro_batch_cap)
    params: int                 # parameter elements on this rank (trainable and frozen)
    trainable: int
    state_bytes: dict = field(default_factory=dict)      # parameters / gradients / optimizer, exact
    peak_bytes: int = 0
    peak_by_category: dict = field(default_factory=dict)
    comm_bytes: dict = field(default_factory=dict)       # collective class -> bytes in the step
    comm_detail: dict = field(default_factory=dict)      # "class kind" -> [calls, bytes]
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def with_values(cfg, values: dict):
    """A copy of the config with dotted keys set (checked like any override)."""
    from megaswift.config import config_from_dict

    raw = cfg.to_dict()
    for dotted, value in values.items():
        *path, last = dotted.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_dict(raw)


def group_classes(st) -> dict:
    """Process group -> collective class, for the accountant."""
    out = {}
    for name in ("tp", "cp", "ep", "etp", "pp", "dp_cp", "edp", "dp", "embedding", "cp_ring", "cp_ulysses"):
        group = getattr(st, f"{name}_group", None)
        if group is not None:
            out[group] = {"dp_cp": "dp", "cp_ring": "cp", "cp_ulysses": "cp", "embedding": "pp"}.get(name, name)
    return out


def label_state(acct: StepAccountant, trainer) -> dict:
    """Label what persists across steps; returns its exact bytes by category."""
    model, dp, opt = trainer.model, trainer.dp, trainer.optimizer
    parts = [part for part, _ in dp.parts]
    param_tensors = [b.data for part in parts for b in part.buckets]
    param_tensors += [p for p in model.parameters() if not p.requires_grad]
    param_tensors += list(_buffers(model))
    # a frozen model the algorithm holds besides the policy: its reference (train/reference.py)
    frozen = getattr(getattr(trainer.alg, "reference", None), "frozen", None)
    if frozen is not None:
        param_tensors += list(frozen.parameters()) + list(_buffers(frozen))
    grad_tensors = [b.grad for part in parts for b in part.buckets]
    grad_tensors += [b.shard_grad for part in parts for b in part.buckets if b.shard_grad is not None]
    opt_tensors = [t for state in opt.state.values() for t in state.values()
                   if isinstance(t, torch.Tensor) and t.dim() > 0]
    return {"parameters": acct.label(param_tensors, "parameters"),
            "gradients": acct.label(grad_tensors, "gradients"),
            "optimizer": acct.label(opt_tensors, "optimizer")}


def _buffers(model):
    for chunk in getattr(model, "chunks", [model]):
        yield from chunk.buffers()


def run_measured_steps(trainer, acct: StepAccountant, make_batches, real: bool = False, steps: int = 2,
                       on_step=None) -> dict:
    """`steps` training steps, measuring the last: returns the labelled state bytes. `real`:
    through Trainer.train_step; otherwise through its parts without host reads, and the first
    step is only its optimizer step on zero gradients (what persists after a step is AdamW's
    state; a whole first step would double the dry run's time for nothing else). `on_step` is
    called after each step (timing)."""
    state = {}
    for step in range(steps):
        last = step == steps - 1
        if last:
            state = label_state(acct, trainer)
            acct.reset_peak()
            acct.reset_comm()
        if real:
            trainer.train_step(make_batches())
            if on_step:
                on_step()
            continue
        if not last:
            trainer.dp.zero_grad()
            trainer.apply_update()
            continue
        micro_batches = [trainer.prepare_micro_batch(mb) for mb in make_batches()]
        units = float(len(micro_batches))  # what the loss is divided by: any number will do
        with trainer._autocast():
            trainer.alg.before_step(micro_batches)
        trainer.dp.zero_grad()
        trainer.forward_backward(micro_batches, units)
        trainer.reduce_gradients()
        trainer.dp.grad_norm(trainer.norm_weights)
        trainer.apply_update()
        if trainer.moe_layers:
            trainer._moe_step = {}
    return state


def stage_input(cfg, model_cfg, st, rows: int):
    """What a pipeline stage receives from the stage before, per micro batch, as empty tensors:
    the hidden states [rows, s, h] of this rank's tokens (rows: the algorithm's rows per micro
    batch, 2 per pair for DPO) (s / cp, and / tp under sequence
    parallelism) in fp32 (the residual stream: the embedding's output is fp32, and fp32 + the
    bf16 outputs of autocast's matmuls stays fp32), and for MoE models the router statistics
    [MoE layers, 2E + 2] (models/moe.py; per batch row, [MoE layers, rows, 2E + 2], for
    moe.aux_loss_type seq)."""
    from megaswift.models.moe import stats_shape

    seq = cfg.data.seq_len // st.cp_size // (st.tp_size if st.sp else 1)
    shape = (rows, seq, model_cfg.hidden_size)
    stats = stats_shape(len(model_cfg.moe_layers), model_cfg.num_moe_experts,
                        rows if cfg.moe.aux_loss_type == "seq" else None)

    def make(_index: int) -> tuple:
        hidden = torch.empty(shape, dtype=torch.float32)
        if not model_cfg.moe_layers:
            return (hidden,)
        return hidden, torch.zeros(stats)
    return make


def positions(cfg, model_cfg, world_size: int) -> list[int]:
    """Global ranks to dry-run: pp rank 0, the last pp rank, and the middle pp rank with the most
    layers (tp, cp, dp and ep coordinates 0)."""
    from megaswift.parallel.pipeline_stages import num_stages, split_layers, stages_of_rank

    p = cfg.parallel
    if p.pp == 1:
        return [0]
    per_pp = world_size // p.pp
    stages = num_stages(p.pp, p.vpp, p.pp_schedule)
    split = split_layers(model_cfg.num_layers, stages, p.pp_layers)
    layers = [sum(len(split[s]) for s in stages_of_rank(r, p.pp, stages, p.pp_schedule)) for r in range(p.pp)]
    picks = {0, p.pp - 1}
    middle = list(range(1, p.pp - 1))
    if middle:
        picks.add(max(middle, key=lambda r: (layers[r], -r)))
    return [r * per_pp for r in sorted(picks)]


@contextlib.contextmanager
def fake_world(rank: int, world_size: int):
    """This process as `rank` of `world_size` on torch's fake process group."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def micro_batch_cap(cfg) -> int:
    """The micro batches a dry run needs to reach a step's peak: 2 without a pipeline (the first
    accumulates, the last also reduces), else 2 x pp (every schedule reaches its most micro
    batches in flight by then: 1F1B and ZBV hold at most pp, interleaved fewer than 2 pp)."""
    return 2 if cfg.parallel.pp == 1 else 2 * cfg.parallel.pp


def capped(cfg, world_size: int):
    """The config with at most micro_batch_cap micro batches per step: the peak and the state
    are those of the whole step; the communication bytes are those of the shorter step."""
    p, t = cfg.parallel, cfg.train
    dp = world_size // (p.tp * p.pp * p.cp)
    cap = micro_batch_cap(cfg)
    if t.global_batch(dp) // (t.micro_batch_size * dp) <= cap:
        return cfg
    return with_values(cfg, {"train.global_batch_size": t.micro_batch_size * dp * cap})


def dry_run_position(cfg, model_cfg, world_size: int, rank: int, algorithm: str = "sft",
                     cuda_optimizer: bool = True, cap_micro_batches: bool = True) -> PositionResult:
    """Build and run two training steps as `rank` of `world_size`, on fake tensors.
    `cuda_optimizer`: step AdamW as on CUDA (fused, no foreach temporaries), as the GPU run will.
    `cap_micro_batches`: run at most micro_batch_cap micro batches (see `capped`)."""
    from megaswift import setup

    if cap_micro_batches:
        cfg = capped(cfg, world_size)
    layout = setup.plan_layout(cfg, world_size, model_cfg)
    layout.check_seq_len(cfg.data.seq_len, moe=bool(model_cfg.moe_layers))
    with fake_world(rank, world_size):
        from megaswift.parallel.state import ParallelState

        st = ParallelState.build(layout, torch.device("cpu"))
        return measure_step(cfg, model_cfg, st, algorithm, fake=True, cuda_optimizer=cuda_optimizer)


def measure_step(cfg, model_cfg, st, algorithm: str = "sft", *, fake: bool, weights: str | None = None,
                 cuda_optimizer: bool = False, steps: int = 2, on_step=None) -> PositionResult:
    """Build the model, the Trainer and synthetic data on this rank and measure its last
    training step of `steps`. `fake`: under FakeTensorMode, through the engine's parts (no host
    reads); otherwise real tensors on the real process group through `Trainer.train_step`
    itself, with the model filled from `weights`, or randomly initialised (the parity tests
    compare the two; benchmarks/plan_gpu_check.py times it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from megaswift import setup
    from megaswift.train import optim
    from megaswift.train.engine import Trainer
    from megaswift.train.registry import algorithm_class

    if algorithm not in DRY_RUN_ALGORITHMS:
        raise ConfigError(f"the dry run supports {', '.join(DRY_RUN_ALGORITHMS)} so far, not {algorithm}")
    t0 = time.perf_counter()
    out_dir = tempfile.mkdtemp(prefix="megaswift-dry-run-")
    cfg = with_values(cfg, {"train.output_dir": out_dir, "moe.router_force_balance": True,
                            "checkpoint.export_hf": False})
    alg_cls = algorithm_class(algorithm)
    dry_alg = type(f"DryRun{alg_cls.__name__}", (alg_cls,), {"build_data": lambda self, ctx: None})()
    acct = StepAccountant(group_classes(st))
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext(), acct:
            torch.manual_seed(cfg.train.seed)
            model = setup.build_model(cfg, model_cfg, st, setup.MASTER_DTYPE)
            if weights is not None:
                setup.load_weights(model, weights)
            elif not fake:
                model.reset_parameters(cfg.train.seed)
            if cfg.model.lora.rank:
                lora = cfg.model.lora
                model.add_lora(lora.rank, lora.alpha, lora.dropout, lora.targets, seed=cfg.train.seed)
            trainer = Trainer(cfg, dry_alg, model, st, source_dir=None, export_dtype=cfg.model.dtype)
            if cuda_optimizer:
                trainer.optimizer = optim.build_optimizer(trainer.dp, cfg.optim, on_cuda=True)
            # what AdamW allocates while it steps is a temporary, whatever phase the step is in
            trainer.optimizer.register_step_pre_hook(lambda *_: setattr(acct, "in_optimizer", True))
            trainer.optimizer.register_step_post_hook(lambda *_: setattr(acct, "in_optimizer", False))

            trainer.ctx.dry_run = fake
            # sets up what the algorithm holds (DPO's reference) now, and says its rows per micro batch
            rows = dry_alg.dry_run_batches(trainer.ctx, 1)[0]["input_ids"].shape[0]
            if fake and trainer.pipeline is not None:
                trainer.pipeline.fake_neighbours = stage_input(cfg, model_cfg, st, rows)

            def batches():
                return dry_alg.dry_run_batches(trainer.ctx, trainer.n_micro)
            try:
                state = run_measured_steps(trainer, acct, batches, real=not fake, steps=steps, on_step=on_step)
            finally:
                trainer.logger.close()
            params = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            stage_ids = [s for s, _ in model.stage_modules()] if model.is_pipeline else [0]
            layers = _decoder_layers(model)
        comm = {f"{c} {k}": v for (c, k), v in sorted(acct.comm.items())}
        return PositionResult(rank=st.rank, world_size=st.layout.world_size, pp_rank=st.pp_rank, stages=stage_ids,
                              layers=layers, micro_batches=trainer.n_micro, params=params, trainable=trainable, state_bytes=state,
                              peak_bytes=acct.peak, peak_by_category={c: acct.peak_by_category[c] for c in CATEGORIES},
                              comm_bytes=acct.comm_bytes(), comm_detail=comm, seconds=time.perf_counter() - t0)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _decoder_layers(model) -> int:
    return sum(len(chunk.decoder.layers) for chunk in getattr(model, "chunks", [model]))


def dry_run(cfg, model_cfg, world_size: int, ranks: list[int] | None = None, algorithm: str = "sft",
            cap_micro_batches: bool = True) -> list[PositionResult]:
    """Every rank position that differs (see `positions`), one after another in this process."""
    return [dry_run_position(cfg, model_cfg, world_size, r, algorithm, cap_micro_batches=cap_micro_batches)
            for r in (ranks if ranks is not None else positions(cfg, model_cfg, world_size))]
