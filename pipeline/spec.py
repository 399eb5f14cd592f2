"""The dataset spec: `dataset.yaml` beside the day-partitioned Parquet files (DESIGN.md decision 2).

It names each column's role: the label (and the task it defines), an optional timestamp, the sparse id fields
(int64, or list<int64> for multi-hot) in the feature order the model sees, and the dense fields. A free-form
`meta` mapping carries provenance (the source files, the rule used to assign days, a generator's ground truth).

Example::

    format: dimsearch-dataset
    version: 1
    name: ml-1m
    task: binary
    label: label
    timestamp: timestamp
    user_field: user
    item_field: item
    sparse:
      - {name: user, column: user}
      - {name: genres, column: genres, multi_hot: true}
    dense: []
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import polars as pl
import yaml

from pipeline.errors import SpecError

SPEC_FILE = "dataset.yaml"
SPEC_FORMAT = "dimsearch-dataset"
SPEC_VERSION = 1
Task = Literal["binary", "regression", "multiclass"]
TASKS: tuple[str, ...] = ("binary", "regression", "multiclass")
_TOP_KEYS = {
    "format",
    "version",
    "name",
    "task",
    "label",
    "num_classes",
    "timestamp",
    "user_field",
    "item_field",
    "split",
    "sparse",
    "dense",
    "meta",
}
_SPARSE_KEYS = {"name", "column", "multi_hot"}


@dataclass(frozen=True)
class SparseField:
    """One sparse id feature.

    Args:
        name: the feature name (the KJT key and the embedding table's feature).
        column: the Parquet column holding the raw ids.
        multi_hot: the column is list<int64> (several ids per example) rather than int64.
    """

    name: str
    column: str
    multi_hot: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """The roles of a dataset's columns. See the module docstring for the YAML form.

    Args:
        name: a short name of the dataset.
        task: what the label means: `binary` (0/1), `regression` (a real value) or `multiclass` (0..C-1).
        label: the label column.
        sparse: the sparse features, in the order the model sees them.
        dense: the dense (float) columns, in order.
        timestamp: the timestamp column (seconds since the epoch), if any.
        user_field: the sparse feature that identifies the user, if any (per-user splits, ranking).
        item_field: the sparse feature that identifies the item, if any.
        num_classes: the number of classes of a `multiclass` task.
        split: a string column holding a split given by the source (`train`/`valid`/`test`), if any.
        meta: free-form provenance.
    """

    name: str
    task: Task
    label: str
    sparse: tuple[SparseField, ...]
    dense: tuple[str, ...] = ()
    timestamp: str | None = None
    user_field: str | None = None
    item_field: str | None = None
    num_classes: int | None = None
    split: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.task not in TASKS:
            problems.append(f"task is '{self.task}', expected one of {list(TASKS)}")
        if not self.sparse:
            problems.append("no sparse fields: a dataset needs at least one sparse id field")
        names = [f.name for f in self.sparse]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"sparse feature names repeat: {dup}")
        columns = [self.label, *(f.column for f in self.sparse), *self.dense]
        columns += [c for c in (self.timestamp, self.split) if c]
        if dup := sorted({c for c in columns if columns.count(c) > 1}):
            problems.append(f"columns used in more than one role: {dup}")
        for role, value in (("user_field", self.user_field), ("item_field", self.item_field)):
            if value is not None and value not in names:
                problems.append(f"{role} is '{value}', which is not a sparse feature name (have {names})")
        if self.task == "multiclass" and (self.num_classes is None or self.num_classes < 2):
            problems.append(f"task multiclass needs num_classes >= 2, got {self.num_classes}")
        if problems:
            raise SpecError(SPEC_FILE, "; ".join(problems), "correct the spec's fields as described")

    @property
    def feature_names(self) -> list[str]:
        """The sparse feature names in model order."""
        return [f.name for f in self.sparse]

    def field(self, name: str) -> SparseField:
        """The sparse field called `name`."""
        for f in self.sparse:
            if f.name == name:
                return f
        raise KeyError(f"no sparse feature '{name}' in dataset '{self.name}' (have {self.feature_names})")

    @property
    def columns(self) -> list[str]:
        """Every column the spec names, in a stable order."""
        cols = [self.label, *(f.column for f in self.sparse), *self.dense]
        return cols + [c for c in (self.timestamp, self.split) if c]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sparse"] = [asdict(f) for f in self.sparse]
        d["dense"] = list(self.dense)
        d["meta"] = dict(self.meta)
        return {"format": SPEC_FORMAT, "version": SPEC_VERSION, **d}

    def save(self, directory: Path) -> Path:
        path = Path(directory) / SPEC_FILE
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def check_schema(self, schema: Mapping[str, pl.DataType], source: str | Path) -> None:
        """Raise `SpecError` naming the column if `schema` (one Parquet file's) does not fit this spec."""
        for col in self.columns:
            if col not in schema:
                raise SpecError(
                    source,
                    f"the spec names column '{col}' but the file has no such column (it has {list(schema)})",
                    f"add the column to the data, or correct {SPEC_FILE} to name an existing column",
                    column=col,
                )
        checks: list[tuple[str, str, bool]] = [(self.label, "a numeric label", schema[self.label].is_numeric())]
        for f in self.sparse:
            dtype = schema[f.column]
            if f.multi_hot:
                ok = isinstance(dtype, pl.List) and _is_id_type(dtype.inner)
                checks.append((f.column, "list<int64> (multi_hot: true)", ok))
            else:
                checks.append((f.column, "int64 ids", _is_id_type(dtype)))
        checks += [(c, "a numeric dense value", schema[c].is_numeric()) for c in self.dense]
        if self.timestamp:
            ts = schema[self.timestamp]
            checks.append((self.timestamp, "integer seconds or a datetime", ts.is_integer() or ts == pl.Datetime))
        if self.split:
            checks.append((self.split, "strings train/valid/test", schema[self.split] == pl.String))
        for col, expected, ok in checks:
            if not ok:
                raise SpecError(
                    source,
                    f"has type {schema[col]}, expected {expected}",
                    "cast the column when writing the Parquet file (re-run the ingest), or correct the role "
                    f"given to '{col}' in {SPEC_FILE}",
                    column=col,
                )


def _is_id_type(dtype: Any) -> bool:
    return bool(dtype.is_integer()) and dtype != pl.UInt64


def load_spec(directory: str | Path) -> DatasetSpec:
    """Read and validate `directory/dataset.yaml`.

    Raises:
        SpecError: the file is missing, is not YAML, has unknown or missing keys or bad values.
    """
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise SpecError(
            path,
            "no dataset spec here",
            "ingest the data with `python -m pipeline.ingest` or `python -m pipeline.synthetic`, which write it",
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(path, f"is not valid YAML ({e})", "fix the YAML syntax") from e
    if not isinstance(raw, dict):
        raise SpecError(path, f"holds a {type(raw).__name__}, expected a mapping", "see pipeline/spec.py")
    if unknown := sorted(set(raw) - _TOP_KEYS):
        raise SpecError(path, f"unknown keys {unknown}", f"use only {sorted(_TOP_KEYS)}")
    if raw.get("format") != SPEC_FORMAT or raw.get("version") != SPEC_VERSION:
        raise SpecError(
            path,
            f"format/version is {raw.get('format')}/{raw.get('version')}, expected {SPEC_FORMAT}/{SPEC_VERSION}",
            "re-run the ingest with this version of dimsearch",
        )
    missing = [k for k in ("name", "task", "label", "sparse") if k not in raw]
    if missing:
        raise SpecError(path, f"missing keys {missing}", "add them (see pipeline/spec.py)")
    sparse: list[SparseField] = []
    for i, item in enumerate(raw["sparse"] or []):
        if isinstance(item, str):
            item = {"name": item, "column": item}
        if not isinstance(item, dict) or "name" not in item:
            raise SpecError(path, f"sparse[{i}] is {item!r}", "write each as {name: ..., column: ...}")
        if unknown := sorted(set(item) - _SPARSE_KEYS):
            raise SpecError(path, f"sparse[{i}] has unknown keys {unknown}", f"use only {sorted(_SPARSE_KEYS)}")
        sparse.append(
            SparseField(str(item["name"]), str(item.get("column", item["name"])), bool(item.get("multi_hot")))
        )
    try:
        return DatasetSpec(
            name=str(raw["name"]),
            task=cast(Task, raw["task"]),
            label=str(raw["label"]),
            sparse=tuple(sparse),
            dense=tuple(str(c) for c in raw.get("dense") or ()),
            timestamp=raw.get("timestamp"),
            user_field=raw.get("user_field"),
            item_field=raw.get("item_field"),
            num_classes=raw.get("num_classes"),
            split=raw.get("split"),
            meta=raw.get("meta") or {},
        )
    except SpecError as e:
        raise SpecError(path, e.problem, e.fix) from e
