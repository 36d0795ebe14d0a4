"""The in-memory weight stream a separate rollout engine would load from (convert/hf_stream.py):
at every layout the streamed HF tensors equal the HF checkpoint the model was loaded from, bit for
bit (fp32), on every rank, with no file written."""
import glob
import os

import numpy as np
import pytest
import torch

from megaswift.testing.dist import run_distributed


def _stream(rank, world, hf_dir, overrides):
    from megaswift.commands import build_model, hf_model_config, plan_layout
    from megaswift.config import load_config
    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.convert.hf_stream import stream_hf_weights
    from megaswift.parallel.state import ParallelState

    args = [a for k, v in overrides.items() for a in (f"--{k}", str(v))]
    cfg = load_config(None, args)
    mc = hf_model_config(hf_dir, cfg)
    st = ParallelState.build(plan_layout(cfg, world, mc))
    model = build_model(cfg, mc, st, torch.float32)
    load_hf_into_model(model, hf_dir)
    out = {name: t.numpy().copy() for name, t in stream_hf_weights(model)}
    # rank 0 returns the tensors, the others a checksum of theirs
    return out if rank == 0 else {n: float(np.abs(a).sum()) for n, a in out.items()}


def _hf_tensors(hf_dir):
    from safetensors.torch import load_file

    out = {}
    for f in glob.glob(os.path.join(hf_dir, "*.safetensors")):
        out.update({k: v.numpy() for k, v in load_file(f).items()})
    return out


CASES = {
    "tp2_sp": ("llama", 2, {"parallel.tp": 2, "parallel.sp": "true"}),
    "pp2_tied": ("qwen2", 2, {"parallel.pp": 2}),
    "tp4_kv_replicated": ("qwen3", 4, {"parallel.tp": 4}),
    "tp2_cp2": ("mistral", 4, {"parallel.tp": 2, "parallel.cp": 2}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_streamed_weights_equal_the_checkpoint(name, tiny_hf):
    family, world, overrides = CASES[name]
    _check(run_distributed(_stream, world, tiny_hf[family], overrides), tiny_hf[family])


def test_streamed_expert_weights_equal_the_checkpoint(moe_hf):
    hf = moe_hf["qwen3_moe"]
    _check(run_distributed(_stream, 4, hf, {"parallel.ep": 2, "parallel.etp": 2}), hf)


def _check(results, hf_dir):
    want = _hf_tensors(hf_dir)
    got = results[0]
    assert set(got) == set(want)
    for n, a in want.items():
        np.testing.assert_array_equal(got[n], a, err_msg=n)
    for other in results[1:]:
        assert other == {n: float(np.abs(a).sum()) for n, a in got.items()}
