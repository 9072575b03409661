"""Reading a corpus with Ray Data and giving every row a stable id.

The id is the configured id column, or else a content hash of the whole row, so a rerun over the same
corpus finds the same ids (resume relies on it). Ids must be unique: a repeated id value or two
identical rows without an id column stop the job before any actor starts, naming the rows.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import DataConfig, TaskConfig

EXTENSIONS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
ID = "id"


def detect_format(path: Path) -> tuple[str, list[str]]:
    """(format, files) for a file, a folder of files, or a folder saved by datasets.save_to_disk."""
    if path.is_dir() and (path / "state.json").exists() and (path / "dataset_info.json").exists():
        return "hf_disk", [str(path)]
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.suffix in EXTENSIONS)
    if not files:
        raise FileNotFoundError(
            f"data.path={str(path)!r} holds no .parquet, .jsonl, .json or .csv file, nor a dataset saved "
            "with datasets.save_to_disk"
        )
    formats = {EXTENSIONS[p.suffix] for p in files}
    if len(formats) > 1:
        raise ValueError(f"data.path={str(path)!r} mixes formats {sorted(formats)}; give one format per run")
    return formats.pop(), [str(p) for p in files]


def read(cfg: DataConfig) -> ray.data.Dataset:
    path = Path(cfg.path).expanduser().resolve()
    fmt, files = detect_format(path)
    if cfg.format != "auto" and cfg.format != fmt:
        raise ValueError(f"data.format={cfg.format!r} but data.path={cfg.path!r} holds {fmt}")
    if fmt == "parquet":
        ds = ray.data.read_parquet(files)
    elif fmt == "jsonl":
        ds = ray.data.read_json(files, lines=True)
    elif fmt == "csv":
        ds = ray.data.read_csv(files)
    else:
        import datasets  # only this source needs it

        ds = ray.data.from_arrow(datasets.load_from_disk(str(path)).data.table)
    return ds.limit(cfg.limit) if cfg.limit else ds


def read_all(cfg: DataConfig) -> ray.data.Dataset:
    """The corpus, read once (materialized). A file the reader rejects stops the job here, before any actor
    starts. JSONL is checked line by line first (Ray's reader takes a column that mixes text and numbers,
    and fails later, in the actors), and its errors name the file, the line and what is wrong."""
    fmt, files = detect_format(Path(cfg.path).expanduser().resolve())
    problem = first_jsonl_problem(files) if fmt == "jsonl" else None
    if problem:
        raise ValueError(f"data.path={cfg.path!r}: {problem}; fix or remove it and run again")
    try:
        return read(cfg).materialize()
    except (FileNotFoundError, ValueError) as e:
        if str(e).startswith("data.") and not isinstance(e, ray.exceptions.RayError):  # ours: names the key
            raise
        error = e
    except Exception as e:  # Arrow's and Ray's read errors name neither the file nor the line
        error = e
    raise ValueError(
        f"data.path={cfg.path!r} cannot be read as {fmt}: {type(error).__name__}: {error}"
    ) from None


def first_jsonl_problem(files: list[str]) -> str | None:
    """'FILE line N: what is wrong' for the first line that is not UTF-8, not a JSON object, or gives a
    column another kind of value (text, number, boolean, list, object) than its earlier lines did."""
    kinds: dict[str, tuple[str, str]] = {}  # column -> (kind, where first seen)
    for path in files:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                where = f"{path} line {number}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"{where} is not valid UTF-8 (byte {e.start})"
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    return f"{where} is not valid JSON ({e.msg} at column {e.colno})"
                if not isinstance(row, dict):
                    return f"{where} is a JSON {type(row).__name__}, not an object"
                for column, value in row.items():
                    kind = _json_kind(value)
                    if kind is None:
                        continue
                    seen = kinds.setdefault(column, (kind, where))
                    if seen[0] != kind:
                        return f"{where}: column {column!r} is {kind} here and {seen[0]} at {seen[1]}"
    return None


def _json_kind(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


def check_columns(ds: ray.data.Dataset, data: DataConfig, task: TaskConfig) -> list[str]:
    """The corpus's columns; every column the config names must be among them."""
    columns = list(ds.schema().names)
    wanted = {"task.input_column": task.input_column, "data.id_column": data.id_column}
    wanted |= {"task.reference_column": task.reference_column}
    wanted |= {f"data.keep_columns[{i}]": c for i, c in enumerate(data.keep_columns)}
    for key, column in wanted.items():
        if column is not None and column not in columns:
            raise ValueError(f"{key}={column!r} is not a column of {data.path}; its columns are {columns}")
    return columns


def row_hash(value: object) -> str:
    """A row's input text (or any value) as a short hash: what a resume compares to find changed rows."""
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def input_hashes(ds: ray.data.Dataset, data: DataConfig, column: str) -> dict[str, str]:
    """id -> row_hash of the row's `column`, for every row."""
    hashes = {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=65536):
        with_id = assign_ids(batch, data.id_column)
        for row_id, value in zip(
            with_id.column(ID).to_pylist(), batch.column(column).to_pylist(), strict=True
        ):
            hashes[row_id] = row_hash(value)
    return hashes


def content_id(row: dict) -> str:
    blob = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:20]


def assign_ids(batch: pa.Table, id_column: str | None) -> pa.Table:
    """map_batches: adds the `id` column (string) from the id column or a content hash of the row."""
    if id_column is not None:
        ids = pc.cast(batch.column(id_column), pa.string())
    else:
        ids = pa.array([content_id(row) for row in batch.to_pylist()], pa.string())
    if ID in batch.column_names:
        batch = batch.drop_columns([ID])
    return batch.append_column(ID, ids)


def with_ids(ds: ray.data.Dataset, data: DataConfig) -> ray.data.Dataset:
    return ds.map_batches(assign_ids, fn_kwargs={"id_column": data.id_column}, batch_format="pyarrow")


def input_ids(ds: ray.data.Dataset, data: DataConfig) -> list[str]:
    """Every row's id, in order (the same function with_ids applies in the workers); refuses null or
    repeated ids, naming the rows that share them."""
    ids: list[str | None] = []
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=65536):
        ids.extend(assign_ids(batch, data.id_column).column(ID).to_pylist())
    if None in ids:
        raise ValueError(
            f"data.id_column={data.id_column!r} is null at row {ids.index(None)}; every row needs an id"
        )
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        first = repeated[0]
        rows = [n for n, i in enumerate(ids) if i == first][:5]
        if data.id_column:
            raise ValueError(
                f"data.id_column={data.id_column!r} is not unique: {first!r} is the id of rows {rows} "
                f"({len(repeated)} repeated ids in all); choose a unique column, or unset it to use content "
                "hashes"
            )
        raise ValueError(
            f"rows {rows} of {data.path} are identical ({len(repeated)} repeated rows in all), so their "
            "content hashes collide; give each row a unique id column (data.id_column) or remove duplicates"
        )
    return ids  # type: ignore[return-value]


def arrow_types(ds: ray.data.Dataset, columns: list[str]) -> dict[str, pa.DataType]:
    """Each column's Arrow type over the whole (materialized) dataset, whose blocks may be Arrow or pandas:
    a batch whose values are all null would otherwise type its column null. Columns whose type cannot be
    told (pandas object dtype) are left out."""
    schema = ds.schema()
    types = {}
    for name, kind in zip(schema.names, schema.types, strict=True):
        if name not in columns:
            continue
        kind = kind if isinstance(kind, pa.DataType) else pa.Array.from_pandas(pd.Series([], dtype=kind)).type
        if not pa.types.is_null(kind):
            types[name] = kind
    return types
