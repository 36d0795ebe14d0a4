"""A training run's plan: every check that needs no process group, and where the weights come
from. `megaswift launch` runs it before spawning ranks, so a bad config is one line, not a
traceback per rank; every rank runs it again before it builds anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from megaswift.checkpoint import train_state
from megaswift.checkpoint.model_state import read_meta
from megaswift.convert.hf_export import default_export_dtype
from megaswift.errors import ConfigError, DataError
from megaswift.models.config import ModelConfig
from megaswift.setup import checkpoint_dtype, hf_model_config, plan_layout

from .expert_bias import check_config as check_expert_bias
from .registry import algorithm_class


@dataclass
class Plan:
    layout: object
    model_cfg: ModelConfig
    resume_dir: str | None     # a training checkpoint to continue
    weights_dir: str | None    # a weights-only megaswift checkpoint to start from
    hf_dir: str | None         # an HF checkpoint to start from
    side_files: str | None     # tokenizer and generation files
    export_dtype: str
    lora_base: str | None = None  # a resumed LoRA run: where its frozen base weights come from


def restart_attempt() -> int:
    """torchrun's restart count (`megaswift launch --max-restarts N`): 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def plan_training(cfg, world_size: int, algorithm="sft", quiet: bool = False) -> Plan:
    """Every check of a training run that needs no process group, the algorithm's own included.
    `algorithm`: its name or class. `quiet`: `launch`'s check before it spawns the ranks, whose
    rank 0 plans (and says) again."""
    alg = algorithm_class(algorithm) if isinstance(algorithm, str) else algorithm
    reads_data_path = alg.reads_data_path
    load = cfg.checkpoint.load
    # an elastic restart, or a Slurm job requeued after it stopped with a checkpoint (stopping.py),
    # goes on from where the job got to
    if load is None and (restart_attempt() > 0 or int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0):
        load = "latest"
    load = train_state.resolve_load(load, cfg.train.output_dir, announce=not quiet)
    resume_dir = weights_dir = hf_dir = lora_base = None
    if load is not None:
        meta = read_meta(load)
        model_cfg = ModelConfig.from_dict(meta["model_config"])
        resume_dir, weights_dir = (load, None) if "train" in meta else (None, load)
        saved_lora = meta.get("lora")
        if saved_lora and not cfg.model.lora.rank:
            raise ConfigError(f"{load} holds LoRA adapters (rank {saved_lora['rank']}); resume it with the same "
                              f"model.lora settings, or export it (export-hf --merge-lora) to train the merged weights")
        if resume_dir and cfg.model.lora.rank and not saved_lora:
            raise ConfigError(f"{load} is a full-weight training checkpoint; a LoRA run starts from weights: "
                              f"export it, or pass its model/ as a weights checkpoint")
        if saved_lora:
            for key in ("rank", "alpha", "targets"):
                if saved_lora[key] != getattr(cfg.model.lora, key):
                    raise ConfigError(f"{load} was trained with model.lora.{key}={saved_lora[key]!r}; this run "
                                      f"has {getattr(cfg.model.lora, key)!r}: resume with the same adapters")
            lora_base = saved_lora["base"]
        side = os.path.join(load, "hf")
        export_dtype = default_export_dtype(meta)
    elif cfg.model.hf_path:
        hf_dir = cfg.model.hf_path
        model_cfg = hf_model_config(hf_dir, cfg)
        side, export_dtype = hf_dir, checkpoint_dtype(hf_dir)
    else:
        raise ConfigError("nothing to train: set model.hf_path (an HF checkpoint) or checkpoint.load "
                          "(a megaswift checkpoint, or 'latest' to resume in train.output_dir)")
    if cfg.model.dtype == "float16":
        raise ConfigError("model.dtype=float16 cannot train: megaswift has no loss scaling, and float16 gradients "
                          "underflow to zero without one; use bfloat16 (A100, H100 and newer) or float32")
    check_expert_bias(cfg, model_cfg)
    layout = plan_layout(cfg, world_size, model_cfg)
    layout.check_seq_len(cfg.data.seq_len, moe=bool(model_cfg.moe_layers))
    t = cfg.train
    gbs = t.global_batch(layout.dp)
    if gbs % (t.micro_batch_size * layout.dp):
        raise ConfigError(f"train.global_batch_size={gbs} must be a multiple of micro_batch_size x dp = "
                          f"{t.micro_batch_size} x {layout.dp} = {t.micro_batch_size * layout.dp}")
    alg.check_plan(cfg, layout, gbs)
    if layout.pp > 1 and layout.cp > 1 and cfg.data.packing:
        raise ConfigError("data.packing with both pp > 1 and cp > 1 is not supported yet: the pipeline needs one "
                          "shape per step, and cp pads each packed document; turn packing off or use pp or cp alone")
    if layout.pp > 1:
        from megaswift.parallel.pipeline import check_microbatches

        check_microbatches(cfg.parallel.pp_schedule, layout.pp, gbs // (t.micro_batch_size * layout.dp))
    if reads_data_path and not cfg.data.path:
        raise ConfigError("data.path is not set: point it at a .jsonl or .parquet file or a directory of them")
    if reads_data_path and not os.path.exists(cfg.data.path):
        raise DataError(f"data.path {cfg.data.path} does not exist")
    _check_outputs(cfg, load, alg)
    return Plan(layout, model_cfg, resume_dir, weights_dir, hf_dir, side if os.path.isdir(side) else None,
                export_dtype, lora_base)


def _check_outputs(cfg, load: str | None, alg) -> None:
    """Where the run writes: train.output_dir must be a directory (or not exist yet), and an
    export at the end must be one that will succeed, so the run fails now, not after training."""
    from megaswift.convert.hf_export import check_export_target, export_sources

    out = os.path.realpath(cfg.train.output_dir)
    first = out
    while not os.path.exists(first):  # the nearest existing ancestor is where makedirs starts
        first = os.path.dirname(first)
    if not os.path.isdir(first):
        raise ConfigError(f"train.output_dir={cfg.train.output_dir}: {first} is a file, not a directory; "
                          "choose another train.output_dir")
    c = cfg.checkpoint
    if not c.export_hf:
        return
    target = c.export_dir or os.path.join(cfg.train.output_dir, "hf")
    sources = [cfg.model.hf_path] + alg.weight_sources(cfg)
    if load:
        sources += export_sources(read_meta(load))
    check_export_target(target, c.export_overwrite, [p for p in sources if p], None,
                        "set checkpoint.export_overwrite=true")
    real = os.path.realpath(target)
    if not c.export_overwrite and (out + os.sep).startswith(real.rstrip(os.sep) + os.sep):
        raise ConfigError(f"checkpoint.export_dir={target} holds train.output_dir={cfg.train.output_dir}, so it will "
                          "not be empty when the run exports; export elsewhere (the default is <train.output_dir>/hf)")
