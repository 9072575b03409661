"""Generation limits and next-token choice, with HF generate()'s semantics.

Each row's logits go through HF's logits processors (repetition penalty, no-repeat n-grams) over that
row's own prompt and generated tokens, or its generated tokens only; then either argmax (greedy) or HF's
warpers (temperature, top-k, top-p, min-p, in that order) and a draw. Each row draws from its own
generator, seeded from (seed, the row's prompt tokens), so a row's output does not depend on which other
rows share its batch: retries, resumes and re-batching reproduce it.
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
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off; else drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0  # > 1 discourages every token already in the prompt or the output
    no_repeat_ngram_size: int = 0  # n > 0: no n-gram occurs twice
    # whether the two settings above count the prompt's tokens (HF's decoder-only default) or only the
    # output's (HF generate() given inputs_embeds: an output may then quote its source)
    penalize_prompt: bool = True
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
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1) (0 = off)")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be > 0 (1 = off)")
        if not (isinstance(self.no_repeat_ngram_size, int) and self.no_repeat_ngram_size >= 0):
            raise ValueError(f"no_repeat_ngram_size={self.no_repeat_ngram_size!r} must be an integer >= 0")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def hf_kwargs(self) -> dict:
        """The same settings as HF generate() keyword arguments (seeding aside; penalize_prompt=False is
        HF's behaviour when it is given inputs_embeds instead of input_ids)."""
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=not self.greedy,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
        )
        if not self.greedy:
            kwargs.update(
                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p or None
            )
        return kwargs


def row_seed(params: SamplingParams, prompt: Sequence[int]) -> int:
    """The seed of a row's generator: from the job's seed and the row's own prompt tokens."""
    return zlib.crc32(bytes(str(params.seed), "ascii") + b":" + bytes(str(list(prompt)), "ascii"))


class Sampler:
    """Next-token choice for one batch: call it on the last logits [B, vocab] to get tokens [B] (each row's
    choice is added to its history), and keep(slots) when rows leave the batch."""

    def __init__(self, params: SamplingParams, prompts: Sequence[Sequence[int]], device: torch.device):
        self.params = params
        self.generators = []
        if not params.greedy:
            self.generators = [
                torch.Generator(device=device).manual_seed(row_seed(params, p)) for p in prompts
            ]
        # each row's tokens that the repetition settings count
        counted = [list(p) if params.penalize_prompt else [] for p in prompts]
        self.counted = counted
        self.seen: torch.Tensor | None = None  # [B, vocab]: the counted tokens seen so far
        n = params.no_repeat_ngram_size
        self.history = [list(c) for c in counted] if n else []
        self.ngrams = [_ngrams(c, n) for c in counted] if n else []

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        scores = self.process(logits)
        if self.params.greedy:
            tokens = scores.argmax(dim=-1)
        else:
            probs = torch.softmax(self.warp(scores), dim=-1)
            tokens = torch.cat(
                [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.generators)]
            )
        self._record(tokens)
        return tokens

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """HF's logits processors: repetition penalty, then no-repeat n-grams. [B, vocab] float32."""
        scores = logits.float()
        p = self.params
        if p.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
                for r, ids in enumerate(self.counted):
                    self.seen[r, ids] = True
            penalized = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
            scores = torch.where(self.seen, penalized, scores)
        if p.no_repeat_ngram_size:
            for r, (history, table) in enumerate(zip(self.history, self.ngrams, strict=True)):
                banned = table.get(_context(history, p.no_repeat_ngram_size))
                if banned:
                    scores[r, list(banned)] = -float("inf")
        return scores

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """HF's sampling warpers: temperature, top-k, top-p, min-p. [B, vocab] -> [B, vocab]."""
        p, drop = self.params, -float("inf")
        if p.temperature != 1.0:
            scores = scores / p.temperature
        if p.top_k:
            kth = torch.topk(scores, min(p.top_k, scores.shape[-1])).values[..., -1, None]
            scores = scores.masked_fill(scores < kth, drop)
        if p.top_p < 1.0:
            ascending, order = torch.sort(scores, descending=False)
            remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p.top_p
            remove[..., -1:] = False  # the top token always stays
            scores = scores.masked_fill(remove.scatter(1, order, remove), drop)
        if p.min_p:
            probs = torch.softmax(scores, dim=-1)
            remove = probs < p.min_p * probs.amax(dim=-1, keepdim=True)
            remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
            scores = scores.masked_fill(remove, drop)
        return scores

    def keep(self, slots: Sequence[int]) -> None:
        """Only the rows at these slots go on, in this order."""
        pick = lambda items: [items[s] for s in slots]  # noqa: E731
        self.generators, self.counted = pick(self.generators) if self.generators else [], pick(self.counted)
        if self.history:
            self.history, self.ngrams = pick(self.history), pick(self.ngrams)
        if self.seen is not None:
            self.seen = self.seen[torch.tensor(slots, device=self.seen.device)]

    def _record(self, tokens: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen[torch.arange(len(tokens), device=tokens.device), tokens] = True
        n = self.params.no_repeat_ngram_size
        if not n:
            return
        for history, table, token in zip(self.history, self.ngrams, tokens.tolist(), strict=True):
            history.append(token)
            if len(history) >= n:
                table.setdefault(tuple(history[len(history) - n : -1]), set()).add(token)


def _context(history: list[int], n: int) -> tuple[int, ...] | None:
    """The n - 1 tokens an n-gram would continue from; None while the history is shorter (HF bans nothing
    then)."""
    if len(history) < n - 1:
        return None
    return tuple(history[len(history) - (n - 1) :]) if n > 1 else ()


def _ngrams(ids: Sequence[int], n: int) -> dict[tuple[int, ...], set[int]]:
    """{the first n - 1 tokens of each n-gram in ids: the tokens that followed them}."""
    table: dict[tuple[int, ...], set[int]] = {}
    for i in range(len(ids) - n + 1):
        table.setdefault(tuple(ids[i : i + n - 1]), set()).add(ids[i + n - 1])
    return table


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop string starts in text, or None."""
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None
