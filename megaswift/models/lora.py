"""Attach LoRA adapters to a model's parallel linears by megaswift name, freeze the rest.

Targets: linear_qkv, linear_proj, linear_fc1, linear_fc2 (dense MLPs, shared experts and
grouped experts alike), multi-latent attention's linear_q_proj, linear_q_down_proj,
linear_q_up_proj, linear_kv_down_proj, linear_kv_up_proj, Gated DeltaNet's in_proj_qkvz,
in_proj_ba, out_proj, or all-linear for all of them. The adapters' maths and split live in
parallel/lora.py; their canonical shapes and slices in models/sharding.py (`lora_layout`), so
checkpoints of adapters reshard like any weight.
"""
from __future__ import annotations

import contextlib
import zlib

import torch

from megaswift.errors import ConfigError
from megaswift.parallel import lora as plora

from .sharding import box_of, fill_from_canonical, layout_on

# multi-latent attention's projections (models/mla.py): the down-projections are replicated over
# tp, the up-projections column-parallel; all are "column" adapters (B follows the weight's rows)
MLA_TARGETS = ("linear_q_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj")
# Gated DeltaNet's projections (models/deltanet.py): the in-projections column-, out_proj row-parallel
DELTANET_COLUMN = ("in_proj_qkvz", "in_proj_ba")
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", *MLA_TARGETS, *DELTANET_COLUMN, "out_proj")
COLUMN = ("linear_qkv", "linear_fc1", *MLA_TARGETS, *DELTANET_COLUMN)


def target_set(targets: list[str]) -> set[str]:
    if "all-linear" in targets:
        return set(TARGETS)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ConfigError(f"model.lora.targets: unknown layer(s) {unknown}; use megaswift names "
                          f"{', '.join(TARGETS)} or all-linear")
    return set(targets)


def apply_lora(model, rank: int, alpha: float, dropout: float, targets: list[str], seed: int = 0) -> int:
    """Adapters on every targeted layer of a GPTModel; every other parameter frozen. A is drawn
    for the canonical tensor from a generator seeded by the parameter's name and sliced, so any
    layout starts from the same adapters; B is zero. Returns the number of layers adapted."""
    wanted = target_set(targets)
    cfg, st = model.cfg, model.st
    model.lora_rank = rank
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = 0
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in wanted or not hasattr(module, "weight"):
            continue
        expert = ".experts." in name
        a_layout, b_layout = (layout_on(f"{name}.lora.{w}", cfg, st, rank) for w in "AB")
        kind = "column" if leaf in COLUMN else "row"
        kwargs = dict(rank=rank, alpha=alpha, dropout=0.0 if expert else dropout)
        if not expert:
            kwargs.update(tp_group=module.tp_group, sequence_parallel=module.sequence_parallel)
        lora = plora.attach(module, kind, a_layout.local_shape, b_layout.local_shape, **kwargs)
        if expert:
            for p in (lora.A, lora.B):
                p.expert = True
            # inside expert tp, the side that is not split is replicated: its gradient is partial
            (lora.A if kind == "column" else lora.B).etp_partial_grad = st.etp_size > 1
        gen = torch.Generator().manual_seed(seed + zlib.crc32(f"{name}.lora.A".encode()))
        full = plora.kaiming_a(a_layout.canonical_shape, gen)
        with torch.no_grad():
            lora.A.copy_(fill_from_canonical(lambda o, n: box_of(full, o, n), a_layout))
        adapted += 1
    if not adapted:
        raise ConfigError(f"model.lora.targets {targets} matched no layer of this model")
    return adapted


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model: every adapter switched off (DPO's reference without a second copy)."""
    loras = [m for m in model.modules() if isinstance(m, plora.LoRA)]
    for m in loras:
        m.enabled = False
    try:
        yield
    finally:
        for m in loras:
            m.enabled = True
