"""GPTModel: the one Megatron-style decoder behind every family.

Parameter names follow megatron-core (`embedding.word_embeddings`, `decoder.layers.N....`,
`decoder.final_layernorm`, `output_layer`), and layers live in a ModuleDict keyed by their global
index, so names stay the same when a pipeline stage holds only some of the layers. What each
layer is made of (token mixer, MLP, router) comes from the config through models/blocks.py.

GPTModel (a whole model) and PipelineModel (this rank's pipeline stages) both satisfy
models/protocol.py's `Model`, which is all the engine, the algorithms and the tools use. The
model keeps no gradient communication: the training engine completes the gradients with
parallel/grads.py's `finalize_grads(model)`.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megaswift.parallel.cross_entropy import vocab_parallel_cross_entropy
from megaswift.parallel.grads import mark_tp_partial_grad
from megaswift.parallel.state import ParallelState
from megaswift.parallel.tp_comm import copy_to_tp_region, gather_from_sp_region
from megaswift.parallel.tp_layers import ColumnParallelLinear, SequenceParallelLayer, VocabParallelEmbedding

from .config import ModelConfig
from .layers import TransformerLayer
from .lora import adapters_disabled, apply_lora
from .moe import AttachAuxLoss, MoELayer, aux_loss_parts, seq_aux_loss_parts, stats_shape
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .sharding import ShardLayout, box_of, fill_from_canonical, layout_on


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, st: ParallelState, dtype=None, device=None):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            cfg.padded_vocab_size(st.tp_size), cfg.hidden_size, tp_group=st.tp_group, tp_rank=st.tp_rank,
            tp_size=st.tp_size, sequence_parallel=st.sp, dtype=dtype, device=device)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, st: ParallelState, layer_ids, dtype=None, device=None, final_norm=True):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg, st, i, dtype, device) for i in layer_ids})
        self.recompute_layers = False
        self.final_layernorm = None
        if final_norm:
            self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype, device,
                                           zero_centered=cfg.norm_zero_centered)
        if final_norm and st.sp:
            mark_tp_partial_grad(self.final_layernorm.weight)

    def forward(self, x, cos, sin, document_ids=None, cp_index=None, moe_stats=None, token_mask=None,
                kv_cache=None):
        for layer in self.layers.values():
            args = (x, cos, sin, document_ids, cp_index, moe_stats, token_mask, kv_cache)
            if self.recompute_layers and torch.is_grad_enabled():
                x, moe_stats = checkpoint(layer, *args, use_reentrant=False)
            else:
                x, moe_stats = layer(*args)
        return (self.final_layernorm(x) if self.final_layernorm is not None else x), moe_stats


class GPTModel(nn.Module):
    """The whole model, or one pipeline stage of it: `layer_ids` are the global indices of the
    layers this stage holds; `pre_process` adds the embedding (first stage), `post_process` the
    final norm, output layer and loss (last stage). With tied embeddings the last stage holds
    its own `embedding.word_embeddings` for the output; same name, so checkpoints store it once
    (and the pipeline sums its gradient with the first stage's)."""

    def __init__(self, cfg: ModelConfig, st: ParallelState | None = None, dtype=None, device=None, *,
                 layer_ids=None, pre_process: bool = True, post_process: bool = True):
        super().__init__()
        st = st or ParallelState.single()
        self.cfg, self.st = cfg, st
        self.lora_rank = 0  # models/lora.py sets it when adapters are attached
        self.lora_meta: dict | None = None  # {rank, alpha, dropout, targets}: set by whoever attaches adapters
        self.logits_temperature = 1.0
        self.generating = False  # generation_mode()
        self.moe_options = {"aux": 0.0, "z": 0.0, "scale": 1.0, "aux_type": "global"}  # set_moe_options
        self.moe_last: dict | None = None  # router statistics of the last forward with labels
        self.pre_process, self.post_process = pre_process, post_process
        tied_output = post_process and cfg.tie_word_embeddings
        self.embedding = Embedding(cfg, st, dtype, device) if pre_process or tied_output else None
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, device=device,
                                      max_position_embeddings=cfg.max_position_embeddings)
        layer_ids = range(cfg.num_layers) if layer_ids is None else layer_ids
        self.decoder = TransformerBlock(cfg, st, layer_ids, dtype, device, final_norm=post_process)
        self.vocab_local = cfg.padded_vocab_size(st.tp_size) // st.tp_size
        if cfg.tie_word_embeddings or not post_process:
            self.output_layer = None
        else:
            self.output_layer = ColumnParallelLinear(cfg.hidden_size, self.vocab_local, tp_group=st.tp_group,
                                                     sequence_parallel=st.sp, dtype=dtype, device=device)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids, position_ids=None, document_ids=None, labels=None, hidden_states=None,
                cp_index=None, token_mask=None, moe_stats=None, kv_cache=None):
        """input_ids [b, s] -> vocab-parallel logits [b, s, padded_vocab/tp] (padded columns -inf),
        or, with labels [b, s] (-100 = ignore), the per-token loss [b, s] in fp32.

        position_ids restart at 0 for each packed document; document_ids [b, s] stop attention
        across documents. Without them the batch rows are single sequences from position 0.

        A pipeline stage without `pre_process` takes the previous stage's `hidden_states`
        instead of embedding the tokens; one without `post_process` returns its hidden states.

        Under context parallelism (parallel/context_parallel.py) the tensors hold this cp rank's
        tokens, `cp_index` [b, cp, s_local] says where every cp rank's tokens sit in the padded
        row, and `document_ids` is that whole padded row's [b, S'].

        MoE models with labels also carry the router statistics (models/moe.py): `token_mask`
        [b, s] marks the real (non-padding) tokens they count; a stage without `post_process`
        returns (hidden_states, moe_stats) and the next one takes them back as `moe_stats`; the
        last stage attaches the load-balancing and z-losses to the returned per-token loss.
        """
        if position_ids is None:
            b, s = input_ids.shape
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        x = self.embedding(input_ids) if self.pre_process else hidden_states  # [b, s(/tp under SP), h]
        track = bool(self.cfg.moe_layers) and labels is not None
        if track and moe_stats is None:
            rows = x.shape[0] if self.moe_options["aux_type"] == "seq" else None
            moe_stats = torch.zeros(stats_shape(len(self.cfg.moe_layers), self.cfg.num_moe_experts, rows),
                                    device=x.device)
        cos, sin = self.rotary(position_ids, x.dtype)
        x, moe_stats = self.decoder(x, cos, sin, document_ids, cp_index, moe_stats if track else None, token_mask,
                                    kv_cache)
        if not self.post_process:
            return (x, moe_stats) if track else x
        logits = self._output(x)
        if self.logits_temperature != 1.0:
            logits = logits / self.logits_temperature
        if labels is None:
            return logits
        loss = vocab_parallel_cross_entropy(logits, labels, self.st.tp_group)
        return self._attach_moe_losses(loss, moe_stats) if track else loss

    # -- models/protocol.py: a whole model is a pipeline of one stage ----------------------------
    num_stages = 1
    schedule: str | None = None  # no pipeline schedule

    @property
    def is_pipeline(self) -> bool:
        return False

    @property
    def chunks(self) -> list["GPTModel"]:
        """The GPTModels this rank runs, in model order: itself."""
        return [self]

    def forward_without_schedule(self, **inputs):
        """The model's output on one micro batch (its forward)."""
        return self(**inputs)

    def stage_modules(self) -> list[tuple[int, nn.Module]]:
        return [(0, StageModule(self))]

    def owner(self, stage: int) -> int:
        """The pp rank that runs `stage`: this one runs the only stage."""
        if stage != 0:
            raise ValueError(f"a whole model has one stage, not stage {stage}")
        return self.st.pp_rank

    # -- mixture of experts ----------------------------------------------------------------------
    def set_moe_options(self, *, aux_loss_coef: float | None = None, z_loss_coef: float = 0.0,
                        capacity_factor: float | None = None, backend: str = "auto", grad_scale: float = 1.0,
                        force_balance: bool = False, aux_loss_type: str = "global"):
        """aux_loss_coef None takes transformers' rule: router_aux_loss_coef when the checkpoint's
        output_router_logits is set, else no load-balancing loss. `grad_scale` weighs each micro
        batch's auxiliary losses in the step (1 / micro batches per step: their mean).
        `aux_loss_type`: 'global' (transformers' loss over the whole micro batch) or 'seq'
        (DeepSeek-V3's per-sequence loss; models/moe.py)."""
        cfg = self.cfg
        if aux_loss_coef is None:
            aux_loss_coef = cfg.moe_aux_loss_coef if cfg.moe_output_router_logits else 0.0
        if aux_loss_type not in ("global", "seq"):
            raise ValueError(f"aux_loss_type must be global or seq; got {aux_loss_type!r}")
        self.moe_options = {"aux": aux_loss_coef, "z": z_loss_coef, "scale": grad_scale, "aux_type": aux_loss_type}
        for m in self.modules():
            if isinstance(m, MoELayer):
                m.set_moe_options(capacity_factor=capacity_factor, backend=backend, force_balance=force_balance)

    def _attach_moe_losses(self, loss, moe_stats):
        opts, st, E = self.moe_options, self.st, self.cfg.num_moe_experts
        if moe_stats.dim() == 3:  # per batch row: moe.aux_loss_type seq
            aux, z, values = seq_aux_loss_parts(moe_stats, E, self.cfg.moe_router_topk, (st.tp_group, st.cp_group),
                                                st.dp_group)
        else:
            aux, z, values = aux_loss_parts(moe_stats, E, (st.tp_group, st.dp_cp_group))
        self.moe_last = values
        extra = opts["aux"] * aux + opts["z"] * z
        if not extra.requires_grad or (opts["aux"] == 0 and opts["z"] == 0):
            return loss
        return AttachAuxLoss.apply(loss, extra, opts["scale"])

    def pop_moe_stats(self) -> dict | None:
        """The router statistics of the last forward with labels (this stage's model must be the
        last): {'aux', 'z', 'counts' [MoE layers, E]}, reduced over the micro batch's ranks."""
        out, self.moe_last = self.moe_last, None
        return out

    def _output(self, x):
        if self.output_layer is not None:
            logits = self.output_layer(x)
        else:  # tied: reuse the embedding's vocab shard as a column-parallel output weight
            logits = self._tied_output(x)
        return self._mask_vocab_padding(logits)

    def _tied_output(self, x):
        tp = self.st.tp_group
        x = gather_from_sp_region(x, tp, dim=1) if self.sp_active else copy_to_tp_region(x, tp)
        return torch.nn.functional.linear(x, self.embedding.word_embeddings.weight)

    def _mask_vocab_padding(self, logits):
        """Padded vocabulary rows must never win the softmax: their logits become -inf."""
        start = self.st.tp_rank * self.vocab_local
        n_real = max(0, min(self.cfg.vocab_size - start, self.vocab_local))
        if n_real == self.vocab_local:
            return logits
        mask = torch.arange(self.vocab_local, device=logits.device) >= n_real
        return logits.masked_fill(mask, float("-inf"))

    def add_lora(self, rank: int, alpha: float, dropout: float, targets: list[str], seed: int = 0) -> int:
        return apply_lora(self, rank, alpha, dropout, targets, seed)

    def adapters_disabled(self):
        return adapters_disabled(self)

    @property
    def sp_active(self) -> bool:
        """Whether activations are split along the sequence: parallel.sp, off while generating."""
        return self.st.sp and not self.generating

    @contextlib.contextmanager
    def generation_mode(self):
        """Token-by-token decoding (rollout/): sequence parallelism off (a decode step has one
        token per row, which does not split over tp; the column/row layers all-reduce instead,
        the same sums) and MoE layers route every token on every tp rank (no 1/tp split of a
        sequence of one). No gradients flow here, so the partial-gradient marks do not matter."""
        saved = [(m, m.sequence_parallel) for m in self.modules() if isinstance(m, SequenceParallelLayer)]
        moe = [m for m in self.modules() if isinstance(m, MoELayer)]
        for m, _ in saved:
            m.sequence_parallel = False
        for m in moe:
            m.whole_sequence = True
        self.generating = True
        try:
            yield self
        finally:
            for m, sp in saved:
                m.sequence_parallel = sp
            for m in moe:
                m.whole_sequence = False
            self.generating = False

    def set_attention_backend(self, backend: str) -> None:
        """kernels.attention backend for every layer: auto, reference, sdpa or flash_attn."""
        for layer in self.decoder.layers.values():
            layer.self_attention.backend = backend

    def set_recompute(self, mode: str) -> None:
        """Activation recompute: "full" keeps only each layer's input and reruns the layer in
        backward; "selective" reruns only the core attention (its activations grow with s^2 in
        the reference kernel; Korthikanti et al. 2022); "none" keeps everything."""
        if mode not in ("none", "selective", "full"):
            raise ValueError(f"recompute must be none, selective or full; got {mode!r}")
        self.decoder.recompute_layers = mode == "full"
        for layer in self.decoder.layers.values():
            layer.self_attention.recompute_core = mode == "selective"

    # -- gradients -------------------------------------------------------------------------------
    def grad_norm_weights(self) -> dict[nn.Parameter, float | torch.Tensor]:
        """Per parameter, 1 / (number of TP ranks holding the same canonical element), so a global
        gradient norm summed over TP counts each element once: norms are replicated on every
        rank, and KV rows on tp/num_query_groups ranks when TP exceeds the KV heads. Parameters
        held once are left out (weight 1)."""
        st, cfg = self.st, self.cfg
        out: dict[nn.Parameter, float | torch.Tensor] = {}
        for name, p in self.named_parameters():
            if getattr(p, "expert", False):  # held once per (ep, etp) rank: see DataParallelSet.grad_norm
                if getattr(p, "etp_partial_grad", False):  # an expert adapter replicated over etp
                    out[p] = 1.0 / st.etp_size
                continue
            if st.tp_size == 1:
                continue
            layouts = [layout_on(name, cfg, st, self.lora_rank, tp_rank=r) for r in range(st.tp_size)]
            mine = layouts[st.tp_rank]
            counts = [sum(rng in other.ranges for other in layouts) for rng in mine.ranges]
            if all(c == 1 for c in counts):
                continue
            if len(set(counts)) == 1 and not mine.pad:
                out[p] = 1.0 / counts[0]
                continue
            w = torch.ones(mine.local_shape[mine.dim], device=p.device)
            pos = 0
            for (_, n), c in zip(mine.ranges, counts):
                w[pos: pos + n] = 1.0 / c
                pos += n
            shape = [1] * p.ndim
            shape[mine.dim] = -1
            out[p] = w.view(shape).expand_as(p).contiguous()
        return out

    # -- sharding metadata ---------------------------------------------------------------------
    def shard_layouts(self) -> dict[str, ShardLayout]:
        """Parameter name -> where its local slice sits in the canonical (tp=1) tensor."""
        return {name: layout_on(name, self.cfg, self.st, self.lora_rank) for name, _ in self.named_parameters()}

    def reset_parameters(self, seed: int | None = None):
        """Random init (normal(0, std) for matrices, ones for norms, zeros for biases), drawn for the
        canonical tensor and sliced, so every layout starts from the same weights."""
        gen = torch.Generator().manual_seed(0 if seed is None else seed)

        def canonical(name, layout: ShardLayout):
            if name.endswith("layernorm.weight"):  # a scale of 1: stored as 0 when zero-centred
                return (torch.zeros if self.cfg.norm_zero_centered else torch.ones)(layout.canonical_shape)
            if name.endswith(("out_norm.weight", "dt_bias")):
                return torch.ones(layout.canonical_shape)
            if name.endswith("A_log"):  # decay rates spread over [1, 16], as HF initialises them
                return torch.empty(layout.canonical_shape).uniform_(1, 16, generator=gen).log()
            if name.endswith(".bias"):
                return torch.zeros(layout.canonical_shape)
            return torch.randn(layout.canonical_shape, generator=gen) * self.cfg.init_method_std

        with torch.no_grad():
            for name, p in self.named_parameters():
                layout = layout_on(name, self.cfg, self.st, self.lora_rank)
                full = canonical(name, layout)
                p.copy_(fill_from_canonical(lambda o, n, full=full: box_of(full, o, n), layout))


class StageModule(nn.Module):
    """What a PipelineStage runs: the first stage takes token ids, the others the hidden states
    of the stage before (and, for MoE models, the router statistics, models/moe.py);
    position/document ids, token mask and labels come to every stage as keyword arguments (each
    stage's attention needs them; only the last uses the labels)."""

    def __init__(self, chunk: GPTModel):
        super().__init__()
        self.chunk = chunk

    def forward(self, x, moe_stats=None, *, position_ids, document_ids=None, labels=None, cp_index=None,
                token_mask=None):
        kw = dict(position_ids=position_ids, document_ids=document_ids, labels=labels, cp_index=cp_index,
                  token_mask=token_mask)
        if self.chunk.pre_process:
            return self.chunk(x, **kw)
        return self.chunk(None, hidden_states=x, moe_stats=moe_stats, **kw)
