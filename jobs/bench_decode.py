"""python -m jobs.bench_decode: decode tokens/s and achieved speedup per plan on the real default model.

Prints a table, writes bench_decode.parquet in the run folder, and ends with one JSON line of every row.
"""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path

import hydra
import pyarrow as pa
import pyarrow.parquet as pq
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from jobs.common import engine_from_config, setup
from pipeline.corpora import read_bible
from skipengine.benchmark import DecodeBenchConfig, run_decode_bench, text_prompts

log = logging.getLogger("bench_decode")


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
def main(cfg: DictConfig) -> None:
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
