"""A task turns a row's input text into prompt token ids: the template, then the chat template where the
model has one. A row that cannot become a prompt gets its error here and never reaches the decoder."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import TaskConfig


@dataclass
class Prompt:
    text: str | None
    ids: list[int] | None
    error: str | None = None


class PromptBuilder:
    def __init__(self, task: TaskConfig, tokenizer):
        self.task = task
        self.tokenizer = tokenizer
        self.chat = task.chat and bool(getattr(tokenizer, "chat_template", None))

    def build(self, value: object) -> Prompt:
        column = self.task.input_column
        if value is None:
            return Prompt(None, None, f"input column {column!r} is null")
        if not isinstance(value, str):
            return Prompt(None, None, f"input column {column!r} is not text (got {type(value).__name__})")
        if not value.strip():
            return Prompt(None, None, f"input column {column!r} is empty")
        content = self.task.template.replace("{input}", value)
        try:
            if self.chat:
                messages = [{"role": "system", "content": self.task.system}] if self.task.system else []
                messages.append({"role": "user", "content": content})
                text = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                text = content
                ids = self.tokenizer(text)["input_ids"]
        except (UnicodeError, ValueError, TypeError) as e:  # e.g. lone surrogates: not encodable text
            return Prompt(None, None, f"input column {column!r} cannot be tokenized: {type(e).__name__}: {e}")
        return Prompt(text, ids)
