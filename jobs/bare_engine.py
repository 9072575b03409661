"""The bare side of jobs.bench_pipeline: the engine as a user would script it without Ray, in the calling
process (`time_batches`) or as a script in a fresh process that imports torch and loads the model
first, as the job's actor does (`python -m jobs.bare_engine`: a JobConfig and the rows as JSON on
stdin, tokens and timings as JSON on stdout). Imports nothing of Ray."""

from __future__ import annotations

import json
import sys
import time

import torch

from pipeline.config import JobConfig, typed
from pipeline.prompts import PromptBuilder
from skipengine import Engine, load_model, make_plan


def time_batches(engine: Engine, cfg: JobConfig, texts: list[str]) -> tuple[float, int]:
    """(generated tokens/s, generated tokens) over the rows in batches of cluster.batch_size."""
    prompts = PromptBuilder(cfg.task, engine.tokenizer)
    plan = make_plan(
        engine.num_layers, cfg.skip.strategy, cfg.skip.target_speedup, cfg.skip.prefill, "layers"
    )
    sampling = cfg.task.sampling()
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), cfg.cluster.batch_size):
        ids = [prompts.build(t).ids for t in texts[i : i + cfg.cluster.batch_size]]
        tokens += engine.generate(ids, plan, sampling).stats.num_generated_tokens
    return tokens / (time.perf_counter() - start), tokens


def main() -> None:
    request = json.load(sys.stdin)
    cfg = typed(request["cfg"], JobConfig)
    torch.set_num_threads(cfg.cluster.threads_per_actor)  # what the job's actor gets
    model, tokenizer = load_model(cfg.model.spec, cfg.model.device, cfg.model.dtype)
    tokens_per_s, tokens = time_batches(Engine(model, tokenizer), cfg, request["texts"])
    json.dump({"tokens": tokens, "tokens_per_s": tokens_per_s}, sys.stdout)


if __name__ == "__main__":
    main()
