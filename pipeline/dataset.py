"""Day-partitioned Parquet datasets on disk (DESIGN.md decision 2): writing them atomically, and reading them.

Layout::

    DIR/dataset.yaml
    DIR/day=YYYY-MM-DD/part-00000.parquet
    DIR/day=YYYY-MM-DD/part-00001.parquet ...

Writing goes to a temporary sibling directory that is renamed into place only when everything is written, so a
failure never leaves a half-written dataset behind. `check_output_dir` is the one guard every command that
replaces a directory (ingest, the synthetic generator, export, evaluate) runs before any work: it refuses an output
that is, contains or lies inside one of the command's inputs, and an existing directory that is not what the
command writes (a training run, a dataset where a bundle belongs, a folder of someone's files), so nothing is
ever deleted that the command did not write itself.

Reading validates the layout (every `day=` directory is a date and holds at least one row), each file's footer and
schema against the spec when the dataset is opened, and the values (finite labels, non-negative ids) of every frame
it returns. `Dataset.check_values` checks the values of whole files up front (one lazy pass per file, the verdict
cached per file), so a job can refuse bad data before its first day trains, naming the file, column and row; a
frame read from files that passed is not checked again. A truncated or damaged Parquet file is a `DatasetError`
naming the file, wherever it is read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DatasetError, SpecError
from pipeline.spec import SPEC_FILE, DatasetSpec, load_spec
from pipeline.vocab import FALLBACK_ROW, HashTable

logger = logging.getLogger(__name__)

DAY_COLUMN = "day"
ROWS_PER_PART = 1_000_000
_FILES_CHECKED_AT_ONCE = 4  # `Dataset.check_values` runs this many files' checks in parallel
# What polars and pyarrow raise on a file that is not (or no longer) valid Parquet.
PARQUET_ERRORS: tuple[type[BaseException], ...] = (pl.exceptions.PolarsError, pa.ArrowException, OSError)
FIX_UNREADABLE = (
    "restore the file from a backup, or re-create the dataset (re-run `python -m pipeline.ingest` or "
    "`python -m pipeline.synthetic` with --overwrite)"
)


# ---- the output guard ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputKind:
    """What a command writes into its output directory; an existing directory is replaced only by its own kind.

    Args:
        name: what it is, in messages (`dataset`, `bundle`, `report`).
        marker: the file every directory of this kind holds (`dataset.yaml`, `bundle.json`, `report.md`).
        entries: glob patterns of the only names such a directory holds (the marker among them).
    """

    name: str
    marker: str
    entries: tuple[str, ...]

    def foreign_entries(self, directory: Path) -> list[str]:
        """The names in `directory` that a directory of this kind does not hold."""
        return sorted(
            p.name for p in directory.iterdir() if not any(fnmatch.fnmatchcase(p.name, g) for g in self.entries)
        )


DATASET_OUTPUT = OutputKind("dataset", SPEC_FILE, (SPEC_FILE, f"{DAY_COLUMN}=*"))


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _looks_like_run(directory: Path) -> bool:
    return (directory / "config.yaml").is_file() and (
        (directory / "checkpoints").is_dir() or (directory / "metrics.jsonl").is_file()
    )


def _looks_like_dataset(directory: Path) -> bool:
    return (directory / SPEC_FILE).is_file() and not DATASET_OUTPUT.foreign_entries(directory)


def check_output_dir(
    out: str | Path,
    *,
    kind: OutputKind,
    protected: Mapping[str, str | Path] | None = None,
    overwrite: bool = False,
    flag: str = "--out",
) -> Path:
    """Refuse an output directory whose writing or replacing would destroy something the command did not write.

    Call it before any work (nothing on disk changes when it refuses). Paths are compared as resolved real paths,
    so a symbolic link or `..` does not hide an input.

    Args:
        out: the directory the command is about to create or replace.
        kind: what the command writes there.
        protected: the command's inputs, by what to call them in messages (e.g. `{"--src": src}`); `out` may
            not be one of them, contain one, or lie inside one.
        overwrite: whether the command may replace an existing `out` of its own kind.
        flag: the option that names `out`, for messages.

    Returns:
        `out`, as given.

    Raises:
        DatasetError: naming `out`, what was expected there and the fix.
    """
    out = Path(out)
    real = _real(out)
    for name, path in (protected or {}).items():
        p = _real(path)
        outside = f"choose an {flag} outside {name} {path} (e.g. a sibling directory of it)"
        if real == p:
            raise DatasetError(
                out, f"is {name} {path} itself; writing the {kind.name} here would replace that input", outside
            )
        if real in p.parents:
            raise DatasetError(
                out, f"contains {name} {path}; replacing it with the {kind.name} would delete that input", outside
            )
        if p in real.parents:
            raise DatasetError(
                out, f"lies inside {name} {path}; the {kind.name} would be written into that input", outside
            )
    if out.is_symlink():
        raise DatasetError(
            out,
            f"is a symbolic link (to {os.readlink(out)}), expected a {kind.name} directory or a new path",
            f"pass the directory the link points to as {flag}, or a new path",
        )
    if not out.exists():
        return out
    expected = f"a {kind.name} directory holds {kind.marker} and only {', '.join(kind.entries)}"
    new_path = f"choose another {flag} (a new path)"
    if not out.is_dir():
        raise DatasetError(out, f"exists and is a file; expected a new path or a {kind.name} directory", new_path)
    if _looks_like_run(out):
        raise DatasetError(
            out,
            f"exists and is not a {kind.name} directory: it holds a training run (config.yaml with checkpoints/ or "
            "metrics.jsonl), which replacing it would delete",
            f"{new_path}; a training run is never replaced",
        )
    if kind is not DATASET_OUTPUT and _looks_like_dataset(out):
        raise DatasetError(
            out,
            f"exists and is not a {kind.name} directory: it holds a dataset ({SPEC_FILE} and day partitions), "
            "which replacing it would delete",
            f"{new_path}; a dataset is replaced only by a dataset",
        )
    entries = sorted(p.name for p in out.iterdir())
    if entries:
        foreign = kind.foreign_entries(out)
        if not (out / kind.marker).is_file() or foreign:
            shown = foreign or entries
            listed = ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
            raise DatasetError(
                out,
                f"exists and is not a {kind.name} directory ({expected}): it holds {listed}, which replacing it "
                "would delete",
                f"{new_path}, or move those files away yourself if the directory is disposable",
            )
    if not overwrite:
        what = f"an earlier {kind.name}" if entries else "an empty directory"
        raise DatasetError(out, f"already exists ({what})", f"choose another {flag} or pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_directory(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block finishes without an exception.

    This replaces `out` whole: commands check `out` with `check_output_dir` first.

    Raises:
        DatasetError: `out` exists and `overwrite` is False.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise DatasetError(out, "already exists", "choose another output directory or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # what a killed earlier write of `out` left
        shutil.rmtree(stale, ignore_errors=True)
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
    protected: Mapping[str, str | Path] | None = None,
) -> Path:
    """Validate `df` against `spec` and write it as a day-partitioned dataset at `out`, atomically.

    Args:
        df: the rows, with a `day` column of type Date beside the spec's columns. Rows keep their order within a day.
        spec: the column roles; saved as `out/dataset.yaml`.
        out: the dataset directory to create.
        source: the input the rows came from, named in errors.
        overwrite: replace `out` if it exists (and is a dataset: see `check_output_dir`).
        rows_per_part: rows per Parquet file within a day.
        protected: the inputs `out` must stay clear of (see `check_output_dir`).

    Returns:
        The dataset directory.

    Raises:
        DatasetError: the rows break the spec (missing column, wrong type, non-finite label, negative id), or a
            day has no rows, or `out` exists (without `overwrite`, or holding something other than a dataset).
    """
    check_output_dir(out, kind=DATASET_OUTPUT, protected=protected, overwrite=overwrite)
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


# ---- value checks ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Check:
    """One value check: `bad` is true on the offending rows; `value` is what the message quotes."""

    kind: str  # label | binary | null | neg | dense
    column: str
    bad: pl.Expr
    value: pl.Expr


def _value_checks(spec: DatasetSpec, schema: Mapping[str, Any]) -> list[_Check]:
    """The value checks of `spec` on the columns of `schema` that it names, in the order failures are reported."""
    checks: list[_Check] = []
    if spec.label in schema:
        y = pl.col(spec.label)
        bad = y.is_null() | ~y.is_finite() if schema[spec.label].is_float() else y.is_null()
        checks.append(_Check("label", spec.label, bad, y))
        if spec.task == "binary":
            checks.append(_Check("binary", spec.label, (y != 0) & (y != 1), y))
    for f in spec.sparse:
        if f.column not in schema:
            continue
        ids = pl.col(f.column)
        if isinstance(schema[f.column], pl.List):
            # A missing list counts as a missing id, as an empty one does not (a bag may be empty).
            null = ids.is_null() | ids.list.eval(pl.element().is_null()).list.any()
            checks.append(_Check("null", f.column, null, ids))
            checks.append(_Check("neg", f.column, ids.list.min() < 0, ids.list.min()))
        else:
            checks.append(_Check("null", f.column, ids.is_null(), ids))
            checks.append(_Check("neg", f.column, ids < 0, ids))
    for c in spec.dense:
        if c in schema and schema[c].is_float():
            checks.append(_Check("dense", c, ~pl.col(c).is_finite(), pl.col(c)))
    return checks


def _check_aggregations(checks: list[_Check]) -> list[pl.Expr]:
    """Per check: how many rows fail, the first failing row and its value; one vectorised pass computes them all."""
    exprs: list[pl.Expr] = []
    for i, c in enumerate(checks):
        bad = c.bad.fill_null(False)
        exprs += [
            bad.sum().alias(f"n{i}"),
            bad.arg_true().first().alias(f"row{i}"),  # not arg_max: it need not pick the first of equal maxima
            c.value.filter(bad).first().alias(f"value{i}"),
        ]
    return exprs


def _raise_first_failure(checks: list[_Check], result: Mapping[str, Any], source: str | Path) -> None:
    """Raise the `DatasetError` of the first failed check in `result` (a row of `_check_aggregations`), if any."""
    for i, c in enumerate(checks):
        n = int(result[f"n{i}"] or 0)
        if not n:
            continue
        row, value = int(result[f"row{i}"] or 0), result[f"value{i}"]
        where = f"in row {row}" + (f" ({n:,} rows in all)" if n > 1 else "")
        if c.kind == "label":
            raise DatasetError(
                source,
                f"label is {value} {where}; labels must be finite numbers",
                "drop or repair those rows, then re-run the ingest",
                column=c.column,
            )
        if c.kind == "binary":
            raise DatasetError(
                source,
                f"label is {value} {where}, expected 0 or 1 for task binary",
                "binarise the label (e.g. rating >= 4) or set task: regression",
                column=c.column,
            )
        if c.kind == "null":
            raise DatasetError(
                source, f"id is missing {where}", "fill missing ids with a dedicated id (e.g. 0)", column=c.column
            )
        if c.kind == "neg":
            raise DatasetError(
                source,
                f"has negative id {value} {where}; ids must be >= 0",
                "map raw ids to non-negative integers (hash strings with the ingest's --id-mode hash)",
                column=c.column,
            )
        raise DatasetError(
            source,
            f"has non-finite dense value {value} {where}",
            "impute missing values (e.g. 0) before writing",
            column=c.column,
        )


def validate_frame(df: pl.DataFrame, spec: DatasetSpec, source: str | Path) -> None:
    """Check values: finite labels (0/1 for a binary task), present and non-negative ids, finite dense values.

    One vectorised pass computes every check (the same ones `Dataset.check_values` runs on whole files); the
    message names the first failing check's column, its first failing row and value. Only the spec's columns
    present in `df` are checked, so a projection of a day can be validated too.

    Raises:
        DatasetError: naming `source`, the column, the row and the fix.
    """
    if _frame_passes(df, spec):
        return
    checks = _value_checks(spec, df.schema)
    if checks:
        _raise_first_failure(checks, df.select(_check_aggregations(checks)).row(0, named=True), source)


def _frame_passes(df: pl.DataFrame, spec: DatasetSpec) -> bool:
    """Whether every value check of `validate_frame` passes on `df`, from whole-column reductions only.

    Null counts are column metadata and a minimum is one pass, where the checks' aggregations compute a mask, its
    first row and its value per check: this answers the common case (clean data) about 10x faster, and a frame
    that fails is re-checked by the aggregations, which name the row and the value.
    """
    schema = df.schema
    if spec.label in schema:
        y = df.get_column(spec.label)
        if y.null_count() or (schema[spec.label].is_float() and not y.is_finite().all()):
            return False
        if spec.task == "binary" and not ((y == 0) | (y == 1)).all():
            return False
    for f in spec.sparse:
        if f.column not in schema:
            continue
        ids = df.get_column(f.column)
        if isinstance(schema[f.column], pl.List):
            # Exploded with empty lists dropped, a null is a missing list or a missing id in one; both fail.
            ids = ids.explode(empty_as_null=False)
        if ids.null_count() or (ids.len() and ids.min() < 0):  # type: ignore[operator]
            return False
    return all(df.get_column(c).is_finite().all() for c in spec.dense if c in schema and schema[c].is_float())


def unreadable(path: str | Path, error: BaseException) -> DatasetError:
    """The `DatasetError` for a Parquet file that polars or pyarrow cannot read (truncated, damaged, not Parquet)."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DatasetError(
        path,
        f"cannot be read as Parquet ({reason[:200]}); the file is truncated, damaged or not a Parquet file",
        FIX_UNREADABLE,
    )


# Files whose values passed `check_values`, keyed by (real path, size, mtime in ns) and the spec's checks: a file
# that is rewritten gets another key, so it is checked again.
_PASSED: set[tuple[str, int, int, str]] = set()
# Slices of a day whose values passed `validate_frame` when `read_day` returned them: (the day's file keys, first row,
# end row) -> the columns checked. A slice read again with no new column is not checked again; a frame that covers a
# whole day with every checked column adds the day's files to `_PASSED` instead.
_PASSED_SLICES: dict[tuple[tuple[tuple[str, int, int, str], ...], int, int], frozenset[str]] = {}


def _file_key(path: Path, spec: DatasetSpec) -> tuple[str, int, int, str]:
    st = path.stat()
    checks = json.dumps(
        [spec.task, spec.label, [(f.column, f.multi_hot) for f in spec.sparse], list(spec.dense)], sort_keys=True
    )
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, checks)


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

    Opening reads every file's footer (cheap) and checks its schema; `check_values` reads the values.

    Args:
        root: the directory holding `dataset.yaml` and the `day=YYYY-MM-DD` partitions.

    Raises:
        DatasetError: the directory, the spec, a day directory, or a file's footer or schema is bad.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(self.root, "no such dataset directory", "ingest or generate the data first")
        self.spec: DatasetSpec = load_spec(self.root)
        self.days: list[Day] = self._scan_days()
        first: tuple[Path, Mapping[str, Any]] | None = None
        for day in self.days:
            # Reading a footer is cheap: check every file, so a bad one is named before training starts.
            for f in day.files:
                schema = self._schema(f)
                self.spec.check_schema(schema, f)
                if first is None:
                    first = (f, schema)
                    continue
                # A multi-file scan needs one type per column: name the file whose types differ from the first's.
                for col in self.spec.columns:
                    if schema[col] != first[1][col]:
                        raise SpecError(
                            f,
                            f"has type {schema[col]}, but {first[0]} has {first[1][col]}; every file of a dataset "
                            "must have the same column types",
                            "re-run the ingest so that every day is written with the same types (or cast this file's "
                            "column and rewrite it)",
                            column=col,
                        )
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
            # Hidden and `_`-prefixed names (`.crc`, `_SUCCESS`) are ignored, as Hive-style readers do.
            stray = sorted(
                p.name
                for p in entry.iterdir()
                if p.name[0] not in "._" and not (p.is_file() and p.suffix == ".parquet")
            )
            if stray:
                raise DatasetError(
                    entry / stray[0],
                    "is not a Parquet file; a day partition holds only its part-*.parquet files",
                    "move it out of the dataset directory",
                )
            files = tuple(sorted(f for f in entry.glob("*.parquet") if f.name[0] not in "._"))
            rows = 0
            for f in files:
                try:
                    rows += pq.ParquetFile(f).metadata.num_rows
                except PARQUET_ERRORS as e:
                    raise unreadable(f, e) from e
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
        datasets with thousands of days. Every footer was read when the dataset was opened; damaged data pages
        surface when the scan is collected, so run `check_values` first (it names the file).
        """
        files = [f for d in (self.days if days is None else days) for f in d.files]
        return pl.scan_parquet(files, hive_partitioning=True, hive_schema={DAY_COLUMN: pl.Date})

    def fingerprint(self) -> str:
        """A digest of every file's real path, size and modification time (a `stat` each, no reads) and the spec's
        checks: equal for the same files, different once any file is rewritten, added or removed."""
        keys = sorted(_file_key(f, self.spec) for d in self.days for f in d.files)
        return hashlib.sha256(json.dumps(keys).encode()).hexdigest()

    def distinct_ids(self) -> dict[str, int]:
        """The number of distinct ids of each sparse field over every day (nulls not counted; a multi-hot field's
        ids over all its lists).

        One pass over the files, in memory bounded by one file's distinct ids plus the distinct ids held so far (a
        growable hash set per field, `pipeline.vocab.HashTable`), not by the rows: a single polars `n_unique`
        over the whole stream holds every column of every row (about 21 GB at 100M rows of 26 fields).
        """
        fields = self.spec.sparse
        seen = {f.name: HashTable() for f in fields}
        exprs = [
            (pl.col(f.column).explode(empty_as_null=False) if f.multi_hot else pl.col(f.column))
            .drop_nulls()
            .unique()
            .implode()
            .alias(f.name)
            for f in fields
        ]
        for day in self.days:
            for path in day.files:
                row = self._collect_file(path, pl.scan_parquet(path).select(exprs)).row(0, named=True)
                for f in fields:
                    ids = np.asarray(row[f.name], dtype=np.int64)
                    table = seen[f.name]
                    new = ids[table.lookup(ids) == FALLBACK_ROW]
                    table.insert(new, np.arange(table.size + 1, table.size + 1 + new.size, dtype=np.int64))
        return {name: table.size for name, table in seen.items()}

    def check_values(self, days: Sequence[Day] | None = None) -> int:
        """Check the values of every file of `days` (all by default), as `validate_frame` checks frames.

        One lazy vectorised pass per file computes every check (null or non-finite labels, labels other than 0/1
        for a binary task, missing or negative ids, non-finite dense values); a few files run in parallel at a time,
        so memory is bounded by a few files, not by the days checked. A file
        that passed is remembered by path, size and modification time for the life of the process: checking it
        again costs a `stat`, and `read_day` skips `validate_frame` for frames read from passed files.

        Args:
            days: the days to check.

        Returns:
            The number of files read (0 when every file had passed before).

        Raises:
            DatasetError: naming the first bad file (in day order), the column, the row within the file, the value
                and the fix; or a file that cannot be read.
        """
        files = [f for d in (self.days if days is None else days) for f in d.files]
        keys = {f: _file_key(f, self.spec) for f in files}
        todo = [f for f in files if keys[f] not in _PASSED]
        if not todo:
            return 0
        checks = {f: _value_checks(self.spec, self._schema(f)) for f in todo}
        checked = [f for f in todo if checks[f]]
        # A few files at a time, in day order: all at once, polars holds every file's columns together (over 23 GB at
        # 100M rows, OOM-killed), where a group holds a few files' (1M rows each at most, as written here).
        for start in range(0, len(checked), _FILES_CHECKED_AT_ONCE):
            group = checked[start : start + _FILES_CHECKED_AT_ONCE]
            queries = [pl.scan_parquet(f).select(_check_aggregations(checks[f])) for f in group]
            try:
                results = pl.collect_all(queries)
            except PARQUET_ERRORS:  # find the file at fault
                results = [self._collect_file(f, q) for f, q in zip(group, queries, strict=True)]
            for f, result in zip(group, results, strict=True):
                _raise_first_failure(checks[f], result.row(0, named=True), f)
            _PASSED.update(keys[f] for f in group)
        _PASSED.update(keys[f] for f in todo)
        logger.debug("checked the values of %d files of %s", len(todo), self.root)
        return len(todo)

    @staticmethod
    def _schema(path: Path) -> Mapping[str, Any]:
        try:
            return pl.read_parquet_schema(path)
        except PARQUET_ERRORS as e:
            raise unreadable(path, e) from e

    @staticmethod
    def _collect_file(path: Path, query: pl.LazyFrame) -> pl.DataFrame:
        try:
            return query.collect()
        except PARQUET_ERRORS as e:
            raise unreadable(path, e) from e

    def _day_keys(self, day: Day) -> tuple[tuple[str, int, int, str], ...] | None:
        try:
            return tuple(_file_key(f, self.spec) for f in day.files)
        except OSError:
            return None

    def read_day(
        self, day: Day, columns: list[str] | None = None, offset: int = 0, length: int | None = None
    ) -> pl.DataFrame:
        """Read rows `[offset, offset+length)` of one day (slice pushed down to the Parquet reader), validated.

        The values of a day's files are checked once per process: frames from files that passed `check_values`, or
        that an earlier `read_day` returned whole (every row, every checked column), are not validated again, and
        neither is a slice that was read before with the same or more columns.

        Raises:
            DatasetError: a file cannot be read, or the values are bad (naming the file when it can be found).
        """
        lf = pl.scan_parquet(list(day.files))
        if columns is not None:
            lf = lf.select(columns)
        if offset or length is not None:
            lf = lf.slice(offset, length)
        try:
            df = lf.collect()
        except PARQUET_ERRORS as e:
            for f in day.files:  # name the file at fault
                self._collect_file(f, pl.scan_parquet(f).select(columns or pl.all()))
            raise unreadable(day.files[0].parent, e) from e
        keys = self._day_keys(day)
        if keys is not None and all(k in _PASSED for k in keys):
            return df
        stop = min(day.num_rows, offset + (day.num_rows if length is None else length))
        checked = frozenset(df.columns).intersection(self.spec.columns)
        if keys is not None and checked <= _PASSED_SLICES.get((keys, offset, stop), frozenset()):
            return df
        try:
            validate_frame(df, self.spec, day.files[0].parent)
        except DatasetError:
            self.check_values([day])  # raises naming the file and its row; else the slice's own error stands
            raise
        if keys is None:
            return df
        needed = {self.spec.label, *(f.column for f in self.spec.sparse), *self.spec.dense}
        if offset == 0 and stop == day.num_rows and needed <= checked:
            _PASSED.update(keys)
        else:
            slice_key = (keys, offset, stop)
            _PASSED_SLICES[slice_key] = checked | _PASSED_SLICES.get(slice_key, frozenset())
        return df
