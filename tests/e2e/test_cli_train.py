"""`megaswift train sft` as a user runs it: under launch at tp=2, with an HF export at the end that
transformers loads and that equals the trained checkpoint; and its error paths."""
import json
import os
import shutil

import torch
import yaml

from tests.helpers.train import train_config, write_chat_data
from tests.helpers.cli import megaswift, megaswift_many, one_line_error
from tests.helpers.hf import tensors


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


def test_export_into_the_source_model_is_refused_at_the_start(tiny_hf, tmp_path):
    """A run whose end-of-training export would fail (or destroy model.hf_path) fails before it
    trains: no metrics, no checkpoint, the source untouched."""
    src = str(tmp_path / "src")  # a copy: a regression would otherwise write into the shared fixture
    shutil.copytree(tiny_hf["llama"], src)
    cfg = _config(tmp_path, src)
    before = {n: os.path.getmtime(os.path.join(src, n)) for n in os.listdir(src)}
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "config.json").write_text("{}")
    *into_source, into_busy = megaswift_many(
        *[("train", "sft", "--config", cfg, "--checkpoint.export_hf", "true", "--checkpoint.export_dir", src, *extra)
          for extra in ([], ["--checkpoint.export_overwrite", "true"])],
        ("launch", "--nproc-per-node", "2", "--", "train", "sft", "--config", cfg,
         "--checkpoint.export_hf", "true", "--checkpoint.export_dir", str(busy)), check=False)
    for proc in into_source:
        one_line_error(proc, f"export directory {src} is the source", "even if you set checkpoint.export_overwrite")
    one_line_error(into_busy, f"export directory {busy} exists and is not empty", "set checkpoint.export_overwrite=true")
    assert not (tmp_path / "run").exists()
    assert {n: os.path.getmtime(os.path.join(src, n)) for n in os.listdir(src)} == before


def test_bad_output_dir_and_adam_values_are_one_line(tiny_hf, tmp_path):
    cfg = _config(tmp_path, tiny_hf["llama"])
    (tmp_path / "taken").write_text("a file")
    taken, beta2 = megaswift_many(("train", "sft", "--config", cfg, "--train.output_dir", str(tmp_path / "taken")),
                                  ("train", "sft", "--config", cfg, "--optim.adam_beta2", "1"), check=False)
    one_line_error(taken, f"{tmp_path / 'taken'} is a file", "choose another train.output_dir")
    one_line_error(beta2, "optim.adam_beta2 must be in [0, 1); got 1")


def test_warmup_past_the_run_warns_once(tiny_hf, tmp_path):
    cfg = _config(tmp_path, tiny_hf["llama"])
    proc = megaswift("launch", "--nproc-per-node", "2", "--", "train", "sft", "--config", cfg,
                     "--train.steps", "1", "--optim.warmup_steps", "4")
    warning = ("megaswift: warning: optim.warmup_steps=4 >= train.steps=1: the run never leaves warmup: its last "
               "step trains at lr 0.00075 of optim.lr=0.003")
    assert proc.stderr.count(warning) == 1, proc.stderr
