"""The Ray Data job on a tiny local model: sources, bad rows, validation, resume, per-batch stats."""

import json
import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import ray
from pipeline_helpers import corpus_rows, job, write_jsonl

from pipeline import sources
from pipeline.config import DataConfig
from pipeline.run import run_job
from pipeline.rundir import RunDir
from pipeline.sources import content_id
from skipengine import Engine, SamplingParams, load_model, make_plan


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    yield
    ray.shutdown()


def outputs(run_dir) -> list[dict]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted((run_dir / "outputs").glob("part-*.parquet")))
    return sorted(table.to_pylist(), key=lambda r: r["id"])


def test_jsonl_job_matches_the_bare_engine(tmp_path, tiny_model_dir):
    rows = corpus_rows(10)
    cfg = job(
        tiny_model_dir,
        write_jsonl(tmp_path / "c.jsonl", rows),
        tmp_path / "run",
        data={"keep_columns": ["text"]},
    )
    summary = run_job(cfg)
    out = outputs(tmp_path / "run")
    assert [r["id"] for r in out] == [r["doc"] for r in rows]
    assert summary["ids_check"]["ok"] and summary["rows_ok"] == 10 and summary["rows_error"] == 0
    assert all(r["error"] is None and r["finish_reason"] in ("stop", "length") for r in out)
    assert out[0]["text"] == rows[0]["text"] and out[0]["plan"].startswith("uniform")

    model, tok = load_model(str(tiny_model_dir))
    engine = Engine(model, tok)
    plan = make_plan(8, "uniform", 2.0, basis="layers")
    expected = engine.generate([r["text"] for r in rows], plan, SamplingParams(max_new_tokens=6)).rows
    assert [r["generated_text"] for r in out] == [e.text for e in expected]

    stats = pq.read_table(next((tmp_path / "run" / "stats").glob("*.parquet"))).to_pylist()
    assert sum(s["rows"] for s in stats) == 10 and len(stats) == 3  # batches of 4, 4, 2
    assert all(s["decode_layers_per_token"] == 4 and s["prefill_layers_per_token"] == 8 for s in stats)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["rows_in"] == 10 and (tmp_path / "run" / "summary.parquet").exists()
    assert (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "hf_disk", "folder"])
def test_every_source_format_reads_to_the_same_rows_and_ids(tmp_path, fmt):
    rows = corpus_rows(6)
    table = pa.Table.from_pylist(rows)
    if fmt == "parquet":
        path = tmp_path / "c.parquet"
        pq.write_table(table, path)
    elif fmt == "csv":
        path = tmp_path / "c.csv"
        pacsv.write_csv(table, path)
    elif fmt == "hf_disk":
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:  # a folder of JSONL shards
        path = tmp_path / "shards"
        path.mkdir()
        write_jsonl(path / "a.jsonl", rows[:3])
        write_jsonl(path / "b.jsonl", rows[3:])
    # what the actors get (generation itself does not depend on the format: the jobs above)
    data = DataConfig(name="t", path=str(path), id_column="doc")
    read = sources.with_ids(sources.read_all(data), data).take_all()
    assert sorted((r["id"], r["text"]) for r in read) == [(r["doc"], r["text"]) for r in rows]


def test_bad_rows_get_error_rows_and_never_kill_the_job(tmp_path, tiny_model_dir):
    rows = corpus_rows(4) + [
        {"doc": "null", "text": None},
        {"doc": "empty", "text": ""},
        {"doc": "blank", "text": "   \n"},
        {"doc": "long", "text": "In the beginning God created the heaven and the earth. " * 40},
    ]
    cfg = job(tiny_model_dir, write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "run")
    summary = run_job(cfg)
    out = {r["id"]: r for r in outputs(tmp_path / "run")}
    assert set(out) == {r["doc"] for r in rows} and summary["ids_check"]["ok"]
    assert (
        "null" in out["null"]["error"]
        and "empty" in out["empty"]["error"]
        and "empty" in out["blank"]["error"]
    )
    assert "context window" in out["long"]["error"]
    assert all(out[r["doc"]]["error"] is None for r in rows[:4])
    assert summary["rows_error"] == 4 and summary["rows_ok"] == 4

    # truncation instead of an error, by option
    cfg = job(tiny_model_dir, tmp_path / "c.jsonl", tmp_path / "run2", task={"on_too_long": "truncate"})
    run_job(cfg)
    long = {r["id"]: r for r in outputs(tmp_path / "run2")}["long"]
    assert long["error"] is None and long["truncated"]


def test_non_text_input_column_fails_rows_not_the_job(tmp_path, tiny_model_dir):
    path = tmp_path / "nums.parquet"
    pq.write_table(pa.table({"doc": ["a", "b"], "text": [1, 2]}), path)
    summary = run_job(job(tiny_model_dir, path, tmp_path / "run"))
    assert summary["rows_error"] == 2 and all("not text" in r["error"] for r in outputs(tmp_path / "run"))


def test_content_hash_ids_are_stable_and_duplicates_are_refused(tmp_path, tiny_model_dir):
    rows = [{"text": r["text"]} for r in corpus_rows(5)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    first = run_job(job(tiny_model_dir, path, tmp_path / "a", data={"id_column": None}))
    assert first["ids_check"]["ok"] and first["rows_in"] == 5
    # the id is the row's content alone: the same in any run, in any process
    assert sorted(r["id"] for r in outputs(tmp_path / "a")) == sorted(map(content_id, rows))
    write_jsonl(path, rows + [rows[2]])
    with pytest.raises(ValueError, match=r"rows \[2, 5\] .* are identical"):
        run_job(job(tiny_model_dir, path, tmp_path / "c", data={"id_column": None}))


@pytest.mark.parametrize(
    "groups, error, message",
    [
        ({"skip": {"strategy": "fast"}}, ValueError, "skip.strategy='fast' is not valid"),
        ({"skip": {"target_speedup": 9.0}}, ValueError, "the largest target is 4"),
        ({"task": {"input_column": "body"}}, ValueError, "task.input_column='body' is not a column"),
        ({"data": {"keep_columns": ["x"]}}, ValueError, r"data.keep_columns\[0\]='x' is not a column"),
        (
            {"data": {"path": "/no/such/corpus"}},
            FileNotFoundError,
            "data.path='/no/such/corpus' does not exist",
        ),
        ({"data": {"id_column": "text", "limit": 0}}, ValueError, "data.limit=0"),
        ({"output": {"mode": "append"}}, ValueError, "output.mode='append' is not valid"),
        ({"task": {"template": "no slot"}}, ValueError, "must contain {input}"),
        ({"cluster": {"kind": "existing", "address": None}}, ValueError, "needs cluster.address"),
        ({"cluster": {"memory_per_actor_gb": 4096.0}}, ValueError, r"cluster.memory_per_actor_gb=4096.0 x"),
        ({"model": {"actor_memory_gb": 4096.0}}, ValueError, r"model.actor_memory_gb=4096.0 x"),
    ],
)
def test_bad_config_stops_before_any_actor(tmp_path, tiny_model_dir, groups, error, message):
    path = write_jsonl(tmp_path / "c.jsonl", corpus_rows(3))
    with pytest.raises(error, match=message):
        run_job(job(tiny_model_dir, path, tmp_path / "run", **groups))
    assert not RunDir(tmp_path / "run").has_results()


def test_output_modes_protect_existing_results(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "c.jsonl", corpus_rows(4))
    run_job(job(tiny_model_dir, path, tmp_path / "run"))
    with pytest.raises(FileExistsError, match="output.mode=resume"):
        run_job(job(tiny_model_dir, path, tmp_path / "run", output={"mode": "error"}))
    with pytest.raises(ValueError, match=r"different job \(skip.target_speedup: 2.0 -> 1.5\)"):
        run_job(job(tiny_model_dir, path, tmp_path / "run", skip={"target_speedup": 1.5}))
    with pytest.raises(ValueError, match=r"data.keep_columns\[0\]='error' clashes with the output column"):
        run_job(job(tiny_model_dir, path, tmp_path / "run", data={"keep_columns": ["error"]}))
    with pytest.raises(ValueError, match="model.dtype='float12' is not valid"):  # before overwrite deletes
        run_job(
            job(
                tiny_model_dir,
                path,
                tmp_path / "run",
                model={"dtype": "float12"},
                output={"mode": "overwrite"},
            )
        )
    again = run_job(job(tiny_model_dir, path, tmp_path / "run"))  # resume: nothing left to do
    assert again["rows_resumed"] == 4 and again["rows_generated_now"] == 0 and again["ids_check"]["ok"]
    over = run_job(
        job(
            tiny_model_dir, path, tmp_path / "run", skip={"target_speedup": 1.5}, output={"mode": "overwrite"}
        )
    )
    assert over["rows_resumed"] == 0 and over["rows_generated_now"] == 4


def test_resume_generates_only_missing_ids(tmp_path, tiny_model_dir):
    rows = corpus_rows(10)
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    partial = tmp_path / "partial"
    run_job(job(tiny_model_dir, path, partial, data={"limit": 4}))
    # the limit lifted: only the 6 new rows are generated
    grown = run_job(job(tiny_model_dir, path, partial))
    assert grown["rows_resumed"] == 4 and grown["rows_generated_now"] == 6
    assert len(outputs(partial)) == 10 and RunDir(partial).output_ids().most_common(1)[0][1] == 1
    model, tok = load_model(str(tiny_model_dir))
    plan = make_plan(8, "uniform", 2.0)
    expected = Engine(model, tok).generate([r["text"] for r in rows], plan, SamplingParams(max_new_tokens=6))
    assert [r["generated_text"] for r in outputs(partial)] == [e.text for e in expected.rows]
    # a shrunk limit would leave outputs for ids outside the corpus: refused
    with pytest.raises(ValueError, match="ids are not in this corpus"):
        run_job(job(tiny_model_dir, path, partial, data={"limit": 2}))
    # a run folder whose outputs were partly lost: only the lost ids are redone
    lost = sorted((partial / "outputs").glob("part-*.parquet"))[0]
    lost_rows = pq.read_metadata(lost).num_rows
    lost.unlink()
    summary = run_job(job(tiny_model_dir, path, partial))
    assert summary["rows_generated_now"] == lost_rows and summary["rows_resumed"] == 10 - lost_rows
    assert summary["ids_check"]["ok"] and len(outputs(partial)) == 10


class PoisonedEngine:
    """Fault injection: the real engine, except that any batch holding the poison prompt raises."""

    def __init__(self, engine, poison: list[int]):
        self.engine, self.poison, self.calls = engine, poison, []

    def __getattr__(self, name):  # everything but generate() is the real engine's
        return getattr(self.engine, name)

    def generate(self, prompts, *args, **kwargs):
        self.calls.append(len(prompts))
        if self.poison in prompts:
            raise RuntimeError("simulated kernel failure")
        return self.engine.generate(prompts, *args, **kwargs)


def test_a_failing_batch_is_retried_then_split_down_to_the_bad_row(tmp_path, tiny_model_dir):
    from pipeline.generator import Generator
    from pipeline.planning import plan_from_config
    from pipeline.sources import assign_ids

    rows = corpus_rows(8)
    cfg = job(tiny_model_dir, tmp_path, tmp_path / "run", cluster={"batch_size": 8, "max_batch_retries": 1})
    (tmp_path / "run" / "outputs").mkdir(parents=True)
    generator = Generator(cfg, str(tmp_path / "run" / "outputs"), plan_from_config(cfg, []))
    clean = generator.engine
    poison = generator.prompts.build(rows[5]["text"]).ids
    generator.engine = PoisonedEngine(clean, poison)
    batch = assign_ids(pa.Table.from_pylist(rows), "doc")
    stats = generator(batch).to_pylist()[0]
    assert stats["rows"] == 8 and stats["rows_error"] == 1 and stats["rows_ok"] == 7
    out = {r["id"]: r for r in outputs(tmp_path / "run")}
    assert "simulated kernel failure" in out["d005"]["error"] and out["d005"]["retryable"] is True
    assert {out[r["doc"]]["retryable"] for r in rows if r["doc"] != "d005"} == {None}  # null: no error
    assert all(out[r["doc"]]["error"] is None for r in rows if r["doc"] != "d005")
    # retried once at full size, then halves: 8, 8, 4 (ok) + 4, 4, 2 (ok) + 2, 2, 1, 1 (bad, bad) + 1 (ok)
    assert generator.engine.calls[:2] == [8, 8] and generator.engine.calls.count(1) == 3
    expected = clean.generate(
        [generator.prompts.build(r["text"]).ids for r in rows], generator.plan, generator.sampling
    )
    for row, exp in zip(rows, expected.rows, strict=True):
        if row["doc"] != "d005":
            assert out[row["doc"]]["generated_text"] == exp.text


@pytest.mark.parametrize("every, measured_batches", [(1, 3), (2, 2), (0, 0)])
def test_full_depth_reruns_measure_the_achieved_speedup_on_the_jobs_own_rows(
    tmp_path, tiny_model_dir, every, measured_batches
):
    cfg = job(tiny_model_dir, write_jsonl(tmp_path / "c.jsonl", corpus_rows(10)), tmp_path / "run")
    cfg.skip.full_depth_every = every
    summary = run_job(cfg)
    stats = pq.read_table(tmp_path / "run" / "stats").to_pylist()  # batches of 4, 4, 2 on one actor
    measured = [s for s in stats if s["measured_speedup"] is not None]
    assert summary["measured_batches"] == len(measured) == measured_batches
    assert all(s["measured_decode_speedup"] > 0 and s["full_depth_s"] > 0 for s in measured)
    assert (summary["measured_speedup"] is None) == (measured_batches == 0)
    assert len(outputs(tmp_path / "run")) == 10  # the full-depth reruns write nothing


def test_a_second_job_on_a_folder_in_use_is_refused_at_once_naming_the_holder(tmp_path, tiny_model_dir):
    cfg = job(tiny_model_dir, write_jsonl(tmp_path / "c.jsonl", corpus_rows(4)), tmp_path / "run")
    with RunDir(tmp_path / "run").locked():
        with pytest.raises(FileExistsError, match=rf"in use by another job \(pid {os.getpid()} on "):
            run_job(cfg)
        assert not (tmp_path / "run" / "outputs").exists()
    summary = run_job(cfg)  # released: the folder is free again
    assert summary["rows_ok"] == 4 and not (tmp_path / "run" / ".lock.holder").exists()


@pytest.mark.parametrize("price", [0.0, 2.5])
def test_cost_is_null_without_a_price_and_device_hours_count_each_actors_gpus(
    tmp_path, tiny_model_dir, price
):
    from pipeline.run import summarize

    cfg = job(tiny_model_dir, tmp_path, tmp_path / "run")
    (tmp_path / "run").mkdir()
    cfg.output.price_per_device_hour, cfg.cluster.num_actors, cfg.cluster.gpus_per_actor = price, 2, 4
    summary = summarize(cfg, RunDir(tmp_path / "run"), [], 0, [], wall=3600.0)
    assert summary["device_hours"] == pytest.approx(8.0)  # 1 hour x 2 actors x 4 GPUs
    stats = [
        {
            "tokens_out": 2_000_000,
            "rows": 1,
            "decode_s": 1.0,
            "achieved_layer_speedup": 1.0,
            "plan": "p",
            "predicted_speedup": 1.0,
        }
    ]
    summary = summarize(cfg, RunDir(tmp_path / "run"), [], 0, stats, wall=3600.0)
    assert summary["cost_per_1m_tokens"] == (None if price == 0 else pytest.approx(2.5 * 8 / 2))


def test_every_part_file_has_the_same_schema_when_a_batch_is_all_null(tmp_path, tiny_model_dir):
    rows = [r | {"note": None if i < 4 else f"n{i}"} for i, r in enumerate(corpus_rows(8))]
    cfg = job(
        tiny_model_dir,
        write_jsonl(tmp_path / "c.jsonl", rows),
        tmp_path / "run",
        data={"keep_columns": ["note"]},
    )
    run_job(cfg)
    schemas = {pq.read_schema(p) for p in (tmp_path / "run" / "outputs").glob("part-*.parquet")}
    note = next(iter(schemas)).field("note").type
    assert len(schemas) == 1 and (pa.types.is_string(note) or pa.types.is_large_string(note))


def test_a_measured_plan_is_built_once_reused_on_resume_and_a_failing_one_deletes_nothing(
    tmp_path, tiny_model_dir
):
    from pipeline.planning import RunPlan

    data = write_jsonl(tmp_path / "c.jsonl", corpus_rows(6))
    cfg = job(tiny_model_dir, data, tmp_path / "run", skip={"basis": "measured", "target_speedup": 1.15})
    cfg.data.limit = 4
    run_job(cfg)
    written = (tmp_path / "run" / "plan.json").read_text()
    plan = RunPlan.from_json(written)
    measured = plan.calibration
    assert measured["batch_size"] == 4 and measured["rows"] == 4 and measured["device"].startswith("cpu")
    assert plan.plan.predicted_speedup >= 1.15 and plan.plan.basis == "measured"
    assert any(m["num_kept"] == plan.plan.num_kept for m in measured["measured"])
    # a resume on another batch size takes plan.json as it is: every row, old and new, has the one plan
    cfg.data.limit, cfg.cluster.batch_size = None, 2
    summary = run_job(cfg)
    assert (tmp_path / "run" / "plan.json").read_text() == written and summary["rows_generated_now"] == 2
    assert {r["plan"] for r in outputs(tmp_path / "run")} == {str(plan.plan)}
    assert summary["plan"] == str(plan.plan) and summary["plan_measured_on"].startswith("4 rows, cpu")
    # a plan that cannot be built stops the job before output.mode=overwrite deletes anything
    before = sorted(p.name for p in (tmp_path / "run" / "outputs").iterdir())
    # (measured speedups depend on where rows stop, so the unreachable target is one no layer count meets)
    cfg.output.mode, cfg.skip.basis, cfg.skip.target_speedup = "overwrite", "layers", 9.0
    with pytest.raises(ValueError, match="the largest target is 4"):
        run_job(cfg)
    assert sorted(p.name for p in (tmp_path / "run" / "outputs").iterdir()) == before
    assert (tmp_path / "run" / "plan.json").read_text() == written


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        (b'{"doc": "d2", "text": "no closing brace"\n', "is not valid JSON"),
        (b'{"doc": "d2", "text": "caf\xe9"}\n', "is not valid UTF-8"),
        (b'{"doc": "d2", "text": 7}\n', "column 'text' is a number here and text at"),
    ],
)
def test_a_malformed_jsonl_line_is_named_by_file_and_line_before_any_actor_starts(
    tmp_path, tiny_model_dir, bad_line, problem
):
    path = write_jsonl(tmp_path / "c.jsonl", corpus_rows(2))
    path.write_bytes(path.read_bytes() + bad_line)
    with pytest.raises(ValueError, match=rf"c.jsonl line 3:? {problem}"):
        run_job(job(tiny_model_dir, path, tmp_path / "run"))
    assert not (tmp_path / "run" / "outputs").exists()


def test_resume_regenerates_retryable_errors_and_refuses_or_regenerates_changed_rows(
    tmp_path, tiny_model_dir
):
    rows = corpus_rows(4)
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = job(tiny_model_dir, data, tmp_path / "run")
    run_job(cfg)
    first = {r["id"]: r for r in outputs(tmp_path / "run")}
    # what an out-of-memory failure of row d001 would have left: its row, with a retryable error
    part = next(p for p in (tmp_path / "run" / "outputs").glob("part-*.parquet"))
    table = pq.read_table(part).to_pylist()
    for row in table:
        if row["id"] == "d001":
            row.update(
                error="generation failed: OutOfMemoryError: simulated", retryable=True, generated_text=None
            )
    pq.write_table(pa.Table.from_pylist(table, pq.read_schema(part)), part)
    assert run_job(cfg)["rows_error"] == 1  # a plain resume keeps it
    cfg.output.retry_errors = True
    summary = run_job(cfg)
    out = {r["id"]: r for r in outputs(tmp_path / "run")}
    assert summary["rows_generated_now"] == 1 and summary["ids_check"]["ok"] and summary["rows_error"] == 0
    assert out["d001"]["generated_text"] == first["d001"]["generated_text"]

    rows[2]["text"] = "A text that changed after it was generated"
    write_jsonl(data, rows)
    with pytest.raises(ValueError, match=r"input text of 1 done rows changed .*'d002'.*regenerate_changed"):
        run_job(cfg)
    cfg.output.regenerate_changed = True
    summary = run_job(cfg)
    out = {r["id"]: r for r in outputs(tmp_path / "run")}
    assert summary["rows_generated_now"] == 1 and summary["ids_check"]["ok"] and len(out) == 4
    assert out["d002"]["prompt"].startswith("A text that changed")
