"""The torch chunked gated delta rule against transformers' reference, forward + backward on the CPU.

    python benchmarks/gated_delta_bench.py                       # b 1, s 2048, 8 heads of 128, 2 threads
    python benchmarks/gated_delta_bench.py --k-heads 4 --seq-len 4096
    python benchmarks/gated_delta_bench.py --device cuda          # adds fla's kernel (when it imports)

Both run the same float32 inputs shaped like a Qwen3-Next layer's (l2-normalised q/k in the
kernel, g = -exp(A_log) * softplus(.), beta = sigmoid(.)): megaswift's `gated_delta_rule`
(backend torch) and transformers' `torch_chunk_gated_delta_rule`, with the same chunk size, in
the same process. Each time is the median of the timed passes after one warm-up; the ratio is
reference / megaswift (above 1: megaswift is faster). Packed documents run only in megaswift
(transformers' torch path has none), so that row is a ratio to megaswift's own plain run.
On CUDA, flash-linear-attention's `chunk_gated_delta_rule` (backend fla) joins when it imports,
timed against megaswift's torch form, and its bf16 output is compared with the fp32 torch form.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--k-heads", type=int, default=8)
    p.add_argument("--v-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128, help="dk = dv")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed passes after one warm-up")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return p.parse_args(argv)


def inputs(args):
    gen = torch.Generator().manual_seed(0)
    b, s, d = args.batch, args.seq_len, args.head_dim
    q = torch.randn(b, s, args.k_heads, d, generator=gen)
    k = torch.randn(b, s, args.k_heads, d, generator=gen)
    v = torch.randn(b, s, args.v_heads, d, generator=gen)
    g = -F.softplus(torch.randn(b, s, args.v_heads, generator=gen))
    beta = torch.randn(b, s, args.v_heads, generator=gen).sigmoid()
    return q, k, v, g, beta


def time_fwd_bwd(fn, tensors, steps):
    times = []
    for step in range(steps + 1):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        start = time.perf_counter()
        out, final = fn(*leaves)
        (out.sum() + final.sum()).backward()
        if leaves[0].is_cuda:
            torch.cuda.synchronize()
        if step:  # the first pass warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    from megaswift.kernels.gated_delta import gated_delta_rule

    c = args.chunk_size
    tensors = [t.to(args.device) for t in inputs(args)]
    b, s = args.batch, args.seq_len
    # documents of 1/3, 1/2 and 1/6 of each row, boundaries off the chunk grid
    ids = torch.zeros(b, s, dtype=torch.long, device=args.device)
    ids[:, s // 3:] = 1
    ids[:, s // 3 + s // 2:] = 2

    runs = {
        "transformers": lambda q, k, v, g, beta: torch_chunk_gated_delta_rule(
            q, k, v, g, beta, chunk_size=c, output_final_state=True, use_qk_l2norm_in_kernel=True),
        "megaswift": lambda q, k, v, g, beta: gated_delta_rule(
            q, k, v, g, beta, output_final_state=True, chunk_size=c, backend="torch"),
        "megaswift+documents": lambda q, k, v, g, beta: gated_delta_rule(
            q, k, v, g, beta, document_ids=ids, output_final_state=True, chunk_size=c, backend="torch"),
    }
    fla = args.device == "cuda" and _fla_imports()
    if fla:
        runs["fla (bf16)"] = lambda q, k, v, g, beta: gated_delta_rule(
            *(t.bfloat16() for t in (q, k, v)), g, beta.bfloat16(), output_final_state=True, backend="fla")
    times = {name: time_fwd_bwd(fn, tensors, args.steps) for name, fn in runs.items()}
    print(f"gated delta rule fwd+bwd, b {b}, s {s}, heads k/v {args.k_heads}/{args.v_heads} x {args.head_dim}, "
          f"chunk {c}, {args.threads} threads, torch {torch.__version__}")
    print(f"  transformers torch_chunk_gated_delta_rule  {times['transformers']:.3f} s")
    print(f"  megaswift gated_delta_rule (torch)         {times['megaswift']:.3f} s  "
          f"ratio {times['transformers'] / times['megaswift']:.2f}x")
    print(f"  megaswift with 3 documents per row         {times['megaswift+documents']:.3f} s  "
          f"{times['megaswift+documents'] / times['megaswift']:.2f}x of its plain run")
    if fla:
        with torch.no_grad():
            ref = runs["megaswift"](*tensors)[0].float()
            got = runs["fla (bf16)"](*tensors)[0].float()
        print(f"  fla chunk_gated_delta_rule (bf16)          {times['fla (bf16)']:.3f} s  "
              f"ratio {times['megaswift'] / times['fla (bf16)']:.2f}x of megaswift's torch form; output vs fp32 "
              f"torch form: max {(got - ref).abs().max().item():.2e}, mean {(got - ref).abs().mean().item():.2e}")
    elif args.device == "cuda":
        print("  fla: flash-linear-attention does not import here; only the torch form ran")


def _fla_imports() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception:  # not installed, or no Triton for this GPU
        return False
    return True


if __name__ == "__main__":
    main()
