"""KTO on the parallel layouts: 5 steps at tp=2, dp=2 (ZeRO-1, two micro batches per rank),
pp=2 and cp=2 give the single-process losses, gradient norms, z0 (kl) and metrics within fp32
tolerance (rtol 1e-5), and so does Qwen3-MoE at ep=2. z0 is the mean over the whole global
batch's KL rows (all-reduced over dp, and pp), so dp parity holds only if it is: the steps checked
include ones where z0 > 0 (a per-rank or per-micro-batch mean would differ there)."""
import numpy as np
import pytest

from megaswift.testing.dist import run_distributed
from tests.unit.test_kto import run_kto_steps, write_kto_data

RTOL = 1e-5
KEYS = ("loss", "grad_norm", "logps/chosen", "logps/rejected")
NEAR_ZERO = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins")  # differences of sums near -50


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_kto_data(str(tmp_path_factory.mktemp("kto") / "kto.jsonl"))


@pytest.fixture(scope="module")
def reference(tiny_hf, data, tmp_path_factory):
    """The single-process run every dense layout is compared with (llama, 4 micro batches)."""
    want = run_kto_steps(0, 1, tiny_hf["llama"], data, str(tmp_path_factory.mktemp("one")))
    assert any(m["kl"] > 1e-4 for m in want), [m["kl"] for m in want]  # z0 is exercised
    return want


def _compare(got, want, extra=()):
    for rank_metrics in got:
        for key in KEYS + tuple(extra):
            np.testing.assert_allclose([m[key] for m in rank_metrics], [m[key] for m in want], rtol=RTOL,
                                       err_msg=key)
        for key in NEAR_ZERO:
            np.testing.assert_allclose([m[key] for m in rank_metrics], [m[key] for m in want], rtol=0, atol=1e-5,
                                       err_msg=key)
        for key in ("count/desirable", "count/undesirable"):
            assert [m[key] for m in rank_metrics] == pytest.approx([m[key] for m in want])


LAYOUTS = {
    "tp2": {"parallel__tp": 2},
    "dp2_zero1": {"optim__zero": 1},
    "pp2": {"parallel__pp": 2},
    "cp2": {"parallel__cp": 2},
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_kto_matches_single_process(name, tiny_hf, data, reference, tmp_path):
    got = run_distributed(run_kto_steps, 2, tiny_hf["llama"], data, str(tmp_path / "two"), **LAYOUTS[name])
    _compare(got, reference)


def test_kto_on_experts_matches_single_process(moe_hf, data, tmp_path):
    """qwen3_moe at ep=2 (dp=2, one micro batch each) against one process with both halves in
    one micro batch, so the load-balancing loss sees the same global micro batch."""
    hf = moe_hf["qwen3_moe"]
    want = run_kto_steps(0, 1, hf, data, str(tmp_path / "one"), train__micro_batch_size=8)
    got = run_distributed(run_kto_steps, 2, hf, data, str(tmp_path / "two"), parallel__ep=2,
                          train__micro_batch_size=4)
    _compare(got, want, extra=("moe_aux_loss",))
