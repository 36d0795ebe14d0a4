"""FP8 block-quantized checkpoints (DeepSeek-V3, Kimi-K2): import dequantizes each rank's slice
exactly as the format defines it, export --dtype fp8-block writes the format back within e4m3's
rounding, and an fp8-block export is a fixed point: re-imported (fp32) and exported again, it
comes back bit for bit.

Tiny checkpoints in blocks of 7 x 10, which none of their dimensions is a multiple of: every
tensor has several blocks and partial ones at its edges, and tp slices cut through blocks.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaswift.checkpoint.model_state import read_meta
from megaswift.convert import fp8
from megaswift.convert.hf_export import export_hf
from megaswift.convert.hf_io import HFReader
from megaswift.errors import CheckpointError
from megaswift.testing.fp8 import make_fp8_hf
from megaswift.testing.tiny import make_tiny_hf
from tests.helpers.hf import tensors

BLOCK = (7, 10)
# |w - dequantized| <= max(2^-4 |w|, 2^-10 s) per element, s the block's scale (amax / 448): half
# an e4m3 step, relative where q is normal (|q| >= 2^-6), absolute below (step 2^-9 there).
REL, SUB = 2.0 ** -4, 2.0 ** -10


def cli(*argv):
    """Run a megaswift command in this process (no torchrun: one rank)."""
    from megaswift.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 0


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, to compare fp8 (which torch.equal does not support) and -0.0 exactly."""
    return t.contiguous().view(-1).view(torch.uint8)


def same_bits(a: dict, b: dict) -> list[str]:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(bits(a[k]), bits(b[k]))]


def reference_dequant(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """The format's definition, written out: w[i, j] = float(q[i, j]) * scale[i // br, j // bc]."""
    rows, cols = q.shape
    full = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return q.float() * full


def dequantized(hf_dir: str, block) -> dict:
    """Every tensor of an fp8 HF checkpoint as the weight it stands for (fp32), scale grids gone."""
    t = tensors(hf_dir)
    return {k: (reference_dequant(v, t[k + fp8.SCALE_SUFFIX], block) if k + fp8.SCALE_SUFFIX in t else v.float())
            for k, v in t.items() if not k.endswith(fp8.SCALE_SUFFIX)}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{"moe", "dense"}: tiny qwen3_moe / qwen3 checkpoints (fp32) and their fp8 copies ("fp8_*")."""
    root = tmp_path_factory.mktemp("fp8")
    out = {"moe": make_tiny_hf("qwen3_moe", str(root / "moe"), seed=3),
           "dense": make_tiny_hf("qwen3", str(root / "dense"), seed=4)}
    for k in ("moe", "dense"):
        out[f"fp8_{k}"] = make_fp8_hf(out[k], str(root / f"fp8_{k}"), BLOCK)
    return out


# -- the scale rule ---------------------------------------------------------------------------

def test_every_scale_is_a_fixed_point_of_quantize_dequantize():
    """block_scales' claim, over every fp32 mantissa of amax (one binade: scaling by 2^k is
    exact in the normal range): the dequantized block's amax, fl(448 s), gives s back. Not
    every fp32 value is such a fixed point, which is what makes the check worth having."""
    amax = torch.arange(0x43800000, 0x44000000, dtype=torch.int64).to(torch.int32).view(torch.float32)  # [256, 512)
    s = fp8.block_scales(amax)
    assert torch.equal(fp8.block_scales(s * fp8.E4M3_MAX), s)
    every = torch.arange(0x3F800000, 0x40000000, dtype=torch.int64).to(torch.int32).view(torch.float32)
    assert 0.05 < ((every * 448) / 448 != every).float().mean() < 0.2  # ~11% of all fp32 s are not
    tiny = torch.tensor([0.0, 1e-45, 448 * 2.0 ** -127, 448 * 2.0 ** -126])
    assert torch.equal(fp8.block_scales(tiny), torch.full((4,), fp8.MIN_SCALE))


@pytest.mark.parametrize("block", [(128, 128), BLOCK])
def test_quantize_is_within_e4m3_rounding_and_idempotent(block):
    g = torch.Generator().manual_seed(0)
    # magnitudes over ~50 binades, per row and per element, so blocks mix normal and subnormal
    # e4m3 values; one all-zero block and one of fp32 subnormals
    w = (torch.randn(300, 301, generator=g) * torch.exp2(torch.randint(-30, 20, (300, 1), generator=g).float())
         * torch.exp2(-12 * torch.rand(300, 301, generator=g)))
    w[:block[0], :block[1]] = 0
    w[-1, -1] = -0.0
    w[block[0]:2 * block[0], :block[1]] = 1e-40
    q, s = fp8.quantize("w", w, block)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == fp8.scale_shape(w.shape, block)
    deq = fp8.dequantize(q, s, block)
    assert torch.equal(deq, reference_dequant(q, s, block))
    per = s.repeat_interleave(block[0], 0)[:300].repeat_interleave(block[1], 1)[:, :301]
    err = (w - deq).abs()
    assert bool((err <= torch.maximum(REL * w.abs(), SUB * per)).all()), (err / torch.maximum(REL * w.abs(), SUB * per)).max()
    q2, s2 = fp8.quantize("w", deq, block)
    assert torch.equal(s2, s) and torch.equal(bits(q2), bits(q))
    with pytest.raises(CheckpointError, match="'bad' holds inf or NaN"):
        fp8.quantize("bad", torch.tensor([[1.0, float("nan")]]), block)


# -- reading -------------------------------------------------------------------------------------

def _fp8_dir(tmp_path, config_extra=None, scale=None):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(23, 31, generator=g)
    q, s = fp8.quantize("m.weight", w, BLOCK)
    save_file({"m.weight": q, "m.weight_scale_inv": s if scale is None else scale, "n.weight": w[:5].bfloat16()},
              str(tmp_path / "model.safetensors"))
    config = {"model_type": "qwen3", "quantization_config": fp8.quantization_config(BLOCK), **(config_extra or {})}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return q, s


def test_reader_dequantizes_every_slice_from_its_own_bytes(tmp_path, monkeypatch):
    """Every slice along either dim: the dequantized values, from the fp8 bytes of the slice and
    the scale blocks covering it and no others; into the caller's tensor of any dtype or view."""
    q, s = _fp8_dir(tmp_path)
    reader = HFReader(str(tmp_path))
    assert reader.block == BLOCK and reader.names() == {"m.weight", "n.weight"}
    assert reader.stored_names() == {"m.weight", "m.weight_scale_inv", "n.weight"}
    assert reader.dtype("m.weight") == torch.float32 and reader.shape("m.weight") == (23, 31)
    assert reader.dtype("n.weight") == torch.bfloat16
    want = reference_dequant(q, s, BLOCK)
    calls = []
    stored = reader.read_stored
    monkeypatch.setattr(reader, "read_stored", lambda name, *a: calls.append((name, *a[:3])) or stored(name, *a))
    for dim in (0, 1):
        b = BLOCK[dim]
        for start in range(want.shape[dim]):
            for n in range(want.shape[dim] - start + 1):
                calls.clear()
                got = reader.read("m.weight", dim, start, n)
                assert got.dtype == torch.float32 and torch.equal(got, want.narrow(dim, start, n)), (dim, start, n)
                first, end = start // b, -(-(start + n) // b)
                assert calls == [("m.weight", dim, start, n), ("m.weight_scale_inv", dim, first, end - first if n else 0)]
    into = torch.zeros(23, 40, dtype=torch.bfloat16)
    assert reader.read("m.weight", 1, 4, 17, into[:, 3:20]) is not None
    assert torch.equal(into[:, 3:20], want[:, 4:21].bfloat16()) and not into[:, :3].any() and not into[:, 20:].any()
    with pytest.raises(ValueError, match="cannot fill"):
        reader.read("m.weight", 0, 0, 3, torch.empty(2, 31))


@pytest.mark.parametrize("change, expect", [
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quant_method 'awq' is not supported; megaswift reads fp8"),
    ({"quantization_config": {"quant_method": "nvfp4"}}, "quant_method 'nvfp4' is not supported"),
    ({"quantization_config": {**fp8.quantization_config(BLOCK), "fmt": "e5m2"}}, "fmt 'e5m2' is not supported"),
    ({"quantization_config": {**fp8.quantization_config(BLOCK), "activation_scheme": "static"}},
     "activation_scheme 'static'"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": None}}, "weight_block_size is None"),
    ({"quantization_config": {**fp8.quantization_config(BLOCK), "weight_block_size": [8, 8]}},
     r"tensor 'm.weight_scale_inv' has shape \[4, 4\], but 'm.weight' of shape \[23, 31\] in blocks of \[8, 8\] "
     r"needs \[3, 4\]"),
])
def test_bad_quantization_is_one_line_naming_it(tmp_path, change, expect):
    _fp8_dir(tmp_path, change)
    with pytest.raises(CheckpointError, match=expect) as e:
        HFReader(str(tmp_path)).read("m.weight", 0, 0, 1)
    assert "\n" not in str(e.value)


def test_a_quantized_weight_needs_its_grid(tmp_path):
    _fp8_dir(tmp_path, scale=torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(CheckpointError, match="'m.weight_scale_inv' has dtype torch.int32"):
        HFReader(str(tmp_path)).dtype("m.weight")
    t = load_file(str(tmp_path / "model.safetensors"))
    del t["m.weight_scale_inv"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'m.weight' is torch.float8_e4m3fn without a 'm.weight_scale_inv'"):
        HFReader(str(tmp_path)).dtype("m.weight")


# -- import and export -------------------------------------------------------------------------

def test_import_is_the_dequantization_and_defaults_to_bf16(hf, tmp_path):
    """tp=1: fp32 model weights equal the format's dequantization bit for bit; with no --dtype
    an fp8 checkpoint imports (and so exports) in bf16, the quantization_config dropped."""
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    cli("import-hf", hf["fp8_moe"], ckpt, "--dtype", "float32")
    export_hf(ckpt, out, "float32")
    assert not same_bits(tensors(out), dequantized(hf["fp8_moe"], BLOCK))

    ckpt16, out16 = str(tmp_path / "ckpt16"), str(tmp_path / "out16")
    cli("import-hf", hf["fp8_moe"], ckpt16)
    assert read_meta(ckpt16)["dtype"] == "bfloat16"
    cli("export-hf", ckpt16, out16)
    want = {k: v.bfloat16() for k, v in dequantized(hf["fp8_moe"], BLOCK).items()}
    assert not same_bits(tensors(out16), want)
    assert "quantization_config" not in json.load(open(os.path.join(out16, "config.json")))


def _import_tp2(rank, world, hf_dir, ckpt):
    from megaswift.cli import parse
    from megaswift.commands import import_command

    ns, cfg = parse(["import-hf", hf_dir, ckpt, "--dtype", "float32", "--parallel.tp", "2"])
    return import_command(ns, cfg)


def test_import_tp2_is_the_dequantization(hf, tmp_path):
    """Two ranks, each reading its half of every head and column: slices cut through blocks."""
    from megaswift.testing.dist import run_distributed

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    run_distributed(_import_tp2, 2, hf["fp8_dense"], ckpt)
    export_hf(ckpt, out, "float32")
    assert not same_bits(tensors(out), dequantized(hf["fp8_dense"], BLOCK))


def test_fp8_block_export_is_within_rounding_and_a_fixed_point(hf, tmp_path):
    """An fp32 model exported fp8-block dequantizes to within e4m3's rounding of its weights; that
    export, re-imported in fp32 and exported fp8-block again, is the same bytes (fp8 data, scale
    grids, bf16 tensors). Blocks of 128 (the default: one partial block per tiny tensor) and 7x10."""
    from transformers import AutoModelForCausalLM

    ckpt = str(tmp_path / "ckpt")
    cli("import-hf", hf["moe"], ckpt)  # fp32, as the tiny checkpoint is
    weights = {k: v.float() for k, v in tensors(hf["moe"]).items()}
    for block in ((128, 128), BLOCK):
        first, again, second = (str(tmp_path / f"{n}{block[0]}") for n in ("first", "again", "second"))
        export_hf(ckpt, first, "fp8-block", fp8_block=block)
        config = json.load(open(os.path.join(first, "config.json")))
        assert config["quantization_config"] == fp8.quantization_config(
            block, ["lm_head", "model.layers.0.mlp.gate"]) and config["torch_dtype"] == "bfloat16"
        out = tensors(first)
        quantized = {k for k in out if k + fp8.SCALE_SUFFIX in out}
        assert quantized == {k for k in weights if fp8.quantizable(k, weights[k].shape)}
        assert "model.layers.0.mlp.gate.weight" not in quantized and "lm_head.weight" not in quantized
        assert all(out[k].dtype == torch.bfloat16 for k in out if k not in quantized and not k.endswith("_inv"))
        deq = dequantized(first, block)
        for k in quantized:
            s = out[k + fp8.SCALE_SUFFIX].repeat_interleave(block[0], 0)[:deq[k].shape[0]]
            s = s.repeat_interleave(block[1], 1)[:, :deq[k].shape[1]]
            assert bool(((weights[k] - deq[k]).abs() <= torch.maximum(REL * weights[k].abs(), SUB * s)).all()), k
        cli("import-hf", first, again, "--dtype", "float32")
        export_hf(again, second, "fp8-block", fp8_block=block)
        assert not same_bits(tensors(first), tensors(second))
        if block == (128, 128):
            # transformers reads the format as megaswift wrote it (on CPU it dequantizes to bf16;
            # it derives the block from the grid's shape, so it needs whole blocks, as here:
            # every tiny tensor is one block)
            model, info = AutoModelForCausalLM.from_pretrained(first, output_loading_info=True)
            assert not any(info.values()), info
            name = "model.layers.1.mlp.down_proj.weight"
            assert torch.equal(model.state_dict()[name], deq[name].bfloat16())


def test_an_fp8_checkpoint_in_its_own_blocks_round_trips_bitwise(hf, tmp_path):
    """megaswift's own fp8 checkpoint (make_fp8_hf quantizes as export does), imported in fp32 and
    exported fp8-block in the same blocks: the source's bytes. The default export of the same
    import is bf16, with no scale grids and no quantization_config, and loads in transformers."""
    from transformers import AutoModelForCausalLM

    ckpt, same, plain = (str(tmp_path / n) for n in ("ckpt", "same", "plain"))
    cli("import-hf", hf["fp8_dense"], ckpt, "--dtype", "float32")
    export_hf(ckpt, same, "fp8-block", fp8_block=BLOCK)
    assert not same_bits(tensors(same), tensors(hf["fp8_dense"]))
    cli("export-hf", ckpt, plain, "--dtype", "bfloat16")
    out = tensors(plain)
    assert not any(k.endswith(fp8.SCALE_SUFFIX) for k in out) and all(v.dtype == torch.bfloat16 for v in out.values())
    assert "quantization_config" not in json.load(open(os.path.join(plain, "config.json")))
    _, info = AutoModelForCausalLM.from_pretrained(plain, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_import_hf_refuses_another_quantization_in_one_line(hf, tmp_path, capsys):
    import shutil

    src = tmp_path / "gptq"
    shutil.copytree(hf["fp8_dense"], src)
    config = json.load(open(src / "config.json"))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(config, open(src / "config.json", "w"))
    from megaswift.cli import main

    with pytest.raises(SystemExit) as e:
        main(["import-hf", str(src), str(tmp_path / "ckpt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "quant_method 'gptq' is not supported; megaswift reads fp8 block-quantized checkpoints" in err[0]
    assert not os.path.exists(tmp_path / "ckpt")
