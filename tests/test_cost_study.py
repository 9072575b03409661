"""jobs.cost_study on a real tiny sweep (2 targets, 2 batch sizes, 3 runs of the tiny model): the report's
numbers are the runs' own, a run without scores is scored or reported with the reason, an unfinished
folder is listed, a Hydra multirun folder leads to its jobs' run folders, and an existing report is not
overwritten."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from pipeline_helpers import TEXTS, corpus_rows, job, write_jsonl

from pipeline.cost_report import run_study
from pipeline.cost_study import CostStudyConfig, ProjectConfig, pareto
from pipeline.evaluate import evaluate_run
from pipeline.projection import project, throughput
from pipeline.run import run_job

SUMMARIZE = {"name": "summarize", "reference_column": "summary"}
# (batch size, target): two of each, but not full depth at batch 4, to keep the suite short (each run
# starts an actor); the batch-4 run then compares with full depth at batch 2
SWEEP = [(2, 1.0), (2, 2.0), (4, 2.0)]


def swept_name(batch: int, target: float) -> str:
    return f"cluster.batch_size={batch},skip.target_speedup={target}"  # as jobs.generate -m names it


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model_dir):
    """Three finished runs under sweep/, and two copies of one as a user may leave them: killed before it
    finished (no summary.json), and with its outputs deleted to save space (so it cannot be scored)."""
    root = tmp_path_factory.mktemp("study")
    # references in the tiny tokenizer's own words, so that ROUGE is not zero at full depth
    rows = [r | {"summary": " ".join(TEXTS)} for r in corpus_rows(4)]
    data = write_jsonl(root / "c.jsonl", rows)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    try:
        for batch, target in SWEEP:
            out = root / "sweep" / swept_name(batch, target)
            skip = {"target_speedup": target, "full_depth_every": 1}
            run_job(job(tiny_model_dir, data, out, task=SUMMARIZE, skip=skip, cluster={"batch_size": batch}))
    finally:
        ray.shutdown()
    first = root / "sweep" / swept_name(2, 1.0)
    evaluate_run(first, bootstrap_samples=20)  # scored before the study; the other two are not
    shutil.copytree(
        first, root / "sweep" / "crashed", ignore=shutil.ignore_patterns("summary.*", "metrics.*")
    )
    shutil.copytree(first, root / "sweep" / "pruned", ignore=shutil.ignore_patterns("outputs", "metrics.*"))
    return root


def study(root, **kw) -> CostStudyConfig:
    cfg = CostStudyConfig(
        out_dir=str(root / "report"), bootstrap_samples=20, prices={"cpu": None, "H100": 3.0}
    )
    cfg.project = ProjectConfig(actors=[1, 4], rows=1000)
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def test_the_report_holds_every_run_with_its_own_numbers(sweep):
    cfg = study(sweep, sweep_dir=str(sweep / "sweep"), runs=[str(sweep / "sweep" / swept_name(4, 2.0))])
    out, _ = run_study(cfg)
    table = {r["run_dir"].split("/")[-1]: r for r in pq.read_table(out / "runs.parquet").to_pylist()}
    # every folder once: the four runs (one also listed in runs=), the unfinished one, the unscored one
    assert sorted(table) == sorted([swept_name(b, t) for b, t in SWEEP] + ["crashed", "pruned"])

    for batch, target in SWEEP:
        row, path = table[swept_name(batch, target)], sweep / "sweep" / swept_name(batch, target)
        summary = json.loads((path / "summary.json").read_text())
        metrics = json.loads((path / "metrics.json").read_text())  # written by the study where missing
        assert row["status"] == "finished" and row["batch_size"] == batch and row["target_speedup"] == target
        assert (
            row["strategy"] == "uniform" and row["kept_layers"] == int(8 / target) and row["num_layers"] == 8
        )
        assert row["full_depth"] == (target == 1.0)
        for column, key in [
            ("tokens_per_s", "tokens_per_s"),
            ("wall_s", "wall_s"),
            ("startup_s", "startup_s"),
            ("device_hours", "device_hours"),
            ("measured_decode_speedup", "measured_decode_speedup"),
            ("measured_speedup", "measured_speedup"),
            ("predicted_speedup", "predicted_speedup"),
            ("tokens_out", "tokens_out_now"),
            ("num_actors", "num_actors"),
            ("plan", "plan"),
            ("device", "device"),
        ]:
            assert row[column] == summary[key], column
        # a full-depth plan is not rerun at full depth: nothing to measure
        assert (row["measured_decode_speedup"] is None) == (target == 1.0) and row["device"].startswith("cpu")
        assert row["device_hours_per_1m_tokens"] == pytest.approx(
            summary["device_hours"] / summary["tokens_out_now"] * 1e6
        )
        # the cpu's price is null: no cost, not a cost of 0
        assert row["price_per_device_hour"] is None and row["cost_per_1m_tokens"] is None
        assert row["quality_metric"] == "rougeL" and row["quality"] == metrics["metrics"]["rougeL"]["score"]
        assert row["loop_rate"] == metrics["metrics"]["loop_rate"]["score"]
        assert row["metrics_source"] == (
            "metrics.json" if (batch, target) == (2, 1.0) else "evaluated by this study"
        )
        full = table[swept_name(2, 1.0)]  # the sweep's one full-depth run
        assert row["full_depth_run"] == full["run_dir"] and full["quality"] > 0
        assert row["quality_pct_of_full"] == pytest.approx(100 * row["quality"] / full["quality"])
        # the linear model gives back the measured run's wall time at its own actors and rows
        assert project(throughput(row), row["num_actors"], row["rows_generated"], None)[
            "projected_wall_s"
        ] == pytest.approx(summary["wall_s"])

    assert table["crashed"]["status"] == "unfinished" and table["crashed"]["tokens_per_s"] is None
    unscored = table["pruned"]  # kept, with its measured numbers and the reason it has no score
    assert unscored["status"] == "finished" and unscored["quality"] is None and unscored["tokens_per_s"] > 0
    assert "is not a finished run (no config.yaml or no outputs/)" in unscored["quality_missing"]

    report = (out / "report.md").read_text()
    assert "## Unfinished runs\n\n- crashed: no summary.json" in report
    assert "## Runs without a quality score\n\n- pruned: cannot be scored" in report
    some = table[swept_name(4, 2.0)]
    assert f"| {some['tokens_per_s']:.4g} | {some['wall_s']:.4g} |" in report
    page = (out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 3 and ".png'" not in page
    projected = pq.read_table(out / "projection.parquet").to_pylist()
    assert len(projected) == 4 * 2  # each run that timed its generation, at 1 and 4 actors
    assert {(p["actors"], p["beyond_measured"]) for p in projected} == {(1, False), (4, True)}
    assert "not measured beyond 1 actor(s)" in report


def test_a_hydra_multirun_folder_leads_to_its_runs_priced_and_an_existing_report_is_kept(sweep, tmp_path):
    # a real Hydra multirun over the sweep's keys into its output.dir; its batch-4 full-depth job made no
    # run folder
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "c.yaml").write_text(
        f"output: {{dir: {sweep / 'sweep'}}}\ncluster: {{batch_size: 8}}\nskip: {{target_speedup: 1.0}}\n"
        "hydra: {job: {chdir: false}}\n"
    )
    (tmp_path / "app.py").write_text(
        textwrap.dedent(
            """
            import hydra
            hydra.main(config_path="conf", config_name="c", version_base="1.3")(lambda cfg: None)()
            """
        )
    )
    args = [
        "-m",
        "cluster.batch_size=2,4",
        "skip.target_speedup=1.0,2.0",
        f"hydra.sweep.dir={tmp_path}/multirun",
    ]
    done = subprocess.run([sys.executable, "app.py", *args], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    cfg = study(sweep, sweep_dir=str(tmp_path / "multirun"), prices={"cpu": 2.0}, out_dir=str(tmp_path / "r"))
    out, rows = run_study(cfg)
    by_name = {r["run_dir"].split("/")[-1]: r for r in rows}
    assert sorted(by_name) == sorted(swept_name(b, t) for b in (2, 4) for t in (1.0, 2.0))
    for batch, target in SWEEP:
        row = by_name[swept_name(batch, target)]
        assert row["price_source"] == "prices.cpu" and row["price_per_device_hour"] == 2.0
        assert row["cost_per_1m_tokens"] == pytest.approx(2.0 * row["device_hours"] / row["tokens_out"] * 1e6)
    missing = by_name[swept_name(4, 1.0)]
    assert missing["status"] == "unfinished" and "made no run folder" in missing["note"]
    front = [r for r in rows if r["on_pareto_frontier"]]
    assert front and all(r["cost_per_1m_tokens"] is not None for r in front)

    (out / "report.md").write_text("kept")
    with pytest.raises(FileExistsError, match=r"out_dir=.* is not empty; set overwrite=true"):
        run_study(cfg)
    assert (out / "report.md").read_text() == "kept"
    cfg.overwrite = True
    run_study(cfg)
    assert (out / "report.md").read_text().startswith("# Cost study")


def test_pareto_keeps_only_points_nothing_beats():
    # (cost, quality): (2, 50) is beaten by (1, 60); (3, 60) by (1, 60)
    assert pareto([(1, 60), (2, 50), (3, 60), (0.5, 40), (4, 90)]) == [3, 0, 4]


def test_unknown_keys_and_bad_values_are_refused_naming_the_key(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    import jobs.cost_study  # noqa: F401  (registers the schema)

    conf = str(Path(jobs.cost_study.__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="project.speed"):
            compose("cost_study", overrides=["out_dir=x", "project.speed=2"])
        with pytest.raises(ConfigCompositionException, match="project.rows"):
            compose("cost_study", overrides=["out_dir=x", "project.rows=many"])
    with pytest.raises(ValueError, match="nothing to study"):
        CostStudyConfig(out_dir=str(tmp_path)).validate()
    with pytest.raises(FileNotFoundError, match=r"runs\[0\]='/no/run'"):
        CostStudyConfig(out_dir=str(tmp_path), runs=["/no/run"]).validate()
    with pytest.raises(ValueError, match=r"prices.cpu=-1.0 must be >= 0"):
        CostStudyConfig(out_dir=str(tmp_path), runs=[str(tmp_path)], prices={"cpu": -1.0}).validate()


def test_the_docs_config_reference_is_current():
    from pipeline.config_reference import COST_STUDY_DOC, END, START, cost_study_reference

    block = COST_STUDY_DOC.read_text().split(START, 1)[1].split(END, 1)[0]
    assert block == cost_study_reference(), "run `python -m pipeline.config_reference --write`"
