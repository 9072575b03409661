"""The generate job's configuration reference as Markdown, rendered from pipeline/config.py itself: the
dataclasses give each key's type and default, the source's comments its meaning (a field's trailing
comment and the comment lines directly above it), `validate`'s choices the values it accepts, and conf/
each group's options. README.md holds the result between its config-reference markers; docs/cost_study.md
holds jobs.cost_study's, rendered the same way from pipeline/cost_study.py and conf/cost_study.yaml.

python -m pipeline.config_reference            prints the generate job's
python -m pipeline.config_reference --write    rewrites the blocks in README.md and docs/cost_study.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import tokenize
from pathlib import Path

import yaml

from pipeline import config, cost_study

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COST_STUDY_DOC = ROOT / "docs" / "cost_study.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """({line: comment text}, the lines that hold nothing but a comment)."""
    comments, alone = {}, set()
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            comments[row] = tok.string.lstrip("#").strip()
            if lines[row - 1].lstrip().startswith("#"):
                alone.add(row)
    return comments, alone


def _fields(source: str) -> dict[tuple[str, str], tuple[str, str]]:
    """{(class name, field): (its annotation, its comments)}: the comment block above it, then the
    trailing comment."""
    comments, alone = _comments(source)
    found = {}
    for cls in ast.parse(source).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above, row = [], node.lineno - 1
            while row in alone:
                above.insert(0, comments[row])
                row -= 1
            rows = range(node.lineno, node.end_lineno + 1)
            trailing = [comments[r] for r in rows if r in comments and r not in alone]
            parts = [" ".join(above), *trailing]
            found[cls.name, node.target.id] = ast.unparse(node.annotation), "; ".join(p for p in parts if p)
    return found


def _resolve(node: ast.expr) -> list[str]:
    """The values of a choice list in `validate`: a tuple of strings and starred module constants."""
    if isinstance(node, ast.Name):
        return list(getattr(config, node.id))
    if isinstance(node, ast.Starred):
        return _resolve(node.value)
    if isinstance(node, ast.Tuple):
        return [v for elt in node.elts for v in _resolve(elt)]
    if isinstance(node, ast.Constant):
        return [node.value]
    raise ValueError(f"cannot read the choices {ast.unparse(node)!r} in pipeline/config.py")


def _choices(source: str) -> dict[str, list[str]]:
    """{"group.key": its valid values}, from the `choice(...)` calls in pipeline/config.py."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "choice":
            key, _, valid = node.args
            found[ast.literal_eval(key)] = _resolve(valid)
    return found


def _value(value: object) -> str:
    if value is None:
        return "`null`"
    if value == config.MISSING:
        return "required"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(f: dataclasses.Field) -> object:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def config_reference() -> str:
    """The Markdown reference of every group and key of jobs.generate."""
    source = Path(inspect.getsourcefile(config)).read_text()
    fields, choices = _fields(source), _choices(source)
    picked = {}
    for entry in yaml.safe_load((ROOT / "conf" / "generate.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            picked |= entry
    out = [
        "`python -m jobs.generate [group=option] [group.key=value ...]` (`-m`: a sweep); a bad key or value "
        "stops it before it starts. Defaults are the schema's (`pipeline/config.py`); a group option "
        "(`conf/<group>/<option>.yaml`; in bold, the one `jobs.generate` picks) sets its own values on top.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for group in dataclasses.fields(config.JobConfig):
        schema = group.default_factory
        options = sorted(p.stem for p in (ROOT / "conf" / group.name).glob("*.yaml"))
        listed = ", ".join(f"**{o}**" if o == picked.get(group.name) else o for o in options)
        out.append(f"| **{group.name}** | `{schema.__name__}` | | options: {listed} |")
        last = None  # the last field above with a comment of its own
        for f in dataclasses.fields(schema):
            key = f"{group.name}.{f.name}"
            kind, meaning = fields[schema.__name__, f.name]
            if meaning:
                last = f.name
            elif last and re.search(rf"\b{f.name}\b", fields[schema.__name__, last][1]):
                meaning = f"see `{group.name}.{last}`"  # a comment above it explains it
            if key in choices:
                meaning = "; ".join(filter(None, [meaning, "one of: " + ", ".join(choices[key])]))
            out.append(f"| `{key}` | `{_cell(kind)}` | {_cell(_value(_default(f)))} | {_cell(meaning)} |")
    return "\n".join(out) + "\n"


def _flow(value: object) -> str:
    """A conf value as YAML flow, as one would type it on the command line."""
    if isinstance(value, dict | list):
        return f"`{yaml.safe_dump(value, default_flow_style=True, width=1000, sort_keys=False).strip()}`"
    return _value(value)


def cost_study_reference() -> str:
    """The Markdown reference of jobs.cost_study's keys: each key's type, its value in conf/cost_study.yaml
    (the schema's default where the file does not set it) and its comments in pipeline/cost_study.py."""
    fields = _fields(Path(inspect.getsourcefile(cost_study)).read_text())
    conf = yaml.safe_load((ROOT / "conf" / "cost_study.yaml").read_text())
    out = [
        "`python -m jobs.cost_study [key=value ...]`; a bad key or value stops it before any run is read. "
        "Defaults are `conf/cost_study.yaml`'s (schema: `pipeline/cost_study.py`); a new `prices` key needs "
        "a `+`: `+prices.L40=1.2`.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]

    def add(schema: type, prefix: str, values: dict) -> None:
        last = None  # the last field above with a comment of its own
        for f in dataclasses.fields(schema):
            key = prefix + f.name
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
                add(f.default_factory, f"{key}.", values.get(f.name) or {})
                continue
            kind, meaning = fields[schema.__name__, f.name]
            if meaning:
                last = f.name
            elif last and re.search(rf"\b{f.name}\b", fields[schema.__name__, last][1]):
                meaning = f"see `{prefix}{last}`"
            default = values[f.name] if f.name in values else _default(f)
            out.append(f"| `{key}` | `{_cell(kind)}` | {_cell(_flow(default))} | {_cell(meaning)} |")

    add(cost_study.CostStudyConfig, "", conf)
    return "\n".join(out) + "\n"


def write_block(path: Path, block: str) -> None:
    """Replace the text between a file's config-reference markers with block."""
    text = path.read_text()
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not (start and end):
        raise ValueError(f"{path} has no {START.strip()} ... {END} block")
    path.write_text(head + start + block + end + tail)


def write_readme(path: Path = README) -> None:
    """Replace the text between the README's config-reference markers with config_reference()."""
    write_block(path, config_reference())


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_readme()
        write_block(COST_STUDY_DOC, cost_study_reference())
        print(f"rewrote the config references in {README} and {COST_STUDY_DOC}")
    else:
        print(config_reference(), end="")
