"""Every job's typed config: the repo's own conf/ composes onto each job's schema, the schema's defaults
are its conf file's, and an unknown key or a bad value is refused naming the key, before anything loads.
Hydra's compose API only: no model, no Ray."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

import jobs.bench_adaptive
import jobs.bench_decode
import jobs.bench_finetune
import jobs.bench_pipeline
import jobs.bench_quality
import jobs.check_model
import jobs.cost_study
import jobs.evaluate
import jobs.finetune
import jobs.generate
import jobs.perplexity
import jobs.train_exits
from jobs.common import job_config
from pipeline.config import JobConfig, typed

CONF = Path(__file__).resolve().parent.parent / "conf"
SCHEMAS = {  # each job's conf/<job>.yaml and the schema its main converts it to (registers <job>_schema)
    "generate": JobConfig,
    "finetune": jobs.finetune.FinetuneConfig,
    "evaluate": jobs.evaluate.EvaluateConfig,
    "perplexity": jobs.perplexity.PerplexityConfig,
    "train_exits": jobs.train_exits.TrainExitsConfig,
    "check_model": jobs.check_model.CheckModelConfig,
    "bench_adaptive": jobs.bench_adaptive.BenchAdaptiveConfig,
    "bench_decode": jobs.bench_decode.BenchDecodeConfig,
    "bench_finetune": jobs.bench_finetune.BenchFinetuneConfig,
    "bench_pipeline": jobs.bench_pipeline.BenchPipelineConfig,
    "bench_quality": jobs.bench_quality.BenchQualityConfig,
    "cost_study": jobs.cost_study.CostStudyConfig,
}


def composed(job: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(job, overrides=list(overrides))


@pytest.fixture
def finished_run(tmp_path) -> Path:
    (tmp_path / "outputs").mkdir()  # what a corpus=run job checks for before it loads the model
    return tmp_path


@pytest.mark.parametrize("job", SCHEMAS)
def test_the_repos_conf_of_every_job_composes_onto_its_schema(job, finished_run):
    required = {  # values conf/ leaves to the user, or files that runs/ holds only after a README command
        "evaluate": [f"run_dir={finished_run}"],
        "train_exits": [f"run_dir={finished_run}"],
        "bench_finetune": [f"run_dir={finished_run}"],
        "bench_quality": ["report_only=true"],
        "cost_study": [f"runs=[{finished_run}]", f"out_dir={finished_run}/report"],
    }
    cfg = typed(composed(job, *required.get(job, [])), SCHEMAS[job])
    assert isinstance(cfg, SCHEMAS[job])


@pytest.mark.parametrize("job", SCHEMAS)
def test_each_schemas_defaults_are_its_conf_files_values(job):
    """The conf file is where a default is read and changed; the schema's must not drift from it (a job
    such as bench_finetune, which takes finetune's keys, gets them from the schema)."""
    conf = yaml.safe_load((CONF / f"{job}.yaml").read_text())
    schema = SCHEMAS[job]
    inherited = {
        f.name
        for base in schema.__bases__
        if dataclasses.is_dataclass(base)
        for f in dataclasses.fields(base)
    }
    defaults = {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(schema)
        if f.name not in inherited  # bench_finetune sets its own values for finetune's keys
    }
    for key, value in conf.items():
        if key not in defaults or isinstance(value, dict):
            continue  # groups' values sit on top of their schemas' defaults
        if isinstance(value, list) and any(isinstance(v, dict) for v in value):
            continue  # a sweep the conf file alone holds (bench_quality's runs)
        assert defaults[key] == value, f"{job}.{key}: the schema says {defaults[key]!r}, conf {value!r}"


@pytest.mark.parametrize(
    ("job", "override", "message"),
    [
        ("finetune", "+stepz=3", "stepz is not a config key; the top level takes: .*steps"),
        ("finetune", "+task.sytem=x", "task.sytem is not a config key; task takes: .*system"),
        ("evaluate", "+run_dri=x", "run_dri is not a config key; the top level takes: run_dir, boot"),
    ],
)
def test_an_unknown_key_is_refused_naming_it_and_the_valid_ones(job, override, message):
    with pytest.raises(ConfigCompositionException, match=override.lstrip("+").split("=")[0]):
        composed(job, override.lstrip("+"), "run_dir=x")  # Hydra's own check, at composition
    with pytest.raises(ValueError, match=message):  # `+` gets a key past Hydra: the job refuses it
        typed(composed(job, override, "run_dir=x"), SCHEMAS[job])


def test_an_unknown_key_inside_a_list_entry_is_named_with_its_index():
    run = {"name": "full", "strategy": "none", "target": 1.0, "basis": "layers"}
    with pytest.raises(ValueError, match=r"runs\[1\].kv_fil is not a config key; runs\[1\] takes: name"):
        typed({"runs": [run, run | {"kv_fil": "exact"}]}, jobs.bench_quality.BenchQualityConfig)


@pytest.mark.parametrize(
    ("job", "override", "message"),
    [
        ("finetune", "loss=ce", "loss='ce' is not valid; use one of: uls, distill"),
        ("finetune", "method=half", "method='half' is not valid; use one of: lora, full"),
        ("finetune", "strategy=fast", "strategy='fast' is not valid; use one of: none, uniform"),
        ("finetune", "corpus=web", "corpus='web' is not valid; use one of: bible, aclsum, run"),
        ("finetune", "precision=fp16", "precision='fp16' is not valid; use one of: auto, bf16, fp32"),
        ("finetune", "basis=tokens", "basis='tokens' is not valid; use one of: layers, measured"),
        ("finetune", "prefill=none", "prefill='none' is not valid; use one of: full, skip"),
        ("finetune", "corpus=run", "corpus=run needs run_dir="),
        ("finetune", "init_adapter=no.safetensors", "init_adapter='no.safetensors' does not exist"),
        (
            "bench_finetune",
            "compare=speed",
            "compare='speed' is not valid; use one of: prompt_grad, precision",
        ),
        ("evaluate", "bootstrap_samples=0", "bootstrap_samples=0 must be >= 1"),
        ("perplexity", "text=bible", "text='bible' is not valid; use one of: austen"),
        ("perplexity", "skip.strategy=fast", "skip.strategy='fast' is not valid"),
        ("bench_decode", "bases=[layers,tokens]", "bases='tokens' is not valid"),
        ("bench_quality", "only=[nothing]", r"only=\['nothing'\] names no entry of runs"),
    ],
)
def test_a_bad_value_is_refused_naming_the_key(job, override, message):
    required = {"evaluate": ["run_dir=x"], "bench_finetune": ["corpus=bible"]}
    cfg = composed(job, override, *required.get(job, []))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        typed(cfg, SCHEMAS[job])


def test_a_wrongly_typed_or_missing_value_is_refused_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="steps"):
        composed("finetune", "steps=many")
    with pytest.raises(
        ValueError, match="steps: Value 'many' of type 'str' could not be converted to Integer"
    ):
        typed({"steps": "many"}, jobs.finetune.FinetuneConfig)
    with pytest.raises(ValueError, match=r"run_dir is required and has no value; set it: run_dir=\.\.\."):
        typed(composed("evaluate"), jobs.evaluate.EvaluateConfig)


def test_a_job_stops_with_status_2_and_the_message(caplog):
    with pytest.raises(SystemExit) as stop:
        job_config(composed("finetune", "loss=ce"), jobs.finetune.FinetuneConfig)
    assert stop.value.code == 2
    assert "loss='ce' is not valid" in caplog.text


def test_a_config_sent_as_a_dict_comes_back_as_itself():
    """bench_pipeline hands its JobConfig to the bare-engine script as JSON (jobs.bare_engine)."""
    cfg = typed(composed("generate"), JobConfig)
    assert typed(dataclasses.asdict(cfg), JobConfig) == cfg
