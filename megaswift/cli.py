"""The `megaswift` command: train, import-hf, export-hf, verify, launch, tiny-hf, quickstart.

Config overrides use dotted keys after the command's own arguments (`--parallel.tp 2`). A user
error (bad config, layout, checkpoint) prints one line and exits with code 2, with no traceback.
"""
from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys

from megaswift.errors import Interrupted, MegaswiftError

COMMANDS = ("train", "import-hf", "export-hf", "verify", "launch", "slurm", "plan", "dry-run", "tiny-hf", "quickstart")
_WRAPPERS = ("launch", "slurm")  # commands that run another megaswift command given after --


def _parser() -> argparse.ArgumentParser:
    from megaswift.dtypes import EXPORT_FORMATS
    from megaswift.train.registry import ALGORITHMS

    p = argparse.ArgumentParser(prog="megaswift", description="Megatron-style parallel training on PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("--config", help="YAML config file; dotted overrides such as --parallel.tp 2 follow")
        return sp

    s = sub.add_parser("quickstart", help="build a tiny model and data, train SFT at TP=2 on CPU, export, evaluate")
    s.add_argument("--out", default="outputs/quickstart", help="where everything is written")
    s.add_argument("--steps", type=int, help="optimizer steps (default: the tuned recipe)")

    s = with_config(sub.add_parser("train", help="train a model (run it under `megaswift launch` for several ranks)"))
    s.add_argument("algorithm", choices=list(ALGORITHMS), help="train/registry.py")

    s = with_config(sub.add_parser("import-hf", help="convert an HF checkpoint into a megaswift checkpoint"))
    s.add_argument("hf_dir")
    s.add_argument("ckpt_dir")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: the checkpoint's dtype (bfloat16 for an fp8 checkpoint, which is dequantized)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint directory")

    s = sub.add_parser("export-hf", help="write a megaswift checkpoint as an HF checkpoint")
    s.add_argument("ckpt_dir")
    s.add_argument("hf_dir")
    s.add_argument("--dtype", choices=list(EXPORT_FORMATS),
                   help="default: the dtype it was imported in; fp8-block: 2-D linear weights in fp8 with per-block "
                   "scales (DeepSeek-V3's format, for vLLM and SGLang), the rest bf16; mxfp4: gpt-oss's MoE "
                   "expert weights in MXFP4 as gpt-oss publishes them, the rest bf16")
    s.add_argument("--max-shard-size", default="2GB", help="safetensors shard size, e.g. 500MB, 2GB")
    s.add_argument("--merge-lora", action="store_true",
                   help="LoRA checkpoints: write the base weights with the adapters merged in (default: a PEFT adapter)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the HF checkpoint in a non-empty HF_DIR (its other files are kept; the "
                   "checkpoint's own source directory is refused even so)")

    s = with_config(sub.add_parser("verify", help="compare megaswift logits with transformers on the same tokens"))
    s.add_argument("hf_dir")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--tolerance", type=float, help="max abs logit difference allowed (default 1e-4 fp32, 5e-2 bf16/fp16)")
    s.add_argument("--seq-len", type=int, default=64)
    s.add_argument("--batch-size", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("launch", help="run a subcommand under torchrun after checking the layout")
    s.add_argument("--nproc-per-node", type=int, default=1)
    s.add_argument("--nnodes", type=int, help="default: SLURM_NNODES, else NNODES, else 1")
    s.add_argument("--node-rank", type=int, help="default: SLURM_NODEID, else NODE_RANK, else 0")
    s.add_argument("--rdzv-endpoint", default=None,
                   help="host:port of the first node (multi-node; default: MASTER_ADDR:MASTER_PORT when set)")
    s.add_argument("--max-restarts", type=int, default=0)
    s.add_argument("--stop-grace-s", type=int, default=300,
                   help="after SIGTERM/SIGUSR1 (a scheduler's stop), how long the ranks get to finish their step "
                   "and save before they are killed")

    s = sub.add_parser("slurm", help="render an sbatch script that runs a subcommand on N nodes, and submit it")
    from megaswift.launch.slurm import add_arguments

    add_arguments(s)

    s = sub.add_parser("plan", help="the layouts of a model that fit N x G GPUs, ranked by predicted step time, "
                       "with their commands (docs/plan.md)")
    s.add_argument("model", help="an HF model directory or its config.json (no weights needed)")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=8)
    s.add_argument("--gpu", default="h100", help="a100, h100, h200, b200 (megaswift/planner/hardware.py)")
    s.add_argument("--seq-len", type=int, default=4096)
    s.add_argument("--global-batch-tokens", type=int, default=1 << 20, help="tokens per optimizer step")
    s.add_argument("--algorithm", default="sft")
    s.add_argument("--lora-rank", type=int, default=0)
    s.add_argument("--top", type=int, default=5, help="layouts to print")
    s.add_argument("--json", action="store_true")
    s.add_argument("--explain", action="store_true", help="print every constant and formula the prediction uses")
    s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a constant, e.g. --set compute_efficiency=0.45 (see --explain)")
    s.add_argument("--dry-run", action="store_true",
                   help="also run megaswift's training step of each printed layout on a fake process group "
                   "and print its measured peak")

    s = with_config(sub.add_parser("dry-run", help="one training step of this config at --world-size ranks, "
                                   "rank positions one by one on a fake process group: peak memory by category"))
    s.add_argument("--world-size", type=int, required=True)
    s.add_argument("--algorithm", default="sft", help="sft or dpo")
    s.add_argument("--rank", type=int, action="append", help="rank(s) to run (default: every pipeline position)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--all-micro-batches", action="store_true",
                   help="run every micro batch of the step (default: as many as reach its peak, see docs/plan.md)")
    s.add_argument("--keep-dtype", action="store_true",
                   help="compute as the config says on CPU (default: bf16 autocast, as on a GPU)")

    s = sub.add_parser("tiny-hf", help="write a tiny random-weight HF checkpoint (tests, quickstart)")
    s.add_argument("family", choices=["llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "qwen2_moe", "mixtral",
                                      "deepseek_v3", "glm4_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe", "gpt_oss"])
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=0)
    return p


def parse(argv: list[str]):
    """(namespace, Config). Everything argparse does not know must be a dotted config override."""
    from megaswift.config import load_config

    if argv and argv[0] in _WRAPPERS:
        if "--" not in argv:
            raise MegaswiftError(f"usage: megaswift {argv[0]} [options] -- <subcommand ...>")
        cut = argv.index("--")
        ns = _parser().parse_args(argv[:cut])
        ns.sub_argv = argv[cut + 1:]
        return ns, None
    ns, rest = _parser().parse_known_args(argv)
    cfg = load_config(getattr(ns, "config", None), rest)
    return ns, cfg


def check_subcommand(sub_argv: list[str], world_size: int) -> None:
    """`launch` and `slurm`: check the command they will run on `world_size` ranks (config,
    layout, model shape; a training run's whole plan) before any process starts."""
    from megaswift import setup

    if not sub_argv:
        raise MegaswiftError("megaswift launch needs a subcommand after --, e.g. -- verify HF_DIR --parallel.tp 2")
    if sub_argv[0] in ("launch", "slurm"):
        raise MegaswiftError(f"the subcommand after -- cannot be {sub_argv[0]}")
    ns, cfg = parse(sub_argv)
    if cfg is None:
        return
    if sub_argv[0] == "train":
        from megaswift.train.plan import plan_training

        plan_training(cfg, world_size, algorithm=ns.algorithm, quiet=True)
        return
    model_cfg = setup.hf_model_config(ns.hf_dir, cfg) if sub_argv[0] in ("verify", "import-hf") else None
    setup.plan_layout(cfg, world_size, model_cfg)


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        # this process's own command: at exit, skip the garbage collection of everything it
        # loaded (torch, transformers: 0.6-1.5 s per process, measured). Files are flushed and
        # closed explicitly before (metrics, checkpoints); in-process callers pass argv.
        atexit.register(gc.freeze)
    argv = sys.argv[1:] if argv is None else argv
    # transformers' per-file progress bars drown the one-line results of these commands
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        ns, cfg = parse(argv)
        code = _run(ns, cfg)
        _close_process_group()
    except KeyboardInterrupt:  # outside a training loop, which says more (Interrupted)
        e = Interrupted("Ctrl-C: stopped before the command finished")
    except MegaswiftError as err:
        e = err
    else:
        sys.exit(code or 0)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"megaswift: {e.label}: {e}", file=sys.stderr)
    sys.exit(e.exit_code)


def _close_process_group() -> None:
    """After a command that succeeded: take the process group down before the interpreter does.
    Left to interpreter teardown, gloo's threads were once seen to abort a rank
    ("terminate called without an active exception", signal 6) after an import had finished."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(ns, cfg) -> int:
    if ns.command == "launch":
        from megaswift.launch.torchrun import launch

        return launch(ns, ns.sub_argv, check=check_subcommand)
    if ns.command == "slurm":
        from megaswift.launch.slurm import slurm_command

        return slurm_command(ns, ns.sub_argv, check=check_subcommand)
    if ns.command == "plan":
        from megaswift.planner.report import plan_command

        return plan_command(ns)
    if ns.command == "dry-run":
        from megaswift.planner.report import dry_run_command

        return dry_run_command(ns, cfg)
    if ns.command == "tiny-hf":
        from megaswift.testing.tiny import make_tiny_hf

        make_tiny_hf(ns.family, ns.out_dir, seed=ns.seed)
        print(f"wrote a tiny random {ns.family} checkpoint to {ns.out_dir}")
        return 0
    if ns.command == "quickstart":
        from megaswift.quickstart import quickstart_command

        return quickstart_command(ns)
    if ns.command == "export-hf":
        from megaswift.commands import export_command

        return export_command(ns)
    from megaswift.commands import import_command, train_command, verify_command

    return {"import-hf": import_command, "verify": verify_command, "train": train_command}[ns.command](ns, cfg)
