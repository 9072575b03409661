"""Readers for the real corpora the project ships or installs (no Ray here: jobs and tests use them too)."""

from __future__ import annotations

import gzip
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIBLE = REPO / "data" / "bible_kjv_rv1909.en-es.tsv.gz"


def read_bible(path: str | Path = BIBLE, start: int = 0, stop: int | None = None) -> list[tuple[str, str]]:
    """(english, spanish) verse pairs for lines [start, stop), in canonical order."""
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f):
            if n < start:
                continue
            if stop is not None and n >= stop:
                break
            english, _, spanish = line.rstrip("\n").partition("\t")
            pairs.append((english, spanish))
    return pairs
