"""The in-memory weight stream a separate rollout engine would load from (convert/hf_stream.py):
at every layout the streamed HF tensors equal the HF checkpoint the model was loaded from, bit for
bit (fp32), on every rank, with no file written."""
import glob
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megaswift.testing.dist import run_distributed


def _stream(rank, world, hf_dir, overrides):
    from megaswift.setup import build_model, hf_model_config, plan_layout
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


def test_streamed_latent_attention_weights_equal_the_checkpoint(latent_hf):
    """deepseek_v3 at tp=2 x ep=2: MLA's replicated down-projections and head-split
    up-projections, the expert bias and the ungated shared expert."""
    hf = latent_hf["deepseek_v3"]
    _check(run_distributed(_stream, 2, hf, {"parallel.tp": 2, "parallel.ep": 2}), hf)


def _check(results, hf_dir):
    want = _hf_tensors(hf_dir)
    got = results[0]
    assert set(got) == set(want)
    for n, a in want.items():
        np.testing.assert_array_equal(got[n], a, err_msg=n)
    for other in results[1:]:
        assert other == {n: float(np.abs(a).sum()) for n, a in got.items()}


def _stream_lora(rank, world, hf_dir, overrides):
    """A LoRA model (rank 4, all-linear) whose B matrices are random (as after training), drawn
    for the canonical tensors so every layout holds the same adapters."""
    from megaswift.setup import build_model, hf_model_config, plan_layout
    from megaswift.config import load_config
    from megaswift.models.sharding import box_of, fill_from_canonical
    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.convert.hf_stream import stream_hf_weights
    from megaswift.parallel.state import ParallelState
    from megaswift.train.build import attach_lora

    args = [a for k, v in overrides.items() for a in (f"--{k}", str(v))] + ["--model.lora.rank", "4"]
    cfg = load_config(None, args)
    mc = hf_model_config(hf_dir, cfg)
    st = ParallelState.build(plan_layout(cfg, world, mc)) if world > 1 else ParallelState.single()
    model = build_model(cfg, mc, st, torch.float32)
    load_hf_into_model(model, hf_dir)
    attach_lora(cfg, model, SimpleNamespace(resume_dir=None, hf_dir=hf_dir, weights_dir=None))
    layouts = model.shard_layouts()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora.B"):
                full = torch.randn(layouts[name].canonical_shape,
                                   generator=torch.Generator().manual_seed(len(name)))
                p.copy_(fill_from_canonical(lambda o, n, full=full: box_of(full, o, n), layouts[name]))
    out = {name: t.numpy().copy() for name, t in stream_hf_weights(model)}  # collective: every rank iterates
    return out if rank == 0 else None


@pytest.mark.parametrize("family, world, overrides", [("qwen2", 2, {"parallel.tp": 2}),
                                                      ("llama", 2, {"parallel.pp": 2})])
def test_a_lora_model_streams_its_merged_weights(tiny_hf, family, world, overrides):
    one = _stream_lora(0, 1, tiny_hf[family], {})
    got = run_distributed(_stream_lora, world, tiny_hf[family], overrides)[0]
    base = _hf_tensors(tiny_hf[family])
    assert set(got) == set(one) == set(base)
    for n in one:
        np.testing.assert_allclose(got[n], one[n], rtol=1e-6, atol=1e-7, err_msg=n)
    changed = [n for n in base if not np.array_equal(one[n], base[n])]
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    assert not any("norm" in n for n in changed)
