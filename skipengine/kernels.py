"""Inference-only linear layers with weights prepared once.

On CPU in fp32, torch's default GEMM (MKL) reaches 6-19 GB/s of weight bandwidth on this machine's AMD
EPYC; oneDNN with a prepacked weight reaches 2-3x that (measured by python -m jobs.bench_kernels).
Decode at small batch is weight-bandwidth bound, so this is most of the engine's speed. Elsewhere
(CUDA, other dtypes) it is plain F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_BATCH_HINT = 32  # oneDNN picks its weight layout for this many rows; best for 1..32 here


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class FrozenLinear:
    """y = x @ weight.T + bias, for weights that no longer change (a snapshot: re-create after edits)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True):
        weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.out_features = weight.shape[0]
        self.packed = None
        if pack and can_pack(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        self.weight = None if self.packed is not None else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def fuse(cls, linears: list[torch.nn.Linear], pack: bool = True) -> FrozenLinear:
        """One linear computing several that share an input, outputs concatenated in order."""
        weight = torch.cat([m.weight.detach() for m in linears])
        bias = None
        if any(m.bias is not None for m in linears):
            zeros = [torch.zeros(m.out_features, dtype=weight.dtype, device=weight.device) for m in linears]
            bias = torch.cat(
                [z if m.bias is None else m.bias.detach() for z, m in zip(zeros, linears, strict=True)]
            )
        return cls(weight, bias, pack)
