"""A real two-node Ray cluster on this machine (a head and a second raylet, loopback only): the job runs
across both nodes with cluster.kind=existing and gives the same outputs as a local run."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from pipeline_helpers import corpus_rows, job, write_jsonl
from ray.cluster_utils import Cluster

from pipeline.run import run_job
from skipengine import Engine, SamplingParams, load_model, make_plan


def read_outputs(run_dir) -> list[dict]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted((run_dir / "outputs").glob("part-*.parquet")))
    return sorted(table.to_pylist(), key=lambda r: r["id"])


@pytest.fixture
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()
    # 3 logical CPUs per node and 2 per actor: one actor fits on each node, with a CPU left for reads
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    # the pool starts dispatching as soon as one actor is up, and gives each block to the least busy
    # actor: with tiny work the first actor is idle again before the next block arrives and takes them
    # all. So this test waits for both actors and gives each batch real work (task.max_new_tokens).
    context = ray.data.DataContext.get_current()
    before, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 120
    yield cluster
    context.wait_for_min_actors_s = before
    cluster.shutdown()


def test_job_runs_on_both_nodes_with_local_outputs(tmp_path, tiny_model_dir, two_nodes):
    data = write_jsonl(tmp_path / "c.jsonl", corpus_rows(24))
    distributed = job(
        tiny_model_dir,
        data,
        tmp_path / "cluster",
        cluster={
            "kind": "existing",
            "address": two_nodes.address,
            "num_actors": 2,
            "cpus_per_actor": 2,
            "batch_size": 2,
        },
        task={"max_new_tokens": 128},
    )
    summary = run_job(distributed)
    assert summary["ids_check"]["ok"] and summary["rows_ok"] == 24
    out = read_outputs(tmp_path / "cluster")
    nodes = {r["node"] for r in out}
    placement = sorted({(r["actor"], r["node"]) for r in out})
    assert len(nodes) == 2, f"rows ran on {len(nodes)} node(s): {placement}"
    # the same text as one process generating every row at once
    model, tokenizer = load_model(str(tiny_model_dir))
    texts = {r["doc"]: r["text"] for r in corpus_rows(24)}
    plan = make_plan(8, "uniform", 2.0)
    expected = (
        Engine(model, tokenizer).generate([texts[r["id"]] for r in out], plan, SamplingParams(128)).rows
    )
    assert [r["generated_text"] for r in out] == [e.text for e in expected]
