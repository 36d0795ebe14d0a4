"""Pipeline parallelism equals the single-process run: 5 optimizer steps, same losses and
gradient norms, fp32, relative 1e-5 (as the other layouts in test_train_parity.py).

The models have 8 layers so every schedule has layers to cut: pp=4 runs 2 per stage, pp=2 x
vpp=2 and zbv (2 stages per rank) 2 per stage. global_batch_size 8 / micro_batch_size 2 gives 4
micro batches per step at dp=1 (2 at dp=2), enough for 1F1B at pp=4.
"""
import numpy as np
import pytest

from tests.helpers.train import run_steps, write_chat_data
from megaswift.testing.dist import run_distributed

RTOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(str(tmp_path_factory.mktemp("pp") / "train.jsonl"))


@pytest.fixture(scope="module")
def reference(deep_hf, data, tmp_path_factory):
    """family -> the single-process run, computed once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = run_steps(0, 1, deep_hf[family], data, str(tmp_path_factory.mktemp("ref")))
        return cache[family]
    return get


def _assert_same(got, want):
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=RTOL, err_msg=key)
    assert [m["loss_tokens"] for m in got] == [m["loss_tokens"] for m in want]


# name -> (family, world, overrides); qwen2 ties the embeddings
LAYOUTS = {
    "pp2": ("llama", 2, {"parallel__pp": 2}),
    "pp4": ("llama", 4, {"parallel__pp": 4}),
    "pp2_tp2_sp": ("llama", 4, {"parallel__pp": 2, "parallel__tp": 2, "parallel__sp": True}),
    "pp2_dp2_zero1": ("llama", 4, {"parallel__pp": 2, "optim__zero": 1, "parallel__ddp_bucket_size": 30000}),
    "pp2_vpp2": ("llama", 2, {"parallel__pp": 2, "parallel__vpp": 2, "parallel__pp_schedule": "interleaved"}),
    "pp2_zbv": ("llama", 2, {"parallel__pp": 2, "parallel__pp_schedule": "zbv"}),
    "pp2_uneven": ("llama", 2, {"parallel__pp": 2, "parallel__pp_layers": "[3,5]"}),
    "pp2_tied": ("qwen2", 2, {"parallel__pp": 2}),
    "pp2_zbv_tied": ("qwen2", 2, {"parallel__pp": 2, "parallel__pp_schedule": "zbv"}),
    "pp2_recompute_accum": ("qwen2", 2, {"parallel__pp": 2, "train__recompute": "full",
                                         "train__micro_batch_size": 1}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_matches_single_process(name, reference, deep_hf, data, tmp_path):
    family, world, overrides = LAYOUTS[name]
    want = reference(family)
    results = run_distributed(run_steps, world, deep_hf[family], data, str(tmp_path), **overrides)
    for got in results:  # every rank reports the same global figures
        _assert_same(got, want)
        assert all(0.0 <= m["pp_bubble"] < 1.0 for m in got)
        assert len(got[0]["pp_stage_compute_s"]) == overrides["parallel__pp"]


def _logits(rank, world, hf, schedule, vpp):
    import torch

    from megaswift.config import load_config
    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.convert.verify import megaswift_logits
    from megaswift.models.pipeline_model import PipelineModel
    from megaswift.parallel.layout import Layout
    from megaswift.parallel.state import ParallelState
    from megaswift.setup import hf_model_config

    cfg = hf_model_config(hf, load_config())
    st = ParallelState.build(Layout(world_size=world, pp=world))
    model = PipelineModel(cfg, st, schedule=schedule, vpp=vpp)
    load_hf_into_model(model, hf)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return megaswift_logits(model, tokens)


@pytest.mark.parametrize("schedule,vpp", [("interleaved", 2), ("zbv", 2)])
def test_pipeline_inference_matches_whole_model(deep_hf, schedule, vpp):
    """The schedule-free forward (verify, evaluation) for the multi-stage-per-rank placements:
    interleaved ends on the last pp rank, zbv on pp rank 0."""
    import torch

    want = _logits(0, 1, deep_hf["llama"], "1f1b", 1)
    got = run_distributed(_logits, 2, deep_hf["llama"], schedule, vpp)
    holder = 0 if schedule == "zbv" else 1
    assert got[1 - holder] is None
    torch.testing.assert_close(got[holder], want, rtol=1e-5, atol=1e-5)


def _device_syncs_of_pipeline_steps(rank, world, hf, data, out):
    """device.synchronize() calls during two pp=2 steps: on CUDA each one stops the host from
    queuing the next chunk's kernels and transfers, so the stage timing must not use them."""
    from megaswift import device

    calls = []
    device.synchronize = lambda: calls.append(1)
    run_steps(rank, world, hf, data, out, steps=2, parallel__pp=2)
    return len(calls)


def test_pipeline_times_its_stages_without_device_syncs(deep_hf, data, tmp_path):
    assert run_distributed(_device_syncs_of_pipeline_steps, 2, deep_hf["llama"], data, str(tmp_path)) == [0, 0]
