"""KVCache: the keys and values of every layer a rank holds, for incremental decoding.

Rows are left-padded prompts of different lengths followed by generated tokens; some rows finish
before others. Rather than tracking offsets per row, the cache keeps, per slot, whether it holds a
real token (`valid`) and that token's position id, and each forward builds one boolean mask:
query i of a row sees key j when j is valid, not after i, and (sliding-window layers) within the
window by position. Padding and the filler tokens fed to finished rows are never valid, so they
change no other token's output; their own outputs are thrown away.

One cache serves all the layers of a rank (keyed by global layer index), also under pipeline
parallelism, where the rank's stages hold different layers; `begin` runs once per forward.

Linear-attention layers (Gated DeltaNet, models/deltanet.py) keep no keys: per row they carry a
conv state (the last K-1 conv inputs, [b, K-1, channels]) and the delta rule's recurrent state
([b, value heads, dk, dv], float32), replaced by each forward (`linear_state`,
`set_linear_state`). Under tp both hold the rank's own heads and channels.
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, batch: int, max_len: int, device=None):
        self.batch, self.max_len = batch, max_len
        self.length = 0  # slots written by the forwards before the current one
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        self.conv: dict[int, Tensor] = {}  # linear-attention layers: last K-1 conv inputs [b, K-1, c]
        self.recurrent: dict[int, Tensor] = {}  # linear-attention layers: state [b, h_v, dk, dv] fp32
        self._new = 0
        self._masks: dict[int | None, Tensor] = {}

    def begin(self, valid: Tensor, positions: Tensor) -> None:
        """Announce the next forward's tokens: valid/positions [b, n]."""
        n = valid.shape[1]
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.length} written, {n} more asked")
        end = self.length + n
        self.valid[:, self.length:end] = valid
        self.positions[:, self.length:end] = positions
        self._new, self._masks = n, {}

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this forward's k/v [b, n, h_kv, d] for `layer`; return all of it so far."""
        if layer not in self.k:
            shape = (self.batch, self.max_len) + tuple(k.shape[2:])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros((self.batch, self.max_len) + tuple(v.shape[2:]))  # MLA: v heads are narrower
        end = self.length + self._new
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def new_valid(self) -> Tensor:
        """Bool [b, n]: which of this forward's tokens are real (not padding or a finished row's filler)."""
        return self.valid[:, self.length:self.length + self._new]

    def linear_state(self, layer: int) -> tuple[Tensor | None, Tensor | None]:
        """(conv state, recurrent state) of linear-attention `layer` before this forward; None
        before its first forward (the states start at zero)."""
        return self.conv.get(layer), self.recurrent.get(layer)

    def set_linear_state(self, layer: int, conv: Tensor, recurrent: Tensor) -> None:
        """The states after this forward's tokens."""
        self.conv[layer], self.recurrent[layer] = conv, recurrent

    def mask(self, window: int | None) -> Tensor:
        """Boolean [b, n, end]: True where this forward's query i may see cached key j."""
        if window not in self._masks:
            start, end = self.length, self.length + self._new
            q_slot = torch.arange(start, end, device=self.valid.device)[:, None]
            k_slot = torch.arange(end, device=self.valid.device)[None, :]
            visible = self.valid[:, None, :end] & (k_slot <= q_slot)[None]
            if window is not None:
                q_pos = self.positions[:, start:end, None]
                visible = visible & (q_pos - self.positions[:, None, :end] < window)
            self._masks[window] = visible
        return self._masks[window]

    def advance(self) -> None:
        """The forward is done: its tokens become part of every later forward's keys."""
        self.length += self._new
        self._new, self._masks = 0, {}
