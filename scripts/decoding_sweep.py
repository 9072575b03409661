"""Which summarize prompt and decoding settings make the full model (or a plan) write summaries, not loops:
ROUGE-L, loop rate and mean length on ACLSum validation papers (never the test split), plus one output
per setting to read. Appends one JSON line per setting to docs/results/decoding_sweep.jsonl.

python scripts/decoding_sweep.py [rows] [kept layers, comma-separated, or 'full'] [prompts] [decodings]
(prompts and decodings: comma-separated names from PROMPTS and DECODING; default all)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from jobs.common import task_config
from pipeline.corpora import read_aclsum
from pipeline.metrics import output_stats, score_task
from pipeline.prompts import PromptBuilder
from skipengine import Engine, SkipPlan, full_plan, load_model

PROMPTS = {
    "three_parts": "Summarize this paper abstract in three sentences: the problem, the approach, and the "
    "outcome.\n\n{input}",
    "plain_1_2": "Summarize this paper abstract in one or two plain sentences.\n\n{input}",
    "plain_3": "Summarize this paper abstract in three plain sentences: what problem it addresses, how, and "
    "what it found.\n\n{input}",
}
DECODING = {
    "greedy": {},
    "no_repeat_3": {"no_repeat_ngram_size": 3},
    "no_repeat_4": {"no_repeat_ngram_size": 4},
    "rep_1.1": {"repetition_penalty": 1.1},
    "rep_1.05_no_repeat_4": {"repetition_penalty": 1.05, "no_repeat_ngram_size": 4},
    "no_repeat_6": {"no_repeat_ngram_size": 6},
    # the same, counting the output's n-grams only (the prompt may be quoted)
    "out_no_repeat_3": {"no_repeat_ngram_size": 3, "penalize_prompt": False},
    "out_no_repeat_4": {"no_repeat_ngram_size": 4, "penalize_prompt": False},
}


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    layers = sys.argv[2] if len(sys.argv) > 2 else "full"
    prompt_names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(PROMPTS)
    decoding_names = sys.argv[4].split(",") if len(sys.argv) > 4 else list(DECODING)
    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m-instruct")
    engine = Engine(model, tokenizer)
    plan = full_plan(30) if layers == "full" else SkipPlan(30, tuple(int(x) for x in layers.split(",")))
    papers = read_aclsum("validation")[:rows]
    out = Path("docs/results/decoding_sweep.jsonl")
    for prompt_name in prompt_names:
        template = PROMPTS[prompt_name]
        for decoding_name in decoding_names:
            settings = DECODING[decoding_name]
            # the settings replace the task's own decoding defaults
            base = replace(task_config("summarize"), no_repeat_ngram_size=0, penalize_prompt=True)
            task = replace(base, template=template, **settings)
            builder = PromptBuilder(task, tokenizer)
            ids = [builder.build(p["abstract"]).ids for p in papers]
            start, texts = time.perf_counter(), []
            for i in range(0, len(ids), 8):
                texts += [r.text for r in engine.generate(ids[i : i + 8], plan, task.sampling()).rows]
            scores = score_task("summarize", texts, [p["summary"] for p in papers], 200)
            stats = output_stats(texts, 200)
            record = {
                "prompt": prompt_name,
                "decoding": decoding_name,
                "plan": layers,
                "rows": rows,
                "rougeL": round(scores["rougeL"]["score"], 2),
                "loop_rate": round(stats["loop_rate"]["score"], 1),
                "mean_words": round(stats["mean_words"]["score"], 1),
                "seconds": round(time.perf_counter() - start, 1),
                "example": texts[0],
            }
            print(json.dumps(record), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
