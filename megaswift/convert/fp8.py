"""FP8 block quantization, the format DeepSeek-V3 and Kimi-K2 publish and vLLM / SGLang serve.

A quantized weight `X.weight` [out, in] is stored as float8_e4m3fn beside `X.weight_scale_inv`, a
float32 grid [ceil(out / br), ceil(in / bc)] for the block size (br, bc) of config.json's
`quantization_config.weight_block_size`; the real weight is

    w[i, j] = float(q[i, j]) * scale_inv[i // br, j // bc]

(the name says "inverse" from the quantizer's point of view: q = w / scale_inv). Import
dequantizes (convert/hf_io.py reads only the fp8 bytes and scale blocks of a rank's slice);
export `--dtype fp8-block` quantizes here. Nothing in this module touches files.
"""
from __future__ import annotations

import math

import torch

from megaswift.errors import CheckpointError

E4M3_MAX = 448.0
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
# An all-zero block, or one so small that amax / 448 is an fp32 subnormal, gets the smallest
# normal fp32 as its scale: a power of two, so q * scale and q * scale / scale are exact, and
# re-deriving the scale from the dequantized block gives it back (see block_scales).
MIN_SCALE = 2.0 ** -126
_SCALE_DTYPES = {torch.float32, torch.bfloat16, torch.float16, getattr(torch, "float8_e8m0fnu", torch.float32)}
_CHUNK_ELEMS = 1 << 22  # dequantize this many elements at a time: its fp32 scratch is 16 MiB

# 2-D weights that stay unquantized even in an fp8 checkpoint: embeddings and output heads
# (lm_head, the MTP layer's shared_head.head), the MTP projection (serving engines build eh_proj
# as a plain nn.Linear), and MoE routers and shared-expert gates (tiny, and precision-critical).
_NEVER_QUANTIZED = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight", "eh_proj.weight",
                    ".gate.weight", "shared_expert_gate.weight")


def block_config(hf_config: dict, source: str = "config.json") -> tuple[int, int] | None:
    """The (rows, cols) block size of an fp8 block-quantized checkpoint, None when config.json has
    no quantization_config; a one-line CheckpointError for a quantization megaswift cannot read."""
    q = hf_config.get("quantization_config")
    if q is None:
        return None
    supported = ("megaswift reads fp8 block-quantized checkpoints (quant_method fp8, fmt e4m3, "
                 "weight_block_size, dynamic activations: DeepSeek-V3, Kimi-K2), MXFP4 experts (gpt-oss) "
                 "and unquantized ones")
    if not isinstance(q, dict):
        raise CheckpointError(f"{source}: quantization_config is a {type(q).__name__}, not an object; {supported}")
    method = q.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"{source}: quantization_config.quant_method {method!r} is not supported; {supported}")
    if q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{source}: quantization_config.fmt {q['fmt']!r} is not supported; {supported}")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(f"{source}: quantization_config.activation_scheme {q['activation_scheme']!r} "
                              f"is not supported; {supported}")
    if q.get("scale_fmt", "float") not in ("float", "ue8m0"):  # ue8m0: power-of-two scales, read as any other
        raise CheckpointError(f"{source}: quantization_config.scale_fmt {q['scale_fmt']!r} is not supported; {supported}")
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"{source}: quantization_config.weight_block_size is {block!r}, not two positive "
                              f"integers (per-tensor fp8 is not supported); {supported}")
    return int(block[0]), int(block[1])


def quantization_config(block: tuple[int, int] = DEFAULT_BLOCK, unquantized: list[str] | None = None) -> dict:
    """config.json's quantization_config for an fp8-block export. `unquantized`: the linear modules
    left in bf16 (routers, lm_head), which transformers and vLLM read as modules_to_not_convert."""
    q = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}
    if unquantized:
        q["modules_to_not_convert"] = sorted(unquantized)
    return q


def quantizable(name: str, shape) -> bool:
    """Whether an fp8-block export quantizes HF tensor `name`: every 2-D linear weight but the
    ones listed in _NEVER_QUANTIZED (norms, biases and e_score_correction_bias are 1-D)."""
    return len(shape) == 2 and name.endswith(".weight") and not name.endswith(_NEVER_QUANTIZED)


def scale_shape(shape, block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def block_scales(amax: torch.Tensor) -> torch.Tensor:
    """Per-block scales (fp32) for blocks whose largest magnitude is `amax`: s = fl(amax / 448),
    at least MIN_SCALE. Quantizing, dequantizing in fp32 and quantizing again gives the same bits.

    Why: a block's largest element quantizes to q = 448 (amax / s rounds to within an fp32 ulp
    of 448, and e4m3 has nothing between 416 and 448), so the dequantized block's amax is
    a' = fl(448 s), and its re-derived scale fl(a' / 448). The x with fl(x / 448) = s form an
    interval centred on 448 s (but where s is a power of two), which holds amax; a' is the fp32
    value nearest that centre, no farther from it than amax, so it lies in the interval too and
    fl(a' / 448) = s. Not every
    fp32 s is such a fixed point (about 11% of mantissas have fl(fl(448 s) / 448) != s: 448 =
    7 x 2^6, and the rounding of 7 s is not always undone), but every s = fl(amax / 448) is:
    tests/unit/test_fp8.py checks each fp32 mantissa of amax (scaling by 2^k is exact, so one
    binade stands for all normal ones). With s fixed, every other element comes back too:
    fl(fl(q s) / s) is within 2 fp32 ulps of q, and e4m3 values lie at least 2^-4 apart
    relative to themselves, so it rounds to q again. MIN_SCALE is a power of two, for which
    all of this is exact. Division here is IEEE fp32 (CPU tensors; the export runs on CPU)."""
    return (amax.float() / E4M3_MAX).clamp_min(MIN_SCALE)


def quantize(name: str, w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, fp32 scale_inv grid) of the 2-D weight `w`; the scale of a block is
    block_scales(its amax), q = e4m3(clamp(w / scale, +-448)). `name` is for the error naming a
    non-finite weight (which has no fp8 form)."""
    rows, cols = w.shape
    br, bc = block
    grid = scale_shape(w.shape, block)
    padded = torch.zeros(grid[0] * br, grid[1] * bc, dtype=torch.float32)  # edge blocks: zeros change no amax
    padded[:rows, :cols] = w
    blocks = padded.view(grid[0], br, grid[1], bc)
    amax = blocks.abs().amax(dim=(1, 3))
    if not bool(torch.isfinite(amax).all()):
        raise CheckpointError(f"tensor {name!r} holds inf or NaN, which fp8 cannot represent; export a finite checkpoint")
    scale = block_scales(amax)
    blocks.div_(scale[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    q = padded[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale


def check_scale(name: str, shape, scale_name: str, scale_shape_found, scale_dtype: torch.dtype,
                weight_dtype: torch.dtype, block: tuple[int, int]) -> None:
    """One line naming the tensor when a quantized weight and its scale grid do not fit together."""
    if weight_dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"tensor {name!r} has a {scale_name.rsplit('.', 1)[-1]} but dtype {weight_dtype}, not "
                              "float8_e4m3fn (config.json's quantization_config says fmt e4m3)")
    if len(shape) != 2:
        raise CheckpointError(f"tensor {name!r} is quantized with shape {list(shape)}; block fp8 weights are 2-D")
    want = scale_shape(shape, block)
    if tuple(scale_shape_found) != want:
        raise CheckpointError(f"tensor {scale_name!r} has shape {list(scale_shape_found)}, but {name!r} of shape "
                              f"{list(shape)} in blocks of {list(block)} needs {list(want)}")
    if scale_dtype not in _SCALE_DTYPES:
        raise CheckpointError(f"tensor {scale_name!r} has dtype {scale_dtype}; fp8 block scales are float32 "
                              "(or bf16, fp16, e8m0)")


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], offset: tuple[int, int] = (0, 0),
               out: torch.Tensor | None = None) -> torch.Tensor:
    """float(q) * scale in fp32, written into `out` (any dtype, any view; fp32 when None). `q` is the
    box of a quantized weight at `offset` (row, col), `scale` the rows and columns of the scale
    grid that cover it, starting at block (row // br, col // bc): a box need not start or end on
    a block edge. Done in row chunks, so the fp32 scratch is at most _CHUNK_ELEMS."""
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32)
    rows, cols = q.shape
    if not q.numel():
        return out
    (br, bc), (r0, c0) = block, offset
    scale = scale.float()
    row_block = torch.div(torch.arange(r0, r0 + rows), br, rounding_mode="floor") - r0 // br
    col_block = torch.div(torch.arange(c0, c0 + cols), bc, rounding_mode="floor") - c0 // bc
    per_col = scale.index_select(1, col_block)  # [scale rows, cols]
    step = max(1, _CHUNK_ELEMS // cols)
    for i in range(0, rows, step):
        k = min(step, rows - i)
        s = per_col.index_select(0, row_block[i:i + k])
        out[i:i + k].copy_(q[i:i + k].float().mul_(s))
    return out
