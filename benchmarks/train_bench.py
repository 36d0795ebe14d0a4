"""Training throughput: megaswift (TP=1) against a plain transformers + torch loop, same model and batch.

    python benchmarks/train_bench.py                     # CPU defaults (a ~20M-parameter llama)
    python benchmarks/train_bench.py --hidden 2048 --layers 16 --seq-len 4096 --micro-batch 2   # GPU

Both sides get the same random-weight HF checkpoint, the same token batches, AdamW with the same
settings, gradient clipping at 1.0, fp32 weights, and on CUDA bf16 autocast and SDPA attention.
Each side runs in its own subprocess, so peak memory (CUDA: max allocated; CPU: peak RSS) belongs
to that side alone. Reported: tokens/s over the timed steps (after warm-up steps), peak memory,
and on a GPU with a known peak, MFU; then megaswift's ratios to the transformers figures.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=2, help="alternate the two sides this many times; best kept")
    p.add_argument("--side", choices=["transformers", "megaswift"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_model(args, out_dir: str) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=max(4096, args.seq_len), rms_norm_eps=1e-5)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out_dir)


def batches(args, step: int) -> list[dict]:
    g = torch.Generator().manual_seed(step)
    out = []
    for _ in range(args.grad_accum):
        ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), generator=g)
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()})
    return out


def run_transformers(args) -> dict:
    from transformers import AutoModelForCausalLM

    from megaswift import device

    dev = device.get_device()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa").to(dev)
    model.train()
    on_cuda = dev.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **({"fused": True} if on_cuda else {"foreach": True}))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else torch.autocast("cpu", enabled=False)

    def step(i):
        mbs = batches(args, i)
        for mb in mbs:
            with autocast:
                logits = model(input_ids=mb["input_ids"].to(dev)).logits
            # sum over tokens / tokens of the step, the same normalisation megaswift uses
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), mb["labels"].to(dev).flatten(),
                                                     reduction="sum") / (len(mbs) * mb["labels"].numel())
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)

    return _time(args, step)


def run_megaswift(args) -> dict:
    from megaswift.config import load_config
    from megaswift.train.build import build_trainer
    from megaswift.train.algorithm import Algorithm

    class Synthetic(Algorithm):
        name = "bench"
        reads_data_path = False

        def build_data(self, ctx):
            return None

        def count(self, mb):
            return int(mb["labels"].numel())

        def loss_sum(self, model, mb):
            return model(mb["input_ids"], labels=mb["labels"]).sum(), {}

    from megaswift import device

    on_cuda = device.cuda_available()
    cfg = load_config(base={
        "model": {"hf_path": args.model_dir, "dtype": "bfloat16" if on_cuda else "float32"},
        "data": {"seq_len": args.seq_len},
        "train": {"steps": 10**6, "micro_batch_size": args.micro_batch,
                  "global_batch_size": args.micro_batch * args.grad_accum, "output_dir": tempfile.mkdtemp()},
        "optim": {"lr": 1e-4, "weight_decay": 0.1, "clip_grad": 1.0, "schedule": "constant"},
    })
    trainer = build_trainer(cfg, Synthetic())
    return _time(args, lambda i: trainer.train_step(batches(args, i)))


def _time(args, step) -> dict:
    from megaswift import device

    for i in range(args.warmup):
        step(i)
    device.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    device.synchronize()
    dt = time.perf_counter() - t0
    tokens = args.steps * args.grad_accum * args.micro_batch * args.seq_len
    return {"tokens_per_s": tokens / dt, "peak_mem_gb": device.peak_memory_bytes() / 1e9,
            "device": device.accelerator_name() or "cpu"}


def _side(args, side: str) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--model-dir", args.model_dir]
    for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab", "seq_len", "micro_batch", "grad_accum",
              "steps", "warmup"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.side:
        result = run_transformers(args) if args.side == "transformers" else run_megaswift(args)
        print(json.dumps(result))
        return
    from megaswift.setup import hf_model_config
    from megaswift.config import load_config
    from megaswift.train.metrics import matmul_params, peak_flops, train_flops_per_token

    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir = tmp
        make_model(args, tmp)
        model_cfg = hf_model_config(tmp, load_config())
        best: dict[str, dict] = {}
        for _ in range(args.repeats):  # alternate, so drift in machine load hits both sides alike
            for side in ("transformers", "megaswift"):
                r = _side(args, side)
                if side not in best or r["tokens_per_s"] > best[side]["tokens_per_s"]:
                    best[side] = r
    flops_per_token = train_flops_per_token(model_cfg, args.seq_len)
    n_params = matmul_params(model_cfg)
    peak = peak_flops()  # None where the device has no known peak (any CPU)
    print(f"model: llama {n_params / 1e6:.1f}M matmul params, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          f"batch {args.micro_batch} x {args.grad_accum} x seq {args.seq_len}; device {best['megaswift']['device']}")
    print(f"{'side':<14}{'tokens/s':>12}{'peak mem GB':>14}{'MFU':>8}")
    for side in ("transformers", "megaswift"):
        r = best[side]
        mfu = f"{100 * flops_per_token * r['tokens_per_s'] / peak:.1f}%" if peak else "n/a"
        print(f"{side:<14}{r['tokens_per_s']:>12,.0f}{r['peak_mem_gb']:>14.2f}{mfu:>8}")
    t, m = best["transformers"], best["megaswift"]
    print(f"ratio megaswift/transformers: tokens/s {m['tokens_per_s'] / t['tokens_per_s']:.2f}x, "
          f"peak memory {m['peak_mem_gb'] / t['peak_mem_gb']:.2f}x")


if __name__ == "__main__":
    main()
