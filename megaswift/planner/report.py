"""`megaswift plan` and `megaswift dry-run`: what the user runs and what they read.

`plan MODEL --nodes N --gpus-per-node G --gpu h100 --seq-len S --global-batch-tokens T` searches
the layouts (planner/search.py) and prints the fastest that fit, each with its memory per GPU by
category, its step time and the exact command that launches it; `--dry-run` then runs megaswift's
own training step for each printed layout on the fake process group (planner/dry_run.py) and
prints the measured peak next to the predicted one. `dry-run` runs that step for a config as
given (`--world-size N`).
"""
from __future__ import annotations

import json
import os
import sys
import time

from megaswift.errors import ConfigError

from .hardware import GIB, hardware

ALGORITHMS = ("sft", "dpo")


def model_dir(path: str) -> str:
    """MODEL may be an HF directory or its config.json: no weights are needed."""
    if os.path.isfile(path) and os.path.basename(path) == "config.json":
        return os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    raise ConfigError(f"{path} is neither an HF model directory with a config.json nor a config.json file")


def base_config(ns, directory: str):
    """The run config every layout starts from: bf16 compute (autocast; on CPU too, so that the
    dry run computes as the GPU will), the sequence length, adapters if asked."""
    from megaswift.config import load_config

    overrides = [f"--model.hf_path={directory}", f"--data.seq_len={ns.seq_len}", "--model.dtype=bfloat16",
                 "--model.cpu_autocast=true"]
    if ns.lora_rank:
        overrides.append(f"--model.lora.rank={ns.lora_rank}")
    return load_config(None, overrides)


def command(cand, ns, directory: str, gpus_per_node: int) -> str:
    """The `megaswift launch` (one node) or `megaswift slurm` line that runs this layout."""
    cfg = cand.cfg
    p, t = cfg.parallel, cfg.train
    args = [f"train {ns.algorithm}", f"--model.hf_path {directory}", "--data.path DATA.jsonl",
            f"--data.seq_len {cfg.data.seq_len}", f"--train.micro_batch_size {t.micro_batch_size}",
            f"--train.global_batch_size {t.global_batch_size}", "--model.dtype bfloat16"]
    for key, default in (("tp", 1), ("pp", 1), ("cp", 1), ("ep", 1), ("etp", 1), ("vpp", 1)):
        if getattr(p, key) != default:
            args.append(f"--parallel.{key} {getattr(p, key)}")
    if p.sp:
        args.append("--parallel.sp")
    if p.pp > 1 and p.pp_schedule != "1f1b":
        args.append(f"--parallel.pp_schedule {p.pp_schedule}")
    if p.cp > 1 and p.cp_comm != "ring":
        args.append(f"--parallel.cp_comm {p.cp_comm}")
    if p.pp_layers:
        args.append(f"--parallel.pp_layers '[{','.join(map(str, p.pp_layers))}]'")
    if cfg.optim.zero:
        args.append(f"--optim.zero {cfg.optim.zero}")
    if t.recompute != "none":
        args.append(f"--train.recompute {t.recompute}")
    if cfg.model.lora.rank:
        args.append(f"--model.lora.rank {cfg.model.lora.rank}")
    tail = " ".join(args)
    if ns.nodes == 1:
        return f"megaswift launch --nproc-per-node {gpus_per_node} -- {tail}"
    return f"megaswift slurm --nodes {ns.nodes} --gpus-per-node {gpus_per_node} -- {tail}"


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _row(i, cand, tokens: int, mc, hw) -> str:
    from megaswift.train.metrics import train_flops_per_token

    w, tm = cand.worst, cand.time
    tps = tokens / tm["step_s"] / cand.world
    mfu = train_flops_per_token(mc, cand.cfg.data.seq_len) * tps / (hw.peak_tflops * 1e12)
    return (f"{i:>2}  {cand.describe():<42} {_gib(w['parameters']):>6} {_gib(w['gradients']):>6} "
            f"{_gib(w['optimizer']):>6} {_gib(w['activations'] + w['temporaries']):>6} {_gib(cand.peak):>6}  "
            f"{tm['step_s']:>7.2f} {tps:>9.0f} {mfu:>5.0%} {tm['bubble']:>6.2f}")


HEADER = (" #  layout                                     params  grads  optim   acts   peak    step_s  tok/s/gpu"
          "   mfu bubble\n" + " " * 46 + "(GiB per GPU, the rank position with the highest peak)")


def overflow_line(cand) -> str:
    w = cand.worst
    terms = {k: w[k] for k in ("parameters", "gradients", "optimizer", "activations", "temporaries")}
    terms.update({f"activations: {k}": v for k, v in w.get("terms", {}).items()})
    biggest = sorted(((v, k) for k, v in terms.items() if not k.startswith("activations:")), reverse=True)[:3]
    return (f"the closest layout that does not fit, {cand.describe()}, peaks at {_gib(cand.peak)} GiB per GPU "
            f"against {_gib(cand.usable)} usable: over by {(cand.peak - cand.usable) / GIB:.2f} GiB; its largest terms: "
            + ", ".join(f"{k} {_gib(v)}" for v, k in biggest))


def plan_command(ns) -> int:
    from megaswift.setup import hf_model_config

    from .search import search

    if ns.algorithm not in ALGORITHMS:
        raise ConfigError(f"megaswift plan predicts {', '.join(ALGORITHMS)} so far, not {ns.algorithm}")
    for name in ("nodes", "gpus_per_node", "seq_len", "top"):
        if getattr(ns, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(ns, name)}")
    rows = 2 if ns.algorithm == "dpo" else 1  # a DPO pair is two rows
    if ns.global_batch_tokens < rows * ns.seq_len or ns.global_batch_tokens % (rows * ns.seq_len):
        raise ConfigError(f"--global-batch-tokens {ns.global_batch_tokens} must be a positive multiple of "
                          f"{'2 x ' if rows == 2 else ''}--seq-len {ns.seq_len} (whole "
                          f"{'pairs' if rows == 2 else 'sequences'} per step)")
    directory = model_dir(ns.model)
    cfg = base_config(ns, directory)
    mc = hf_model_config(directory, cfg)
    hw = hardware(ns.gpu, ns.set)
    world = ns.nodes * ns.gpus_per_node
    t0 = time.perf_counter()
    fit, over = search(cfg, mc, world, ns.gpus_per_node, hw, ns.global_batch_tokens, ns.algorithm)
    searched_s = time.perf_counter() - t0
    top = fit[: ns.top]
    measured = {}
    if ns.dry_run:
        from .dry_run import dry_run

        for i, cand in enumerate(top):
            measured[i] = dry_run(cand.cfg, mc, world, algorithm=ns.algorithm)
    if ns.json:
        print(json.dumps(_as_json(top, over, measured, ns, directory, hw, world, searched_s), indent=1))
        return 0
    print(f"{mc.family} from {directory}: {_count(mc)} on {ns.nodes} x {ns.gpus_per_node} {hw.name} "
          f"({hw.memory_gib:g} GiB, {_gib(hw.usable_bytes)} usable by tensors), seq {ns.seq_len}, "
          f"{ns.global_batch_tokens} tokens per step; {len(fit)} of {len(fit) + len(over)} layouts fit "
          f"(searched in {searched_s:.1f} s)")
    if ns.explain:
        print("\nconstants (override with --set name=value):")
        for line in hw.explain():
            print("  " + line)
        from .comm import formulas
        print("\ncommunication per step (planner/comm.py):\n" + formulas())
    if not top:
        print("\nno layout fits." + (f" {overflow_line(over[0])}" if over else "")
              + "\nTry more GPUs, LoRA (--lora-rank), or a shorter --seq-len.")
        return 1
    print("\n" + HEADER)
    for i, cand in enumerate(top, 1):
        print(_row(i, cand, ns.global_batch_tokens, mc, hw))
        if i - 1 in measured:
            for r in measured[i - 1]:
                predicted = cand.memory[cand.ranks.index(r.rank)]["peak"] if r.rank in cand.ranks else None
                diff = f" ({(predicted - r.peak_bytes) / r.peak_bytes:+.1%} predicted)" if predicted else ""
                print(f"      dry run, rank {r.rank}: peak {_gib(r.peak_bytes)} GiB{diff}, {r.seconds:.1f} s")
        print(f"      {command(cand, ns, directory, ns.gpus_per_node)}")
    line = recurrent_state_line(top, mc)
    if line:
        print("\n" + line)
    if over:
        print("\n" + overflow_line(over[0]))
    return 0


def recurrent_state_line(top, mc) -> str:
    """Hybrid linear-attention models (Gated DeltaNet): what decoding keeps per sequence for
    those layers on the rank that holds the most of them, for each printed layout ('' without
    such layers): constant in the sequence's length, unlike the attention layers' KV cache."""
    from .layer_terms import DELTANET, mixer_of

    n = sum(1 for i in range(mc.num_layers) if mixer_of(mc, i) == DELTANET)
    if not n or not top:
        return ""
    per = ", ".join(f"#{i} {max(m['recurrent_state_per_sequence'] for m in c.memory) / 2 ** 20:.1f} MiB"
                    for i, c in enumerate(top, 1))
    return (f"recurrent state per sequence ({n} Gated DeltaNet layers: fp32 [value heads, dk, dv] and the conv "
            f"state, what a rollout keeps besides the attention layers' KV cache; per GPU): {per}")


def _count(mc) -> str:
    from megaswift.train.metrics import matmul_params

    return f"{matmul_params(mc) / 1e9:.1f}B active matmul parameters per token"


def _as_json(top, over, measured, ns, directory, hw, world, searched_s) -> dict:
    def one(i, cand):
        d = {"layout": cand.describe(), "command": command(cand, ns, directory, ns.gpus_per_node),
             "fits": cand.fits, "peak_bytes": cand.peak, "memory": [{"rank": r, **m} for r, m in
                                                                      zip(cand.ranks, cand.memory)],
             "time": cand.time, "tokens_per_s_per_gpu": ns.global_batch_tokens / cand.time["step_s"] / world}
        if i in measured:
            d["dry_run"] = [r.to_dict() for r in measured[i]]
        return d
    return {"hardware": hw.to_dict(), "world_size": world, "searched_s": searched_s,
            "layouts": [one(i, c) for i, c in enumerate(top)],
            "closest_not_fitting": one(-1, over[0]) if over else None}


def dry_run_command(ns, cfg) -> int:
    """`megaswift dry-run [--config X] --world-size N [--rank R ...]` for the config as given."""
    from megaswift.setup import hf_model_config

    from .dry_run import dry_run, with_values

    if not cfg.model.hf_path:
        raise ConfigError("megaswift dry-run needs model.hf_path (a directory with config.json; no weights needed)")
    directory = model_dir(cfg.model.hf_path)
    if not ns.keep_dtype:
        cfg = with_values(cfg, {"model.cpu_autocast": True})
    mc = hf_model_config(directory, cfg)
    results = dry_run(cfg, mc, ns.world_size, ns.rank or None, algorithm=ns.algorithm,
                      cap_micro_batches=not ns.all_micro_batches)
    for r in results:
        line = {"rank": r.rank, "pp_rank": r.pp_rank, "stages": r.stages, "layers": r.layers, "params": r.params,
                "micro_batches": r.micro_batches,
                "peak_gib": round(r.peak_bytes / GIB, 3),
                "peak_gib_by_category": {k: round(v / GIB, 3) for k, v in r.peak_by_category.items()},
                "comm_gib": {k: round(v / GIB, 4) for k, v in r.comm_bytes.items()}, "seconds": round(r.seconds, 1)}
        print(json.dumps(line) if ns.json else _describe(line), file=sys.stdout)
    return 0


def _describe(line: dict) -> str:
    cats = ", ".join(f"{k} {v:.2f}" for k, v in line["peak_gib_by_category"].items())
    comm = ", ".join(f"{k} {v:.3f}" for k, v in line["comm_gib"].items())
    return (f"rank {line['rank']} (pp rank {line['pp_rank']}, stages {line['stages']}, {line['layers']} layers, "
            f"{line['params'] / 1e9:.2f}B parameters, {line['micro_batches']} micro batches): peak {line['peak_gib']:.2f} GiB ({cats}); "
            f"sends GiB per step: {comm}; {line['seconds']} s")
