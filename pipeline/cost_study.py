"""A cost study: one row per run folder of a sweep, with what its summary measured (speedups, tokens/s,
device-hours), what that cost at a price per device-hour, and the quality it kept against the full-depth
run of the same model, task and corpus. Nothing is dropped: an unfinished folder is a row with its status,
a run without scores a row with the reason.

The report (pipeline/cost_report.py) and the projection to more actors (pipeline/projection.py) are built
from these rows; jobs.cost_study runs it all.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import MISSING

from pipeline.evaluate import evaluate_run
from pipeline.metrics import TASK_METRICS
from pipeline.sweeps import FoundRun, find_runs

log = logging.getLogger("skipengine.cost_study")

PRIMARY_METRIC = {"summarize": "rougeL", "translate": "chrf"}  # "quality" and its % of full depth
METRICS = (*dict.fromkeys(m for ms in TASK_METRICS.values() for m in ms), "loop_rate", "mean_words")
# every row has every column (null, never absent), in this order
COLUMNS = (
    "run_dir", "status", "note", "model", "model_name", "task", "corpus", "corpus_path", "corpus_limit",
    "strategy", "basis", "target_speedup", "plan", "kept_layers", "num_layers", "full_depth", "adapter",
    "batch_size", "num_actors", "gpus_per_actor", "device", "rows_in", "rows_generated", "tokens_out",
    "predicted_speedup", "measured_decode_speedup", "measured_speedup", "measured_batches", "tokens_per_s",
    "wall_s", "startup_s", "device_hours", "device_hours_per_1m_tokens", "price_per_device_hour",
    "price_source", "cost_per_1m_tokens", "quality_metric", "quality", "quality_ci_low", "quality_ci_high",
    "quality_pct_of_full", "full_depth_run", "quality_missing", "metrics_source", "rows_scored", *METRICS,
    "on_pareto_frontier",
)  # fmt: skip


@dataclass
class ProjectConfig:
    # every finished run projected to these actor counts and this many corpus rows, linear in actors from
    # its measured per-actor throughput and start-up (pipeline/projection.py)
    actors: list[int] = field(default_factory=lambda: [1, 2, 8, 64])
    rows: int = 1_000_000


@dataclass
class CostStudyConfig:
    runs: list[str] = field(default_factory=list)  # jobs.generate run folders
    # a folder of run folders, or a Hydra multirun folder (jobs.generate -m): its jobs' run folders
    sweep_dir: str | None = None
    out_dir: str = MISSING  # the report folder
    overwrite: bool = False  # write the report into a non-empty out_dir, replacing its report files
    # score each run that has references but no metrics.json (or one older than its summary) as
    # jobs.evaluate does, writing metrics.json into the run folder; false: report it as not scored
    evaluate: bool = True
    bootstrap_samples: int = 1000  # those scores' 95% intervals
    # $ per device-hour by device name: a key matches when the run's device ("cpu AMD EPYC", "cuda:0 NVIDIA
    # H100 80GB HBM3") contains it, case-insensitive, longest key first; null: no price. A run's own
    # output.price_per_device_hour, when set, comes first
    prices: dict[str, float | None] = field(default_factory=dict)
    project: ProjectConfig = field(default_factory=ProjectConfig)

    def validate(self) -> None:
        """Refuses a bad config before any run is read or scored; every message names the key."""
        if not self.runs and not self.sweep_dir:
            raise ValueError("nothing to study: give runs=[RUN_DIR,...] and/or sweep_dir=DIR")
        for i, path in enumerate(self.runs):
            if not Path(path).expanduser().is_dir():
                raise FileNotFoundError(f"runs[{i}]={path!r} is not a folder; list jobs.generate run folders")
        if self.sweep_dir and not Path(self.sweep_dir).expanduser().is_dir():
            raise FileNotFoundError(f"sweep_dir={self.sweep_dir!r} is not a folder")
        if not self.project.actors or min(self.project.actors) < 1:
            raise ValueError(f"project.actors={list(self.project.actors)} must list actor counts >= 1")
        if self.project.rows < 1:
            raise ValueError(f"project.rows={self.project.rows} must be >= 1")
        if self.bootstrap_samples < 1:
            raise ValueError(f"bootstrap_samples={self.bootstrap_samples} must be >= 1")
        for key, price in self.prices.items():
            if price is not None and price < 0:
                raise ValueError(f"prices.{key}={price} must be >= 0, or null for no price")
        out = Path(self.out_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"out_dir={self.out_dir!r} is a file; choose a folder")
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise FileExistsError(
                f"out_dir={self.out_dir!r} is not empty; set overwrite=true to replace its report, or choose "
                "another out_dir"
            )


def study_rows(cfg: CostStudyConfig) -> list[dict]:
    """One row per run folder found (COLUMNS), with the full-depth comparison and the Pareto frontier."""
    found = find_runs(list(cfg.runs), cfg.sweep_dir)
    if not found:
        raise ValueError(
            f"sweep_dir={cfg.sweep_dir!r} holds no run folder (summary.json, or config.yaml and outputs/) "
            "and no Hydra multirun of jobs.generate"
        )
    rows = sorted((run_row(run, cfg) for run in found), key=order)
    compare_to_full_depth(rows)
    mark_frontier(rows)
    return rows


def order(row: dict) -> tuple:
    """Unfinished runs last; the others by model, task, corpus, strategy, target and batch size."""
    text = tuple(str(row[k] or "") for k in ("model", "task", "corpus", "strategy"))
    return (
        row["status"] == "unfinished",
        text,
        row["target_speedup"] or 0,
        row["batch_size"] or 0,
        row["run_dir"],
    )


def run_row(found: FoundRun, cfg: CostStudyConfig) -> dict:
    path = found.path
    row = dict.fromkeys(COLUMNS) | {"run_dir": str(path), "note": found.note}
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    row |= config_columns(config or {})
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        row["status"] = "unfinished"
        row["note"] = found.note or "no summary.json: the run has not finished (rerun its command to resume)"
        return row
    summary = json.loads(summary_path.read_text())
    row |= summary_columns(summary, path)
    row |= price_columns(summary, row, cfg.prices)
    row |= quality_columns(path, row["task"], cfg)
    return row


def config_columns(config: dict) -> dict:
    """What the run's config.yaml says: the summary does not repeat the task, corpus, strategy or batch."""

    def get(group: str, key: str):
        return (config.get(group) or {}).get(key)

    return {
        "model_name": get("model", "name"),
        "model": get("model", "spec"),
        "task": get("task", "name"),
        "corpus": get("data", "name"),
        "corpus_path": get("data", "path"),
        "corpus_limit": get("data", "limit"),
        "strategy": get("skip", "strategy"),
        "basis": get("skip", "basis"),
        "target_speedup": get("skip", "target_speedup"),
        "batch_size": get("cluster", "batch_size"),
        "num_actors": get("cluster", "num_actors"),
        "gpus_per_actor": get("cluster", "gpus_per_actor"),
    }


def kept_layers(path: Path, plan: str | None) -> tuple[int | None, int | None]:
    """(kept, of) layers: plan.json's plan, else the summary's plan text ("keep 4/8"); adaptive: none."""
    if (path / "plan.json").is_file():
        plan_json = json.loads((path / "plan.json").read_text())["plan"]
        return len(plan_json["kept_layers"]), plan_json["num_layers"]
    found = re.search(r"keep (\d+)/(\d+)", plan or "")
    return (int(found[1]), int(found[2])) if found else (None, None)


def summary_columns(summary: dict, path: Path) -> dict:
    kept, of = kept_layers(path, summary.get("plan"))
    row = {
        "status": "finished" if summary.get("ids_check", {}).get("ok", True) else "ids mismatch",
        "model": summary.get("model"),
        "plan": summary.get("plan"),
        "kept_layers": kept,
        "num_layers": of,
        "adapter": summary.get("adapter"),
        "target_speedup": summary.get("target_speedup"),
        "num_actors": summary.get("num_actors"),
        "device": summary.get("device") or device_from_plan(summary.get("plan_measured_on")),
        "rows_in": summary.get("rows_in"),
        "rows_generated": summary.get("rows_generated_now"),
        "tokens_out": summary.get("tokens_out_now"),
        "predicted_speedup": summary.get("predicted_speedup"),
        "measured_decode_speedup": summary.get("measured_decode_speedup"),
        "measured_speedup": summary.get("measured_speedup"),
        "measured_batches": summary.get("measured_batches"),
    }
    if not row["rows_generated"]:  # a resume with nothing left: the summary timed no generation
        row["note"] = (
            "its last session generated nothing (a resume of a finished run): speed and cost not measured"
        )
        return row
    tokens = row["tokens_out"]
    return row | {
        "tokens_per_s": summary.get("tokens_per_s"),
        "wall_s": summary.get("wall_s"),
        "startup_s": summary.get("startup_s"),
        "device_hours": summary.get("device_hours"),
        "device_hours_per_1m_tokens": summary["device_hours"] / (tokens / 1e6) if tokens else None,
    }


def device_from_plan(measured_on: str | None) -> str | None:
    """Runs made before summaries named the device: basis=measured's "8 rows, cpu AMD EPYC, batch 8"."""
    parts = (measured_on or "").split(", ")
    return (", ".join(parts[1:-1]) or None) if len(parts) >= 3 else None


def match_price(device: str | None, prices: dict[str, float | None]) -> tuple[str | None, float | None]:
    """(the prices key, its price) for a device: the longest key the device name contains."""
    for key in sorted(prices, key=len, reverse=True):
        if device and key.lower() in device.lower():
            return key, prices[key]
    return None, None


def price_columns(summary: dict, row: dict, prices: dict[str, float | None]) -> dict:
    if summary.get("price_per_device_hour"):  # the job's own output.price_per_device_hour (0: unset)
        source, price = "output.price_per_device_hour", summary["price_per_device_hour"]
    else:
        key, price = match_price(row["device"], prices)
        source = f"prices.{key}" if price is not None else None
    tokens, hours = row["tokens_out"], row["device_hours"]
    cost = price * hours / (tokens / 1e6) if price is not None and tokens and hours is not None else None
    return {"price_per_device_hour": price, "price_source": source, "cost_per_1m_tokens": cost}


def quality_columns(path: Path, task: str | None, cfg: CostStudyConfig) -> dict:
    """The run's scores: its metrics.json, or scored now as jobs.evaluate does; the reason when neither."""
    metrics_path, summary_path = path / "metrics.json", path / "summary.json"
    fresh = metrics_path.is_file() and metrics_path.stat().st_mtime >= summary_path.stat().st_mtime
    if fresh:
        metrics, source = json.loads(metrics_path.read_text()), "metrics.json"
    elif not cfg.evaluate:
        why = "metrics.json is older than summary.json" if metrics_path.is_file() else "no metrics.json"
        return {"quality_missing": f"{why}, and evaluate=false"}
    else:
        try:
            metrics, source = evaluate_run(path, cfg.bootstrap_samples), "evaluated by this study"
        except (ValueError, FileNotFoundError) as e:  # no references, an unscored task, no ok rows
            return {"quality_missing": f"cannot be scored: {e}"}
        log.info("scored %s", path)
    scores = metrics["metrics"]
    row = {name: scores[name]["score"] for name in METRICS if name in scores}
    primary = PRIMARY_METRIC.get(task or metrics.get("task"))
    if primary not in scores:
        return row | {"quality_missing": f"metrics.json holds no {primary or 'task metric'}"}
    return row | {
        "quality_metric": primary,
        "quality": scores[primary]["score"],
        "quality_ci_low": scores[primary]["ci_low"],
        "quality_ci_high": scores[primary]["ci_high"],
        "metrics_source": source,
        "rows_scored": metrics.get("rows_scored"),
    }


def is_full_depth(row: dict) -> bool:
    if row["strategy"] == "adaptive":
        return False
    if row["kept_layers"] is not None:
        return row["kept_layers"] == row["num_layers"]
    return row["strategy"] == "none" or row["target_speedup"] == 1.0


def compare_to_full_depth(rows: list[dict]) -> None:
    """quality_pct_of_full: against a full-depth run of the same model, task and corpus (rows and limit),
    preferring one without an adapter, then one at the same batch size; null when the sweep has none."""
    for row in rows:
        row["full_depth"] = is_full_depth(row) if row["status"] != "unfinished" else None

    def same(r: dict) -> tuple:
        return r["model"], r["task"], r["corpus_path"], r["corpus_limit"], r["quality_metric"]

    for row in rows:
        if row["quality"] is None:
            continue
        full = [r for r in rows if r["full_depth"] and r["quality"] is not None and same(r) == same(row)]
        if not full:
            continue
        ref = min(
            full, key=lambda r: (r["adapter"] is not None, r["batch_size"] != row["batch_size"], r["run_dir"])
        )
        row["full_depth_run"] = ref["run_dir"]
        row["quality_pct_of_full"] = 100 * row["quality"] / ref["quality"] if ref["quality"] else None


def cost_axis(rows: list[dict]) -> tuple[str, str]:
    """(column, label) of the cost the frontier is drawn on: $ per 1M tokens when every scored run has a
    price, else device-hours per 1M tokens (and the label says why)."""
    scored = [r for r in rows if r["quality"] is not None and r["device_hours_per_1m_tokens"] is not None]
    if scored and all(r["cost_per_1m_tokens"] is not None for r in scored):
        return "cost_per_1m_tokens", "$ per 1M generated tokens (measured)"
    return (
        "device_hours_per_1m_tokens",
        "device-hours per 1M generated tokens (measured; no price for every run)",
    )


def quality_axis(rows: list[dict]) -> tuple[str, str]:
    """% of full depth when every scored run has it, else the raw score."""
    scored = [r for r in rows if r["quality"] is not None]
    if scored and all(r["quality_pct_of_full"] is not None for r in scored):
        return "quality_pct_of_full", "quality kept, % of full depth (measured)"
    metrics = sorted({r["quality_metric"] for r in scored})
    return "quality", f"{' / '.join(metrics) or 'quality'} (measured; no full-depth run to compare with)"


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: as cheap (x) or cheaper and as good (y) or better,
    one of them strictly. Ordered by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def mark_frontier(rows: list[dict]) -> None:
    """on_pareto_frontier, per model, task and corpus, on the axes of the report's plot."""
    x, y = cost_axis(rows)[0], quality_axis(rows)[0]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r[x] is not None and r[y] is not None:
            groups.setdefault((r["model"], r["task"], r["corpus_path"]), []).append(r)
            r["on_pareto_frontier"] = False
    for members in groups.values():
        for i in pareto([(r[x], r[y]) for r in members]):
            members[i]["on_pareto_frontier"] = True
