"""python -m jobs.train_exits: exit classifiers for skip=adaptive, from full-depth traces of unlabeled
text: a finished jobs.generate run's prompts and outputs (run_dir=...), i.e. your own corpus as the model
reads and writes it. Writes `out` (a safetensors file tied to the model) and prints per-exit stats.
adapter=<an exit-aware adapter, jobs.finetune strategy=adaptive>: trained on the model with it merged,
and tied to it (skip.adapter=auto then loads that adapter with these classifiers). translate=true (the
default) also fits a translator per exit point, the state a leaving token's prediction is read from, and
the per-dimension coefficients of skip.kv_fill=fitted."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from jobs.common import job_config, run_pairs, setup
from pipeline.config import ModelConfig, validate_model
from skipengine import load_model
from skipengine.adapters import adapter_for
from skipengine.adaptive import AdaptivePlan, exit_layers_for
from skipengine.control import kv_fraction
from skipengine.exits import (
    exit_traces,
    fit_kv_fill,
    oracle_speedup,
    save_exit_classifiers,
    train_exit_classifiers,
)
from skipengine.lora import load_adapter
from skipengine.perplexity import windows

log = logging.getLogger("train_exits")


@dataclass
class TrainExitsConfig:
    """conf/train_exits.yaml's keys; its comments say what each does."""

    model: ModelConfig = field(default_factory=ModelConfig)
    run_dir: str = MISSING  # a finished jobs.generate run: its prompts and outputs are the traces' text
    out: str = "adapters/${model.name}-exits.safetensors"
    adapter: str | None = None  # an exit-aware adapter (jobs.finetune strategy=adaptive) to train with
    exit_every: int = 2
    min_depth: int = 6  # the first exit point is after layer min_depth - 1 (0-based)
    window_tokens: int = 128
    steps: int = 400
    lr: float = 3.0e-3
    width: int = 64
    translate: bool = True  # an affine translator per exit point (least squares to the last layer's output)
    threads: int = 2

    def validate(self) -> None:
        validate_model(self.model)
        if self.adapter and not Path(self.adapter).expanduser().is_file():
            raise FileNotFoundError(f"adapter={self.adapter!r} does not exist; train one with jobs.finetune")
        if min(self.exit_every, self.min_depth, self.steps, self.width) < 1 or self.window_tokens < 2:
            raise ValueError("exit_every, min_depth, steps and width must be >= 1, and window_tokens >= 2")


ConfigStore.instance().store(name="train_exits_schema", node=TrainExitsConfig)


@hydra.main(config_path="../conf", config_name="train_exits", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = job_config(dcfg, TrainExitsConfig)
    setup(cfg.threads)
    pairs = run_pairs(cfg.run_dir)
    model, tokenizer = load_model(cfg.model.spec, cfg.model.device, cfg.model.dtype)
    stream = []
    for prompt, generated in pairs:
        stream += tokenizer(prompt + generated, add_special_tokens=False)["input_ids"]
    chunks = windows(stream, cfg.window_tokens, len(stream) // cfg.window_tokens)
    exits = exit_layers_for(model.config.num_hidden_layers, cfg.exit_every, cfg.min_depth)
    if cfg.adapter:  # the classifiers must read the hidden states of the model they will run with
        model = load_adapter(model, cfg.adapter, AdaptivePlan(model.config.num_hidden_layers, exits))
    log.info("%d windows of %d tokens, exit points after layers %s", len(chunks), cfg.window_tokens, exits)
    traces, translators = exit_traces(model, chunks, exits, translate=cfg.translate)
    fill = None
    if translators:  # kv_fill="fitted" estimates deeper layers' inputs from the exit and translated states
        log.info("fitting the K/V fill coefficients (a second pass over the windows)")
        fill = fit_kv_fill(model, chunks, translators)
    config = model.config
    classifiers, stats = train_exit_classifiers(
        traces, config.hidden_size, cfg.steps, cfg.lr, cfg.width, translators=translators, fill=fill
    )
    ceiling = oracle_speedup(traces, config.num_hidden_layers, kv_fraction(adapter_for(model, pack=False)))
    save_exit_classifiers(
        classifiers, cfg.out, model, cfg.adapter, run_dir=str(cfg.run_dir), windows=len(chunks)
    )
    for layer, s in stats.items():
        log.info(
            "exit after layer %d: %.1f%% already final, accuracy %.3f",
            layer,
            100 * s["already_final"],
            s["accuracy"],
        )
    log.info(
        "a perfect exit decision reaches at most %.2fx on these traces without changing a prediction; "
        "above it every exit rule trades predictions for speed",
        ceiling,
    )
    print(json.dumps({"out": cfg.out, "oracle_speedup": ceiling, "stats": stats}))


if __name__ == "__main__":
    main()
