"""A batch of user prompts -> token ids, one verdict per row: ids, or an error for that row alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ON_TOO_LONG = ("error", "truncate")


@dataclass
class EncodedPrompt:
    ids: list[int] | None
    error: str | None = None
    truncated: bool = False


def encode_prompt(
    prompt: object,
    tokenizer,
    max_context: int,
    max_new_tokens: int,
    on_too_long: str = "error",
    add_special_tokens: bool = True,
) -> EncodedPrompt:
    """A str is tokenized; a list of ints is taken as token ids. Anything else is this row's error."""
    if on_too_long not in ON_TOO_LONG:
        raise ValueError(f"on_too_long={on_too_long!r} is unknown; use one of {', '.join(ON_TOO_LONG)}")
    if isinstance(prompt, str):
        if not prompt.strip():
            return EncodedPrompt(None, "prompt is empty; give it some text")
        ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        vocab = len(tokenizer) if tokenizer is not None else None
        if vocab is not None and any(t < 0 or t >= vocab for t in ids):
            return EncodedPrompt(None, f"token ids must lie in [0, {vocab}); this prompt has ids outside it")
    else:
        kind = type(prompt).__name__
        return EncodedPrompt(None, f"prompt must be a str or a list of token ids, not {kind}")
    if not ids:
        return EncodedPrompt(None, "prompt is empty (no tokens); give it some text")
    if len(ids) < max_context:
        return EncodedPrompt(ids)
    if on_too_long == "error":
        return EncodedPrompt(
            None,
            f"prompt has {len(ids)} tokens; the context window is {max_context}. Shorten it, or set "
            f"on_too_long='truncate' to keep its last tokens",
        )
    keep = max(1, max_context - max_new_tokens)
    return EncodedPrompt(ids[-keep:], truncated=True)
