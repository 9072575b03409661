"""python -m jobs.check_model: a model loads (its GGUF converted once), decodes through the engine, and
matches HF generate() token for token at full depth; prints the load time and decode tokens/s."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from jobs.common import engine_from_config, job_config, setup
from pipeline.config import ModelConfig, validate_model
from skipengine import SamplingParams, full_plan


@dataclass
class CheckModelConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: str = "The capital of France is"
    max_new_tokens: int = 12
    threads: int = 2

    def validate(self) -> None:
        validate_model(self.model)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


ConfigStore.instance().store(name="check_model_schema", node=CheckModelConfig)


@hydra.main(config_path="../conf", config_name="check_model", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = job_config(dcfg, CheckModelConfig)
    setup(cfg.threads)
    start = time.perf_counter()
    engine = engine_from_config(cfg.model)
    loaded = time.perf_counter() - start
    ids = engine.tokenizer(cfg.prompt)["input_ids"]
    out = engine.generate(
        [ids], full_plan(engine.num_layers), SamplingParams(max_new_tokens=cfg.max_new_tokens)
    )
    row = out.rows[0]
    with torch.inference_mode():
        hf = engine.model.generate(torch.tensor([ids]), max_new_tokens=cfg.max_new_tokens, do_sample=False)
    reference = hf[0, len(ids) :].tolist()[: len(row.token_ids)]
    adapter = type(engine.adapter).__name__ if engine.adapter else "generic (HF generate)"
    print(f"{cfg.model.spec}: {engine.num_layers} layers, {adapter}, loaded in {loaded:.1f}s")
    print(f"{cfg.prompt!r} -> {row.text!r}")
    speed = out.stats.decode_tokens_per_s
    print(f"matches HF generate(): {reference == row.token_ids}; decode {speed:.1f} tok/s")


if __name__ == "__main__":
    main()
