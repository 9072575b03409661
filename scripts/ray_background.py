"""Does Ray's background alone slow the bare engine? (README, Pipeline overhead.)

The bare engine decodes the bench_pipeline rows in this process (no Ray in it) while another process
holds an idle Ray Data job open: Ray's daemons, Ray Data's helper actors and one sleeping pool actor,
exactly what surrounds the generator actor in a job, but doing no work. Alternated with no Ray at all.
python scripts/ray_background.py [ROWS] [REPEATS] [RAY_ENV ...]: each RAY_ENV (e.g.
RAY_num_workers_soft_limit=0) adds a background variant started with that variable set."""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from actor_vs_bare import decoder  # scripts/ is on the path when this runs as a script

# an idle Ray Data job: the pool actor sleeps in its batch until the process is killed
IDLE_JOB = """
import logging, os, time, ray
os.environ.setdefault("RAY_worker_niceness", "0")
ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
class Sleeper:
    def __call__(self, batch):
        print("ready", flush=True)
        time.sleep(3600)
        return batch
ds = ray.data.range(8).repartition(1)
ds.map_batches(Sleeper, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5).take_all()
"""


def start_background(env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", IDLE_JOB], env={**os.environ, **env}, stdout=subprocess.PIPE, text=True
    )
    while not proc.stdout.readline().strip().endswith("ready"):  # the pool actor runs (its print
        # comes back through the driver's log prefixed by the actor's name): every helper is up
        if proc.poll() is not None:
            raise RuntimeError("the idle Ray job exited before its actor started")
    time.sleep(3)
    return proc


def stop_background(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    ray = Path(sys.executable).with_name("ray")  # the venv's, which need not be on PATH
    subprocess.run([str(ray), "stop", "--force"], capture_output=True)


def main(rows: int, repeats: int, variants: list[str]) -> None:
    tokens_per_s = decoder(rows)
    tokens_per_s()  # warm-up
    sides: dict[str, dict | None] = {"no Ray": None, "idle Ray job": {}}
    sides |= {f"idle Ray job, {v}": dict([v.split("=", 1)]) for v in variants}
    results: dict[str, list[float]] = {name: [] for name in sides}
    for rep in range(repeats):
        names = list(sides) if rep % 2 == 0 else list(sides)[::-1]
        for name in names:
            background = None if sides[name] is None else start_background(sides[name])
            try:
                results[name].append(tokens_per_s())
            finally:
                if background is not None:
                    stop_background(background)
            print(f"repeat {rep + 1} {name}: {results[name][-1]:.1f} tok/s", flush=True)
    base = statistics.median(results["no Ray"])
    for name, samples in results.items():
        median = statistics.median(samples)
        print(f"{name}: median {median:.1f} tok/s ({median / base:.3f}x no Ray); samples {samples}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]) if args else 96, int(args[1]) if len(args) > 1 else 3, args[2:])
