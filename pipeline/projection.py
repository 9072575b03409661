"""Projecting a measured run to N actors and M corpus rows, linear in actors.

The model, for one run: wall(N, M) = startup_s + M / (N x r), where r is the run's measured rows per
second per actor once generating ((wall_s - startup_s) x actors into the rows it generated) and startup_s
its measured start-up (paid once: actors start in parallel). Tokens are M x the run's tokens per row;
device-hours wall x N x max(1, GPUs per actor) / 3600, as summary.json counts them; cost those times the
run's price per device-hour.

What it assumes: each added actor generates as fast as the measured ones, so the driver, the read stage
and the output writes never become the limit. That was measured only up to the actor counts the sweep ran:
every figure for more actors is marked beyond_measured.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL = "wall(N, M) = startup_s + M / (N x rows_per_s_per_actor)"


@dataclass
class Throughput:
    """A run's measured rates, the model's inputs."""

    rows_per_s_per_actor: float
    tokens_per_row: float
    startup_s: float
    devices_per_actor: float  # what one actor counts in device-hours: max(1, GPUs per actor)


def throughput(row: dict) -> Throughput | None:
    """From a cost-study row; None when the run timed no generation (unfinished, or nothing generated)."""
    rows, wall, actors = row["rows_generated"], row["wall_s"], row["num_actors"]
    startup = row["startup_s"] or 0.0  # null when no batch finished, and then there are no rows either
    if not rows or wall is None or not actors or wall - startup <= 0:
        return None
    return Throughput(
        rows_per_s_per_actor=rows / (wall - startup) / actors,
        tokens_per_row=row["tokens_out"] / rows,
        startup_s=startup,
        devices_per_actor=max(1.0, row["gpus_per_actor"] or 0.0),
    )


def project(rate: Throughput, actors: int, rows: int, price: float | None) -> dict:
    """The projected figures for `rows` corpus rows on `actors` actors."""
    wall = rate.startup_s + rows / (actors * rate.rows_per_s_per_actor)
    tokens = rows * rate.tokens_per_row
    device_hours = wall * actors * rate.devices_per_actor / 3600
    cost = price * device_hours if price is not None else None
    return {
        "actors": actors,
        "rows": rows,
        "projected_wall_s": wall,
        "projected_tokens": tokens,
        "projected_tokens_per_s": tokens / wall,
        "projected_device_hours": device_hours,
        "projected_cost": cost,
        "projected_cost_per_1m_tokens": cost / (tokens / 1e6) if cost is not None and tokens else None,
    }


def projections(study: list[dict], actors: list[int], rows: int) -> list[dict]:
    """Every run that timed its generation, projected to each actor count; beyond_measured marks actor
    counts above the most the sweep ran, where the linear model was not checked."""
    rates = [(row, rate) for row in study if (rate := throughput(row)) is not None]
    most = max((row["num_actors"] for row, _ in rates), default=0)
    out = []
    for row, rate in rates:
        for n in actors:
            out.append(
                {
                    "run_dir": row["run_dir"],
                    "strategy": row["strategy"],
                    "target_speedup": row["target_speedup"],
                    "batch_size": row["batch_size"],
                    "measured_actors": row["num_actors"],
                    "rows_per_s_per_actor": rate.rows_per_s_per_actor,
                    "tokens_per_row": rate.tokens_per_row,
                    "startup_s": rate.startup_s,
                    "price_per_device_hour": row["price_per_device_hour"],
                    "beyond_measured": n > most,
                }
                | project(rate, n, rows, row["price_per_device_hour"])
            )
    return out
