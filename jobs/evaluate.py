"""python -m jobs.evaluate RUN_DIR: scores a finished run against its references (BLEU and chrF for
translate, ROUGE-1/2/L for summarize), with bootstrap 95% intervals; writes metrics.json and
metrics.parquet beside the run."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from jobs.common import setup
from pipeline.evaluate import evaluate_run, metrics_table

log = logging.getLogger("evaluate")


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup()
    try:
        metrics = evaluate_run(cfg.run_dir, cfg.bootstrap_samples)
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        sys.exit(2)
    print(metrics_table(metrics))


if __name__ == "__main__":
    # `python -m jobs.evaluate RUN_DIR` as well as Hydra's `run_dir=RUN_DIR`
    sys.argv[1:] = [a if "=" in a or a.startswith("-") else f"run_dir={a}" for a in sys.argv[1:]]
    main()
