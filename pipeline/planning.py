"""One plan per run: which layers every actor keeps, and which adapter it merges.

The driver has one worker shaped like a generator actor (same device, threads and memory) build the plan.
It loads the model and searches the layers where skip=searched needs it. With skip.basis=measured it runs
candidate plans on the corpus's first batch, at the task's generation length with rows finishing where
they do, against full depth, and keeps the deepest that meets the target. The result is plan.json in the
run folder; every actor and every resume of the run uses it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import ray
import torch
from transformers import AutoConfig

from pipeline.config import JobConfig, SkipConfig, actor_memory
from pipeline.prompts import PromptBuilder
from skipengine import Engine, SamplingParams, SkipPlan, full_plan, load, load_model
from skipengine.calibrate import SpeedProbe, SpeedSample, deepest_meeting
from skipengine.lora import adapter_plans, check_base, merge_adapter
from skipengine.plan import MIN_KEPT_LAYERS, evenly_spaced, layers_for_strategy, make_plan
from skipengine.search import SearchedPlans, cached_search, sample_hash

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    plan: SkipPlan
    adapter: str | None = None  # the merged adapter's path
    search: SearchedPlans | None = None  # skip=searched without a searched adapter: the layer search
    # skip.basis=measured: the device, batch and sample the candidates ran on, and what each measured
    calibration: dict | None = None
    notes: list[str] = field(default_factory=list)  # why the plan is what it is, for the log and summary

    def to_json(self) -> str:
        d = asdict(self)
        d["search"] = json.loads(self.search.to_json()) if self.search else None
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunPlan:
        d = json.loads(text)
        d["plan"] = SkipPlan(**(d["plan"] | {"kept_layers": tuple(d["plan"]["kept_layers"])}))
        d["search"] = SearchedPlans.from_json(json.dumps(d["search"])) if d["search"] else None
        return cls(**d)


def serves(skip: SkipConfig, kept: tuple[int, ...], num_layers: int) -> bool:
    """Whether an adapter's trained plan is one of skip.strategy's: full depth serves every strategy,
    searched any plan that is not evenly spaced (the adapter's own search), the others their own plan of
    that size."""
    if len(kept) == num_layers:
        return True
    if skip.strategy == "searched":
        return kept != evenly_spaced(num_layers, len(kept))
    return kept == layers_for_strategy(skip.strategy, num_layers, len(kept), skip.seed)


def adapter_options(
    candidates: list[str], skip: SkipConfig, num_layers: int
) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(adapter, its trained plans for this strategy and prefill, deepest first), the adapter trained for
    the fewest plans first: an adapter's training steps are shared among its plans, and that costs more
    quality than a layer or two (docs/quality.md: at the 2x plan the 2x-only adapter scores 15.5 ROUGE-L,
    the 10-20-layer range adapter 9.9)."""
    options = []
    for path in candidates:
        trained = [
            kept
            for prefill, kept in adapter_plans(path)
            if prefill == skip.prefill
            and serves(skip, kept, num_layers)
            and (len(kept) < num_layers) == (skip.target_speedup > 1.0)  # full depth is for target 1 only
        ]
        if trained:
            options.append((path, sorted(trained, key=len, reverse=True)))
    return sorted(options, key=lambda option: len(option[1]))


def build_run_plan(
    skip: SkipConfig,
    num_layers: int,
    model: Callable[[], tuple[Engine, list[list[int]]]],
    sampling: SamplingParams,
    batch_size: int,
    shipped: list[str] | tuple[str, ...] = (),
    on_too_long: str = "error",
    measurer: Measurer | None = None,
) -> RunPlan:
    """The run's plan and adapter. `model()` gives the engine and the corpus's first rows' prompt token
    ids, and is called only to search or to measure: the first batch_size prompts are the measured sample
    (basis=measured, measured by `measurer`: a Measurer of them by default), the first skip.search_rows
    the layer search's."""
    layers = num_layers
    explicit = skip.adapter if skip.adapter not in (None, "auto") else None
    if skip.strategy == "none":  # e.g. a full-depth baseline adapter; loading refuses one for another plan
        return RunPlan(full_plan(layers), explicit)
    candidates = list(shipped) if skip.adapter == "auto" else [explicit] if explicit else []
    options = adapter_options(candidates, skip, layers)
    if skip.target_speedup == 1.0:  # full depth: no layer is traded for an adapter
        full = [path for path, trained in options if len(trained[0]) == layers]
        if explicit and not full:
            raise ValueError(
                f"skip.adapter={explicit!r} has no full-depth plan, and skip.target_speedup=1.0 is full "
                "depth; set skip.adapter=null or raise the target"
            )
        plan = replace(_plan(tuple(range(layers)), skip, layers, 1.0), basis="layers")  # nothing measured
        return RunPlan(plan, full[0] if full else None)

    measure = measurer
    if skip.basis == "measured" and measure is None:
        engine, prompts = model()
        measure = Measurer(skip, engine, prompts[:batch_size], sampling, batch_size, on_too_long)
    notes: list[str] = []
    for path, trained in options:
        chosen = _with_adapter(skip, layers, path, trained, measure, notes)
        if chosen is not None:
            return RunPlan(chosen, path, None, measure.calibration() if measure else None, notes)
    if explicit:
        trained = [f"{prefill}:{list(kept)}" for prefill, kept in adapter_plans(explicit)]
        why = "; ".join(notes) or f"none of that size, skip.prefill={skip.prefill}"
        raise ValueError(
            f"skip.adapter={explicit!r} (trained for prefill:kept layers {trained}) has no "
            f"{skip.strategy} plan that serves skip.target_speedup={skip.target_speedup:g} here ({why}); "
            "train one for this target (jobs.finetune) or set skip.adapter=null"
        )
    searched = None
    if skip.strategy == "searched":
        engine, prompts = model()
        searched = search(skip, engine, prompts[: skip.search_rows])
    if measure is None:
        plan = make_plan(
            layers,
            skip.strategy,
            skip.target_speedup,
            skip.prefill,
            "layers",
            seed=skip.seed,
            searched=searched,
        )
    else:
        lowest = searched.min_kept if searched else MIN_KEPT_LAYERS
        by_count = {
            n: layers_for_strategy(skip.strategy, layers, n, skip.seed, searched)
            for n in range(lowest, layers)
        }
        plan = measure.deepest(by_count, None, notes)
        if plan is None:
            fastest = measure.speed(by_count, None, lowest)
            raise ValueError(
                f"skip.target_speedup={skip.target_speedup:g} cannot be reached on {measure.device} at "
                f"batch {batch_size}: the fastest plan measured ({lowest} of {layers} layers) runs "
                f"{fastest.decode_speedup:.2f}x on the corpus's first rows; ask for at most that"
                + (", or lower skip.search_min_kept to search deeper" if searched else "")
            )
    if skip.adapter == "auto":
        notes.append(
            f"skip.adapter=auto: no shipped adapter serves {plan.num_kept} kept layers "
            f"({', '.join(Path(p).name for p in candidates) or 'none shipped for this task'}); running "
            "without one, expect poorer quality (train one with jobs.finetune)"
        )
        log.warning(notes[-1])
    return RunPlan(plan, None, searched, measure.calibration() if measure else None, notes)


def _plan(kept: tuple[int, ...], skip: SkipConfig, layers: int, predicted: float) -> SkipPlan:
    return SkipPlan(
        num_layers=layers,
        kept_layers=tuple(kept),
        strategy=skip.strategy,
        prefill=skip.prefill,
        target_speedup=skip.target_speedup,
        predicted_speedup=predicted,
        basis=skip.basis,
        seed=skip.seed if skip.strategy == "random" else None,
    )


def _with_adapter(
    skip: SkipConfig, layers: int, path: str, trained: list, measure: Measurer | None, notes: list[str]
) -> SkipPlan | None:
    """The adapter's plan for the target, or None. basis=layers: its plan of L / target kept layers
    (uniform: that very plan). basis=measured: its deepest plan that meets the target as measured with it
    merged, even where it runs faster than asked: on 100 ACLSum papers the searched adapter's 12 layers
    score 22.6 ROUGE-L, the 16 searched layers that 1.5x allows without it 16.0 (docs/design.md)."""
    name = Path(path).name
    if measure is None:
        count = make_plan(layers, "uniform", skip.target_speedup, skip.prefill, "layers").num_kept
        for kept in trained:
            if len(kept) == count:
                return _plan(kept, skip, layers, layers / count)
        return None
    by_count = {len(kept): kept for kept in trained}
    plan = measure.deepest(by_count, path, notes)
    if plan is None:
        notes.append(f"{name}: none of its plans ({sorted(by_count)} kept layers) reaches the target here")
    return plan


def disagreements(measured: dict[int, float], slack: float = 0.1) -> list[str]:
    """Measurements that contradict each other: fewer layers measured more than `slack` slower than more
    layers. Compute cannot do that; another process sharing the device can, and then the plan chosen from
    them may miss the target."""
    counts = sorted(measured)
    found = []
    for i, fewer in enumerate(counts):
        for more in counts[i + 1 :]:
            if measured[fewer] < measured[more] * (1 - slack):
                found.append(
                    f"{fewer} layers measured {measured[fewer]:.2f}x and {more} layers "
                    f"{measured[more]:.2f}x: "
                    "the device was not running this job alone, and the plan may miss its target; "
                    "rerun on an idle device with output.mode=overwrite"
                )
    return found


class Measurer:
    """basis=measured: plans run on the corpus's first batch against the base model at full depth
    (skipengine.calibrate.SpeedProbe), each adapter merged into a copy of the model while its plans run."""

    def __init__(
        self,
        skip: SkipConfig,
        engine: Engine,
        prompts: list[list[int]],
        sampling: SamplingParams,
        batch_size: int,
        on_too_long: str = "error",
    ):
        if not prompts:
            raise ValueError(
                "skip.basis=measured measures plans on the corpus's first rows, and none of them makes a "
                "prompt; fix those rows or use skip.basis=layers"
            )
        self.skip, self.engine, self.prompts, self.sampling = skip, engine, prompts, sampling
        self.batch_size = batch_size
        self.device = device_name(engine.device)
        self.probe = SpeedProbe(engine, prompts, sampling, skip.target_speedup, on_too_long)
        self.merged: tuple[str, Engine] | None = None  # one merged copy of the model at a time
        self.results: list[dict] = []
        self.seconds = 0.0

    def _engine(self, adapter: str | None) -> Engine:
        if adapter is None:
            return self.engine
        if self.merged is None or self.merged[0] != adapter:
            self.merged = None
            base = self.engine.model
            model = merge_adapter(copy.deepcopy(base), adapter, check_base(base, adapter))
            self.merged = (adapter, Engine(model, self.engine.tokenizer))
        return self.merged[1]

    def speed(self, by_count: dict, adapter: str | None, count: int) -> SpeedSample:
        for r in self.results:
            if r["adapter"] == adapter and r["num_kept"] == count:
                return SpeedSample(**{k: v for k, v in r.items() if k != "adapter"})
        started = time.perf_counter()
        layers = self.engine.num_layers
        plan = _plan(by_count[count], self.skip, layers, 1.0)
        sample = self.probe.measure(plan, self._engine(adapter), key=adapter)
        self.seconds += time.perf_counter() - started
        self.results.append({"adapter": adapter, **asdict(sample)})
        log.info(
            "calibration: %d of %d layers%s: decode %.2fx, prefill + decode %.2fx",
            count,
            layers,
            f" with {Path(adapter).name}" if adapter else "",
            sample.decode_speedup,
            sample.speedup,
        )
        return sample

    def deepest(self, by_count: dict, adapter: str | None, notes: list[str]) -> SkipPlan | None:
        """The deepest of these plans (kept-layer count -> kept layers) that meets the target."""
        layers, target = self.engine.num_layers, self.skip.target_speedup
        count = deepest_meeting(
            list(by_count), layers, target, lambda n: self.speed(by_count, adapter, n).decode_speedup
        )
        measured = {r["num_kept"]: r["decode_speedup"] for r in self.results if r["adapter"] == adapter}
        for note in disagreements(measured):
            log.warning("calibration: %s", note)
            notes.append(note)
        if count is None:
            return None
        by_layer_count = math.floor(layers / target + 1e-9)
        speed = self.speed(by_count, adapter, count).decode_speedup
        if adapter and count == max(by_count) and count < by_layer_count:
            notes.append(
                f"{count} of {layers} layers, the deepest plan {Path(adapter).name} was trained for; it runs "
                f"{speed:.2f}x where {target:g}x was asked"
            )
        elif count < by_layer_count:
            notes.append(
                f"{count} of {layers} layers, where the layer count alone gives {by_layer_count}: per-step "
                "costs outside the layers, and where the rows finish, take the difference"
            )
        return _plan(by_count[count], self.skip, layers, speed)

    def calibration(self) -> dict:
        """What plan.json records of the measurement."""
        return {
            "device": self.device,
            "batch_size": self.batch_size,
            "rows": len(self.prompts),
            "max_new_tokens": self.sampling.max_new_tokens,
            "sample_hash": sample_hash(self.prompts, self.sampling.max_new_tokens),
            "measured": self.results,
            "seconds": self.seconds,
        }


def search(skip: SkipConfig, engine: Engine, prompts: list[list[int]]) -> SearchedPlans:
    """skip=searched: the layer search on the corpus's first rows, cached per model, sample and prefill."""
    layers = engine.num_layers
    min_kept = skip.search_min_kept or math.ceil(0.6 * layers / skip.target_speedup)
    log.info(
        "layer search on %d prompts of the corpus, down to %d of %d layers", len(prompts), min_kept, layers
    )
    return cached_search(
        engine, prompts, min_kept, skip.prefill, load.cache_root() / "searched", skip.search_tokens
    )


def device_name(device: torch.device) -> str:
    """The device with its model ("cuda:0 NVIDIA H200", "cpu AMD EPYC"): a plan measured on one is
    not the plan for another."""
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(
            line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = ""
    return f"{device} {model}".strip()


def model_layers(cfg: JobConfig) -> int:
    """The model's decoder depth from its config alone, before any weights load."""
    config = AutoConfig.from_pretrained(
        load.resolve(cfg.model.spec), trust_remote_code=cfg.model.trust_remote_code
    )
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "decoder_layers", None)
    if not layers:
        raise ValueError(f"model.spec={cfg.model.spec!r}: its config names no decoder depth")
    return layers


def plan_from_config(cfg: JobConfig, texts: list[str]) -> RunPlan:
    """The run's plan from the job's config and the corpus's first rows' texts. The model loads only when
    the plan needs it: to search or to measure."""
    loaded = []

    def model() -> tuple[Engine, list[list[int]]]:
        if not loaded:
            torch.set_num_threads(cfg.cluster.threads_per_actor)
            spec = cfg.model
            engine = Engine(*load_model(spec.spec, spec.device, spec.dtype, spec.trust_remote_code))
            builder = PromptBuilder(cfg.task, engine.tokenizer)
            loaded.append((engine, [p.ids for p in map(builder.build, texts) if p.ids]))
        return loaded[0]

    return build_run_plan(
        cfg.skip,
        model_layers(cfg),
        model,
        cfg.task.sampling(),
        cfg.cluster.batch_size,
        cfg.model.adapters.get(cfg.task.name, []),
        cfg.task.on_too_long,
    )


def needs_model(cfg: JobConfig) -> bool:
    """Whether the plan is measured or searched, and so is built by a worker shaped like an actor."""
    skip = cfg.skip
    if skip.strategy == "none" or skip.target_speedup == 1.0:
        return False
    if skip.basis == "measured":
        return True
    layers = model_layers(cfg)
    candidates = cfg.model.adapters.get(cfg.task.name, []) if skip.adapter == "auto" else [skip.adapter]
    options = adapter_options([c for c in candidates if c], skip, layers)
    served = any(_with_adapter(skip, layers, path, trained, None, []) for path, trained in options)
    return skip.strategy == "searched" and not served


def _planning_worker(cfg: JobConfig, texts: list[str]) -> RunPlan:
    # the calibration's progress lines reach the driver's console through Ray's log forwarding
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return plan_from_config(cfg, texts)


def plan_run(cfg: JobConfig, texts: list[str]) -> RunPlan:
    """The plan, built once: on a worker with a generator actor's resources (its device and threads) where
    it needs the model, else here."""
    if not needs_model(cfg):
        return plan_from_config(cfg, texts)
    cluster = cfg.cluster
    # max_calls=1: the worker exits after it, and frees the model's memory for the actors
    worker = ray.remote(max_calls=1)(_planning_worker).options(
        num_cpus=cluster.cpus_per_actor,
        num_gpus=cluster.gpus_per_actor or None,
        memory=int(actor_memory(cfg)[1] * 2**30) or None,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cluster.threads_per_actor)}},
        max_retries=0,
    )
    started = time.perf_counter()
    try:
        result = ray.get(worker.remote(cfg, texts))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ValueError | FileNotFoundError):  # a config error: raised as it is
            raise e.cause from None
        raise
    log.info(
        "plan: %s%s (%.0f s)",
        result.plan,
        f", adapter {Path(result.adapter).name}" if result.adapter else "",
        time.perf_counter() - started,
    )
    for note in result.notes:
        log.info("plan: %s", note)
    return result
