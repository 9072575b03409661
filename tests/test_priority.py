"""pipeline.priority: Ray's processes yield to the actors under SCHED_IDLE, and the driver gets its own
policies back."""

import os
import subprocess
import sys
import threading

import pytest

from pipeline import priority

pytestmark = pytest.mark.skipif(not priority.SUPPORTED, reason="SCHED_IDLE is Linux-only")


def test_descendants_and_yield_reach_grandchildren_and_their_threads():
    # a child that starts a grandchild, as the driver starts the raylet and the raylet its workers
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(100):  # until the grandchild exists
            found = priority.descendants(os.getpid())
            if len(found) >= 2:
                break
            threading.Event().wait(0.05)
        assert child.pid in found and len(found) == 2
        assert priority.yield_processes(found) >= 2
        for pid in found:
            assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    finally:
        for pid in priority.descendants(os.getpid()):
            os.kill(pid, 9)
        child.wait()


def test_driver_yields_restores_every_thread_and_covers_new_ones():
    started = threading.Event()
    done = threading.Event()
    seen = {}

    def worker():
        seen["policy"] = os.sched_getscheduler(0)
        started.set()
        done.wait(10)

    with priority.driver_yields():
        assert os.sched_getscheduler(0) == os.SCHED_IDLE
        thread = threading.Thread(target=worker)
        thread.start()
        started.wait(10)
        assert seen["policy"] == os.SCHED_IDLE  # inherited from the yielding thread
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert os.sched_getscheduler(thread.native_id) == os.SCHED_OTHER
    done.set()
    thread.join()


def test_compute_thread_leaves_idle():
    def worker():
        priority.yield_processes([os.getpid()])  # this thread (and the others) idle, as a Ray worker's
        priority.compute_thread_normal()
        seen["policy"] = os.sched_getscheduler(0)

    seen = {}
    with priority.driver_yields():  # restores the test process's threads afterwards
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert seen["policy"] == os.SCHED_OTHER
