"""The jobs' configuration as dataclasses. Each job's schema is stored in Hydra's ConfigStore as
`<job>_schema` and listed first in conf/<job>.yaml's defaults, so Hydra composes conf/ onto it and an
unknown key or a wrongly typed value fails before anything starts; `typed` turns the composed config into
the schema's dataclass and runs the schema's own `validate`, the checks types cannot express. The config
groups' schemas (model, task, skip, ...) and jobs.generate's (JobConfig) are here; every other job's schema
sits beside its entry point in jobs/ and reuses these groups."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from skipengine.adaptive import CRITERIA, KV_FILLS
from skipengine.exits import classifier_adapter
from skipengine.load import DTYPES
from skipengine.plan import BASES, PREFILL_MODES, STRATEGIES
from skipengine.sampling import SamplingParams

FORMATS = ("auto", "parquet", "jsonl", "csv", "hf_disk")
OUTPUT_MODES = ("resume", "overwrite", "error")
CLUSTER_KINDS = ("local", "existing")
T = TypeVar("T")


@dataclass
class ModelConfig:
    name: str = MISSING  # short name for run folders
    spec: str = MISSING  # a named default, a local HF folder, or a hub id
    device: str = "cpu"  # "cpu" or "cuda" (then cluster.gpus_per_actor > 0)
    dtype: str = "float32"  # the weights' and activations' dtype
    trust_remote_code: bool = False  # run a model folder's own Python code (auto_map)
    # what Ray reserves for one actor of this model unless cluster.memory_per_actor_gb says otherwise:
    # its measured peak RSS with headroom (raise it for a bigger local model)
    actor_memory_gb: float = 2.5
    # task name -> the skip-aware adapters shipped for this model (uniform or searched plans);
    # skip.adapter=auto picks one for the run's plan (pipeline.planning)
    adapters: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class TaskConfig:
    name: str = MISSING  # summarize and translate are scored by jobs.evaluate
    input_column: str = "text"  # the corpus column that fills {input}
    reference_column: str | None = None  # the column jobs.evaluate scores against; copied to the outputs
    # {input} is replaced by the row's text; sent as the user turn of the chat template where the model
    # has one, as plain text otherwise
    template: str = "{input}"
    system: str | None = None  # a system turn for chat models
    chat: bool = True
    max_new_tokens: int = 128  # per row; rows also stop at EOS, a stop string or the context window
    stop: list[str] = field(default_factory=list)  # stop strings; the text is cut before them
    # decoding, with HF generate()'s semantics (skipengine.SamplingParams); temperature 0 = greedy
    temperature: float = 0.0
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    no_repeat_ngram_size: int = 0  # 0 = off
    penalize_prompt: bool = True  # the two above count the prompt's tokens too (HF); false: the output's only
    seed: int = 0  # sampling: each row draws from its own generator, seeded from this and its prompt
    on_too_long: str = "error"  # or "truncate": keep the prompt's last tokens and flag the row

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            penalize_prompt=self.penalize_prompt,
            seed=self.seed,
            stop=tuple(self.stop),
        )


@dataclass
class SkipConfig:
    strategy: str = "none"
    target_speedup: float = 1.0  # the speedup asked for; 1.0 = full depth
    # layers: L / kept layers (the paper); measured: the deepest plan whose decode speedup, measured on the
    # corpus's first batch against full depth on the actors' device, meets the target (pipeline.planning)
    basis: str = "layers"
    prefill: str = "full"  # full: the prompt runs every layer; skip: the prompt skips too
    seed: int = 0  # strategy=random
    # every Nth batch of each actor, its first included, is generated again at full depth (not written)
    # to measure the achieved speedup on the job's own rows; 0 = never
    full_depth_every: int = 8
    # a skip-aware LoRA adapter (jobs.finetune) for this model and plan; "auto": the best of the model's
    # shipped adapters for the task and target (uniform, searched), the exit classifiers' own (adaptive)
    adapter: str | None = None
    # strategy=adaptive (ADEPT): per-token exits; see conf/skip/adaptive.yaml
    exit_classifiers: str | None = None  # jobs.train_exits output (criterion=classifier)
    criterion: str = "classifier"  # or "confidence" (an LM-head check, CALM's baseline)
    exit_every: int = 2  # exit points every k layers (criterion=confidence; classifiers carry their own)
    min_depth: int = 4  # no exit before layer min_depth (1-based); filters the classifiers' points too
    kv_fill: str = "decoupled"
    threshold: float | None = None  # None: calibrated on the first calibration_rows rows of the corpus
    calibration_rows: int = 16
    # strategy=searched: the driver searches the kept layers once, on the corpus's first search_rows rows
    # (each followed by search_tokens tokens of the full model's own continuation), cached per model,
    # sample and prefill; search_min_kept: how deep it searches (null: 0.6 x L / target_speedup)
    search_rows: int = 8
    search_tokens: int = 48
    search_min_kept: int | None = None
    controller: bool = True  # hold the target step by step along the calibration curve (needs classifiers)


@dataclass
class DataConfig:
    name: str = MISSING  # short name for run folders
    path: str = MISSING  # a file or a folder of files
    format: str = "auto"
    id_column: str | None = None  # else a content hash of the input columns
    keep_columns: list[str] = field(default_factory=list)  # input columns copied to the outputs
    limit: int | None = None  # the corpus's first rows only; null: every row
    drop_duplicates: bool = False  # without an id column, identical rows are refused unless this is set


@dataclass
class ClusterConfig:
    kind: str = "local"
    address: str | None = None  # kind=existing: "auto" or "ray://host:10001"
    num_actors: int = 1  # generator actors: one per GPU on a cluster
    gpus_per_actor: float = 0.0  # > 0 with model.device=cuda
    cpus_per_actor: float = 0.5  # fractional locally: whole CPUs per actor deadlock Ray on 2 cores
    memory_per_actor_gb: float | None = None  # Ray's reservation; null: model.actor_memory_gb; 0: none
    threads_per_actor: int = 2  # torch threads inside each actor
    batch_size: int = 8  # rows decoded together by one actor
    local_num_cpus: int | None = None  # kind=local: CPUs Ray may use (default: all)
    max_batch_retries: int = 1  # a failed batch is retried, then split to isolate the failing rows


@dataclass
class OutputConfig:
    dir: str = MISSING  # the run folder
    mode: str = "resume"  # resume: skip ids already done; overwrite: replace; error: refuse a used folder
    price_per_device_hour: float = 0.0  # for cost per 1M generated tokens
    progress_every_s: float = 30.0  # log-line interval when stdout is not a terminal
    # resume: generate again the error rows marked retryable (generation failed: out of memory, a kernel)
    retry_errors: bool = False
    # resume: rows whose input text changed since they were generated are generated again (false: the run
    # is refused, naming them)
    regenerate_changed: bool = False


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    skip: SkipConfig = field(default_factory=SkipConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def _schema_of(hint: Any) -> Any:
    """The dataclass or list type inside an annotation (`X | None` is X), else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [h for h in typing.get_args(hint) if h is not type(None)]
        hint = inner[0] if len(inner) == 1 else None
    return hint if dataclasses.is_dataclass(hint) or typing.get_origin(hint) is list else None


def _check_keys(value: Any, hint: Any, path: str) -> None:
    """Refuse a key that `hint`'s dataclass lacks, anywhere below `path`, naming the full dotted key and
    the keys valid there (OmegaConf names only the last part of a key inside a list)."""
    hint = _schema_of(hint)
    if hint is None:
        return
    if typing.get_origin(hint) is list:
        for i, item in enumerate(value if isinstance(value, list) else []):
            _check_keys(item, typing.get_args(hint)[0], f"{path}[{i}]")
        return
    if not isinstance(value, dict):
        return
    hints = typing.get_type_hints(hint)
    for key, item in value.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in hints:
            where = f"{path} takes" if path else "the top level takes"
            valid = ", ".join(f.name for f in dataclasses.fields(hint))
            raise ValueError(
                f"{full} is not a config key; {where}: {valid}. Fix its spelling or drop it (add --cfg job "
                "to the command to print the whole config)"
            )
        _check_keys(item, hints[key], full)


def typed(cfg: DictConfig | dict, schema: type[T]) -> T:
    """`cfg` (a composed job config, or a plain dict) as an instance of `schema`, checked: a key the schema
    lacks, a missing required value or a wrongly typed one raises ValueError naming the full key and what
    to do; then the schema's own `validate()`, where it has one, checks the values (ValueError, or
    FileNotFoundError for a named file that is not there). jobs.generate's checks run in run_job instead,
    after skip.adapter=auto is resolved."""
    _check_keys(OmegaConf.to_container(OmegaConf.create(cfg), resolve=False), schema, "")
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    except MissingMandatoryValue as e:
        raise ValueError(f"{e.full_key} is required and has no value; set it: {e.full_key}=...") from None
    except OmegaConfBaseException as e:  # a value of the wrong type, or one that cannot be resolved
        raise ValueError(f"{e.full_key}: {str(e.msg).splitlines()[0]}; give it a valid value") from None
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    """Refuse a value outside `valid`, naming the key (pipeline.config_reference lists `valid` per key)."""
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; use one of: {', '.join(valid)}")


def adaptive_adapter(skip: SkipConfig) -> str | None:
    """skip.adapter=auto under skip=adaptive: the adapter the exit classifiers were trained with (None: the
    base model's classifiers, or criterion=confidence), since they read that model's hidden states."""
    classifiers = skip.criterion == "classifier" and skip.exit_classifiers
    found = classifiers and Path(classifiers).expanduser().is_file()  # else validate names it
    return classifier_adapter(Path(classifiers).expanduser()) if found else None


def resolve_adapter(cfg: JobConfig) -> None:
    """skip.adapter=auto stays auto (the run's plan chooses among the shipped adapters: pipeline.planning)
    or becomes None when nothing is shipped for the strategy and task; with skip=adaptive it becomes
    the adapter the exit classifiers were trained with (None: the base model); adapter and exit-classifier
    paths made absolute, since actors may not share the driver's working directory."""
    shipped = cfg.model.adapters.get(cfg.task.name, [])
    if cfg.skip.adapter == "auto" and cfg.skip.strategy == "adaptive":
        cfg.skip.adapter = adaptive_adapter(cfg.skip)
    elif cfg.skip.adapter == "auto" and (cfg.skip.strategy not in ("uniform", "searched") or not shipped):
        cfg.skip.adapter = None
    if shipped:
        cfg.model.adapters[cfg.task.name] = [str(Path(p).expanduser().resolve()) for p in shipped]
    for key in ("adapter", "exit_classifiers"):
        if getattr(cfg.skip, key) == "auto":
            continue
        if getattr(cfg.skip, key):
            setattr(cfg.skip, key, str(Path(getattr(cfg.skip, key)).expanduser().resolve()))


def validate_model(model: ModelConfig) -> None:
    choice("model.dtype", model.dtype, (*DTYPES,))
    if model.actor_memory_gb < 0:
        raise ValueError(f"model.actor_memory_gb={model.actor_memory_gb} must be >= 0")


def validate_task(task: TaskConfig) -> None:
    choice("task.on_too_long", task.on_too_long, ("error", "truncate"))
    if "{input}" not in task.template:
        raise ValueError(f"task.template={task.template!r} must contain {{input}} where the row's text goes")
    try:
        task.sampling()
    except ValueError as e:
        raise ValueError(f"task.{e}") from None


def validate_skip(skip: SkipConfig) -> None:
    """The skip group's checks, for every job that composes it (its files: relative to the working
    directory, or absolute once resolve_adapter has run)."""
    choice("skip.strategy", skip.strategy, (*STRATEGIES, "adaptive"))
    choice("skip.basis", skip.basis, BASES)
    choice("skip.prefill", skip.prefill, PREFILL_MODES)
    if skip.target_speedup < 1:
        raise ValueError(f"skip.target_speedup={skip.target_speedup} must be >= 1.0 (1.0 = full depth)")
    if skip.adapter and skip.adapter != "auto" and not Path(skip.adapter).expanduser().is_file():
        raise FileNotFoundError(f"skip.adapter={skip.adapter!r} does not exist; train one with jobs.finetune")
    if skip.full_depth_every < 0:
        raise ValueError(f"skip.full_depth_every={skip.full_depth_every} must be >= 0 (0 = never)")
    if skip.strategy == "searched" and (skip.search_rows < 1 or skip.search_tokens < 2):
        raise ValueError("skip.search_rows must be >= 1 and skip.search_tokens >= 2")
    if skip.strategy == "adaptive":
        choice("skip.criterion", skip.criterion, CRITERIA)
        choice("skip.kv_fill", skip.kv_fill, KV_FILLS)
        if skip.criterion == "classifier" and not skip.exit_classifiers:
            raise ValueError(
                "skip=adaptive with criterion=classifier needs skip.exit_classifiers=<file from "
                "jobs.train_exits>, or use skip.criterion=confidence"
            )
        if skip.exit_classifiers and not Path(skip.exit_classifiers).expanduser().is_file():
            raise FileNotFoundError(f"skip.exit_classifiers={skip.exit_classifiers!r} does not exist")


def validate(cfg: JobConfig) -> None:
    """Value checks that types cannot express; every message names the key and what would be valid."""
    validate_skip(cfg.skip)
    choice("data.format", cfg.data.format, FORMATS)
    choice("output.mode", cfg.output.mode, OUTPUT_MODES)
    choice("cluster.kind", cfg.cluster.kind, CLUSTER_KINDS)
    validate_task(cfg.task)
    validate_model(cfg.model)
    if cfg.cluster.num_actors < 1 or cfg.cluster.batch_size < 1:
        raise ValueError("cluster.num_actors and cluster.batch_size must be >= 1")
    if cfg.cluster.memory_per_actor_gb is not None and cfg.cluster.memory_per_actor_gb < 0:
        raise ValueError(
            "cluster.memory_per_actor_gb must be >= 0 (0 reserves nothing), or null for the model's own"
        )
    if cfg.cluster.cpus_per_actor <= 0 and cfg.cluster.gpus_per_actor <= 0:
        raise ValueError("cluster.cpus_per_actor must be > 0 (fractional is fine, e.g. 0.5)")
    if cfg.cluster.kind == "existing" and not cfg.cluster.address:
        raise ValueError("cluster.kind=existing needs cluster.address: 'auto' or 'ray://host:10001'")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise ValueError(f"data.limit={cfg.data.limit} must be >= 1, or null for every row")
    for path in cfg.model.adapters.get(cfg.task.name, []) if cfg.skip.adapter == "auto" else []:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"model.adapters.{cfg.task.name} lists {path!r}, which does not exist; train it with "
                "jobs.finetune, remove it from the list, or set skip.adapter=null"
            )
    if not Path(cfg.data.path).expanduser().exists():
        raise FileNotFoundError(f"data.path={cfg.data.path!r} does not exist; point it at a file or a folder")
    if cfg.model.device.startswith("cuda") and cfg.cluster.gpus_per_actor <= 0:
        raise ValueError("model.device=cuda needs cluster.gpus_per_actor > 0 so Ray gives each actor a GPU")


def actor_memory(cfg: JobConfig) -> tuple[str, float]:
    """(the config key it comes from, GiB) that Ray reserves per generator actor."""
    if cfg.cluster.memory_per_actor_gb is not None:
        return "cluster.memory_per_actor_gb", cfg.cluster.memory_per_actor_gb
    return "model.actor_memory_gb", cfg.model.actor_memory_gb
