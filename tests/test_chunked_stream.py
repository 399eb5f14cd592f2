"""Chunked per-rank reading (issue 13, part 2) against the whole-day read it replaced.

The reference is the previous `DayStream._read`, kept here as plainly correct code: every rank reads the whole day
(or the whole split), grows the vocabulary with `Vocabulary.update` over all of it in row order, and cuts its own
contiguous rows into `batch_bounds` batches. The chunked stream must give the same batches (values, lengths, dense,
labels) and leave the same vocabularies (raw ids in row order, counts, unseen, overflow) on every rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from pipeline.dataset import Dataset, Day
from pipeline.splits import assign_splits
from pipeline.stream import DayStream, StreamConfig, batch_bounds, rank_slice
from pipeline.vocab import Vocabulary, VocabularySet
from tests.helpers import write_tiny
from tests.multiprocess import run_ranks

# (values, lengths, dense, labels) of one batch
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
RowFilter = Callable[[Day], np.ndarray] | None


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths, dtype=np.int64)])


def _reference_batches(
    dataset: Dataset,
    vocab: VocabularySet,
    batch_size: int,
    rank: int,
    world_size: int,
    row_filter: RowFilter,
    day: Day,
    grow: bool,
) -> list[Arrays]:
    """The whole-day read: read everything, grow from all of it in row order, then slice this rank's rows."""
    spec = dataset.spec
    fields = [spec.field(f) for f in spec.feature_names]
    df = dataset.read_day(day, [spec.label, *(f.column for f in fields), *spec.dense])
    if row_filter is not None:
        df = df.filter(pl.Series(row_filter(day)))
    largest = -(-df.height // world_size)
    num_batches = -(-largest // batch_size)
    start, stop = rank_slice(df.height, rank, world_size)
    if grow:
        mapped = []
        for f in fields:
            col = df.get_column(f.column)
            ids = col.explode(empty_as_null=False).drop_nulls() if f.multi_hot else col
            rows = vocab[f.name].update(ids.to_numpy())
            mapped.append((rows, col.list.len().fill_null(0).to_numpy() if f.multi_hot else None))
        df = df.slice(start, stop - start)
        cut = []
        for rows, lengths in mapped:
            if lengths is None:
                cut.append((rows[start:stop], None))
            else:
                offsets = _offsets(lengths)
                cut.append((rows[offsets[start] : offsets[stop]], lengths[start:stop]))
    else:
        df = df.slice(start, stop - start)
        cut = []
        for f in fields:
            col = df.get_column(f.column)
            ids = col.explode(empty_as_null=False).drop_nulls() if f.multi_hot else col
            rows = vocab[f.name].lookup(ids.to_numpy())
            cut.append((rows, col.list.len().fill_null(0).to_numpy() if f.multi_hot else None))
    dense = df.select(spec.dense).cast(pl.Float32).to_numpy() if spec.dense else np.zeros((df.height, 0), np.float32)
    labels = df.get_column(spec.label).cast(pl.Float32).to_numpy()
    out = []
    for a, b in itertools.pairwise(batch_bounds(df.height, num_batches).tolist()):
        values, lengths = [], []
        for rows, per_row in cut:
            if per_row is None:
                values.append(rows[a:b])
                lengths.append(np.ones(b - a, dtype=np.int32))
            else:
                offsets = _offsets(per_row)
                values.append(rows[offsets[a] : offsets[b]])
                lengths.append(per_row[a:b].astype(np.int32))
        out.append((np.concatenate(values), np.concatenate(lengths), dense[a:b], labels[a:b]))
    return out


def _arrays(stream: DayStream, day: Day, grow: bool) -> list[Arrays]:
    return [
        (
            b.sparse_features.values().numpy(),
            b.sparse_features.lengths().numpy(),
            b.dense_features.numpy(),
            b.labels.numpy(),
        )
        for b in stream.batches(day, grow=grow)
    ]


def _assert_same_batches(got: list[Arrays], want: list[Arrays]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            assert a.dtype == b.dtype or a.size == 0
            np.testing.assert_array_equal(a, b)


def _assert_same_vocab(got: VocabularySet, want: VocabularySet) -> None:
    for f in want.features:
        np.testing.assert_array_equal(got[f].raw_ids, want[f].raw_ids)
        np.testing.assert_array_equal(got[f].counts, want[f].counts)
    assert got.stats() == want.stats()


def _capacity(features: list[str], capped: bool) -> dict[str, int | None]:
    # Small enough that rid (every id new every day) and item overflow: refused ids must count the same way.
    return dict.fromkeys(features, 60) if capped else {}


def _compare_prequential(
    dataset: Dataset,
    config: StreamConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    row_filter: RowFilter = None,
    capped: bool = False,
    gather: Callable[[Any], list[Any]] | None = None,
) -> None:
    """Evaluate, then train, on every day (the streaming protocol), chunked against the reference."""
    features = dataset.spec.feature_names
    chunked = VocabularySet(features, _capacity(features, capped))
    reference = VocabularySet(features, _capacity(features, capped))
    stream = DayStream(dataset, chunked, config, rank=rank, world_size=world_size, row_filter=row_filter, gather=gather)
    for day in dataset.days:
        for grow in (False, True):
            got = _arrays(stream, day, grow)
            want = _reference_batches(dataset, reference, config.batch_size, rank, world_size, row_filter, day, grow)
            _assert_same_batches(got, want)
            _assert_same_vocab(chunked, reference)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    # Days of 101, 77 and 50 rows: no chunk size below divides them all.
    return Dataset(write_tiny(tmp_path_factory.mktemp("chunked") / "tiny"))


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 1000])
@pytest.mark.parametrize("capped", [False, True])
def test_chunked_equals_whole_day_on_one_rank(dataset: Dataset, chunk_rows: int, capped: bool) -> None:
    _compare_prequential(dataset, StreamConfig(batch_size=5, prefetch=0, chunk_rows=chunk_rows), capped=capped)


def test_chunked_equals_whole_day_with_prefetch_and_a_split(dataset: Dataset) -> None:
    split = assign_splits(dataset, "random", fractions=(0.6, 0.2, 0.2), seed=3)
    for name in ("train", "valid"):
        _compare_prequential(
            dataset, StreamConfig(batch_size=4, prefetch=2, chunk_rows=9), row_filter=split.row_filter(name)
        )


@pytest.mark.parametrize("world_size", [2, 3])
def test_without_a_gather_every_rank_scans_the_day_and_agrees(dataset: Dataset, world_size: int) -> None:
    for rank in range(world_size):
        _compare_prequential(
            dataset,
            StreamConfig(batch_size=4, prefetch=0, chunk_rows=11),
            rank=rank,
            world_size=world_size,
            capped=True,
        )


def test_chunk_boundaries_fall_on_batch_boundaries() -> None:
    assert StreamConfig(batch_size=8192).batches_per_chunk == 122  # 1,000,000 rows rounded down to whole batches
    assert StreamConfig(batch_size=10, chunk_rows=3).batches_per_chunk == 1
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        StreamConfig(chunk_rows=0)


def test_update_distinct_equals_update_over_the_ids() -> None:
    rng = np.random.default_rng(1)
    for capacity in (None, 50, 1):
        by_ids, by_counts = Vocabulary(capacity), Vocabulary(capacity)
        for day in range(4):
            ids = rng.integers(0, 80 + 40 * day, 300) * (1 if day < 2 else 1 << 40)  # day 2 leaves the direct index
            by_ids.update(ids)
            distinct = pl.DataFrame({"id": ids}).group_by("id", maintain_order=True).len()
            by_counts.update_distinct(distinct["id"].to_numpy(), distinct["len"].to_numpy())
            np.testing.assert_array_equal(by_counts.raw_ids, by_ids.raw_ids)
            np.testing.assert_array_equal(by_counts.counts, by_ids.counts)
            assert (by_counts.overflow, by_counts.unseen) == (by_ids.overflow, by_ids.unseen)
            np.testing.assert_array_equal(by_counts.lookup(ids), by_ids.lookup(ids))
    with pytest.raises(ValueError, match="raw ids must be >= 0"):
        Vocabulary().update_distinct(np.array([3, -1]), np.array([1, 1]))


def _run_chunked_on_ranks(rank: int, world_size: int, path: str) -> None:
    import torch.distributed as dist

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, obj)
        return out

    calls = 0

    def counted(obj: Any) -> list[Any]:
        nonlocal calls
        calls += 1
        return gather(obj)

    dataset = Dataset(path)
    for chunk_rows, capped in ((7, False), (16, True), (1000, False)):
        _compare_prequential(
            dataset,
            StreamConfig(batch_size=5, prefetch=2, chunk_rows=chunk_rows),
            rank=rank,
            world_size=world_size,
            capped=capped,
            gather=counted,
        )
    # one gather per feature and training day, none for evaluation
    assert calls == 3 * len(dataset.days) * len(dataset.spec.feature_names)
    split = assign_splits(dataset, "per-user", fractions=(0.5, 0.25, 0.25), seed=0)
    _compare_prequential(
        dataset,
        StreamConfig(batch_size=3, prefetch=0, chunk_rows=8),
        rank=rank,
        world_size=world_size,
        row_filter=split.row_filter("train"),
        gather=gather,
    )


@pytest.mark.multirank
def test_chunked_equals_whole_day_on_two_gloo_ranks(tmp_path: Path) -> None:
    run_ranks(_run_chunked_on_ranks, 2, str(write_tiny(tmp_path / "tiny")))
