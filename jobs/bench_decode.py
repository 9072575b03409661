"""python -m jobs.bench_decode: decode tokens/s and achieved speedup per plan on the real default model.

Prints a table, writes bench_decode.parquet in the run folder, and ends with one JSON line of every row.
"""

from __future__ import annotations

import json
import logging
import resource
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import pyarrow as pa
import pyarrow.parquet as pq
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from jobs.common import engine_from_config, job_config, setup
from pipeline.config import ModelConfig, choice, validate_model
from pipeline.corpora import read_bible
from skipengine.benchmark import DecodeBenchConfig, run_decode_bench, text_prompts
from skipengine.plan import BASES, STRATEGIES

log = logging.getLogger("bench_decode")


@dataclass
class BenchDecodeConfig:
    """conf/bench_decode.yaml's keys."""

    model: ModelConfig = field(default_factory=ModelConfig)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    targets: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0])
    bases: list[str] = field(default_factory=lambda: ["layers", "measured"])
    strategy: str = "uniform"
    prompt_tokens: int = 100
    new_tokens: int = 64
    repeats: int = 3
    threads: int = 2
    hf_baseline: bool = True  # also HF generate() at full depth, the baseline of "vs HF"
    corpus: str = "data/bible_kjv_rv1909.en-es.tsv.gz"  # the prompts' text

    def validate(self) -> None:
        validate_model(self.model)
        choice("strategy", self.strategy, STRATEGIES)
        for basis in self.bases:
            choice("bases", basis, BASES)
        if not self.batch_sizes or not self.targets or not self.bases:
            raise ValueError("batch_sizes, targets and bases must each list at least one value")
        if min(self.targets) < 1 or min(self.batch_sizes) < 1 or self.repeats < 1:
            raise ValueError("targets must be >= 1.0, and batch_sizes and repeats >= 1")
        if not Path(self.corpus).is_file():
            raise FileNotFoundError(f"corpus={self.corpus!r} does not exist")


ConfigStore.instance().store(name="bench_decode_schema", node=BenchDecodeConfig)


def table(rows: list[dict]) -> str:
    head = (
        f"{'batch':>5} {'target':>6} {'basis':>8} {'kept':>4} {'pred':>5} {'dec tok/s':>9} {'e2e tok/s':>9} "
    )
    head += f"{'dec x':>6} {'e2e x':>6} {'HF tok/s':>8} {'vs HF':>6}"
    lines = [head]
    for r in rows:
        if r["refused"]:
            lines.append(f"{r['batch']:>5} {r['target']:>6g} {r['basis']:>8}  refused: {r['refused']}")
            continue
        plan = f"{r['batch']:>5} {r['target']:>6g} {r['basis']:>8} {r['kept_layers']:>4}"
        speed = f"{r['predicted_speedup']:>5.2f} {r['decode_tokens_per_s']:>9.1f} {r['tokens_per_s']:>9.1f}"
        speed += f" {r['achieved_decode_speedup']:>6.2f}"
        versus = f"{r['achieved_e2e_speedup']:>6.2f} {r['hf_tokens_per_s']:>8.1f} {r['vs_hf']:>6.2f}"
        lines.append(f"{plan} {speed} {versus}")
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="bench_decode", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = job_config(dcfg, BenchDecodeConfig)
    setup(cfg.threads)
    engine = engine_from_config(cfg.model)
    bench = DecodeBenchConfig(
        batch_sizes=tuple(cfg.batch_sizes),
        targets=tuple(float(t) for t in cfg.targets),
        bases=tuple(cfg.bases),
        strategy=cfg.strategy,
        new_tokens=cfg.new_tokens,
        repeats=cfg.repeats,
        hf_baseline=cfg.hf_baseline,
    )
    english = [en for en, _ in read_bible(cfg.corpus, stop=4000)]
    pool = text_prompts(english, engine.tokenizer, cfg.prompt_tokens, max(bench.batch_sizes))
    rows = run_decode_bench(engine, pool, bench, progress=log.info)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for r in rows:
        r["peak_rss_mb"] = peak_mb

    out = Path(HydraConfig.get().runtime.output_dir) / "bench_decode.parquet"
    pq.write_table(pa.Table.from_pylist(rows), out)
    print(table(rows))
    print(
        f"peak RSS {peak_mb:.0f} MB; model {cfg.model.spec} {cfg.model.dtype} on {cfg.model.device}, "
        f"{cfg.threads} threads; written to {out}"
    )
    print(json.dumps({"bench": "decode", "rows": rows}))


if __name__ == "__main__":
    main()
