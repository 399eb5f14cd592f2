"""Ingest real recommender datasets into the day-partitioned Parquet layout (DESIGN.md decisions 2, 3, 15).

Usage::

    python -m pipeline.ingest --format ml-1m --src ../shared/datasets/ml-1m --out data/ml-1m
    python -m pipeline.ingest --format criteo --src ../shared/datasets/criteo-sample --out data/criteo \\
        --days 3
    python -m pipeline.ingest --format avazu --src ../shared/datasets/avazu-sample/wideresdnn_train.csv \\
        --out data/avazu --id-mode hash --overwrite

Formats (`--src`; sparse fields; label; days). Every format keeps the source's raw ids: the id→row
vocabulary is built later, by another module.

* `ml-100k`: the folder with `u.data`, `u.user`, `u.item`, `u.occupation`; user, item, age, gender,
  occupation, zip, genres (multi-hot), year; rating ≥ `--threshold` (binary) or the rating (regression);
  the timestamp's UTC date.
* `ml-1m`: the folder, or a ratings file (`.dat` or `.dat.gz`, 3 or 4 `::` fields) with `users.dat` and
  `movies.dat` beside it; fields and label as ml-100k; the timestamp's UTC date, or the hash rule below.
* `ml-latest`: `ratings.csv` or its folder; user, item; label as ml-100k; the timestamp's UTC date.
* `lightgcn`: the folder with `train.txt` and `test.txt` (`uid iid iid ...`); user, item; label 1
  (implicit feedback); a `split` column train/test; every row on 1970-01-01.
* `criteo`: a `.tsv` without header, a comma-separated file with header (DeepCTR), or a folder with
  `wideresdnn_{train,dev,test}.tsv` (adds a `split` column train/valid/test); C1..C26 and dense I1..I13;
  the click; `--days` contiguous chunks.
* `avazu`: a comma-separated file with or without header, or a folder with
  `wideresdnn_{train,dev,test}.csv` (adds `split`); the 21 columns other than id, click, hour; the click;
  the UTC date of `hour` (YYMMDDHH).

Day rules (each is also written to `dataset.yaml` under `meta.day_rule`):

* **Timestamps.** The day is the UTC date of the timestamp; rows are ordered by timestamp (ties keep file
  order), so each day reads as a chronological stream.
* **ML-1M without timestamps** (`ratings_no_timestamp.dat`): the day index is
  `splitmix64((user << 32) | movie) mod days` (`--days`, default 30) and the day is 2000-04-25 (the date
  of ML-1M's first rating) plus that many days. The rule depends only on the pair, so it is deterministic,
  independent of the row order, and spreads each user's ratings over the days. There is then no timestamp
  role, and rows keep file order within a day.
* **LightGCN text** has no time at all: every row is on 1970-01-01 and the source's split is kept.
* **Criteo** has no time either: the rows in file order (train, dev, then test in folder mode) are cut into
  `--days` (default 1) contiguous chunks of equal size (row `i` of `n` goes to chunk `i * days // n`);
  chunk `k` is dated 2014-01-01 plus `k` days. These dates are nominal, not the real ones.

Ids (`--id-mode`) of string categoricals (Criteo's C1..C26, Avazu's categoricals, MovieLens zip codes):

* `hash` (the default): polars' `Expr.hash(HASH_SEED)` of the raw string, keeping its low 63 bits, so the
  id is a non-negative int64 and can never overflow. A missing value (empty field) gets `MISSING_ID` (0).
  Polars does not promise the same hash across its versions, so its version is recorded in `meta`.
* `parse`: the raw value as an integer: hexadecimal for the hex-hashed columns of Criteo and Avazu, decimal
  otherwise (a zip's '-' is dropped: `55117-1234` → 551171234). A value that is not an integer or does not
  fit in int64, or a negative one, is an error naming the file, the column, the line and the fix.

User and item ids, ages and ML-1M's occupation codes are integers in every source and are always parsed.
Genders are coded F → 0, M → 1; ML-100k's occupations by their 0-based line in `u.occupation`; genres by
their index in ML-100k's `u.genre` (`unknown` 0 .. `Western` 18), for ML-1M too.

Text files are read as lines and split with polars (no per-row Python), so a malformed line is reported
with its 1-based line number and its text. Criteo is streamed: read, validated and written chunk by chunk
(`CHUNK_BYTES` of text at a time) into a hidden temporary directory that becomes `--out` only once every chunk has
passed, so a 2 GB file converts in bounded memory. The other formats are read and validated whole before anything
is written. Either way the output appears atomically: a failure leaves no output directory behind. Before any of that,
`--out` is checked (`pipeline.dataset.check_output_dir`): it may not be `--src`, contain it or lie inside it, and
`--overwrite` replaces only an earlier dataset, never a folder of other files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import inspect
import logging
import re
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from pipeline.dataset import (
    DATASET_OUTPUT,
    DAY_COLUMN,
    Dataset,
    atomic_directory,
    check_output_dir,
    day_of,
    validate_frame,
    write_dataset,
)
from pipeline.errors import DatasetError
from pipeline.spec import DatasetSpec, SparseField

logger = logging.getLogger(__name__)

IdMode = Literal["hash", "parse"]
FORMATS: tuple[str, ...] = ("ml-100k", "ml-1m", "ml-latest", "lightgcn", "criteo", "avazu")
HASH_SEED = 0
MISSING_ID = 0
LOW_63_BITS = (1 << 63) - 1
LABEL = "label"
TIMESTAMP = "timestamp"
SPLIT = "split"
ML_1M_FIRST_DAY = dt.date(2000, 4, 25)
ML_1M_DEFAULT_DAYS = 30
NO_TIME_DAY = dt.date(1970, 1, 1)
CRITEO_FIRST_DAY = dt.date(2014, 1, 1)
# ML-100k's u.genre, in order; ML-1M's genre names are the same (without "unknown").
GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
GENDERS = {"F": 0, "M": 1}
CRITEO_DENSE: tuple[str, ...] = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE: tuple[str, ...] = tuple(f"C{i}" for i in range(1, 27))
CRITEO_COLUMNS: tuple[str, ...] = (LABEL, *CRITEO_DENSE, *CRITEO_SPARSE)
AVAZU_COLUMNS: tuple[str, ...] = (
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)  # fmt: skip
AVAZU_SPARSE: tuple[str, ...] = AVAZU_COLUMNS[3:]
# Avazu's anonymised columns hold 8-hex-digit strings; the others hold decimal integers.
AVAZU_HEX = frozenset(
    {"site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category", "device_id",
     "device_ip", "device_model"}
)  # fmt: skip
SPLIT_FILES = (("train", "train"), ("valid", "dev"), ("test", "test"))
ML_SPARSE: tuple[SparseField, ...] = (
    SparseField("user", "user"),
    SparseField("item", "item"),
    SparseField("age", "age"),
    SparseField("gender", "gender"),
    SparseField("occupation", "occupation"),
    SparseField("zip", "zip"),
    SparseField("genres", "genres", multi_hot=True),
    SparseField("year", "year"),
)
_FIX_LINE = "repair or remove that line of the file"
# Text read per chunk by the streamed ingest (`write_criteo`): about 0.5 GB of peak memory for Criteo's lines.
CHUNK_BYTES = 64 << 20
_MAX_QUOTE = 200


# --------------------------------------------------------------------------------------------- text reading


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        where = "no such file" if not path.exists() else "is not a file"
        raise DatasetError(
            path, f"{where}; expected {what}", "point --src at the dataset's folder or file (see --help)"
        )
    return path


def _lines_frame(text: str, first_line: int) -> pl.DataFrame:
    """`text` as columns `line` (numbered from `first_line`) and `text`, blank lines dropped (but counted)."""
    return (
        pl.DataFrame({"text": [text]})
        .lazy()
        .select(pl.col("text").str.split("\n"))
        .explode("text")
        .with_row_index("line", offset=first_line)
        .with_columns(pl.col("line").cast(pl.Int64), pl.col("text").str.strip_chars_end("\r"))
        .filter(pl.col("text").str.strip_chars() != "")
        .collect()
    )


def _iter_lines(
    path: Path, what: str, *, encoding: str = "utf-8", chunk_bytes: int | None = None
) -> Iterator[pl.DataFrame]:
    """Read a text file (gzip detected by its magic bytes) in chunks of about `chunk_bytes` (the whole file if
    None), each cut at a line end, as columns `line` (1-based, in the whole file) and `text`.

    Blank lines are dropped, but `line` keeps counting them, so it is always the line number in the file. Memory
    is bounded by the chunk (a line longer than a chunk is read whole), not by the file.
    """
    with _require_file(path, what).open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    first_line, consumed, carry = 1, 0, b""
    with gzip.open(path, "rb") if gzipped else path.open("rb") as f:
        while True:
            try:
                block = f.read(-1 if chunk_bytes is None else chunk_bytes)
            except (OSError, EOFError, zlib.error) as e:
                raise DatasetError(path, f"is not a readable gzip file ({e})", "re-download or re-compress it") from e
            data = carry + block
            if block and chunk_bytes is not None:  # not the end yet: keep the last, unfinished line for later
                cut = data.rfind(b"\n") + 1
                data, carry = data[:cut], data[cut:]
                if not data:
                    continue
            elif not data:
                return
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError as e:
                raise DatasetError(
                    path,
                    f"is not valid {encoding} text ({e.reason} at byte {consumed + e.start})",
                    "re-save it as UTF-8",
                    line=first_line + data[: e.start].count(b"\n"),
                ) from e
            yield _lines_frame(text, first_line)
            first_line += data.count(b"\n")
            consumed += len(data)
            if not block:
                return


def _read_lines(path: Path, what: str, *, encoding: str = "utf-8") -> pl.DataFrame:
    """The whole text file as columns `line` (1-based) and `text` (see `_iter_lines`)."""
    frames = list(_iter_lines(path, what, encoding=encoding))
    return pl.concat(frames) if frames else _lines_frame("", 1)


def _quote(text: str) -> str:
    return repr(text if len(text) <= _MAX_QUOTE else text[:_MAX_QUOTE] + "...")


def _split_fields(lines: pl.DataFrame, sep: str, names: Sequence[str], path: Path) -> pl.DataFrame:
    """Split each line on the literal `sep` into string columns `names`; a wrong field count fails."""
    n = len(names)
    df = lines.with_columns(pl.col("text").str.split(sep).alias("_fields"))
    bad = df.filter(pl.col("_fields").list.len() != n)
    if bad.height:
        row = bad.row(0, named=True)
        raise DatasetError(
            path,
            f"has {len(row['_fields'])} fields separated by {sep!r}, expected {n} ({sep.join(names)}): "
            f"{_quote(row['text'])}",
            _FIX_LINE,
            line=row["line"],
        )
    return df.select("line", "text", *(pl.col("_fields").list.get(i).alias(name) for i, name in enumerate(names)))


def _check_header(path: Path, header_row: tuple[int, str], columns: Sequence[str], what: str, sep: str) -> list[str]:
    """The header line's column names; a missing one of `columns` fails, naming it and the line."""
    header_line, header_text = header_row
    header = header_text.split(sep)
    for c in columns:
        if c not in header:
            raise DatasetError(
                path,
                f"the header has no column '{c}' (it has {header})",
                f"add the column, or check that this is {what}",
                column=c,
                line=header_line,
            )
    return header


def _read_header_csv(path: Path, columns: Sequence[str], what: str, *, sep: str = ",") -> pl.DataFrame:
    """Read a `sep`-separated file whose first line is a header; return the named `columns` (strings).

    Quoting is not supported (none of the supported formats quotes its fields).
    """
    lines = _read_lines(path, what)
    if not lines.height:
        raise DatasetError(path, "is empty", f"expected {what}")
    header = _check_header(path, lines.row(0), columns, what, sep)
    df = _split_fields(lines.slice(1), sep, header, path)
    return df.select("line", "text", *columns)


# ------------------------------------------------------------------------------------------- value parsing


def _fail(path: Path, df: pl.DataFrame, bad: pl.Expr, column: str, problem: Callable[[str], str], fix: str) -> None:
    """Raise a `DatasetError` for the first row where `bad` holds, if any; `problem` gets the raw value."""
    rows = df.filter(bad)
    if rows.height:
        row = rows.row(0, named=True)
        raw = row.get(f"_raw_{column}", row.get(column))
        raise DatasetError(
            path,
            f"{problem(str(raw))}; the line is {_quote(row['text'])}",
            fix,
            column=column,
            line=row["line"],
        )


def _parse_ints(
    df: pl.DataFrame,
    columns: Sequence[str],
    path: Path,
    *,
    base: int = 10,
    missing: int | None = None,
    fix: str = "write the ids as non-negative decimal integers that fit in int64",
) -> pl.DataFrame:
    """Parse string `columns` as non-negative int64; `missing` (if given) replaces empty fields."""
    if not columns:
        return df
    kind = "a hexadecimal" if base == 16 else "a decimal"
    digits = r"[+-]?[0-9a-fA-F]+" if base == 16 else r"[+-]?[0-9]+"
    df = df.with_columns(pl.col(c).alias(f"_raw_{c}") for c in columns).with_columns(
        pl.col(c).str.to_integer(base=base, dtype=pl.Int64, strict=False) for c in columns
    )
    for c in columns:
        raw = pl.col(f"_raw_{c}")
        empty = raw.is_null() | (raw == "")
        if missing is not None:
            df = df.with_columns(pl.when(empty).then(pl.lit(missing, pl.Int64)).otherwise(pl.col(c)).alias(c))
        else:
            _fail(path, df, empty, c, lambda v: "the value is empty, expected an integer id", _FIX_LINE)

        def not_int(v: str, kind: str = kind, digits: str = digits) -> str:
            if re.fullmatch(digits, v):
                return f"the value {v!r} does not fit in int64"
            return f"the value {v!r} is not {kind} integer"

        _fail(path, df, pl.col(c).is_null() & ~empty, c, not_int, fix)
        _fail(path, df, pl.col(c) < 0, c, lambda v: f"the id {v} is negative; ids must be >= 0", fix)
    return df.drop(f"_raw_{c}" for c in columns)


def _parse_floats(df: pl.DataFrame, columns: Sequence[str], path: Path, *, allow_empty: bool) -> pl.DataFrame:
    """Parse string `columns` as float64; empty fields are null if `allow_empty`; non-finite values fail."""
    df = df.with_columns(pl.col(c).alias(f"_raw_{c}") for c in columns).with_columns(
        pl.col(c).cast(pl.Float64, strict=False) for c in columns
    )
    for c in columns:
        raw = pl.col(f"_raw_{c}")
        empty = raw.is_null() | (raw == "")
        if not allow_empty:
            _fail(path, df, empty, c, lambda v: "the value is empty, expected a number", _FIX_LINE)
        _fail(path, df, pl.col(c).is_null() & ~empty, c, lambda v: f"the value {v!r} is not a number", _FIX_LINE)
        _fail(
            path,
            df,
            pl.col(c).is_nan() | pl.col(c).is_infinite(),
            c,
            lambda v: f"the value {v!r} is not finite",
            "repair the value or drop the line (labels and dense values must be finite numbers)",
        )
    return df.drop(f"_raw_{c}" for c in columns)


def _hash_ids(columns: Sequence[str]) -> list[pl.Expr]:
    """Hash string columns to non-negative int64 ids (low 63 bits of polars' hash); empty → `MISSING_ID`."""
    mask = pl.lit(LOW_63_BITS, pl.UInt64)
    return [
        pl.when(pl.col(c).is_null() | (pl.col(c) == ""))
        .then(pl.lit(MISSING_ID, pl.Int64))
        .otherwise((pl.col(c).hash(HASH_SEED) & mask).cast(pl.Int64))
        .alias(c)
        for c in columns
    ]


def _categorical_ids(
    df: pl.DataFrame, columns: Sequence[str], path: Path, id_mode: IdMode, *, hex_columns: frozenset[str]
) -> pl.DataFrame:
    """Turn string categoricals into int64 ids by `id_mode` (see the module docstring)."""
    if id_mode == "hash":
        return df.with_columns(_hash_ids(columns))
    fix = "use --id-mode hash, which maps any string to a non-negative int64"
    df = _parse_ints(df, [c for c in columns if c in hex_columns], path, base=16, missing=MISSING_ID, fix=fix)
    return _parse_ints(df, [c for c in columns if c not in hex_columns], path, missing=MISSING_ID, fix=fix)


def _binary_label(df: pl.DataFrame, column: str, path: Path) -> pl.DataFrame:
    """Parse a 0/1 click column into the float32 `label`."""
    df = _parse_floats(df, [column], path, allow_empty=False)
    _fail(
        path,
        df,
        ~pl.col(column).is_in([0.0, 1.0]),
        column,
        lambda v: f"the click label is {v!r}, expected 0 or 1",
        _FIX_LINE,
    )
    return df.with_columns(pl.col(column).cast(pl.Float32).alias(LABEL))


def _rating_label(df: pl.DataFrame, path: Path, task: str, threshold: float) -> tuple[pl.DataFrame, str]:
    """Parse `rating` into the float32 `label` for `task`; also return the rule, for `meta`."""
    df = _parse_floats(df, ["rating"], path, allow_empty=False)
    if task == "binary":
        rule = f"label = 1 if rating >= {threshold} else 0"
        return df.with_columns((pl.col("rating") >= threshold).cast(pl.Float32).alias(LABEL)), rule
    return df.with_columns(pl.col("rating").cast(pl.Float32).alias(LABEL)), "label = rating"


def _check_options(src: Path, *, task: str = "binary", threshold: float = 4.0, days: int = 1) -> None:
    if task not in ("binary", "regression"):
        raise DatasetError(src, f"task '{task}' is not supported here", "use --task binary or --task regression")
    if not np.isfinite(threshold):
        raise DatasetError(src, f"threshold {threshold} is not finite", "pass a finite --threshold, e.g. 4.0")
    if days < 1:
        raise DatasetError(src, f"--days is {days}, expected >= 1", "pass --days 1 or more")


def _check_id_mode(src: Path, id_mode: str) -> None:
    if id_mode not in ("hash", "parse"):
        raise DatasetError(src, f"id mode '{id_mode}' is unknown", "use --id-mode hash or --id-mode parse")


def _hash_meta(id_mode: IdMode) -> dict[str, Any]:
    meta: dict[str, Any] = {"id_mode": id_mode, "missing_id": MISSING_ID}
    if id_mode == "hash":
        meta["hash"] = f"polars Expr.hash(seed={HASH_SEED}) & (2**63 - 1)"
        meta["polars_version"] = pl.__version__
    return meta


def _unique_key(df: pl.DataFrame, key: str, path: Path) -> None:
    _fail(
        path,
        df,
        ~pl.col(key).is_first_distinct(),
        key,
        lambda v: f"id {v} appears on more than one line",
        "keep one line per id",
    )


def _join_side(
    ratings: pl.DataFrame, side: pl.DataFrame, key: str, ratings_path: Path, side_path: Path
) -> pl.DataFrame:
    """Left-join side features on `key`; an id missing from the side file is an error naming both files."""
    joined = ratings.join(side.drop("line", "text"), on=key, how="left", maintain_order="left")
    extra = [c for c in side.columns if c not in ("line", "text", key)]
    missing = joined.filter(pl.col(extra[0]).is_null())
    if missing.height:
        row = missing.row(0, named=True)
        raise DatasetError(
            ratings_path,
            f"{key} {row[key]} has no line in {side_path} ({missing.height} rows affected)",
            f"add the {key} to {side_path.name}, or drop its ratings",
            column=key,
            line=row["line"],
        )
    return joined


def _zip_ids(df: pl.DataFrame, path: Path, id_mode: IdMode) -> pl.DataFrame:
    if id_mode == "hash":
        return df.with_columns(_hash_ids(["zip"]))
    return _parse_ints(
        df.with_columns(pl.col("zip").str.replace_all("-", "", literal=True)),
        ["zip"],
        path,
        missing=MISSING_ID,
        fix="use --id-mode hash (zip codes such as Canadian postcodes are not integers)",
    )


def _gender_ids(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    coded = pl.col("gender").replace_strict(GENDERS, default=None, return_dtype=pl.Int64)
    _fail(
        path,
        df,
        coded.is_null(),
        "gender",
        lambda v: f"gender {v!r} is not one of {list(GENDERS)}",
        _FIX_LINE,
    )
    return df.with_columns(coded.alias("gender"))


def _genre_lists(df: pl.DataFrame, column: str, path: Path) -> pl.DataFrame:
    """`column` holds '|'-separated genre names; turn it into a list of indices into `GENRES`."""
    index = {g: i for i, g in enumerate(GENRES)}
    df = df.with_columns(
        pl.col(column)
        .str.split("|")
        .list.eval(pl.element().replace_strict(index, default=None, return_dtype=pl.Int64))
        .alias("genres")
    )
    _fail(
        path,
        df,
        pl.col("genres").list.eval(pl.element().is_null()).list.any(),
        column,
        lambda v: f"genres {v!r} include a name that is not one of {list(GENRES[1:])}",
        _FIX_LINE,
    )
    return df


# ------------------------------------------------------------------------------------------------ MovieLens


def _finish(df: pl.DataFrame, spec: DatasetSpec) -> tuple[pl.DataFrame, DatasetSpec]:
    """Keep only the spec's columns and the day (dropping the line numbers and text kept for errors)."""
    return df.select(*spec.columns, DAY_COLUMN), spec


def _timestamp_days(df: pl.DataFrame) -> pl.DataFrame:
    """Order rows by timestamp (ties keep file order) and date them by the timestamp's UTC date."""
    return df.sort(TIMESTAMP, maintain_order=True).with_columns(day_of(pl.col(TIMESTAMP)).alias(DAY_COLUMN))


def _ml_spec(
    name: str, task: str, *, timestamp: bool, meta: dict[str, Any], sparse: tuple[SparseField, ...]
) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        task="binary" if task == "binary" else "regression",
        label=LABEL,
        sparse=sparse,
        timestamp=TIMESTAMP if timestamp else None,
        user_field="user",
        item_field="item",
        meta=meta,
    )


def read_ml_100k(
    src: str | Path, *, task: str = "binary", threshold: float = 4.0, id_mode: IdMode = "hash"
) -> tuple[pl.DataFrame, DatasetSpec]:
    """Read MovieLens-100k: `u.data` ratings with the side features of `u.user` and `u.item`.

    Args:
        src: the folder holding `u.data`, `u.user`, `u.item` (latin-1) and `u.occupation`.
        task: `binary` (rating >= threshold) or `regression` (the rating).
        threshold: the rating at and above which the binary label is 1.
        id_mode: how zip codes become ids (see the module docstring).

    Returns:
        The rows (with a `day` column) and their spec.

    Raises:
        DatasetError: a file is missing or malformed (named with its line), or an id is negative.
    """
    folder = Path(src)
    _check_options(folder, task=task, threshold=threshold)
    _check_id_mode(folder, id_mode)
    data_path, user_path, item_path, occ_path = (folder / n for n in ("u.data", "u.user", "u.item", "u.occupation"))
    ratings = _split_fields(
        _read_lines(data_path, "ML-100k ratings (user<TAB>item<TAB>rating<TAB>timestamp)"),
        "\t",
        ["user", "item", "rating", TIMESTAMP],
        data_path,
    )
    ratings = _parse_ints(ratings, ["user", "item", TIMESTAMP], data_path)
    ratings, rule = _rating_label(ratings, data_path, task, threshold)

    users = _split_fields(
        _read_lines(user_path, "ML-100k users (id|age|gender|occupation|zip)"),
        "|",
        ["user", "age", "gender", "occupation", "zip"],
        user_path,
    )
    users = _gender_ids(_parse_ints(users, ["user", "age"], user_path), user_path)
    occupations = _read_lines(occ_path, "ML-100k occupations, one per line").select(
        pl.col("text").str.strip_chars().alias("name"), (pl.int_range(pl.len(), dtype=pl.Int64)).alias("code")
    )
    coded = pl.col("occupation").replace_strict(
        occupations["name"], occupations["code"], default=None, return_dtype=pl.Int64
    )
    _fail(
        user_path,
        users,
        coded.is_null(),
        "occupation",
        lambda v: f"occupation {v!r} is not listed in {occ_path.name}",
        f"add it to {occ_path} or correct the line",
    )
    users = _zip_ids(users.with_columns(coded.alias("occupation")), user_path, id_mode)
    _unique_key(users, "user", user_path)

    flags = [f"g{i}" for i in range(len(GENRES))]
    items = _split_fields(
        _read_lines(
            item_path,
            "ML-100k items (id|title|release date|video date|url|19 genre flags)",
            encoding="latin-1",
        ),
        "|",
        ["item", "title", "released", "video", "url", *flags],
        item_path,
    )
    items = _parse_ints(items, ["item"], item_path)
    for f in flags:
        _fail(
            item_path,
            items,
            ~pl.col(f).is_in(["0", "1"]),
            f,
            lambda v: f"genre flag {v!r} is not 0 or 1",
            _FIX_LINE,
        )
    released = pl.col("released").str.to_date("%d-%b-%Y", strict=False)
    _fail(
        item_path,
        items,
        released.is_null() & (pl.col("released") != ""),
        "released",
        lambda v: f"release date {v!r} is not DD-Mon-YYYY",
        _FIX_LINE,
    )
    items = items.with_columns(
        released.dt.year().cast(pl.Int64).fill_null(0).alias("year"),
        pl.concat_list(pl.when(pl.col(f) == "1").then(pl.lit(i, pl.Int64)) for i, f in enumerate(flags))
        .list.drop_nulls()
        .alias("genres"),
    ).select("line", "text", "item", "genres", "year")
    _unique_key(items, "item", item_path)

    df = _join_side(
        ratings,
        users.select("line", "text", "user", "age", "gender", "occupation", "zip"),
        "user",
        data_path,
        user_path,
    )
    df = _timestamp_days(_join_side(df, items, "item", data_path, item_path))
    meta = {
        "source": "MovieLens-100k",
        "source_files": [str(p) for p in (data_path, user_path, item_path, occ_path)],
        "day_rule": "day = UTC date of the rating's timestamp; rows ordered by timestamp",
        "label_rule": rule,
        "encodings": "gender F=0 M=1; occupation = 0-based line in u.occupation; genres = u.genre indices; "
        "year = release year (missing = 0)",
        **_hash_meta(id_mode),
    }
    return _finish(df, _ml_spec("ml-100k", task, timestamp=True, meta=meta, sparse=ML_SPARSE))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele, Lea and Flood 2014) of uint64 values, vectorised with wrap-around."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hashed_day_index(user: pl.Series, item: pl.Series, days: int) -> pl.Series:
    """The day index of the no-timestamp rule: `splitmix64((user << 32) | item) mod days` (ids < 2**32)."""
    key = (user.to_numpy().astype(np.uint64) << np.uint64(32)) | item.to_numpy().astype(np.uint64)
    return pl.Series("day_index", (splitmix64(key) % np.uint64(days)).astype(np.int64))


def read_ml_1m(
    src: str | Path,
    *,
    task: str = "binary",
    threshold: float = 4.0,
    days: int | None = None,
    id_mode: IdMode = "hash",
) -> tuple[pl.DataFrame, DatasetSpec]:
    """Read MovieLens-1M ratings with the side features of `users.dat` and `movies.dat`.

    Args:
        src: the folder (using `ratings.dat` if present, else `ratings_no_timestamp.dat`) or a ratings file
            (`UserID::MovieID::Rating[::Timestamp]`, optionally gzipped); `users.dat` and `movies.dat`
            (latin-1) are read from the ratings file's folder.
        task: `binary` (rating >= threshold) or `regression` (the rating).
        threshold: the rating at and above which the binary label is 1.
        days: for ratings without timestamps, the number of days of the hash rule (default 30); not allowed
            when the ratings have timestamps.
        id_mode: how zip codes become ids (see the module docstring).

    Returns:
        The rows (with a `day` column) and their spec.

    Raises:
        DatasetError: a file is missing or malformed (named with its line), or an id is negative.
    """
    src = Path(src)
    _check_options(src, task=task, threshold=threshold, days=1 if days is None else days)
    _check_id_mode(src, id_mode)
    if src.is_dir():
        ratings_path = next(
            (src / n for n in ("ratings.dat", "ratings_no_timestamp.dat") if (src / n).is_file()),
            src / "ratings.dat",
        )
        _require_file(ratings_path, "ML-1M ratings: ratings.dat or ratings_no_timestamp.dat in the folder")
    else:
        ratings_path = _require_file(src, "an ML-1M ratings file (UserID::MovieID::Rating[::Timestamp])")
    folder = ratings_path.parent
    user_path, movie_path = folder / "users.dat", folder / "movies.dat"
    _require_file(user_path, "ML-1M users.dat (UserID::Gender::Age::Occupation::Zip) beside the ratings")
    _require_file(movie_path, "ML-1M movies.dat (MovieID::Title::Genres) beside the ratings")

    lines = _read_lines(ratings_path, "ML-1M ratings")
    if not lines.height:
        raise DatasetError(ratings_path, "has no ratings", "check the file")
    first = lines["text"][0].split("::")
    has_time = len(first) == 4
    if len(first) not in (3, 4):
        raise DatasetError(
            ratings_path,
            f"the first line has {len(first)} '::' fields, expected 3 (UserID::MovieID::Rating) or 4 "
            f"(...::Timestamp): {_quote(lines['text'][0])}",
            "point --src at an ML-1M ratings file",
            line=int(lines["line"][0]),
        )
    if has_time and days is not None:
        raise DatasetError(
            ratings_path,
            "--days was given but the ratings have timestamps, which set the days",
            "drop --days",
        )
    names = ["user", "item", "rating", TIMESTAMP][: len(first)]
    ratings = _split_fields(lines, "::", names, ratings_path)
    ratings = _parse_ints(ratings, names[:2] + names[3:], ratings_path)
    ratings, rule = _rating_label(ratings, ratings_path, task, threshold)

    users = _split_fields(
        _read_lines(user_path, "ML-1M users.dat"),
        "::",
        ["user", "gender", "age", "occupation", "zip"],
        user_path,
    )
    users = _parse_ints(users, ["user", "age", "occupation"], user_path)
    users = _zip_ids(_gender_ids(users, user_path), user_path, id_mode)
    _unique_key(users, "user", user_path)
    movies = _split_fields(
        _read_lines(movie_path, "ML-1M movies.dat", encoding="latin-1"),
        "::",
        ["item", "title", "names"],
        movie_path,
    )
    movies = _genre_lists(_parse_ints(movies, ["item"], movie_path), "names", movie_path)
    movies = movies.with_columns(
        pl.col("title").str.extract(r"\((\d{4})\)\s*$", 1).cast(pl.Int64).fill_null(0).alias("year")
    ).select("line", "text", "item", "genres", "year")
    _unique_key(movies, "item", movie_path)

    df = _join_side(
        ratings,
        users.select("line", "text", "user", "age", "gender", "occupation", "zip"),
        "user",
        ratings_path,
        user_path,
    )
    df = _join_side(df, movies, "item", ratings_path, movie_path)
    meta: dict[str, Any] = {
        "source": "MovieLens-1M",
        "source_files": [str(p) for p in (ratings_path, user_path, movie_path)],
        "label_rule": rule,
        "encodings": "gender F=0 M=1; age and occupation = the source's codes; genres = ML-100k u.genre "
        "indices; year = from the title (missing = 0)",
        **_hash_meta(id_mode),
    }
    if has_time:
        df = _timestamp_days(df)
        meta["day_rule"] = "day = UTC date of the rating's timestamp; rows ordered by timestamp"
    else:
        n_days = ML_1M_DEFAULT_DAYS if days is None else days
        _fail(
            ratings_path,
            df,
            (pl.col("user") >= 1 << 32) | (pl.col("item") >= 1 << 32),
            "user",
            lambda v: "an id is >= 2**32, which the day rule (user << 32 | movie) cannot take",
            "re-number the ids below 2**32",
        )
        index = hashed_day_index(df["user"], df["item"], n_days)
        df = df.with_columns((pl.lit(ML_1M_FIRST_DAY) + pl.duration(days=pl.lit(index))).alias(DAY_COLUMN))
        meta["day_rule"] = (
            f"no timestamps: day index = splitmix64((user << 32) | movie) mod {n_days}; "
            f"day = {ML_1M_FIRST_DAY} (ML-1M's first rating date) + index days; "
            "rows keep file order within a day"
        )
        meta["days"] = n_days
        meta["first_day"] = ML_1M_FIRST_DAY.isoformat()
    return _finish(df, _ml_spec("ml-1m", task, timestamp=has_time, meta=meta, sparse=ML_SPARSE))


def read_ml_latest(
    src: str | Path, *, task: str = "binary", threshold: float = 4.0
) -> tuple[pl.DataFrame, DatasetSpec]:
    """Read MovieLens latest (`ratings.csv` with header `userId,movieId,rating,timestamp`).

    Args:
        src: `ratings.csv` or the folder holding it.
        task: `binary` (rating >= threshold) or `regression` (the rating).
        threshold: the rating at and above which the binary label is 1.

    Returns:
        The rows (with a `day` column) and their spec.

    Raises:
        DatasetError: the file is missing, lacks a column, or has a malformed line (named).
    """
    path = Path(src)
    path = path / "ratings.csv" if path.is_dir() else path
    _check_options(path, task=task, threshold=threshold)
    df = _read_header_csv(
        path,
        ["userId", "movieId", "rating", "timestamp"],
        "MovieLens ratings.csv (userId,movieId,rating,timestamp)",
    ).rename({"userId": "user", "movieId": "item"})
    df = _parse_ints(df, ["user", "item", TIMESTAMP], path)
    df, rule = _rating_label(df, path, task, threshold)
    meta = {
        "source": "MovieLens latest",
        "source_files": [str(path)],
        "day_rule": "day = UTC date of the rating's timestamp; rows ordered by timestamp",
        "label_rule": rule,
    }
    sparse = (SparseField("user", "user"), SparseField("item", "item"))
    return _finish(_timestamp_days(df), _ml_spec("ml-latest", task, timestamp=True, meta=meta, sparse=sparse))


# ------------------------------------------------------------------------------------------------- LightGCN


def read_lightgcn(src: str | Path) -> tuple[pl.DataFrame, DatasetSpec]:
    """Read a LightGCN-style implicit split: `train.txt` and `test.txt`, lines `uid iid iid ...`.

    Args:
        src: the folder holding `train.txt` and `test.txt`.

    Returns:
        One row per (user, item) entry with label 1 and a `split` column (`train`/`test`), all on 1970-01-01.

    Raises:
        DatasetError: a file is missing or a token is not a non-negative integer (named with its line).
    """
    folder = Path(src)
    frames = []
    for split in ("train", "test"):
        path = folder / f"{split}.txt"
        lines = _read_lines(path, f"the LightGCN {split} file (lines 'uid iid iid ...')")
        tokens = lines.with_columns(pl.col("text").str.extract_all(r"\S+").alias("_tokens"))
        pairs = (
            tokens.select(
                "line",
                "text",
                pl.col("_tokens").list.first().alias("user"),
                pl.col("_tokens").list.slice(1).alias("item"),
            )
            .explode("item", empty_as_null=False)
            .filter(pl.col("item").is_not_null())
        )
        pairs = _parse_ints(pairs, ["user", "item"], path)
        frames.append(pairs.with_columns(pl.lit(split).alias(SPLIT)))
    df = pl.concat(frames).with_columns(pl.lit(1.0, pl.Float32).alias(LABEL), pl.lit(NO_TIME_DAY).alias(DAY_COLUMN))
    spec = DatasetSpec(
        name="lightgcn",
        task="binary",
        label=LABEL,
        sparse=(SparseField("user", "user"), SparseField("item", "item")),
        user_field="user",
        item_field="item",
        split=SPLIT,
        meta={
            "source": "LightGCN-style implicit feedback (train.txt, test.txt)",
            "source_files": [str(folder / "train.txt"), str(folder / "test.txt")],
            "day_rule": f"the source has no time: every row is on {NO_TIME_DAY}",
            "label_rule": "label = 1 for every listed (user, item) pair (implicit feedback)",
        },
    )
    return _finish(df, spec)


# ------------------------------------------------------------------------------------------- Criteo, Avazu


def _looks_like_header(first_field: str) -> bool:
    return not first_field.strip().lstrip("+-").replace(".", "", 1).isdigit()


def _iter_ctr_file(
    path: Path, columns: Sequence[str], what: str, chunk_bytes: int | None = None
) -> Iterator[pl.DataFrame]:
    """A CTR file with the columns `columns` (strings, with `line` and `text`), chunk by chunk (see `_iter_lines`):
    tab- or comma-separated (sniffed from the first line), with or without a header."""
    sep, header = None, None
    for lines in _iter_lines(path, what, chunk_bytes=chunk_bytes):
        if sep is None:
            if not lines.height:  # a chunk of blank lines before the first row
                continue
            first = lines["text"][0]
            sep = "\t" if "\t" in first else ","
            if _looks_like_header(first.split(sep)[0]):
                header = _check_header(path, lines.row(0), columns, what, sep)
                lines = lines.slice(1)
        if header is None:
            yield _split_fields(lines, sep, columns, path)
        else:
            yield _split_fields(lines, sep, header, path).select("line", "text", *columns)
    if sep is None:
        raise DatasetError(path, "is empty", f"expected {what}")


def _read_ctr_file(path: Path, columns: Sequence[str], what: str) -> pl.DataFrame:
    """A whole CTR file (see `_iter_ctr_file`)."""
    return pl.concat(list(_iter_ctr_file(path, columns, what)))


def _ctr_sources(src: Path, stem: str, suffix: str) -> list[tuple[str | None, Path]]:
    """Files to read: `src` itself, or the train/dev/test files of a folder with their split names."""
    if not src.is_dir():
        return [(None, src)]
    return [(split, src / f"{stem}_{name}.{suffix}") for split, name in SPLIT_FILES]


def _criteo_spec(src: Path, sources: Sequence[tuple[str | None, Path]], days: int, id_mode: IdMode) -> DatasetSpec:
    return DatasetSpec(
        name="criteo",
        task="binary",
        label=LABEL,
        sparse=tuple(SparseField(c, c) for c in CRITEO_SPARSE),
        dense=CRITEO_DENSE,
        split=SPLIT if src.is_dir() else None,
        meta={
            "source": "Criteo display advertising challenge sample",
            "source_files": [str(p) for _, p in sources],
            "day_rule": "no time in the source: rows in file order"
            f"{' (train, dev, test)' if src.is_dir() else ''} "
            f"cut into {days} contiguous equal chunks (row i of n -> chunk i*days//n); chunk k is dated "
            f"{CRITEO_FIRST_DAY} + k days (nominal dates)",
            "label_rule": "label = the click (0/1)",
            "dense_transform": "log(1 + max(x, 0)) as float32; missing = 0",
            "days": days,
            **_hash_meta(id_mode),
        },
    )


def _criteo_chunks(
    sources: Sequence[tuple[str | None, Path]], id_mode: IdMode, chunk_bytes: int | None
) -> Iterator[pl.DataFrame]:
    """The parsed rows of `sources`, in file order, chunk by chunk (without the day)."""
    what = "Criteo rows (label, I1..I13, C1..C26; tab-separated, or comma-separated with a header)"
    for _, path in sources:  # every file is there before the first is read
        _require_file(path, what)
    for split, path in sources:
        for df in _iter_ctr_file(path, CRITEO_COLUMNS, what, chunk_bytes):
            df = _binary_label(df, LABEL, path)
            df = _parse_floats(df, CRITEO_DENSE, path, allow_empty=True)
            df = df.with_columns(
                pl.col(c).fill_null(0.0).clip(lower_bound=0.0).log1p().cast(pl.Float32) for c in CRITEO_DENSE
            )
            df = _categorical_ids(df, CRITEO_SPARSE, path, id_mode, hex_columns=frozenset(CRITEO_SPARSE))
            if split is not None:
                df = df.with_columns(pl.lit(split).alias(SPLIT))
            yield df.drop("line", "text")


def _criteo_days(first_row: int, height: int, n: int, days: int) -> pl.Expr:
    """The day of rows `[first_row, first_row + height)` of `n`: row i goes to chunk `i * days // n`."""
    index = ((pl.int_range(height, dtype=pl.Int64) + first_row) * days) // max(n, 1)
    return (pl.lit(CRITEO_FIRST_DAY) + pl.duration(days=index)).alias(DAY_COLUMN)


def read_criteo(src: str | Path, *, days: int = 1, id_mode: IdMode = "hash") -> tuple[pl.DataFrame, DatasetSpec]:
    """Read Criteo display-ads rows: `label I1..I13 C1..C26`, an empty field meaning missing.

    Args:
        src: a tab-separated file without header, a comma-separated file with header (DeepCTR), or a folder
            with `wideresdnn_{train,dev,test}.tsv` (then a `split` column train/valid/test is added); plain or
            gzip.
        days: the number of contiguous equal chunks of rows, one per day from 2014-01-01 (nominal dates).
        id_mode: how C1..C26 become ids (`parse` reads them as hexadecimal).

    Returns:
        The rows (with a `day` column) and their spec: dense I1..I13 as float32 `log(1 + max(x, 0))` (missing
        = 0), sparse C1..C26. `ingest` writes the same rows without holding them all (`write_criteo`).

    Raises:
        DatasetError: a file is missing or malformed, a column is missing from a header, a value is bad (all
            named with the line), or an id overflows int64 in parse mode.
    """
    src = Path(src)
    _check_options(src, days=days)
    _check_id_mode(src, id_mode)
    sources = _ctr_sources(src, "wideresdnn", "tsv")
    df = pl.concat(list(_criteo_chunks(sources, id_mode, None)))
    spec = _criteo_spec(src, sources, days, id_mode)
    return _finish(df.with_columns(_criteo_days(0, df.height, df.height, days)), spec)


def write_criteo(
    src: str | Path,
    out: str | Path,
    *,
    days: int = 1,
    id_mode: IdMode = "hash",
    overwrite: bool = False,
    protected: Mapping[str, str | Path] | None = None,
    chunk_bytes: int | None = None,
) -> Path:
    """`read_criteo` then `write_dataset`, streamed: memory is bounded by a chunk of about `chunk_bytes` of text
    (`CHUNK_BYTES` by default), whatever the size of the source.

    Each chunk is parsed, validated and written as one Parquet part, in file order. Only once the last is read is
    the row count n, and so each row's day (`i * days // n`), known: a part within one day is then moved into its
    day's partition, and a part across a day boundary is split. The output is written atomically, as
    `write_dataset` writes it.

    Raises:
        DatasetError: as `read_criteo`, or `out` is not a place a dataset may be written (see `check_output_dir`).
    """
    src = Path(src)
    _check_options(src, days=days)
    _check_id_mode(src, id_mode)
    out = check_output_dir(out, kind=DATASET_OUTPUT, protected=protected, overwrite=overwrite)
    sources = _ctr_sources(src, "wideresdnn", "tsv")
    spec = _criteo_spec(src, sources, days, id_mode)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        staged = tmp / "_chunks"
        staged.mkdir()
        parts: list[tuple[Path, int, int]] = []  # (file, first row, rows)
        n = 0
        for k, df in enumerate(_criteo_chunks(sources, id_mode, chunk_bytes or CHUNK_BYTES)):
            if not df.height:
                continue
            spec.check_schema(df.schema, src)
            validate_frame(df, spec, src)
            parts.append((staged / f"part-{k:05d}.parquet", n, df.height))
            df.select(spec.columns).write_parquet(parts[-1][0], statistics=True)
            n += df.height
        if not n:
            raise DatasetError(src, "has no rows", "check the input file and the filters applied")
        for path, first, height in parts:
            first_day, last_day = first * days // n, (first + height - 1) * days // n
            if first_day == last_day:
                day_dir = tmp / f"{DAY_COLUMN}={CRITEO_FIRST_DAY + dt.timedelta(days=first_day)}"
                day_dir.mkdir(exist_ok=True)
                path.rename(day_dir / path.name)
                continue
            df = pl.read_parquet(path).with_columns(_criteo_days(first, height, n, days))
            for (day,), piece in df.partition_by(DAY_COLUMN, as_dict=True, maintain_order=True).items():
                day_dir = tmp / f"{DAY_COLUMN}={day.isoformat()}"
                day_dir.mkdir(exist_ok=True)
                piece.drop(DAY_COLUMN).write_parquet(day_dir / path.name, statistics=True)
            path.unlink()
        staged.rmdir()
        spec.save(tmp)
        written = sum(1 for _ in tmp.glob(f"{DAY_COLUMN}=*"))
    logger.info("wrote %d rows over %d days to %s, streamed", n, written, out)
    return Path(out)


def read_avazu(src: str | Path, *, id_mode: IdMode = "hash") -> tuple[pl.DataFrame, DatasetSpec]:
    """Read Avazu CTR rows (`id,click,hour,C1,banner_pos,...,C21`); `id` (20 digits, a row id) is dropped.

    Args:
        src: a comma-separated file with or without header, or a folder with `wideresdnn_{train,dev,test}.csv`
            (then a `split` column train/valid/test is added).
        id_mode: how the 21 categoricals become ids (`parse`: hex for the anonymised site/app/device columns,
            decimal for the others; Avazu's C20 holds -1, which `parse` rejects as a negative id).

    Returns:
        The rows (with `day` and `timestamp` from `hour`, YYMMDDHH in UTC) and their spec.

    Raises:
        DatasetError: a file is missing or malformed, a column is missing from a header, a value is bad (all
            named with the line), or an id is negative or overflows int64 in parse mode.
    """
    src = Path(src)
    _check_id_mode(src, id_mode)
    what = "Avazu rows (id,click,hour,C1,banner_pos,...,C21; comma-separated)"
    frames = []
    sources = _ctr_sources(src, "wideresdnn", "csv")
    for split, path in sources:
        df = _read_ctr_file(path, AVAZU_COLUMNS, what)
        df = _binary_label(df, "click", path)
        hour = (pl.col("hour") + "00").str.to_datetime("%y%m%d%H%M", strict=False, time_zone="UTC")
        _fail(
            path,
            df,
            hour.is_null() | (pl.col("hour").str.len_chars() != 8),
            "hour",
            lambda v: f"hour {v!r} is not YYMMDDHH",
            _FIX_LINE,
        )
        df = df.with_columns(hour.dt.epoch("s").alias(TIMESTAMP))
        df = _categorical_ids(df, AVAZU_SPARSE, path, id_mode, hex_columns=AVAZU_HEX)
        if split is not None:
            df = df.with_columns(pl.lit(split).alias(SPLIT))
        frames.append(df.drop("line", "text", "id", "click", "hour"))
    df = _timestamp_days(pl.concat(frames))
    spec = DatasetSpec(
        name="avazu",
        task="binary",
        label=LABEL,
        sparse=tuple(SparseField(c, c) for c in AVAZU_SPARSE),
        timestamp=TIMESTAMP,
        split=SPLIT if src.is_dir() else None,
        meta={
            "source": "Avazu click-through rate sample",
            "source_files": [str(p) for _, p in sources],
            "day_rule": "day = UTC date of `hour` (YYMMDDHH); timestamp = the hour's start; rows ordered by "
            "timestamp (ties keep file order)",
            "label_rule": "label = click (0/1)",
            "dropped": ["id (a row id; 20 digits overflow int64)"],
            **_hash_meta(id_mode),
        },
    )
    return _finish(df, spec)


# ---------------------------------------------------------------------------------------------- entry points

READERS: dict[str, Callable[..., tuple[pl.DataFrame, DatasetSpec]]] = {
    "ml-100k": read_ml_100k,
    "ml-1m": read_ml_1m,
    "ml-latest": read_ml_latest,
    "lightgcn": read_lightgcn,
    "criteo": read_criteo,
    "avazu": read_avazu,
}


# Formats whose ingest streams its source (memory bounded by a chunk); the others read it whole, then write.
STREAMED: dict[str, Callable[..., Path]] = {"criteo": write_criteo}


def _check_reader_options(format: str, src: str | Path, options: Mapping[str, Any]) -> Callable[..., Any]:
    """The format's reader, once `format` is known and every option applies to it."""
    reader = READERS.get(format)
    if reader is None:
        raise DatasetError(src, f"format '{format}' is unknown", f"use one of {list(FORMATS)}")
    accepted = [p for p in inspect.signature(reader).parameters if p != "src"]
    if unknown := sorted(set(options) - set(accepted)):
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise DatasetError(
            src,
            f"option(s) {flags} do not apply to format {format}",
            f"drop them; {format} takes {['--' + a.replace('_', '-') for a in accepted] or 'no options'}",
        )
    return reader


def read(format: str, src: str | Path, **options: Any) -> tuple[pl.DataFrame, DatasetSpec]:
    """Read `src` in `format` with the format's `options`; nothing is written.

    Raises:
        DatasetError: the format is unknown, an option does not apply to it, or the input is bad.
    """
    return _check_reader_options(format, src, options)(src, **options)


def ingest(format: str, src: str | Path, out: str | Path, *, overwrite: bool = False, **options: Any) -> Path:
    """Read `src` in `format` and write it to `out` as a day-partitioned dataset (atomically).

    Criteo is streamed (`write_criteo`: memory bounded by a chunk of the source); the other formats are read
    whole (`read`), then written (`write_dataset`).

    Args:
        format: one of `FORMATS`.
        src: the source file or folder (see the module docstring per format).
        out: the dataset directory to create.
        overwrite: replace `out` if it exists.
        **options: the format's reader options: `task`, `threshold`, `days`, `id_mode` where they apply.

    Returns:
        The dataset directory.

    Raises:
        DatasetError: bad input (named with file, column and line); an existing `out` without `overwrite`, or
            one that is not a dataset; an `out` that is, contains or lies inside `src` (see `check_output_dir`).
    """
    # Before reading anything: an --out that would replace the source, or anything but an earlier dataset, fails.
    protected = {"--src": src}
    out = check_output_dir(out, kind=DATASET_OUTPUT, protected=protected, overwrite=overwrite)
    if format in STREAMED:
        _check_reader_options(format, src, options)
        return STREAMED[format](src, out, overwrite=overwrite, protected=protected, **options)
    df, spec = read(format, src, **options)
    return write_dataset(df, spec, out, source=src, overwrite=overwrite, protected=protected)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.ingest",
        description="Ingest a real dataset into day-partitioned Parquet + dataset.yaml.",
    )
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--src", required=True, type=Path, help="the source file or folder")
    p.add_argument("--out", required=True, type=Path, help="the dataset directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--task", choices=("binary", "regression"), help="MovieLens: label kind (default binary)")
    p.add_argument("--threshold", type=float, help="MovieLens: binary label = rating >= this (default 4.0)")
    p.add_argument("--days", type=int, help="ml-1m without timestamps (default 30), criteo (default 1)")
    p.add_argument("--id-mode", choices=("hash", "parse"), help="string categoricals (default hash)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, ingest, print a one-line summary. Returns the exit code (2 on bad input)."""
    args = _parser().parse_args(argv)
    options = {k: v for k in ("task", "threshold", "days", "id_mode") if (v := getattr(args, k)) is not None}
    try:
        out = ingest(args.format, args.src, args.out, overwrite=args.overwrite, **options)
        ds = Dataset(out)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = ds.spec
    print(
        f"{args.format}: {ds.num_rows:,} rows, {len(ds.days)} days ({ds.days[0].name}..{ds.days[-1].name}), "
        f"{len(spec.sparse)} sparse + {len(spec.dense)} dense fields, task {spec.task} -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
