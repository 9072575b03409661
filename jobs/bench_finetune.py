"""python -m jobs.bench_finetune: seconds per fine-tuning step for two settings of one knob on the same
batches, the two interleaved and their order alternated so that the machine's drift falls on both.

compare=prompt_grad  gradient through the prompt pass (the exact gradient) against none
compare=precision    fp32 against bf16 autocast (fp32 master weights); each side keeps its own copy of
                     the trainable weights and optimizer, so the losses show how far bf16 drifts

Prints one line per step and a JSON summary with the ratio."""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from functools import partial

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from jobs.common import job_config, setup
from jobs.finetune import FinetuneConfig, examples_for, plans_for
from pipeline.config import choice
from pipeline.planning import device_name
from skipengine import load_model
from skipengine.depth import training_runs
from skipengine.finetune import LOSSES, batches, collate, make_trainable, resolve_precision, train_step

log = logging.getLogger("bench_finetune")
SIDES = {"prompt_grad": (True, False), "precision": ("fp32", "bf16")}  # compare -> its two settings


@dataclass
class BenchFinetuneConfig(FinetuneConfig):
    """jobs.finetune's keys (conf/bench_finetune.yaml sets the benchmark's own values) and these two."""

    compare: str = "prompt_grad"  # or precision
    batches: int = 6  # the first one warms up and is not counted

    def validate(self) -> None:
        super().validate()
        choice("compare", self.compare, (*SIDES,))
        if self.batches < 2:
            raise ValueError(f"batches={self.batches} must be >= 2 (the first one only warms up)")


ConfigStore.instance().store(name="bench_finetune_schema", node=BenchFinetuneConfig)


@hydra.main(config_path="../conf", config_name="bench_finetune", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = job_config(dcfg, BenchFinetuneConfig)
    setup(cfg.threads)
    model, tokenizer = load_model(cfg.model.spec, cfg.model.device, cfg.model.dtype)
    examples = examples_for(cfg, tokenizer)
    plan = plans_for(cfg, model.config.num_hidden_layers)[0]
    sides = SIDES[cfg.compare]
    trainable = make_trainable(model, cfg.method, cfg.rank, cfg.alpha).train()
    models = {side: copy.deepcopy(trainable) for side in sides}  # the same starting weights on both sides
    optimizers = {
        side: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=cfg.lr)
        for side, m in models.items()
    }
    seconds, losses = {side: [] for side in sides}, {side: [] for side in sides}
    stream = batches(examples, cfg.batch_size, seed=0)
    for i in range(cfg.batches):
        batch = collate(next(stream), tokenizer.pad_token_id, cfg.max_len)
        runs = training_runs(plan, batch["is_prompt"])
        for side in sides if i % 2 else sides[::-1]:
            prompt_grad = side if cfg.compare == "prompt_grad" else cfg.prompt_grad
            precision = (
                side
                if cfg.compare == "precision"
                else resolve_precision(cfg.precision, batch["prompt_ids"].device)
            )
            loss_fn = partial(LOSSES[cfg.loss], prompt_grad=prompt_grad)
            start = time.perf_counter()
            loss = train_step(models[side], batch, runs, loss_fn, optimizers[side], precision)
            elapsed = time.perf_counter() - start
            losses[side].append(loss)
            if i:  # the first batch warms up
                seconds[side].append(elapsed)
            prompt, response = int(batch["prompt_mask"].sum()), int(batch["response_mask"].sum())
            log.info(
                "batch %d %s=%s: %.2f s, loss %.3f (%d prompt + %d response tokens)",
                *(i, cfg.compare, side, elapsed, loss, prompt, response),
            )
    mean = {side: sum(seconds[side]) / len(seconds[side]) for side in sides}
    summary = {
        "device": device_name(next(trainable.parameters()).device),
        "plan": str(plan),
        "compare": cfg.compare,
        "steps_each": len(seconds[sides[0]]),
    }
    summary |= {f"s_per_step_{side}": mean[side] for side in sides}
    summary |= {f"losses_{side}": [round(x, 4) for x in losses[side]] for side in sides}
    summary["speedup"] = mean[sides[0]] / mean[sides[1]]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
