"""Measure the cost of a decode step on this device, model and batch size: fixed + per-layer.

Decode runs with a few layer counts, interleaved and repeated; a least-squares line through the
per-step times gives fixed_s (embeddings, final norm, LM head, sampling, Python) and per_layer_s.
"""

from __future__ import annotations

import random
import statistics

from skipengine.engine import Engine
from skipengine.outputs import GenerationStats
from skipengine.plan import MIN_KEPT_LAYERS, CostModel, SkipPlan, evenly_spaced
from skipengine.sampling import SamplingParams


def measure_cost_model(
    engine: Engine,
    batch_size: int,
    prompt_len: int = 100,
    steps: int = 24,
    repeats: int = 3,
    seed: int = 0,
) -> CostModel:
    num_layers = engine.num_layers
    counts = sorted({MIN_KEPT_LAYERS, max(MIN_KEPT_LAYERS, num_layers // 2), num_layers})
    rng = random.Random(seed)
    vocab = len(engine.tokenizer)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(batch_size)]
    sampling = SamplingParams(max_new_tokens=steps, ignore_eos=True)

    def step_seconds(kept: int) -> float:
        layers = evenly_spaced(num_layers, kept)
        plan = SkipPlan(num_layers=num_layers, kept_layers=layers, strategy="uniform", prefill="skip")
        stats = engine.generate(prompts, plan, sampling).stats
        return stats.decode_s / stats.decode_steps

    step_seconds(num_layers)  # warm-up: allocator, kernels
    samples: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(repeats):
        for n in counts:
            samples[n].append(step_seconds(n))
    xs = list(counts)
    ys = [statistics.median(samples[n]) for n in counts]
    per_layer, fixed = _fit_line(xs, ys)
    return CostModel(
        fixed_s=max(fixed, 0.0),
        per_layer_s=max(per_layer, 1e-9),
        num_layers=num_layers,
        batch_size=batch_size,
        device=str(engine.device),
    )


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = slope * x + intercept."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def modeled_full_depth_decode_s(costs: list[CostModel], stats: GenerationStats) -> float:
    """What the call's decode phase would have taken at full depth, from cost models measured at two or
    more batch sizes: per-step cost is interpolated linearly in the number of live rows, so rows that
    finish early (and leave the batch) are accounted for."""
    costs = sorted(costs, key=lambda c: c.batch_size)
    lo, hi = costs[0], costs[-1]
    full_lo, full_hi = lo.step_seconds(lo.num_layers), hi.step_seconds(hi.num_layers)
    per_row = (full_hi - full_lo) / (hi.batch_size - lo.batch_size) if hi.batch_size > lo.batch_size else 0.0
    steps, rows = stats.decode_steps, stats.decode_row_steps
    return steps * full_lo + (rows - steps * lo.batch_size) * per_row


def achieved_decode_speedup(costs: list[CostModel], stats: GenerationStats) -> float | None:
    if stats.decode_steps == 0 or stats.decode_s <= 0:
        return None
    return modeled_full_depth_decode_s(costs, stats) / stats.decode_s
