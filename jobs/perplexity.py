"""python -m jobs.perplexity: perplexity of the model under a skip plan (and its adapter) on held-out text.

The first `context` tokens of each window run the plan's prefill layers, the rest the kept layers, as
in generation (skipengine.perplexity). Prints one JSON line; writes it to `out` when given.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from jobs.common import setup
from pipeline.config import SkipConfig
from pipeline.corpora import read_austen
from pipeline.generator import build_plan
from skipengine import Engine, load_model
from skipengine.finetune import load_adapter
from skipengine.perplexity import perplexity, windows

log = logging.getLogger("perplexity")
TEXTS = {"austen": read_austen}


@hydra.main(config_path="../conf", config_name="perplexity", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup(cfg.threads)
    if cfg.text not in TEXTS:
        raise ValueError(f"text={cfg.text!r} is unknown; use one of {', '.join(TEXTS)}")
    skip = SkipConfig(**OmegaConf.to_container(cfg.skip))
    model, tokenizer = load_model(cfg.model.spec, cfg.model.device, cfg.model.dtype)
    plan, _ = build_plan(skip, Engine(model, tokenizer), cfg.batch_size)
    if skip.adapter:
        model = load_adapter(model, skip.adapter, plan)
    ids = tokenizer(TEXTS[cfg.text](), add_special_tokens=False)["input_ids"]
    result = perplexity(
        model, windows(ids, cfg.window_tokens, cfg.windows), plan, cfg.context, cfg.batch_size
    )
    row = {"text": cfg.text, "plan": str(plan), "kept": plan.num_kept, "adapter": skip.adapter, **result}
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(row, indent=2))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
