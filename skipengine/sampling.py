"""Generation limits and next-token choice: greedy, or seeded temperature / top-p sampling.

Each row samples from its own generator, seeded from (seed, the row's prompt tokens), so a row's output
does not depend on which other rows share its batch: retries, resumes and re-batching reproduce it.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings; the text is cut before them
    ignore_eos: bool = False  # benchmarks and calibration run a fixed number of steps

    def __post_init__(self) -> None:
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_generators(params: SamplingParams, prompts: Sequence[Sequence[int]], device: torch.device) -> list:
    if params.greedy:
        return []
    gens = []
    for ids in prompts:
        seed = zlib.crc32(bytes(str(params.seed), "ascii") + b":" + bytes(str(list(ids)), "ascii"))
        gens.append(torch.Generator(device=device).manual_seed(seed))
    return gens


def next_tokens(logits: torch.Tensor, params: SamplingParams, generators: list) -> torch.Tensor:
    """logits: [B, vocab] -> token ids [B]. generators: one per row (ignored when greedy)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    picks = [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)]
    return torch.cat(picks)


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop string starts in text, or None."""
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None
