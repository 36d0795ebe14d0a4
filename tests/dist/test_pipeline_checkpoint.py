"""Checkpoints under pipeline parallelism: each stage saves its layers under their global names,
so a pp=2 checkpoint resumes at pp=1 or pp=4, and exports to the same bytes as a pp=1 checkpoint
of the same weights. The model (8 layers, qwen2) ties its embeddings: the checkpoint must hold
one copy although two stages carry it."""
import filecmp
import os

import numpy as np
import pytest

from tests.helpers.train import run_train, write_chat_data
from megaswift.checkpoint.train_state import completed_steps
from megaswift.convert.hf_export import export_hf
from megaswift.testing.dist import run_distributed

PP2 = {"parallel__pp": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(str(tmp_path_factory.mktemp("ppck") / "train.jsonl"))


@pytest.fixture(scope="module")
def straight(deep_hf, data, tmp_path_factory):
    """6 steps at pp=2, saving every 3."""
    out = str(tmp_path_factory.mktemp("straight"))
    metrics = run_distributed(run_train, 2, deep_hf["qwen2"], data, out, train__steps=6, checkpoint__every=3, **PP2)[0]
    return out, metrics


def _losses(metrics, steps):
    by_step = {m["step"]: m for m in metrics}
    return [[by_step[s][k] for s in steps] for k in ("loss", "grad_norm")]


def test_pipeline_metrics_logged(straight):
    _, metrics = straight
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(0.0 <= m["pp_bubble"] < 1.0 and len(m["pp_stage_compute_s"]) == 2 for m in metrics)


@pytest.mark.parametrize("world,overrides", [(1, {}), (4, {"parallel__pp": 4})], ids=["pp1", "pp4"])
def test_resume_at_another_pp_size(straight, deep_hf, data, tmp_path, world, overrides):
    out, want = straight
    step3 = os.path.join(out, "checkpoints", "step_3")
    if world == 1:
        got = run_train(0, 1, deep_hf["qwen2"], data, str(tmp_path), train__steps=6, checkpoint__load=step3)
    else:
        got = run_distributed(run_train, world, deep_hf["qwen2"], data, str(tmp_path), train__steps=6,
                              checkpoint__load=step3, **overrides)[0]
    assert [m["step"] for m in got] == [4, 5, 6]
    np.testing.assert_allclose(_losses(got, (4, 5, 6)), _losses(want, (4, 5, 6)), rtol=1e-5)


def test_resume_same_pp_layout_is_bitwise(straight, deep_hf, data, tmp_path):
    out, want = straight
    run_distributed(run_train, 2, deep_hf["qwen2"], data, str(tmp_path), train__steps=3, **PP2)
    got = run_distributed(run_train, 2, deep_hf["qwen2"], data, str(tmp_path), train__steps=6,
                          checkpoint__load="latest", **PP2)[0]
    assert _losses(got, (4, 5, 6)) == _losses(want, (4, 5, 6))


def _same_files(a: str, b: str) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_export_of_pp2_checkpoint_equals_pp1_export(straight, deep_hf, data, tmp_path):
    """The pp=2 step-3 checkpoint, re-saved by a pp=1 process (a resume that runs no step), gives
    the same exported bytes: the weights, one copy of the tied embedding, the side files."""
    out, _ = straight
    step3 = os.path.join(out, "checkpoints", "step_3")
    resaved = str(tmp_path / "pp1")
    run_train(0, 1, deep_hf["qwen2"], data, resaved, train__steps=3, checkpoint__load=step3)
    assert completed_steps(resaved) == [3]
    export_hf(step3, str(tmp_path / "hf_pp2"))
    export_hf(os.path.join(resaved, "checkpoints", "step_3"), str(tmp_path / "hf_pp1"))
    _same_files(str(tmp_path / "hf_pp2"), str(tmp_path / "hf_pp1"))


def test_zero1_pipeline_checkpoint_resumes_elsewhere(straight, deep_hf, data, tmp_path):
    """Saved at pp=2 x dp=2 with ZeRO-1 (each stage's optimizer state sharded over its dp group),
    resumed in one process: steps 4-6 match the straight pp=2 run."""
    _, want = straight
    first = str(tmp_path / "zero")
    run_distributed(run_train, 4, deep_hf["qwen2"], data, first, train__steps=3, optim__zero=1,
                    parallel__ddp_bucket_size=30000, **PP2)
    got = run_train(0, 1, deep_hf["qwen2"], data, str(tmp_path / "one"), train__steps=6,
                    checkpoint__load=os.path.join(first, "checkpoints", "step_3"))
    np.testing.assert_allclose(_losses(got, (4, 5, 6)), _losses(want, (4, 5, 6)), rtol=1e-5)
