"""CPU use and time slices per process over a window, from /proc/<pid>/task/*/schedstat (README, Pipeline
overhead): start a job, then python scripts/cpu_by_process.py DELAY_S WINDOW_S [--threads] (--threads: one
row per thread, named, instead of per process).

Slices per second count how often a process's threads were put on a CPU: on a machine whose cores the
actor keeps busy, each slice of another process takes a core from one of the actor's threads."""

import os
import sys
import time


def snapshot(per_thread: bool) -> dict[str, tuple[int, int, str]]:
    """pid (or pid/tid) -> (ns on CPU, time slices, command line [thread name]), summed over the
    process's threads unless per_thread."""
    out: dict[str, tuple[int, int, str]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:90]
            for task in os.listdir(f"/proc/{pid}/task"):
                fields = open(f"/proc/{pid}/task/{task}/schedstat").read().split()
                key, label = pid, cmd
                if per_thread:
                    comm = open(f"/proc/{pid}/task/{task}/comm").read().strip()
                    key, label = f"{pid}/{task}", f"{cmd[:60]} [{comm}]"
                run_ns, slices, _ = out.get(key, (0, 0, label))
                out[key] = (run_ns + int(fields[0]), slices + int(fields[2]), label)
        except OSError:
            continue
    return out


if __name__ == "__main__":
    delay, window, per_thread = float(sys.argv[1]), float(sys.argv[2]), "--threads" in sys.argv[3:]
    time.sleep(delay)
    before, start = snapshot(per_thread), time.time()
    time.sleep(window)
    after, elapsed = snapshot(per_thread), time.time() - start
    rows = sorted(
        (
            (after[p][0] - before[p][0]) / 1e7 / elapsed,  # % of one core
            (after[p][1] - before[p][1]) / elapsed,
            after[p][2],
        )
        for p in after
        if p in before
    )[::-1]
    print(f"total {sum(r[0] for r in rows):.0f}% of one core")
    for percent, slices, cmd in rows[:15]:
        print(f"{percent:6.1f}%  {slices:6.0f} slices/s  {cmd}")
