"""python -m jobs.bench_adaptive: decode tokens/s of skip=adaptive (ADEPT) against uniform layer skipping
(basis=measured) at the same targets, and against full depth, on ACLSum prompts at each batch size.

Adaptive thresholds (the exit classifiers', and CALM's LM-head confidence at the first target) are
calibrated once per target on the first `calibration_rows` prompts and, with `controller=true`, held to the
target step by step as the job holds them (the controller carries over from repeat to repeat); with
`controller=false` the calibrated threshold stays fixed. Every configuration of a batch size runs once per
repeat, in rotating order. kv_fills: the K/V fills to compare (skip.kv_fill; the first is the plain
"adaptive" row). calm=false leaves out CALM's slow LM-head confidence. adapter=...: an exit-aware
adapter merged for every configuration (speed does not depend on the weights' values, only on the exits).
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from jobs.common import aclsum_test_prompts, job_config, setup
from pipeline.config import ModelConfig, SkipConfig, choice, validate_model
from pipeline.generator import adaptive_engine, build_adaptive_plan
from skipengine import SamplingParams, full_plan, load_model, make_plan, measure_cost_model
from skipengine.adaptive import KV_FILLS

log = logging.getLogger("bench_adaptive")


@dataclass
class BenchAdaptiveConfig:
    """conf/bench_adaptive.yaml's keys; its comments say what each does."""

    model: ModelConfig = field(default_factory=ModelConfig)
    exit_classifiers: str | None = "adapters/smollm2-summarize-adaptive-x1.25-exits.safetensors"
    adapter: str | None = "adapters/smollm2-summarize-adaptive-x1.25.safetensors"  # the classifiers' own
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    targets: list[float] = field(default_factory=lambda: [1.25, 1.5, 2.0])
    calibration_rows: int = 16
    kv_fills: list[str] = field(default_factory=lambda: ["decoupled"])  # skip.kv_fill per adaptive row
    calm: bool = True  # also CALM's LM-head confidence at the first target
    controller: bool = True  # hold each target step by step; false: the calibrated threshold fixed
    new_tokens: int = 64
    repeats: int = 3
    threads: int = 2

    def validate(self) -> None:
        validate_model(self.model)
        for fill in self.kv_fills:
            choice("kv_fills", fill, KV_FILLS)
        for key in ("exit_classifiers", "adapter"):
            path = getattr(self, key)
            if path and not Path(path).expanduser().is_file():
                raise FileNotFoundError(f"{key}={path!r} does not exist")
        if not self.kv_fills or not self.targets or not self.batch_sizes:
            raise ValueError("batch_sizes, targets and kv_fills must each list at least one value")
        if min(self.targets) < 1 or min(self.batch_sizes) < 1 or self.repeats < 1:
            raise ValueError("targets must be >= 1.0, and batch_sizes and repeats >= 1")


ConfigStore.instance().store(name="bench_adaptive_schema", node=BenchAdaptiveConfig)


@hydra.main(config_path="../conf", config_name="bench_adaptive", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = job_config(dcfg, BenchAdaptiveConfig)
    setup(cfg.threads)
    model, tokenizer = load_model(cfg.model.spec, cfg.model.device, cfg.model.dtype)
    adaptive = dict(strategy="adaptive", exit_classifiers=cfg.exit_classifiers, adapter=cfg.adapter)
    engine = adaptive_engine(SkipConfig(**adaptive), model, tokenizer)
    prompts = aclsum_test_prompts(engine.tokenizer)
    sampling = SamplingParams(max_new_tokens=cfg.new_tokens, ignore_eos=True)
    rows = []
    for batch in cfg.batch_sizes:
        cost = measure_cost_model(engine, batch)
        plans = {"full depth": full_plan(engine.num_layers)}
        for target in cfg.targets:
            plans[f"uniform x{target:g}"] = make_plan(
                engine.num_layers, "uniform", target, basis="measured", cost_model=cost
            )
            for fill in cfg.kv_fills:  # the first fill is the plain "adaptive" row
                skip = SkipConfig(**adaptive, target_speedup=target, controller=cfg.controller, kv_fill=fill)
                name = f"adaptive x{target:g}" + (f" {fill}" if fill != cfg.kv_fills[0] else "")
                plans[name] = build_adaptive_plan(skip, engine, prompts[: cfg.calibration_rows])
        if cfg.calm:
            first = cfg.targets[0]
            calm = SkipConfig(
                **adaptive, target_speedup=first, criterion="confidence", controller=cfg.controller
            )
            calm.min_depth = min(plans[f"adaptive x{first:g}"].exit_layers) + 1  # the classifiers' exits
            calibration = prompts[: cfg.calibration_rows]
            plans[f"confidence (CALM) x{first:g}"] = build_adaptive_plan(calm, engine, calibration)
        samples: dict[str, list] = {name: [] for name in plans}
        work = prompts[cfg.calibration_rows : cfg.calibration_rows + batch]
        for rep in range(cfg.repeats):
            names = list(plans)
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                stats = engine.generate(work, plans[name], sampling).stats
                samples[name].append(stats)
            log.info("batch %d: repeat %d/%d done", batch, rep + 1, cfg.repeats)
        full_s = statistics.median(s.decode_s for s in samples["full depth"])
        for name, runs in samples.items():
            decode_s = statistics.median(s.decode_s for s in runs)
            rows.append(
                {
                    "batch": batch,
                    "plan": name,
                    "detail": str(plans[name]),
                    "decode_tokens_per_s": statistics.median(s.decode_tokens_per_s for s in runs),
                    "achieved_decode_speedup": full_s / decode_s,
                    "decode_layers_per_token": statistics.median(s.decode_layers_per_token for s in runs),
                    "prefill_layers_per_token": statistics.median(s.prefill_layers_per_token for s in runs),
                }
            )
    print(
        f"{'batch':>5} {'plan':<26} {'dec tok/s':>9} {'dec x':>6} {'layers/tok':>10} {'prefill layers':>14}"
    )
    for r in rows:
        print(
            f"{r['batch']:>5} {r['plan']:<26} {r['decode_tokens_per_s']:>9.1f} "
            f"{r['achieved_decode_speedup']:>6.2f} {r['decode_layers_per_token']:>10.1f} "
            f"{r['prefill_layers_per_token']:>14.1f}"
        )
    print(json.dumps({"bench": "adaptive", "rows": rows}))


if __name__ == "__main__":
    main()
