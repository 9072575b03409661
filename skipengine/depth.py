"""A forward pass in which each token runs its own set of layers, through HF's own modules.

A token that does not run layer l passes its hidden state through unchanged (the residual stream), and
so contributes that layer's K/V from its current state only where it ran. This is how ULS trains (the
prompt runs every layer, the response only the kept ones, loss on the response) and the cache-free
reference the engine is checked against.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from skipengine.plan import SkipPlan


class _TokenGatedLayer(nn.Module):
    """Runs `layer` and keeps its output only where `runs` [B, T] is True."""

    def __init__(self, layer: nn.Module, runs: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.runs = runs

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.layer(hidden_states, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return torch.where(self.runs[..., None], out, hidden_states)


@contextmanager
def token_depth(model: nn.Module, runs: torch.Tensor) -> Iterator[nn.Module]:
    """Within the block, model(...) runs layer l for token (b, t) only where runs[l, b, t]."""
    layers = model.model.layers
    original = list(layers)
    if runs.shape[0] != len(original):
        raise ValueError(f"runs has {runs.shape[0]} layers; the model has {len(original)}")
    try:
        for i, layer in enumerate(original):
            layers[i] = _TokenGatedLayer(layer, runs[i])
        yield model
    finally:
        for i, layer in enumerate(original):
            layers[i] = layer


def plan_runs(plan: SkipPlan, is_prompt: torch.Tensor) -> torch.Tensor:
    """runs [L, B, T]: prompt tokens (is_prompt [B, T]) run plan.prefill_layers, the others
    plan.kept_layers."""
    prefill = torch.zeros(plan.num_layers, dtype=torch.bool, device=is_prompt.device)
    prefill[list(plan.prefill_layers)] = True
    decode = torch.zeros_like(prefill)
    decode[list(plan.kept_layers)] = True
    return torch.where(is_prompt[None], prefill[:, None, None], decode[:, None, None])
