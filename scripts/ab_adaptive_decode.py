"""Adaptive decode tokens/s of this checkout's engine against an earlier commit's, interleaved in one
process (README, ADEPT speed). The earlier commit's skipengine/adaptive.py and Engine.layer are loaded
from git and swapped in per call; thresholds are calibrated once (controller off) so both sides run the
same exits.
python scripts/ab_adaptive_decode.py REV BATCHES [TARGETS [REPEATS]], e.g. 4269fee 8,32 1.25,2.0 3"""

import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import skipengine.adaptive as new_adaptive
import skipengine.engine as engine_module
from jobs.common import aclsum_test_prompts
from pipeline.config import SkipConfig
from pipeline.generator import adaptive_engine, build_adaptive_plan
from skipengine import SamplingParams, full_plan, load_model


def module_at(rev: str, path: str, name: str, folder: Path):
    source = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True)
    file = folder / f"{name}.py"
    file.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    rev, batches = sys.argv[1], [int(b) for b in sys.argv[2].split(",")]
    targets = [float(t) for t in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1.25, 2.0]
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    folder = Path(tempfile.mkdtemp())
    old_adaptive = module_at(rev, "skipengine/adaptive.py", "old_adaptive", folder)
    old_engine = module_at(rev, "skipengine/engine.py", "old_engine", folder)
    sides = {
        "old": (old_adaptive.adaptive_layers, old_engine.Engine.layer),
        "new": (new_adaptive.adaptive_layers, engine_module.Engine.layer),
    }

    def use(side: str) -> None:
        engine_module.adaptive_layers, engine_module.Engine.layer = sides[side]

    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m-instruct", "cpu", "float32")
    exits = dict(
        strategy="adaptive",
        exit_classifiers="adapters/smollm2-summarize-adaptive-x1.25-exits.safetensors",
        adapter="adapters/smollm2-summarize-adaptive-x1.25.safetensors",
        controller=False,
    )
    engine = adaptive_engine(SkipConfig(**exits), model, tokenizer)
    prompts = aclsum_test_prompts(engine.tokenizer)
    sampling = SamplingParams(max_new_tokens=48, ignore_eos=True)
    for batch in batches:
        plans = {"full depth": full_plan(engine.num_layers)}
        for t in targets:
            skip = SkipConfig(**exits, target_speedup=t)
            plans[f"adaptive x{t:g}"] = build_adaptive_plan(skip, engine, prompts[:16])
        work = prompts[16 : 16 + batch]
        samples: dict[tuple[str, str], list] = {}
        for rep in range(repeats):
            for name, plan in plans.items():
                for side in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                    if name == "full depth" and side == "old":
                        continue  # full depth does not reach the changed code
                    use(side)
                    stats = engine.generate(work, plan, sampling).stats
                    samples.setdefault((name, side), []).append(stats)
        full = statistics.median(s.decode_tokens_per_s for s in samples[("full depth", "new")])
        for (name, side), runs in samples.items():
            tps = statistics.median(s.decode_tokens_per_s for s in runs)
            print(
                f"batch {batch:>2} {name:<14} {side}: {tps:6.1f} dec tok/s, {tps / full:.2f}x full depth, "
                f"{runs[0].decode_layers_per_token:.1f} layers/tok, samples "
                f"{[round(s.decode_tokens_per_s, 1) for s in runs]}",
                flush=True,
            )
