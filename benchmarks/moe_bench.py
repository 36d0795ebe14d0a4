"""Throughput, per-rank memory and dispatch cost of an MoE SFT step at ep = 1, 2, 4.

    python benchmarks/moe_bench.py                    # 4 ranks (dp=4), gloo on CPU
    python benchmarks/moe_bench.py --world 8 --experts 16 --steps 6     # on a bigger machine

The real engine (Trainer, DataParallelSet, AdamW) trains a random-weight Qwen3-MoE on random
tokens at the same world size for each ep, so only the expert placement changes: at ep=1 every
rank holds all experts and computes its own tokens; at ep=N each rank holds E/N experts and the
tokens travel over all-to-all. Reported per ep, averaged over the steps after the first:

- tokens/s of the whole job and step time;
- per-rank parameter memory (dense and expert weights, fp32; gradients and AdamW state add 3x
  that) and the process's peak resident memory (CPU) or peak allocated memory (CUDA);
- dispatch share: seconds spent in the expert collectives (token all-to-all forward and
  backward, the count exchange, and the etp gather/reduce-scatter when etp > 1) over the step
  time; and the share spent in the experts' own GEMMs (forward).

On a CPU with fewer cores than ranks the ranks also compete for cores, which inflates every
share; the ratios between ep values are the figures to read.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pipeline_bench import RandomBatches  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--eps", default="1,2,4")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--expert-ffn", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--backend", default="auto", choices=["auto", "grouped", "loop"])
    return p.parse_args(argv)


def _timed(fn, box, key):
    def wrapper(*args, **kwargs):
        from megaswift.device import synchronize

        synchronize()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        synchronize()
        box[key] = box.get(key, 0.0) + time.perf_counter() - t0
        return out
    return wrapper


def instrument(box: dict) -> None:
    """Time the expert collectives and GEMMs of megaswift/parallel/experts.py (this process only)."""
    from megaswift.parallel import experts as ex

    for cls in (ex._AllToAll, ex._GatherRows, ex._ReduceScatterRows):
        for name in ("forward", "backward"):
            setattr(cls, name, staticmethod(_timed(getattr(cls, name), box, "comm")))
    ex._exchange_counts = _timed(ex._exchange_counts, box, "comm")
    ex._gather_counts = _timed(ex._gather_counts, box, "comm")
    ex.expert_swiglu = _timed(ex.expert_swiglu, box, "experts_fwd")


def worker(rank, world, hf_dir, out_dir, args, ep):
    from megaswift import device
    from megaswift.config import load_config
    from megaswift.train.build import build_trainer
    from megaswift.train.sft import SFT

    class RandomTokensSFT(SFT):
        reads_data_path = False

        def build_data(self, ctx):
            return RandomBatches(1, args.micro_batch, args.seq_len, ctx.model.cfg.vocab_size)

    box: dict = {}
    instrument(box)
    base = {"model": {"hf_path": hf_dir, "attention_backend": "sdpa"}, "data": {"seq_len": args.seq_len},
            "parallel": {"ep": ep}, "moe": {"expert_backend": args.backend},
            "train": {"steps": args.steps, "micro_batch_size": args.micro_batch, "output_dir": out_dir},
            "log": {"every": 1000}}
    trainer = build_trainer(load_config(None, [], base=base), RandomTokensSFT())
    params = {"dense": 0, "expert": 0}
    for p in trainer.model.parameters():
        params["expert" if getattr(p, "expert", False) else "dense"] += p.numel() * p.element_size()
    rows = []
    for _ in range(args.steps):
        box.clear()
        t0 = time.perf_counter()
        m = trainer.train_step(trainer.data.next_global_batch())
        m["step_s"] = time.perf_counter() - t0
        m.update(comm_s=box.get("comm", 0.0), experts_s=box.get("experts_fwd", 0.0))
        rows.append(m)
    return {"rows": rows, "params": params, "peak": device.peak_memory_bytes()}


def main(argv=None):
    from megaswift.testing.dist import run_distributed

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoModelForCausalLM, Qwen3MoeConfig

        cfg = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                             moe_intermediate_size=args.expert_ffn, num_experts=args.experts,
                             num_experts_per_tok=args.topk, num_hidden_layers=args.layers, num_attention_heads=8,
                             num_key_value_heads=4, head_dim=args.hidden // 8, norm_topk_prob=True,
                             max_position_embeddings=max(1024, args.seq_len))
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(os.path.join(tmp, "hf"))
        tokens = args.world * args.micro_batch * args.seq_len
        print(f"Qwen3-MoE: {args.layers} layers, hidden {args.hidden}, {args.experts} experts x {args.expert_ffn} "
              f"(top-{args.topk}), world {args.world} (dp={args.world}), {tokens} tokens per step, "
              f"expert backend {args.backend}; {os.cpu_count()} CPU cores; mean over steps 2..{args.steps}")
        print(f"{'ep':>3} {'tokens/s':>9} {'step s':>7} {'dense MB':>9} {'expert MB':>10} {'peak MB':>8} "
              f"{'dispatch comm':>14} {'expert GEMMs':>13}  loss")
        base = None
        for ep in [int(e) for e in args.eps.split(",")]:
            results = run_distributed(worker, args.world, os.path.join(tmp, "hf"), os.path.join(tmp, f"ep{ep}"),
                                      args, ep, timeout_s=3600)
            steps = [max(r["rows"][i]["step_s"] for r in results) for i in range(1, args.steps)]
            step_s = sum(steps) / len(steps)
            comm = sum(r["rows"][i]["comm_s"] for r in results for i in range(1, args.steps)) / (
                len(results) * (args.steps - 1))
            gemm = sum(r["rows"][i]["experts_s"] for r in results for i in range(1, args.steps)) / (
                len(results) * (args.steps - 1))
            r0 = results[0]
            base = base or tokens / step_s
            print(f"{ep:>3} {tokens / step_s:>9,.0f} {step_s:>7.3f} {r0['params']['dense'] / 1e6:>9.1f} "
                  f"{r0['params']['expert'] / 1e6:>10.1f} {max(r['peak'] for r in results) / 1e6:>8.0f} "
                  f"{comm / step_s:>14.1%} {gemm / step_s:>13.1%}  {r0['rows'][-1]['loss']:.4f}"
                  f"   ({tokens / step_s / base:.2f}x ep={args.eps.split(',')[0]})")


if __name__ == "__main__":
    main()
