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
    """Check values: finite labels and non-negative ids. Vectorised; raises `DatasetError` on the first problem.

    Only the spec's columns present in `df` are checked, so a projection of a day can be validated too.
    """
    if spec.label in df.columns:
        _validate_label(df.get_column(spec.label), spec, source)
    for f in spec.sparse:
        if f.column in df.columns:
            _validate_ids(df.get_column(f.column), f.multi_hot, source)
    for c in spec.dense:
        col = df.get_column(c) if c in df.columns else None
        if col is not None and col.dtype.is_float() and (~col.is_finite()).any():
            raise DatasetError(
                source, "has non-finite dense values", "impute missing values (e.g. 0) before writing", column=c
            )


def _validate_label(label: pl.Series, spec: DatasetSpec, source: str | Path) -> None:
    if label.dtype.is_float():
        bad = ~label.is_finite() | label.is_null()
    else:
        bad = label.is_null()
    if bad.any():
        idx = int(bad.arg_max() or 0)
        raise DatasetError(
            source,
            f"label is {label[idx]} in row {idx}; labels must be finite numbers ({bad.sum()} rows are not)",
            "drop or repair those rows before ingesting",
            column=spec.label,
        )
    if spec.task == "binary":
        if (out_of_range := (label != 0) & (label != 1)).any():
            idx = int(out_of_range.arg_max() or 0)
            raise DatasetError(
                source, f"label is {label[idx]} in row {idx}, expected 0 or 1 for task binary",
                "binarise the label (e.g. rating >= 4) or set task: regression", column=spec.label,
            )


def _validate_ids(col: pl.Series, multi_hot: bool, source: str | Path) -> None:
    values = col.explode() if multi_hot else col
    if values.null_count():
        idx = int((col.list.eval(pl.element().is_null()).list.any() if multi_hot else col.is_null()).arg_max() or 0)
        raise DatasetError(
            source, f"id is missing in row {idx}", "fill missing ids with a dedicated id (e.g. 0)", column=col.name
        )
    if values.len() and (neg := values < 0).any():
        raise DatasetError(
            source,
            f"has negative id {values.filter(neg)[0]} ({neg.sum()} in all); ids must be >= 0",
            "map raw ids to non-negative integers (hash strings with the ingest's --id-mode hash)",
            column=col.name,
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
        schema = self.days[0].files[0]
        for day in self.days:
            # Reading a footer is cheap: check every file, so a bad one is named before training starts.
            for f in day.files:
                self.spec.check_schema(pl.read_parquet_schema(f), f)
        logger.debug("opened %s: %d days, first schema from %s", self.root, len(self.days), schema)

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
        """A lazy scan of the given days (all by default) with a `day` column, in day order."""
        frames = [
            pl.scan_parquet(list(d.files)).with_columns(pl.lit(d.date).alias(DAY_COLUMN))
            for d in (self.days if days is None else days)
        ]
        return pl.concat(frames, how="vertical")

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
