"""Where a sweep's runs are: a multirun job's run folder is its output.dir plus its values of the swept keys
(`swept_subdir`, which jobs.generate uses to name it), and a Hydra multirun folder keeps each job's config
and overrides under <job number>/.hydra/, so the run folders can be found from it afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class FoundRun:
    path: Path
    note: str | None = None  # why it is listed though it may not be a finished run


def swept_subdir(sweep_args: list[str], job_overrides: list[str], num: int) -> str:
    """A multirun job's values of the swept keys ("cluster.batch_size=8,skip.target_speedup=2.0"), from the
    sweep's command-line overrides and the job's own; the job number when they cannot be parsed."""
    parser = OverridesParser.create()
    try:
        swept = {o.key_or_group for o in parser.parse_overrides(sweep_args) if o.is_sweep_override()}
        job = {o.key_or_group: o.value() for o in parser.parse_overrides(job_overrides)}
    except OverrideParseException:  # an argument Hydra takes that is not an override: number the jobs
        return str(num)
    return ",".join(f"{key}={job[key]}" for key in sorted(swept) if key in job) or str(num)


def is_run_dir(path: Path) -> bool:
    """A jobs.generate run folder: finished (summary.json), or started (config.yaml beside outputs/)."""
    return (path / "summary.json").is_file() or (
        (path / "config.yaml").is_file() and (path / "outputs").is_dir()
    )


def run_dirs_under(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        if is_run_dir(Path(dirpath)):
            found.append(Path(dirpath))
            dirnames.clear()  # its outputs/ and stats/ hold no runs
        else:
            dirnames[:] = sorted(d for d in dirnames if d != ".hydra")
    return sorted(found)


def hydra_job_runs(sweep_dir: Path) -> list[FoundRun]:
    """The run folder of every job of a Hydra multirun folder (multirun.yaml at its root): the job's
    output.dir (from <num>/.hydra/config.yaml) plus its swept values, as jobs.generate names it."""
    multirun = sweep_dir / "multirun.yaml"
    if not multirun.is_file():
        return []
    sweep_args = list(yaml.safe_load(multirun.read_text())["hydra"]["overrides"]["task"])
    found = []
    for job_config in sorted(sweep_dir.glob("*/.hydra/config.yaml")):
        job_dir = job_config.parent.parent
        num = int(job_dir.name) if job_dir.name.isdigit() else 0
        overrides = yaml.safe_load((job_config.parent / "overrides.yaml").read_text()) or []
        try:
            out = OmegaConf.select(OmegaConf.load(job_config), "output.dir", throw_on_missing=True)
        except OmegaConfBaseException as e:  # an interpolation only the job itself could resolve
            found.append(FoundRun(job_dir, f"its output.dir cannot be resolved here ({e})"))
            continue
        if out is None:  # not a jobs.generate sweep
            continue
        path = Path(out) / swept_subdir(sweep_args, overrides, num)
        note = None if path.is_dir() else f"Hydra job {job_dir.name} made no run folder (see its log)"
        found.append(FoundRun(path, note))
    return found


def find_runs(runs: list[str], sweep_dir: str | None) -> list[FoundRun]:
    """Each run folder once: the listed ones, the run folders under sweep_dir (`is_run_dir`) and, for a
    Hydra multirun folder, its jobs' run folders (which jobs.generate writes under output.dir)."""
    found = [FoundRun(Path(p).expanduser()) for p in runs]
    if sweep_dir:
        root = Path(sweep_dir).expanduser()
        found += [FoundRun(p) for p in run_dirs_under(root)]
        found += hydra_job_runs(root)
    unique: dict[Path, FoundRun] = {}
    for run in found:
        key = run.path.resolve()
        if key not in unique or (unique[key].note and not run.note):
            unique[key] = run
    return list(unique.values())
