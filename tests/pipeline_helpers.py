"""Shared set-up for the pipeline tests: a tiny model folder, corpora, and job configs."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import (
    ClusterConfig,
    DataConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
    SkipConfig,
    TaskConfig,
)

TEXTS = [
    "In the beginning God created",
    "We propose a method that skips",
    "And the earth was without form",
    "The results show that quality",
    "Summarize the abstract in one",
    "Translate the verse into",
    "darkness was upon the face of",
    "fine-tuned with skipping in place",
    "a fixed speedup for transformer",
    "the heaven and the earth",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def corpus_rows(n: int = 10) -> list[dict]:
    return [{"doc": f"d{i:03d}", "text": TEXTS[i % len(TEXTS)] + f" number {i}"} for i in range(n)]


def job(model_dir: Path, data_path: Path, out_dir: Path, **groups) -> JobConfig:
    cfg = JobConfig(
        model=ModelConfig(name="tiny", spec=str(model_dir)),
        task=TaskConfig(name="complete", input_column="text", chat=False, max_new_tokens=6),
        skip=SkipConfig(strategy="uniform", target_speedup=2.0, basis="layers", full_depth_every=0),
        data=DataConfig(name="t", path=str(data_path), id_column="doc"),
        cluster=ClusterConfig(num_actors=1, batch_size=4, threads_per_actor=1, cpus_per_actor=0.5),
        output=OutputConfig(dir=str(out_dir), progress_every_s=0),
    )
    for group, values in groups.items():
        for key, value in values.items():
            setattr(getattr(cfg, group), key, value)
    return cfg
