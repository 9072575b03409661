"""python -m jobs.finetune: trains a skip-aware LoRA adapter (ULS or self-distillation; method=full
fine-tunes every decoder weight instead) and writes out_dir/adapter.safetensors, with loss curves in
out_dir/log.jsonl; rerunning resumes.

corpus=bible   EN->ES verse pairs of the Bible train range (task=translate)
corpus=aclsum  ACLSum train abstracts -> human summaries (task=summarize)
corpus=run     a finished jobs.generate run (run_dir=...): its prompts -> its generated texts, e.g. a
               full-depth run over a sample of your own corpus, for self-distillation without references

strategy=searched trains for skip=searched: the kept layers come from the layer search on the first
search_rows training prompts (cached, as a job's search is); a job with skip.adapter=auto then runs the
adapter's own plans.

strategy=adaptive trains for skip=adaptive: every token, prompt or response, exits at a random exit point
often enough that the mean depth meets each target, deeper layers see its exit state (the decoupled K/V).

init_adapter=PATH starts from an adapter of the same model, e.g. skip adapters from the full-depth
baseline fine-tuned on the same data (targets=[1.0]), the paper's setup for translation.
"""

from __future__ import annotations

import logging
import math

import hydra
from omegaconf import DictConfig, OmegaConf

from jobs.common import run_pairs, setup
from pipeline.config import TaskConfig
from pipeline.corpora import BIBLE_SPLITS, read_aclsum, read_bible
from pipeline.prompts import PromptBuilder
from skipengine import Engine, load_model, make_plan
from skipengine.adaptive import AdaptivePlan, exit_layers_for
from skipengine.finetune import Example, TrainConfig, train
from skipengine.load import cache_root
from skipengine.plan import SkipPlan
from skipengine.search import SearchedPlans, cached_search

OmegaConf.register_new_resolver("join", lambda xs: "-".join(str(x) for x in xs), replace=True)
log = logging.getLogger("finetune")


def pairs_for(cfg: DictConfig) -> list[tuple[str, str]]:
    """(input text, response text) pairs; for corpus=run the input is the already-rendered prompt."""
    if cfg.corpus == "bible":
        start, stop = BIBLE_SPLITS["train"]
        return read_bible(start=start, stop=min(stop, start + cfg.examples))
    if cfg.corpus == "aclsum":
        return [(r["abstract"], r["summary"]) for r in read_aclsum("train")][: cfg.examples]
    if cfg.corpus == "run":
        return run_pairs(cfg.run_dir)[: cfg.examples]
    raise ValueError(f"corpus={cfg.corpus!r} is unknown; use bible, aclsum or run")


def examples_for(cfg: DictConfig, tokenizer) -> list[Example]:
    prompts = PromptBuilder(TaskConfig(**OmegaConf.to_container(cfg.task)), tokenizer)
    examples = []
    for source, response in pairs_for(cfg):
        prompt = (
            tokenizer(source, add_special_tokens=False)["input_ids"]
            if cfg.corpus == "run"
            else prompts.build(source).ids
        )
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(Example(prompt, response_ids))
    return examples


def plans_for(
    cfg: DictConfig, layers: int, searched: SearchedPlans | None = None
) -> list[SkipPlan | AdaptivePlan]:
    """The plan(s) to train for: one per target, plus one per explicit kept-layer count."""
    if cfg.strategy == "adaptive":  # exit-aware: exits sampled per token at each target's mean depth
        exits = exit_layers_for(layers, cfg.exit_every, cfg.min_depth)
        return [AdaptivePlan(layers, exits, target_speedup=t) for t in cfg.targets]
    plans = [
        make_plan(layers, cfg.strategy, t, cfg.prefill, cfg.basis, searched=searched) for t in cfg.targets
    ]
    if cfg.kept:  # explicit kept-layer counts (e.g. what basis=measured picks on your devices)
        plans += [
            make_plan(layers, cfg.strategy, layers / k, cfg.prefill, "layers", searched=searched)
            for k in cfg.kept
        ]
    return plans


def search_for(cfg: DictConfig, model, tokenizer, examples: list[Example]) -> SearchedPlans:
    """strategy=searched: the layer search on the training prompts' first search_rows, as a job searches
    on its corpus's first rows (cached)."""
    layers = model.config.num_hidden_layers
    counts = [math.floor(layers / t + 1e-9) for t in cfg.targets] + list(cfg.kept)
    prompts = [ex.prompt for ex in examples[: cfg.search_rows]]
    engine = Engine(model, tokenizer)
    return cached_search(
        engine, prompts, min(counts), cfg.prefill, cache_root() / "searched", cfg.search_tokens
    )


@hydra.main(config_path="../conf", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup(cfg.threads)
    model, tokenizer = load_model(cfg.model.spec, cfg.model.device, cfg.model.dtype)
    examples = examples_for(cfg, tokenizer)
    log.info("%d training examples from corpus=%s", len(examples), cfg.corpus)
    searched = search_for(cfg, model, tokenizer, examples) if cfg.strategy == "searched" else None
    plans = plans_for(cfg, model.config.num_hidden_layers, searched)
    for plan in plans:
        log.info("plan: %s", plan)
    config = TrainConfig(
        loss=cfg.loss,
        method=cfg.method,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        max_len=cfg.max_len,
        lr=cfg.lr,
        rank=cfg.rank,
        alpha=cfg.alpha,
        init_adapter=cfg.init_adapter,
        precision=cfg.precision,
        prompt_grad=cfg.prompt_grad,
    )
    path = train(model, examples, plans, config, cfg.out_dir, tokenizer.pad_token_id)
    print(f"adapter: {path}")


if __name__ == "__main__":
    main()
