"""What `import-hf`, `export-hf`, `verify` and `train` do once their arguments are parsed (the CLI
stays a parser); everything they build comes from the setup layer (megaswift/setup.py)."""
from __future__ import annotations

import os
import re

import torch.distributed as dist

from megaswift import device, setup
from megaswift.dtypes import DTYPES, dtype_name
from megaswift.errors import CheckpointError, LayoutError


def _setup(cfg, model_cfg):
    layout = setup.plan_layout(cfg, device.world_size_from_env(), model_cfg)
    return setup.setup_parallel(cfg, layout)


def import_command(ns, cfg) -> int:
    from megaswift.checkpoint.model_state import save_model
    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.convert.hf_io import HFReader, default_dtype

    model_cfg = setup.hf_model_config(ns.hf_dir, cfg)
    if os.path.exists(ns.ckpt_dir) and os.listdir(ns.ckpt_dir) and not ns.overwrite:
        raise CheckpointError(f"{ns.ckpt_dir} exists and is not empty; choose another directory or pass --overwrite")
    reader = HFReader(ns.hf_dir)  # refuses a quantization it cannot read before any process group starts
    dtype = ns.dtype or dtype_name(default_dtype(reader))  # an fp8 checkpoint: bf16
    st = _setup(cfg, model_cfg)
    model = setup.build_model(cfg, model_cfg, st, DTYPES[dtype])
    load_hf_into_model(model, ns.hf_dir, reader)
    # save_model (rank 0) copies the side files, the pass-through tensors drawn from the HF
    # checkpoint among them (convert/passthrough.py)
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

    model_cfg = setup.hf_model_config(ns.hf_dir, cfg)
    st = _setup(cfg, model_cfg)
    st.layout.check_seq_len(ns.seq_len, moe=bool(model_cfg.moe_layers))
    tol = ns.tolerance if ns.tolerance is not None else (1e-4 if ns.dtype == "float32" else 5e-2)
    model = setup.build_model(cfg, model_cfg, st, DTYPES[ns.dtype])
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
    from megaswift.train import stopping
    from megaswift.train.build import run
    from megaswift.train.metrics import format_summary

    stopping.listen()  # from the start: building the model and reading data may take minutes
    summary = run(cfg, ns.algorithm)
    if device.rank() == 0:
        print(format_summary(ns.algorithm, summary, cfg), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
