"""Throughput of the built-in rollout engine against transformers' generate on the same model.

    python benchmarks/rollout_bench.py                       # CPU, one process and tp=2 (gloo)
    python benchmarks/rollout_bench.py --rows 256 --new 64 --device cuda --tp 1

A random-weight Qwen3 checkpoint (hidden 256, 4 layers, vocab 4096 unless changed) is written
once; both engines complete the same left-padded batch of random prompts (lengths 8-24) with
sampling at temperature 1 for exactly --new tokens (no stop token), so they do the same work.
Reported: generated tokens/s of transformers (`generate(do_sample=True)`, KV cache on), of
megaswift's `rollout.sampler.generate` in one process, and (CPU) at tp=2 over gloo, each as a
ratio to transformers measured in the same run. The best of --repeat runs is kept.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tp", type=int, default=2, help="also measure at this tp (gloo, CPU); 1 = skip")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def write_model(out: str, a) -> str:
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=a.hidden // 8, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    return out


def prompts(a) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(8, 25, (a.rows,), generator=g)
    return [torch.randint(1, a.vocab, (int(n),), generator=g).tolist() for n in lens]


def bench_transformers(hf_dir: str, a) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(a.device).eval()
    ps = prompts(a)
    width = max(len(p) for p in ps)
    ids = torch.zeros(len(ps), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(ps):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(a.device), mask.to(a.device)
    best = float("inf")
    for _ in range(a.repeat):
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=a.new, min_new_tokens=a.new, pad_token_id=0)
        best = min(best, time.perf_counter() - t)
    return a.rows * a.new / best


def bench_megaswift(rank, world, hf_dir: str, a) -> float:
    from megaswift.setup import hf_model_config
    from megaswift.config import load_config
    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.models.decoder import GPTModel
    from megaswift.parallel.layout import Layout
    from megaswift.parallel.state import ParallelState
    from megaswift.rollout.sampler import SamplingParams, generate

    st = ParallelState.build(Layout(world_size=world, tp=world)) if world > 1 else ParallelState.single()
    model = GPTModel(hf_model_config(hf_dir, load_config()), st, device=torch.device(a.device))
    model.set_attention_backend("sdpa")
    load_hf_into_model(model, hf_dir)
    model.eval()
    params = SamplingParams(max_new_tokens=a.new, temperature=1.0)
    best = float("inf")
    for r in range(a.repeat):
        t = time.perf_counter()
        generate(model, prompts(a), params, seeds=[r * a.rows + i for i in range(a.rows)])
        best = min(best, time.perf_counter() - t)
    return a.rows * a.new / best


def main(argv=None) -> None:
    a = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_model(os.path.join(tmp, "model"), a)
        hf = bench_transformers(hf_dir, a)
        ours = bench_megaswift(0, 1, hf_dir, a)
        print(f"{a.rows} rows x {a.new} new tokens, hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, "
              f"{a.device}, {torch.get_num_threads()} threads")
        print(f"transformers generate      {hf:9,.0f} tokens/s  1.00x")
        print(f"megaswift (one process)    {ours:9,.0f} tokens/s  {ours / hf:.2f}x")
        if a.tp > 1 and a.device == "cpu":
            from megaswift.testing.dist import run_distributed

            tp = run_distributed(bench_megaswift, a.tp, hf_dir, a, timeout_s=600)[0]
            print(f"megaswift (tp={a.tp}, gloo)     {tp:9,.0f} tokens/s  {tp / hf:.2f}x")


if __name__ == "__main__":
    main()
