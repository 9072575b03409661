"""python -m jobs.bench_quality: quality against achieved speedup, per strategy, on the real corpora.

For each entry of `runs` (a strategy, a target, a basis, optionally a skip-aware adapter): ROUGE on ACLSum
test (task=summarize), BLEU and chrF on the Bible test range (task=translate), perplexity on Austen's
Persuasion, and the decode cost per token against the full-depth entry of the same sweep. One model load,
the bare engine (the Ray job gives the same tokens; this measures quality, not the pipeline).

Results accumulate in out_dir/quality.jsonl (an entry rerun replaces its line; `only=[name,...]` runs a
subset); out_dir/quality.md and out_dir/quality.png are rebuilt from all lines each time.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from jobs.common import job_config, setup, task_config
from pipeline.config import ModelConfig, SkipConfig, TaskConfig, choice, validate_model
from pipeline.corpora import BIBLE_SPLITS, read_aclsum, read_austen, read_bible
from pipeline.generator import adaptive_engine, build_adaptive_plan
from pipeline.metrics import score_task
from pipeline.progress import Progress
from pipeline.prompts import PromptBuilder
from pipeline.run import on_target
from skipengine import Engine, load_model, make_plan, measure_cost_model
from skipengine.adaptive import CRITERIA, KV_FILLS
from skipengine.control import kv_fraction, layer_speedup
from skipengine.lora import load_adapter
from skipengine.perplexity import adaptive_perplexity, perplexity, windows
from skipengine.plan import BASES, STRATEGIES, SkipPlan

log = logging.getLogger("bench_quality")


@dataclass
class QualityRun:
    """One entry of `runs`: a plan (and its adapter); the adaptive keys are skip=adaptive's."""

    name: str = MISSING
    strategy: str = MISSING  # a static strategy, or adaptive
    target: float = MISSING
    basis: str = MISSING
    adapter: str | None = None
    seed: int = 0  # strategy=random
    exit_classifiers: str | None = None
    criterion: str = "classifier"
    exit_every: int = 2
    min_depth: int = 6  # the classifiers' exit points (conf/train_exits.yaml)
    threshold: float | None = None
    kv_fill: str = "decoupled"
    controller: bool = True


@dataclass
class BenchQualityConfig:
    """conf/bench_quality.yaml's keys; its comments say what each does."""

    model: ModelConfig = field(default_factory=ModelConfig)
    aclsum_rows: int = 100  # ACLSum test papers (task=summarize, ROUGE)
    bible_rows: int = 64  # Bible test-range verses (task=translate, BLEU / chrF)
    ppl_windows: int = 16  # Austen windows for perplexity
    window_tokens: int = 256
    context: int = 32
    batch_size: int = 8
    threads: int = 2
    out_dir: str = "docs/results/quality"
    only: list[str] = field(default_factory=list)  # these entries of runs only (by name)
    report_only: bool = False  # rebuild quality.md and quality.png from quality.jsonl, run nothing
    runs: list[QualityRun] = field(default_factory=list)  # the sweep: conf/bench_quality.yaml lists it

    def validate(self) -> None:
        validate_model(self.model)
        names = [run.name for run in self.runs]
        unknown = [name for name in self.only if name not in names]
        if unknown:  # e.g. a name with a comma, which a YAML flow mapping splits
            raise ValueError(f"only={unknown} names no entry of runs; the names are: {names}")
        for i, run in enumerate(self.runs):
            choice(f"runs[{i}].strategy", run.strategy, (*STRATEGIES, "adaptive"))
            choice(f"runs[{i}].basis", run.basis, BASES)
            choice(f"runs[{i}].criterion", run.criterion, CRITERIA)
            choice(f"runs[{i}].kv_fill", run.kv_fill, KV_FILLS)
            if run.target < 1:
                raise ValueError(f"runs[{i}].target={run.target} ({run.name}) must be >= 1.0")
        if not self.report_only:
            check_files([run for run in self.runs if not self.only or run.name in self.only], names)


ConfigStore.instance().store(name="bench_quality_schema", node=BenchQualityConfig)


def generate_all(engine: Engine, plan, task: TaskConfig, texts: list[str], batch_size: int, skip=None):
    """(generated texts, decode seconds, decode row-steps, decode layers per token, per-batch layer
    speedups). skip=adaptive: the job's calibration (the first rows) and step-by-step controller;
    a batch's speedup prices the K/V fills as the job's stats do (static plans: the kept layers)."""
    prompts = PromptBuilder(task, engine.tokenizer)
    sampling = task.sampling()
    ids = [prompts.build(t).ids for t in texts]
    kv = 0.0
    if skip is not None:  # a fresh controller per task, as a job starts one per actor
        plan = build_adaptive_plan(skip, engine, ids[: skip.calibration_rows])
        kv = kv_fraction(engine.adapter)
    out, decode_s, row_steps, layers, per_batch = [], 0.0, 0, 0.0, []
    progress = Progress(len(texts))
    for i in range(0, len(texts), batch_size):
        stats = engine.generate(ids[i : i + batch_size], plan, sampling)
        out += [r.text for r in stats.rows]
        stats = stats.stats
        progress.update(stats.num_rows, stats.num_generated_tokens)
        decode_s += stats.decode_s
        row_steps += stats.decode_row_steps
        layers += stats.decode_layers_per_token * stats.decode_row_steps
        if stats.decode_row_steps:
            per_batch.append(layer_speedup(engine.num_layers, stats.decode_layers_per_token, kv))
    progress.close()
    return out, decode_s, row_steps, layers / max(1, row_steps), per_batch


def plan_for(run: QualityRun, num_layers: int, cost) -> SkipPlan:
    if run.basis == "measured":
        return make_plan(num_layers, run.strategy, run.target, "full", "measured", cost_model=cost())
    return make_plan(num_layers, run.strategy, run.target, "full", "layers", seed=run.seed)


def evaluate(run: QualityRun, base, tokenizer, data: dict, cfg: BenchQualityConfig, cost) -> dict:
    skip, plan = None, None
    if run.strategy == "adaptive":
        skip = SkipConfig(
            strategy="adaptive",
            target_speedup=run.target,
            exit_classifiers=run.exit_classifiers,
            criterion=run.criterion,
            exit_every=run.exit_every,
            min_depth=run.min_depth,
            threshold=run.threshold,
            kv_fill=run.kv_fill,
            controller=run.controller,
            adapter=run.adapter,
        )
        engine = adaptive_engine(skip, copy.deepcopy(base) if skip.adapter else base, tokenizer)
        model = engine.model
    else:
        plan = plan_for(run, base.config.num_hidden_layers, cost)
        model = load_adapter(copy.deepcopy(base), run.adapter, plan) if run.adapter else base
        engine = Engine(model, tokenizer)
    start = time.perf_counter()
    summaries, decode_s, row_steps, layers, batch_speedups = generate_all(
        engine, plan, task_config("summarize"), data["abstracts"], cfg.batch_size, skip
    )
    rouge = score_task("summarize", summaries, data["summaries"])
    translations, *_, bible_speedups = generate_all(
        engine, plan, task_config("translate"), data["english"], cfg.batch_size, skip
    )
    bible = score_task("translate", translations, data["spanish"])
    if skip is None:
        ppl = perplexity(model, data["windows"], plan, cfg.context, cfg.batch_size)
    else:  # calibrated on the text's first windows, as the job calibrates on the corpus's first rows
        ppl_plan = build_adaptive_plan(skip, engine, data["windows"][: skip.calibration_rows])
        ppl = adaptive_perplexity(engine, data["windows"], ppl_plan, cfg.context)
    kv = kv_fraction(engine.adapter) if skip else 0.0
    row = {
        "name": run.name,
        "strategy": run.strategy,
        "target": run.target,
        "basis": run.basis,
        "adapter": run.adapter,
        "kept": plan.num_kept if plan else None,
        "decode_layers_per_token": layers,
        "plan": str(plan) if plan else f"adaptive x{run.target}",
        "decode_s_per_token": decode_s / max(1, row_steps),
        **{k: v["score"] for k, v in rouge.items()},
        "rougeL_ci": [rouge["rougeL"]["ci_low"], rouge["rougeL"]["ci_high"]],
        "bleu": bible["bleu"]["score"],
        "chrf": bible["chrf"]["score"],
        "perplexity": ppl["perplexity"],
        "perplexity_layer_speedup": ppl.get("layer_speedup"),
        # the fixed-speedup contract, batch by batch (layers basis, K/V fills priced)
        "batch_layer_speedups": {"summarize": batch_speedups, "translate": bible_speedups},
        "batches_within_5pct": on_target(batch_speedups + bible_speedups, run.target) if skip else None,
        "achieved_layer_speedup": layer_speedup(engine.num_layers, layers, kv),
        "seconds": time.perf_counter() - start,
        "example_summary": summaries[0],
    }
    log.info("%s: rougeL %.2f bleu %.2f ppl %s", run.name, row["rougeL"], row["bleu"], row["perplexity"])
    return row


def write_report(rows: list[dict], out_dir: Path) -> None:
    """The table (markdown) and the plot. Speedup is the layers basis, L / decode layers per token (the
    wall-clock ratio of each plan is bench_decode's and bench_adaptive's job: per-token decode time in
    this sweep depends on how long each run's rows stay in the batch, which the quality changes)."""
    full = next((r for r in rows if r["strategy"] == "none"), None)
    for r in rows:  # adaptive runs price their K/V fills, as the job's stats do
        r["layer_speedup"] = r.get("achieved_layer_speedup") or (
            full["decode_layers_per_token"] / r["decode_layers_per_token"]
        )
    lines = [
        "| run | decode layers/token | speedup (layers) | batches within 5% | ROUGE-L (% of full) | ROUGE-1 "
        "| BLEU | chrF | perplexity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        keep = f" ({100 * r['rougeL'] / full['rougeL']:.0f}%)" if full else ""
        lines.append(
            f"| {r['name']} | {r['decode_layers_per_token']:.1f} | {r['layer_speedup']:.2f} "
            f"| {r.get('batches_within_5pct') or 'static'} | {r['rougeL']:.2f}{keep} | {r['rouge1']:.2f} "
            f"| {r['bleu']:.2f} | {r['chrf']:.2f} | "
            + (f"{r['perplexity']:.1f} |" if r["perplexity"] else "n/a |")
        )
    (out_dir / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list] = {}
    for r in rows:
        label = r["strategy"] + (" (basis measured)" if r["basis"] == "measured" else "")
        label += " + skip-aware adapter" if r["adapter"] else ""
        groups.setdefault(label, []).append(r)
    for label, members in groups.items():
        members = sorted(
            [*members, *([full] if full and label != "none" else [])], key=lambda r: r["layer_speedup"]
        )
        ax.plot([r["layer_speedup"] for r in members], [r["rougeL"] for r in members], "o-", label=label)
    ax.set_xlabel("decode speedup, layers basis (L / layers run per token)")
    ax.set_ylabel("ROUGE-L on ACLSum test")
    ax.set_title("SmolLM2-135M-Instruct: quality vs speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "quality.png", dpi=120)


def check_files(selected: list[QualityRun], names: list[str]) -> None:
    """Some rows read adapters or classifiers that a README command trains into runs/ (not committed):
    fail before hours of work, not at the row, and say how to leave those rows out."""
    missing = {
        run.name: path
        for run in selected
        for path in (run.adapter, run.exit_classifiers)
        if path and not Path(path).exists()
    }
    if missing:
        rest = [n for n in names if n not in missing]
        raise FileNotFoundError(
            f"runs need files that are not here: {missing}; train them with the commands in the README "
            f"(Quality, ADEPT) or leave these rows out with only={json.dumps(rest)}"
        )


@hydra.main(config_path="../conf", config_name="bench_quality", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = job_config(dcfg, BenchQualityConfig)  # also refuses unknown `only` names and missing files
    setup(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "quality.jsonl"
    rows = {}
    if results_path.exists():
        rows = {r["name"]: r for r in map(json.loads, results_path.read_text().splitlines())}
    order = {run.name: n for n, run in enumerate(cfg.runs)}
    if cfg.report_only:
        write_report(sorted(rows.values(), key=lambda r: order.get(r["name"], len(order))), out_dir)
        return
    model, tokenizer = load_model(cfg.model.spec, cfg.model.device, cfg.model.dtype)
    aclsum = read_aclsum("test")[: cfg.aclsum_rows]
    test_start = BIBLE_SPLITS["test"][0]
    bible = read_bible(start=test_start, stop=test_start + cfg.bible_rows)
    ids = tokenizer(read_austen(), add_special_tokens=False)["input_ids"]
    data = {
        "abstracts": [r["abstract"] for r in aclsum],
        "summaries": [r["summary"] for r in aclsum],
        "english": [en for en, _ in bible],
        "spanish": [es for _, es in bible],
        "windows": windows(ids, cfg.window_tokens, cfg.ppl_windows),
    }
    cost_model = []

    def cost():  # measured once, only if a run asks for basis=measured
        if not cost_model:
            cost_model.append(measure_cost_model(Engine(model, tokenizer), cfg.batch_size))
        return cost_model[0]

    for run in cfg.runs:
        if cfg.only and run.name not in cfg.only:
            continue
        rows[run.name] = evaluate(run, model, tokenizer, data, cfg, cost)
        results_path.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    order = [r.name for r in cfg.runs]
    write_report(
        sorted(rows.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else 99), out_dir
    )


if __name__ == "__main__":
    main()
