"""Skip plans: which decoder layers run, chosen from a target speedup alone (never from the input).

A plan is a plain value. Because it does not depend on the tokens, every row of a batch runs the same
layers, so batching and the KV cache keep working (Unified Layer Skipping, Liu, Meng & Zhou 2024).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Protocol


class KeptSets(Protocol):
    """What a plan needs of a layer search's result (skipengine.search.SearchedPlans): a kept set per n."""

    def kept(self, num_kept: int) -> tuple[int, ...]: ...


STRATEGIES = ("none", "uniform", "searched", "early_exit", "keep_top", "random")
PREFILL_MODES = ("full", "skip")
BASES = ("layers", "measured")
MIN_KEPT_LAYERS = 2  # the first and the last layer


@dataclass(frozen=True)
class CostModel:
    """Wall-clock cost of one decode step: fixed_s + kept_layers * per_layer_s.

    fixed_s covers embeddings, final norm, LM head, sampling and Python overhead; it is what caps the
    speedup that skipping layers alone can reach. Measured by `skipengine.calibrate` for one device,
    model, dtype and batch size.
    """

    fixed_s: float
    per_layer_s: float
    num_layers: int
    batch_size: int
    device: str

    def step_seconds(self, kept_layers: int) -> float:
        return self.fixed_s + kept_layers * self.per_layer_s

    def speedup(self, kept_layers: int) -> float:
        return self.step_seconds(self.num_layers) / self.step_seconds(kept_layers)

    @property
    def max_speedup(self) -> float:
        return self.speedup(MIN_KEPT_LAYERS)

    def kept_for_target(self, target_speedup: float) -> int:
        """The most layers whose predicted speedup still meets the target."""
        budget = self.step_seconds(self.num_layers) / target_speedup - self.fixed_s
        return min(self.num_layers, math.floor(budget / self.per_layer_s + 1e-9))


@dataclass(frozen=True)
class SkipPlan:
    num_layers: int
    kept_layers: tuple[int, ...]
    strategy: str = "none"
    prefill: str = "full"  # "full": the prompt runs every layer (the paper); "skip": the prompt skips too
    target_speedup: float = 1.0
    predicted_speedup: float = 1.0
    # how predicted_speedup was computed: "layers" (L / n) or "measured" (timed: pipeline.planning for a
    # job, a CostModel in the benchmarks)
    basis: str = "layers"
    seed: int | None = None

    @property
    def num_kept(self) -> int:
        return len(self.kept_layers)

    @property
    def skipped_layers(self) -> tuple[int, ...]:
        kept = set(self.kept_layers)
        return tuple(i for i in range(self.num_layers) if i not in kept)

    @property
    def is_full_depth(self) -> bool:
        return self.num_kept == self.num_layers

    @property
    def prefill_layers(self) -> tuple[int, ...]:
        return tuple(range(self.num_layers)) if self.prefill == "full" else self.kept_layers

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.strategy} target={self.target_speedup:g}x basis={self.basis} "
            f"keep {self.num_kept}/{self.num_layers} {list(self.kept_layers)} "
            f"prefill={self.prefill} predicted={self.predicted_speedup:.2f}x"
        )


def full_plan(num_layers: int) -> SkipPlan:
    return SkipPlan(num_layers=num_layers, kept_layers=tuple(range(num_layers)))


def evenly_spaced(num_layers: int, num_kept: int) -> tuple[int, ...]:
    """num_kept indices from 0 to num_layers-1, both ends included, gaps differing by at most one.

    The paper uses an integer stride (L=30, s=2 keeps 0,2,...,26,29: a 3-gap at the top only); rounding
    a linspace spreads the larger gaps evenly through the middle instead.
    """
    if num_kept == 1:
        return (0,)
    step = (num_layers - 1) / (num_kept - 1)
    return tuple(math.floor(i * step + 0.5) for i in range(num_kept))


def layers_for_strategy(
    strategy: str, num_layers: int, num_kept: int, seed: int = 0, searched: KeptSets | None = None
) -> tuple[int, ...]:
    if num_kept == num_layers or strategy in ("none", "uniform"):
        return evenly_spaced(num_layers, num_kept)
    if strategy == "searched":  # chosen on the corpus by skipengine.search
        if searched is None:
            raise ValueError("skip.strategy=searched needs the layer search's result (skipengine.search)")
        return searched.kept(num_kept)
    if strategy == "early_exit":  # the first n layers: skip a contiguous top block
        return tuple(range(num_kept))
    if strategy == "keep_top":  # layer 0, then the top n-1: skip a contiguous block after layer 0
        return (0, *range(num_layers - num_kept + 1, num_layers))
    if strategy == "random":  # first and last kept, the middle drawn with a seeded RNG
        middle = random.Random(seed).sample(range(1, num_layers - 1), num_kept - 2)
        return (0, *sorted(middle), num_layers - 1)
    raise ValueError(f"skip strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")


def make_plan(
    num_layers: int,
    strategy: str = "uniform",
    target_speedup: float = 1.0,
    prefill: str = "full",
    basis: str = "layers",
    cost_model: CostModel | None = None,
    seed: int = 0,
    searched: KeptSets | None = None,
) -> SkipPlan:
    """A plan that keeps as many layers as the target speedup allows.

    basis="layers": n = floor(L / s), the paper's accounting. basis="measured": n is the most layers
    whose predicted wall-clock decode speedup under `cost_model` meets s; a target above what the fixed
    cost allows is refused with the reachable maximum.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"skip.strategy={strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    if prefill not in PREFILL_MODES:
        raise ValueError(f"skip.prefill={prefill!r} is unknown; use one of {', '.join(PREFILL_MODES)}")
    if basis not in BASES:
        raise ValueError(f"skip.basis={basis!r} is unknown; use one of {', '.join(BASES)}")
    if num_layers < MIN_KEPT_LAYERS:
        raise ValueError(f"a model with {num_layers} layer(s) has nothing to skip")
    if strategy == "none":
        return full_plan(num_layers)
    if not (isinstance(target_speedup, int | float) and math.isfinite(target_speedup)) or target_speedup < 1:
        raise ValueError(f"skip.target_speedup={target_speedup!r} must be a number >= 1.0 (1.0 = full depth)")

    if basis == "layers":
        num_kept = math.floor(num_layers / target_speedup + 1e-9)
        if num_kept < MIN_KEPT_LAYERS:
            raise ValueError(
                f"skip.target_speedup={target_speedup:g} leaves {num_kept} of {num_layers} layers; at least "
                f"{MIN_KEPT_LAYERS} (first and last) must run, so the largest target is "
                f"{num_layers / MIN_KEPT_LAYERS:g}"
            )
        predicted = num_layers / num_kept
    else:
        if cost_model is None:
            raise ValueError("skip.basis=measured needs a CostModel; run skipengine.calibrate first")
        if cost_model.num_layers != num_layers:
            raise ValueError(
                f"the CostModel is for {cost_model.num_layers} layers; the model has {num_layers}"
            )
        if target_speedup > cost_model.max_speedup:
            raise ValueError(
                f"skip.target_speedup={target_speedup:g} cannot be reached on {cost_model.device} at "
                f"batch {cost_model.batch_size}: the fixed cost of a decode step "
                f"({cost_model.fixed_s * 1e3:.1f} ms vs {cost_model.per_layer_s * 1e3:.2f} ms per layer) "
                f"caps it at {cost_model.max_speedup:.2f}x; ask for at most that"
            )
        num_kept = max(MIN_KEPT_LAYERS, cost_model.kept_for_target(target_speedup))
        predicted = cost_model.speedup(num_kept)

    return SkipPlan(
        num_layers=num_layers,
        kept_layers=layers_for_strategy(strategy, num_layers, num_kept, seed, searched),
        strategy=strategy,
        prefill=prefill,
        target_speedup=float(target_speedup),
        predicted_speedup=predicted,
        basis=basis,
        seed=seed if strategy == "random" else None,
    )
