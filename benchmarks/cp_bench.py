"""Context parallelism on one long sequence: activation memory and step time per rank as cp grows.

    python benchmarks/cp_bench.py                          # seq 4096, cp 1, 2, 4, ring, gloo on CPU
    python benchmarks/cp_bench.py --cp-comm ulysses --seq-len 8192

Each cp size runs the real model (GPTModel, random weights) on the same sequence: forward and
backward of the per-token loss, the sequence sharded as training shards it. Activation memory is
what autograd saves for backward during the forward (tensors recorded through
`torch.autograd.graph.saved_tensors_hooks`, each storage counted once, parameters left out): on
a CPU it is the figure that matters and the one a peak-RSS reading would blur. Step time is the
median of the timed forward+backward passes. Both are reported per rank and as ratios to cp=1,
measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--cp-comm", choices=["ring", "ulysses"], default="ring")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed passes after one warm-up")
    return p.parse_args(argv)


def worker(rank, world, args):
    from megaswift.models.config import ModelConfig
    from megaswift.models.decoder import GPTModel
    from megaswift.parallel.context_parallel import shard_batch
    from megaswift.parallel.layout import Layout
    from megaswift.parallel.state import ParallelState

    ulysses = world if args.cp_comm == "ulysses" else 1
    st = ParallelState.build(Layout(world_size=world, cp=world, ulysses=ulysses))
    cfg = ModelConfig(family="llama", vocab_size=2048, hidden_size=args.hidden, ffn_hidden_size=args.hidden * 8 // 3,
                      num_layers=args.layers, num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                      kv_channels=args.hidden // args.heads, max_position_embeddings=args.seq_len)
    model = GPTModel(cfg, st)
    model.reset_parameters(seed=0)
    model.set_attention_backend("sdpa")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq_len + 1), generator=g)
    mb = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(args.seq_len)[None]}
    if world > 1:
        mb = shard_batch(mb, world, st.cp_rank)
    kwargs = dict(position_ids=mb["position_ids"], labels=mb["labels"], document_ids=mb.get("document_ids"),
                  cp_index=mb.get("cp_index"))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    times = []
    for i in range(args.steps + 1):
        saved.clear()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(mb["input_ids"], **kwargs).sum()
        loss.backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    times = sorted(times[1:])
    return {"activation_bytes": sum(saved.values()), "step_s": times[len(times) // 2]}


def main(argv=None):
    from megaswift.testing.dist import run_distributed

    args = parse_args(argv)
    print(f"one sequence of {args.seq_len} tokens, llama {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads / {args.kv_heads} KV; cp_comm {args.cp_comm}; gloo on {os.cpu_count()} CPU cores")
    print(f"{'cp':>3} {'activations MB/rank':>20} {'vs cp=1':>8} {'step s':>8} {'vs cp=1':>8}")
    base = None
    for cp in args.cp:
        res = run_distributed(worker, cp, args, timeout_s=3600)
        mem = max(r["activation_bytes"] for r in res) / 2**20
        step = max(r["step_s"] for r in res)
        base = base or (mem, step)
        print(f"{cp:>3} {mem:>20.1f} {mem / base[0]:>8.2f} {step:>8.2f} {step / base[1]:>8.2f}")


if __name__ == "__main__":
    main()
