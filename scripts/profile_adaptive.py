"""Where an adaptive decode's time goes: torch.profiler over one generate call (ACLSum prompts, 48 new
tokens, the shipped exit-aware adapter and classifiers, 1.25x calibrated), the exit checks and K/V fills
marked. (README, ADEPT speed.) python scripts/profile_adaptive.py [batch]"""

import sys

import torch

import skipengine.adaptive as adaptive
from jobs.common import aclsum_test_prompts
from pipeline.config import SkipConfig
from pipeline.generator import adaptive_engine, build_adaptive_plan
from skipengine import SamplingParams, load_model


def marked(name: str, fn):
    def run(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    return run


if __name__ == "__main__":
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m-instruct", "cpu", "float32")
    skip = SkipConfig(
        strategy="adaptive",
        exit_classifiers="adapters/smollm2-summarize-adaptive-x1.25-exits.safetensors",
        adapter="adapters/smollm2-summarize-adaptive-x1.25.safetensors",
        target_speedup=1.25,
    )
    engine = adaptive_engine(skip, model, tokenizer)
    prompts = aclsum_test_prompts(engine.tokenizer)
    plan = build_adaptive_plan(skip, engine, prompts[:16])
    adaptive.leaving = marked("EXIT CHECK", adaptive.leaving)
    adaptive.fill_deeper_kv = marked("K/V FILL", adaptive.fill_deeper_kv)
    sampling = SamplingParams(max_new_tokens=48, ignore_eos=True)
    work = prompts[16 : 16 + batch]
    engine.generate(work, plan, sampling)  # warm-up
    with torch.profiler.profile() as prof:
        engine.generate(work, plan, sampling)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
