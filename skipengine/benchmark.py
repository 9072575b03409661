"""Decode throughput and achieved speedup per plan, against full depth and HF generate().

Every configuration of one batch size runs once per repeat, in a rotating order, so that machine noise
falls on all of them alike; speedups are medians of per-repeat ratios measured in the same process.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from skipengine.calibrate import measure_cost_model
from skipengine.engine import Engine
from skipengine.plan import SkipPlan, full_plan, make_plan
from skipengine.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeBenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    targets: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    bases: tuple[str, ...] = ("layers", "measured")
    strategy: str = "uniform"
    new_tokens: int = 64
    repeats: int = 3
    hf_baseline: bool = True


def text_prompts(texts: Sequence[str], tokenizer, prompt_tokens: int, count: int) -> list[list[int]]:
    """`count` prompts of exactly `prompt_tokens` tokens, cut from consecutive real text."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text + " ", add_special_tokens=False)["input_ids"])
        if len(stream) >= prompt_tokens * count:
            break
    if len(stream) < prompt_tokens * count:
        raise ValueError(f"the text holds {len(stream)} tokens; {prompt_tokens * count} are needed")
    return [stream[i * prompt_tokens : (i + 1) * prompt_tokens] for i in range(count)]


def hf_generate_seconds(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts, device=next(model.parameters()).device)  # equal lengths: no padding
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def run_decode_bench(
    engine: Engine,
    prompt_pool: list[list[int]],
    config: DecodeBenchConfig,
    progress: Callable[[str], None] = log.info,
) -> list[dict]:
    rows = []
    sampling = SamplingParams(max_new_tokens=config.new_tokens, ignore_eos=True)
    for batch in config.batch_sizes:
        prompts = prompt_pool[:batch]
        progress(f"batch {batch}: calibrating the decode cost model")
        cost = measure_cost_model(engine, batch, prompt_len=len(prompts[0]))
        progress(
            f"batch {batch}: fixed {cost.fixed_s * 1e3:.2f} ms + {cost.per_layer_s * 1e3:.3f} ms/layer "
            f"(max speedup {cost.max_speedup:.2f}x)"
        )
        plans: dict[tuple[float, str], SkipPlan | str] = {}
        for target in config.targets:
            for basis in config.bases:
                try:
                    plans[target, basis] = make_plan(
                        engine.num_layers, config.strategy, target, basis=basis, cost_model=cost
                    )
                except ValueError as refusal:
                    plans[target, basis] = str(refusal)
        runnable = {p.kept_layers: p for p in plans.values() if isinstance(p, SkipPlan)}
        runnable[full_plan(engine.num_layers).kept_layers] = full_plan(engine.num_layers)
        keys = list(runnable) + (["hf"] if config.hf_baseline else [])

        engine.generate(prompts, full_plan(engine.num_layers), sampling)  # warm-up at this batch size
        decode_s: dict = {k: [] for k in keys}
        total_s: dict = {k: [] for k in keys}
        for rep in range(config.repeats):
            order = keys[rep % len(keys) :] + keys[: rep % len(keys)]
            for key in order:
                if key == "hf":
                    seconds = hf_generate_seconds(engine.model, prompts, config.new_tokens)
                    decode_s[key].append(float("nan"))
                    total_s[key].append(seconds)
                    continue
                stats = engine.generate(prompts, runnable[key], sampling).stats
                decode_s[key].append(stats.decode_s)
                total_s[key].append(stats.prefill_s + stats.decode_s)
            progress(f"batch {batch}: repeat {rep + 1}/{config.repeats} done")

        full_key = tuple(range(engine.num_layers))
        tokens = batch * config.new_tokens
        hf_tps = tokens / statistics.median(total_s["hf"]) if config.hf_baseline else float("nan")
        for (target, basis), plan in plans.items():
            row = dict(
                batch=batch, target=target, basis=basis, strategy=config.strategy, hf_tokens_per_s=hf_tps
            )
            if isinstance(plan, str):
                rows.append(row | dict(refused=plan))
                continue
            key = plan.kept_layers
            ratio = [f / p for f, p in zip(decode_s[full_key], decode_s[key], strict=True)]
            e2e_ratio = [f / p for f, p in zip(total_s[full_key], total_s[key], strict=True)]
            decode_tps = batch * (config.new_tokens - 1) / statistics.median(decode_s[key])
            e2e_tps = tokens / statistics.median(total_s[key])
            rows.append(
                row
                | dict(
                    refused=None,
                    kept_layers=plan.num_kept,
                    layers=list(plan.kept_layers),
                    predicted_speedup=plan.predicted_speedup,
                    decode_tokens_per_s=decode_tps,
                    tokens_per_s=e2e_tps,
                    achieved_decode_speedup=statistics.median(ratio),
                    achieved_e2e_speedup=statistics.median(e2e_ratio),
                    vs_hf=e2e_tps / hf_tps,
                    decode_vs_hf=decode_tps / hf_tps,
                )
            )
    return rows
