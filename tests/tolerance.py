"""Float tolerances that follow the dtype, the reduction length and the depth, not a bare 1e-5.

Two correct computations of the same value differ by rounding wherever they sum in a different order:
one CPU's kernels use AVX2, another's AVX-512 or AMX, and a batched product splits its sums otherwise
than a row-by-row one. Each dot product of length K then differs by about eps * sqrt(K) of the values'
scale, and the differences add up over the layers a state passes through. A bug moves values by a sizeable
fraction of that scale, far beyond this bound.
"""

from __future__ import annotations

import math

import torch

SLACK = 8  # how far past the typical rounding difference a correct result may land


def kernel_rtol(dtype: torch.dtype, reduction: int, depth: int = 1) -> float:
    """The relative rounding difference allowed after `depth` layers of dot products of length `reduction`;
    also that of a perplexity, which is the exponential of a mean of such values."""
    return SLACK * torch.finfo(dtype).eps * math.sqrt(reduction) * depth


def kernel_tolerance(expected: torch.Tensor, reduction: int, depth: int = 1) -> tuple[float, float]:
    """(atol, rtol) for values of `expected` computed through `depth` layers whose longest dot products
    have length `reduction` (the hidden or MLP width). A value near zero can still be a sum of large
    terms, so the absolute part follows the tensor's RMS, and the relative part its own size."""
    rtol = kernel_rtol(expected.dtype, reduction, depth)
    rms = expected.detach().float().pow(2).mean().sqrt().item()
    return rtol * max(rms, 1.0), rtol


def assert_kernel_close(actual: torch.Tensor, expected: torch.Tensor, reduction: int, depth: int = 1) -> None:
    """actual equals expected up to the rounding that summation order explains (see the module doc)."""
    atol, rtol = kernel_tolerance(expected, reduction, depth)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
