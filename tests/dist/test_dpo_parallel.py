"""DPO on the parallel layouts: 5 steps at tp=2, dp=2 (ZeRO-1), pp=2 and cp=2 give the
single-process losses, gradient norms and sequence log-probabilities within fp32 tolerance
(rtol 1e-5); LoRA DPO (reference = the policy with its adapters off) at tp=2 equals LoRA DPO at
tp=1. Rewards are beta x (logp - ref logp), differences of sums near -50 whose fp32 rounding is
about 1e-6 x 50, so they are compared with atol 1e-5."""
import numpy as np
import pytest

from tests.helpers.train import run_dpo_steps, write_preference_data
from megaswift.testing.dist import run_distributed

RTOL = 1e-5
KEYS = ("loss", "grad_norm", "logps/chosen", "logps/rejected")
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_preference_data(str(tmp_path_factory.mktemp("dpo") / "pairs.jsonl"))


LAYOUTS = {
    "tp2": ("llama", {"parallel__tp": 2}, {}),
    "dp2_zero1": ("qwen3", {"optim__zero": 1}, {}),
    "pp2_tied": ("qwen2", {"parallel__pp": 2}, {}),
    "cp2": ("llama", {"parallel__cp": 2}, {}),
    "tp2_precomputed_ref": ("llama", {"parallel__tp": 2}, {"dpo__precompute_ref": True}),
    "tp2_lora_adapters_ref": ("qwen2", {"parallel__tp": 2}, {"model__lora__rank": 4, "optim__lr": 0.02}),
    "ipo_rpo_dp2": ("llama", {}, {"dpo__loss_type": "ipo", "dpo__rpo_alpha": 0.5}),
    "cp2_lora": ("llama", {"parallel__cp": 2}, {"model__lora__rank": 4, "optim__lr": 0.02}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dpo_matches_single_process(name, tiny_hf, data, tmp_path):
    family, layout, common = LAYOUTS[name]
    want = run_dpo_steps(0, 1, tiny_hf[family], data, str(tmp_path / "one"), **common)
    got = run_distributed(run_dpo_steps, 2, tiny_hf[family], data, str(tmp_path / "two"), **layout, **common)
    for rank_metrics in got:
        for key in KEYS:
            np.testing.assert_allclose([m[key] for m in rank_metrics], [m[key] for m in want], rtol=RTOL,
                                       err_msg=key)
        for key in REWARDS:
            np.testing.assert_allclose([m[key] for m in rank_metrics], [m[key] for m in want], rtol=0, atol=1e-5,
                                       err_msg=key)
    assert [m["rewards/accuracies"] for m in got[0]] == [m["rewards/accuracies"] for m in want]
    assert want[0]["loss"] == pytest.approx(0.6931, abs=1e-4) or common.get("dpo__loss_type") == "ipo"


def test_dpo_on_experts_matches_single_process(moe_hf, data, tmp_path):
    """qwen3_moe at ep=2 (dp=2, one micro batch each) against one process with both halves in
    one micro batch, so the load-balancing loss sees the same global micro batch."""
    hf = moe_hf["qwen3_moe"]
    want = run_dpo_steps(0, 1, hf, data, str(tmp_path / "one"), train__micro_batch_size=8)
    got = run_distributed(run_dpo_steps, 2, hf, data, str(tmp_path / "two"), parallel__ep=2,
                          train__micro_batch_size=4)[0]
    for key in KEYS + ("moe_aux_loss",):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=RTOL, err_msg=key)
