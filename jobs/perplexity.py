"""python -m jobs.perplexity: perplexity of the model under a skip plan (and its adapter) on held-out text.

The first `context` tokens of each window run the plan's prefill layers, the rest the kept layers, as
in generation (skipengine.perplexity). skip=adaptive: every token exits by the rule, at the threshold
calibrated on the text's first windows (as the job calibrates on the corpus's first rows). Prints one
JSON line; writes it to `out` when given.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from jobs.common import setup
from pipeline.config import SkipConfig, adaptive_adapter
from pipeline.corpora import read_austen
from pipeline.generator import adaptive_engine, build_adaptive_plan
from pipeline.planning import build_run_plan
from skipengine import Engine, SamplingParams, load_model
from skipengine.lora import load_adapter
from skipengine.perplexity import adaptive_perplexity, perplexity, windows

log = logging.getLogger("perplexity")
TEXTS = {"austen": read_austen}


@hydra.main(config_path="../conf", config_name="perplexity", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup(cfg.threads)
    if cfg.text not in TEXTS:
        raise ValueError(f"text={cfg.text!r} is unknown; use one of {', '.join(TEXTS)}")
    skip = SkipConfig(**OmegaConf.to_container(cfg.skip))
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
