"""Measuring what skipping buys on this device.

SpeedProbe and deepest_meeting choose a job's plan: candidate plans run the job's own sample of prompts
against full depth, and the deepest that meets the target wins. measure_cost_model fits a line (fixed +
per-layer cost of a decode step) on synthetic prompts, for benchmarks that sweep many plans.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from skipengine.engine import Engine
from skipengine.plan import MIN_KEPT_LAYERS, CostModel, SkipPlan, evenly_spaced, full_plan
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


@dataclass(frozen=True)
class SpeedSample:
    """A plan's speed on a fixed sample of prompts: full depth's seconds over the plan's, for the same rows
    (so a plan whose rows run longer, or loop to the token limit, is slower by that much)."""

    num_kept: int
    decode_speedup: float  # decode steps alone
    speedup: float  # prefill + decode
    runs: int  # plan runs it is the median of


class SpeedProbe:
    """Measures plans on the job's own prompts, at its generation length, with rows finishing where they
    do. The plan (on its own engine where it has an adapter merged) runs the whole sample, then full depth
    on the base engine generates the same number of tokens per row, so that a plan or an adapter that
    writes shorter text does not pass for a faster one; the two alternate and speedups are ratios of
    medians. A result within `close` of the target is measured once more."""

    def __init__(
        self,
        engine: Engine,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        target: float,
        on_too_long: str = "error",
        close: float = 0.03,
    ):
        self.engine, self.prompts, self.sampling = engine, [list(p) for p in prompts], sampling
        self.target, self.on_too_long, self.close = target, on_too_long, close
        # per (engine key, kept layers): (decode s, prefill + decode s) of the plan and of full depth
        self.samples: dict[tuple[str | None, tuple[int, ...]], list[tuple[float, float]]] = {}
        self.full: dict[tuple[str | None, tuple[int, ...]], list[tuple[float, float]]] = {}
        self.warm: set[str | None] = set()

    def _run(
        self, engine: Engine, plan: SkipPlan, key: str | None, lengths: list[int] | None = None
    ) -> tuple[float, float, list[int]]:
        """(decode seconds, prefill + decode seconds, tokens generated per row) of the whole sample."""
        if key not in self.warm:  # allocator and kernels: a few tokens are enough
            warm_up = replace(self.sampling, max_new_tokens=min(8, self.sampling.max_new_tokens))
            engine.generate(self.prompts, plan, warm_up, self.on_too_long)
            self.warm.add(key)
        out = engine.generate(self.prompts, plan, self.sampling, self.on_too_long, lengths)
        stats = out.stats
        if stats.num_errors == stats.num_rows:
            raise ValueError(f"no row of the calibration sample could be generated: {out.rows[0].error}")
        if stats.decode_steps == 0:
            raise ValueError(
                "the calibration sample generated no decode steps (every row stopped at its first token); "
                "use skip.basis=layers or a task that generates more than one token"
            )
        generated = [row.num_generated_tokens for row in out.rows]
        return stats.decode_s, stats.prefill_s + stats.decode_s, generated

    def measure(self, plan: SkipPlan, engine: Engine | None = None, key: str | None = None) -> SpeedSample:
        """The plan's speedup on `engine` (default: the base engine; `key` names another, such as the
        adapter merged into it) over full depth on the base engine, for the same tokens per row."""
        engine = engine or self.engine
        runs = self.samples.setdefault((key, plan.kept_layers), [])
        full = self.full.setdefault((key, plan.kept_layers), [])
        for _ in range(2):
            decode_s, total_s, lengths = self._run(engine, plan, key)
            runs.append((decode_s, total_s))
            full.append(self._run(self.engine, full_plan(self.engine.num_layers), None, lengths)[:2])
            sample = SpeedSample(
                num_kept=plan.num_kept,
                decode_speedup=statistics.median(f[0] for f in full) / statistics.median(r[0] for r in runs),
                speedup=statistics.median(f[1] for f in full) / statistics.median(r[1] for r in runs),
                runs=len(runs),
            )
            if abs(sample.decode_speedup / self.target - 1) >= self.close:
                break
        return sample


def deepest_meeting(
    counts: Sequence[int], num_layers: int, target: float, speedup: Callable[[int], float]
) -> int | None:
    """The largest kept-layer count in `counts` whose measured speedup meets the target (None: none does),
    measuring few. The first guess is the layer count's (num_layers / target); a line through it and full
    depth (time = fixed + per-layer x kept) guesses again; then neighbours are measured until a count that
    meets the target sits next to a deeper one that does not. Assumes fewer layers never run slower."""
    counts = sorted(set(counts))
    known: dict[int, float] = {}

    def meets(n: int) -> bool:
        if n not in known:
            known[n] = speedup(n)
        return known[n] >= target

    i = max(0, _last_at_most(counts, num_layers / target))
    known[counts[i]] = speedup(counts[i])
    i = max(0, _last_at_most(counts, count_on_line(num_layers, counts[i], known[counts[i]], target)))
    while True:
        if meets(counts[i]):
            if i + 1 == len(counts) or not meets(counts[i + 1]):
                return counts[i]
            i += 1
        elif i == 0:
            return None
        else:
            i -= 1


def count_on_line(num_layers: int, num_kept: int, speedup: float, target: float) -> float:
    """The kept-layer count that meets the target on the line through full depth and one measured plan
    (a step's time = fixed + per-layer x kept layers); the layer count's (num_layers / target) when the
    measurement shows no speedup to draw the line from."""
    if num_kept >= num_layers or speedup <= 1:
        return num_layers / target
    per_layer = (1 - 1 / speedup) / (num_layers - num_kept)  # full depth's step time is 1
    fixed = 1 - per_layer * num_layers
    return (1 / target - fixed) / per_layer


def _last_at_most(sorted_counts: Sequence[int], bound: float) -> int:
    """Index of the last count <= bound (-1 if none)."""
    return sum(n <= bound + 1e-9 for n in sorted_counts) - 1
