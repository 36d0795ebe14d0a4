"""bf16 autocast, run on the CPU (model.cpu_autocast), in the layouts that move activations.

On CUDA every training run is fp32 master weights under bf16 autocast, and none had ever run
(issue 17): RoPE's fp32 cos/sin turned q and k into fp32 beside a bf16 v, which aten's
memory-efficient kernel reads as garbage. CPU autocast takes the same code path (linears in
bf16, norms and RoPE in fp32, kernels fed one dtype, checked at their entry), so it is tested
here: 5 SFT steps at tp=2, cp=2, pp=2 and ep=2 against the fp32 single-process run, and GRPO's
rollouts, which must pass the weight-sync check at its bf16 tolerance.

Tolerance: the losses of 5 steps (4 AdamW updates in between) within 5e-3 relative of the fp32
run's. Measured on these tiny models: at most 1.2e-4 (tp2+sp), 3.5e-4 (cp2, packed), 7.6e-5
(pp2), 1.7e-4 (ep2), where the fp32 layouts differ from the single process by 3e-7 or less
(ep2: 3.5e-5); every bf16 run must also differ from fp32 by more than 1e-6, or autocast was off.
GRPO: the rollout/trainer log-prob difference was 7e-4 and 1.6e-3 (fp32: 1.5e-7); the check's
bf16 tolerance is 5e-2.
"""
import numpy as np
import pytest
import torch

from tests.helpers.train import run_grpo_steps, run_steps, write_chat_data, write_prompt_data
from megaswift.testing.dist import run_distributed

BF16_RTOL = 5e-3
BF16 = {"model__dtype": "bfloat16", "model__cpu_autocast": True}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(str(tmp_path_factory.mktemp("bf16") / "train.jsonl"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_attention_gets_one_dtype_under_autocast(family, tiny_hf):
    """RoPE's fp32 cos/sin and the q/k norms' fp32 weights must not promote q and k beside the
    bf16 v (kernels/attention.py refuses mixed dtypes, so the forward would raise)."""
    from megaswift.setup import hf_model_config
    from megaswift.config import load_config
    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.models.decoder import GPTModel

    cfg = load_config(None, [], base={"model": {"hf_path": tiny_hf[family]}})
    model = GPTModel(hf_model_config(tiny_hf[family], cfg))
    load_hf_into_model(model, tiny_hf[family])
    ids = torch.arange(32).view(2, 16) % 101
    fp32 = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(ids)
    assert bf16.dtype == torch.bfloat16
    top = fp32.float().softmax(-1)
    assert (bf16.float().softmax(-1) - top).abs().max() < 2e-2


# layout -> (family, world, overrides): qwen3 has q/k norms, qwen2 ties the embeddings (the output
# layer's gradient crosses the pipeline), llama packs documents under cp
LAYOUTS = {
    "tp2_sp": ("qwen3", 2, {"parallel__tp": 2, "parallel__sp": True}),
    "cp2": ("llama", 2, {"parallel__cp": 2, "data__packing": True}),
    "pp2": ("qwen2", 2, {"parallel__pp": 2}),
    "ep2": ("qwen3_moe", 2, {"parallel__ep": 2}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bf16_steps_track_fp32(name, tiny_hf, moe_hf, data, tmp_path):
    family, world, overrides = LAYOUTS[name]
    hf = {**tiny_hf, **moe_hf}[family]
    extra = {k: v for k, v in overrides.items() if k.startswith("data__")}
    fp32 = run_steps(0, 1, hf, data, str(tmp_path / "fp32"), **extra)
    bf16 = run_distributed(run_steps, world, hf, data, str(tmp_path / "bf16"), **overrides, **BF16)[0]
    want, got = (np.array([m["loss"] for m in r]) for r in (fp32, bf16))
    np.testing.assert_allclose(got, want, rtol=BF16_RTOL)
    assert np.abs(got / want - 1).max() > 1e-6  # bf16 really ran
    assert np.isfinite([m["grad_norm"] for m in bf16]).all()
    assert got[-1] < got[0]  # it learns


def test_grpo_rollouts_under_bf16_pass_the_sync_check(tiny_hf, tmp_path):
    """Rollouts sample under the training autocast; the trainer's recomputed log-probs agree
    within the bf16 tolerance (the check raises otherwise), and differ from fp32's exact match."""
    prompts = write_prompt_data(str(tmp_path / "prompts.jsonl"))
    steps = run_grpo_steps(0, 1, tiny_hf["qwen3"], prompts, str(tmp_path / "a"), steps=2, **BF16)
    diffs = [m["rollout/logp_diff_mean"] for m in steps]
    assert all(d < 5e-2 for d in diffs), diffs
    assert max(diffs) > 1e-5, diffs  # fp32 rollouts agree to 1e-7: bf16 really ran
    assert all(np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in steps)
