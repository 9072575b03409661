"""python -m jobs.generate: the batch-generation job (see conf/generate.yaml)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from jobs.common import job_config
from pipeline.config import JobConfig
from pipeline.run import human_summary, run_job
from pipeline.sweeps import swept_subdir

ConfigStore.instance().store(name="generate_schema", node=JobConfig)
log = logging.getLogger("generate")


def swept_values() -> str | None:
    """In a multirun, this job's values of the swept keys ("cluster.batch_size=8,skip.target_speedup=2.0"),
    so that each job of a sweep writes its own folder; None outside a multirun."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    args = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    return swept_subdir(args, list(hydra_cfg.overrides.task), hydra_cfg.job.num)


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = job_config(dcfg, JobConfig)
    subdir = swept_values()
    if subdir:
        cfg.output.dir = str(Path(cfg.output.dir) / subdir)
    try:
        summary = run_job(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: say what, not a traceback
        log.error("%s", e)
        sys.exit(2)
    print(human_summary(summary))


if __name__ == "__main__":
    main()
