"""python -m jobs.bench_pipeline: generated tokens/s of the bare engine vs the Ray job (one actor), same
rows, model, plan and batch size, interleaved. Ends with one JSON line.

The bare engine runs two ways: as a script in a fresh process (jobs.bare_engine), which like the job's
actor imports torch and loads the model before it generates, and warm in this process, loaded once.

job_env and job_cluster compare job variants in the same run (every pair of the two): job_env entries are
environment for the job's Ray, set only while that job runs (local Ray starts afresh per job, so its
daemons and workers inherit it), e.g. 'job_env=[{},{RAY_num_workers_soft_limit:"2"}]'; job_cluster entries
override cluster/ keys, e.g. 'job_cluster=[{threads_per_actor:1},{threads_per_actor:2}]'."""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
import pyarrow as pa
import pyarrow.parquet as pq
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from jobs.bare_engine import time_batches
from jobs.common import job_config, setup
from pipeline.config import JobConfig
from pipeline.corpora import BIBLE_SPLITS, read_bible, write_bible_jsonl
from pipeline.run import run_job
from skipengine import Engine, load_model


@dataclass
class BenchPipelineConfig(JobConfig):
    rows: int = 1024  # taken from the Bible test range
    repeats: int = 2
    job_env: list[dict[str, str]] = field(default_factory=lambda: [{}])  # job variants (see above)
    job_cluster: list[dict[str, Any]] = field(default_factory=lambda: [{}])


ConfigStore.instance().store(name="bench_pipeline_schema", node=BenchPipelineConfig)
log = logging.getLogger("bench_pipeline")


def bare_script(cfg: JobConfig, texts: list[str]) -> tuple[float, float]:
    """(whole run, generation only) generated tokens/s of the bare engine as a script in a fresh process:
    the whole run counts the interpreter, the imports and the model load, as the job's counts its actor's
    start."""
    request = json.dumps({"cfg": asdict(cfg), "texts": texts})
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "jobs.bare_engine"], input=request, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"the bare engine script failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    return result["tokens"] / wall, result["tokens_per_s"]


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
    bench = job_config(dcfg, BenchPipelineConfig)  # the job's own checks run in run_job
    setup(bench.cluster.threads_per_actor)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    test_start = BIBLE_SPLITS["test"][0]
    corpus = write_bible_jsonl(run_dir / "corpus.jsonl", test_start, test_start + bench.rows)
    pairs = read_bible(start=test_start, stop=test_start + bench.rows)
    bench.data.path, bench.data.name = str(corpus), "bench"
    cfg = JobConfig(bench.model, bench.task, bench.skip, bench.data, bench.cluster, bench.output)
    cfg.output.dir = str(run_dir / "job")

    model, tokenizer = load_model(cfg.model.spec, cfg.model.device, cfg.model.dtype)
    engine = Engine(model, tokenizer)
    texts = [en for en, _ in pairs]
    variants = [(dict(env), dict(cluster)) for env in bench.job_env for cluster in bench.job_cluster]
    warm, script_whole, script_generate = [], [], []
    jobs = [{"env": env, "cluster": cluster, "whole": [], "batches": []} for env, cluster in variants]
    sides = ["warm", "script", *range(len(jobs))]
    for rep in range(bench.repeats):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            if side == "warm":
                warm.append(time_batches(engine, cfg, texts)[0])
            elif side == "script":
                whole, generate = bare_script(cfg, texts)
                script_whole.append(whole)
                script_generate.append(generate)
            else:
                whole, batches = job_tokens_per_s(cfg, jobs[side]["env"], jobs[side]["cluster"])
                jobs[side]["whole"].append(whole)
                jobs[side]["batches"].append(batches)
            name = side if isinstance(side, str) else f"job {jobs[side]['env']} {jobs[side]['cluster']}"
            log.info("repeat %d %s done", rep + 1, name)
    bare = {
        "warm": statistics.median(warm),
        "script_whole": statistics.median(script_whole),
        "script_generate": statistics.median(script_generate),
    }
    for job in jobs:
        job["tokens_per_s"] = statistics.median(job["whole"])
        job["batch_tokens_per_s"] = statistics.median(job["batches"])
        job["vs_script"] = job["tokens_per_s"] / bare["script_whole"]
        job["batches_vs_script"] = job["batch_tokens_per_s"] / bare["script_generate"]
        job["vs_warm"] = job["tokens_per_s"] / bare["warm"]
        job["batches_vs_warm"] = job["batch_tokens_per_s"] / bare["warm"]
    first = jobs[0]
    row = {
        "rows": bench.rows,
        "batch_size": cfg.cluster.batch_size,
        "plan": f"{cfg.skip.strategy} x{cfg.skip.target_speedup} (layers)",
        "bare_warm_tokens_per_s": bare["warm"],
        "bare_script_tokens_per_s": bare["script_whole"],
        "bare_script_generate_tokens_per_s": bare["script_generate"],
        "job_tokens_per_s": first["tokens_per_s"],
        "job_batch_tokens_per_s": first["batch_tokens_per_s"],
        "job_vs_script": first["vs_script"],
        "job_batches_vs_script": first["batches_vs_script"],
        "job_vs_warm": first["vs_warm"],
        "job_batches_vs_warm": first["batches_vs_warm"],
        "samples": {
            "warm": warm,
            "script_whole": script_whole,
            "script_generate": script_generate,
            "jobs": jobs,
        },
    }
    pq.write_table(
        pa.Table.from_pylist([{k: v for k, v in row.items() if k != "samples"}]),
        run_dir / "bench_pipeline.parquet",
    )
    print(
        f"bare engine: as a script in a fresh process {bare['script_whole']:.1f} tok/s (start and model load "
        f"included; {bare['script_generate']:.1f} tok/s generating) | warm, in this process "
        f"{bare['warm']:.1f} tok/s"
    )
    for job in jobs:
        print(
            f"Ray job {json.dumps(job['env'])} {json.dumps(job['cluster'])}: "
            f"{job['tokens_per_s']:.1f} tok/s ({job['vs_script']:.2f}x the script, actor start and model "
            f"load included; {job['vs_warm']:.2f}x warm) | its batches {job['batch_tokens_per_s']:.1f} tok/s "
            f"({job['batches_vs_script']:.2f}x the script's generation; {job['batches_vs_warm']:.2f}x warm)"
        )
    print(json.dumps({"bench": "pipeline", **row}))


if __name__ == "__main__":
    main()
