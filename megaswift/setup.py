"""The setup layer: from a config to a model on its ranks. Every command and algorithm builds
through here, and nothing here imports a command or an algorithm.

- `plan_layout`: every layout check that needs no process group (`launch` runs it before any
  process starts).
- `setup_parallel`: the process groups (`ParallelState`) for a planned layout.
- `build_model`: the whole GPTModel, or under pp > 1 this rank's pipeline stages; `load_weights`
  fills one from a megaswift or an HF checkpoint.
- the dtype decisions: master weights are fp32; `compute_dtype` is what forward and backward run
  in (the autocast dtype); `checkpoint_dtype` is what an HF checkpoint was saved in (import-hf
  and the end-of-run export keep it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from megaswift import device
from megaswift.dtypes import DTYPES, dtype_name
from megaswift.errors import LayoutError
from megaswift.parallel.layout import Layout
from megaswift.parallel.pipeline_stages import num_stages, split_layers

MASTER_DTYPE = torch.float32
"""Trained weights and optimizer state: fp32 on every device."""


def hf_model_config(hf_dir: str, cfg):
    """The ModelConfig of the HF checkpoint in `hf_dir` (its family found from config.json)."""
    from megaswift.convert.families import family_for
    from megaswift.convert.hf_io import read_hf_config

    hf = read_hf_config(hf_dir)
    model_cfg = family_for(hf).model_config(hf, cfg.model.make_vocab_size_divisible_by,
                                            source=os.path.join(hf_dir, "config.json"))
    if model_cfg.moe_layers and has_fused_experts(hf_dir):
        model_cfg = dataclasses.replace(model_cfg, hf_fused_experts=True)
    return model_cfg


def has_fused_experts(hf_dir: str) -> bool:
    """Whether the checkpoint stores its experts as 3-D fused tensors (ModelConfig.hf_fused_experts):
    read from the names in its index or safetensors header, no weights. A directory holding a
    config.json only (the planner's) has none."""
    from megaswift.convert.families import FUSED_EXPERT_SUFFIXES
    from megaswift.convert.hf_io import INDEX_FILE, SINGLE_FILE, HFReader

    if not any(os.path.isfile(os.path.join(hf_dir, f)) for f in (INDEX_FILE, SINGLE_FILE)):
        return False
    return any(n.endswith(FUSED_EXPERT_SUFFIXES) for n in HFReader(hf_dir).names())


def plan_layout(cfg, world_size: int, model_cfg=None) -> Layout:
    """Every check that needs no process group: run before torchrun starts anything."""
    p = cfg.parallel
    ulysses = {"ring": 1, "ulysses": p.cp, "hybrid": p.ulysses}[p.cp_comm]
    if p.cp_comm == "hybrid" and p.cp > 1 and not 1 < p.ulysses < p.cp:
        raise LayoutError(f"cp_comm hybrid runs parallel.ulysses ranks inside a ring: need 1 < ulysses < cp, got "
                          f"ulysses={p.ulysses}, cp={p.cp} (use cp_comm ring or ulysses for the ends)")
    layout = Layout(world_size=world_size, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, etp=p.etp, sp=p.sp,
                    ulysses=ulysses if p.cp > 1 else 1)
    if p.pp == 1 and (p.vpp > 1 or p.pp_layers):
        raise LayoutError(f"parallel.vpp={p.vpp} / parallel.pp_layers={p.pp_layers} need parallel.pp > 1")
    stages = num_stages(p.pp, p.vpp, p.pp_schedule) if p.pp > 1 else 1
    if model_cfg is not None:
        layout.check_model(model_cfg)
        if p.pp > 1:
            split_layers(model_cfg.num_layers, stages, p.pp_layers)
    return layout


def setup_parallel(cfg, layout: Layout):
    """Start the process group (NCCL on CUDA, gloo on CPU) and build this rank's groups."""
    from megaswift.parallel.state import ParallelState

    device.init_distributed(cfg.parallel.timeout_s)
    return ParallelState.build(layout, device.get_device())


def build_model(cfg, model_cfg, st, dtype=MASTER_DTYPE):
    """The whole GPTModel, or under pp > 1 this rank's pipeline stages (a PipelineModel); both
    satisfy models/protocol.py's Model."""
    from megaswift.models.decoder import GPTModel
    from megaswift.models.pipeline_model import PipelineModel

    if st.pp_size == 1:
        return GPTModel(model_cfg, st, dtype=dtype, device=st.device)
    p = cfg.parallel
    return PipelineModel(model_cfg, st, schedule=p.pp_schedule, vpp=p.vpp, pp_layers=p.pp_layers, dtype=dtype,
                         device=st.device)


def load_weights(model, path: str) -> None:
    """Fill the model from a megaswift checkpoint or, failing that, an HF checkpoint directory."""
    from megaswift.checkpoint.model_state import META_FILE, load_model
    from megaswift.convert.hf_import import load_hf_into_model

    if os.path.isfile(os.path.join(path, META_FILE)):
        load_model(model, path)
    else:
        load_hf_into_model(model, path)


def build_frozen_model(cfg, like, st, source: str | None):
    """A model shaped and sharded like `like`, filled from `source` and frozen in eval mode, with
    the run's attention backend and MoE options (no auxiliary loss): a reference model or a
    teacher. `source` None leaves it unfilled (the dry run's fake tensors)."""
    model = build_model(cfg, like.cfg, st)
    if source is not None:
        load_weights(model, source)
    for p in model.parameters():
        p.requires_grad_(False)
    model.set_attention_backend(cfg.model.attention_backend)
    model.logits_temperature = like.logits_temperature
    if like.cfg.moe_layers:
        model.set_moe_options(aux_loss_coef=0.0, capacity_factor=cfg.moe.capacity_factor,
                              backend=cfg.moe.expert_backend, force_balance=cfg.moe.router_force_balance)
    return model.eval()


def checkpoint_dtype(hf_dir: str) -> str:
    """The dtype name an HF checkpoint's weights are stored in (float32 when not one of ours;
    bfloat16 for an fp8 block-quantized one, which is dequantized)."""
    from megaswift.convert.hf_io import HFReader, default_dtype

    return dtype_name(default_dtype(HFReader(hf_dir)))


def compute_dtype(cfg, dev: torch.device) -> torch.dtype:
    """What the forward and backward compute in. CPU trains in fp32 unless model.cpu_autocast:
    CPU bf16 kernels are slower than fp32 ones and the CPU path is the numerical reference for
    every parity test."""
    if dev.type != "cuda" and not cfg.model.cpu_autocast:
        return torch.float32
    return DTYPES[cfg.model.dtype]


def autocast(cfg, dev: torch.device):
    """The autocast context for `compute_dtype` (none in fp32)."""
    dtype = compute_dtype(cfg, dev)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)
