"""Scoring a finished run against its references (with its loop rate and mean output length): metrics.json
and metrics.parquet beside the run."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.metrics import output_stats, score_task
from pipeline.rundir import RunDir


def evaluate_run(run_dir: str | Path, bootstrap_samples: int = 1000) -> dict:
    """Scores the ok rows; says how many rows were excluded (errored, or with no reference)."""
    run = RunDir(run_dir)
    if not run.config.exists() or not run.has_results():
        raise FileNotFoundError(f"{str(run.path)!r} is not a finished run (no config.yaml or no outputs/)")
    config = yaml.safe_load(run.config.read_text())
    task, reference = config["task"]["name"], config["task"]["reference_column"]
    if not reference:
        raise ValueError(
            f"task {task!r} of {run.path} has no reference_column; there is nothing to score against"
        )
    table = pq.read_table(run.outputs, columns=["id", "generated_text", "error", reference]).to_pylist()
    usable = [r for r in table if r["error"] is None and r[reference] is not None]
    hyps = [r["generated_text"] or "" for r in usable]
    scores = score_task(task, hyps, [r[reference] for r in usable], bootstrap_samples)
    scores |= output_stats(hyps, bootstrap_samples)
    metrics = {
        "run_dir": str(run.path),
        "task": task,
        "model": config["model"]["spec"],
        "skip": config["skip"],
        "rows_scored": len(usable),
        "rows_excluded": len(table) - len(usable),
        "metrics": scores,
    }
    (run.path / "metrics.json").write_text(json.dumps(metrics, indent=2))
    flat = {k: v for k, v in metrics.items() if k not in ("metrics", "skip")}
    flat |= {f"skip_{k}": v for k, v in config["skip"].items()}
    for name, s in scores.items():
        flat |= {name: s["score"], f"{name}_ci_low": s["ci_low"], f"{name}_ci_high": s["ci_high"]}
    pq.write_table(pa.Table.from_pylist([flat]), run.path / "metrics.parquet")
    return metrics


def metrics_table(metrics: dict) -> str:
    lines = [f"{metrics['task']} — {metrics['rows_scored']} rows scored, {metrics['rows_excluded']} excluded"]
    for name, s in metrics["metrics"].items():
        lines.append(f"  {name:>10} {s['score']:6.2f}   95% CI [{s['ci_low']:.2f}, {s['ci_high']:.2f}]")
    return "\n".join(lines)
