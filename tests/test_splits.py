from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.dataset import Dataset
from pipeline.splits import assign_splits, per_user_split, random_split
from pipeline.stream import DayStream, StreamConfig
from pipeline.vocab import VocabularySet
from tests.helpers import write_tiny


@pytest.fixture
def dataset(tmp_path: Path) -> Dataset:
    return Dataset(write_tiny(tmp_path / "d", rows_per_day=(4000, 3000, 3000)))


def test_random_split_proportions_and_determinism(dataset: Dataset) -> None:
    counts = random_split(dataset, seed=3).counts()
    assert sum(counts.values()) == dataset.num_rows
    np.testing.assert_allclose(
        [counts[k] / dataset.num_rows for k in ("train", "valid", "test")], [0.8, 0.1, 0.1], atol=0.015
    )
    a, b, c = random_split(dataset, seed=3), random_split(dataset, seed=3), random_split(dataset, seed=4)
    assert all(np.array_equal(a.codes[d], b.codes[d]) for d in a.codes)
    assert not all(np.array_equal(a.codes[d], c.codes[d]) for d in a.codes)


def test_per_user_split_is_stratified(dataset: Dataset) -> None:
    split = per_user_split(dataset, seed=0)
    users = dataset.scan().select("user").collect()["user"]
    frame = pl.DataFrame({"user": users, "code": np.concatenate([split.codes[d.date] for d in dataset.days])})
    per_user = frame.group_by("user").agg(
        n=pl.len(), train=(pl.col("code") == 0).sum(), valid=(pl.col("code") == 1).sum()
    )
    for n, train, valid in per_user.select("n", "train", "valid").iter_rows():
        assert train == np.floor(0.5 * n + 0.5)  # recommenders' python_stratified_split cut points
        assert train + valid == np.floor(0.75 * n + 0.5)
    counts = split.counts()
    np.testing.assert_allclose(counts["train"] / dataset.num_rows, 0.5, atol=0.01)


def test_stream_reads_only_the_selected_split(dataset: Dataset) -> None:
    split = assign_splits(dataset, "random", seed=1)
    vocab = VocabularySet(dataset.spec.feature_names)
    stream = DayStream(dataset, vocab, StreamConfig(batch_size=512), row_filter=split.row_filter("valid"))
    n = sum(b.labels.numel() for day in stream.days for b in stream.batches(day, grow=True))
    assert n == split.counts()["valid"]
    assert vocab["rid"].num_ids == n  # the vocabulary grew only from the valid rows


def test_bad_fractions_and_missing_split_column(dataset: Dataset) -> None:
    with pytest.raises(ValueError, match="summing to 1"):
        random_split(dataset, (0.5, 0.5, 0.5))
    with pytest.raises(Exception, match="names no split column"):
        assign_splits(dataset, "given")
