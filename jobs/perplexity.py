"""python -m jobs.perplexity: perplexity of the model under a skip plan (and its adapter) on held-out text.

The first `context` tokens of each window run the plan's prefill layers, the rest the kept layers, as
in generation (skipengine.perplexity). skip=adaptive: every token exits by the rule, at the threshold
calibrated on the text's first windows (as the job calibrates on the corpus's first rows). Prints one
JSON line; writes it to `out` when given.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from jobs.common import job_config, setup
from pipeline.config import ModelConfig, SkipConfig, adaptive_adapter, choice, validate_model, validate_skip
from pipeline.corpora import read_austen
from pipeline.generator import adaptive_engine, build_adaptive_plan
from pipeline.planning import build_run_plan
from skipengine import Engine, SamplingParams, load_model
from skipengine.lora import load_adapter
from skipengine.perplexity import adaptive_perplexity, perplexity, windows

log = logging.getLogger("perplexity")
TEXTS = {"austen": read_austen}


@dataclass
class PerplexityConfig:
    """conf/perplexity.yaml's keys; its comments say what each does."""

    model: ModelConfig = field(default_factory=ModelConfig)
    skip: SkipConfig = field(default_factory=SkipConfig)
    text: str = "austen"  # data/austen_persuasion.txt.gz (never trained on)
    windows: int = 32  # the first N non-overlapping windows of the text
    window_tokens: int = 256
    context: int = 32  # tokens per window that play the prompt (prefill layers); the rest are scored
    batch_size: int = 8  # also the batch size that skip.basis=measured calibrates for
    threads: int = 2
    out: str | None = None  # a JSON file for the result (also printed)

    def validate(self) -> None:
        validate_model(self.model)
        validate_skip(self.skip)
        choice("text", self.text, (*TEXTS,))
        if not 0 < self.context < self.window_tokens:
            raise ValueError(f"context={self.context} must be > 0 and < window_tokens={self.window_tokens}")
        if self.windows < 1 or self.batch_size < 1:
            raise ValueError("windows and batch_size must be >= 1")


ConfigStore.instance().store(name="perplexity_schema", node=PerplexityConfig)


@hydra.main(config_path="../conf", config_name="perplexity", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = job_config(dcfg, PerplexityConfig)
    setup(cfg.threads)
    skip = cfg.skip
    model, tokenizer = load_model(cfg.model.spec, cfg.model.device, cfg.model.dtype)
    ids = tokenizer(TEXTS[cfg.text](), add_special_tokens=False)["input_ids"]
    chunks = windows(ids, cfg.window_tokens, cfg.windows)
    if skip.strategy == "adaptive":
        skip.adapter = adaptive_adapter(skip) if skip.adapter == "auto" else skip.adapter
        engine, adapter = adaptive_engine(skip, model, tokenizer), skip.adapter
        plan = build_adaptive_plan(skip, engine, chunks[: skip.calibration_rows])
        result = adaptive_perplexity(engine, chunks, plan, cfg.context)
    else:
        # basis=measured: the windows' first tokens as prompts, generating the rest of a window
        sampling = SamplingParams(max_new_tokens=cfg.window_tokens - cfg.context)
        prompts = [chunk[: cfg.context] for chunk in chunks]
        engine = Engine(model, tokenizer)
        chosen = build_run_plan(skip, engine.num_layers, lambda: (engine, prompts), sampling, cfg.batch_size)
        plan, adapter = chosen.plan, chosen.adapter
        if adapter:
            model = load_adapter(model, adapter, plan)
        result = perplexity(model, chunks, plan, cfg.context, cfg.batch_size)
    row = {"text": cfg.text, "plan": str(plan), "kept": plan.num_kept, "adapter": adapter, **result}
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(row, indent=2))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
