"""The planner's prediction for one GPU against a real training step on it: peak memory
(torch.cuda.max_memory_allocated, and the StepAccountant's peak of live tensors) and step time.

    python benchmarks/plan_gpu_check.py                          # Qwen3-8B's config cut to 8 layers, seq 4096
    python benchmarks/plan_gpu_check.py --layers 2 --seq-len 512 --hidden 256 --cpu   # a smoke run on CPU

The model is a shipped real config (tests/data/real_configs) with fewer layers so that a full
fine-tune fits one GPU, random weights, random tokens. `megaswift plan`'s search picks the layout
for one GPU (its recompute mode); the same config then trains for --steps steps on the device,
and the script prints predicted and measured side by side (the median step time of the steps
after the first).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "real_configs")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen3-8B")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, help="also shrink the width (CPU smoke runs)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--tokens", type=int, help="tokens per step (default 4 sequences)")
    p.add_argument("--gpu", default="h100")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cpu", action="store_true", help="run the real step on CPU (a smoke test of this script)")
    args = p.parse_args(argv)

    import torch

    from megaswift import device
    from megaswift.planner.dry_run import measure_step
    from megaswift.planner.hardware import GIB, hardware
    from megaswift.planner.report import base_config
    from megaswift.planner.search import search
    from megaswift.parallel.state import ParallelState
    from megaswift.setup import hf_model_config

    work = tempfile.mkdtemp(prefix="plan-gpu-check-")
    try:
        hf = json.load(open(os.path.join(CONFIGS, args.model, "config.json")))
        hf["num_hidden_layers"] = args.layers
        if args.hidden:
            hf.update(hidden_size=args.hidden, intermediate_size=3 * args.hidden, head_dim=args.hidden // 8,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)
        with open(os.path.join(work, "config.json"), "w") as f:
            json.dump(hf, f)
        ns = argparse.Namespace(seq_len=args.seq_len, lora_rank=0)
        cfg = base_config(ns, work)
        mc = hf_model_config(work, cfg)
        hw = hardware(args.gpu)
        tokens = args.tokens or 4 * args.seq_len
        fit, over = search(cfg, mc, 1, 1, hw, tokens)
        if not fit:
            print(f"nothing fits one {hw.name}; use fewer --layers")
            return 1
        cand = fit[0]
        run_cfg = cand.cfg
        if args.cpu:
            from megaswift.planner.dry_run import with_values

            run_cfg = with_values(run_cfg, {"model.cpu_autocast": False})
        dev = torch.device("cpu" if args.cpu else "cuda")
        st = ParallelState.single(dev)
        device.reset_peak_memory()
        times = []
        t_prev = [time.perf_counter()]

        def on_step():
            device.synchronize()
            now = time.perf_counter()
            times.append(now - t_prev[0])
            t_prev[0] = now
        result = measure_step(run_cfg, mc, st, fake=False, cuda_optimizer=dev.type == "cuda", steps=args.steps,
                              on_step=on_step)
        allocated = device.peak_memory_bytes() if dev.type == "cuda" else None
        predicted = cand.memory[0]["peak"]
        step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
        print(f"layout: {cand.describe()} (one {hw.name}), {mc.num_layers} layers, seq {args.seq_len}, {tokens} tokens per step")
        print(f"peak memory: predicted {predicted / GIB:.2f} GiB; measured live tensors {result.peak_bytes / GIB:.2f} GiB "
              f"({(predicted - result.peak_bytes) / result.peak_bytes:+.1%})"
              + (f"; torch.cuda.max_memory_allocated {allocated / GIB:.2f} GiB "
                 f"({(predicted - allocated) / allocated:+.1%})" if allocated else ""))
        print(f"step time: predicted {cand.time['step_s']:.3f} s (compute {cand.time['compute_s']:.3f} s at "
              f"{hw.compute_efficiency:.0%} of peak); measured median {step_s:.3f} s over {len(times) - 1} steps "
              f"({(cand.time['step_s'] - step_s) / step_s:+.1%})")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
