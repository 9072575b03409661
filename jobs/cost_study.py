"""python -m jobs.cost_study sweep_dir=DIR out_dir=DIR (or runs=[RUN_DIR,...]): a sweep's runs as one
report of speed, cost and quality kept (see conf/cost_study.yaml and docs/cost_study.md)."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from jobs.common import job_config
from pipeline.cost_report import human_summary, run_study
from pipeline.cost_study import CostStudyConfig

ConfigStore.instance().store(name="cost_study_schema", node=CostStudyConfig)
log = logging.getLogger("cost_study")


@hydra.main(config_path="../conf", config_name="cost_study", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = job_config(dcfg, CostStudyConfig)
    try:
        out, rows = run_study(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: say what, not a traceback
        log.error("%s", e)
        sys.exit(2)
    print(human_summary(out, rows))


if __name__ == "__main__":
    main()
