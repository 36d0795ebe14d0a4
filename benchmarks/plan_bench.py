"""The planner's predicted peak memory against the dry run's measured one, for the shipped real
configs at real world sizes, with Megatron-LM's formula for the same layout as a reference column.

    python benchmarks/plan_bench.py                 # every shipped config, the planner's top 2 layouts
    python benchmarks/plan_bench.py --top 1 --models Qwen3-8B --json

For each model and scenario (GPUs, sequence length, tokens per step) it runs `megaswift plan`'s
search, takes its best layouts, dry-runs each rank position that differs (one process, fake
process group, fake tensors: planner/dry_run.py) and prints, per position: the predicted peak,
the measured peak, their difference, the seconds the dry run took on this machine, and
Megatron-LM's `theoretical_memory_usage` estimate (re-derived here from its published formula:
weights and optimizer at 18 bytes per parameter, or 6 + 12/dp with the distributed optimizer;
activations for selective recompute with sequence parallelism, 34 s b h per layer / tp, scaled by
the layers in flight on the first stage; experts are counted in full on every rank, as the
formula did before expert layouts were added; multi-latent attention's weights as Megatron-LM
counts them, DeepSeek's dense first layers and shared expert included).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaswift.planner.hardware import GIB, hardware  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "real_configs")

# model -> [(nodes, gpus per node, gpu, seq len, tokens per step)]: 8 to 512 ranks
SCENARIOS = {
    "Qwen3-8B": [(1, 8, "h100", 4096, 1 << 20)],
    "Llama-3.1-70B": [(4, 8, "h100", 4096, 1 << 22), (64, 8, "h100", 4096, 1 << 24)],
    "Qwen3-30B-A3B": [(2, 8, "h100", 4096, 1 << 21)],
    "Qwen3-235B-A22B": [(8, 8, "h100", 4096, 1 << 22), (32, 8, "h100", 4096, 1 << 23)],
    "Mixtral-8x22B-v0.1": [(8, 8, "h100", 4096, 1 << 22)],
    "DeepSeek-V3": [(32, 8, "h100", 4096, 1 << 24)],
    "Kimi-K2-Instruct": [(32, 8, "h100", 4096, 1 << 24)],
}


def megatron_formula(cfg, mc, world: int) -> float:
    """Megatron-LM's theoretical per-GPU memory (bytes) for this layout, the first pipeline
    stage: weights + optimizer state + activations (selective recompute, sequence parallel)."""
    p = cfg.parallel
    h, L, heads = mc.hidden_size, mc.num_layers, mc.num_attention_heads
    if mc.is_mla:  # Megatron-LM's multi_latent_attention term
        qk, rq = mc.qk_head_dim, mc.q_lora_rank
        q_term = rq * (h + heads * qk + 1) if rq else h * heads * qk
        attention = (q_term + mc.kv_lora_rank * (h + heads * (mc.qk_nope_head_dim + mc.v_head_dim) + 1)
                     + h * mc.qk_rope_head_dim + mc.v_head_dim * heads * h)
    else:
        attention = 2 * h * h * (1 + mc.num_query_groups / heads) * (mc.kv_channels * heads / h)
    n_moe = len(mc.moe_layers)
    mlp = ((L - n_moe) * 3 * h * mc.ffn_hidden_size
           + n_moe * 3 * h * (mc.moe_ffn_hidden_size * mc.num_moe_experts + mc.moe_shared_expert_ffn_hidden_size))
    layer_params = L * attention + mlp + 4 * L * h + 2 * h
    vocab = mc.padded_vocab_size(p.tp)
    embedding = h * vocab
    most_loaded = (layer_params / p.pp + embedding) / p.tp
    if not mc.tie_word_embeddings and p.pp == 1:
        most_loaded += embedding / p.tp
    dp = world // (p.tp * p.pp * p.cp)
    per_param = 6 + 12 / dp if cfg.optim.zero else 18
    weights = most_loaded * per_param
    s, b = cfg.data.seq_len // p.cp, cfg.train.micro_batch_size
    acts = s * b * h * L * 34 / p.tp
    if p.pp > 1:
        in_flight = p.pp * (1 + (p.pp - 1) / (p.pp * p.vpp)) if p.vpp > 1 else p.pp
        acts = acts / p.pp * min(in_flight, cfg.train.global_batch(dp) // (b * dp))
    else:
        acts += s * b * h * 4 * (1 + vocab / h) / p.tp  # embedding, output layer, cross entropy
    return weights + acts


def run(names, top: int):
    from megaswift.planner.dry_run import dry_run
    from megaswift.planner.report import base_config
    from megaswift.planner.search import search
    from megaswift.setup import hf_model_config

    rows = []
    for name, (nodes, gpn, gpu, seq, tokens) in [(n, sc) for n in names for sc in SCENARIOS[n]]:
        directory = os.path.join(CONFIGS, name)
        ns = argparse.Namespace(seq_len=seq, lora_rank=0)
        cfg = base_config(ns, directory)
        mc = hf_model_config(directory, cfg)
        hw = hardware(gpu)
        world = nodes * gpn
        t0 = time.perf_counter()
        fit, _ = search(cfg, mc, world, gpn, hw, tokens)
        search_s = time.perf_counter() - t0
        if not fit:
            print(f"{name} on {world} {hw.name}: no layout fits", flush=True)
        for cand in fit[:top]:
            formula = megatron_formula(cand.cfg, mc, world)
            for result in dry_run(cand.cfg, mc, world, cand.ranks):
                predicted = cand.memory[cand.ranks.index(result.rank)]["peak"]
                rows.append({"model": name, "world": world, "layout": cand.describe(), "rank": result.rank,
                             "predicted_gib": predicted / GIB, "measured_gib": result.peak_bytes / GIB,
                             "diff": (predicted - result.peak_bytes) / result.peak_bytes,
                             "megatron_gib": formula / GIB, "dry_run_s": result.seconds, "search_s": search_s,
                             "micro_batches": result.micro_batches})
                yield rows[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(SCENARIOS))
    p.add_argument("--top", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not args.json:
        print(f"{'model':<20}{'gpus':>5}  {'layout':<40}{'rank':>5}{'predicted':>10}{'dry run':>9}{'diff':>8}"
              f"{'megatron':>10}{'dry s':>7}")
    worst = 0.0
    for row in run(args.models.split(","), args.top):
        worst = max(worst, abs(row["diff"]))
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{row['model']:<20}{row['world']:>5}  {row['layout']:<40}{row['rank']:>5}"
                  f"{row['predicted_gib']:>10.2f}{row['measured_gib']:>9.2f}{row['diff']:>+8.1%}"
                  f"{row['megatron_gib']:>10.2f}{row['dry_run_s']:>7.1f}", flush=True)
    if not args.json:
        print(f"largest |predicted - measured| / measured: {worst:.1%} (GiB per GPU; the dry run's peak of live tensors)")


if __name__ == "__main__":
    main()
