"""Perplexity of a model under a skip plan on held-out text, computed as generation would run it: each
window's first `context` tokens go through the plan's prefill layers (they play the prompt), every later
token through the kept layers only (the decode path), and only those later tokens are scored."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skipengine.finetune import Example, collate, response_logits
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
        targets = batch["input_ids"][:, 1:][batch["loss_mask"][:, 1:]]
        logits = response_logits(model, batch, plan).float()
        total_nll += F.cross_entropy(logits, targets, reduction="sum").item()
        total += targets.numel()
    return {"perplexity": math.exp(total_nll / total), "nll": total_nll / total, "tokens": total}
