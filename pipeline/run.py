"""The batch-generation job: read -> ids -> skip what is done -> generator actors -> outputs, stats, summary.

Every input row ends with exactly one output row: the run finishes by comparing the output ids with the
input ids, writes the verdict into the summary, and fails loudly on any difference.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from pipeline import planning, sources
from pipeline.attempts import Attempts
from pipeline.config import JobConfig, actor_memory, resolve_adapter, validate
from pipeline.generator import OUTPUT_SCHEMA, Generator
from pipeline.planning import RunPlan
from pipeline.progress import Progress
from pipeline.rundir import RunDir

log = logging.getLogger("skipengine.job")


def start_ray(cfg: JobConfig) -> bool:
    """Connects to or starts Ray; True when this call started it (and so should stop it)."""
    if ray.is_initialized():
        return False
    if cfg.cluster.kind == "local":
        # Ray runs workers at nice 15 below its own daemons; on a small machine the actor is the work
        os.environ.setdefault("RAY_worker_niceness", "0")
        # no idle workers kept warm: each idle Ray process wakes ~100 times a second (its signal check),
        # and on a small machine every wakeup preempts one of the actor's compute threads
        os.environ.setdefault("RAY_num_workers_soft_limit", "0")
        ray.init(num_cpus=cfg.cluster.local_num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    else:
        import pipeline
        import skipengine

        # ship this code to the cluster's workers, which may not have it installed
        ray.init(address=cfg.cluster.address, runtime_env={"py_modules": [pipeline, skipengine]})
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # `limit` and ids then mean the same rows every run
    ctx.enable_progress_bars = False  # our own progress reports rows and tokens/s
    return True


def check_pool_fits(cfg: JobConfig) -> None:
    """Ray waits forever for an actor pool that a local Ray cannot place; say which key asks too much.
    (An existing cluster may autoscale, so only local Ray is checked.)"""
    if cfg.cluster.kind != "local":
        return
    have = ray.cluster_resources()
    c = cfg.cluster
    memory_key, memory_gb = actor_memory(cfg)
    asked = {
        "cluster.cpus_per_actor": ("CPU", c.cpus_per_actor, 1),
        "cluster.gpus_per_actor": ("GPU", c.gpus_per_actor, 1),
        memory_key: ("memory", memory_gb, 2**30),
    }
    for key, (resource, per_actor, unit) in asked.items():
        if per_actor * c.num_actors * unit > have.get(resource, 0.0):
            raise ValueError(
                f"{key}={per_actor} x cluster.num_actors={c.num_actors} needs more {resource} than local Ray "
                f"has ({have.get(resource, 0.0) / unit:g}); lower one of them"
            )


def check_copied_columns(cfg: JobConfig) -> None:
    """Input columns copied to the outputs must not clash with the columns the job writes."""
    written = {name for name, _ in OUTPUT_SCHEMA} - {sources.ID}
    copied = {f"data.keep_columns[{i}]": c for i, c in enumerate(cfg.data.keep_columns)}
    copied["task.reference_column"] = cfg.task.reference_column
    for key, column in copied.items():
        if column in written:
            raise ValueError(
                f"{key}={column!r} clashes with the output column of that name; rename the column in the "
                "corpus, or leave it out"
            )


def drop_done(batch: pa.Table, done: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch.column(sources.ID), value_set=done)))


def run_job(cfg: JobConfig) -> dict:
    resolve_adapter(cfg)
    validate(cfg)
    check_copied_columns(cfg)
    run = RunDir(cfg.output.dir)
    with run.locked():
        return _run_locked(cfg, run)


def _run_locked(cfg: JobConfig, run: RunDir) -> dict:
    config = asdict(cfg)
    started_ray = start_ray(cfg)
    try:
        check_pool_fits(cfg)
        ds = sources.read_all(cfg.data)  # read once: the checks, the manifest and the work share it
        sources.check_columns(ds, cfg.data, cfg.task)
        input_ids = sources.input_ids(ds, cfg.data)
        if cfg.output.mode == "resume" and cfg.skip.strategy != "adaptive" and run.has_results():
            if not run.plan.is_file():  # its rows may hold another plan than the one built now
                raise ValueError(
                    f"output.dir={cfg.output.dir!r} holds a run made before runs kept their plan in "
                    "plan.json; use output.mode=overwrite to replace it, or another output.dir"
                )
        run.check(cfg.output.mode, config)
        plan = run_plan(cfg, ds, run)  # before overwrite deletes anything: a plan that fails stops here
        run.prepare(cfg.output.mode, config)
        Attempts.clear(run.attempts)  # this job holds the folder: an earlier job's marks are stale
        if plan is not None:
            run.plan.write_text(plan.to_json())
        run.drop_rows(rows_to_redo(cfg, run, ds))
        done = run.output_ids()
        unexpected = set(done) - set(input_ids)
        if unexpected:
            raise ValueError(
                f"output.dir={cfg.output.dir!r} has {len(unexpected)} output rows whose ids are not in this "
                "corpus (was data.path or data.limit changed?); use another output.dir or "
                "output.mode=overwrite"
            )
        pending = len(input_ids) - len(done)
        log.info("%d input rows, %d already done, %d to generate", len(input_ids), len(done), pending)
        start = time.perf_counter()
        stats_rows = generate(ds, done, pending, cfg, run, plan) if pending else []
        wall = time.perf_counter() - start
        summary = summarize(cfg, run, input_ids, len(done), stats_rows, wall, plan)
    finally:
        if started_ray:
            ray.shutdown()
    if not summary["ids_check"]["ok"]:
        raise RuntimeError(f"output ids do not match input ids: {summary['ids_check']}; see {run.summary}")
    return summary


def rows_to_redo(cfg: JobConfig, run: RunDir, ds: ray.data.Dataset) -> set[str]:
    """Done rows to generate again: retryable error rows (output.retry_errors) and rows whose input text
    changed since (output.regenerate_changed; without it, the run is refused naming them)."""
    done = run.output_rows(["id", "retryable", "input_hash"]).to_pylist()
    if not done:
        return set()
    redo = {r["id"] for r in done if r["retryable"]} if cfg.output.retry_errors else set()
    current = sources.input_hashes(ds, cfg.data, cfg.task.input_column)
    changed = [
        r["id"] for r in done if r["input_hash"] and current.get(r["id"], r["input_hash"]) != r["input_hash"]
    ]
    if changed and not cfg.output.regenerate_changed:
        raise ValueError(
            f"output.dir={cfg.output.dir!r}: the input text of {len(changed)} done rows changed since they "
            f"were generated (ids {changed[:5]}); set output.regenerate_changed=true to generate them again, "
            "or use output.mode=overwrite"
        )
    if redo or changed:
        log.info(
            "generating again: %d retryable error rows, %d rows whose input changed", len(redo), len(changed)
        )
    return redo | set(changed)


def first_texts(ds: ray.data.Dataset, cfg: JobConfig, rows: int) -> list[str]:
    """The corpus's first rows' input texts: the same for every actor and every resumed run."""
    first = ds.limit(rows).take_all()
    return [r[cfg.task.input_column] for r in first if isinstance(r[cfg.task.input_column], str)]


def run_plan(cfg: JobConfig, ds: ray.data.Dataset, run: RunDir) -> RunPlan | None:
    """The run's one plan: plan.json when resuming a run that has one, else built now (None: skip=adaptive,
    whose actors calibrate their exit threshold on the same first rows)."""
    if cfg.skip.strategy == "adaptive":
        return None
    if cfg.output.mode == "resume" and run.plan.is_file():
        found = RunPlan.from_json(run.plan.read_text())
        log.info("resuming with %s: %s", run.plan, found.plan)
        measured = found.calibration
        device = torch.device(cfg.model.device).type
        if measured and (measured["batch_size"], torch.device(measured["device"].split()[0]).type) != (
            cfg.cluster.batch_size,
            device,
        ):
            log.warning(
                "the plan was measured on %s at batch %d and is reused as it is on %s at batch %d; "
                "output.mode=overwrite measures it again (and replaces the run)",
                measured["device"],
                measured["batch_size"],
                cfg.model.device,
                cfg.cluster.batch_size,
            )
        return found
    rows = max(cfg.cluster.batch_size, cfg.skip.search_rows)
    return planning.plan_run(cfg, first_texts(ds, cfg, rows))


def generate(
    ds: ray.data.Dataset, done, pending: int, cfg: JobConfig, run: RunDir, plan: RunPlan | None
) -> list[dict]:
    calibration = None
    copied = [*cfg.data.keep_columns, *([cfg.task.reference_column] if cfg.task.reference_column else [])]
    column_types = sources.arrow_types(ds, copied)
    if cfg.skip.strategy == "adaptive":
        calibration = first_texts(ds, cfg, cfg.skip.calibration_rows)
    ds = sources.with_ids(ds, cfg.data)
    if done:
        ds = ds.map_batches(
            drop_done, fn_kwargs={"done": pa.array(sorted(done), pa.string())}, batch_format="pyarrow"
        )
    cluster = cfg.cluster
    # blocks of exactly batch_size rows: batches form within blocks, so ragged blocks mean small batches
    ds = ds.repartition(target_num_rows_per_block=cluster.batch_size, strict=True)
    results = ds.map_batches(
        Generator,
        fn_constructor_kwargs={
            "cfg": cfg,
            "outputs_dir": str(run.outputs.resolve()),
            "run_plan": plan,
            "calibration_texts": calibration,
            "column_types": column_types,
        },
        batch_size=cluster.batch_size,
        batch_format="pyarrow",
        # one call at a time per actor, in the thread that ran __init__: Ray Data's default wrapper runs the
        # UDF in a side thread, where torch's thread settings do not apply and the decode loop (Python-bound
        # op dispatch) contends for the GIL with batch slicing in the main thread
        compute=ray.data.ActorPoolStrategy(
            size=cluster.num_actors, enable_true_multi_threading=True, max_concurrent_calls_per_actor=1
        ),
        num_cpus=cluster.cpus_per_actor,
        num_gpus=cluster.gpus_per_actor or None,
        memory=int(actor_memory(cfg)[1] * 2**30) or None,
        # Ray sets OMP_NUM_THREADS from num_cpus (1 for a fractional actor)
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cluster.threads_per_actor)}},
    )
    progress = Progress(pending, cfg.output.progress_every_s)
    stats_rows, started = [], time.perf_counter()
    try:
        for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                if not stats_rows:  # start-up: from here to the first batch, less that batch's own time
                    batch_s = row["wall_s"] + (row.get("full_depth_rerun_s") or 0.0)
                    row["startup_s"] = max(0.0, time.perf_counter() - started - batch_s)
                stats_rows.append(row)
                progress.update(row["rows"], row["tokens_out"])
    finally:
        progress.close()
        if stats_rows:  # what finished is recorded even when the run is interrupted
            name = f"part-{time.strftime('%Y%m%d-%H%M%S')}-{len(stats_rows)}.parquet"
            pq.write_table(pa.Table.from_pylist(stats_rows), run.stats / name)
    return stats_rows


def summarize(
    cfg: JobConfig,
    run: RunDir,
    input_ids: list[str],
    resumed: int,
    stats: list[dict],
    wall: float,
    plan: RunPlan | None = None,
) -> dict:
    counts = run.output_ids()
    missing = set(input_ids) - set(counts)
    duplicated = [i for i, n in counts.items() if n > 1]
    unexpected = set(counts) - set(input_ids)
    outputs = (
        pa.concat_tables(
            pq.read_table(p, columns=["error", "num_input_tokens", "num_generated_tokens"])
            for p in sorted(run.outputs.glob("part-*.parquet"))
        )
        if counts
        else None
    )
    errored = len(outputs) - outputs.column("error").null_count if outputs is not None else 0  # null = fine
    tokens_now = sum(r["tokens_out"] for r in stats)
    # each actor holds its GPUs for the whole run (a fractional GPU counts as one), a CPU actor counts once
    device_hours = wall * cfg.cluster.num_actors * max(1.0, cfg.cluster.gpus_per_actor) / 3600
    decode_s = sum(r["decode_s"] for r in stats)
    summary = {
        "output_dir": str(run.path),
        "model": cfg.model.spec,
        "plan": str(plan.plan) if plan else stats[0]["plan"] if stats else None,
        "adapter": adapter_name(plan.adapter if plan else cfg.skip.adapter),
        "rows_in": len(input_ids),
        "rows_out": sum(counts.values()),
        "rows_ok": (len(outputs) - errored) if outputs is not None else 0,
        "rows_error": errored,
        "rows_resumed": resumed,
        "rows_generated_now": sum(r["rows"] for r in stats),
        "tokens_in": int(pc.sum(outputs.column("num_input_tokens")).as_py() or 0)
        if outputs is not None
        else 0,
        "tokens_out": int(pc.sum(outputs.column("num_generated_tokens")).as_py() or 0)
        if outputs is not None
        else 0,
        "tokens_out_now": tokens_now,
        "wall_s": wall,
        "tokens_per_s": tokens_now / wall if wall > 0 else 0.0,
        "num_actors": cfg.cluster.num_actors,
        # the actors' devices with their model ("cpu AMD EPYC", "cuda:0 NVIDIA H100"), which jobs.cost_study
        # prices
        "device": ", ".join(sorted({r["device"] for r in stats if r.get("device")})) or None,
        "device_hours": device_hours,
        "price_per_device_hour": cfg.output.price_per_device_hour,
        "startup_s": stats[0].get("startup_s") if stats else None,
        "cost_per_1m_tokens": (
            cfg.output.price_per_device_hour * device_hours / (tokens_now / 1e6)
            if tokens_now and cfg.output.price_per_device_hour
            else None
        ),
        "target_speedup": cfg.skip.target_speedup,
        # the plan's decode speedup when it was chosen: measured on the corpus's first batch (basis=measured)
        # or L / kept layers (basis=layers)
        "predicted_speedup": plan.plan.predicted_speedup
        if plan
        else stats[0]["predicted_speedup"]
        if stats
        else None,
        "plan_basis": plan.plan.basis if plan else None,
        "plan_measured_on": (
            f"{plan.calibration['rows']} rows, {plan.calibration['device']}, batch "
            f"{plan.calibration['batch_size']}"
            if plan and plan.calibration
            else None
        ),
        "plan_notes": plan.notes if plan else [],
        # measured on the batches that also ran at full depth (skip.full_depth_every): their full-depth
        # seconds over the plan's, for the same rows
        "measured_decode_speedup": ratio(stats, "full_depth_decode_s", ("decode_s",)),
        "measured_speedup": ratio(stats, "full_depth_s", ("prefill_s", "decode_s")),
        "measured_batches": sum(r.get("measured_speedup") is not None for r in stats),
        "decode_s": decode_s,
        # layer-equivalents per token (layers run, plus K/V fills for adaptive exits), weighted by tokens
        "achieved_layer_speedup": (
            sum(r["achieved_layer_speedup"] * r["tokens_out"] for r in stats) / tokens_now
            if tokens_now
            else None
        ),
        # the fixed-speedup contract batch by batch, for adaptive exits (static plans meet it by construction)
        "batches_within_5pct": on_target(
            [r["achieved_layer_speedup"] for r in stats if r["tokens_out"]], cfg.skip.target_speedup
        )
        if cfg.skip.strategy == "adaptive"
        else None,
        "ids_check": {
            "ok": not missing and not duplicated and not unexpected,
            "missing": len(missing),
            "duplicated": len(duplicated),
            "unexpected": len(unexpected),
        },
    }
    run.summary.write_text(json.dumps(summary, indent=2))
    flat = {k: v for k, v in summary.items() if k != "ids_check"} | {
        f"ids_{k}": v for k, v in summary["ids_check"].items()
    }
    pq.write_table(pa.Table.from_pylist([flat]), run.path / "summary.parquet")
    return summary


def adapter_name(path: str | None) -> str | None:
    return Path(path).name if path else None


def ratio(stats: list[dict], full_key: str, plan_keys: tuple[str, ...]) -> float | None:
    """Full depth's seconds over the plan's, summed over the batches that ran at both; None if none did."""
    both = [r for r in stats if r.get(full_key) is not None]
    plan_s = sum(r[key] for r in both for key in plan_keys)
    return sum(r[full_key] for r in both) / plan_s if both and plan_s > 0 else None


def on_target(speedups: list[float], target: float) -> str:
    """'N/M': of M batches' achieved speedups, N lie within 5% of the target."""
    return f"{sum(abs(s / target - 1) <= 0.05 for s in speedups)}/{len(speedups)}"


def human_summary(summary: dict) -> str:
    check = "all input ids have exactly one output row" if summary["ids_check"]["ok"] else "ID MISMATCH"
    lines = [
        f"rows: {summary['rows_in']} in, {summary['rows_ok']} ok, {summary['rows_error']} errored "
        f"({summary['rows_resumed']} done by an earlier run) — {check}",
        f"generated {summary['tokens_out_now']} tokens in {summary['wall_s']:.1f}s "
        f"({summary['tokens_per_s']:.1f} tok/s, {summary['device_hours']:.4f} device-hours"
        + (f", start-up {summary['startup_s']:.1f}s" if summary.get("startup_s") is not None else "")
        + "), cost per 1M tokens: "
        + (
            f"{summary['cost_per_1m_tokens']:.4g} at {summary['price_per_device_hour']:g} per device-hour"
            if summary.get("cost_per_1m_tokens") is not None
            else "n/a (set output.price_per_device_hour)"
        ),
        f"plan: {summary['plan']}" + (f", adapter {summary['adapter']}" if summary.get("adapter") else ""),
    ]
    if summary.get("predicted_speedup"):
        how = (
            f"measured on {summary['plan_measured_on']} when the plan was chosen"
            if summary.get("plan_measured_on")
            else "L / kept layers"
            if summary.get("plan_basis") == "layers"
            else "calibrated"
        )
        lines.append(
            f"decode speedup: target {summary['target_speedup']:g}x, "
            f"plan {summary['predicted_speedup']:.2f}x ({how})"
        )
        lines += [f"  {note}" for note in summary.get("plan_notes", [])]
    if summary.get("measured_batches"):
        lines.append(
            f"measured against full depth on {summary['measured_batches']} batch(es) of this run: decode "
            f"{summary['measured_decode_speedup']:.2f}x, prefill + decode {summary['measured_speedup']:.2f}x"
        )
    if summary.get("batches_within_5pct"):
        lines.append(
            f"adaptive exits: layer speedup {summary['achieved_layer_speedup']:.2f}x, "
            f"{summary['batches_within_5pct']} batches within 5% of the target"
        )
    lines.append(f"results: {Path(summary['output_dir']).resolve()}")
    return "\n".join(lines)
