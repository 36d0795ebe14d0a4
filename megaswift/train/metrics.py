"""Per-step metrics: `<output_dir>/metrics.jsonl`, a progress line on rank 0, optional trackers.

Every run writes one JSON object per optimizer step (design.md): step, loss, grad_norm, lr,
tokens, tokens_per_s, elapsed_s, plus whatever the algorithm adds. Only rank 0 writes anything.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

from megaswift import device
from megaswift.errors import ConfigError

# Dense bf16 tensor-core peak per GPU, from NVIDIA's datasheets (the figures without sparsity,
# half the headline ones). MFU is reported only where the device is listed here, never guessed.
# Variants of one chip differ in clocks and power, so "H100 PCIe" and "H100 NVL" have their own
# entries; the plain chip name is the SXM part. H200 NVL is not listed (its figure is unchecked),
# so it takes the H200 SXM figure meanwhile.
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
    "H800": 989e12, "H800 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12, "A800": 312e12,  # the SXM4 and PCIe parts have the same peak
    "B200": 2250e12,
    "L40S": 362e12,
}


def peak_flops_for(name: str) -> float | None:
    """The peak of the device called `name` (as torch.cuda.get_device_name gives it), or None.

    The longest table key found in the name wins, so "NVIDIA H100 PCIe" gets the PCIe figure and
    not the SXM one that "H100" would give. Case and '-' vs ' ' are ignored: torch reports both
    "NVIDIA A100-PCIE-40GB" and "NVIDIA H100 PCIe"."""
    def norm(s: str) -> str:
        return s.upper().replace("-", " ")

    hits = [k for k in PEAK_BF16_FLOPS if norm(k) in norm(name)]
    return PEAK_BF16_FLOPS[max(hits, key=len)] if hits else None


def peak_flops() -> float | None:
    """The peak of this process's accelerator; None on CPU or an unlisted device."""
    return peak_flops_for(device.accelerator_name() or "")


def train_flops_per_token(cfg, seq_len: int) -> float:
    """Model FLOPs of forward + backward per token (3x the forward), counting matmuls only:
    the weights a token meets (2 flops per multiply-add: `matmul_params`) and each layer's token
    mixer core (`mixer_macs`): causal attention's scores and values (s/2 keys on average; a
    sliding-window layer's at most `window`), or a Gated DeltaNet layer's chunked delta rule.
    Biases, norms, attention sinks and Gated DeltaNet's depthwise conv are elementwise and not
    counted. Recomputation is not counted, as MFU conventionally does not."""
    core = sum(mixer_macs(cfg, seq_len, i)[1] for i in range(cfg.num_layers))
    return 3 * 2 * (matmul_params(cfg) + core)


def attended_keys(seq_len: int, window: int | None = None) -> float:
    """Keys a query attends to on average in causal attention over `seq_len` tokens: s/2, and
    with a sliding window of w keys (query i sees keys i - w + 1 .. i) w - w^2 / (2 s) for
    w <= s (the first w queries see fewer), which is s/2 again at w = s."""
    if window is None or window >= seq_len:
        return seq_len / 2
    return window - window * window / (2 * seq_len)


def attention_core_macs(cfg, seq_len: int, window: int | None = None) -> float:
    """Multiply-adds per token of one layer's causal attention core: q.k over the q/k head width
    and the weighted sum of values over the value width (they differ under multi-latent
    attention), over `attended_keys` (s/2 on average, fewer in a sliding-window layer)."""
    return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.value_head_dim) * attended_keys(seq_len, window)


def delta_rule_macs(cfg) -> float:
    """Multiply-adds per token of a Gated DeltaNet layer's chunked delta rule (the torch form of
    kernels/gated_delta.py, chunks of C tokens, r value heads per key head): per value head
    C (2 dk / r + dk + 2 dv) for the chunk's K K^T and Q K^T (once per key head), T V, T K and
    the intra-chunk output, C^2 / 3 for the triangular solve, and 3 dk dv for the state's three
    products (W S, the state update and Q S): linear in the sequence, where attention grows with
    it."""
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, C, r = cfg.linear_key_head_dim, cfg.linear_value_head_dim, delta_chunk(), hv // hk
    return hv * (C * (2 * dk / r + dk + 2 * dv) + C * C / 3 + 3 * dk * dv)


@functools.lru_cache(maxsize=1)
def delta_chunk() -> int:
    """The torch form's chunk (kernels/gated_delta.py gated_delta_rule's default chunk_size)."""
    import inspect

    from megaswift.kernels.gated_delta import gated_delta_rule

    return inspect.signature(gated_delta_rule).parameters["chunk_size"].default


def mixer_macs(cfg, seq_len: int, layer: int) -> tuple[int, float]:
    """(weights, core multiply-adds) per token of layer `layer`'s token mixer: attention's
    projections (`layer_matmul_params`) and core over its window, or a Gated DeltaNet layer's
    in_proj_qkvz, in_proj_ba and out_proj and its delta rule."""
    if cfg.token_mixer_for_layer(layer) == "gated_deltanet":
        return mixer_params(cfg, layer), delta_rule_macs(cfg)
    return mixer_params(cfg, layer), attention_core_macs(cfg, seq_len, cfg.window_for_layer(layer))


def mixer_params(cfg, layer: int) -> int:
    """Weights one token meets in layer `layer`'s token mixer (`mixer_macs`)."""
    if cfg.token_mixer_for_layer(layer) == "gated_deltanet":
        h, hk, hv = cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        return h * (2 * hk * dk + 2 * hv * dv + 2 * hv) + hv * dv * h
    return layer_matmul_params(cfg)[0]


def layer_matmul_params(cfg) -> tuple[int, int, int]:
    """Weights one token meets in one layer, as (attention projections, dense MLP, MoE MLP: the
    router, the top-k experts it goes to and any shared expert with its gate). Multi-latent
    attention: the q down- and up-projections (or one q projection), the kv down-projection with
    the rope key, the kv up-projection and the output projection; gated attention
    (attn_output_gate, Qwen3-Next): the q projection's gate rows too. A Gated DeltaNet layer's
    projections are `mixer_macs`'."""
    h, nq = cfg.hidden_size, cfg.num_attention_heads
    if cfg.is_mla:
        qk, rq = cfg.qk_head_dim, cfg.q_lora_rank
        q = h * rq + rq * nq * qk if rq else h * nq * qk
        attention = (q + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                     + cfg.kv_lora_rank * nq * (cfg.qk_nope_head_dim + cfg.v_head_dim) + nq * cfg.v_head_dim * h)
    else:
        hd, ng = cfg.kv_channels, cfg.num_query_groups
        gates = nq if cfg.attn_output_gate else 0  # each query head's output gate rows
        attention = h * (nq + gates + 2 * ng) * hd + nq * hd * h
    dense = 3 * h * cfg.ffn_hidden_size
    shared = cfg.moe_shared_expert_ffn_hidden_size
    moe = (h * cfg.num_moe_experts + cfg.moe_router_topk * 3 * h * cfg.moe_ffn_hidden_size
           + 3 * h * shared + (h if shared and cfg.moe_shared_expert_gate else 0))
    return attention, dense, moe


def mlp_matmul_params(cfg, layer: int) -> int:
    """Weights one token meets in layer `layer`'s MLP: a dense one, or the MoE's router, top-k
    experts and shared expert."""
    _, dense, moe = layer_matmul_params(cfg)
    return moe if layer in cfg.moe_layers else dense


def matmul_params(cfg) -> int:
    """Weights that take part in a matmul per token: every linear layer (each layer's by its
    token mixer) and the output layer; in an MoE layer the router, the top-k experts a token
    goes to and the shared expert (active parameters)."""
    layers = sum(mixer_params(cfg, i) + mlp_matmul_params(cfg, i) for i in range(cfg.num_layers))
    return layers + cfg.hidden_size * cfg.vocab_size


class MetricsLogger:
    def __init__(self, output_dir: str, *, total_steps: int, enabled: bool, run_config: dict | None = None,
                 wandb: bool = False, tensorboard: bool = False, every: int = 1, name: str = "run",
                 resumed_at: int | None = None):
        """`resumed_at`: the step of the checkpoint a resumed run starts from; rows after it, left
        by the run that saved it, are dropped, so the file holds each step once."""
        self.enabled, self.every, self.total = enabled, every, total_steps
        self.history: list[dict] = []
        self._file = self._wandb = self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resumed_at is not None and os.path.isfile(self.path):
            _keep_rows_up_to(self.path, resumed_at)
        self._file = open(self.path, "a")
        if wandb:
            self._wandb = _start_wandb(output_dir, name, run_config)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("log.tensorboard needs the tensorboard package: pip install 'megaswift[tensorboard]'") from e
            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.history.append(metrics)
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        step = metrics["step"]
        if step % self.every and step != self.total:
            return
        print(self.progress_line(metrics), file=sys.stderr, flush=True)
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)

    def progress_line(self, m: dict) -> str:
        width = len(str(self.total))
        done = m["step"] / self.total
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        parts = [f"step {m['step']:>{width}}/{self.total} [{bar}]", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
                 f"gnorm {m['grad_norm']:.3f}", f"{m['tokens_per_s']:,.0f} tok/s"]
        if m.get("mfu") is not None:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        if m.get("pp_bubble") is not None:
            parts.append(f"bubble {100 * m['pp_bubble']:.0f}%")
        if m.get("moe_max_load_ratio") is not None:
            parts.append(f"aux {m['moe_aux_loss']:.3f} load {m['moe_max_load_ratio']:.2f}")
        if m.get("reward") is not None:  # GRPO
            parts.append(f"reward {m['reward']:.3f} len {m['completions/mean_length']:.1f} "
                         f"rollout {100 * m['time/rollout_share']:.0f}%")
        if m.get("rewards/accuracies") is not None:  # DPO
            parts.append(f"acc {m['rewards/accuracies']:.3f}")
        if m.get("count/desirable") is not None:  # KTO: the reference point and the two rewards
            parts.append(f"kl {m['kl']:.3f} r+ {m['rewards/chosen']:.3f} r- {m['rewards/rejected']:.3f}")
        parts.append(f"mem {m['peak_mem_gb']:.2f} GB")
        return "  ".join(parts)

    def summary(self) -> dict:
        """Figures for the end-of-run screen (rank 0)."""
        h = self.history
        if not h:
            return {}
        timed = h[1:] or h  # the first step pays for warm-up (allocations, first collectives)
        tok_s = sum(m["tokens"] for m in timed) / max(1e-9, sum(m["step_time_s"] for m in timed))
        mfus = [m["mfu"] for m in timed if m.get("mfu") is not None]
        bubbles = [m["pp_bubble"] for m in timed if m.get("pp_bubble") is not None]
        return {"steps": len(h), "first_loss": h[0]["loss"], "last_loss": h[-1]["loss"],
                "min_loss": min((m["loss"] for m in h if math.isfinite(m["loss"])), default=None),
                "skipped_steps": h[-1].get("skipped_steps", 0),
                "tokens": sum(m["tokens"] for m in h), "tokens_per_s": tok_s,
                "mfu": sum(mfus) / len(mfus) if mfus else None,
                "pp_bubble": sum(bubbles) / len(bubbles) if bubbles else None, "elapsed_s": h[-1]["elapsed_s"],
                "moe": ({k: (h[0][k], h[-1][k]) for k in ("moe_aux_loss", "moe_max_load_ratio")}
                        if "moe_aux_loss" in h[0] else None),
                "reward": _first_last("reward", h), "rewards/accuracies": _first_last("rewards/accuracies", h),
                "peak_mem_gb": max(m["peak_mem_gb"] for m in h)}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _keep_rows_up_to(path: str, step: int) -> None:
    """Rewrite metrics.jsonl with the rows of steps <= `step` (a torn last line goes too)."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _start_wandb(output_dir: str, name: str, run_config: dict | None):
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("log.wandb needs the wandb package: pip install 'megaswift[wandb]'") from e
    # without credentials, log offline into output_dir; `wandb sync` uploads it later
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "megaswift"), name=name, dir=output_dir,
                      config=run_config, mode=mode)


class StepTimer:
    def __init__(self):
        self.start = time.perf_counter()
        self._last = self.start

    def lap(self) -> float:
        device.synchronize()
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        return dt

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _first_last(key: str, h: list[dict], n: int = 5) -> tuple[float, float] | None:
    """Means of `key` over the first and the last n steps (None if the run has no such metric)."""
    values = [m[key] for m in h if m.get(key) is not None]
    if not values:
        return None
    return sum(values[:n]) / len(values[:n]), sum(values[-n:]) / len(values[-n:])


def format_summary(algorithm: str, s: dict, cfg) -> str:
    """The end-of-run screen."""
    if not s.get("steps"):
        return f"megaswift {algorithm}: nothing to do (train.steps={cfg.train.steps} already reached)"
    p = cfg.parallel
    mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a (peak FLOP/s of this device unknown)"
    lines = [
        f"megaswift {algorithm}: {s['steps']} steps in {s['elapsed_s']:.1f} s",
        f"  layout      tp={p.tp} pp={p.pp} cp={p.cp} sp={p.sp} zero={cfg.optim.zero} recompute={cfg.train.recompute}"
        + (f" pp_schedule={p.pp_schedule} vpp={p.vpp}" if p.pp > 1 else "")
        + (f" ep={p.ep} etp={p.etp}" if s.get("moe") else ""),
        f"  loss        {s['first_loss']:.4f} -> {s['last_loss']:.4f} (min "
        + (f"{s['min_loss']:.4f})" if s.get("min_loss") is not None else "n/a: no finite loss)")
        + (f", {s['skipped_steps']} non-finite step(s) skipped" if s.get("skipped_steps") else ""),
        f"  tokens      {s['tokens']:,} at {s['tokens_per_s']:,.0f} tokens/s (steps after the first)",
        f"  MFU         {mfu}",
        *([f"  pp bubble   {100 * s['pp_bubble']:.1f}% of the pp ranks' time spent waiting"]
          if s.get("pp_bubble") is not None else []),
        *([f"  experts     load-balancing loss {s['moe']['moe_aux_loss'][0]:.4f} -> {s['moe']['moe_aux_loss'][1]:.4f}, "
           f"max/mean expert load {s['moe']['moe_max_load_ratio'][0]:.2f} -> {s['moe']['moe_max_load_ratio'][1]:.2f}"]
          if s.get("moe") else []),
        *([f"  reward      {s['reward'][0]:.4f} -> {s['reward'][1]:.4f} (means of the first and last 5 steps)"]
          if s.get("reward") else []),
        *([f"  accuracy    {s['rewards/accuracies'][0]:.4f} -> {s['rewards/accuracies'][1]:.4f} (rewards/accuracies, "
           f"means of the first and last 5 steps)"] if s.get("rewards/accuracies") else []),
        f"  peak memory {s['peak_mem_gb']:.2f} GB (rank 0)",
        f"  metrics     {os.path.join(cfg.train.output_dir, 'metrics.jsonl')}",
    ]
    if s.get("checkpoint"):
        lines.append(f"  checkpoint  {s['checkpoint']}")
    if s.get("export"):
        lines.append(f"  HF export   {s['export']}")
    return "\n".join(lines)
