"""skipengine: batched, KV-cached generation that skips transformer layers at a fixed target speedup."""

from skipengine.calibrate import measure_cost_model
from skipengine.engine import Engine
from skipengine.load import load_model
from skipengine.outputs import GenerationOutput, GenerationStats, RowResult
from skipengine.plan import CostModel, SkipPlan, full_plan, make_plan
from skipengine.sampling import SamplingParams

__all__ = [
    "CostModel",
    "Engine",
    "GenerationOutput",
    "GenerationStats",
    "RowResult",
    "SamplingParams",
    "SkipPlan",
    "full_plan",
    "load_model",
    "make_plan",
    "measure_cost_model",
]
