"""Our metrics equal sacrebleu's and rouge-score's own on known pairs, and a run scores end to end."""

import json

import pytest
import sacrebleu
import yaml
from rouge_score import rouge_scorer

from pipeline.evaluate import evaluate_run
from pipeline.metrics import bootstrap_ci, loops, output_stats, score_task

HYPS = [
    "En el principio creó Dios los cielos y la tierra.",
    "Y dijo Dios: Sea la luz.",
    "la tierra estaba vacía",
]
REFS = [
    "EN el principio crió Dios los cielos y la tierra.",
    "Y dijo Dios: Sea la luz: y fué la luz.",
    "Y la tierra estaba desordenada y vacía",
]


def test_translation_metrics_are_sacrebleus():
    scores = score_task("translate", HYPS, REFS, samples=50)
    assert scores["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert scores["chrf"]["score"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    for s in scores.values():
        assert 0 <= s["ci_low"] <= s["ci_high"] <= 100


def test_summary_metrics_are_rouge_scores():
    scores = score_task("summarize", HYPS, REFS, samples=200)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = [scorer.score(r, h) for h, r in zip(HYPS, REFS, strict=True)]
    for key in ("rouge1", "rouge2", "rougeL"):
        mean = 100 * sum(e[key].fmeasure for e in expected) / len(expected)
        assert scores[key]["score"] == pytest.approx(mean)
        assert scores[key]["ci_low"] <= mean <= scores[key]["ci_high"]
    assert score_task("summarize", ["same words"], ["same words"], 10)["rouge1"]["score"] == pytest.approx(
        100
    )


def test_loop_rate_counts_outputs_that_repeat_themselves_and_mean_words_their_length():
    summary = "We study layer skipping. A searched plan keeps quality at twice the speed on real corpora."
    loop = "The problem: The approach: The approach: The approach: The approach: The approach: The approach:"
    assert not loops(summary) and loops(loop)
    assert not loops("the the the the the")  # under 12 words: too short to call
    stats = output_stats([summary, loop, summary, "short"], samples=100)
    assert stats["loop_rate"]["score"] == pytest.approx(25.0)
    assert stats["mean_words"]["score"] == pytest.approx((16 + 14 + 16 + 1) / 4)


def test_bootstrap_interval_narrows_with_more_rows():
    values = [float(i % 10) for i in range(1000)]
    wide = bootstrap_ci(lambda idx: sum(values[i] for i in idx[:20]) / 20, 1000, samples=300)
    narrow = bootstrap_ci(lambda idx: sum(values[i] for i in idx) / len(idx), 1000, samples=300)
    assert narrow[1] - narrow[0] < wide[1] - wide[0] and narrow[0] < 4.5 < narrow[1]


def test_unknown_task_and_empty_runs_are_refused():
    with pytest.raises(ValueError, match="task.name='complete' has no reference metrics"):
        score_task("complete", HYPS, REFS)
    with pytest.raises(ValueError, match="no ok rows"):
        score_task("translate", [], [])


def test_a_run_folder_is_scored_on_its_ok_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "outputs").mkdir()
    rows = [
        {"id": str(i), "generated_text": h, "error": None, "spanish": r}
        for i, (h, r) in enumerate(zip(HYPS, REFS, strict=True))
    ]
    rows.append(
        {"id": "bad", "generated_text": None, "error": "input column 'english' is empty", "spanish": "x"}
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "outputs" / "part-0.parquet")
    config = {
        "model": {"spec": "m"},
        "task": {"name": "translate", "reference_column": "spanish"},
        "skip": {"strategy": "none"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = evaluate_run(tmp_path, bootstrap_samples=50)
    assert metrics["rows_scored"] == 3 and metrics["rows_excluded"] == 1
    assert metrics["metrics"]["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert metrics["metrics"]["loop_rate"]["score"] == 0.0
    assert metrics["metrics"]["mean_words"]["score"] == pytest.approx(sum(len(h.split()) for h in HYPS) / 3)
    assert json.loads((tmp_path / "metrics.json").read_text())["rows_scored"] == 3
    assert pq.read_table(tmp_path / "metrics.parquet").num_rows == 1
