"""The algorithm contract: what SFT, DPO, GRPO (and the algorithms after them) supply to the one
training engine, and the small context through which they reach it.

An algorithm is a plugin: one module with an `Algorithm` subclass, named in train/registry.py.
It declares
- `config_section`: its YAML section (a `megaswift.section.Section` dataclass, read as
  `cfg.<name>`), or None;
- `check_plan(cfg, layout, global_batch)`: its config checks that need no process group (run by
  `megaswift launch` before any process starts, and again by every rank);
- `build_data(ctx)`: its data source (`next_global_batch()`, `state_dict()`, `load_state_dict()`),
  a list of micro batches per optimizer step;
- per micro batch: `count` (the units its loss sums over) and `loss_from_output` (the loss sum
  from the model's output, a pure function of log-probabilities where it can be).
It talks to the engine only through `TrainContext`: the parallel state, the device, the model,
autocast, the seed, micro-batch preparation; never the Trainer.

The engine divides each micro batch's loss sum by the units of the whole global batch (all micro
batches, all dp ranks), so the loss does not depend on the layout or on gradient accumulation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from megaswift import setup


@dataclass
class TrainContext:
    """What an algorithm may use of the run. Built once by the Trainer."""

    cfg: object                 # the whole run config (its own section is cfg.<name>)
    st: object                  # parallel/state.py's ParallelState of this rank
    model: object               # the policy: models/protocol.py's Model
    device: torch.device
    source_dir: str | None      # tokenizer and generation files of the model the run started from
    output_dir: str
    resume_dir: str | None      # the training checkpoint this run resumed from, if any
    prepare_micro_batch: Callable[[dict], dict]
    """This rank's part of a micro batch (its cp shard), on the device."""
    dry_run: bool = False
    """The dry run (megaswift/planner/): fake tensors, no weights to read, no data."""

    @property
    def seed(self) -> int:
        return self.cfg.train.seed

    @property
    def compute_dtype(self) -> torch.dtype:
        return setup.compute_dtype(self.cfg, self.device)

    def autocast(self):
        """Forward passes outside the engine's step (sampling, reference log-probabilities) run
        with the numerics that train."""
        return setup.autocast(self.cfg, self.device)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.source_dir)

    def loader_args(self, tokenizer) -> dict:
        """The loader arguments every algorithm shares: batch sizes, this rank's dp coordinates,
        the seed, the padding id."""
        t, st = self.cfg.train, self.st
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return dict(seq_len=self.cfg.data.seq_len, micro_batch_size=t.micro_batch_size,
                    global_batch_size=t.global_batch(st.dp_size), dp_rank=st.dp_rank, dp_size=st.dp_size,
                    seed=t.seed, pad_id=pad or 0)

    def path(self, name: str) -> str:
        """A file of this run (under train.output_dir)."""
        return os.path.join(self.output_dir, name)


class Algorithm:
    """What differs between algorithms. Subclasses set `name` and fill in the hooks."""

    name = "base"
    config_section: type | None = None
    """The dataclass of the YAML section `<name>` (megaswift.section.Section), or None."""
    reads_data_path = True
    """plan_training checks that data.path exists."""
    metrics: tuple[str, ...] = ()
    """Names of the extra metrics `loss_from_output` returns (every rank must know them under
    pipeline parallelism, where only the last stage computes them)."""
    generates = False
    """True when the algorithm samples completions with the model (GRPO's rollouts), which needs
    every layer's incremental decoding."""
    loss_replicated_over_cp = False
    """True when each micro batch's loss is whole on every cp rank (a per-sequence loss such as
    DPO's, computed from all-reduced sums) instead of split by tokens: the gradient is then
    normalised by the units of one cp rank, and the reported sums by cp."""

    # -- before any process starts ---------------------------------------------------------------
    @classmethod
    def check_plan(cls, cfg, layout, global_batch: int) -> None:
        """Raise ConfigError for a config this algorithm cannot run."""

    @classmethod
    def weight_sources(cls, cfg) -> list[str]:
        """Directories the run reads weights from besides model.hf_path (a reference model, a
        teacher): an export must never overwrite them."""
        return []

    # -- the run -------------------------------------------------------------------------------
    def build_data(self, ctx: TrainContext):
        raise NotImplementedError

    def dry_run_batches(self, ctx: TrainContext, n_micro: int) -> list[dict]:
        """One step's micro batches of this algorithm's shapes, for the dry run and the memory
        benchmarks (planner/dry_run.py): instead of `build_data`, so it also sets up what the
        algorithm holds besides data (DPO's reference model). Values do not matter. By default
        language-model rows of full length."""
        return [lm_rows(ctx.cfg.train.micro_batch_size, ctx.cfg.data.seq_len, ctx.model.cfg.vocab_size)
                for _ in range(n_micro)]

    def count(self, micro_batch: dict) -> float:
        """Units (e.g. loss tokens) the loss of this micro batch sums over."""
        raise NotImplementedError

    def forward_inputs(self, mb: dict) -> dict:
        """The model's arguments, token ids first (under PP the first stage's positional input;
        the others go to every stage as keyword arguments): by default the token rows of a
        language-model batch."""
        return {"input_ids": mb["input_ids"], "position_ids": mb["position_ids"],
                "document_ids": mb.get("document_ids"), "labels": mb["labels"], "cp_index": mb.get("cp_index"),
                "token_mask": mb.get("token_mask")}

    def loss_from_output(self, output, micro_batch: dict) -> tuple[torch.Tensor, dict]:
        """(sum of the per-unit losses, extra metrics as sums over units) from the model's output
        (under PP: the last stage's; by default the per-token loss [rows, seq])."""
        raise NotImplementedError

    def before_step(self, micro_batches: list[dict]) -> None:
        """Called with the step's micro batches (sharded, on the device, under autocast) before
        any forward: e.g. to attach reference log-probabilities."""

    def step_metrics(self, data_s: float, step_s: float) -> dict:
        """Extra metrics of the step just taken (rank 0 logs them), given the seconds spent
        getting its batch and the whole step's."""
        return {}

    def loss_sum(self, model, micro_batch: dict) -> tuple[torch.Tensor, dict]:
        return self.loss_from_output(model(**self.forward_inputs(micro_batch)), micro_batch)


def lm_rows(rows: int, seq_len: int, vocab_size: int) -> dict:
    """A micro batch of `rows` unpadded, unpacked language-model rows of random tokens."""
    ids = torch.randint(0, vocab_size, (rows, seq_len))
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(seq_len).expand(rows, seq_len),
            "document_ids": None, "token_mask": torch.ones(rows, seq_len, dtype=torch.long), "num_tokens": rows * seq_len}
