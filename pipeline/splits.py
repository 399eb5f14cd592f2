"""Splits of a dataset into train / valid / test (DESIGN.md decision 12).

Three protocols, all vectorised and deterministic given the seed:

- **prequential** (the streaming default): no split column at all; each day is evaluated before it is trained on.
  That is how `DayStream` is used (`batches(day, grow=False)` then `batches(day, grow=True)`), so it needs no
  assignment here.
- **random** (AutoDim's 80/10/10): each row independently, from a hash of its global row index and the seed.
- **per-user** (CIESS's 50/25/25, as `recommenders.python_stratified_split`): each user's rows are shuffled (by the
  same hash) and cut at `round(cumulative fraction × n_user)`, so every user is in every split in proportion.
- **given**: the split column that the source shipped (`spec.split`, e.g. LightGCN's train/test files).

The assignment is held per day, so a `DayStream` takes `assignment.row_filter("train")` and slices per rank after
filtering.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from pipeline.dataset import Dataset, Day
from pipeline.errors import DatasetError

SPLIT_NAMES = ("train", "valid", "test")
SplitKind = Literal["random", "per-user", "given"]
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a fast, well-mixed uint64 → uint64 hash (vectorised)."""
    z = x.astype(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniform_hash(index: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic uniform [0, 1) value per index, different for each seed."""
    mixed = splitmix64(index.astype(np.uint64) ^ splitmix64(np.array([seed], dtype=np.uint64)))
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class SplitAssignment:
    """A split code (0 train, 1 valid, 2 test) for every row, held per day."""

    codes: dict[dt.date, np.ndarray]

    def row_filter(self, name: str) -> Callable[[Day], np.ndarray]:
        """A `DayStream` row filter selecting split `name`."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"split '{name}' is not one of {SPLIT_NAMES}")
        code = SPLIT_NAMES.index(name)
        return lambda day: self.codes[day.date] == code

    def counts(self) -> dict[str, int]:
        every = np.concatenate(list(self.codes.values()))
        return {n: int(np.count_nonzero(every == i)) for i, n in enumerate(SPLIT_NAMES)}


def _check_fractions(fractions: tuple[float, ...]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.size != 3 or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise ValueError(
            f"fractions must be three non-negative numbers (train, valid, test) summing to 1, got {fractions}"
        )
    return np.cumsum(f)


def _per_day(dataset: Dataset, codes: np.ndarray) -> SplitAssignment:
    bounds = np.cumsum([0, *(d.num_rows for d in dataset.days)])
    return SplitAssignment({d.date: codes[bounds[i] : bounds[i + 1]] for i, d in enumerate(dataset.days)})


def random_split(
    dataset: Dataset, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> SplitAssignment:
    """Each row to train/valid/test independently with the given probabilities."""
    cum = _check_fractions(fractions)
    u = uniform_hash(np.arange(dataset.num_rows), seed)
    codes = np.minimum(np.searchsorted(cum, u, side="right"), 2).astype(np.int8)
    return _per_day(dataset, codes)


def per_user_split(
    dataset: Dataset, fractions: tuple[float, float, float] = (0.5, 0.25, 0.25), seed: int = 0
) -> SplitAssignment:
    """Each user's rows shuffled and cut at `round(cumulative fraction × n_user)` (stratified per user)."""
    cum = _check_fractions(fractions)
    spec = dataset.spec
    if spec.user_field is None:
        raise DatasetError(
            dataset.root / "dataset.yaml",
            "a per-user split needs a user field, but the spec names none",
            "set user_field in dataset.yaml, or use the random split",
        )
    user = spec.field(spec.user_field).column
    df = (
        dataset.scan()
        .select(pl.col(user))
        .with_row_index("row")
        .collect()
        .with_columns(key=pl.Series(uniform_hash(np.arange(dataset.num_rows), seed)))
        .with_columns(
            pos=pl.col("key").rank("ordinal").over(user) - 1,
            n=pl.len().over(user),
        )
    )
    pos = df.get_column("pos").to_numpy().astype(np.float64)
    n = df.get_column("n").to_numpy().astype(np.float64)
    cut_train = np.floor(cum[0] * n + 0.5)
    cut_valid = np.floor(cum[1] * n + 0.5)
    codes = np.where(pos < cut_train, 0, np.where(pos < cut_valid, 1, 2)).astype(np.int8)
    return _per_day(dataset, codes)


def given_split(dataset: Dataset) -> SplitAssignment:
    """The split shipped with the source, from the spec's `split` column."""
    spec = dataset.spec
    if spec.split is None:
        raise DatasetError(
            dataset.root / "dataset.yaml",
            "the spec names no split column",
            "use the random or per-user split, or ingest a source that ships a split",
        )
    names = dataset.scan().select(pl.col(spec.split)).collect().get_column(spec.split)
    if bad := sorted(set(names.unique().drop_nulls().to_list()) - set(SPLIT_NAMES)):
        raise DatasetError(
            dataset.root,
            f"split values {bad} are not in {SPLIT_NAMES}",
            "re-run the ingest",
            column=spec.split,
        )
    codes = names.replace_strict(list(SPLIT_NAMES), [0, 1, 2], return_dtype=pl.Int8).to_numpy()
    return _per_day(dataset, codes)


def assign_splits(
    dataset: Dataset,
    kind: SplitKind,
    *,
    fractions: tuple[float, float, float] | None = None,
    seed: int = 0,
) -> SplitAssignment:
    """Assign every row of `dataset` to train / valid / test by protocol `kind`."""
    if kind == "random":
        return random_split(dataset, fractions or (0.8, 0.1, 0.1), seed)
    if kind == "per-user":
        return per_user_split(dataset, fractions or (0.5, 0.25, 0.25), seed)
    if kind == "given":
        return given_split(dataset)
    raise ValueError(f"split kind '{kind}' is not one of random, per-user, given")
