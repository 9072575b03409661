"""python -m jobs.evaluate RUN_DIR: scores a finished run against its references (BLEU and chrF for
translate, ROUGE-1/2/L for summarize), with bootstrap 95% intervals; writes metrics.json and
metrics.parquet beside the run."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from jobs.common import job_config
from pipeline.evaluate import evaluate_run, metrics_table


@dataclass
class EvaluateConfig:
    run_dir: str = MISSING  # a finished jobs.generate run
    bootstrap_samples: int = 1000  # resamples for the 95% intervals

    def validate(self) -> None:
        if self.bootstrap_samples < 1:
            raise ValueError(f"bootstrap_samples={self.bootstrap_samples} must be >= 1")


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
log = logging.getLogger("evaluate")


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = job_config(dcfg, EvaluateConfig)
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
