"""Holding a target speedup under adaptive exits.

Cost is counted in layer-equivalents per token: the layers a token ran, plus kv times the deeper layers
whose K/V it filled after leaving (kv: one layer's K/V projection as a share of the whole layer). A
calibration on full-depth traces of the corpus's first rows maps each exit threshold to a predicted
speedup; SpeedupController then holds the target on every batch, decode step by decode step.
"""

from __future__ import annotations

import math

import torch


def kv_fraction(adapter) -> float:
    """A deeper layer's K/V projection as a share of a whole layer's weights: the price, in layers, of
    filling one layer's K/V for an exited token."""
    config = adapter.model.config
    d, kv = config.hidden_size, adapter.kv_size
    layer = d * adapter.q_size * 2 + 2 * d * kv + 3 * d * config.intermediate_size
    return 2 * d * kv / layer


def layer_speedup(num_layers: int, layers_per_token: float, kv: float) -> float:
    """L / layer-equivalents per token: a token that ran n layers filled K/V for the L - n it skipped
    (kv = 0 for static plans, which fill nothing)."""
    cost = layers_per_token + kv * (num_layers - layers_per_token)
    return num_layers / max(cost, 1e-9)


def first_exits(leave: torch.Tensor) -> torch.Tensor:
    """leave: bool [E, N] -> each token's first exit point taken [N], as an index; E where none is."""
    never = torch.full_like(leave[0], leave.shape[0], dtype=torch.long)
    return torch.where(leave.any(0), leave.float().argmax(0), never)


def token_costs(
    first: torch.Tensor, exit_layers: tuple[int, ...], num_layers: int, kv: float
) -> torch.Tensor:
    """Layer-equivalents per token [N] for first-exit indices [N] (E: full depth): the layers it ran
    plus kv times the deeper layers whose K/V it filled."""
    exit_at = torch.tensor([*exit_layers, num_layers - 1], dtype=torch.float)[first]
    return exit_at + 1 + kv * (num_layers - 1 - exit_at)


def layers_cost(
    probs: torch.Tensor, exit_layers: tuple[int, ...], num_layers: int, threshold: float, kv: float
) -> float:
    """Mean layer-equivalents per token if each token leaves at its first exit point with prob >=
    threshold. probs: [E, N]."""
    return float(token_costs(first_exits(probs >= threshold), exit_layers, num_layers, kv).mean())


def threshold_for_target(
    probs: torch.Tensor, exit_layers: tuple[int, ...], num_layers: int, target: float, kv: float
) -> tuple[float, float]:
    """(the highest threshold whose predicted speedup L / cost meets the target, that speedup). probs:
    exit-classifier probabilities [E, N] on full-depth traces of a calibration sample."""
    candidates = sorted(set(probs.flatten().tolist()), reverse=True)
    return _highest_threshold(probs, candidates, exit_layers, num_layers, target, kv)


def _highest_threshold(
    probs, candidates: list[float], exit_layers, num_layers: int, target: float, kv: float
):
    if target <= 1.0:
        return 1.01, 1.0  # never exit
    lo, hi = 0, len(candidates) - 1  # speedup grows as the threshold falls: binary search the index
    while lo < hi:
        mid = (lo + hi) // 2
        if num_layers / layers_cost(probs, exit_layers, num_layers, candidates[mid], kv) >= target:
            hi = mid
        else:
            lo = mid + 1
    threshold = candidates[lo]
    speedup = num_layers / layers_cost(probs, exit_layers, num_layers, threshold, kv)
    if speedup < target * 0.999:
        raise ValueError(
            f"skip.target_speedup={target:g} cannot be reached with these exit points (at most "
            f"{speedup:.2f}x, every token leaving at the first one); lower skip.min_depth or the target"
        )
    return threshold, speedup


class SpeedupController:
    """Holds the target speedup on every batch: after each decode step, an integral step on that step's
    cost miss moves an effective target, and the calibration curve turns it into a threshold.

    Stepping in speedup units along the curve, not in threshold units, keeps the gain even: the
    classifiers' probabilities bunch up, so a fixed threshold step moves the speedup by 1% in one place
    and by 2x in another. The integral makes a batch's mean cost miss equal to the effective target's
    drift over the batch divided by gain * steps, so it vanishes as the effective target settles; the
    effective target carries over from batch to batch.
    """

    def __init__(
        self,
        probs: torch.Tensor,
        exit_layers: tuple[int, ...],
        num_layers: int,
        target: float,
        kv: float,
        threshold: float,
        gain: float = 0.1,
        points: int = 48,
    ):
        self.num_layers, self.kv, self.gain = num_layers, kv, gain
        self.target_cost = num_layers / target
        fastest = num_layers / layers_cost(probs, exit_layers, num_layers, 0.0, kv)  # all leave at once
        self.max_log = math.log(max(fastest, 1.0))
        # the curve: thresholds for effective targets on a log grid from 1x to the fastest reachable
        self.grid = [self.max_log * k / (points - 1) for k in range(points)]
        candidates = sorted(set(probs.flatten().tolist()), reverse=True)
        self.thresholds = [
            _highest_threshold(probs, candidates, exit_layers, num_layers, math.exp(g) * 0.999, kv)[0]
            for g in self.grid
        ]
        self.log_target = min(math.log(target), self.max_log)
        self.threshold = threshold  # the calibrated (or configured) start

    def _lookup(self, log_target: float) -> float:
        """The threshold for an effective target, interpolated between grid points."""
        step = self.max_log / (len(self.grid) - 1) if self.max_log > 0 else 1.0
        k = min(int(log_target / step), len(self.grid) - 2) if len(self.grid) > 1 else 0
        frac = min(1.0, max(0.0, (log_target - self.grid[k]) / step))
        return self.thresholds[k] + frac * (self.thresholds[k + 1] - self.thresholds[k])

    def step(self, layers_run: float, rows: int, batch_rows: int) -> float:
        """After a decode step in which `rows` live rows ran `layers_run` layers in all: the next threshold.
        A step with fewer live rows weighs less (the batch's mean is over row-steps)."""
        layers_per_token = layers_run / rows
        cost = layers_per_token + self.kv * (self.num_layers - layers_per_token)
        miss = (cost - self.target_cost) / self.target_cost  # > 0: too slow, exit more
        self.log_target += self.gain * miss * rows / batch_rows
        self.log_target = min(self.max_log, max(0.0, self.log_target))
        self.threshold = self._lookup(self.log_target)
        return self.threshold
