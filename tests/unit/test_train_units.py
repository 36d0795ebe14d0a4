"""Pieces of the training engine that need no process group: lr schedule, metrics file and
trackers, checkpoint discovery, FLOPs count."""
import json
import os

import pytest

from megaswift.checkpoint.train_state import completed_steps, resolve_load
from megaswift.config import load_config
from megaswift.errors import CheckpointError, ConfigError
from megaswift.train.metrics import MetricsLogger, train_flops_per_token
from megaswift.train.optim import lr_at


def _optim(**kw):
    return load_config(overrides=[f"--optim.{k}={v}" for k, v in kw.items()]).optim


def test_warmup_then_cosine_to_min_lr():
    o = _optim(lr=1.0, min_lr=0.1, warmup_steps=4, schedule="cosine")
    lrs = [lr_at(s, o, 14) for s in range(14)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[-1] > 0.1 and lr_at(14, o, 14) == pytest.approx(0.1)  # min_lr after the last step


def test_linear_and_constant_schedules():
    lin = _optim(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert [lr_at(s, lin, 4) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    const = _optim(lr=0.5, warmup_steps=2, schedule="constant")
    assert [lr_at(s, const, 10) for s in (0, 1, 5, 9)] == pytest.approx([0.25, 0.5, 0.5, 0.5])


def _row(step, loss):
    return {"step": step, "loss": loss, "grad_norm": 1.0, "lr": 1e-3, "tokens": 100, "tokens_per_s": 50.0,
            "step_time_s": 2.0, "elapsed_s": 2.0 * step, "peak_mem_gb": 0.5}


def test_metrics_jsonl_tensorboard_and_summary(tmp_path, capsys):
    log = MetricsLogger(str(tmp_path), total_steps=3, enabled=True, tensorboard=True)
    for s, loss in ((1, 3.0), (2, 2.0), (3, 2.5)):
        log.log(_row(s, loss))
    summary = log.summary()
    log.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] == 2.0
    assert os.listdir(tmp_path / "tensorboard")
    assert summary["first_loss"] == 3.0 and summary["last_loss"] == 2.5 and summary["min_loss"] == 2.0
    assert summary["tokens"] == 300 and summary["tokens_per_s"] == pytest.approx(50.0)
    assert "step 2/3" in capsys.readouterr().err


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLogger(str(tmp_path / "x"), total_steps=1, enabled=False)
    log.log(_row(1, 1.0))
    assert not os.path.exists(tmp_path / "x")


def test_wandb_is_optional_and_offline_without_a_key(tmp_path, monkeypatch):
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="megaswift\\[wandb\\]"):
            MetricsLogger(str(tmp_path), total_steps=1, enabled=True, wandb=True)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        MetricsLogger(str(tmp_path), total_steps=1, enabled=True, wandb=True).close()


def test_latest_skips_partial_saves(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    root = tmp_path / "checkpoints"
    for name, complete in (("step_2", True), ("step_10", True), ("step_12.tmp", False), ("step_11", False)):
        (root / name).mkdir(parents=True)
        if complete:  # what `latest` checks: a readable megaswift.json and model/ (DCP)
            dcp.save({"w": torch.zeros(1)}, checkpoint_id=str(root / name / "model"), no_dist=True)
            (root / name / "megaswift.json").write_text('{"format": 1}')
    assert completed_steps(str(tmp_path)) == [2, 10]
    assert resolve_load("latest", str(tmp_path)).endswith("step_10")
    assert resolve_load("latest", str(tmp_path / "fresh")) is None
    with pytest.raises(CheckpointError, match="not a megaswift checkpoint"):
        resolve_load(str(root / "step_11"), str(tmp_path))


def test_flops_per_token_counts_weights_and_attention():
    from megaswift.models.config import ModelConfig

    cfg = ModelConfig(family="llama", vocab_size=100, hidden_size=8, ffn_hidden_size=16, num_layers=1,
                      num_attention_heads=2, num_query_groups=1, kv_channels=4)
    weights = 8 * (2 + 2) * 4 + 2 * 4 * 8 + 3 * 8 * 16 + 8 * 100
    assert train_flops_per_token(cfg, 10) == 6 * (weights + 1 * 2 * 2 * 4 * 5)


def test_prune_never_deletes_the_newest_checkpoint_checked_finite(tmp_path):
    from megaswift.checkpoint.train_state import prune

    root = tmp_path / "checkpoints"
    for step, finite in ((1, True), (2, True), (3, None), (4, None)):  # 3, 4: saved by an older version
        (root / f"step_{step}").mkdir(parents=True)
        meta = {"format": 1, **({"finite": True} if finite else {})}
        (root / f"step_{step}" / "megaswift.json").write_text(json.dumps(meta))
    prune(str(tmp_path), keep=2)
    assert completed_steps(str(tmp_path)) == [2, 3, 4]  # keep 2, and step 2: the newest checked finite
    prune(str(tmp_path), keep=1)
    assert completed_steps(str(tmp_path)) == [2, 4]


def test_summary_of_a_run_without_a_finite_loss(tmp_path):
    from megaswift.train.metrics import format_summary

    log = MetricsLogger(str(tmp_path), total_steps=2, enabled=True)
    for s in (1, 2):
        log.log({**_row(s, float("nan")), "skipped": 1, "skipped_steps": s})
    summary = log.summary()
    log.close()
    assert summary["min_loss"] is None and summary["skipped_steps"] == 2
    text = format_summary("sft", summary, load_config())
    assert "min n/a: no finite loss), 2 non-finite step(s) skipped" in text


def test_a_resumed_run_drops_the_rows_after_its_checkpoint(tmp_path):
    """The run that saved step 2 went on to step 4 before it died; resuming at step 2 must not
    leave steps 3 and 4 in the file twice."""
    log = MetricsLogger(str(tmp_path), total_steps=4, enabled=True)
    for s in (1, 2, 3, 4):
        log.log(_row(s, 1.0))
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss"')  # torn by the kill
    log = MetricsLogger(str(tmp_path), total_steps=4, enabled=True, resumed_at=2)
    for s in (3, 4):
        log.log(_row(s, 2.0))
    log.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]


def test_what_interrupted_saves_left_is_removed_at_the_start(tmp_path):
    from megaswift.checkpoint.train_state import clean_interrupted_saves

    root = tmp_path / "checkpoints"
    for name in ("step_2", "step_4.tmp", "step_3.old", "step_5"):
        (root / name).mkdir(parents=True)
    (root / "step_2" / "megaswift.json").write_text("{}")
    assert clean_interrupted_saves(str(tmp_path)) == ["step_3.old", "step_4.tmp"]
    assert sorted(os.listdir(root)) == ["step_2", "step_5"]


REAL_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "data", "real_configs")


@pytest.mark.parametrize("name", ["Qwen3-Next-80B-A3B-Instruct", "gpt-oss-120b"])
def test_flops_per_token_matches_an_independent_count(tmp_path, name):
    """train_flops_per_token (MFU's numerator) against a count made without megaswift's
    arithmetic, on the published config cut to 4 layers (Qwen3-Next: 3 Gated DeltaNet layers and
    1 gated attention; gpt-oss: sliding-window (128) and full attention alternating) at 4096
    tokens: transformers' model of it built on the meta device, 6 x the weights a token meets in
    a matmul (every matrix but the input embedding and the depthwise conv, no bias; of a stacked
    experts tensor the top-k share), plus 6 x each layer's core: attention's q.k and p.v over the
    keys its causal (and windowed) mask shows, counted; the delta rule's matmuls as torch's FLOP
    counter counts them in megaswift's chunked kernel, with the triangular solve (which the
    counter skips) at C^2 / 3 per token and value head."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForCausalLM

    from megaswift.convert.families import family_for
    from megaswift.kernels.gated_delta import gated_delta_rule

    seq, layers = 4096, 4
    raw = json.load(open(os.path.join(REAL_CONFIGS, name, "config.json")))
    raw["num_hidden_layers"] = layers
    if "layer_types" in raw:
        raw["layer_types"] = raw["layer_types"][:layers]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = AutoConfig.from_pretrained(str(tmp_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    experts, topk = hf.num_local_experts if name.startswith("gpt") else hf.num_experts, hf.num_experts_per_tok
    weights = sum(p.numel() * (topk / experts if ".experts." in n else 1) for n, p in model.named_parameters()
                  if p.dim() >= 2 and "embed_tokens" not in n and "conv1d" not in n and not n.endswith("bias"))

    types = hf.layer_types
    core = 0.0
    for t in types:
        if t == "linear_attention":
            hk, hv = hf.linear_num_key_heads, hf.linear_num_value_heads
            dk, dv, r, s = hf.linear_key_head_dim, hf.linear_value_head_dim, hv // hk, 256
            q, k = torch.randn(1, s, 1, dk), torch.randn(1, s, 1, dk)
            v, g, beta = torch.randn(1, s, r, dv), -torch.rand(1, s, r), torch.rand(1, s, r)
            with FlopCounterMode(display=False) as counter:  # one key head and its r value heads
                gated_delta_rule(q, k, v, g, beta, backend="torch")
            C = 64
            core += hv * (counter.get_total_flops() / 2 / (s * r) + C * C / 3)
        else:
            i = torch.arange(seq)
            visible = i[None, :] <= i[:, None]
            if t == "sliding_attention":
                visible &= i[:, None] - i[None, :] < hf.sliding_window
            core += hf.num_attention_heads * 2 * hf.head_dim * visible.sum().item() / seq
    assert len(types) == layers and {"linear_attention", "sliding_attention"} & set(types)

    mc = family_for(raw).model_config(raw, 128)
    # they differ by the masks' half key per query: s/2 (and w - w^2 / 2s) against the mask's
    # (s + 1) / 2 (and w - w (w - 1) / 2s) keys, 7e-6 of the total here
    assert train_flops_per_token(mc, seq) == pytest.approx(6 * (weights + core), rel=2e-5)
