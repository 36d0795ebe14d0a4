"""MXFP4 checkpoints (gpt-oss): import reads the expert weights exactly as transformers
dequantizes them, each rank only its experts' bytes; export --dtype mxfp4 writes the published
layout back, within half an e2m1 step of the weights, and is a fixed point (an MXFP4 checkpoint
imported and exported again is the same bytes).

The tiny checkpoints are saved by transformers' own GptOssForCausalLM, with an intermediate size
(96) unlike the hidden size (64), so that a transposed expert cannot pass for the right one.
"""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaswift.convert import mxfp4
from megaswift.convert.hf_io import HFReader, ShardedSafetensorsWriter
from megaswift.errors import CheckpointError
from megaswift.testing.mxfp4 import make_mxfp4_hf, make_tiny_gpt_oss
from tests.helpers.hf import tensors

GATE_UP, DOWN = "model.layers.{}.mlp.experts.gate_up_proj", "model.layers.{}.mlp.experts.down_proj"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def same_bits(a: dict, b: dict) -> list[str]:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(bits(a[k]), bits(b[k]))]


def load_dequantized(hf_dir: str, **kwargs):
    """transformers' model of an MXFP4 checkpoint, its experts dequantized (on CPU without Triton
    it does so anyway; asked, it does so on a GPU machine too, where it would use its kernels)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    return AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=Mxfp4Config(dequantize=True), **kwargs)


def block_scales(scales: torch.Tensor) -> torch.Tensor:
    """[E, out, in / 32] scale bytes -> each element's scale, [E, in, out], float64."""
    s = torch.tensor([math.ldexp(1.0, int(b) - 127) for b in range(256)], dtype=torch.float64)[scales.long()]
    return s.repeat_interleave(mxfp4.BLOCK, -1).transpose(1, 2)


def half_step(a: torch.Tensor) -> torch.Tensor:
    """Half the e2m1 step around |w| / scale = a: 0.25 below 2, 0.5 below 4, 1 above (where 6
    saturates the values up to 7)."""
    return torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{"src": a tiny gpt-oss checkpoint (fp32) saved by transformers, "mx": its MXFP4 copy}."""
    root = tmp_path_factory.mktemp("mxfp4")
    src = make_tiny_gpt_oss(str(root / "src"), seed=5, intermediate_size=96)
    return {"src": src, "mx": make_mxfp4_hf(src, str(root / "mx"))}


# -- the format ----------------------------------------------------------------------------------

def test_dequantize_is_transformers_bit_for_bit():
    """Random codes under every scale byte 0-254, into bf16 and fp32: transformers' own
    convert_moe_packed_tensors, bit for bit (byte 255, e8m0's NaN, is NaN here; transformers'
    ldexp makes inf or NaN of it)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 96, 4, 16), generator=g, dtype=torch.uint8)
    scales = (torch.randperm(3 * 96 * 4, generator=g) % 255).to(torch.uint8).view(3, 96, 4)
    for dtype in (torch.bfloat16, torch.float32):
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert theirs.shape == (3, 128, 96)
        mine = mxfp4.dequantize(blocks, scales, torch.empty(theirs.shape, dtype=dtype))
        assert torch.equal(bits(mine), bits(theirs)), dtype
    assert torch.equal(bits(mxfp4.dequantize(blocks, scales)), bits(convert_moe_packed_tensors(blocks, scales)))
    assert mxfp4.dequantize(blocks[:1, :1, :1], torch.full((1, 1, 1), 255, dtype=torch.uint8)).isnan().all()


def _reference_quantize(w: torch.Tensor):
    """The rule written out in float64: s = the smallest power of two (at least 2^-127) with
    amax <= 7 s; each element's magnitude the nearest of e2m1's eight to |w| / s (the larger
    on a tie), its sign bit w's (so -0.0 is code 8)."""
    mags = torch.tensor(mxfp4.FP4_VALUES[:8], dtype=torch.float64)
    e, i, o = w.shape
    x = w.double().transpose(1, 2).reshape(e, o, i // 32, 32)
    amax = x.abs().amax(-1)
    k = torch.where(amax > 0, torch.ceil(torch.log2(amax / 7)), -127.0).clamp(-127, 126)
    y = x / torch.exp2(k).unsqueeze(-1)
    dist = (y.abs().unsqueeze(-1) - mags).abs()
    mag = 7 - dist.flip(-1).argmin(-1)  # argmin takes the first: flipped, the larger magnitude
    codes = (mag + 8 * torch.signbit(y).long()).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (k + 127).to(torch.uint8)


def test_quantize_is_the_rule_written_out():
    """Against _reference_quantize: weights over 60 binades, all-zero blocks, signed zeros,
    fp32 subnormals, and every tie (each midpoint between e2m1 values, times the block's scale)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 128, 40, generator=g) * torch.logspace(-30, 30, 40, base=2.0)
    w[0, :32, 0] = 0.0
    w[0, :32, 1] = -0.0
    w[1, 32:64, 2] = 1e-41 * torch.randn(32, generator=g)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    w[2, :32, 3] = torch.cat([mids, -mids, torch.tensor([7.0]), torch.zeros(17)]) * 2.0 ** -3  # amax 7 s: s = 2^-3
    w[2, 32:64, 3] = torch.cat([mids, torch.tensor([-3.5 - 2 ** -20]), torch.zeros(24)])  # just over 3.5 s: s = 1
    w[2, 64:96, 3] = torch.cat([mids / 2, torch.tensor([-3.5]), torch.zeros(24)])  # 3.5 = 7 s: s = 0.5
    blocks, scales = mxfp4.quantize("w", w)
    want_blocks, want_scales = _reference_quantize(w)
    assert torch.equal(scales, want_scales) and torch.equal(blocks, want_blocks)
    assert scales[2, 3].tolist()[:3] == [124, 127, 126] and scales[0, 0, 0] == 0
    assert blocks[0, 1, 0].eq(0x88).all()  # -0.0 keeps its sign
    ties = mxfp4.dequantize(blocks, scales)[2, :32, 3].float() * 8
    assert ties[:15].tolist() == [0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6, 6]
    with pytest.raises(CheckpointError, match="'w' has shape \\[3, 40, 128\\]: its input dimension 40"):
        mxfp4.quantize("w", w.transpose(1, 2))
    w[0, 5, 5] = float("nan")
    with pytest.raises(CheckpointError, match="'w' holds inf or NaN"):
        mxfp4.quantize("w", w)


def test_quantize_is_within_half_a_step_and_a_fixed_point():
    """|w - dequantized| <= half an e2m1 step at |w| / s, times s (0.25 s below 2 s, 0.5 s
    below 4 s, s above: 6 s saturates up to 7 s); dequantizing and quantizing again gives the
    same bytes. The largest element of a block lands on 4 s or 6 s, which is why: OpenAI's
    rule (the smallest s >= amax / 6) would leave it on 3 s for about a fifth of the blocks of
    Gaussian weights, and those re-quantize to s / 2."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 256, 48, generator=g) * torch.logspace(-4, 1, 48)
    for x in (w, w.bfloat16()):
        blocks, scales = mxfp4.quantize("w", x)
        deq = mxfp4.dequantize(blocks, scales)
        s = block_scales(scales)
        a = x.double().abs() / s
        err = (x.double() - deq.double()).abs() / s
        assert bool((err <= half_step(a)).all()) and 0.99 < float(err.max()) <= 1.0
        top = a.view(4, 8, 32, 48).amax(2)
        assert float(top.min()) > 3.5 and float(top.max()) <= 7.0
        again = mxfp4.quantize("w", deq)
        assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)
        assert torch.equal(mxfp4.quantize("w", deq.float())[0], blocks)
    amax = w.transpose(1, 2).reshape(4, 48, 8, 32).abs().amax(-1)
    openai = amax / torch.exp2(torch.ceil(torch.log2(amax / 6)))
    assert 0.15 < float(((openai > 3) & (openai < 3.5)).float().mean()) < 0.3


# -- reading ---------------------------------------------------------------------------------------

def test_reader_reads_transformers_dequantized_experts_from_their_own_bytes(hf, monkeypatch):
    """HFReader on the MXFP4 copy: the expert weights under their bf16 names, [E, in, out],
    bfloat16, and every run of experts e0..e0+n equal to what transformers' from_pretrained
    loads, read from the blocks and scales of those experts only. Slices along the other dims
    and read_rows agree with it; stored access sees the stored tensors."""
    reader = HFReader(hf["mx"])
    assert reader.mxfp4 and reader.block is None
    stored = reader.stored_names()
    for layer in range(2):
        for name in (GATE_UP.format(layer), DOWN.format(layer)):
            assert name in reader.names() and name not in stored
            assert {name + "_blocks", name + "_scales"} <= stored
            assert not {name + "_blocks", name + "_scales"} & reader.names()
    assert reader.names() - {GATE_UP.format(i) for i in range(2)} - {DOWN.format(i) for i in range(2)} == \
        {n for n in stored if not n.endswith(("_blocks", "_scales"))}
    assert reader.shape(GATE_UP.format(0)) == (4, 64, 192) and reader.shape(DOWN.format(1)) == (4, 96, 64)
    assert reader.dtype(GATE_UP.format(0)) == torch.bfloat16
    assert reader.stored_entry(GATE_UP.format(0) + "_blocks")[0].shape == (4, 192, 2, 16)
    model, info = load_dequantized(hf["mx"], output_loading_info=True)
    assert not any(info.values()), info
    theirs = model.state_dict()
    calls = []
    read_stored = reader.read_stored
    monkeypatch.setattr(reader, "read_stored", lambda name, *a: calls.append((name, *a[:3])) or read_stored(name, *a))
    for name in (GATE_UP.format(0), DOWN.format(1)):
        want = theirs[name]
        assert want.dtype == torch.bfloat16 and tuple(want.shape) == reader.shape(name)
        for e0 in range(4):
            for n in range(5 - e0):
                calls.clear()
                got = reader.read(name, 0, e0, n)
                assert got.dtype == torch.bfloat16 and torch.equal(got, want[e0:e0 + n]), (name, e0, n)
                assert calls == [(name + "_blocks", 0, e0, n), (name + "_scales", 0, e0, n)]
        into = torch.zeros(6, *want.shape[1:])  # fp32, a view
        reader.read(name, 0, 1, 2, into[2:4])
        assert torch.equal(into[2:4], want[1:3].float()) and not into[:2].any() and not into[4:].any()
        for dim, start, n in ((1, 0, 64), (1, 17, 40), (1, 33, 1), (2, 5, 50), (2, 0, want.shape[2])):
            calls.clear()
            assert torch.equal(reader.read(name, dim, start, n), want.narrow(dim, start, n)), (name, dim, start)
            first = start // 32 if dim == 1 else start
            count = -(-(start + n) // 32) - first if dim == 1 else n
            assert calls == [(name + "_blocks", 2 if dim == 1 else 1, first, count),
                             (name + "_scales", 2 if dim == 1 else 1, first, count)]
        rows = want.flatten(0, 1)
        for start, n in ((0, 1), (70, 90), (0, rows.shape[0]), (rows.shape[0] - 3, 3)):
            assert torch.equal(reader.read_rows(name, start, n), rows[start:start + n])
        with pytest.raises(IndexError, match="outside its shape"):
            reader.read(name, 0, 3, 2)
        with pytest.raises(ValueError, match="cannot fill"):
            reader.read(name, 0, 0, 1, torch.empty(2, *want.shape[1:]))
    bias = "model.layers.0.mlp.experts.gate_up_proj_bias"
    assert reader.dtype(bias) == torch.bfloat16 and torch.equal(reader.read(bias, 0, 1, 2), theirs[bias][1:3])


def _edit(hf_dir: str, out, config=None, drop=(), change=None):
    """A copy of `hf_dir` in `out` with config.json's quantization_config replaced by `config`,
    tensors `drop` removed and `change` (name -> tensor) set."""
    import shutil

    shutil.copytree(hf_dir, out)
    path = os.path.join(out, "model.safetensors")
    t = load_file(path)
    for name in drop:
        del t[name]
    t.update(change or {})
    save_file(t, path)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: "model.safetensors" for k in t}}, f)
    if config is not None:
        c = json.load(open(os.path.join(out, "config.json")))
        c["quantization_config"] = config
        json.dump(c, open(os.path.join(out, "config.json"), "w"))
    return str(out)


B0 = GATE_UP.format(0) + "_blocks"


@pytest.mark.parametrize("config, drop, change, expect", [
    ({"quant_method": "mxfp4", "group_size": 32}, (), None, "quantization_config has 'group_size', which an mxfp4"),
    ({"quant_method": "mxfp4", "modules_to_not_convert": "lm_head"}, (), None,
     "modules_to_not_convert is 'lm_head', not a list"),
    (None, (GATE_UP.format(0) + "_scales",), None, f"tensor '{B0}' has no '{GATE_UP.format(0)}_scales' beside it"),
    (None, (), {GATE_UP.format(0): torch.zeros(4, 64, 192)}, f"holds '{GATE_UP.format(0)}' both unquantized and"),
    (None, (), {B0: torch.zeros(4, 192, 2, 16, dtype=torch.int8)}, f"'{B0}' has dtype torch.int8; mxfp4 blocks"),
    (None, (), {B0: torch.zeros(4, 192, 4, 8, dtype=torch.uint8)}, rf"'{B0}' has shape \[4, 192, 4, 8\]"),
    (None, (), {B0: torch.zeros(4, 192, 3, 16, dtype=torch.uint8)},
     rf"_scales' has shape \[4, 192, 2\], but '{B0}' of shape \[4, 192, 3, 16\] needs \[4, 192, 3\]"),
])
def test_a_bad_mxfp4_checkpoint_is_one_line_naming_it(hf, tmp_path, config, drop, change, expect):
    d = _edit(hf["mx"], tmp_path / "bad", config, drop, change)
    with pytest.raises(CheckpointError, match=expect) as e:
        HFReader(d).read(GATE_UP.format(0), 0, 0, 1)
    assert "\n" not in str(e.value)


# -- writing ---------------------------------------------------------------------------------------

def test_the_converter_writes_the_published_layout(hf, tmp_path):
    """export's _Converter in mxfp4, fed transformers' tensors: the 3-D expert weights as
    _blocks / _scales (the quantizer's), everything else bf16, gpt-oss-20b's quantization_config;
    the directory reads back (HFReader) as the dequantized weights, and is the same bytes as
    make_mxfp4_hf's copy. A format without experts to write is refused in one line."""
    from megaswift.convert.hf_export import _Converter

    src = tensors(hf["src"])
    writer = ShardedSafetensorsWriter(str(tmp_path / "out"))
    out = _Converter(writer, "mxfp4")
    for name, t in src.items():
        out.add(name, t)
    writer.close()
    q = out.quantization_config()
    assert q == {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                            "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}
    config = json.load(open(os.path.join(hf["src"], "config.json")))
    json.dump({**config, "quantization_config": q}, open(tmp_path / "out" / "config.json", "w"))
    written = tensors(str(tmp_path / "out"))
    assert not same_bits(written, tensors(hf["mx"]))
    experts = {n for n in src if n.endswith(("gate_up_proj", "down_proj"))}
    assert len(experts) == 4 and all(written[n + "_blocks"].dtype == torch.uint8 for n in experts)
    assert all(v.dtype == torch.bfloat16 for k, v in written.items() if not k.endswith(("_blocks", "_scales")))
    reader = HFReader(str(tmp_path / "out"))
    for n in experts:
        b, s = mxfp4.quantize(n, src[n])
        assert torch.equal(written[n + "_blocks"], b) and torch.equal(written[n + "_scales"], s)
        assert torch.equal(reader.read(n, 0, 0, 4), mxfp4.dequantize(b, s))
    # a linear module the published patterns do not cover is listed too, its layer index as *
    assert mxfp4.quantization_config(["model.layers.3.mlp.shared_expert.up_proj", "lm_head",
                                      "model.layers.0.self_attn.q_proj"])["modules_to_not_convert"][4:] == \
        ["model.layers.*.mlp.shared_expert.up_proj"]
    dense = _Converter(ShardedSafetensorsWriter(str(tmp_path / "dense")), "mxfp4")
    dense.add("model.layers.0.mlp.down_proj.weight", torch.zeros(64, 96))
    with pytest.raises(CheckpointError, match="this checkpoint has none; export it in bfloat16"):
        dense.quantization_config()


# -- import and export (the gpt_oss family) ---------------------------------------------------------

def cli(*argv):
    from megaswift.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 0


def test_import_export_round_trips_mxfp4_bitwise(hf, tmp_path):
    """An MXFP4 checkpoint imports (bf16 by default) as transformers' dequantized weights: the
    default export is them, bf16, with no quantization_config; --dtype mxfp4 gives back the
    source's bytes and config, which transformers loads. An fp32 import of the unquantized
    checkpoint exported mxfp4 is make_mxfp4_hf's copy of it (the quantizer tested above)."""
    ckpt, plain, same = (str(tmp_path / n) for n in ("ckpt", "plain", "same"))
    cli("import-hf", hf["mx"], ckpt)
    cli("export-hf", ckpt, plain)
    theirs = load_dequantized(hf["mx"]).state_dict()
    out = tensors(plain)
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    assert not [k for k in out if not torch.equal(out[k], theirs[k])]
    assert "quantization_config" not in json.load(open(os.path.join(plain, "config.json")))
    cli("export-hf", ckpt, same, "--dtype", "mxfp4")
    assert not same_bits(tensors(same), tensors(hf["mx"]))
    config = json.load(open(os.path.join(same, "config.json")))
    assert config["quantization_config"] == json.load(open(os.path.join(hf["mx"], "config.json")))["quantization_config"]
    assert "bfloat16" in (config.get("dtype"), config.get("torch_dtype"))
    model, info = load_dequantized(same, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(model.state_dict()[DOWN.format(1)], theirs[DOWN.format(1)])

    ckpt32, fresh = str(tmp_path / "ckpt32"), str(tmp_path / "fresh")
    cli("import-hf", hf["src"], ckpt32)
    cli("export-hf", ckpt32, fresh, "--dtype", "mxfp4")
    assert not same_bits(tensors(fresh), tensors(hf["mx"]))


def test_mxfp4_export_is_refused_in_one_line(hf, tmp_path, capsys):
    """For a family without gpt-oss's experts (CLI: exit 2, one line) and for a PEFT adapter."""
    from megaswift.checkpoint.model_state import read_meta
    from megaswift.cli import main
    from megaswift.convert.families import FAMILIES
    from megaswift.convert.hf_export import _write
    from megaswift.models.config import ModelConfig
    from megaswift.testing.tiny import make_tiny_hf

    dense, ckpt = make_tiny_hf("qwen3", str(tmp_path / "dense"), num_hidden_layers=1), str(tmp_path / "ckpt")
    cli("import-hf", dense, ckpt)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["export-hf", ckpt, str(tmp_path / "out"), "--dtype", "mxfp4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and not os.path.exists(tmp_path / "out"), err
    assert "writes gpt-oss's MoE expert weights in MXFP4, and a qwen3 checkpoint has no such experts" in err[0]
    meta = read_meta(ckpt)
    cfg = ModelConfig.from_dict(meta["model_config"])
    with pytest.raises(CheckpointError, match="a PEFT adapter cannot be exported in mxfp4; export it in bfloat16"):
        _write(ckpt, str(tmp_path / "peft"), {**meta, "lora": {}}, cfg, FAMILIES[cfg.family], "mxfp4", 1 << 30, False)
