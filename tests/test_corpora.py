"""The corpus builders: passages for self-distillation keep every sentence, in order, within budget."""

import json

from pipeline.corpora import ACLSUM, passages


def test_passages_keep_every_sentence_in_order_within_the_word_budget():
    sentences = [f"s{i}" + " w" * (i % 7) for i in range(40)]
    chunks = passages(sentences, max_words=20)
    assert " ".join(chunks).split() == " ".join(sentences).split()
    assert all(len(c.split()) <= 20 + 20 // 3 for c in chunks)  # a short tail may join the last one
    assert len(chunks) > 5
    long = " ".join(["one long sentence"] * 30)
    assert passages([long], max_words=10) == [long]  # a sentence is never cut


def test_the_shipped_train_passages_come_from_train_papers_only():
    def ids(split: str) -> set[str]:
        return {json.loads(line)["id"] for line in (ACLSUM / f"{split}.jsonl").read_text().splitlines()}

    rows = [json.loads(line) for line in (ACLSUM / "train_passages.jsonl").read_text().splitlines()]
    assert {r["paper"] for r in rows} == ids("train")
    assert not {r["paper"] for r in rows} & (ids("test") | ids("validation"))
    assert len({r["id"] for r in rows}) == len(rows)
