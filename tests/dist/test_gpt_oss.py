"""gpt-oss (issue 23) against transformers' GptOss, at the layouts that split it.

The tiny checkpoint alternates sliding-window (8 tokens) and full attention layers, with
attention sinks, q/k/v/o biases and YaRN; its 4 experts (top-2) carry biases, use the clamped
SwiGLU (at a limit of 0.3, which the tiny activations reach, so the clamp is exercised) and are
stored as gpt-oss stores them ([experts, in, out], gate and up interleaved).

`verify` (fp32, reference attention) at tp=2 with SP, ep=2, tp=2 x ep=2, etp=2, pp=2, and cp=2
ring and Ulysses on 48 tokens (longer than the window: windowed and full layers both reach across
the cp ranks); import then export is bitwise and transformers loads the export, and the
in-memory weight stream equals the checkpoint at tp=2 x etp=2; 5 SFT steps equal
one process (rtol 1e-5) at tp=2, dp=2 x ep=2 with ZeRO-1, pp=2 and cp=2, LoRA at tp=2 x ep=2, and
DPO at tp=2 x ep=2; greedy rollouts equal transformers' generate.
"""
import os

import numpy as np
import pytest
import torch

from megaswift.testing.dist import run_distributed
from tests.dist.test_latent_families import _verify


@pytest.fixture(scope="module")
def gpt_oss_hf(tmp_path_factory):
    from megaswift.testing.tiny import make_tiny_hf

    return make_tiny_hf("gpt_oss", str(tmp_path_factory.mktemp("gpt_oss") / "hf"), seed=60)


VERIFY = {
    "tp2_sp": {"parallel.tp": 2, "parallel.sp": True},
    "ep2": {"parallel.ep": 2},
    "tp2_ep2": {"parallel.tp": 2, "parallel.ep": 2},
    "etp2": {"parallel.tp": 2, "parallel.etp": 2},
    "pp2": {"parallel.pp": 2},
    "cp2_ring": {"parallel.cp": 2, "parallel.cp_comm": "ring"},
    "cp2_ulysses": {"parallel.cp": 2, "parallel.cp_comm": "ulysses"},
}


@pytest.mark.parametrize("layout", list(VERIFY))
def test_logits_match_transformers(gpt_oss_hf, layout):
    results = run_distributed(_verify, 2, gpt_oss_hf, VERIFY[layout])
    assert all(r == results[0] for r in results)
    assert results[0]["max_abs_diff"] < 5e-6, results[0]  # measured at most 7.2e-7


def test_import_export_is_bitwise_and_loads_in_transformers(gpt_oss_hf, tmp_path):
    """import-hf at tp=2 x ep=2 then export-hf: every tensor back bit for bit (the interleaved,
    transposed expert tensors included), config.json's gpt-oss keys unchanged; transformers
    loads the export with nothing missing or unexpected."""
    import json

    from megaswift.convert.hf_export import export_hf
    from megaswift.convert.verify import load_hf_model
    from tests.dist.test_linear_attention import _import
    from tests.helpers.hf import tensors

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    run_distributed(_import, 2, [(gpt_oss_hf, ckpt, 2)])
    export_hf(ckpt, out)
    want, got = tensors(gpt_oss_hf), tensors(out)
    assert set(got) == set(want)
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    with open(os.path.join(gpt_oss_hf, "config.json")) as f, open(os.path.join(out, "config.json")) as g:
        a, b = json.load(f), json.load(g)
    for key in ("model_type", "layer_types", "sliding_window", "swiglu_limit", "num_local_experts", "attention_bias"):
        assert a[key] == b[key], key
    assert a["rope_parameters"]["rope_type"] == b["rope_parameters"]["rope_type"] == "yarn"
    _, info = load_hf_model(out, torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"], info


TRAIN = {  # name -> (overrides, reference micro batch size)
    "tp2_sp": ({"parallel__tp": 2, "parallel__sp": True}, 2),
    # the balancing loss is per micro batch: one of 4 rows on each dp rank against one of 8
    "dp2_ep2_zero1": ({"parallel__ep": 2, "optim__zero": 1, "train__micro_batch_size": 4}, 8),
    "pp2": ({"parallel__pp": 2}, 2),
    "cp2": ({"parallel__cp": 2}, 2),
    # LoRA on every linear: attention, router-side experts (biases and sinks frozen with the base)
    "lora_tp2_ep2": ({"parallel__tp": 2, "parallel__ep": 2}, 2),
}
LORA = {"model__lora__rank": 4, "model__lora__alpha": 8, "model__lora__targets": "[all-linear]"}


COMMON = {"moe__aux_loss_coef": 0.01, "moe__z_loss_coef": 1e-3, "data__seq_len": 48}


@pytest.fixture(scope="module")
def reference(gpt_oss_hf, tmp_path_factory):
    """data path, and the single-process run per micro batch size (computed once)."""
    from tests.helpers.train import run_steps, write_chat_data

    root = tmp_path_factory.mktemp("gpt_oss_ref")
    data, cache = write_chat_data(str(root / "train.jsonl")), {}

    def get(mbs, lora=False):
        if (mbs, lora) not in cache:
            cache[mbs, lora] = run_steps(0, 1, gpt_oss_hf, data, str(root / f"mbs{mbs}{lora}"),
                                         train__micro_batch_size=mbs, **COMMON, **(LORA if lora else {}))
        return cache[mbs, lora]
    return data, get


@pytest.mark.parametrize("name", list(TRAIN))
def test_training_matches_single_process(gpt_oss_hf, reference, name, tmp_path):
    """5 SFT steps with the load-balancing and z losses on: the single-process losses, gradient
    norms and balancing losses within relative 1e-5."""
    from tests.helpers.train import run_steps

    overrides, ref_mbs = TRAIN[name]
    data, get = reference
    lora = LORA if name.startswith("lora") else {}
    want = get(ref_mbs, bool(lora))
    got = run_distributed(run_steps, 2, gpt_oss_hf, data, str(tmp_path), **overrides, **COMMON, **lora)[0]
    assert want[-1]["loss"] < want[0]["loss"]
    for key in ("loss", "grad_norm", "moe_aux_loss"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=1e-5, err_msg=key)


def test_greedy_rollouts_equal_transformers_generate(gpt_oss_hf):
    """Left-padded prompts of 3 to 9 tokens and 8 new ones: past the sliding window, so the
    rollout cache's window and the sinks both act."""
    from tests.dist.test_linear_rollouts import check_greedy_against_generate

    check_greedy_against_generate(gpt_oss_hf)


def test_streamed_weights_equal_the_checkpoint(gpt_oss_hf):
    """The in-memory weight stream for a rollout engine (convert/hf_stream.py) at tp=2 x etp=2:
    the interleaved expert tensors and their biases rebuilt bit for bit on every rank."""
    from tests.dist.test_hf_stream import _check, _stream

    _check(run_distributed(_stream, 2, gpt_oss_hf, {"parallel.tp": 2, "parallel.etp": 2}), gpt_oss_hf)


def test_dpo_at_tp2_ep2_matches_single_process(gpt_oss_hf, tmp_path):
    """DPO (the copy reference: a second gpt-oss sharded like the policy) at tp=2 x ep=2: 5 steps
    equal one process (losses, gradient norms, log-probabilities within relative 1e-5)."""
    from tests.helpers.train import run_dpo_steps, write_preference_data

    pairs = write_preference_data(str(tmp_path / "pairs.jsonl"), n=16)
    common = dict(optim__lr=0.01, optim__warmup_steps=0, **{k: v for k, v in COMMON.items() if k != "data__seq_len"})
    want = run_dpo_steps(0, 1, gpt_oss_hf, pairs, str(tmp_path / "one"), steps=5, **common)
    got = run_distributed(run_dpo_steps, 2, gpt_oss_hf, pairs, str(tmp_path / "two"), steps=5, parallel__tp=2,
                          parallel__ep=2, **common)[0]
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=1e-5, err_msg=key)
