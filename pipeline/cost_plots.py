"""The cost study's three plots, as PNG files: quality kept against cost with the Pareto frontier, measured
against target speedup per strategy, tokens/s against actors (measured, and projected). Figures are built
without pyplot, so they render with Agg on a machine with no display and leave no global state."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from pipeline.cost_study import cost_axis, pareto, quality_axis


def _label(r: dict) -> str:
    return f"{r['strategy']} x{r['target_speedup']:g} b{r['batch_size']}" + (" +ad" if r["adapter"] else "")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def quality_vs_cost(rows: list[dict], path: Path) -> None:
    (x, x_label), (y, y_label) = cost_axis(rows), quality_axis(rows)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r[x] is not None and r[y] is not None:
            groups.setdefault((r["model_name"], r["task"], r["corpus"]), []).append(r)
    if not groups:
        _empty(ax, "no finished run has both a quality score and a cost")
    for (model, task, corpus), members in groups.items():
        points = [(r[x], r[y]) for r in members]
        dots = ax.scatter(*zip(*points, strict=True), label=f"{model}, {task}, {corpus}")
        front = [points[i] for i in pareto(points)]
        ax.plot(*zip(*front, strict=True), drawstyle="steps-post", color=dots.get_facecolor()[0], alpha=0.6)
        for r, (px, py) in zip(members, points, strict=True):
            ax.annotate(_label(r), (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if groups:
        ax.plot([], [], "k-", alpha=0.6, label="Pareto frontier (cheaper and better)")
        ax.legend(fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title("Quality against cost, per run")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def speedup_vs_target(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    measured = [r for r in rows if r["measured_decode_speedup"] is not None and r["target_speedup"]]
    if not measured:
        _empty(ax, "no run measured its speedup against full depth (skip.full_depth_every=0)")
    strategies = sorted({r["strategy"] for r in measured})
    for strategy in strategies:
        members = [r for r in measured if r["strategy"] == strategy]
        targets = [r["target_speedup"] for r in members]
        dots = ax.scatter(
            targets, [r["measured_decode_speedup"] for r in members], label=f"{strategy}: decode"
        )
        e2e = [
            (t, r["measured_speedup"]) for t, r in zip(targets, members, strict=True) if r["measured_speedup"]
        ]
        if e2e:
            color = dots.get_facecolor()[0]
            ax.scatter(
                *zip(*e2e, strict=True),
                facecolors="none",
                edgecolors=[color],
                label=f"{strategy}: prefill + decode",
            )
    if measured:
        values = [
            v
            for r in measured
            for v in (r["target_speedup"], r["measured_decode_speedup"], r["measured_speedup"])
            if v
        ]
        low, high = min(values) * 0.95, max(values) * 1.05
        ax.plot([low, high], [low, high], "k--", alpha=0.5, label="measured = target")
        ax.legend(fontsize=8)
    ax.set_xlabel("target speedup (skip.target_speedup)")
    ax.set_ylabel("speedup measured on the run's rows (full depth s / plan s)")
    ax.set_title("Measured against target speedup")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def throughput_vs_actors(rows: list[dict], projected: list[dict], project_rows: int, path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    measured = [r for r in rows if r["tokens_per_s"] is not None and r["num_actors"]]
    if not measured:
        _empty(ax, "no finished run timed its generation")
    for strategy in sorted({r["strategy"] for r in measured}):
        members = [r for r in measured if r["strategy"] == strategy]
        ax.scatter(
            [r["num_actors"] for r in members],
            [r["tokens_per_s"] for r in members],
            zorder=3,
            label=f"{strategy}: measured, on the run's rows",
        )
    runs: dict[str, list[dict]] = {}
    for p in projected:
        runs.setdefault(p["run_dir"], []).append(p)
    for n, points in enumerate(runs.values()):
        ax.plot(
            [p["actors"] for p in points],
            [p["projected_tokens_per_s"] for p in points],
            "--",
            color="grey",
            alpha=0.5,
            label=f"projected, {project_rows:,} rows, linear in actors" if n == 0 else None,
        )
    if measured:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("actors (cluster.num_actors)")
    ax.set_ylabel("generated tokens/s, start-up included")
    ax.set_title("Throughput against actors")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
