"""The cost study's report folder: runs.parquet (one row per run folder), projection.parquet, the plots, and
report.md and a self-contained report.html (its plots inlined) rendered from the same blocks."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import cost_plots, projection
from pipeline.cost_study import COLUMNS, CostStudyConfig, study_rows

PLOTS = {
    "quality_vs_cost.png": "Quality kept against cost (measured), Pareto frontier per model, task and corpus",
    "speedup_vs_target.png": "Measured against target speedup, per strategy",
    "throughput_vs_actors.png": "Tokens/s against actors: measured points, projected lines",
}


def fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def names(rows: list[dict]) -> dict[str, str]:
    """Each run folder as the report shows it: relative to the folders' common parent."""
    paths = [os.path.abspath(r["run_dir"]) for r in rows]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return {r["run_dir"]: os.path.relpath(p, root) for r, p in zip(rows, paths, strict=True)}


def measured_table(rows: list[dict], name: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    header = [
        "run", "strategy", "target", "kept layers", "adapter", "batch", "actors", "device",
        "decode speedup", "prefill + decode speedup", "tokens/s", "wall s", "device-hours",
        "$ / device-hour", "$ / 1M tokens", "quality", "% of full depth", "loops %", "words", "frontier",
    ]  # fmt: skip
    body = []
    for r in rows:
        if r["status"] == "unfinished":
            continue
        kept = f"{r['kept_layers']}/{r['num_layers']}" if r["kept_layers"] is not None else "adaptive"
        quality = f"{r['quality_metric']} {fmt(r['quality'])}" if r["quality"] is not None else "n/a"
        cells = [
            name[r["run_dir"]] + ("" if r["status"] == "finished" else f" ({r['status']})"),
            r["strategy"],
            r["target_speedup"],
            kept,
            r["adapter"] or "none",
            *(r[k] for k in ("batch_size", "num_actors", "device", "measured_decode_speedup")),
            *(r[k] for k in ("measured_speedup", "tokens_per_s", "wall_s", "device_hours")),
            *(r[k] for k in ("price_per_device_hour", "cost_per_1m_tokens")),
            quality,
            *(r[k] for k in ("quality_pct_of_full", "loop_rate", "mean_words", "on_pareto_frontier")),
        ]
        body.append([c if isinstance(c, str) else fmt(c) for c in cells])
    return header, body


def projected_table(projected: list[dict], name: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    header = [
        "run", "measured actors", "rows/s per actor", "start-up s", "actors", "wall h", "device-hours", "$",
        "$ / 1M tokens", "beyond what was measured",
    ]  # fmt: skip
    body = [
        [
            name[p["run_dir"]],
            *map(fmt, (p["measured_actors"], p["rows_per_s_per_actor"], p["startup_s"], p["actors"])),
            *map(fmt, (p["projected_wall_s"] / 3600, p["projected_device_hours"], p["projected_cost"])),
            *map(fmt, (p["projected_cost_per_1m_tokens"], p["beyond_measured"])),
        ]
        for p in projected
    ]
    return header, body


def blocks(cfg: CostStudyConfig, rows: list[dict], projected: list[dict]) -> list[tuple[str, object]]:
    """The report as (kind, content) blocks: h1, h2, p, list, table (header, rows), image (file, caption)."""
    name = names(rows)
    finished = [r for r in rows if r["status"] != "unfinished"]
    sources = ([f"runs={list(cfg.runs)}"] if cfg.runs else []) + (
        [f"sweep_dir={cfg.sweep_dir}"] if cfg.sweep_dir else []
    )
    prices = ", ".join(f"{k}: {fmt(v) if v is not None else 'null'}" for k, v in cfg.prices.items()) or "none"
    out: list[tuple[str, object]] = [
        ("h1", "Cost study"),
        (
            "p",
            f"{len(rows)} run folders from {' and '.join(sources)}: {len(finished)} finished, "
            f"{len(rows) - len(finished)} unfinished. Every figure in the first table is measured by the "
            "run itself (summary.json, metrics.json); the plots label what is projected, and the last "
            "section is projected.",
        ),
        (
            "p",
            "Price per device-hour: the run's own output.price_per_device_hour when set, else the first of "
            f"prices (longest key first) that its device name contains ({prices}). A run with no price has "
            "no cost (n/a, never 0). Speed and cost are those of the run's last session (a resumed run's "
            "summary times only what that session generated).",
        ),
        ("h2", "Measured, per run"),
        ("table", measured_table(rows, name)),
    ]
    unscored = [f"{name[r['run_dir']]}: {r['quality_missing']}" for r in finished if r["quality"] is None]
    if unscored:
        out += [("h2", "Runs without a quality score"), ("list", unscored)]
    unfinished = [f"{name[r['run_dir']]}: {r['note']}" for r in rows if r["status"] == "unfinished"]
    if unfinished:
        out += [("h2", "Unfinished runs"), ("list", unfinished)]
    notes = [f"{name[r['run_dir']]}: {r['note']}" for r in finished if r["note"]]
    if notes:
        out += [("h2", "Notes"), ("list", notes)]
    out += [("h2", "Plots")] + [("image", (file, caption)) for file, caption in PLOTS.items()]
    most = max((p["measured_actors"] for p in projected), default=0)
    out += [
        ("h2", f"Projected: {cfg.project.rows:,} rows on {', '.join(map(str, cfg.project.actors))} actors"),
        (
            "p",
            f"Scaling model: {projection.MODEL}, with each run's measured rows/s per actor while generating "
            "and its measured start-up (paid once); tokens at the run's tokens per row; device-hours wall x "
            "actors x max(1, GPUs per actor). Assumption: throughput is linear in actors, that is the "
            "driver, the read stage and the writes never become the limit. That limit was not measured "
            f"beyond {most} actor(s), the most this sweep ran: rows marked beyond what was measured are "
            "extrapolation.",
        ),
        ("table", projected_table(projected, name)),
    ]
    return out


def markdown(report: list[tuple[str, object]]) -> str:
    lines: list[str] = []
    for kind, content in report:
        if kind == "h1":
            lines += [f"# {content}", ""]
        elif kind == "h2":
            lines += [f"## {content}", ""]
        elif kind == "p":
            lines += [str(content), ""]
        elif kind == "list":
            lines += [f"- {item}" for item in content] + [""]
        elif kind == "table":
            header, body = content
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body] + [""]
        elif kind == "image":
            file, caption = content
            lines += [f"![{caption}]({file})", ""]
    return "\n".join(lines)


def to_html(report: list[tuple[str, object]], folder: Path) -> str:
    """One file: the plots are inlined as base64 PNG data URIs."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Cost study</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:110em}table{border-collapse:collapse;font-size:85%}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}"
        "</style></head><body>"
    ]
    for kind, content in report:
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{esc(str(content))}</{kind}>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in content) + "</ul>")
        elif kind == "table":
            header, body = content
            parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body]
            parts.append("</table>")
        elif kind == "image":
            file, caption = content
            data = base64.b64encode((folder / file).read_bytes()).decode()
            parts.append(
                f"<figure><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
    return "\n".join(parts + ["</body></html>"])


def write_report(cfg: CostStudyConfig, rows: list[dict], projected: list[dict]) -> Path:
    """Writes the report folder (CostStudyConfig.validate refused a non-empty one without overwrite=true)."""
    out = Path(cfg.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows]), out / "runs.parquet")
    pq.write_table(pa.Table.from_pylist(projected), out / "projection.parquet")
    cost_plots.quality_vs_cost(rows, out / "quality_vs_cost.png")
    cost_plots.speedup_vs_target(rows, out / "speedup_vs_target.png")
    cost_plots.throughput_vs_actors(rows, projected, cfg.project.rows, out / "throughput_vs_actors.png")
    report = blocks(cfg, rows, projected)
    (out / "report.md").write_text(markdown(report))
    (out / "report.html").write_text(to_html(report, out))
    return out


def run_study(cfg: CostStudyConfig) -> tuple[Path, list[dict]]:
    """jobs.cost_study: checks the config, reads (and scores) the runs, projects them, writes the report."""
    cfg.validate()
    rows = study_rows(cfg)
    projected = projection.projections(rows, list(cfg.project.actors), cfg.project.rows)
    return write_report(cfg, rows, projected), rows


def human_summary(out: Path, rows: list[dict]) -> str:
    unfinished = sum(r["status"] == "unfinished" for r in rows)
    unscored = sum(r["status"] != "unfinished" and r["quality"] is None for r in rows)
    return (
        f"{len(rows)} runs: {len(rows) - unfinished} finished ({unscored} without a quality score), "
        f"{unfinished} unfinished\nreport: {(out / 'report.html').resolve()} (and report.md, runs.parquet)"
    )
