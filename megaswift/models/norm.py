"""RMSNorm, as HF's LlamaRMSNorm computes it (for parity)."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalises in fp32 and scales in the input dtype, as HF's LlamaRMSNorm does (for parity)."""

    def __init__(self, size: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
