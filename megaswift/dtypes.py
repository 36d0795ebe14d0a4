"""The dtype names megaswift accepts (model.dtype, --dtype) and the torch dtypes they stand for.

Which dtype each thing uses (fp32 master weights, the autocast compute dtype, a checkpoint's
dtype) is decided in megaswift/build.py; this is only the table of names.
"""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

FP8_BLOCK = "fp8-block"
"""An export format, not a dtype models hold: 2-D linear weights in float8_e4m3fn with per-block
fp32 scales (DeepSeek-V3's format, convert/fp8.py), everything else in bf16."""

MXFP4 = "mxfp4"
"""An export format: gpt-oss's MoE expert weights in MXFP4 (fp4 e2m1 in blocks of 32 with a
power-of-two scale, convert/mxfp4.py), everything else in bf16."""

EXPORT_FORMATS = (*DTYPES, FP8_BLOCK, MXFP4)
"""What export-hf --dtype accepts."""


def dtype_name(dtype: torch.dtype, default: str = "float32") -> str:
    """The name of a torch dtype in DTYPES, else `default`."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, default)
