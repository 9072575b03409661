"""The generator actor: one loaded model and plan per actor; one call per batch.

Each call writes its output rows itself, as one Parquet file named from the batch's ids and moved into
place atomically (a retried batch replaces its own file instead of adding a second), and returns one
stats row to the driver. A bad row becomes an error row; a batch that fails is retried, then split, so
that only rows that really fail are marked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from pipeline.attempts import Attempts
from pipeline.config import JobConfig, SkipConfig
from pipeline.planning import RunPlan, device_name
from pipeline.prompts import PromptBuilder
from pipeline.sources import ID, row_hash
from skipengine import Engine, GenerationStats, RowResult, full_plan, generic, load_model
from skipengine.adaptive import AdaptivePlan, exit_layers_for, exit_probabilities
from skipengine.control import SpeedupController, kv_fraction, layer_speedup, threshold_for_target
from skipengine.exits import load_exit_classifiers
from skipengine.lora import load_adapter

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = [
    (ID, pa.string()),
    ("prompt", pa.string()),
    ("generated_text", pa.string()),
    ("num_input_tokens", pa.int64()),
    ("num_generated_tokens", pa.int64()),
    ("finish_reason", pa.string()),
    ("error", pa.string()),
    ("retryable", pa.bool_()),  # an error that running the row again may not repeat (output.retry_errors)
    ("truncated", pa.bool_()),
    ("latency_s", pa.float64()),
    ("plan", pa.string()),
    ("model", pa.string()),
    ("actor", pa.string()),
    ("node", pa.string()),
    ("batch_id", pa.string()),
    ("input_hash", pa.string()),  # of the row's input text: a resume finds rows whose text changed
]


FULL_DEPTH_STATS = (
    "full_depth_rerun_s",
    "full_depth_decode_s",
    "full_depth_s",
    "measured_decode_speedup",
    "measured_speedup",
)


def adaptive_engine(skip: SkipConfig, model: torch.nn.Module, tokenizer) -> Engine:
    """The engine for skip=adaptive: skip.adapter (an exit-aware adapter: jobs.finetune strategy=adaptive)
    merged into the model, and exit classifiers trained on that same model (they read its hidden states;
    loading refuses classifiers trained with another adapter or none)."""
    layers = model.config.num_hidden_layers
    classifiers = None
    exits = exit_layers_for(layers, skip.exit_every, skip.min_depth)
    if skip.criterion == "classifier":
        classifiers = load_exit_classifiers(skip.exit_classifiers, model, skip.adapter)
        exits = classifiers.exit_layers
    if skip.adapter:
        model = load_adapter(model, skip.adapter, AdaptivePlan(layers, exits))
    engine = Engine(model, tokenizer)
    engine.exit_classifiers = classifiers
    return engine


def build_adaptive_plan(skip: SkipConfig, engine: Engine, calibration: list[list[int]]) -> AdaptivePlan:
    """The threshold is the configured one, or the highest whose predicted speedup on the calibration
    prompts' full-depth traces meets the target; with skip.controller, the plan carries a controller that
    holds the target step by step along that calibration's curve. The engine comes from adaptive_engine."""
    layers = engine.num_layers
    if skip.criterion == "classifier":  # the classifiers' own exit points, from skip.min_depth on
        trained = engine.exit_classifiers.exit_layers
        exits = tuple(e for e in trained if e >= skip.min_depth - 1)
        if not exits:
            raise ValueError(
                f"skip.min_depth={skip.min_depth} leaves none of the exit classifiers' exit points "
                f"(after layers {list(trained)}, 0-based); lower it"
            )
    else:
        exits = exit_layers_for(layers, skip.exit_every, skip.min_depth)
    classifiers = engine.exit_classifiers
    if skip.kv_fill == "translated" and (classifiers is None or classifiers.translators is None):
        raise ValueError(
            "skip.kv_fill=translated fills K/V from the exit translators, which these exit classifiers do "
            "not carry; use classifiers from jobs.train_exits translate=true or skip.kv_fill=decoupled"
        )
    if skip.kv_fill == "fitted" and (
        classifiers is None or classifiers.fill is None or not set(exits) <= set(classifiers.exit_layers)
    ):
        raise ValueError(
            "skip.kv_fill=fitted estimates deeper layers' inputs with coefficients fit for the exit "
            "classifiers' exit points, which these classifiers do not carry (or not for these exit points); "
            "use classifiers from jobs.train_exits translate=true (re-run it for files from before the fill) "
            "or skip.kv_fill=decoupled"
        )
    kv = kv_fraction(engine.adapter)
    threshold, predicted, controller = skip.threshold, None, None
    if threshold is None or skip.controller:
        if skip.criterion == "fixed" or not calibration:
            raise ValueError(
                "skip.threshold=null and skip.controller=true calibrate the exit scores on the corpus's "
                f"first rows (none here); with criterion={skip.criterion} set skip.threshold and "
                "skip.controller=false"
            )
        probs = exit_probabilities(engine, calibration, exits, skip.criterion)
        calibrated, predicted = threshold_for_target(probs, exits, layers, skip.target_speedup, kv)
        threshold = calibrated if threshold is None else threshold
        if skip.controller:
            controller = SpeedupController(probs, exits, layers, skip.target_speedup, kv, threshold)
    return AdaptivePlan(
        layers,
        exits,
        threshold,
        skip.criterion,
        skip.kv_fill,
        skip.target_speedup,
        predicted or 1.0,
        controller=controller,
    )


class Generator:
    def __init__(
        self,
        cfg: JobConfig,
        outputs_dir: str,
        run_plan: RunPlan | None = None,
        calibration_texts: list[str] | None = None,
        column_types: dict[str, pa.DataType] | None = None,
    ):
        torch.set_num_threads(cfg.cluster.threads_per_actor)
        self.cfg = cfg
        self.outputs_dir = Path(outputs_dir)
        self.attempts = Attempts(self.outputs_dir.parent / "attempts")
        model, tokenizer = load_model(
            cfg.model.spec, cfg.model.device, cfg.model.dtype, cfg.model.trust_remote_code
        )
        self.prompts = PromptBuilder(cfg.task, tokenizer)
        self.kv_price = 0.0  # layers per K/V fill (adaptive exits)
        if cfg.skip.strategy == "adaptive":
            self.engine, self.adapter = adaptive_engine(cfg.skip, model, tokenizer), cfg.skip.adapter
            calibration = [p.ids for p in map(self.prompts.build, calibration_texts or []) if p.ids]
            self.plan = build_adaptive_plan(cfg.skip, self.engine, calibration)
            self.kv_price = kv_fraction(self.engine.adapter)
        else:  # the run's plan (pipeline.planning), the same in every actor
            if run_plan is None:
                raise ValueError("a static skip plan's actors need the run's plan (pipeline.planning)")
            self.plan, self.adapter = run_plan.plan, run_plan.adapter
            if self.adapter:  # merged before the engine builds its frozen kernels from the weights
                model = load_adapter(model, self.adapter, self.plan)
            self.engine = Engine(model, tokenizer)
        self.sampling = cfg.task.sampling()
        if self.engine.adapter is None:  # here, not per batch: a refused setting would error every row
            generic.check_sampling(self.engine.model, self.sampling)
        self.column_types = column_types or {}  # copied input columns: their type over the whole corpus
        self.batches = 0  # batches this actor has generated
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        # inside Ray, the node id; outside (a notebook, a benchmark) asking Ray would start it
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()
        self.device = device_name(self.engine.device)  # with its model: what a cost study prices
        self._warm_up()
        log.info("actor %s ready: %s, adapter %s", self.actor, self.plan, self.adapter)

    def _warm_up(self) -> None:
        """A few tokens under the plan and at full depth before the first batch: the allocator and the
        kernels' first calls would otherwise slow that batch, and its full-depth rerun would time warm
        against a cold plan."""
        if isinstance(self.plan, AdaptivePlan):  # its controller keeps state across calls
            return
        sampling = replace(self.sampling, max_new_tokens=min(4, self.sampling.max_new_tokens))
        prompt = [[self.engine.pad_id] * 8] * min(2, self.cfg.cluster.batch_size)
        for plan in (self.plan, full_plan(self.engine.num_layers)):
            try:
                self.engine.generate(prompt, plan, sampling)
            except Exception as e:  # a row's failure is the batch's business, not the warm-up's
                log.warning("warm-up failed: %s: %s", type(e).__name__, e)

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        rows = batch.to_pylist()
        ids = [str(row[ID]) for row in rows]
        batch_id = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]
        prompts = [self.prompts.build(row.get(self.cfg.task.input_column)) for row in rows]
        results = [RowResult(error=p.error) for p in prompts]
        ready = [i for i, p in enumerate(prompts) if p.ids is not None]
        attempt = self.attempts.start(batch_id)
        if attempt == 1:
            generated, stats = self._generate_splitting([prompts[i].ids for i in ready])
        else:  # an actor died on this batch before: one row at a time, each marked while it runs
            log.warning(
                "batch %s is back after its actor died (try %d): one row at a time", batch_id, attempt
            )
            generated, stats = self._generate_marked(
                batch_id, [ids[i] for i in ready], [prompts[i].ids for i in ready]
            )
        for i, result in zip(ready, generated, strict=True):
            results[i] = result
        self._write(batch_id, rows, prompts, results)
        self.attempts.finish(batch_id)
        stats_row = self._stats_row(batch_id, results, stats, time.perf_counter() - start)
        stats_row |= self._measure_full_depth(
            [prompts[i].ids for i in ready], [results[i].num_generated_tokens for i in ready], stats
        )
        self.batches += 1
        return pa.Table.from_pylist([stats_row])

    def _measure_full_depth(
        self, prompt_ids: list[list[int]], generated: list[int], stats: list[GenerationStats]
    ) -> dict:
        """On every skip.full_depth_every-th batch, the same rows again at full depth, right after the plan
        ran them, each generating as many tokens as the plan's did: the achieved speedup measured on the
        job's own rows and work, for the decode steps alone and for prefill plus decode. (Full depth runs
        with the plan's adapter merged: its time, not its text, is what is measured.)"""
        every = self.cfg.skip.full_depth_every
        measured = {key: None for key in FULL_DEPTH_STATS}
        if not every or self.batches % every or not prompt_ids or len(stats) != 1:
            return measured
        if not isinstance(self.plan, AdaptivePlan) and self.plan.is_full_depth:
            return measured
        started = time.perf_counter()
        try:
            full_depth = full_plan(self.engine.num_layers)
            full = self.engine.generate(
                prompt_ids, full_depth, self.sampling, self.cfg.task.on_too_long, generated
            ).stats
        except Exception as e:  # the measurement is extra: it never fails the batch
            log.warning("full-depth measurement failed: %s: %s", type(e).__name__, e)
            return measured
        plan = stats[0]
        if min(full.decode_s, plan.decode_s) <= 0:
            return measured
        return {
            "full_depth_rerun_s": time.perf_counter() - started,
            "full_depth_decode_s": full.decode_s,
            "full_depth_s": full.prefill_s + full.decode_s,
            "measured_decode_speedup": full.decode_s / plan.decode_s,
            "measured_speedup": (full.prefill_s + full.decode_s) / (plan.prefill_s + plan.decode_s),
        }

    def _generate_marked(
        self, batch_id: str, ids: list[str], prompt_ids: list[list[int]]
    ) -> tuple[list[RowResult], list[GenerationStats]]:
        """Each row alone, marked while it runs; a row whose mark an earlier try left killed its actor."""
        results, stats = [], []
        for row_id, ids_of_row in zip(ids, prompt_ids, strict=True):
            if self.attempts.killed_before(batch_id, row_id):
                log.warning("row %s killed its actor; written as an error row", row_id)
                error = "generation killed its actor process (out of memory, or a crash in native code)"
                results.append(RowResult(error=error, retryable=True))
                continue
            self.attempts.start_row(batch_id, row_id)
            row, row_stats = self._generate_splitting([ids_of_row])
            self.attempts.finish_row(batch_id, row_id)
            results += row
            stats += row_stats
        return results, stats

    def _generate_splitting(
        self, prompt_ids: list[list[int]]
    ) -> tuple[list[RowResult], list[GenerationStats]]:
        """Generate; on failure retry, then split in halves until the failing rows are isolated."""
        if not prompt_ids:
            return [], []
        error = None
        for _ in range(1 + self.cfg.cluster.max_batch_retries):
            try:
                out = self.engine.generate(prompt_ids, self.plan, self.sampling, self.cfg.task.on_too_long)
                return out.rows, [out.stats]
            except Exception as e:  # an engine failure (OOM, a kernel error): isolate it, never kill the job
                error = e
                log.warning("batch of %d rows failed: %s: %s", len(prompt_ids), type(e).__name__, e)
        if len(prompt_ids) == 1:
            failed = f"generation failed: {type(error).__name__}: {error}"
            return [RowResult(error=failed, retryable=True)], []
        mid = len(prompt_ids) // 2
        left, left_stats = self._generate_splitting(prompt_ids[:mid])
        right, right_stats = self._generate_splitting(prompt_ids[mid:])
        return left + right, left_stats + right_stats

    def _write(self, batch_id: str, rows: list[dict], prompts: list, results: list[RowResult]) -> None:
        keep = [c for c in self.cfg.data.keep_columns if c != ID]
        if self.cfg.task.reference_column and self.cfg.task.reference_column not in keep:
            keep.append(self.cfg.task.reference_column)
        plan_text, model = str(self.plan), self.cfg.model.spec
        columns: dict[str, list] = {name: [] for name, _ in OUTPUT_SCHEMA}
        for row, prompt, res in zip(rows, prompts, results, strict=True):
            values = (
                str(row[ID]),
                prompt.text,
                res.text if res.ok else None,
                res.num_input_tokens,
                res.num_generated_tokens,
                res.finish_reason,
                res.error,
                res.retryable if res.error else None,
                res.truncated,
                res.latency_s,
                plan_text,
                model,
                self.actor,
                self.node,
                batch_id,
                row_hash(row.get(self.cfg.task.input_column)),
            )
            for (name, _), value in zip(OUTPUT_SCHEMA, values, strict=True):
                columns[name].append(value)
        table = pa.table({name: pa.array(columns[name], kind) for name, kind in OUTPUT_SCHEMA})
        for name in keep:
            # the corpus's own type, so an all-null batch writes the same schema as every other part file
            values = pa.array([row.get(name) for row in rows], self.column_types.get(name))
            table = table.append_column(name, values)
        final = self.outputs_dir / f"part-{batch_id}.parquet"
        tmp = self.outputs_dir / f".tmp-{batch_id}-{uuid.uuid4().hex[:8]}.parquet"
        pq.write_table(table, tmp)
        os.replace(tmp, final)  # atomic: readers see the whole batch or none of it

    def _stats_row(self, batch_id: str, results: list[RowResult], stats: list[GenerationStats], wall: float):
        prefill = sum(s.prefill_s for s in stats)
        decode = sum(s.decode_s for s in stats)
        tokens_out = sum(r.num_generated_tokens for r in results)
        row_steps = sum(s.decode_row_steps for s in stats)
        prompt_tokens = sum(s.num_input_tokens for s in stats)
        decode_layers = (
            sum(s.decode_layers_per_token * s.decode_row_steps for s in stats) / row_steps
            if row_steps
            else float(self.plan.num_kept)
        )
        prefill_layers = (
            sum(s.prefill_layers_per_token * s.num_input_tokens for s in stats) / prompt_tokens
            if prompt_tokens
            else float(len(self.plan.prefill_layers))
        )
        return {
            "batch_id": batch_id,
            "actor": self.actor,
            "node": self.node,
            "device": self.device,
            "rows": len(results),
            "rows_ok": sum(r.ok for r in results),
            "rows_error": sum(not r.ok for r in results),
            "tokens_in": sum(r.num_input_tokens for r in results),
            "tokens_out": tokens_out,
            "prefill_s": prefill,
            "decode_s": decode,
            "wall_s": wall,
            "tokens_per_s": tokens_out / wall if wall > 0 else 0.0,
            "prefill_layers_per_token": prefill_layers,
            "decode_layers_per_token": decode_layers,
            "exit_threshold": next((s.exit_threshold for s in stats if s.exit_threshold is not None), None),
            "achieved_layer_speedup": layer_speedup(self.plan.num_layers, decode_layers, self.kv_price),
            "target_speedup": self.plan.target_speedup,
            "predicted_speedup": self.plan.predicted_speedup,
            "plan": str(self.plan),
            "adapter": Path(self.adapter).name if self.adapter else None,
        }
