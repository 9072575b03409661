"""Perplexity of a model under a skip plan on held-out text, computed as generation would run it: each
window's first `context` tokens go through the plan's prefill layers (they play the prompt), every later
token through the kept layers only (the decode path), and only those later tokens are scored.

Under adaptive exits every token, prompt or not, leaves by the plan's rule. One forward over a window is
then the same as decoding it token by token: a token's exit and its K/V fill depend only on itself and
earlier tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skipengine.adaptive import AdaptivePlan, adaptive_layers
from skipengine.cache import StaticKVCache
from skipengine.control import kv_fraction, layer_speedup
from skipengine.depth import plan_runs
from skipengine.finetune import Example, collate, response_logits, response_targets
from skipengine.plan import SkipPlan


def windows(ids: Sequence[int], length: int, count: int) -> list[list[int]]:
    """The first `count` non-overlapping windows of `length` tokens."""
    if len(ids) < length:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {length}")
    return [list(ids[i : i + length]) for i in range(0, len(ids) - length + 1, length)][:count]


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    token_windows: Sequence[Sequence[int]],
    plan: SkipPlan | None,
    context: int = 32,
    batch_size: int = 8,
) -> dict:
    """{"perplexity", "nll", "tokens"} over the scored tokens of all windows (plan None: full depth)."""
    total_nll, total = 0.0, 0
    for i in range(0, len(token_windows), batch_size):
        examples = [Example(list(w[:context]), list(w[context:])) for w in token_windows[i : i + batch_size]]
        batch = collate(examples, pad_id=0, max_len=max(len(w) for w in token_windows))
        targets = response_targets(batch)
        runs = None if plan is None else plan_runs(plan, batch["is_prompt"])
        logits = response_logits(model, batch, runs).float()
        total_nll += F.cross_entropy(logits, targets, reduction="sum").item()
        total += targets.numel()
    return {"perplexity": math.exp(total_nll / total), "nll": total_nll / total, "tokens": total}


@torch.inference_mode()
def adaptive_perplexity(
    engine, token_windows: Sequence[Sequence[int]], plan: AdaptivePlan, context: int = 32
) -> dict:
    """{"perplexity", "nll", "tokens", "layers_per_token", "layer_speedup"} of the engine's model under
    adaptive exits, scoring the tokens after each window's first `context`; the layers count every
    token of the windows, K/V fills priced as in the job's stats."""
    ad, dev = engine.adapter, engine.device
    total_nll, total, layers, tokens = 0.0, 0, 0, 0
    for window in token_windows:  # one at a time: logits [T, vocab] over a 49k-262k vocabulary
        ids = torch.tensor([list(window)], device=dev)
        positions = torch.arange(len(window), device=dev)[None]
        pad = torch.zeros(1, dtype=torch.long, device=dev)
        cache = StaticKVCache(
            plan.kept_layers, 1, ad.num_kv_heads, len(window), ad.head_dim, engine.dtype, dev
        )
        hidden, depth = adaptive_layers(engine, ad.embed(ids), positions, pad, 0, plan, cache)
        logits = ad.logits(hidden[0, context - 1 : -1]).float()  # [T - context, vocab]
        total_nll += F.cross_entropy(logits, ids[0, context:], reduction="sum").item()
        total += len(window) - context
        layers, tokens = layers + int(depth.sum()), tokens + len(window)
    per_token = layers / tokens
    return {
        "perplexity": math.exp(total_nll / total),
        "nll": total_nll / total,
        "tokens": total,
        "layers_per_token": per_token,
        "layer_speedup": layer_speedup(plan.num_layers, per_token, kv_fraction(ad)),
    }
