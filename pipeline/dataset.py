"""Day-partitioned Parquet datasets on disk (DESIGN.md decision 2): writing them atomically, and reading them.

Layout::

    DIR/dataset.yaml
    DIR/day=YYYY-MM-DD/part-00000.parquet
    DIR/day=YYYY-MM-DD/part-00001.parquet ...

Writing goes to a temporary sibling directory that is renamed into place only when everything is written, so a
failure never leaves a half-written dataset behind. Reading validates the layout (every `day=` directory is a
date and holds at least one row), each file's schema against the spec, and the values (finite labels,
non-negative ids) of every frame it returns.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from pipeline.errors import DatasetError
from pipeline.spec import SPEC_FILE, DatasetSpec, load_spec

logger = logging.getLogger(__name__)

DAY_COLUMN = "day"
ROWS_PER_PART = 1_000_000


@contextlib.contextmanager
def atomic_directory(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block finishes without an exception.

    Raises:
        DatasetError: `out` exists and `overwrite` is False.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise DatasetError(out, "already exists", "choose another output directory or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def day_of(timestamp: pl.Expr) -> pl.Expr:
    """The UTC date of a timestamp in seconds since the epoch."""
    return pl.from_epoch(timestamp, time_unit="s").dt.date()


def write_dataset(
    df: pl.DataFrame,
    spec: DatasetSpec,
    out: str | Path,
    *,
    source: str | Path = "<data>",
    overwrite: bool = False,
    rows_per_part: int = ROWS_PER_PART,
) -> Path:
    """Validate `df` against `spec` and write it as a day-partitioned dataset at `out`, atomically.

    Args:
        df: the rows, with a `day` column of type Date beside the spec's columns. Rows keep their order within a day.
        spec: the column roles; saved as `out/dataset.yaml`.
        out: the dataset directory to create.
        source: the input the rows came from, named in errors.
        overwrite: replace `out` if it exists.
        rows_per_part: rows per Parquet file within a day.

    Returns:
        The dataset directory.

    Raises:
        DatasetError: the rows break the spec (missing column, wrong type, non-finite label, negative id), or a
            day has no rows, or `out` exists.
    """
    if DAY_COLUMN not in df.columns or df.schema[DAY_COLUMN] != pl.Date:
        raise DatasetError(source, f"the rows need a '{DAY_COLUMN}' column of type Date", "derive it with day_of()")
    spec.check_schema(df.schema, source)
    validate_frame(df, spec, source)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        parts = df.select([*spec.columns, DAY_COLUMN]).partition_by(DAY_COLUMN, as_dict=True, maintain_order=True)
        if not parts:
            raise DatasetError(source, "has no rows", "check the input file and the filters applied")
        for (day,), part in sorted(parts.items(), key=lambda kv: kv[0]):
            day_dir = tmp / f"{DAY_COLUMN}={day.isoformat()}"
            day_dir.mkdir()
            part = part.drop(DAY_COLUMN)
            for i, offset in enumerate(range(0, part.height, rows_per_part)):
                part.slice(offset, rows_per_part).write_parquet(day_dir / f"part-{i:05d}.parquet", statistics=True)
        spec.save(tmp)
    logger.info("wrote %d rows over %d days to %s", df.height, len(parts), out)
    return Path(out)


def validate_frame(df: pl.DataFrame, spec: DatasetSpec, source: str | Path) -> None:
    """Check values: finite labels (0/1 for a binary task), present and non-negative ids, finite dense values.

    One vectorised pass computes every check; only when one fails is the offending value located for the message.
    Only the spec's columns present in `df` are checked, so a projection of a day can be validated too.
    """
    checks: dict[str, pl.Expr] = {}
    if spec.label in df.columns:
        y = pl.col(spec.label)
        bad = y.is_null() | ~y.is_finite() if df.schema[spec.label].is_float() else y.is_null()
        checks["label"] = bad.any()
        if spec.task == "binary":
            checks["binary"] = ((y != 0) & (y != 1)).any()
    for f in spec.sparse:
        if f.column in df.columns:
            ids = pl.col(f.column).explode(empty_as_null=False) if f.multi_hot else pl.col(f.column)
            checks[f"null:{f.column}"] = ids.is_null().any()
            checks[f"neg:{f.column}"] = (ids < 0).any()
    for c in spec.dense:
        if c in df.columns and df.schema[c].is_float():
            checks[f"dense:{c}"] = (~pl.col(c).is_finite()).any()
    if not checks:
        return
    failed = [k for k, v in df.select(**checks).row(0, named=True).items() if v]
    if not failed:
        return
    kind, _, column = failed[0].partition(":")
    if kind == "label":
        label = df.get_column(spec.label)
        bad_rows = label.is_null() | (~label.is_finite() if label.dtype.is_float() else False)
        idx = int(bad_rows.arg_max() or 0)
        raise DatasetError(
            source,
            f"label is {label[idx]} in row {idx}; labels must be finite numbers ({bad_rows.sum()} rows are not)",
            "drop or repair those rows before ingesting",
            column=spec.label,
        )
    if kind == "binary":
        label = df.get_column(spec.label)
        idx = int(((label != 0) & (label != 1)).arg_max() or 0)
        raise DatasetError(
            source,
            f"label is {label[idx]} in row {idx}, expected 0 or 1 for task binary",
            "binarise the label (e.g. rating >= 4) or set task: regression",
            column=spec.label,
        )
    if kind == "null":
        col = df.get_column(column)
        rows = col.list.eval(pl.element().is_null()).list.any() if col.dtype == pl.List else col.is_null()
        raise DatasetError(
            source,
            f"id is missing in row {int(rows.arg_max() or 0)}",
            "fill missing ids with a dedicated id (e.g. 0)",
            column=column,
        )
    if kind == "neg":
        col = df.get_column(column)
        values = col.explode(empty_as_null=False) if col.dtype == pl.List else col
        neg = values < 0
        raise DatasetError(
            source,
            f"has negative id {values.filter(neg)[0]} ({neg.sum()} in all); ids must be >= 0",
            "map raw ids to non-negative integers (hash strings with the ingest's --id-mode hash)",
            column=column,
        )
    raise DatasetError(
        source, "has non-finite dense values", "impute missing values (e.g. 0) before writing", column=column
    )


@dataclass(frozen=True)
class Day:
    """One day partition: its date, its Parquet files and their total row count."""

    date: dt.date
    files: tuple[Path, ...]
    num_rows: int

    @property
    def name(self) -> str:
        return self.date.isoformat()


class Dataset:
    """A day-partitioned dataset on disk, validated on open.

    Args:
        root: the directory holding `dataset.yaml` and the `day=YYYY-MM-DD` partitions.

    Raises:
        DatasetError: the directory, the spec, a day directory or a file's schema is bad.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(self.root, "no such dataset directory", "ingest or generate the data first")
        self.spec: DatasetSpec = load_spec(self.root)
        self.days: list[Day] = self._scan_days()
        for day in self.days:
            # Reading a footer is cheap: check every file, so a bad one is named before training starts.
            for f in day.files:
                self.spec.check_schema(pl.read_parquet_schema(f), f)
        logger.debug("opened %s: %d days, %d rows", self.root, len(self.days), self.num_rows)

    def _scan_days(self) -> list[Day]:
        days: list[Day] = []
        for entry in sorted(self.root.iterdir()):
            if entry.name == SPEC_FILE or entry.name.startswith("."):
                continue
            if not entry.is_dir() or not entry.name.startswith(f"{DAY_COLUMN}="):
                raise DatasetError(
                    entry,
                    f"is not a '{DAY_COLUMN}=YYYY-MM-DD' partition",
                    "remove it from the dataset directory (only dataset.yaml and day partitions belong there)",
                )
            value = entry.name.split("=", 1)[1]
            try:
                date = dt.date.fromisoformat(value)
            except ValueError:
                raise DatasetError(
                    entry,
                    f"day directory '{value}' is not a date",
                    f"rename it to {DAY_COLUMN}=YYYY-MM-DD (e.g. {DAY_COLUMN}=2024-01-31) or remove it",
                ) from None
            if len(value) != 10:
                raise DatasetError(entry, f"day '{value}' is not written as YYYY-MM-DD", f"rename it to {date}")
            files = tuple(sorted(entry.glob("*.parquet")))
            rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
            if rows == 0:
                raise DatasetError(
                    entry,
                    "is an empty day (no Parquet rows)",
                    "remove the empty partition, or re-run the ingest so that it holds that day's rows",
                )
            days.append(Day(date, files, rows))
        if not days:
            raise DatasetError(self.root, "holds no day partitions", "ingest or generate the data first")
        return days

    @cached_property
    def num_rows(self) -> int:
        return sum(d.num_rows for d in self.days)

    def day(self, name: str | dt.date) -> Day:
        date = dt.date.fromisoformat(name) if isinstance(name, str) else name
        for d in self.days:
            if d.date == date:
                return d
        raise KeyError(f"{self.root}: no day {date} (have {self.days[0].name} .. {self.days[-1].name})")

    def scan(self, days: list[Day] | None = None) -> pl.LazyFrame:
        """A lazy scan of the given days (all by default) with a `day` column, in day order.

        One multi-file scan with the day taken from the hive path: one scan per day would be slow for
        datasets with thousands of days.
        """
        files = [f for d in (self.days if days is None else days) for f in d.files]
        return pl.scan_parquet(files, hive_partitioning=True, hive_schema={DAY_COLUMN: pl.Date})

    def read_day(
        self, day: Day, columns: list[str] | None = None, offset: int = 0, length: int | None = None
    ) -> pl.DataFrame:
        """Read rows `[offset, offset+length)` of one day (slice pushed down to the Parquet reader), validated."""
        lf = pl.scan_parquet(list(day.files))
        if columns is not None:
            lf = lf.select(columns)
        if offset or length is not None:
            lf = lf.slice(offset, length)
        df = lf.collect()
        validate_frame(df, self.spec, day.files[0].parent)
        return df
