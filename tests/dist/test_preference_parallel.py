"""The reference-free preference losses (dpo.loss_type simpo, cpo, orpo) on the parallel layouts:
5 steps (4 pairs each) at tp=2, dp=2 (ZeRO-1), pp=2 (tied embeddings), cp=2 and, on qwen3_moe, ep=2 give the
single-process losses, gradient norms, log-probabilities and NLL within fp32 tolerance (rtol
1e-5). One launch per layout runs all three losses in turn; each single-process reference runs
once per model family (module-scoped). Rewards and the log-odds are small differences of fp32
sums, compared with atol 1e-5 as in test_dpo_parallel.py."""
import numpy as np
import pytest

from tests.dist.test_dpo_parallel import RTOL
from tests.helpers.train import run_dpo_steps, write_preference_data
from megaswift.testing.dist import run_distributed

LOSSES = {
    "simpo": {"dpo__loss_type": "simpo", "dpo__beta": 2.0, "dpo__simpo_gamma": 0.5, "dpo__cpo_alpha": 0.3},
    "cpo": {"dpo__loss_type": "cpo", "dpo__beta": 0.1},
    "orpo": {"dpo__loss_type": "orpo", "dpo__beta": 0.25},
}
KEYS = ("loss", "grad_norm", "logps/chosen", "logps/rejected", "nll_loss")
SMALL = ("rewards/chosen", "rewards/rejected", "rewards/margins", "log_odds_ratio", "log_odds_chosen")

LAYOUTS = {
    "tp2": ("llama", {"parallel__tp": 2}),
    "dp2_zero1": ("qwen3", {"optim__zero": 1}),
    "pp2_tied": ("qwen2", {"parallel__pp": 2}),
    "cp2": ("llama", {"parallel__cp": 2}),
    "ep2": ("qwen3_moe", {"parallel__ep": 2}),
}
STEP = {"train__global_batch_size": 4}  # 4 pairs a step (2 a micro batch) keeps the 15 runs short


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_preference_data(str(tmp_path_factory.mktemp("pref") / "pairs.jsonl"))


def run_losses(rank, world, hf_dir, data, output_dir, **overrides) -> dict:
    """Each loss type's per-step metrics, one trainer after another in the same processes."""
    return {name: run_dpo_steps(rank, world, hf_dir, data, f"{output_dir}/{name}", **extra, **STEP, **overrides)
            for name, extra in LOSSES.items()}


@pytest.fixture(scope="module")
def single(tiny_hf, moe_hf, data, tmp_path_factory):
    """family -> the single-process metrics of every loss (computed on first use)."""
    cache = {}

    def get(family):
        if family not in cache:
            out = str(tmp_path_factory.mktemp(f"one_{family}"))
            if family == "qwen3_moe":  # both dp halves in one micro batch: the same global MoE statistics
                cache[family] = run_losses(0, 1, moe_hf[family], data, out, train__micro_batch_size=4)
            else:
                cache[family] = run_losses(0, 1, tiny_hf[family], data, out)
        return cache[family]
    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_reference_free_losses_match_single_process(name, single, tiny_hf, moe_hf, data, tmp_path):
    family, layout = LAYOUTS[name]
    hf = moe_hf[family] if family == "qwen3_moe" else tiny_hf[family]
    want = single(family)
    got = run_distributed(run_losses, 2, hf, data, str(tmp_path / "two"), **layout)
    for loss_type in LOSSES:
        w = want[loss_type]
        keys = KEYS + (("moe_aux_loss",) if family == "qwen3_moe" else ())
        for rank_metrics in got:
            m = rank_metrics[loss_type]
            for key in keys:
                np.testing.assert_allclose([s[key] for s in m], [s[key] for s in w], rtol=RTOL,
                                           err_msg=f"{loss_type} {key}")
            for key in SMALL:
                if key in w[0]:
                    np.testing.assert_allclose([s[key] for s in m], [s[key] for s in w], rtol=0, atol=1e-5,
                                               err_msg=f"{loss_type} {key}")
            assert [s["rewards/accuracies"] for s in m] == [s["rewards/accuracies"] for s in w], loss_type
        assert ("log_odds_ratio" in w[0]) == (loss_type == "orpo")
