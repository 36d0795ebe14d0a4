"""GRPO on the parallel layouts: with sampling seeded per completion, 3 update steps at tp=2,
dp=2 (ZeRO-1), pp=2 and cp=2 sample the same completions and give the single-process losses,
gradient norms, rewards and clip fractions within fp32 tolerance (rtol 1e-5); the variants (KL to
a frozen copy or to the LoRA base, GSPO, several updates per rollout) too. The loss, near zero
at the first update, is compared with atol 1e-6 (see ATOL)."""
import numpy as np
import pytest

from tests.helpers.train import run_grpo_steps, write_prompt_data
from megaswift.testing.dist import run_distributed

RTOL = 1e-5
# the loss is a sum of O(1) terms that nearly cancel (advantages sum to zero in every group), so
# its fp32 rounding is absolute: about 1e-7 whatever its value
ATOL = {"loss": 1e-6}
KEYS = ("loss", "grad_norm", "reward", "reward_std", "advantages/std", "completions/mean_length")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_prompt_data(str(tmp_path_factory.mktemp("grpo") / "prompts.jsonl"))


LAYOUTS = {
    "tp2": ("llama", {"parallel__tp": 2}, {}),
    "dp2_zero1": ("qwen3", {"optim__zero": 1}, {}),
    "pp2_tied": ("qwen2", {"parallel__pp": 2}, {}),
    "cp2_kl_copy": ("llama", {"parallel__cp": 2}, {"grpo__beta": 0.1, "grpo__loss_type": "grpo"}),
    "tp2_sp_gspo_iterations": ("qwen3", {"parallel__tp": 2, "parallel__sp": True},
                               {"grpo__importance_sampling_level": "sequence", "grpo__num_iterations": 2,
                                "grpo__loss_type": "dr_grpo", "optim__lr": 3e-4}),
    "tp2_lora_kl_adapters": ("qwen2", {"parallel__tp": 2},
                             {"model__lora__rank": 4, "optim__lr": 0.02, "grpo__beta": 0.1,
                              "grpo__scale_rewards": "batch"}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_grpo_matches_single_process(name, tiny_hf, data, tmp_path):
    family, layout, common = LAYOUTS[name]
    want = run_grpo_steps(0, 1, tiny_hf[family], data, str(tmp_path / "one"), **common)
    got = run_distributed(run_grpo_steps, 2, tiny_hf[family], data, str(tmp_path / "two"), **layout, **common)
    keys = KEYS + (("kl",) if "grpo__beta" in common else ()) + ("clip_ratio/region",)
    for rank_metrics in got:
        for key in keys:
            np.testing.assert_allclose([m[key] for m in rank_metrics], [m[key] for m in want], rtol=RTOL,
                                       atol=ATOL.get(key, 1e-7), err_msg=key)
    assert all(m["rollout/logp_diff_max"] < 1e-4 for m in want)
    # the loss value is ~0 at ratio 1 (advantages sum to zero per group); the gradients are not
    assert all(m["grad_norm"] > 1e-3 for m in want) and len({round(m["grad_norm"], 6) for m in want}) == 3
    if "grpo__num_iterations" in common:  # the second update on a rollout batch moved off the ratio 1
        assert want[1]["clip_ratio/region"] > 0 or abs(want[1]["loss"] - want[0]["loss"]) > 1e-6


@pytest.mark.parametrize("layout, rows", [({"parallel__ep": 2}, 4), ({"parallel__tp": 2}, 8)])
def test_grpo_on_experts_matches_single_process(moe_hf, data, tmp_path, layout, rows):
    """qwen3_moe (load-balancing loss on): at ep=2 the dp ranks generate different rows and must
    run the same number of decode steps (the token exchange is collective); at tp=2 generation
    routes every token on both ranks. Compared with one process whose micro batch holds the same
    rows, so the auxiliary loss sees the same global micro batch."""
    hf = moe_hf["qwen3_moe"]
    want = run_grpo_steps(0, 1, hf, data, str(tmp_path / "one"), train__micro_batch_size=8)
    got = run_distributed(run_grpo_steps, 2, hf, data, str(tmp_path / "two"), train__micro_batch_size=rows,
                          **layout)
    for rank_metrics in got:
        for key in KEYS + ("moe_aux_loss",):
            np.testing.assert_allclose([m[key] for m in rank_metrics], [m[key] for m in want], rtol=RTOL,
                                       atol=ATOL.get(key, 1e-7), err_msg=key)


def test_a_reward_failing_on_one_rank_stops_every_rank_with_its_message(tiny_hf, data, tmp_path):
    from tests.helpers.train import GRPO_REWARDS

    with pytest.raises(RuntimeError) as e:
        run_distributed(run_grpo_steps, 2, tiny_hf["llama"], data, str(tmp_path), steps=1, timeout_s=120,
                        grpo__reward_funcs=f"[{GRPO_REWARDS}:fails_on_rank_one]")
    text = str(e.value)
    assert "grpo_rewards.py:fails_on_rank_one raised RuntimeError: judge unreachable" in text
    assert "timed out" not in text.lower()
