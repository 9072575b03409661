"""README.md stays short, and its configuration reference stays what pipeline/config.py says."""

from __future__ import annotations

from dataclasses import fields

from pipeline.config import JobConfig
from pipeline.config_reference import END, README, START, config_reference, write_readme

MAX_LINES = 250


def test_readme_config_reference_is_current():
    text = README.read_text()
    assert START in text and END in text, f"README.md lost its {START.strip()} ... {END} markers"
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert block == config_reference(), (
        "README.md's configuration reference is out of date with pipeline/config.py or conf/: "
        "run `python -m pipeline.config_reference --write`"
    )


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines; keep it to {MAX_LINES} and move detail to docs/"


def test_reference_lists_every_group_and_key():
    reference = config_reference()
    for group in fields(JobConfig):
        assert f"| **{group.name}** |" in reference
        for f in fields(group.default_factory):
            assert f"| `{group.name}.{f.name}` |" in reference


def test_write_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{START}stale\n{END}\nafter\n")
    write_readme(readme)
    assert readme.read_text() == f"before\n{START}{config_reference()}{END}\nafter\n"
