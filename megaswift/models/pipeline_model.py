"""This rank's share of a pipeline-parallel model: one GPTModel per stage it runs.

`PipelineModel` answers the same questions as a whole `GPTModel` (named parameters under their
canonical names, shard layouts, norm weights: models/protocol.py's `Model`), so the engine, the
checkpoint code and the HF import treat both alike. The schedule itself lives in
`parallel/pipeline.py`, the gradient sums in `parallel/grads.py`.

Tied embeddings: the first stage owns `embedding.word_embeddings` for the input and the last
stage a copy of it for the output, under the same name (a checkpoint stores it once). When both
stages sit on one rank (the ZBV schedule puts stage 0 and stage S-1 on pp rank 0) they share one
Parameter. Otherwise the two copies start equal (both are loaded from the same tensor), their
gradients are summed over the embedding group {first pp rank, last pp rank} before the
data-parallel reduction (parallel/grads.py, for the copy marked here), as Megatron's embedding
group does, and equal gradients keep the copies equal through every AdamW step.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from megaswift.parallel import pipeline_stages
from megaswift.parallel.collectives import recv, send
from megaswift.parallel.grads import mark_embedding_group_grad
from megaswift.parallel.state import ParallelState

from .config import ModelConfig
from .decoder import GPTModel, StageModule
from .sharding import ShardLayout

TIED = "embedding.word_embeddings.weight"


class PipelineModel:
    def __init__(self, cfg: ModelConfig, st: ParallelState, *, schedule: str, vpp: int = 1,
                 pp_layers: list[int] | None = None, dtype=None, device=None):
        self.cfg, self.st, self.schedule = cfg, st, schedule
        self.num_stages = pipeline_stages.num_stages(st.pp_size, vpp, schedule)
        self.splits = pipeline_stages.split_layers(cfg.num_layers, self.num_stages, pp_layers)
        self.stage_ids = pipeline_stages.stages_of_rank(st.pp_rank, st.pp_size, self.num_stages, schedule)
        last = self.num_stages - 1
        self.chunks: list[GPTModel] = [
            GPTModel(cfg, st, dtype, device, layer_ids=self.splits[s], pre_process=s == 0, post_process=s == last)
            for s in self.stage_ids]
        self.has_first, self.has_last = 0 in self.stage_ids, last in self.stage_ids
        if cfg.tie_word_embeddings and self.has_first and self.has_last:
            self.chunks[-1].embedding = self.chunks[0].embedding  # one Parameter, gradients add up
        # the copy of the tied embedding whose gradient comes from the other end of the pipeline
        self.tied_copy = (cfg.tie_word_embeddings and st.pp_size > 1 and (self.has_first != self.has_last))
        if self.tied_copy:
            mark_embedding_group_grad(self.get_parameter(TIED))
        self.lora_meta: dict | None = None  # {rank, alpha, dropout, targets}: set by whoever attaches adapters

    # -- models/protocol.py ------------------------------------------------------------------------
    @property
    def is_pipeline(self) -> bool:
        return True

    def forward_without_schedule(self, **inputs) -> torch.Tensor | None:
        """The last stage's output on one micro batch, the stages run one after another
        (`forward_stages`, no gradients); None on ranks without the last stage."""
        return self.forward_stages(**inputs)

    # -- the nn.Module questions the engine and the checkpoint code ask -----------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        seen: set[int] = set()
        for chunk in self.chunks:
            for name, p in chunk.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_parameters())

    def get_parameter(self, name: str) -> nn.Parameter:
        return dict(self.named_parameters())[name]

    def shard_layouts(self) -> dict[str, ShardLayout]:
        out: dict[str, ShardLayout] = {}
        for chunk in self.chunks:
            out.update(chunk.shard_layouts())
        return out

    def set_attention_backend(self, backend: str) -> None:
        for chunk in self.chunks:
            chunk.set_attention_backend(backend)

    def set_recompute(self, mode: str) -> None:
        for chunk in self.chunks:
            chunk.set_recompute(mode)

    @property
    def lora_rank(self) -> int:
        return self.chunks[0].lora_rank

    def add_lora(self, *args, **kwargs) -> int:
        return sum(chunk.add_lora(*args, **kwargs) for chunk in self.chunks)

    def adapters_disabled(self):
        stack = contextlib.ExitStack()
        for chunk in self.chunks:
            stack.enter_context(chunk.adapters_disabled())
        return stack

    def generation_mode(self):
        stack = contextlib.ExitStack()
        for chunk in self.chunks:
            stack.enter_context(chunk.generation_mode())
        return stack

    @property
    def logits_temperature(self) -> float:
        return self.chunks[-1].logits_temperature

    @logits_temperature.setter
    def logits_temperature(self, value: float) -> None:
        for chunk in self.chunks:
            chunk.logits_temperature = value

    def set_moe_options(self, **options) -> None:
        for chunk in self.chunks:
            chunk.set_moe_options(**options)

    def pop_moe_stats(self) -> dict | None:
        """The last stage's router statistics of its last micro batch; None on other ranks."""
        return self.chunks[-1].pop_moe_stats() if self.has_last else None

    def train(self, mode: bool = True) -> "PipelineModel":
        for chunk in self.chunks:
            chunk.train(mode)
        return self

    def eval(self) -> "PipelineModel":
        return self.train(False)

    # -- gradients -------------------------------------------------------------------------------
    def grad_norm_weights(self) -> dict[nn.Parameter, float | torch.Tensor]:
        """As GPTModel's; the last stage's copy of a tied embedding counts 0, so the norm summed
        over pp counts its elements once (the first stage's copy holds the same gradient)."""
        out: dict[nn.Parameter, float | torch.Tensor] = {}
        for chunk in self.chunks:
            out.update(chunk.grad_norm_weights())
        if self.tied_copy and self.has_last:
            out[self.get_parameter(TIED)] = 0.0
        return out

    # -- stage modules for torch.distributed.pipelining ------------------------------------------
    def stage_modules(self) -> list[tuple[int, nn.Module]]:
        return [(s, StageModule(chunk)) for s, chunk in zip(self.stage_ids, self.chunks)]

    def owner(self, stage: int) -> int:
        """The pp rank that runs `stage`."""
        for r in range(self.st.pp_size):
            if stage in pipeline_stages.stages_of_rank(r, self.st.pp_size, self.num_stages, self.schedule):
                return r
        raise ValueError(stage)

    @torch.no_grad()
    def forward_stages(self, input_ids: torch.Tensor, position_ids=None, **kwargs) -> torch.Tensor | None:
        """Inference without a schedule: the stages run one after another, hidden states sent
        point to point over the pp group. The last stage's output (vocab-parallel logits, or the
        per-token loss when `labels` is given) on the ranks holding it, None elsewhere. For
        `megaswift verify`, reference models and evaluation, not for training."""
        st, cfg = self.st, self.cfg
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        local = dict(zip(self.stage_ids, self.chunks))
        ranks = st.group_ranks.get("pp", [st.rank])
        seq = s // st.tp_size if self.chunks[0].sp_active else s  # input_ids: this cp rank's shard
        h = None
        for stage in range(self.num_stages):
            me, prev = self.owner(stage), self.owner(stage - 1) if stage else None
            if stage and me == st.pp_rank and prev != st.pp_rank:
                h = torch.empty(b, seq, cfg.hidden_size, dtype=self._dtype(), device=input_ids.device)
                recv(h, src=ranks[prev], group=st.pp_group)
            elif stage and prev == st.pp_rank and me != st.pp_rank:
                send(h, dst=ranks[me], group=st.pp_group)
            if me == st.pp_rank:
                h = local[stage](input_ids, position_ids=position_ids, hidden_states=h, **kwargs)
                if isinstance(h, tuple):  # MoE router statistics: not needed without a loss to train
                    h = h[0]
        return h if self.has_last else None

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

