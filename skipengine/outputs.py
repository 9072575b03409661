"""What a generate() call returns: one RowResult per input row, in input order, and the call's stats."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RowResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "error"  # "stop" (EOS or a stop string), "length" (max tokens or context), "error"
    error: str | None = None
    num_input_tokens: int = 0
    num_generated_tokens: int = 0
    truncated: bool = False  # the prompt was cut to fit the context window (on_too_long="truncate")
    latency_s: float = 0.0  # from the start of the call until this row finished
    # the error came from generating (out of memory, a kernel failure), not from the input: running the
    # row again may succeed
    retryable: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class GenerationStats:
    num_rows: int = 0
    num_errors: int = 0
    num_input_tokens: int = 0
    num_generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_row_steps: int = 0  # live rows summed over decode steps (finished rows leave the batch)
    prefill_layers_per_token: float = 0.0
    decode_layers_per_token: float = 0.0
    predicted_speedup: float = 1.0
    exit_threshold: float | None = None  # adaptive plans: the mean over decode steps
    kv_cache_bytes: int = 0
    backend: str = "native"

    @property
    def decode_tokens(self) -> int:
        """Tokens produced by decode steps (the first token of each row comes from prefill)."""
        return max(0, self.num_generated_tokens - (self.num_rows - self.num_errors))

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.num_generated_tokens / total if total > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "tokens_per_s": self.tokens_per_s,
        }


@dataclass
class GenerationOutput:
    rows: list[RowResult]
    stats: GenerationStats
