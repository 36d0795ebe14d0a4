"""Hybrid linear attention (issue 22): Qwen3-Next's and Qwen3.5's Gated DeltaNet and gated
attention against transformers, at the layouts that split them.

`verify` (fp32, reference attention, the torch form of the delta rule) within 1e-4 of
transformers (measured at most 1.4e-5) for qwen3_next at tp=2 with SP, ep=2 and pp=2, and for
the multimodal qwen3_5 / qwen3_5_moe checkpoints (nested text_config, a vision tower, split
in-projections; fused or per-expert experts) at tp=2, tp=2 x ep=2 and pp=2; packed documents
equal each document alone; 5 SFT steps equal one process (rtol 1e-5, and at tp=2 the bound
stated there); LoRA at tp=2; import then export is bitwise with the MTP block and the vision
tower passed through. Context parallelism is refused in one line (docs/models.md says why).
Rollouts: tests/dist/test_linear_rollouts.py.
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


def _train(hf_dir, tmp_path, overrides, common, ref_mbs=2, floor=False):
    """(distributed, single-process) per-step metrics; the reference runs `ref_mbs` rows per
    micro batch (one micro batch per step where the MoE balancing loss must see the same rows).
    With `floor`, also the reference's own sensitivity: the same run with every embedding weight
    moved by one ulp (x (1 + 2^-23))."""
    from tests.helpers.train import run_steps, write_chat_data

    data = write_chat_data(str(tmp_path / "train.jsonl"))
    ref = {**common, **{k: v for k, v in overrides.items() if k.startswith("moe__")}, "train__micro_batch_size": ref_mbs}
    want = run_steps(0, 1, hf_dir, data, str(tmp_path / "one"), **ref)
    got = run_distributed(run_steps, 2, hf_dir, data, str(tmp_path / "two"), **overrides, **common)[0]
    assert want[-1]["loss"] < want[0]["loss"]
    if not floor:
        return got, want
    return got, want, _ulp_perturbed_steps(hf_dir, data, str(tmp_path / "ulp"), **ref)


def _ulp_perturbed_steps(hf_dir, data, output_dir, **overrides):
    import torch

    from megaswift.train.build import build_trainer
    from megaswift.train.sft import SFT
    from tests.helpers.train import train_config

    cfg = train_config(hf_dir, data, output_dir, **overrides)
    trainer = build_trainer(cfg, SFT())
    with torch.no_grad():
        trainer.model.embedding.word_embeddings.weight.mul_(1 + 2 ** -23)
    return [trainer.train_step(trainer.data.next_global_batch()) for _ in range(cfg.train.steps)]


PACKED_MOE = dict(data__packing=True, moe__z_loss_coef=1e-3, optim__lr=3e-4)
TRAIN = {  # name -> (family, overrides, reference micro batch size, layout changes the rounding)
    # packed rows: documents restart the conv and the state; experts beside DeltaNet
    "qwen3_next_pp2": ("qwen3_next", {"parallel__pp": 2}, 2, False),
    "qwen3_5_moe_pp2": ("qwen3_5_moe", {"parallel__pp": 2, "parallel__pp_layers": "[1,2]"}, 2, False),
    # the key heads split: in-projection GEMMs of other shapes round differently
    "qwen3_next_tp2_sp": ("qwen3_next", {"parallel__tp": 2, "parallel__sp": True}, 2, True),
    # the balancing loss is per micro batch: one of 4 rows on each dp rank against one of 8
    "qwen3_next_dp2_ep2_zero1": ("qwen3_next", {"parallel__ep": 2, "optim__zero": 1, "train__micro_batch_size": 4},
                                 8, False),
}


@pytest.mark.parametrize("name", list(TRAIN))
def test_training_matches_single_process(linear_hf, name, tmp_path):
    """5 SFT steps (lr 3e-4) against the single-process run: the losses and gradient norms
    within relative 1e-5, at pp=2 (also Qwen3.5-MoE's) and at dp=2 x ep=2 with ZeRO-1.

    At tp=2 the key heads split, the in-projection GEMMs have other shapes and round otherwise,
    and this model amplifies rounding: Gated DeltaNet's backward through the chunked form (the
    UT transform's triangular solve, the cumulative decays) turns a one-ulp change of its
    inputs into a relative 6e-5 change of the in_proj_ba / A_log / dt_bias gradients
    (measured, one process), and Adam's early sign-like updates carry it into the later
    steps (at lr 3e-3 the reference, its embeddings moved by one ulp, drifts by 3e-2 by step
    5; at lr 3e-4 by 1e-5). So at tp=2 each step is held to 4 x the reference's own one-ulp
    drift, measured in the same test, or 1e-5 if larger (measured: 1.7e-5 against 4.0e-5)."""
    import numpy as np

    family, overrides, ref_mbs, rounding = TRAIN[name]
    got, want, *ulp = _train(linear_hf[family], tmp_path, overrides, PACKED_MOE, ref_mbs, floor=rounding)
    for key in ("loss", "grad_norm"):
        a, b = np.array([m[key] for m in got]), np.array([m[key] for m in want])
        dev = np.abs(a - b) / np.abs(b)
        if not rounding:
            assert dev.max() <= 1e-5, (key, dev)
            continue
        floor = (np.abs(np.array([m[key] for m in ulp[0]]) - b) / np.abs(b)).max()
        assert dev.max() <= max(1e-5, 4 * floor), (key, dev, floor)


def test_lora_at_tp2_sp_matches_single_process(linear_hf, tmp_path):
    """LoRA on every linear of a dense Qwen3.5, Gated DeltaNet's split-stored projections
    included, at tp=2 with SP (the frozen A_log / dt_bias carry no gradient: relative 1e-5)."""
    import numpy as np

    lora = {"model__lora__rank": 4, "model__lora__alpha": 8, "model__lora__targets": "[all-linear]"}
    got, want = _train(linear_hf["qwen3_5"], tmp_path, {"parallel__tp": 2, "parallel__sp": True},
                       dict(data__packing=True, **lora))
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
