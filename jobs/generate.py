"""python -m jobs.generate: the batch-generation job (see conf/generate.yaml)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from jobs.common import setup
from pipeline.config import JobConfig
from pipeline.run import human_summary, run_job

ConfigStore.instance().store(name="generate_schema", node=JobConfig)
log = logging.getLogger("generate")


def swept_values() -> str | None:
    """In a multirun, this job's values of the swept keys ("cluster.batch_size=8,skip.target_speedup=2.0"),
    so that each job of a sweep writes its own folder; None outside a multirun."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    parser = OverridesParser.create()
    try:
        args = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
        swept = {o.key_or_group for o in parser.parse_overrides(args) if o.is_sweep_override()}
        job = {o.key_or_group: o.value() for o in parser.parse_overrides(list(hydra_cfg.overrides.task))}
    except OverrideParseException:  # an argument Hydra takes that is not an override: number the jobs
        return str(hydra_cfg.job.num)
    return ",".join(f"{key}={job[key]}" for key in sorted(swept) if key in job) or str(hydra_cfg.job.num)


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    setup()
    cfg: JobConfig = OmegaConf.to_object(dcfg)
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
