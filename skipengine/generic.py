"""The static plan for any other HF generative model: keep only the plan's decoder layers and call
HF generate. Covers encoder-decoder translators (Marian, NLLB, T5, BART) and decoder-only models the
engine has no adapter for. Prefill and decode then run the same layers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from skipengine.outputs import GenerationStats
from skipengine.plan import SkipPlan
from skipengine.sampling import SamplingParams, find_stop

LAYER_LIST_NAMES = ("layers", "block", "h")  # Llama/Marian/BART/NLLB, T5, GPT-2
LAYER_COUNT_KEYS = ("decoder_layers", "num_decoder_layers", "num_hidden_layers", "n_layer")


def decoder_layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """The module that holds the decoder's layer ModuleList, and that attribute's name."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for owner in (decoder, getattr(decoder, "model", None), getattr(model, "transformer", None)):
        for name in LAYER_LIST_NAMES:
            if owner is not None and isinstance(getattr(owner, name, None), nn.ModuleList):
                return owner, name
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; it cannot take a skip plan")


def num_decoder_layers(model: nn.Module) -> int:
    owner, name = decoder_layer_list(model)
    return len(getattr(owner, name))


def max_positions(model: nn.Module) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


@contextmanager
def pruned_decoder(model: nn.Module, kept_layers: tuple[int, ...]) -> Iterator[nn.Module]:
    """Within the block the model's decoder has only `kept_layers`, renumbered 0..n-1 for the KV cache."""
    owner, name = decoder_layer_list(model)
    original = getattr(owner, name)
    if len(kept_layers) == len(original):
        yield model
        return
    kept = [original[i] for i in kept_layers]
    renumbered = [(m, m.layer_idx) for layer in kept for m in layer.modules() if hasattr(m, "layer_idx")]
    config = model.get_decoder().config if hasattr(model, "get_decoder") else model.config
    count_keys = [k for k in LAYER_COUNT_KEYS if getattr(config, k, None) == len(original)]
    try:
        setattr(owner, name, nn.ModuleList(kept))
        for new_idx, layer in enumerate(kept):
            for m in layer.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = new_idx
        for key in count_keys:
            setattr(config, key, len(kept))
        yield model
    finally:
        setattr(owner, name, original)
        for m, idx in renumbered:
            m.layer_idx = idx
        for key in count_keys:
            setattr(config, key, len(original))


class _FirstTokenClock(LogitsProcessor):
    """Marks when the first next-token scores arrive: the end of prefill."""

    def __init__(self) -> None:
        self.first_at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first_at is None:
            self.first_at = time.perf_counter()
        return scores


@torch.inference_mode()
def check_sampling(model: nn.Module, sampling: SamplingParams) -> None:
    """HF generate() counts the prompt in its repetition settings: refuse asking it not to."""
    repeats = sampling.repetition_penalty != 1.0 or sampling.no_repeat_ngram_size
    if repeats and not sampling.penalize_prompt:
        raise ValueError(
            f"{type(model).__name__} has no native adapter, so its repetition settings count the prompt "
            "(HF generate()); set task.penalize_prompt=true, or turn off task.repetition_penalty and "
            "task.no_repeat_ngram_size"
        )


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    plan: SkipPlan,
    sampling: SamplingParams,
    tokenizer,
    pad_id: int,
    eos_ids: set[int],
    stats: GenerationStats,
) -> tuple[list[list[int]], list[str]]:
    """Runs HF generate per row group; returns new token ids and finish reasons per prompt."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    if plan.prefill == "full" and not plan.is_full_depth and not encoder_decoder:
        raise ValueError(
            f"{type(model).__name__} has no native adapter, so its prompt cannot run at full depth while "
            "decode skips; use skip.prefill=skip"
        )
    check_sampling(model, sampling)
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p) :] = torch.tensor(p)
        attention[r, width - len(p) :] = 1
    clock = _FirstTokenClock()
    kwargs = dict(sampling.hf_kwargs(), pad_token_id=pad_id, logits_processor=LogitsProcessorList([clock]))
    if not sampling.greedy:
        torch.manual_seed(sampling.seed)
    if sampling.ignore_eos:
        kwargs.update(eos_token_id=None, min_new_tokens=sampling.max_new_tokens)
    if sampling.stop:
        kwargs.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)

    device = next(model.parameters()).device
    start = time.perf_counter()
    with pruned_decoder(model, plan.kept_layers):
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    end = time.perf_counter()
    first = clock.first_at or end
    stats.prefill_s, stats.decode_s = first - start, end - first
    stats.prefill_layers_per_token = stats.decode_layers_per_token = float(plan.num_kept)
    stats.backend = "hf_generate"

    new = out[:, 1:] if encoder_decoder else out[:, width:]  # drop decoder start token / the prompt
    generated, reasons = [], []
    for row in new.tolist():
        ids = []
        for tok in row:
            ids.append(tok)
            if not sampling.ignore_eos and tok in eos_ids:
                break
        while ids and ids[-1] == pad_id and pad_id not in eos_ids:
            ids.pop()
        generated.append(ids)
        hit_eos = bool(ids) and ids[-1] in eos_ids and not sampling.ignore_eos
        hit_stop = find_stop(tokenizer.decode(ids, skip_special_tokens=True), sampling.stop) is not None
        reasons.append("stop" if hit_eos or hit_stop else "length")
    stats.decode_steps = new.shape[1] - 1
    stats.decode_row_steps = sum(max(0, len(g) - 1) for g in generated)
    return generated, reasons
