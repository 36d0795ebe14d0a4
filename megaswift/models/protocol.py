"""What the engine, the algorithms and the tools may use of a model: `Model`.

Both a whole model (models/decoder.py `GPTModel`) and this rank's pipeline stages
(models/pipeline_model.py `PipelineModel`) satisfy it, so code that takes a model asks
`model.is_pipeline` instead of probing for methods. Anything not listed here is the model's own
business.

Running a micro batch:
- without a pipeline schedule, `forward_without_schedule(**inputs)`: a GPTModel's forward (with
  gradients where they are enabled); for a PipelineModel its stages one after another, without
  gradients (inference: references, verification, rollouts), None on ranks without the last
  stage. `inputs` are GPTModel.forward's keyword arguments (input_ids, position_ids, labels, ...).
- with a schedule (training under PP): `stage_modules()`, `num_stages`, `schedule` and `owner`
  feed parallel/pipeline.py. A GPTModel is a pipeline of one stage.

Gradients are completed outside the model: parallel/grads.py `finalize_grads(model)` reads
`st`, `chunks` and `parameters()`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from megaswift.parallel.state import ParallelState

from .config import ModelConfig
from .sharding import ShardLayout


@runtime_checkable
class Model(Protocol):
    cfg: ModelConfig
    st: ParallelState
    logits_temperature: float
    """Logits are divided by it (sampling temperature, also in the log-probabilities trained on)."""
    lora_meta: dict | None
    """{rank, alpha, dropout, targets} of attached adapters, for checkpoints and weight streaming."""

    @property
    def is_pipeline(self) -> bool:
        """True for this rank's stages of a pipeline-parallel model (PipelineModel)."""

    @property
    def lora_rank(self) -> int:
        """Rank of the attached LoRA adapters; 0 without adapters."""

    @property
    def chunks(self) -> list[nn.Module]:
        """The GPTModels this rank runs, in model order ([itself] for a whole model)."""

    @property
    def num_stages(self) -> int: ...

    @property
    def schedule(self) -> str | None:
        """The pipeline schedule (parallel.pp_schedule); None for a whole model."""

    # -- running ---------------------------------------------------------------------------------
    def forward_without_schedule(self, **inputs) -> torch.Tensor | None: ...

    def stage_modules(self) -> list[tuple[int, nn.Module]]:
        """(stage index, module) for every stage this rank runs, for parallel/pipeline.py."""

    def owner(self, stage: int) -> int:
        """The pp rank that runs `stage`."""

    def generation_mode(self) -> contextlib.AbstractContextManager:
        """Token-by-token decoding (rollout/): sequence parallelism and the MoE tp split off."""

    def train(self, mode: bool = True): ...

    def eval(self): ...

    # -- run-time settings -------------------------------------------------------------------------
    def set_attention_backend(self, backend: str) -> None: ...

    def set_recompute(self, mode: str) -> None: ...

    def set_moe_options(self, *, aux_loss_coef: float | None = None, z_loss_coef: float = 0.0,
                        capacity_factor: float | None = None, backend: str = "auto",
                        grad_scale: float = 1.0, force_balance: bool = False,
                        aux_loss_type: str = "global") -> None: ...

    def pop_moe_stats(self) -> dict | None: ...

    # -- adapters ----------------------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, dropout: float, targets: list[str], seed: int = 0) -> int: ...

    def adapters_disabled(self) -> contextlib.AbstractContextManager: ...

    # -- parameters ------------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def get_parameter(self, name: str) -> nn.Parameter: ...

    def shard_layouts(self) -> dict[str, ShardLayout]: ...

    def grad_norm_weights(self) -> dict[nn.Parameter, float | torch.Tensor]: ...
