"""MXFP4, the format gpt-oss publishes its expert weights in (OCP Microscaling: fp4 e2m1 values
in blocks of 32 sharing one power-of-two scale).

An expert weight `X` that transformers' GptOssExperts holds as [experts, in, out] in bf16
(`mlp.experts.gate_up_proj` [E, hidden, 2F], `mlp.experts.down_proj` [E, F, hidden]) is stored
transposed, out before in, as two uint8 tensors:

    X_blocks [E, out, in / 32, 16]   two e2m1 codes a byte: element 2i in the low nibble, 2i + 1 high
    X_scales [E, out, in / 32]       e8m0 exponents: block scale 2^(s - 127)

so that X[e, i, o] = FP4[code of blocks[e, o, i // 32, (i % 32) // 2]] * 2^(scales[e, o, i // 32] - 127).
A code's bit 3 is the sign and bits 0-2 index the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6. Biases
and every other tensor stay bf16; config.json says `quantization_config: {"quant_method": "mxfp4",
"modules_to_not_convert": [...]}`. Every finite value the format holds (a code of at most two
significant bits times a power of two) is a bf16 value, so the dequantization is exact in bf16:
import reads the experts as bf16 and loses nothing.

Import dequantizes whole experts (convert/hf_io.py reads only the bytes of a rank's experts);
export `--dtype mxfp4` quantizes here. Nothing in this module touches files.
"""
from __future__ import annotations

import math
import re

import torch

from megaswift.errors import CheckpointError

BLOCK = 32                 # elements sharing one scale
SCALE_BIAS = 127           # e8m0: scale = 2^(s - 127)
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
# the expert weights an mxfp4 export quantizes (3-D, [experts, in, out])
EXPERT_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")
FAMILIES = ("gpt_oss",)
"""Families whose experts are stored [experts, in, out] as gpt-oss's are: the layout MXFP4
checkpoints (and transformers' reading of them) are defined for."""

# e2m1 code -> value: bit 3 the sign, bits 0-2 the magnitude
_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_VALUES = _MAGNITUDES + tuple(-m for m in _MAGNITUDES)
# round to nearest, ties away from zero: magnitude code = how many of these midpoints are <= |x|
_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(_MAGNITUDES, _MAGNITUDES[1:]))
# floor(4 |x|) -> e2m1 code (how many midpoints are <= |x|), then the same with the sign bit set
_QUARTERS = torch.tensor([sum(q / 4 >= m for m in _MIDPOINTS) for q in range(29)], dtype=torch.uint8)
_QUARTERS = torch.cat([_QUARTERS, _QUARTERS | 8])
# scale byte -> 2^(s - 127) in fp32 (2^-127, byte 0, is an fp32 subnormal, still exact); 255 is
# e8m0's NaN (transformers' ldexp gives +-inf and NaN there)
_SCALES = [math.ldexp(1.0, s - SCALE_BIAS) for s in range(255)] + [math.nan]
_CHUNK_ELEMS = 1 << 22  # elements dequantized or quantized at a time: 16 MiB of fp32 scratch

# as gpt-oss-20b and -120b publish it: every linear but the experts in bf16
MODULES_TO_NOT_CONVERT = ("model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head")
_SUPPORTED = ("megaswift reads MXFP4 checkpoints as gpt-oss publishes them: quantization_config "
              "{quant_method: mxfp4, modules_to_not_convert: [module names]}")


def is_mxfp4(hf_config: dict, source: str = "config.json") -> bool:
    """Whether config.json's quantization_config is gpt-oss's MXFP4 (checked: a one-line
    CheckpointError for anything else in it, `dequantize: false` aside); False for another
    quant_method or none."""
    q = hf_config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "mxfp4":
        return False
    extra = sorted(set(q) - {"quant_method", "modules_to_not_convert"})
    if extra and not (extra == ["dequantize"] and q["dequantize"] is False):
        raise CheckpointError(f"{source}: quantization_config has {extra[0]!r}, which an mxfp4 config does not; "
                              f"{_SUPPORTED}")
    skip = q.get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(m, str) for m in skip)):
        raise CheckpointError(f"{source}: quantization_config.modules_to_not_convert is {skip!r}, not a list of "
                              f"module names; {_SUPPORTED}")
    return True


def quantization_config(unquantized: list[str] | None = None) -> dict:
    """config.json's quantization_config for an mxfp4 export, gpt-oss's: MODULES_TO_NOT_CONVERT,
    and after them any of `unquantized` (linear modules written in bf16, layer indices as `*`)
    those patterns do not already cover, as transformers matches them."""
    skip = list(MODULES_TO_NOT_CONVERT)
    for module in sorted({re.sub(r"\.layers\.\d+\.", ".layers.*.", m) for m in unquantized or ()}):
        if not any(re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", module) or module.endswith(p) for p in skip):
            skip.append(module)
    return {"modules_to_not_convert": skip, "quant_method": "mxfp4"}


def quantizable(name: str, shape) -> bool:
    """Whether an mxfp4 export quantizes HF tensor `name`: the 3-D expert weights."""
    return len(shape) == 3 and name.endswith(EXPERT_SUFFIXES)


def check_stored(blocks: str, bshape, bdtype: torch.dtype, scales: str, sshape,
                 sdtype: torch.dtype) -> tuple[int, int, int]:
    """The [experts, in, out] shape of the weight that the tensors `blocks` and `scales` (names,
    shapes, dtypes) store, or a one-line CheckpointError naming the one that does not fit."""
    for t, dtype in ((blocks, bdtype), (scales, sdtype)):
        if dtype != torch.uint8:
            raise CheckpointError(f"tensor {t!r} has dtype {dtype}; mxfp4 blocks and scales are uint8 "
                                  "(config.json's quantization_config says mxfp4)")
    if len(bshape) != 4 or bshape[3] != BLOCK // 2:
        raise CheckpointError(f"tensor {blocks!r} has shape {list(bshape)}; mxfp4 expert blocks are "
                              f"[experts, out, in / {BLOCK}, {BLOCK // 2}]")
    if tuple(sshape) != tuple(bshape[:3]):
        raise CheckpointError(f"tensor {scales!r} has shape {list(sshape)}, but {blocks!r} of shape "
                              f"{list(bshape)} needs {list(bshape[:3])}")
    return bshape[0], bshape[2] * BLOCK, bshape[1]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weights [E, in, out] that `blocks` [E, out, in / 32, 16] and `scales` [E, out, in / 32]
    stand for, in bf16 (exact), or written into `out` (any dtype, any view) and `out` returned.
    The values are transformers' (convert_moe_packed_tensors) bit for bit, scale byte 255 (NaN
    here) aside. Done a run of rows at a time, so the fp32 scratch is at most _CHUNK_ELEMS."""
    e, o, g, half = blocks.shape
    if out is None:
        out = torch.empty(e, g * BLOCK, o, dtype=torch.bfloat16)
    if not out.numel():
        return out
    pairs = torch.tensor([[FP4_VALUES[b & 0xF], FP4_VALUES[b >> 4]] for b in range(256)])  # byte -> (low, high)
    table = torch.tensor(_SCALES, dtype=torch.float32)
    rows = blocks.reshape(e * o, g * half)
    exps = scales.reshape(e * o, g)
    step = max(1, _CHUNK_ELEMS // (g * BLOCK))
    for r in range(0, e * o, step):
        k = min(step, e * o - r)
        vals = torch.nn.functional.embedding(rows[r:r + k].int(), pairs).view(k, g, BLOCK)
        vals.mul_(table[exps[r:r + k].int()].unsqueeze(-1))
        for x in range(r // o, (r + k - 1) // o + 1):  # each expert the run touches: [rows, in] -> [in, rows]
            lo, hi = max(r, x * o), min(r + k, (x + 1) * o)
            out[x, :, lo - x * o:hi - x * o].copy_(vals[lo - r:hi - r].view(hi - lo, g * BLOCK).t())
    return out


def scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """The e8m0 scale byte of blocks whose largest magnitude is `amax`: the biased exponent of the
    smallest power of two s with amax <= 7 s (at least 2^-127, byte 0; an all-zero block gets
    byte 0), read off amax's bits (no division). Then amax / s lies in (3.5, 7]: the block's
    largest element rounds to 4 or 6 (6 when it saturates, by at most 1, half e2m1's top step),
    so every element is within half an e2m1 step of its value, and quantizing the dequantized
    block finds the same s (4 s and 6 s give s back) and the same codes: a fixed point.

    OpenAI's quantizer (triton_kernels' downcast_to_mxfp_torch, DequantScaleRoundingMode.
    ROUND_UP, which transformers' quantize_to_mxfp4 calls; transformers has none of its own)
    takes the smallest s >= amax / 6 instead, amax / s in (3, 6]. The two agree except where
    amax / s falls in (3, 3.5) under OpenAI's rule (about a fifth of the blocks of Gaussian
    weights): there OpenAI's largest element rounds to 3, its dequantized block re-quantizes
    to s / 2 (so that export would not be a fixed point), and this rule takes s / 2 at once,
    whose grid holds every point of s's: each element is at least as close as OpenAI's."""
    # amax = 1.m x 2^(b - 127) (b its biased exponent): 2^(b - 129) x 7 >= amax iff 1.m <= 1.75,
    # that is m <= 0x600000; else 2^(b - 128). Subnormals and zero (b = 0) clamp to byte 0.
    bits = amax.float().view(torch.int32)
    return ((bits >> 23) - 2 + ((bits & 0x7FFFFF) > 0x600000).int()).clamp_(0, 254).to(torch.uint8)


def encode(x: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8, 0-15) of fp32 values already divided by their block's scale: the nearest
    of the 8 magnitudes, ties away from zero, saturating at 6, the sign kept (-0.0 and a negative
    value that rounds to 0 are code 8), as OpenAI's quantizer rounds."""
    # every midpoint between e2m1 values is a multiple of 1/4, so floor(4 |x|) (exact: x 4 is) picks
    # the code; 28 (|x| >= 7) and above saturate. Index 29 + q: the same, negative.
    q = x.abs().mul_(4).clamp_(max=28).to(torch.uint8)
    q.add_(torch.signbit(x).view(torch.uint8).mul(29))
    return torch.take(_QUARTERS, q.long())


def quantize(name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of the expert weight `w` [E, in, out] (fp32, bf16 or fp16, quantized from
    its exact values: an fp32 `w` is rounded once, not through bf16 first as transformers'
    quantize_to_mxfp4 does): each run of 32 along `in` gets scale_exponents(its amax), each
    element encode(w / scale). Every element is within half an e2m1 step of its value times
    the scale (0.25 s below 2 s, 0.5 s below 4 s, s above), and quantize(dequantize(q)) == q
    for every q made here. `name` is for the errors: `in` must be a multiple of 32 and the
    weights finite. Works an expert and a few MiB of rows at a time."""
    if w.ndim != 3:
        raise CheckpointError(f"tensor {name!r} has shape {list(w.shape)}; mxfp4 quantizes 3-D expert weights "
                              "[experts, in, out]")
    e, i, o = w.shape
    if i % BLOCK:
        raise CheckpointError(f"tensor {name!r} has shape {list(w.shape)}: its input dimension {i} is not a "
                              f"multiple of {BLOCK}, mxfp4's block; export it in bfloat16")
    g = i // BLOCK
    blocks = torch.empty(e, o, g, BLOCK // 2, dtype=torch.uint8)
    scales = torch.empty(e, o, g, dtype=torch.uint8)
    step = max(1, _CHUNK_ELEMS // max(i, 1))
    inv_table = torch.tensor(_SCALES[:-1], dtype=torch.float32)
    for x in range(e):
        for c in range(0, o, step):
            k = min(step, o - c)
            v = torch.empty(k, i, dtype=torch.float32)  # a copy: scaled in place below
            v.copy_(w[x, :, c:c + k].t())
            v = v.view(k, g, BLOCK)  # [out rows, blocks, 32]
            amax = v.abs().amax(dim=-1)
            if not bool(torch.isfinite(amax).all()):
                raise CheckpointError(f"tensor {name!r} holds inf or NaN, which mxfp4 cannot represent; "
                                      "export a finite checkpoint")
            s = scale_exponents(amax)
            # 1 / 2^k (2^-126 ... 2^127) is exact, so this is v / scale, rounded once (by encode)
            inv = inv_table[SCALE_BIAS * 2 - s.long()]
            codes = encode(v.mul_(inv.unsqueeze(-1))).view(k, g, BLOCK // 2, 2)
            blocks[x, c:c + k] = codes[..., 0] | (codes[..., 1] << 4)
            scales[x, c:c + k] = s
    return blocks, scales
