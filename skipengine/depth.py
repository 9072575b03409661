"""A forward pass in which each token runs its own set of layers, through HF's own modules.

A token that does not run layer l passes its hidden state through unchanged (the residual stream), and
so contributes that layer's K/V from its current state only where it ran. This is how ULS trains (the
prompt runs every layer, the response only the kept ones, loss on the response) and the cache-free
reference the engine is checked against.

The same gate trains adaptive early exit: a token that exits after layer e keeps h_e for every deeper
layer, so each deeper layer computes its K/V from norm_l(h_e), which is exactly ADEPT's decoupled fill
(skipengine.adaptive), and its prediction is the final norm and LM head on h_e.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from skipengine.adaptive import AdaptivePlan
from skipengine.plan import SkipPlan


class _SkippedLayer(nn.Module):
    """A layer no token runs: the residual stream passes through and no K/V is written."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


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
def token_depth(model: nn.Module, runs: torch.Tensor, drop_idle: bool = False) -> Iterator[nn.Module]:
    """Within the block, model(...) runs layer l for token (b, t) only where runs[l, b, t]. A layer every
    token runs is called as is. With drop_idle, a layer no token runs is left out, so it writes no K/V
    either: right for a forward's last pass (nothing later reads them), as a static plan's decode is."""
    layers = model.model.layers
    original = list(layers)
    if runs.shape[0] != len(original):
        raise ValueError(f"runs has {runs.shape[0]} layers; the model has {len(original)}")
    gated = []  # same length and order: HF indexes per-layer settings (e.g. Gemma's window) by position
    for layer, layer_runs in zip(original, runs, strict=True):
        if layer_runs.all():
            gated.append(layer)
        elif drop_idle and not layer_runs.any():
            gated.append(_SkippedLayer())
        else:
            gated.append(_TokenGatedLayer(layer, layer_runs))
    model.model.layers = nn.ModuleList(gated)
    try:
        yield model
    finally:
        model.model.layers = layers


def plan_runs(plan: SkipPlan, is_prompt: torch.Tensor) -> torch.Tensor:
    """runs [L, B, T]: prompt tokens (is_prompt [B, T]) run plan.prefill_layers, the others
    plan.kept_layers."""
    prefill = torch.zeros(plan.num_layers, dtype=torch.bool, device=is_prompt.device)
    prefill[list(plan.prefill_layers)] = True
    decode = torch.zeros_like(prefill)
    decode[list(plan.kept_layers)] = True
    return torch.where(is_prompt[None], prefill[:, None, None], decode[:, None, None])


def exit_runs(depth: torch.Tensor, num_layers: int) -> torch.Tensor:
    """runs [L, B, T] for tokens that run their first depth[b, t] layers, then exit."""
    layers = torch.arange(num_layers, device=depth.device)
    return layers[:, None, None] < depth[None]


def sample_exit_depths(
    plan: AdaptivePlan, shape: tuple[int, ...], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Layers run per token [shape] for exit-aware training: each token exits with probability p at an
    exit point drawn uniformly, else runs every layer; p makes the mean depth L / plan.target_speedup
    (K/V fills not priced), capped at 1 when exits alone cannot reach it."""
    layers = plan.num_layers
    exit_depths = torch.tensor([e + 1 for e in plan.exit_layers], dtype=torch.float)
    target_depth = layers / plan.target_speedup
    p_exit = min(1.0, max(0.0, (layers - target_depth) / (layers - exit_depths.mean().item())))
    exits = torch.rand(shape, generator=generator) < p_exit
    drawn = exit_depths[torch.randint(len(exit_depths), shape, generator=generator)].long()
    return torch.where(exits, drawn, torch.full(shape, layers))


def training_runs(
    plan: SkipPlan | AdaptivePlan, is_prompt: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """runs [L, B, T] as inference would run the plan: a static plan's prefill and kept layers, or
    adaptive exits sampled per token (prompt tokens exit too, as ADEPT's prefill does)."""
    if isinstance(plan, AdaptivePlan):
        depth = sample_exit_depths(plan, tuple(is_prompt.shape), generator)
        return exit_runs(depth.to(is_prompt.device), plan.num_layers)
    return plan_runs(plan, is_prompt)
