"""Readers for the real corpora the project ships or installs (no Ray here: jobs and tests use them too)."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIBLE = REPO / "data" / "bible_kjv_rv1909.en-es.tsv.gz"
BIBLE_SPLITS = {"train": (0, 26000), "validation": (26000, 27500), "test": (27500, 29584)}
AUSTEN = REPO / "data" / "austen_persuasion.txt.gz"  # held-out English for perplexity, one paragraph a line
ACLSUM = REPO / "data" / "aclsum"  # abstract -> summary JSONL per split, written by write_aclsum_jsonl
ACLSUM_SPLITS = {"train": "train", "validation": "val", "test": "test"}  # ours -> the package's file names
ACLSUM_ASPECTS = ("challenge", "approach", "outcome")
ACLSUM_SECTIONS = ("abstract", "introduction", "conclusion")  # the body text the package ships


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


def detokenize(text: str) -> str:
    """ACLSum's sentences are space-tokenized ("a workflow ." / "( MT )"); undo the common cases."""
    text = re.sub(r" ([.,;:!?%)\]])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    return re.sub(r" n't\b", "n't", text).replace(" 's ", "'s ")


def aclsum_package_file(split: str) -> Path:
    """The split's JSONL inside the installed `aclsum` wheel, found without importing the package (its
    import pulls a dependency we do not need)."""
    if split not in ACLSUM_SPLITS:
        raise ValueError(f"ACLSum split {split!r} is unknown; use one of {', '.join(ACLSUM_SPLITS)}")
    try:
        files = importlib.metadata.files("aclsum") or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("the ACLSum source needs `pip install --no-deps aclsum`") from None
    name = f"aclsum/dataset/{ACLSUM_SPLITS[split]}.jsonl"
    match = [f for f in files if str(f) == name]
    if not match:
        raise FileNotFoundError(f"{name} is not in the installed aclsum package")
    return Path(match[0].locate())


def read_aclsum_package(split: str) -> list[dict]:
    """{id, title, abstract, summary} per paper; the summary is the three human aspect summaries
    (challenge, approach, outcome) in that order, the abstract its detokenized sentences."""
    rows = []
    for line in aclsum_package_file(split).read_text(encoding="utf-8").splitlines():
        paper = json.loads(line)
        rows.append(
            {
                "id": f"aclsum-{paper['id']}",
                "title": paper["title"],
                "abstract": detokenize(" ".join(paper["sentences"]["abstract"])),
                "summary": " ".join(paper["summary"][a].strip() for a in ACLSUM_ASPECTS),
            }
        )
    return rows


def write_aclsum_jsonl(split: str, path: str | Path | None = None) -> Path:
    path = Path(path) if path else ACLSUM / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_aclsum_package(split)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def passages(sentences: list[str], max_words: int) -> list[str]:
    """Consecutive sentences joined into passages of at most max_words words (a longer sentence stands
    alone); a short tail joins the passage before it."""
    chunks: list[list[str]] = [[]]
    for sentence in sentences:
        if chunks[-1] and sum(len(s.split()) for s in chunks[-1] + [sentence]) > max_words:
            chunks.append([])
        chunks[-1].append(sentence)
    if len(chunks) > 1 and sum(len(s.split()) for s in chunks[-1]) < max_words // 3:
        tail = chunks.pop()
        chunks[-1] += tail
    return [detokenize(" ".join(c)) for c in chunks if c]


def read_aclsum_passages(split: str, max_words: int = 160) -> list[dict]:
    """Every section of every paper (abstract, introduction, conclusion) cut into passages of at most
    max_words words: {id, paper, section, title, text}. Unlabeled text for self-distillation, about seven
    passages per paper where the abstracts alone give one."""
    rows = []
    for line in aclsum_package_file(split).read_text(encoding="utf-8").splitlines():
        paper = json.loads(line)
        for section in ACLSUM_SECTIONS:
            for k, text in enumerate(passages(paper["sentences"][section], max_words)):
                rows.append(
                    {
                        "id": f"aclsum-{paper['id']}-{section}-{k}",
                        "paper": f"aclsum-{paper['id']}",
                        "section": section,
                        "title": paper["title"],
                        "text": text,
                    }
                )
    return rows


def write_aclsum_passages_jsonl(split: str, path: str | Path | None = None) -> Path:
    path = Path(path) if path else ACLSUM / f"{split}_passages.jsonl"
    rows = read_aclsum_passages(split)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_aclsum(split: str) -> list[dict]:
    """The committed split (data/aclsum/<split>.jsonl)."""
    if split not in ACLSUM_SPLITS:
        raise ValueError(f"ACLSum split {split!r} is unknown; use one of {', '.join(ACLSUM_SPLITS)}")
    lines = (ACLSUM / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def read_austen(path: str | Path = AUSTEN) -> str:
    """Persuasion (Jane Austen, public domain), paragraphs joined by newlines."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()
