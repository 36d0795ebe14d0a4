"""SFT on several ranks equals SFT in one process: 5 optimizer steps, same losses and grad norms.

Each layout runs the same global batches (the loader's items do not depend on dp or micro batch
size) and the loss is normalised by the loss tokens of the whole global batch, so the single
process run is the reference for every layout. Tolerance: fp32, relative 1e-5 on the loss and
the global gradient norm of every step (after 4 AdamW updates, so the weights are compared too).
"""
import numpy as np
import pytest

from tests.helpers.train import run_steps, write_chat_data
from megaswift.testing.dist import run_distributed

RTOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(str(tmp_path_factory.mktemp("sft") / "train.jsonl"))


def _series(metrics, key):
    return np.array([m[key] for m in metrics])


def _assert_same(got, want):
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(_series(got, key), _series(want, key), rtol=RTOL, err_msg=key)
    assert [m["loss_tokens"] for m in got] == [m["loss_tokens"] for m in want]


def _reference(hf, data, out, **overrides):
    return run_steps(0, 1, hf, data, str(out), **overrides)


# (family, world, overrides): mistral has one KV head, replicated at tp=2 (its KV gradients and
# norm counting are the awkward case); qwen2 ties the embeddings and has QKV biases.
LAYOUTS = {
    "tp2": ("mistral", 2, {"parallel__tp": 2}),
    "dp2": ("llama", 2, {}),
    "tp2_dp2_sp": ("qwen2", 4, {"parallel__tp": 2, "parallel__sp": True}),
    "dp2_zero1_buckets": ("qwen3", 2, {"optim__zero": 1, "parallel__ddp_bucket_size": 30000}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, tiny_hf, data, tmp_path):
    family, world, overrides = LAYOUTS[name]
    want = _reference(tiny_hf[family], data, tmp_path / "ref")
    results = run_distributed(run_steps, world, tiny_hf[family], data, str(tmp_path / "par"), **overrides)
    for got in results:  # every rank reports the same global figures
        _assert_same(got, want)


def test_zero1_matches_plain_dp(tiny_hf, data, tmp_path):
    plain = run_distributed(run_steps, 2, tiny_hf["llama"], data, str(tmp_path / "a"))
    zero = run_distributed(run_steps, 2, tiny_hf["llama"], data, str(tmp_path / "b"), optim__zero=1,
                           parallel__ddp_bucket_size=20000)
    _assert_same(zero[0], plain[0])


def test_grad_accumulation_matches_one_big_micro_batch(tiny_hf, data, tmp_path):
    accumulated = _reference(tiny_hf["llama"], data, tmp_path / "a", train__micro_batch_size=2)  # 4 micro batches
    whole = _reference(tiny_hf["llama"], data, tmp_path / "b", train__micro_batch_size=8)
    _assert_same(accumulated, whole)


def test_packing_changes_batches_but_trains(tiny_hf, data, tmp_path):
    """Packing puts several samples in a row: fewer, fuller rows, and the loss still falls."""
    packed = _reference(tiny_hf["llama"], data, tmp_path / "p", data__packing=True)
    plain = _reference(tiny_hf["llama"], data, tmp_path / "u")
    assert sum(m["loss_tokens"] for m in packed) > sum(m["loss_tokens"] for m in plain)
    assert packed[-1]["loss"] < packed[0]["loss"]


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_matches_no_recompute(mode, tiny_hf, data, tmp_path):
    want = _reference(tiny_hf["qwen3"], data, tmp_path / "a")
    got = _reference(tiny_hf["qwen3"], data, tmp_path / "b", train__recompute=mode)
    _assert_same(got, want)
