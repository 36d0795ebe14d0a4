"""What the conversion commands do once their arguments are parsed (the CLI stays a parser)."""
from __future__ import annotations

import os
import re

import torch.distributed as dist

from megaswift import device
from megaswift.dtypes import DTYPES
from megaswift.errors import CheckpointError, LayoutError
from megaswift.parallel.layout import Layout
from megaswift.parallel.pipeline_stages import num_stages, split_layers


def hf_model_config(hf_dir: str, cfg):
    from megaswift.convert.families import family_for
    from megaswift.convert.hf_io import read_hf_config

    hf = read_hf_config(hf_dir)
    return family_for(hf).model_config(hf, cfg.model.make_vocab_size_divisible_by,
                                       source=os.path.join(hf_dir, "config.json"))


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


def build_model(cfg, model_cfg, st, dtype):
    """The whole GPTModel, or under pp > 1 this rank's pipeline stages (a PipelineModel)."""
    from megaswift.models.decoder import GPTModel
    from megaswift.models.pipeline_model import PipelineModel

    if st.pp_size == 1:
        return GPTModel(model_cfg, st, dtype=dtype, device=st.device)
    p = cfg.parallel
    return PipelineModel(model_cfg, st, schedule=p.pp_schedule, vpp=p.vpp, pp_layers=p.pp_layers, dtype=dtype,
                         device=st.device)


def setup_parallel(cfg, model_cfg):
    from megaswift.parallel.state import ParallelState

    layout = plan_layout(cfg, device.world_size_from_env(), model_cfg)
    device.init_distributed(cfg.parallel.timeout_s)
    return ParallelState.build(layout, device.get_device())


def _checkpoint_dtype(hf_dir: str, model_cfg) -> str:
    from megaswift.convert.hf_io import HFReader

    t = HFReader(hf_dir).dtype("model.embed_tokens.weight")
    return {v: k for k, v in DTYPES.items()}.get(t, "float32")


def import_command(ns, cfg) -> int:
    from megaswift.checkpoint.model_state import save_model
    from megaswift.convert.hf_import import load_hf_into_model

    model_cfg = hf_model_config(ns.hf_dir, cfg)
    if os.path.exists(ns.ckpt_dir) and os.listdir(ns.ckpt_dir) and not ns.overwrite:
        raise CheckpointError(f"{ns.ckpt_dir} exists and is not empty; choose another directory or pass --overwrite")
    st = setup_parallel(cfg, model_cfg)
    dtype = ns.dtype or _checkpoint_dtype(ns.hf_dir, model_cfg)
    model = build_model(cfg, model_cfg, st, DTYPES[dtype])
    load_hf_into_model(model, ns.hf_dir)
    meta = {"family": model_cfg.family, "model_config": model_cfg.to_dict(), "dtype": dtype,
            "saved_layout": st.layout.describe(), "source": os.path.abspath(ns.hf_dir)}
    save_model(model, ns.ckpt_dir, meta, extra_files_from=ns.hf_dir)
    if device.rank() == 0:
        print(f"imported {model_cfg.family} from {ns.hf_dir} into {ns.ckpt_dir} ({st.layout.describe()}, {dtype})")
    return 0


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", text.upper())
    if not m:
        raise LayoutError(f"--max-shard-size {text!r} is not a size such as 500MB or 2GB")
    return int(float(m.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, None: 1}[m.group(2)])


def export_command(ns) -> int:
    from megaswift.convert.hf_export import export_hf

    if device.rank() != 0:  # export reads the checkpoint in one process; other ranks have nothing to do
        return 0
    info = export_hf(ns.ckpt_dir, ns.hf_dir, ns.dtype, _parse_size(ns.max_shard_size), merge_lora=ns.merge_lora,
                     overwrite=ns.overwrite)
    what = "a PEFT adapter" if info.get("adapter") else "an HF checkpoint"
    print(f"exported {ns.ckpt_dir} to {ns.hf_dir} as {what} ({info['tensors'] / 1e6:.1f} MB in {info['files']} file(s))")
    kept = info["kept"]
    if kept:  # --overwrite replaced the HF files only; say what else is still there
        shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        print(f"left in place in {ns.hf_dir} (not part of an HF checkpoint): {shown}")
    return 0


def verify_command(ns, cfg) -> int:
    from megaswift.convert.verify import verify

    model_cfg = hf_model_config(ns.hf_dir, cfg)
    st = setup_parallel(cfg, model_cfg)
    st.layout.check_seq_len(ns.seq_len, moe=bool(model_cfg.moe_layers))
    tol = ns.tolerance if ns.tolerance is not None else (1e-4 if ns.dtype == "float32" else 5e-2)
    model = build_model(cfg, model_cfg, st, DTYPES[ns.dtype])
    result = verify(ns.hf_dir, model, DTYPES[ns.dtype], ns.seq_len, ns.batch_size, ns.seed,
                    attention_backend=cfg.model.attention_backend)
    ok = result["max_abs_diff"] <= tol
    if device.rank() == 0:
        print(f"verify {model_cfg.family} {st.layout.describe()} dtype={ns.dtype}: "
              f"max_abs_diff={result['max_abs_diff']:.3e} mean_abs_diff={result['mean_abs_diff']:.3e} "
              f"tolerance={tol:.1e} -> {'PASS' if ok else 'FAIL'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if ok else 1


def train_command(ns, cfg) -> int:
    from megaswift.train import dpo, grpo, sft, stopping
    from megaswift.train.metrics import format_summary

    stopping.listen()  # from the start: building the model and reading data may take minutes
    summary = {"sft": sft.run, "dpo": dpo.run, "grpo": grpo.run}[ns.algorithm](cfg)
    if device.rank() == 0:
        print(format_summary(ns.algorithm, summary, cfg), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
