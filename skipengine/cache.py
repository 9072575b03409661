"""A static, preallocated KV cache (gpt-fast style) that holds slots only for the layers that decode.

One K and one V buffer per owning layer, [batch, kv_heads, max_len, head_dim], all views of one stacked
buffer per kind, so that a write to many layers (an adaptive exit's K/V fill) or a compaction is one op.
Skipped layers own no slot: with prefill "full" their prompt KV is computed, attended to within the
prompt, and dropped, since no decode step reads it.
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
        self._stacked = [torch.zeros((len(self.slot), *shape), dtype=dtype, device=device) for _ in "kv"]
        self.keys, self.values = (list(buf.unbind(0)) for buf in self._stacked)  # [slot] views
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

    def write_many(
        self, layers: Sequence[int], rows: torch.Tensor, cols: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """k, v [J, N, kv_heads, D] of `layers` for the N tokens at (rows, cols) [N]: one write per kind."""
        slots = torch.tensor([self.slot[layer] for layer in layers], device=rows.device)[:, None]
        self._stacked[0][slots, rows[None], :, cols[None]] = k
        self._stacked[1][slots, rows[None], :, cols[None]] = v

    def compact(self, survivors: torch.Tensor, length: int) -> None:
        """Keep rows `survivors` (indices into the live rows), moved to the front; columns [0, length)."""
        for buf in self._stacked:
            buf[:, : len(survivors), :, :length] = buf[:, survivors, :, :length]
        self.rows = len(survivors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._stacked)
