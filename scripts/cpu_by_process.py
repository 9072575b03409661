"""CPU use per process over a window, from /proc (README, Pipeline overhead): start a job, then
python scripts/cpu_by_process.py DELAY_S WINDOW_S."""

import os
import sys
import time


def snapshot() -> dict[str, tuple[int, str]]:
    """pid -> (user + system clock ticks, command line)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1].split()
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:90]
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12]), cmd)
    return out


if __name__ == "__main__":
    delay, window = float(sys.argv[1]), float(sys.argv[2])
    time.sleep(delay)
    before, start = snapshot(), time.time()
    time.sleep(window)
    after, elapsed = snapshot(), time.time() - start
    tick = os.sysconf("SC_CLK_TCK")
    rows = sorted(
        ((after[p][0] - before[p][0]) / tick / elapsed * 100, after[p][1]) for p in after if p in before
    )[::-1]
    print(f"total {sum(r[0] for r in rows):.0f}% of one core")
    for percent, cmd in rows[:15]:
        print(f"{percent:6.1f}%  {cmd}")
