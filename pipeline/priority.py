"""On a small machine, Ray's own processes yield the CPU to the generator actors (Linux only).

Local Ray runs a handful of bookkeeping processes beside the actor: GCS, the raylet, Ray Data's helper
actors, the driver's streaming executor. Together they use little CPU, but each wakes ~100 times a second,
and on a 2-core machine every wakeup preempts one of the actor's two compute threads, which stalls the
other at the next barrier. Under SCHED_IDLE they run only on a core nothing else wants and never preempt
the actor (sched(7)); the actor puts its own compute thread back to the normal policy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
SUPPORTED = hasattr(os, "sched_setscheduler") and Path("/proc/self/task").is_dir()


def _threads(pid: int) -> list[int]:
    try:
        return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:  # the process exited
        return []


def _set_policy(tid: int, policy: int) -> bool:
    try:
        os.sched_setscheduler(tid, policy, os.sched_param(0))
        return True
    except OSError:  # the thread exited, or we may not change it
        return False


def _policy(tid: int) -> int:
    try:
        return os.sched_getscheduler(tid)
    except OSError:
        return os.SCHED_OTHER


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def yield_processes(pids: list[int]) -> int:
    """Puts every thread of these processes under SCHED_IDLE (their future children inherit it);
    returns how many threads changed."""
    if not SUPPORTED:
        return 0
    return sum(_set_policy(tid, os.SCHED_IDLE) for pid in pids for tid in _threads(pid))


@contextmanager
def driver_yields() -> Iterator[None]:
    """This process's threads under SCHED_IDLE for the block, then back to their own policies (threads
    started meanwhile take the calling thread's)."""
    if not SUPPORTED:
        yield
        return
    before = {tid: _policy(tid) for tid in _threads(os.getpid())}
    own = os.sched_getscheduler(0)
    yield_processes([os.getpid()])
    try:
        yield
    finally:
        for tid in set(before) | set(_threads(os.getpid())):
            _set_policy(tid, before.get(tid, own))


def compute_thread_normal() -> None:
    """Called by an actor, which inherited SCHED_IDLE from the raylet: the calling thread (and the
    compute threads it starts from now on, e.g. torch's pool) take the normal policy again."""
    if SUPPORTED and os.sched_getscheduler(0) == os.SCHED_IDLE and not _set_policy(0, os.SCHED_OTHER):
        log.warning("could not leave SCHED_IDLE; the actor will run only on idle cores")
