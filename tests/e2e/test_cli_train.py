"""`megaswift train sft` as a user runs it: under launch at tp=2, with an HF export at the end that
transformers loads and that equals the trained checkpoint; and its error paths."""
import json
import os

import torch
import yaml

from helpers_train import train_config, write_chat_data
from test_cli_convert import megaswift, tensors


def _config(tmp_path, hf_dir, **overrides):
    data = write_chat_data(str(tmp_path / "data" / "train.jsonl"))
    cfg = train_config(hf_dir, data, str(tmp_path / "run"), **overrides).to_dict()
    path = str(tmp_path / "sft.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def test_train_tp2_exports_a_model_transformers_loads(tiny_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _config(tmp_path, tiny_hf["qwen3"])
    proc = megaswift("launch", "--nproc-per-node", "2", "--", "train", "sft", "--config", cfg, "--parallel.tp", "2",
                     "--train.steps", "4", "--checkpoint.every", "1", "--checkpoint.keep", "2",
                     "--checkpoint.export_hf", "true")
    run = tmp_path / "run"
    assert "megaswift sft: 4 steps" in proc.stdout, proc.stdout + proc.stderr
    assert sorted(os.listdir(run / "checkpoints")) == ["step_3", "step_4"]  # keep=2
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    # the export holds the trained weights, not the initial ones
    trained, initial = tensors(str(run / "hf")), tensors(tiny_hf["qwen3"])
    assert set(trained) == set(initial)
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    assert trained["model.embed_tokens.weight"].dtype == initial["model.embed_tokens.weight"].dtype
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()
    # export-hf on any training checkpoint gives the same tensors as the end-of-run export
    megaswift("export-hf", str(run / "checkpoints" / "step_4"), str(tmp_path / "again"))
    again = tensors(str(tmp_path / "again"))
    assert all(torch.equal(again[k], trained[k]) for k in trained)


def test_malformed_row_names_file_and_line(tiny_hf, tmp_path):
    cfg = _config(tmp_path, tiny_hf["llama"])
    data = tmp_path / "data" / "train.jsonl"
    lines = data.read_text().splitlines()
    lines[6] = '{"messages": [{"role": "user", "content": "hi"}'  # truncated JSON on line 7
    data.write_text("\n".join(lines) + "\n")
    proc = megaswift("train", "sft", "--config", cfg, check=False)
    assert proc.returncode == 2
    assert f"{data}:7" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_bad_batch_layout_fails_before_spawning(tiny_hf, tmp_path):
    cfg = _config(tmp_path, tiny_hf["llama"])
    proc = megaswift("launch", "--nproc-per-node", "2", "--", "train", "sft", "--config", cfg,
                     "--train.global_batch_size", "6", "--train.micro_batch_size", "2", check=False)
    assert proc.returncode == 2
    assert "global_batch_size=6" in proc.stderr and "2 x 2 = 4" in proc.stderr, proc.stderr
    assert proc.stderr.count("megaswift: error") == 1


def test_float16_training_is_refused_before_spawning(tiny_hf, tmp_path):
    """No loss scaling: float16 gradients would underflow silently, so the plan refuses it."""
    cfg = _config(tmp_path, tiny_hf["llama"])
    proc = megaswift("launch", "--nproc-per-node", "2", "--", "train", "sft", "--config", cfg,
                     "--model.dtype", "float16", check=False)
    assert proc.returncode == 2
    assert "model.dtype=float16 cannot train" in proc.stderr and "use bfloat16" in proc.stderr, proc.stderr
    assert proc.stderr.count("megaswift: error") == 1 and "Traceback" not in proc.stderr
