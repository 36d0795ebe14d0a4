"""Hybrid linear attention (issue 22, in progress): Qwen3-Next's Gated DeltaNet and gated
attention against transformers' Qwen3Next at the layouts that split them.

`verify` (fp32, reference attention, the torch form of the delta rule) within 1e-4 of
transformers at tp=2 with SP (the key heads, their value heads and the conv channels split),
ep=2 and pp=2; packed documents equal each document alone; SFT at pp=2 equals one process
(rtol 1e-5) and at tp=2 + SP within the tolerances stated there; context parallelism and GRPO
(no incremental decoding yet) are refused in one line.
"""
import os

import pytest

from megaswift.errors import LayoutError
from megaswift.testing.dist import run_distributed
from tests.dist.test_latent_families import _verify

VERIFY = {
    "tp2_sp": {"parallel.tp": 2, "parallel.sp": True},
    "ep2": {"parallel.ep": 2},
    "tp2_ep2": {"parallel.tp": 2, "parallel.ep": 2},
    "pp2": {"parallel.pp": 2},
    "pp2_uneven": {"parallel.pp": 2, "parallel.pp_layers": "[1,2]"},  # Qwen3.5's tiny ones have 3 layers
}
# Qwen3.5's checkpoints are multimodal (text_config, a vision tower, DeltaNet's projections
# stored split); the fused variant reads Qwen3.5-MoE's published 3-D expert tensors
CASES = [("qwen3_next", lay) for lay in ("tp2_sp", "ep2", "pp2")] + [("qwen3_5", "tp2_sp"), ("qwen3_5", "pp2_uneven"),
                                                                    ("qwen3_5_moe", "tp2_ep2"), ("qwen3_5_moe", "pp2_uneven"),
                                                                    ("qwen3_5_moe_fused", "tp2_ep2")]


@pytest.mark.parametrize("family,layout", CASES)
def test_logits_match_transformers(linear_hf, family, layout):
    results = run_distributed(_verify, 2, linear_hf[family], VERIFY[layout])
    assert all(r == results[0] for r in results)
    assert results[0]["max_abs_diff"] < 1e-4, results[0]


def test_packed_documents_equal_each_document_alone(linear_hf):
    """The conv and the delta rule's state restart at a document start: a packed row gives each
    document's logits as if it ran alone."""
    import torch

    from megaswift.config import load_config
    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.models.decoder import GPTModel
    from megaswift.setup import hf_model_config

    hf = linear_hf["qwen3_next"]
    model = GPTModel(hf_model_config(hf, load_config())).eval()
    load_hf_into_model(model, hf)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 1000, (1, 11), generator=g), torch.randint(0, 1000, (1, 20), generator=g)
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), position_ids=torch.cat([torch.arange(11), torch.arange(20)])[None],
                       document_ids=torch.tensor([[0] * 11 + [1] * 20]))
        alone = torch.cat([model(a), model(b)], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_context_parallelism_is_refused_in_one_line(linear_hf):
    from megaswift.config import load_config
    from megaswift.setup import hf_model_config, plan_layout

    cfg = load_config(None, ["--parallel.cp=2"])
    with pytest.raises(LayoutError, match="context parallelism is not supported for Gated DeltaNet"):
        plan_layout(cfg, 2, hf_model_config(linear_hf["qwen3_next"], cfg))


def _train(hf_dir, tmp_path, overrides, common):
    from tests.helpers.train import run_steps, write_chat_data

    data = write_chat_data(str(tmp_path / "train.jsonl"))
    want = run_steps(0, 1, hf_dir, data, str(tmp_path / "one"), **common)
    got = run_distributed(run_steps, 2, hf_dir, data, str(tmp_path / "two"), **overrides, **common)[0]
    assert want[-1]["loss"] < want[0]["loss"]
    return got, want


def test_training_at_pp2_matches_single_process(linear_hf, tmp_path):
    """5 SFT steps on packed rows (documents restart the conv and the state), with experts: the
    single-process losses and gradient norms within relative 1e-5."""
    import numpy as np

    got, want = _train(linear_hf["qwen3_next"], tmp_path, {"parallel__pp": 2},
                       dict(data__packing=True, moe__z_loss_coef=1e-3))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=1e-5, err_msg=key)


def test_training_at_tp2_sp_matches_single_process(tmp_path_factory, tmp_path):
    """5 SFT steps at tp=2 with SP on packed rows, on a dense Qwen3-Next (every MLP dense: with
    experts, fp32 rounding differences flip near-tied routing choices after a few steps). The
    first step's loss and gradient norm within relative 1e-5; the later steps within 1e-4
    (losses) and 5e-4 (gradient norms): the decay parameters' gradients are ill-conditioned sums
    over tokens (A_log's differs by 1.3e-5 relative between tp=1 and tp=2 in one backward, from
    summation order alone, measured) and the steps amplify it (measured at step 5: loss 1.9e-5,
    gradient norm 5e-5). Issue 22 is still open on this."""
    import numpy as np

    from megaswift.testing.tiny import make_tiny_hf

    hf = make_tiny_hf("qwen3_next", str(tmp_path_factory.mktemp("qn_dense") / "hf"), seed=41,
                      mlp_only_layers=[0, 1, 2, 3])
    got, want = _train(hf, tmp_path, {"parallel__tp": 2, "parallel__sp": True}, dict(data__packing=True))
    for key, later in (("loss", 1e-4), ("grad_norm", 5e-4)):
        np.testing.assert_allclose(got[0][key], want[0][key], rtol=1e-5, err_msg=key)
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=later, err_msg=key)


def test_lora_at_pp2_matches_single_process(linear_hf, tmp_path):
    """LoRA on every linear, Gated DeltaNet's projections included, at pp=2."""
    import numpy as np

    lora = {"model__lora__rank": 4, "model__lora__alpha": 8, "model__lora__targets": "[all-linear]"}
    got, want = _train(linear_hf["qwen3_next"], tmp_path, {"parallel__pp": 2}, dict(data__packing=True, **lora))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=1e-5, err_msg=key)


# -- conversion -------------------------------------------------------------------------------------
def _import(rank, world, pairs):
    """import-hf at tp=2 (x ep=2 with experts) of each (HF dir, checkpoint dir)."""
    from types import SimpleNamespace

    from megaswift.commands import import_command
    from megaswift.config import load_config

    for hf_dir, ckpt, ep in pairs:
        cfg = load_config(None, ["--parallel.tp=2", f"--parallel.ep={ep}"])
        import_command(SimpleNamespace(hf_dir=hf_dir, ckpt_dir=ckpt, overwrite=False, dtype=None), cfg)


def test_import_export_is_bitwise_with_mtp_and_vision_and_loads_in_transformers(linear_hf, tmp_path):
    """import-hf at tp=2 (x ep=2) then export-hf gives every tensor back bit for bit: the MTP
    block and Qwen3.5's vision tower (kept beside the checkpoint, never trained) included, fused
    experts written fused again, and Qwen3.5's nested config.json as it was. transformers loads
    each export (Qwen3.5 as the whole multimodal model) with nothing missing and only the MTP
    block unexpected (it ignores `mtp.*` by design)."""
    import json

    import torch
    import transformers

    from megaswift.convert.hf_export import export_hf
    from tests.helpers.hf import tensors

    families = ("qwen3_next", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_fused")
    pairs = [(linear_hf[f], str(tmp_path / f"{f}.ckpt"), 1 if f == "qwen3_5" else 2) for f in families]
    run_distributed(_import, 2, pairs)
    for family, (src, ckpt, _) in zip(families, pairs):
        out = str(tmp_path / f"{family}.hf")
        export_hf(ckpt, out)
        want, got = tensors(src), tensors(out)
        assert set(got) == set(want), (family, set(got) ^ set(want))
        assert any(k.startswith("mtp.") for k in got), family
        for k in want:
            assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), (family, k)
        with open(os.path.join(src, "config.json")) as f, open(os.path.join(out, "config.json")) as g:
            a, b = json.load(f), json.load(g)
        if family.startswith("qwen3_5"):
            assert a == b, family
        else:
            assert all(a[k] == b[k] for k in ("model_type", "architectures", "layer_types", "linear_num_value_heads"))
        auto = transformers.AutoModelForImageTextToText if family.startswith("qwen3_5") else \
            transformers.AutoModelForCausalLM
        _, info = auto.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], (family, info)
        assert all(k.startswith("mtp.") for k in info["unexpected_keys"]), (family, info["unexpected_keys"])
