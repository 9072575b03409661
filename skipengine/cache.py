"""A static, preallocated KV cache (gpt-fast style) that holds slots only for the layers that decode.

One K and one V buffer per owning layer, [batch, kv_heads, max_len, head_dim]. Skipped layers own no
slot: with prefill "full" their prompt KV is computed, attended to within the prompt, and dropped, since
no decode step reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StaticKVCache:
    def __init__(
        self,
        layers: Sequence[int],
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.slot = {layer: n for n, layer in enumerate(layers)}
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.max_len = max_len
        self.rows = batch_size  # rows [0, rows) are live; compact() moves survivors to the front

    def owns(self, layer: int) -> bool:
        return layer in self.slot

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [rows, kv_heads, T, D] at columns [start, start+T); return views of [0, start+T)."""
        n = self.slot[layer]
        end = start + k.shape[2]
        keys, values = self.keys[n][: self.rows], self.values[n][: self.rows]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def compact(self, survivors: torch.Tensor, length: int) -> None:
        """Keep rows `survivors` (indices into the live rows), moved to the front; columns [0, length)."""
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf[: len(survivors), :, :length] = buf[survivors, :, :length]
        self.rows = len(survivors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
