"""LoRA on the parallel layers: layouts equal the single-process run, a LoRA checkpoint holds the
adapters and their optimizer state only and resumes, and both exports (merged weights; a PEFT
adapter loaded with peft on the HF base) give the LoRA model's logits.

Tolerances: training parity rtol 1e-5 on loss and grad norm over 5 steps (fp32); logits of the
exports within 1e-4 absolute (fp32, measured about 1e-6).
"""
import json
import os

import numpy as np
import pytest
import torch

from tests.helpers.train import run_steps, run_train, write_chat_data
from megaswift.testing.dist import run_distributed

RTOL = 1e-5
LORA = {"model__lora__rank": 4, "model__lora__alpha": 8.0, "optim__lr": 0.02}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(str(tmp_path_factory.mktemp("lora") / "train.jsonl"))


# name -> (family, world, overrides)
LAYOUTS = {
    "tp2": ("llama", 2, {"parallel__tp": 2}),
    "tp4_kv_replicated_sp": ("llama", 4, {"parallel__tp": 4, "parallel__sp": True}),
    "pp2_tied": ("qwen2", 2, {"parallel__pp": 2}),
    "dp2_zero1": ("qwen3", 2, {"optim__zero": 1}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lora_sft_matches_single_process(name, tiny_hf, data, tmp_path):
    family, world, overrides = LAYOUTS[name]
    want = run_steps(0, 1, tiny_hf[family], data, str(tmp_path / "one"), **LORA)
    got = run_distributed(run_steps, world, tiny_hf[family], data, str(tmp_path / "many"), **LORA, **overrides)[0]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=RTOL, err_msg=key)
    assert want[-1]["loss"] < want[0]["loss"]


def test_lora_on_experts_matches_single_process(moe_hf, data, tmp_path):
    """all-linear adapts the grouped experts too; at ep=2 x etp=2 each expert's adapter is split
    with its expert."""
    hf = moe_hf["qwen3_moe"]
    want = run_steps(0, 1, hf, data, str(tmp_path / "one"), train__micro_batch_size=8, **LORA)
    got = run_distributed(run_steps, 4, hf, data, str(tmp_path / "many"), parallel__ep=2, parallel__etp=2, **LORA)[0]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=RTOL, err_msg=key)


def test_lora_on_routed_experts_only(moe_hf, data, tmp_path):
    """Mixtral (every layer MoE) with adapters on linear_fc1 only: the only trainable weights are
    expert adapters, so the dense data-parallel part holds nothing (it used to crash the grad
    norm); ep=2 equals one process."""
    hf = moe_hf["mixtral"]
    only = {**LORA, "model__lora__targets": "[linear_fc1]"}
    want = run_steps(0, 1, hf, data, str(tmp_path / "one"), train__micro_batch_size=8, **only)
    got = run_distributed(run_steps, 2, hf, data, str(tmp_path / "many"), parallel__ep=2,
                          train__micro_batch_size=4, **only)[0]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=RTOL, err_msg=key)
    assert want[-1]["loss"] < want[0]["loss"]


def _dcp_keys(path):
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


def _size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _elements(path):
    import math

    import torch.distributed.checkpoint as dcp

    return sum(math.prod(m.size) for m in dcp.FileSystemReader(path).read_metadata().state_dict_metadata.values())


@pytest.fixture(scope="module")
def lora_run(tiny_hf, data, tmp_path_factory):
    """5 LoRA steps at tp=2 on qwen2 (tied embeddings, QKV bias), checkpoint at 3 and 5."""
    out = str(tmp_path_factory.mktemp("lora_run"))
    metrics = run_distributed(run_train, 2, tiny_hf["qwen2"], data, out, parallel__tp=2, checkpoint__every=3,
                              **LORA)[0]
    return out, metrics


def test_lora_checkpoint_holds_adapters_only_and_resumes(lora_run, tiny_hf, data, tmp_path):
    out, want = lora_run
    step5 = os.path.join(out, "checkpoints", "step_5")
    weights, optim = _dcp_keys(os.path.join(step5, "model")), _dcp_keys(os.path.join(step5, "optim"))
    assert weights and all(".lora." in k for k in weights)
    assert optim == {f"{s}/{k}" for s in ("exp_avg", "exp_avg_sq") for k in weights}
    full = str(tmp_path / "full")
    run_train(0, 1, tiny_hf["qwen2"], data, full, train__steps=1)
    full1 = os.path.join(full, "checkpoints", "step_1")
    elements = sum(_elements(os.path.join(step5, d)) for d in ("model", "optim")) / sum(
        _elements(os.path.join(full1, d)) for d in ("model", "optim"))
    size = sum(_size(os.path.join(step5, d)) for d in ("model", "optim")) / sum(
        _size(os.path.join(full1, d)) for d in ("model", "optim"))
    print(f"LoRA / full checkpoint, weights + optimizer state: {elements:.4f} of the elements, {size:.4f} of the bytes")
    assert elements < 0.1 and size < 0.2
    got = run_train(0, 1, tiny_hf["qwen2"], data, str(tmp_path / "resumed"),
                    checkpoint__load=os.path.join(out, "checkpoints", "step_3"), **LORA)
    assert [m["step"] for m in got] == [4, 5]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want[3:]], rtol=RTOL, err_msg=key)


def _lora_logits(ckpt, hf_dir, tokens):
    from megaswift.checkpoint.model_state import load_model, read_meta
    from megaswift.setup import hf_model_config
    from megaswift.config import load_config
    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.convert.verify import megaswift_logits
    from megaswift.models.decoder import GPTModel

    lora = read_meta(ckpt)["lora"]
    model = GPTModel(hf_model_config(hf_dir, load_config()))
    load_hf_into_model(model, hf_dir)
    model.add_lora(lora["rank"], lora["alpha"], 0.0, lora["targets"])
    load_model(model, ckpt)
    return megaswift_logits(model, tokens)


def test_exports_give_the_lora_models_logits(lora_run, tiny_hf, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megaswift.convert.hf_export import export_hf

    out, _ = lora_run
    ckpt, hf_dir = os.path.join(out, "checkpoints", "step_5"), tiny_hf["qwen2"]
    tokens = torch.randint(0, 1001, (2, 24), generator=torch.Generator().manual_seed(0))
    want = _lora_logits(ckpt, hf_dir, tokens)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        moved = (base(tokens).logits - want).abs().max().item()
    assert moved > 1e-3, "the adapters did not change the model: the export checks would prove nothing"
    merged_dir, adapter_dir = str(tmp_path / "merged"), str(tmp_path / "adapter")
    export_hf(ckpt, merged_dir, merge_lora=True)
    export_hf(ckpt, adapter_dir)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        assert sorted(json.load(f)["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                          "up_proj", "v_proj"]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, want, rtol=0, atol=1e-4)
        torch.testing.assert_close(peft(tokens).logits, want, rtol=0, atol=1e-4)
