"""Marker files that outlive an actor: which batches, and which of their rows, were being generated when
an actor process died (killed by the OS for memory, a crash in native code).

Ray restarts a dead actor and gives it the same batch again. A batch that comes back is generated one row
at a time, each row marked while it runs; a row whose mark is still there on the next try killed its
actor, and becomes an error row instead of killing it again. So a row that kills its actor costs two
restarts, every other row is written once, and the job ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


class Attempts:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def start(self, batch_id: str) -> int:
        """Marks the batch as started; how many times it has been (1: the first)."""
        path = self.folder / f"{batch_id}.json"
        attempt = json.loads(path.read_text())["attempt"] + 1 if path.exists() else 1
        path.write_text(json.dumps({"attempt": attempt, "pid": os.getpid()}))
        return attempt

    def _row(self, batch_id: str, row_id: str) -> Path:
        return self.folder / f"{batch_id}-{hashlib.sha1(row_id.encode()).hexdigest()[:16]}.row"

    def killed_before(self, batch_id: str, row_id: str) -> bool:
        """Whether this row was being generated when an earlier try's actor died."""
        return self._row(batch_id, row_id).exists()

    def start_row(self, batch_id: str, row_id: str) -> None:
        self._row(batch_id, row_id).write_text(str(os.getpid()))

    def finish_row(self, batch_id: str, row_id: str) -> None:
        self._row(batch_id, row_id).unlink(missing_ok=True)

    def finish(self, batch_id: str) -> None:
        """The batch's rows are written: its marks go."""
        for path in self.folder.glob(f"{batch_id}*"):
            path.unlink(missing_ok=True)

    @staticmethod
    def clear(folder: str | Path) -> None:
        """At the start of a job (which holds the run folder): marks left by an earlier job are stale."""
        shutil.rmtree(folder, ignore_errors=True)
