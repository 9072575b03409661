"""python -m jobs.generate: the batch-generation job (see conf/generate.yaml)."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from jobs.common import setup
from pipeline.config import JobConfig
from pipeline.run import human_summary, run_job

ConfigStore.instance().store(name="generate_schema", node=JobConfig)
log = logging.getLogger("generate")


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    setup()
    cfg: JobConfig = OmegaConf.to_object(dcfg)
    try:
        summary = run_job(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: say what, not a traceback
        log.error("%s", e)
        sys.exit(2)
    print(human_summary(summary))


if __name__ == "__main__":
    main()
