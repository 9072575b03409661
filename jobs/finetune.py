"""python -m jobs.finetune: trains a skip-aware LoRA adapter (ULS or self-distillation) and writes
out_dir/adapter.safetensors, with loss curves in out_dir/log.jsonl; rerunning resumes."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from jobs.common import setup
from pipeline.config import TaskConfig
from pipeline.corpora import BIBLE_SPLITS, read_bible
from pipeline.prompts import PromptBuilder
from skipengine import load_model, make_plan
from skipengine.finetune import Example, TrainConfig, train

OmegaConf.register_new_resolver("join", lambda xs: "-".join(str(x) for x in xs), replace=True)
log = logging.getLogger("finetune")


def bible_examples(cfg: DictConfig, tokenizer) -> list[Example]:
    task = TaskConfig(**OmegaConf.to_container(cfg.task))
    prompts = PromptBuilder(task, tokenizer)
    eos = tokenizer.eos_token_id
    examples = []
    start, stop = BIBLE_SPLITS["train"]
    for english, spanish in read_bible(start=start, stop=min(stop, start + cfg.examples)):
        response = tokenizer(spanish, add_special_tokens=False)["input_ids"] + [eos]
        examples.append(Example(prompts.build(english).ids, response))
    return examples


@hydra.main(config_path="../conf", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup(cfg.threads)
    model, tokenizer = load_model(cfg.model.spec, cfg.model.device, cfg.model.dtype)
    if cfg.corpus != "bible":
        raise ValueError(f"corpus={cfg.corpus!r} is not available yet; use corpus=bible")
    examples = bible_examples(cfg, tokenizer)
    layers = model.config.num_hidden_layers
    plans = [make_plan(layers, cfg.strategy, t, cfg.prefill, cfg.basis) for t in cfg.targets]
    for plan in plans:
        log.info("plan: %s", plan)
    config = TrainConfig(
        loss=cfg.loss,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        max_len=cfg.max_len,
        lr=cfg.lr,
        rank=cfg.rank,
        alpha=cfg.alpha,
    )
    path = train(model, examples, plans, config, cfg.out_dir, tokenizer.pad_token_id)
    print(f"adapter: {path}")


if __name__ == "__main__":
    main()
