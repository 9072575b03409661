"""Readers for the real corpora the project ships or installs (no Ray here: jobs and tests use them too)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIBLE = REPO / "data" / "bible_kjv_rv1909.en-es.tsv.gz"
BIBLE_SPLITS = {"train": (0, 26000), "validation": (26000, 27500), "test": (27500, 29584)}


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


def write_bible_jsonl(path: str | Path, start: int, stop: int) -> Path:
    """Verse pairs [start, stop) as JSONL rows {id: "bible-<line>", english, spanish}, for the job."""
    path = Path(path)
    rows = read_bible(start=start, stop=stop)
    path.write_text(
        "".join(
            json.dumps({"id": f"bible-{start + n}", "english": en, "spanish": es}, ensure_ascii=False) + "\n"
            for n, (en, es) in enumerate(rows)
        ),
        encoding="utf-8",
    )
    return path
