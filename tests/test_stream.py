from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.streamable import Pipelineable

from pipeline.dataset import Dataset
from pipeline.stream import DayStream, StreamConfig, batch_bounds, rank_slice
from pipeline.vocab import FALLBACK_ROW, VocabularySet
from tests.helpers import tiny_frame, write_tiny


@pytest.fixture
def dataset(tmp_path: Path) -> Dataset:
    return Dataset(write_tiny(tmp_path / "tiny"))


def _raw(vocab: VocabularySet, feature: str, rows: torch.Tensor) -> list[int]:
    return vocab[feature].raw_ids[rows.numpy() - 1].tolist()


def test_batches_hold_every_row_in_order_with_the_right_values(dataset: Dataset) -> None:
    frame = tiny_frame()
    vocab = VocabularySet(dataset.spec.feature_names)
    stream = DayStream(dataset, vocab, StreamConfig(batch_size=16, prefetch=2))
    got: dict[str, list[object]] = {"rid": [], "tags": [], "label": [], "x1": []}
    for day in stream.days:
        for batch in stream.batches(day, grow=True):
            assert isinstance(batch, Batch) and isinstance(batch, Pipelineable)
            kjt = batch.sparse_features
            assert kjt.keys() == ["rid", "user", "item", "tags"]
            assert kjt.stride() == batch.labels.numel() <= 16
            per_key = kjt.to_dict()
            got["rid"] += _raw(vocab, "rid", per_key["rid"].values())
            tags = per_key["tags"]
            offsets = tags.offsets().tolist()
            raw_tags = _raw(vocab, "tags", tags.values()) if tags.values().numel() else []
            got["tags"] += [raw_tags[a:b] for a, b in itertools.pairwise(offsets)]
            got["label"] += batch.labels.tolist()
            got["x1"] += batch.dense_features[:, 1].tolist()
    assert got["rid"] == frame["rid"].to_list()
    assert got["tags"] == frame["tags"].to_list()
    assert got["label"] == frame["label"].to_list()
    np.testing.assert_allclose(got["x1"], frame["x1"].to_numpy(), rtol=1e-6)


def test_rank_slices_are_disjoint_complete_and_equal_in_batch_count(dataset: Dataset) -> None:
    for world_size in (2, 3):
        seen: list[int] = []
        for rank in range(world_size):
            vocab = VocabularySet(dataset.spec.feature_names)
            stream = DayStream(dataset, vocab, StreamConfig(batch_size=8, prefetch=0), rank=rank, world_size=world_size)
            for day in stream.days:
                batches = list(stream.batches(day, grow=True))
                assert len(batches) == stream.num_batches(day)
                assert all(0 < b.labels.numel() <= 8 for b in batches)
                for b in batches:
                    seen += _raw(vocab, "rid", b.sparse_features["rid"].values())
        expected = tiny_frame()["rid"].to_list()
        assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))


def test_every_rank_holds_the_same_vocabulary(dataset: Dataset) -> None:
    vocabs = [VocabularySet(dataset.spec.feature_names) for _ in range(2)]
    for rank, vocab in enumerate(vocabs):
        stream = DayStream(dataset, vocab, StreamConfig(batch_size=10, prefetch=0), rank=rank, world_size=2)
        for day in stream.days:
            list(stream.batches(day, grow=True))
    for f in dataset.spec.feature_names:
        np.testing.assert_array_equal(vocabs[0][f].raw_ids, vocabs[1][f].raw_ids)
        np.testing.assert_array_equal(vocabs[0][f].counts, vocabs[1][f].counts)


def test_prequential_eval_maps_unseen_ids_to_the_fallback_row(dataset: Dataset) -> None:
    vocab = VocabularySet(dataset.spec.feature_names)
    stream = DayStream(dataset, vocab, StreamConfig(batch_size=1000, prefetch=0))
    first, second = stream.days[:2]
    list(stream.batches(first, grow=True))
    known = set(vocab["rid"].raw_ids.tolist())
    (batch,) = list(stream.batches(second, grow=False))
    rows = batch.sparse_features["rid"].values()
    assert (rows == FALLBACK_ROW).all()  # every row id is new on day 2
    assert vocab["rid"].unseen == second.num_rows
    assert vocab["rid"].num_ids == len(known)  # evaluation does not grow the vocabulary


def test_batch_bounds_and_rank_slice() -> None:
    assert rank_slice(10, 0, 3) == (0, 3) and rank_slice(10, 2, 3) == (6, 10)
    np.testing.assert_array_equal(batch_bounds(10, 3), [0, 3, 6, 10])
    with pytest.raises(ValueError, match="rank 2 is not in"):
        rank_slice(10, 2, 2)


def test_batch_moves_with_to(dataset: Dataset) -> None:
    vocab = VocabularySet(dataset.spec.feature_names)
    stream = DayStream(dataset, vocab, StreamConfig(batch_size=32))
    batch = next(iter(stream.batches(stream.days[0], grow=True)))
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    torch.testing.assert_close(moved.labels, batch.labels)


def test_prefetch_reraises_producer_errors(dataset: Dataset) -> None:
    vocab = VocabularySet(dataset.spec.feature_names)
    stream = DayStream(dataset, vocab, StreamConfig(batch_size=32, prefetch=2))
    day = stream.days[0]
    for f in day.files:
        f.write_bytes(b"not parquet")
    with pytest.raises(Exception, match=r"parquet|Parquet"):
        list(stream.batches(day, grow=True))


def test_keying_gives_the_plans_table_keys_beside_the_vocabulary_rows(dataset: Dataset) -> None:
    # The job hands the stream the plan's remap; its batches then read the bucket tables' keys, computed when the
    # batch is built (in the prefetch thread), and equal the remap applied by hand.
    from sharding.embedding import RowRemap
    from sharding.plan import DimensionPlan, FeaturePlan

    features = dataset.spec.feature_names
    plain = VocabularySet(features, capacity=dict.fromkeys(features, 64))
    keyed_vocab = VocabularySet(features, capacity=dict.fromkeys(features, 64))
    first = features[0]
    dims = np.where(np.arange(64) % 3 == 0, 8, 4)
    plan = DimensionPlan(
        tuple(
            FeaturePlan(f, 64, 8, row_dims=dims, projection="pad") if f == first else FeaturePlan(f, 64, 4, dim=4)
            for f in features
        )
    )
    remap = RowRemap(plan)
    by_hand = DayStream(dataset, plain, StreamConfig(batch_size=16, prefetch=0))
    keyed = DayStream(dataset, keyed_vocab, StreamConfig(batch_size=16, prefetch=2), keying=remap)
    for day in dataset.days:
        pairs = list(keyed.batches_with_rows(day, grow=True))
        expected = list(by_hand.batches(day, grow=True))
        assert len(pairs) == len(expected)
        for (rows, batch), want in zip(pairs, expected, strict=True):
            assert torch.equal(rows.values(), want.sparse_features.values())
            manual = remap(want.sparse_features)
            assert batch.sparse_features.keys() == manual.keys() == remap.keys
            assert torch.equal(batch.sparse_features.values(), manual.values())
            assert torch.equal(batch.sparse_features.lengths(), manual.lengths())


def test_a_day_whose_split_selects_no_row_yields_no_batch(dataset: Dataset) -> None:
    # The second day's split is empty: it grows nothing and yields nothing, and the other days stream as usual.
    second = dataset.days[1]

    def keep(day):  # type: ignore[no-untyped-def]
        return np.full(day.num_rows, day != second)

    vocab = VocabularySet(dataset.spec.feature_names)
    stream = DayStream(dataset, vocab, StreamConfig(batch_size=16, prefetch=0), row_filter=keep)
    counts = [sum(int(b.labels.numel()) for b in stream.batches(day, grow=True)) for day in stream.days]
    assert counts == [day.num_rows if day != second else 0 for day in dataset.days]
    assert [stream.num_batches(day) for day in dataset.days][1] == 0
