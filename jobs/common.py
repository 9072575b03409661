"""What every job does first: its config checked, logging, torch threads, and the model from the model/
config group."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TypeVar

import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.config import ModelConfig, TaskConfig, typed
from pipeline.corpora import read_aclsum
from pipeline.prompts import PromptBuilder
from skipengine import Engine, load_model

T = TypeVar("T")


def setup(threads: int | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(int(threads))


def job_config(cfg: DictConfig, schema: type[T]) -> T:
    """The job's Hydra config as its schema's dataclass, checked (pipeline.config.typed); a bad key or
    value ends the job with its message and exit status 2, before anything loads."""
    setup()  # the message goes out as the job's other log lines do
    try:
        return typed(cfg, schema)
    except (ValueError, FileNotFoundError) as e:
        logging.getLogger("config").error("%s", e)
        sys.exit(2)


def engine_from_config(model_cfg: ModelConfig) -> Engine:
    model, tokenizer = load_model(
        model_cfg.spec,
        device=model_cfg.device,
        dtype=model_cfg.dtype,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    return Engine(model, tokenizer)


def task_config(name: str) -> TaskConfig:
    """conf/task/<name>.yaml as a TaskConfig, for jobs that run several tasks outside Hydra's groups."""
    conf = Path(__file__).resolve().parent.parent / "conf" / "task" / f"{name}.yaml"
    return typed(OmegaConf.load(conf), TaskConfig)


def aclsum_test_prompts(tokenizer) -> list[list[int]]:
    """Token ids of the summarize prompt (chat template) for every ACLSum test paper's abstract."""
    builder = PromptBuilder(task_config("summarize"), tokenizer)
    return [builder.build(r["abstract"]).ids for r in read_aclsum("test")]


def run_pairs(run_dir: str | None) -> list[tuple[str, str]]:
    """(prompt, generated text) of every ok row of a finished jobs.generate run."""
    if not run_dir or not (Path(run_dir) / "outputs").is_dir():
        raise ValueError(f"run_dir={run_dir!r} is not a finished jobs.generate run (no outputs/)")
    rows = pq.read_table(Path(run_dir) / "outputs", columns=["prompt", "generated_text"]).to_pylist()
    return [(r["prompt"], r["generated_text"]) for r in rows if r["generated_text"]]
