"""Progress of a long run: a bar in a terminal, a log line every so often otherwise."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("skipengine.progress")


class Progress:
    def __init__(self, total_rows: int, every_s: float = 30.0, interactive: bool | None = None):
        self.total, self.every_s = total_rows, every_s
        self.rows = self.tokens = 0
        self.start = self.last_log = time.perf_counter()
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = tqdm(total=total_rows, unit="row", dynamic_ncols=True) if interactive else None

    def update(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(rows)
            self.bar.set_postfix_str(f"{rate:.0f} tok/s")
        elif time.perf_counter() - self.last_log >= self.every_s or self.rows >= self.total:
            eta = (self.total - self.rows) * elapsed / self.rows if self.rows else float("nan")
            log.info("%d/%d rows, %.0f generated tok/s, ETA %.0fs", self.rows, self.total, rate, eta)
            self.last_log = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
