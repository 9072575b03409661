"""Text-quality metrics against references, with bootstrap 95% confidence intervals.

BLEU and chrF are sacrebleu's corpus scores; ROUGE-1/2/L are rouge-score's F1 (with stemming), averaged
over rows. The interval resamples rows with replacement and recomputes the corpus score. Beside them, the
loop rate and the mean output length: a loop can score well on overlap metrics, so neither is read alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import sacrebleu
from rouge_score import rouge_scorer

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
LOOP_NGRAM = 4  # an output loops when fewer than half of its word 4-grams are distinct,
LOOP_DISTINCT_BELOW = 0.5
LOOP_MIN_WORDS = 12  # counted only for outputs of at least 12 words
TASK_METRICS = {"translate": ("bleu", "chrf"), "summarize": ROUGE_KEYS}


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    return sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    return sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score


def rouge_rows(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, list[float]]:
    """Per-row ROUGE F1 (x100) for each of ROUGE_KEYS."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    rows = [scorer.score(ref, hyp) for hyp, ref in zip(hyps, refs, strict=True)]
    return {key: [100 * r[key].fmeasure for r in rows] for key in ROUGE_KEYS}


def loops(text: str) -> bool:
    """Whether an output repeats itself: distinct word 4-grams / 4-grams < 0.5, at 12 words or more."""
    words = text.split()
    if len(words) < LOOP_MIN_WORDS:
        return False
    grams = [tuple(words[i : i + LOOP_NGRAM]) for i in range(len(words) - LOOP_NGRAM + 1)]
    return len(set(grams)) / len(grams) < LOOP_DISTINCT_BELOW


def output_stats(hyps: Sequence[str], samples: int = 1000) -> dict[str, dict]:
    """{"loop_rate": % of outputs that loop, "mean_words": words per output}, each with its bootstrap
    interval, in score_task's shape."""
    if not hyps:
        raise ValueError("no ok rows to score")
    per_row = {
        "loop_rate": [100.0 * loops(h) for h in hyps],
        "mean_words": [float(len(h.split())) for h in hyps],
    }
    results = {}
    for name, values in per_row.items():
        low, high = bootstrap_ci(lambda idx, v=values: sum(v[i] for i in idx) / len(idx), len(hyps), samples)
        results[name] = {"score": sum(values) / len(values), "ci_low": low, "ci_high": high}
    return results


def bootstrap_ci(
    score: Callable[[list[int]], float], n_rows: int, samples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of score(row indices) over `samples` resamples with replacement."""
    rng = random.Random(seed)
    values = sorted(score([rng.randrange(n_rows) for _ in range(n_rows)]) for _ in range(samples))
    return values[int(0.025 * (samples - 1))], values[int(0.975 * (samples - 1))]


def score_task(task: str, hyps: Sequence[str], refs: Sequence[str], samples: int = 1000) -> dict[str, dict]:
    """{metric: {"score", "ci_low", "ci_high"}} for a task's metrics."""
    if task not in TASK_METRICS:
        raise ValueError(
            f"task.name={task!r} has no reference metrics; scored tasks: {', '.join(TASK_METRICS)}"
        )
    if not hyps:
        raise ValueError("no ok rows to score")
    hyps, refs = list(hyps), list(refs)
    results = {}
    if task == "translate":
        for name, corpus_score in (("bleu", bleu), ("chrf", chrf)):
            # corpus BLEU is slow to recompute; 200 resamples keep the interval to about +-0.2
            low, high = bootstrap_ci(
                lambda idx, f=corpus_score: f([hyps[i] for i in idx], [refs[i] for i in idx]),
                len(hyps),
                min(samples, 200),
            )
            results[name] = {"score": corpus_score(hyps, refs), "ci_low": low, "ci_high": high}
    else:
        for name, per_row in rouge_rows(hyps, refs).items():
            low, high = bootstrap_ci(
                lambda idx, v=per_row: sum(v[i] for i in idx) / len(idx), len(hyps), samples
            )
            results[name] = {"score": sum(per_row) / len(per_row), "ci_low": low, "ci_high": high}
    return results
