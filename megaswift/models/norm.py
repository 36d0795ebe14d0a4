"""RMSNorm, as HF computes it (for parity): Llama's, and the zero-centred form of Qwen3-Next."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalises in fp32 and scales in the input dtype, as HF's LlamaRMSNorm does (for parity).

    `zero_centered` (Qwen3-Next, Qwen3.5): the weight is stored as w - 1, initialised to 0, and the
    scaling by (1 + w) happens in fp32 before the cast, as HF's Qwen3NextRMSNorm computes it;
    weight decay then pulls the scale towards 1, not 0."""

    def __init__(self, size: int, eps: float, dtype=None, device=None, zero_centered: bool = False):
        super().__init__()
        self.zero_centered = zero_centered
        init = torch.zeros if zero_centered else torch.ones
        self.weight = nn.Parameter(init(size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (x32 * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)
