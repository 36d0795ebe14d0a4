"""Pass-through tensors (DeepSeek-V3 / GLM-4.5 multi-token-prediction layers): HF tensors that
megaswift does not train but keeps. Import stores them as stored beside the checkpoint, training
runs carry them into their checkpoints, export writes them back; fp8 ones are kept fp8, or
dequantized for an export that is not fp8-block.

A tiny qwen3 with `num_nextn_predict_layers: 1` and an MTP layer's enorm, hnorm, eh_proj and
q_proj (fp32, odd shapes) after its last decoder layer, in a shard of their own.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaswift.checkpoint.model_state import PASSTHROUGH_FILE, copy_side_files
from megaswift.checkpoint.train_state import step_dir
from megaswift.convert import fp8
from megaswift.convert.hf_export import export_hf
from megaswift.errors import CheckpointError
from megaswift.testing.fp8 import add_mtp_layer, make_fp8_hf
from megaswift.testing.tiny import make_tiny_hf
from tests.helpers.hf import tensors
from tests.helpers.train import run_train, write_chat_data
from tests.unit.test_fp8 import bits, cli, reference_dequant, same_bits

BLOCK = (7, 10)
MTP = "model.layers.2."  # the tiny checkpoints have 2 decoder layers


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{"mtp": qwen3 + MTP layer (fp32), "fp8": its fp8 copy in blocks of 7 x 10, "mtp_tensors"}."""
    root = tmp_path_factory.mktemp("passthrough")
    src = make_tiny_hf("qwen3", str(root / "mtp"), seed=5)
    mtp = add_mtp_layer(src, seed=6)
    return {"mtp": src, "fp8": make_fp8_hf(src, str(root / "fp8"), BLOCK), "mtp_tensors": mtp}


@pytest.fixture(scope="module")
def imported(hf, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("imported") / "ckpt")
    cli("import-hf", hf["mtp"], ckpt)
    return ckpt


def test_import_export_is_bitwise_including_passthrough(hf, imported, tmp_path):
    """The side file holds the MTP tensors as stored; the export is every source tensor bit for
    bit, MTP ones in the shards and the index; transformers' qwen3 calls exactly them unexpected."""
    from transformers import AutoModelForCausalLM

    kept = load_file(os.path.join(imported, "hf", PASSTHROUGH_FILE))
    assert not same_bits(kept, hf["mtp_tensors"])
    out = str(tmp_path / "out")
    cli("export-hf", imported, out, "--max-shard-size", "100KB")
    assert not same_bits(tensors(out), tensors(hf["mtp"]))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    assert set(hf["mtp_tensors"]) <= set(index)
    assert PASSTHROUGH_FILE not in os.listdir(out)  # in the shards, not beside them
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert set(info["unexpected_keys"]) == set(hf["mtp_tensors"]), info
    assert not info["missing_keys"] and not info["mismatched_keys"], info


def test_without_the_config_key_they_are_unexpected(hf, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hf["mtp"], bad)
    config = json.load(open(bad / "config.json"))
    del config["num_nextn_predict_layers"]
    json.dump(config, open(bad / "config.json", "w"))
    from megaswift.config import load_config
    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.models.decoder import GPTModel
    from megaswift.setup import hf_model_config

    model = GPTModel(hf_model_config(str(bad), load_config()))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor '{MTP}eh_proj.weight' \(and 3 more\)"):
        load_hf_into_model(model, str(bad))


def test_side_files_keep_passthrough_and_refuse_other_weights(imported, tmp_path):
    side = tmp_path / "side"
    shutil.copytree(os.path.join(imported, "hf"), side)
    save_file({"x": torch.ones(2)}, str(side / "stray.safetensors"))
    (side / "other.index.json").write_text("{}")
    ckpt_side, export = tmp_path / "ckpt_side", tmp_path / "export"
    copy_side_files(str(side), str(ckpt_side))
    copy_side_files(str(side), str(export), passthrough=False)
    assert PASSTHROUGH_FILE in os.listdir(ckpt_side) and "tokenizer.json" in os.listdir(ckpt_side)
    assert not {"stray.safetensors", "other.index.json"} & set(os.listdir(ckpt_side))
    assert "tokenizer.json" in os.listdir(export) and PASSTHROUGH_FILE not in os.listdir(export)
    assert (ckpt_side / PASSTHROUGH_FILE).read_bytes() == (side / PASSTHROUGH_FILE).read_bytes()


def test_training_checkpoints_carry_them(hf, imported, tmp_path):
    """A run from model.hf_path draws them from the HF directory into its checkpoint, a run from
    a megaswift checkpoint copies them on; a LoRA run's PEFT export leaves them out, its merged
    export writes them (as stored: the default export of an fp32 source)."""
    data = write_chat_data(str(tmp_path / "data" / "train.jsonl"), n=8)
    want = open(os.path.join(imported, "hf", PASSTHROUGH_FILE), "rb").read()
    short = dict(train__steps=1, train__global_batch_size=2, data__seq_len=32)
    for name, extra in (("from_hf", {}), ("from_ckpt", {"checkpoint__load": imported}),
                        ("lora", {"model__lora__rank": 2, "model__lora__alpha": 4.0})):
        out = str(tmp_path / name)
        run_train(0, 1, hf["mtp"], data, out, **short, **extra)
        ckpt = step_dir(out, 1)
        assert open(os.path.join(ckpt, "hf", PASSTHROUGH_FILE), "rb").read() == want, name
    export_hf(step_dir(str(tmp_path / "from_hf"), 1), str(tmp_path / "full"))
    assert not same_bits({k: v for k, v in tensors(tmp_path / "full").items() if k.startswith(MTP)}, hf["mtp_tensors"])
    lora = step_dir(str(tmp_path / "lora"), 1)
    export_hf(lora, str(tmp_path / "peft"))
    assert PASSTHROUGH_FILE not in os.listdir(tmp_path / "peft")
    assert not any(MTP in k for k in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    export_hf(lora, str(tmp_path / "merged"), merge_lora=True)
    assert not same_bits({k: v for k, v in tensors(tmp_path / "merged").items() if k.startswith(MTP)},
                         hf["mtp_tensors"])


def test_fp8_passthrough(hf, tmp_path):
    """From an fp8 source: kept fp8 with their grids; the default (bf16) export dequantizes them
    and drops the grids; fp8-block in the source's blocks writes them verbatim, in other blocks
    requantizes them (eh_proj and the norms stay bf16, as serving engines build them)."""
    src = tensors(hf["fp8"])
    mtp = {k: v for k, v in src.items() if k.startswith(MTP)}
    q = MTP + "self_attn.q_proj.weight"
    assert q + fp8.SCALE_SUFFIX in mtp and MTP + "eh_proj.weight" + fp8.SCALE_SUFFIX not in mtp
    ckpt = str(tmp_path / "ckpt")
    cli("import-hf", hf["fp8"], ckpt)
    assert not same_bits(load_file(os.path.join(ckpt, "hf", PASSTHROUGH_FILE)), mtp)

    plain = str(tmp_path / "plain")
    cli("export-hf", ckpt, plain)
    out = {k: v for k, v in tensors(plain).items() if k.startswith(MTP)}
    assert set(out) == {k for k in mtp if not k.endswith(fp8.SCALE_SUFFIX)}
    assert torch.equal(out[q], reference_dequant(mtp[q], mtp[q + fp8.SCALE_SUFFIX], BLOCK).bfloat16())
    assert all(torch.equal(out[k], mtp[k]) for k in out if k != q)

    same = str(tmp_path / "same")
    export_hf(ckpt, same, "fp8-block", fp8_block=BLOCK)
    assert not same_bits({k: v for k, v in tensors(same).items() if k.startswith(MTP)}, mtp)

    other = str(tmp_path / "other")
    cli("export-hf", ckpt, other, "--dtype", "fp8-block")
    out = {k: v for k, v in tensors(other).items() if k.startswith(MTP)}
    assert out[q].dtype == torch.float8_e4m3fn and out[q + fp8.SCALE_SUFFIX].shape == (1, 1)
    want = reference_dequant(mtp[q], mtp[q + fp8.SCALE_SUFFIX], BLOCK)
    back = reference_dequant(out[q], out[q + fp8.SCALE_SUFFIX], (128, 128))
    assert bool(((back - want).abs() <= 2.0 ** -4 * want.abs() + 2.0 ** -10 * out[q + fp8.SCALE_SUFFIX]).all())
    assert out[MTP + "eh_proj.weight"].dtype == torch.bfloat16 and MTP + "eh_proj.weight_scale_inv" not in out
    config = json.load(open(os.path.join(other, "config.json")))
    assert MTP + "eh_proj" in config["quantization_config"]["modules_to_not_convert"]


def test_fp8_block_export_of_an_unquantized_source_quantizes_them(hf, imported, tmp_path):
    out = str(tmp_path / "out")
    export_hf(imported, out, "fp8-block", fp8_block=BLOCK)
    t = tensors(out)
    q, s = fp8.quantize("q", hf["mtp_tensors"][MTP + "self_attn.q_proj.weight"], BLOCK)
    assert torch.equal(bits(t[MTP + "self_attn.q_proj.weight"]), bits(q))
    assert torch.equal(t[MTP + "self_attn.q_proj.weight_scale_inv"], s)
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
        assert torch.equal(t[MTP + k], hf["mtp_tensors"][MTP + k].bfloat16()), k


def test_lora_on_an_fp8_base_merges_into_its_dequantized_weights(hf, tmp_path):
    """A LoRA run on an fp8 HF directory: the merged export is the base's dequantized weights
    (fp32, then bf16, its export dtype) plus the adapters; the MTP layer comes dequantized."""
    data = write_chat_data(str(tmp_path / "data" / "train.jsonl"), n=8)
    out = str(tmp_path / "lora")
    run_train(0, 1, hf["fp8"], data, out, train__steps=1, train__global_batch_size=2, data__seq_len=32,
              model__lora__rank=2, model__lora__alpha=4.0, model__lora__targets="[linear_proj]")
    merged = str(tmp_path / "merged")
    export_hf(step_dir(out, 1), merged, merge_lora=True)
    src, got = tensors(hf["fp8"]), tensors(merged)
    assert not any(k.endswith(fp8.SCALE_SUFFIX) for k in got)
    for name in ("model.layers.0.mlp.down_proj.weight", MTP + "self_attn.q_proj.weight"):  # not adapted
        assert torch.equal(got[name], reference_dequant(src[name], src[name + fp8.SCALE_SUFFIX], BLOCK).bfloat16())
    o = "model.layers.0.self_attn.o_proj.weight"  # adapted: B starts at zero, one step moves it a little
    base = reference_dequant(src[o], src[o + fp8.SCALE_SUFFIX], BLOCK)
    assert got[o].dtype == torch.bfloat16 and (got[o].float() - base).abs().max() < 0.05
