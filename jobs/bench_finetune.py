"""python -m jobs.bench_finetune: seconds per fine-tuning step with gradient through the prompt pass
(prompt_grad=true, the exact gradient) and without (false), on the same batches, the two interleaved and
their order alternated so that the machine's drift falls on both. Prints one line per step and a JSON
summary with the ratio."""

from __future__ import annotations

import json
import logging
import time
from functools import partial

import hydra
import torch
from omegaconf import DictConfig

from jobs.common import setup
from jobs.finetune import examples_for, plans_for
from skipengine import load_model
from skipengine.depth import training_runs
from skipengine.finetune import LOSSES, batches, collate, make_trainable, train_step

log = logging.getLogger("bench_finetune")


@hydra.main(config_path="../conf", config_name="bench_finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup(cfg.threads)
    model, tokenizer = load_model(cfg.model.spec, cfg.model.device, cfg.model.dtype)
    examples = examples_for(cfg, tokenizer)
    plan = plans_for(cfg, model.config.num_hidden_layers)[0]
    model = make_trainable(model, cfg.method, cfg.rank, cfg.alpha).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    seconds = {True: [], False: []}
    stream = batches(examples, cfg.batch_size, seed=0)
    for i in range(cfg.batches):
        batch = collate(next(stream), tokenizer.pad_token_id, cfg.max_len)
        runs = training_runs(plan, batch["is_prompt"])
        for prompt_grad in (True, False) if i % 2 else (False, True):
            loss_fn = partial(LOSSES[cfg.loss], prompt_grad=prompt_grad)
            start = time.perf_counter()
            loss = train_step(model, batch, runs, loss_fn, optimizer)
            elapsed = time.perf_counter() - start
            if i:  # the first batch warms up
                seconds[prompt_grad].append(elapsed)
            prompt, response = int(batch["prompt_mask"].sum()), int(batch["response_mask"].sum())
            log.info(
                "batch %d prompt_grad=%s: %.2f s, loss %.3f (%d prompt + %d response tokens)",
                *(i, prompt_grad, elapsed, loss, prompt, response),
            )
    exact, fast = (sum(seconds[g]) / len(seconds[g]) for g in (True, False))
    summary = {"plan": str(plan), "steps_each": len(seconds[True]), "s_per_step_prompt_grad": exact}
    summary |= {"s_per_step_no_prompt_grad": fast, "speedup": exact / fast}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
