"""The Hydra entry point as a user runs it: config errors, multirun, a driver or an actor killed mid-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from pipeline_helpers import corpus_rows, write_jsonl

from pipeline.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent


def cli(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.generate",
        "model=local",
        f"model.spec={model_dir}",
        "task=complete",
        "task.input_column=text",
        "task.max_new_tokens=6",
        "skip=uniform",
        "skip.basis=layers",
        "skip.full_depth_every=0",
        "data=files",
        f"data.path={data}",
        "data.id_column=doc",
        "cluster.threads_per_actor=1",
        f"output.dir={out}",
        "output.progress_every_s=0",
        *extra,
    ]


def run(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = os.environ | {"RAY_DEDUP_LOGS": "0"} | (env or {})
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=300, **kw)


def test_unknown_key_and_bad_value_name_the_key(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "c.jsonl", corpus_rows(2))
    bad_key = run(cli(tiny_model_dir, data, tmp_path / "a", "skip.speed=2"))
    assert bad_key.returncode != 0 and "speed" in bad_key.stderr + bad_key.stdout
    bad_value = run(cli(tiny_model_dir, data, tmp_path / "b", "skip.strategy=fast"))
    assert bad_value.returncode == 2
    assert "skip.strategy='fast' is not valid" in bad_value.stderr + bad_value.stdout
    assert not (tmp_path / "b" / "outputs").exists()


def test_a_sweep_over_a_key_missing_from_the_folder_name_gives_each_job_its_own_complete_run(
    tmp_path, tiny_model_dir
):
    data = write_jsonl(tmp_path / "c.jsonl", corpus_rows(5))
    args = cli(
        tiny_model_dir,
        data,
        tmp_path / "sweep",  # the folder name does not hold the target
        f"hydra.sweep.dir={tmp_path}/multirun",
        "skip.target_speedup=1.0,2.0",
    )
    result = run([*args[:3], "-m", *args[3:]])
    assert result.returncode == 0, result.stderr[-3000:]
    for value, kept in (("1.0", 8), ("2.0", 4)):
        run_dir = tmp_path / "sweep" / f"skip.target_speedup={value}"  # the job's swept values
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (
            summary["ids_check"]["ok"] and summary["rows_generated_now"] == 5 and summary["rows_resumed"] == 0
        )
        assert f"keep {kept}/8" in summary["plan"]


def test_killed_driver_resumes_without_loss_or_duplicates(tmp_path, tiny_model_dir):
    rows = corpus_rows(24)
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "run"
    args = cli(tiny_model_dir, data, out, "cluster.batch_size=1", "task.max_new_tokens=24")
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "outputs").glob("part-*.parquet"))) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    written = len(list((out / "outputs").glob("part-*.parquet")))
    assert 3 <= written < len(rows), "the kill should land mid-run"

    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ids_check"] == {"ok": True, "missing": 0, "duplicated": 0, "unexpected": 0}
    assert summary["rows_resumed"] >= 3
    assert summary["rows_resumed"] + summary["rows_generated_now"] == len(rows)
    counts = RunDir(out).output_ids()
    assert sorted(counts) == sorted(r["doc"] for r in rows) and set(counts.values()) == {1}
    assert not list((out / "outputs").glob(".tmp-*"))
    texts = pq.read_table(out / "outputs").column("generated_text").to_pylist()
    assert all(t is not None for t in texts)


def test_a_row_that_kills_its_actor_becomes_an_error_row_and_every_other_row_is_written_once(
    tmp_path, tiny_model_dir
):
    rows = corpus_rows(6)
    rows[3]["text"] = "POISON: generating this row kills the process"
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    faults = {
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "faults"), os.environ.get("PYTHONPATH", "")])
    }
    faults["SKIPENGINE_TEST_KILL_ON"] = "POISON"  # tests/faults/sitecustomize.py, in the actors
    result = run(cli(tiny_model_dir, data, tmp_path / "run", "cluster.batch_size=4"), env=faults)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ids_check"]["ok"] and summary["rows_error"] == 1 and summary["rows_ok"] == 5
    out = {r["id"]: r for r in pq.read_table(tmp_path / "run" / "outputs").to_pylist()}
    assert "killed its actor" in out["d003"]["error"] and out["d003"]["retryable"]
    assert all(out[r["doc"]]["error"] is None for r in rows if r["doc"] != "d003")
    assert set(RunDir(tmp_path / "run").output_ids().values()) == {1}


def test_bench_quality_names_missing_files_before_loading_anything(tmp_path):
    row = "{name: trained here, strategy: uniform, target: 2.0, basis: layers, adapter: runs/no.safetensors}"
    full = "{name: full depth, strategy: none, target: 1.0, basis: layers}"
    done = run([sys.executable, "-m", "jobs.bench_quality", f"runs=[{full},{row}]", f"out_dir={tmp_path}"])
    assert done.returncode != 0
    message = done.stderr + done.stdout
    assert "{'trained here': 'runs/no.safetensors'}" in message
    assert 'only=["full depth"]' in message
    assert not (tmp_path / "quality.jsonl").exists()
