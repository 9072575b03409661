"""The run folder: outputs/ and stats/ Parquet, summary.json (+ Parquet twin), config.yaml and plan.json
(the run's one plan: pipeline.planning).

A folder is only ever continued by the same job: resuming with a different model, task, plan or corpus
would mix results, so it is refused. Overwriting happens only when output.mode=overwrite says so.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from filelock import FileLock, Timeout

ARTIFACTS = (
    "outputs",
    "stats",
    "summary.json",
    "summary.parquet",
    "config.yaml",
    "metrics.json",
    "plan.json",
    "attempts",
    "search.json",  # runs before plan.json kept the layer search here
)
SAME_JOB_KEYS = ("model", "task", "skip", "data")  # what makes the outputs what they are
# data.limit may grow: the rows already done stay valid (a shrinking limit is refused by the id check);
# the model's memory reservation is scheduling, not output
MAY_CHANGE = {("data", "limit"), ("model", "actor_memory_gb")}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.outputs = self.path / "outputs"
        self.stats = self.path / "stats"
        self.config = self.path / "config.yaml"
        self.summary = self.path / "summary.json"
        self.plan = self.path / "plan.json"
        self.attempts = self.path / "attempts"  # pipeline.attempts: marks that outlive a dead actor
        self.holder = self.path / ".lock.holder"  # who holds the folder's lock, for the refusal message

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder for one job: a second job on it is refused at once, naming the holder."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path / ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = self.holder.read_text().strip() if self.holder.exists() else "unknown"
            raise FileExistsError(
                f"output.dir={str(self.path)!r} is in use by another job ({holder}); wait for it to end or "
                "choose another output.dir"
            ) from None
        try:
            self.holder.write_text(f"pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()}\n")
            yield
        finally:
            self.holder.unlink(missing_ok=True)
            lock.release()

    def has_results(self) -> bool:
        return self.outputs.exists() and any(self.outputs.glob("part-*.parquet"))

    def check(self, mode: str, config: dict) -> None:
        """Refuses what output.mode does not allow, before anything is built or deleted."""
        if not (self.has_results() or self.config.exists()):
            return
        if mode == "error":
            raise FileExistsError(
                f"output.dir={str(self.path)!r} already holds a run; set output.mode=resume to continue "
                "it, output.mode=overwrite to replace it, or choose another output.dir"
            )
        if mode == "resume" and self.config.exists():
            self._check_same_job(config)

    def prepare(self, mode: str, config: dict) -> None:
        """Create or continue the folder under output.mode (checked by `check`); overwrite deletes here."""
        self.check(mode, config)
        if mode == "overwrite":
            for name in ARTIFACTS:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.stats.mkdir(parents=True, exist_ok=True)
        for stale in self.outputs.glob(".tmp-*"):  # a writer killed mid-file; its batch will be redone
            stale.unlink()
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))

    def _check_same_job(self, config: dict) -> None:
        before = yaml.safe_load(self.config.read_text()) or {}
        changed = [
            f"{group}.{key}: {before.get(group, {}).get(key)!r} -> {config[group].get(key)!r}"
            for group in SAME_JOB_KEYS
            for key in sorted(set(config[group]) | set(before.get(group, {})))
            if before.get(group, {}).get(key) != config[group].get(key) and (group, key) not in MAY_CHANGE
        ]
        if changed:
            raise ValueError(
                f"output.dir={str(self.path)!r} holds results of a different job ({'; '.join(changed)}); "
                "use another output.dir, or output.mode=overwrite to replace them"
            )

    def output_rows(self, columns: list[str]) -> pa.Table:
        """These columns of every output row (a column a part file lacks reads as null)."""
        parts = []
        for part in sorted(self.outputs.glob("part-*.parquet")):
            table = pq.read_table(part)
            parts.append(
                pa.table(
                    {c: table.column(c) if c in table.column_names else pa.nulls(len(table)) for c in columns}
                )
            )
        return (
            pa.concat_tables(parts, promote_options="permissive")
            if parts
            else pa.table({c: [] for c in columns})
        )

    def drop_rows(self, ids: set[str]) -> None:
        """Removes these ids' output rows, so that the run generates them again; each part file is replaced
        atomically (a crash leaves every file whole, and dropping again finishes the job)."""
        if not ids:
            return
        wanted = pa.array(sorted(ids), pa.string())
        for part in sorted(self.outputs.glob("part-*.parquet")):
            table = pq.read_table(part)
            drop = pc.is_in(table.column("id"), value_set=wanted)
            if not pc.any(drop).as_py():
                continue
            kept = table.filter(pc.invert(drop))
            if len(kept) == 0:
                part.unlink()
                continue
            tmp = part.with_name(f".tmp-{part.name}")
            pq.write_table(kept, tmp)
            os.replace(tmp, part)

    def output_ids(self) -> Counter:
        """How many output rows each id has (more than one would be a duplicate)."""
        counts: Counter = Counter()
        for part in sorted(self.outputs.glob("part-*.parquet")):
            counts.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
        return counts
