"""Pipeline bubble of each schedule, measured by the engine, next to the theory.

    python benchmarks/pipeline_bench.py                 # pp=4, 8 micro batches, gloo on CPU
    python benchmarks/pipeline_bench.py --pp 2 --micro-batches 4 --layers 4

For each schedule the real engine (megaswift's Trainer: PipelineModel, torch.distributed.pipelining,
AdamW, dp reduction) trains a random-weight llama on random tokens for a few steps. Every rank
times its own forward, backward and weight-gradient passes; the bubble is the share of the pp
ranks' time spent not computing: 1 - sum(compute_r) / (pp x slowest rank's schedule time), the
`pp_bubble` of metrics.jsonl, averaged over the steps after the first (which pays for shape
inference and warm-up).

Theory, with p stages per pipeline and m micro batches, for equal forward/backward times:
GPipe and 1F1B (p-1)/(m+p-1); interleaved 1F1B with v stages per rank (p-1)/(v*m+p-1) (Narayanan
et al. 2021); ZBV close to 0 when forward, input-gradient and weight-gradient passes take equal
time (Qi et al. 2024). The measured figure also holds what the theory leaves out: point-to-point
transfers, the loss, and, on a CPU with fewer cores than ranks, ranks competing for cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zbv", 2)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=8)
    p.add_argument("--layers", type=int, default=8, help="must split evenly into pp x 2 stages")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048, help="small, so the last stage's output layer and loss "
                   "do not outweigh its layers")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    return p.parse_args(argv)


class RandomBatches:
    """The loader interface the engine needs, serving random tokens of a fixed shape."""

    def __init__(self, n_micro, mb, seq, vocab):
        self.n_micro, self.mb, self.seq, self.vocab, self.step = n_micro, mb, seq, vocab, 0

    def next_global_batch(self):
        g = torch.Generator().manual_seed(self.step)
        self.step += 1
        out = []
        for _ in range(self.n_micro):
            ids = torch.randint(0, self.vocab, (self.mb, self.seq + 1), generator=g)
            out.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                        "position_ids": torch.arange(self.seq).expand(self.mb, self.seq), "document_ids": None,
                        "num_tokens": self.mb * self.seq})
        return out

    def state_dict(self):
        return {"step": self.step}


def worker(rank, world, hf_dir, out_dir, args, schedule, vpp):
    from megaswift.config import load_config
    from megaswift.train.build import build_trainer
    from megaswift.train.sft import SFT

    class RandomTokensSFT(SFT):
        reads_data_path = False

        def build_data(self, ctx):
            return RandomBatches(args.micro_batches, args.micro_batch, args.seq_len, ctx.model.cfg.vocab_size)

    base = {"model": {"hf_path": hf_dir, "attention_backend": "sdpa"},
            "data": {"seq_len": args.seq_len},
            "parallel": {"pp": args.pp, "vpp": vpp, "pp_schedule": schedule},
            "train": {"steps": args.steps, "micro_batch_size": args.micro_batch,
                      "global_batch_size": args.micro_batch * args.micro_batches, "output_dir": out_dir},
            "log": {"every": 1000}}
    trainer = build_trainer(load_config(None, [], base=base), RandomTokensSFT())
    return [trainer.train_step(trainer.data.next_global_batch()) for _ in range(args.steps)]


def theory(schedule, p, m, v):
    if schedule == "interleaved":
        return (p - 1) / (v * m + p - 1)
    if schedule == "zbv":
        return 0.0
    return (p - 1) / (m + p - 1)


def main(argv=None):
    from megaswift.testing.dist import run_distributed

    args = parse_args(argv)
    p, m = args.pp, args.micro_batches
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                          num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                          max_position_embeddings=max(1024, args.seq_len))
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(os.path.join(tmp, "hf"))
        print(f"pp={p}, {m} micro batches of {args.micro_batch} x {args.seq_len} tokens, {args.layers} layers, "
              f"hidden {args.hidden}, vocab {args.vocab}; gloo on {os.cpu_count()} CPU cores; mean over steps 2..{args.steps}")
        print(f"{'schedule':<12} {'stages':>6} {'measured':>9} {'1F1B theory':>12} {'schedule ideal':>15} "
              f"{'schedule s':>10}  compute s per pp rank")
        for schedule, vpp in SCHEDULES:
            stages = p * vpp
            rows = run_distributed(worker, p, os.path.join(tmp, "hf"), os.path.join(tmp, schedule), args, schedule,
                                   vpp, timeout_s=1800)[0][1:]
            bubble = sum(r["pp_bubble"] for r in rows) / len(rows)
            compute = [sum(r["pp_stage_compute_s"][i] for r in rows) / len(rows) for i in range(p)]
            wall = sum(r["pp_schedule_s"] for r in rows) / len(rows)
            print(f"{schedule:<12} {stages:>6} {bubble:>9.3f} {(p - 1) / (m + p - 1):>12.3f} "
                  f"{theory(schedule, p, m, vpp):>15.3f} {wall:>10.2f}  " + " ".join(f"{c:.2f}" for c in compute))


if __name__ == "__main__":
    main()
