"""The same engine and rows in the driver and in a plain Ray actor (fractional CPU), alternated: does an
actor process by itself cost throughput? (README, Pipeline overhead.) python scripts/actor_vs_bare.py"""

import os
import time

import ray
import torch

from jobs.common import task_config
from pipeline.corpora import BIBLE_SPLITS, read_bible
from pipeline.prompts import PromptBuilder
from skipengine import Engine, SamplingParams, load_model, make_plan

ROWS, BATCH, NEW_TOKENS, REPEATS = 48, 8, 64, 3


def decoder(rows: int = ROWS):
    """A function that decodes the first `rows` Bible test-range rows and returns generated tokens/s (the
    bench_pipeline setup)."""
    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m-instruct", "cpu", "float32")
    engine = Engine(model, tokenizer)
    prompts = PromptBuilder(task_config("translate"), tokenizer)
    start = BIBLE_SPLITS["test"][0]
    ids = [prompts.build(en).ids for en, _ in read_bible(start=start, stop=start + rows)]
    plan = make_plan(engine.num_layers, "uniform", 2.0, "full", "layers")
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS)

    def tokens_per_s() -> float:
        t, n = time.perf_counter(), 0
        for i in range(0, len(ids), BATCH):
            n += engine.generate(ids[i : i + BATCH], plan, sampling).stats.num_generated_tokens
        return n / (time.perf_counter() - t)

    return tokens_per_s


@ray.remote(num_cpus=0.5)
class Actor:
    def __init__(self):
        self.tokens_per_s = decoder()

    def run(self) -> float:
        return self.tokens_per_s()


if __name__ == "__main__":
    os.environ.setdefault("RAY_worker_niceness", "0")  # as pipeline.run does locally
    ray.init(num_cpus=2, include_dashboard=False)
    actor = Actor.remote()
    driver = decoder()
    driver(), ray.get(actor.run.remote())  # warm-up
    for rep in range(REPEATS):
        d, a = driver(), ray.get(actor.run.remote())
        print(f"repeat {rep}: driver {d:.1f} tok/s, actor {a:.1f} tok/s, actor/driver {a / d:.3f}")
