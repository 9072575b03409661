"""python -m jobs.bench_pipeline: generated tokens/s of the bare engine vs the Ray job (one actor), same
rows, model, plan and batch size, interleaved. Ends with one JSON line.

job_env and job_cluster compare job variants in the same run (every pair of the two): job_env entries are
environment for the job's Ray, set only while that job runs (local Ray starts afresh per job, so its
daemons and workers inherit it), e.g. 'job_env=[{},{RAY_num_workers_soft_limit:"2"}]'; job_cluster entries
override cluster/ keys, e.g. 'job_cluster=[{threads_per_actor:1},{threads_per_actor:2}]'."""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
import pyarrow as pa
import pyarrow.parquet as pq
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from jobs.common import setup
from pipeline.config import JobConfig
from pipeline.corpora import BIBLE_SPLITS, read_bible, write_bible_jsonl
from pipeline.prompts import PromptBuilder
from pipeline.run import run_job
from skipengine import Engine, SamplingParams, load_model, make_plan


@dataclass
class BenchPipelineConfig(JobConfig):
    rows: int = 1024  # taken from the Bible test range
    repeats: int = 2
    job_env: list[dict[str, str]] = field(default_factory=lambda: [{}])  # job variants (see above)
    job_cluster: list[dict[str, Any]] = field(default_factory=lambda: [{}])


ConfigStore.instance().store(name="bench_pipeline_schema", node=BenchPipelineConfig)
log = logging.getLogger("bench_pipeline")


def bare_engine_tokens_per_s(engine: Engine, cfg: JobConfig, texts: list[str]) -> float:
    prompts = PromptBuilder(cfg.task, engine.tokenizer)
    plan = make_plan(
        engine.num_layers, cfg.skip.strategy, cfg.skip.target_speedup, cfg.skip.prefill, "layers"
    )
    sampling = SamplingParams(max_new_tokens=cfg.task.max_new_tokens, stop=tuple(cfg.task.stop))
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), cfg.cluster.batch_size):
        ids = [prompts.build(t).ids for t in texts[i : i + cfg.cluster.batch_size]]
        tokens += engine.generate(ids, plan, sampling).stats.num_generated_tokens
    return tokens / (time.perf_counter() - start)


@contextmanager
def environment(env: dict[str, str]):
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def job_tokens_per_s(cfg: JobConfig, env: dict[str, str], cluster: dict[str, Any]) -> tuple[float, float]:
    """(whole run, batches only) generated tokens/s of one job run."""
    cfg = replace(cfg, cluster=replace(cfg.cluster, **cluster))
    with environment(env):
        summary = run_job(cfg)
    stats = pa.concat_tables(pq.read_table(p) for p in Path(cfg.output.dir, "stats").glob("*.parquet"))
    return summary["tokens_per_s"], summary["tokens_out_now"] / sum(stats.column("wall_s").to_pylist())


@hydra.main(config_path="../conf", config_name="bench_pipeline", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    setup(dcfg.cluster.threads_per_actor)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    test_start = BIBLE_SPLITS["test"][0]
    corpus = write_bible_jsonl(run_dir / "corpus.jsonl", test_start, test_start + dcfg.rows)
    pairs = read_bible(start=test_start, stop=test_start + dcfg.rows)
    dcfg.data.path, dcfg.data.name = str(corpus), "bench"
    bench: BenchPipelineConfig = OmegaConf.to_object(dcfg)
    cfg = JobConfig(bench.model, bench.task, bench.skip, bench.data, bench.cluster, bench.output)
    cfg.output.dir = str(run_dir / "job")

    model, tokenizer = load_model(cfg.model.spec, cfg.model.device, cfg.model.dtype)
    engine = Engine(model, tokenizer)
    texts = [en for en, _ in pairs]
    variants = [(dict(env), dict(cluster)) for env in bench.job_env for cluster in bench.job_cluster]
    bare = []
    jobs = [{"env": env, "cluster": cluster, "whole": [], "batches": []} for env, cluster in variants]
    sides = ["bare", *range(len(jobs))]
    for rep in range(dcfg.repeats):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            if side == "bare":
                bare.append(bare_engine_tokens_per_s(engine, cfg, texts))
            else:
                whole, batches = job_tokens_per_s(cfg, jobs[side]["env"], jobs[side]["cluster"])
                jobs[side]["whole"].append(whole)
                jobs[side]["batches"].append(batches)
            name = "bare" if side == "bare" else f"job {jobs[side]['env']} {jobs[side]['cluster']}"
            log.info("repeat %d %s done", rep + 1, name)
    bare_median = statistics.median(bare)
    for job in jobs:
        job["tokens_per_s"] = statistics.median(job["whole"])
        job["batch_tokens_per_s"] = statistics.median(job["batches"])
        job["vs_bare"] = job["tokens_per_s"] / bare_median
        job["batches_vs_bare"] = job["batch_tokens_per_s"] / bare_median
    first = jobs[0]
    row = {
        "rows": dcfg.rows,
        "batch_size": cfg.cluster.batch_size,
        "plan": f"{cfg.skip.strategy} x{cfg.skip.target_speedup} (layers)",
        "bare_tokens_per_s": bare_median,
        "job_tokens_per_s": first["tokens_per_s"],
        "job_batch_tokens_per_s": first["batch_tokens_per_s"],
        "job_vs_bare": first["vs_bare"],
        "job_batches_vs_bare": first["batches_vs_bare"],
        "samples": {"bare": bare, "jobs": jobs},
    }
    pq.write_table(
        pa.Table.from_pylist([{k: v for k, v in row.items() if k != "samples"}]),
        run_dir / "bench_pipeline.parquet",
    )
    for job in jobs:
        print(
            f"bare engine {bare_median:.1f} tok/s | Ray job {json.dumps(job['env'])} "
            f"{json.dumps(job['cluster'])} "
            f"{job['tokens_per_s']:.1f} tok/s ({job['vs_bare']:.2f}x, actor start and model load included) | "
            f"its batches {job['batch_tokens_per_s']:.1f} tok/s ({job['batches_vs_bare']:.2f}x)"
        )
    print(json.dumps({"bench": "pipeline", **row}))


if __name__ == "__main__":
    main()
