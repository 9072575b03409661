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
from dataclasses import dataclass, field, fields
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from jobs.common import job_config, run_pairs, setup
from pipeline.config import ModelConfig, TaskConfig, choice, validate_model, validate_task
from pipeline.corpora import BIBLE_SPLITS, read_aclsum, read_bible
from pipeline.prompts import PromptBuilder
from skipengine import Engine, load_model, make_plan
from skipengine.adaptive import AdaptivePlan, exit_layers_for
from skipengine.finetune import LOSSES, METHODS, PRECISIONS, Example, TrainConfig, train
from skipengine.load import cache_root
from skipengine.plan import BASES, PREFILL_MODES, STRATEGIES, SkipPlan
from skipengine.search import SearchedPlans, cached_search

CORPORA = ("bible", "aclsum", "run")


@dataclass
class FinetuneConfig:
    """conf/finetune.yaml's keys; its comments say what each does."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    loss: str = "uls"  # uls: cross-entropy on the response; distill: KL to the full-depth model
    method: str = "lora"  # lora: a small adapter; full: every decoder weight
    strategy: str = "uniform"  # or searched, or adaptive (exits per token)
    search_rows: int = 8  # searched: the layer search's sample, the first training prompts
    search_tokens: int = 48
    exit_every: int = 2  # adaptive: exit points as in jobs.train_exits
    min_depth: int = 6
    targets: list[float] = field(default_factory=lambda: [2.0])  # one adapter for every target listed
    kept: list[int] = field(default_factory=list)  # and/or explicit kept-layer counts
    basis: str = "layers"
    prefill: str = "full"
    corpus: str = "bible"  # bible, aclsum, or run (run_dir's prompts -> its outputs)
    run_dir: str | None = None
    examples: int = 4000  # at most this many training pairs, from the start of the corpus
    steps: int = 300
    batch_size: int = 8
    max_len: int = 160
    lr: float = 2.0e-4
    rank: int = 16
    alpha: int = 32
    prompt_grad: bool = True  # false: no gradient through the prompt's pass
    precision: str = "auto"  # bf16 autocast where the device has native bf16, else fp32
    init_adapter: str | None = None  # start from this adapter
    threads: int = 2
    out_dir: str = (
        "runs/finetune/${model.name}-${task.name}-${loss}-${method}-${strategy}-x${join:${targets}}"
        "-k${join:${kept}}"
    )

    def validate(self) -> None:
        validate_model(self.model)
        validate_task(self.task)
        choice("loss", self.loss, (*LOSSES,))
        choice("method", self.method, METHODS)
        choice("strategy", self.strategy, (*STRATEGIES, "adaptive"))
        choice("basis", self.basis, BASES)
        choice("prefill", self.prefill, PREFILL_MODES)
        choice("corpus", self.corpus, CORPORA)
        choice("precision", self.precision, PRECISIONS)
        if not self.targets and (self.strategy == "adaptive" or not self.kept):
            need = "targets" if self.strategy == "adaptive" else "targets and/or kept"
            raise ValueError(f"no plan to train for: give {need}, e.g. targets=[2.0] or kept=[15]")
        if any(t < 1 for t in self.targets) or any(k < 1 for k in self.kept):
            raise ValueError(f"targets={self.targets} must be >= 1.0 and kept={self.kept} >= 1")
        if self.strategy == "searched" and (self.search_rows < 1 or self.search_tokens < 2):
            raise ValueError("search_rows must be >= 1 and search_tokens >= 2")
        if self.strategy == "adaptive" and (self.exit_every < 1 or self.min_depth < 1):
            raise ValueError("exit_every and min_depth must be >= 1")
        if min(self.examples, self.steps, self.batch_size, self.max_len, self.rank) < 1 or self.lr <= 0:
            raise ValueError("examples, steps, batch_size, max_len and rank must be >= 1, and lr > 0")
        if self.corpus == "run" and not (self.run_dir and (Path(self.run_dir) / "outputs").is_dir()):
            raise ValueError(
                f"corpus=run needs run_dir=<a finished jobs.generate run>; run_dir={self.run_dir!r} has no "
                "outputs/"
            )
        if self.init_adapter and not Path(self.init_adapter).expanduser().is_file():
            raise FileNotFoundError(f"init_adapter={self.init_adapter!r} does not exist")


ConfigStore.instance().store(name="finetune_schema", node=FinetuneConfig)
OmegaConf.register_new_resolver("join", lambda xs: "-".join(str(x) for x in xs), replace=True)
log = logging.getLogger("finetune")


def pairs_for(cfg: FinetuneConfig) -> list[tuple[str, str]]:
    """(input text, response text) pairs; for corpus=run the input is the already-rendered prompt."""
    if cfg.corpus == "bible":
        start, stop = BIBLE_SPLITS["train"]
        return read_bible(start=start, stop=min(stop, start + cfg.examples))
    if cfg.corpus == "aclsum":
        return [(r["abstract"], r["summary"]) for r in read_aclsum("train")][: cfg.examples]
    return run_pairs(cfg.run_dir)[: cfg.examples]  # corpus=run (FinetuneConfig.validate)


def examples_for(cfg: FinetuneConfig, tokenizer) -> list[Example]:
    prompts = PromptBuilder(cfg.task, tokenizer)
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
    cfg: FinetuneConfig, layers: int, searched: SearchedPlans | None = None
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


def search_for(cfg: FinetuneConfig, model, tokenizer, examples: list[Example]) -> SearchedPlans:
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
def main(dcfg: DictConfig) -> None:
    cfg = job_config(dcfg, FinetuneConfig)
    setup(cfg.threads)
    model, tokenizer = load_model(cfg.model.spec, cfg.model.device, cfg.model.dtype)
    examples = examples_for(cfg, tokenizer)
    log.info("%d training examples from corpus=%s", len(examples), cfg.corpus)
    searched = search_for(cfg, model, tokenizer, examples) if cfg.strategy == "searched" else None
    plans = plans_for(cfg, model.config.num_hidden_layers, searched)
    for plan in plans:
        log.info("plan: %s", plan)
    # the job's keys that TrainConfig also has (the others keep the library's defaults)
    config = TrainConfig(
        **{f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if hasattr(cfg, f.name)}
    )
    path = train(model, examples, plans, config, cfg.out_dir, tokenizer.pad_token_id)
    print(f"adapter: {path}")


if __name__ == "__main__":
    main()
