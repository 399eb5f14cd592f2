from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DatasetError
from pipeline.vocab import FALLBACK_ROW, Vocabulary, VocabularySet


def _reference(stream: list[np.ndarray]) -> tuple[dict[int, int], dict[int, int]]:
    """Plain-Python id → row (first appearance, from row 1) and row → count."""
    rows: dict[int, int] = {}
    counts: dict[int, int] = {}
    for chunk in stream:
        for raw in chunk.tolist():
            row = rows.setdefault(raw, len(rows) + 1)
            counts[row] = counts.get(row, 0) + 1
    return rows, counts


@pytest.mark.parametrize("scale", [1, 1_000_003], ids=["direct-index", "hashed"])
def test_vocabulary_matches_dict_reference(scale: int) -> None:
    rng = np.random.default_rng(0)
    days = [(rng.zipf(1.3, 5000) % 3000 + 100 * d) * scale for d in range(4)]
    vocab = Vocabulary()
    for day in days:
        vocab.update(day)
    ref_rows, ref_counts = _reference(days)
    assert vocab.num_ids == len(ref_rows)
    np.testing.assert_array_equal(vocab.raw_ids, np.array(list(ref_rows)))
    np.testing.assert_array_equal(vocab.counts[1:], [ref_counts[r] for r in range(1, vocab.num_rows)])
    probe = np.concatenate([days[0], np.array([7, 999_999_999_999]) * scale + 1])
    expected = np.array([ref_rows.get(int(x), FALLBACK_ROW) for x in probe])
    np.testing.assert_array_equal(vocab.lookup(probe), expected)


def test_growth_is_in_order_of_first_appearance_and_unseen_are_counted() -> None:
    vocab = Vocabulary()
    np.testing.assert_array_equal(vocab.update(np.array([40, 10, 40, 30])), [1, 2, 1, 3])
    np.testing.assert_array_equal(vocab.update(np.array([20, 10])), [4, 2])  # day 2 appends, old rows stay
    np.testing.assert_array_equal(vocab.counts, [0, 2, 2, 1, 1])
    np.testing.assert_array_equal(vocab.lookup(np.array([30, 50, 60, 20])), [3, FALLBACK_ROW, FALLBACK_ROW, 4])
    assert vocab.unseen == 2
    assert vocab.num_rows == 5


def test_capacity_sends_overflow_to_fallback_and_counts_it() -> None:
    vocab = Vocabulary(capacity=3)
    rows = vocab.update(np.array([5, 6, 7, 5, 8]))
    np.testing.assert_array_equal(rows, [1, 2, FALLBACK_ROW, 1, FALLBACK_ROW])
    assert vocab.overflow == 2 and vocab.num_rows == 3
    assert vocab.counts[FALLBACK_ROW] == 2


def test_save_load_round_trip(tmp_path: Path) -> None:
    vocabs = VocabularySet(["a", "b"], capacity={"b": 10})
    vocabs["a"].update(np.array([3, 1, 3]) * 10**12)
    vocabs["b"].update(np.array([9, 9, 2]))
    vocabs["b"].lookup(np.array([4]))
    vocabs.save(tmp_path / "vocab")
    back = VocabularySet.load(tmp_path / "vocab")
    assert back.stats() == vocabs.stats()
    for f in ("a", "b"):
        np.testing.assert_array_equal(back[f].raw_ids, vocabs[f].raw_ids)
        np.testing.assert_array_equal(back[f].counts, vocabs[f].counts)
    np.testing.assert_array_equal(back["a"].lookup(np.array([1, 3, 2]) * 10**12), [2, 1, 0])
    assert back["b"].capacity == 10


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no vocabulary here"):
        VocabularySet.load(tmp_path)
    VocabularySet(["a"]).save(tmp_path / "v")
    (tmp_path / "v" / "000.parquet").unlink()
    with pytest.raises(DatasetError, match=r"000\.parquet.*feature 'a' is missing"):
        VocabularySet.load(tmp_path / "v")


def test_incremental_updates_at_scale_match_dict_reference() -> None:
    """~1M distinct large ids admitted over many batches (the hash table doubles several times), then a capacity
    that is reached mid-batch, and lookups that count unseen ids, all against a plain dict."""
    rng = np.random.default_rng(1)
    universe = rng.integers(0, 1 << 62, 1_180_000)
    batches = []
    for b in range(40):  # each batch opens new ids and repeats Zipf-popular old ones
        opened = universe[: (b + 1) * 27_000]
        fresh = opened[-27_000:]
        popular = opened[np.minimum(rng.zipf(1.2, 20_000), opened.size) - 1]
        batch = np.concatenate([fresh, fresh[:3000], popular])
        batches.append(batch[rng.permutation(batch.size)])
    vocab = Vocabulary()
    returned = [vocab.update(batch) for batch in batches]
    ref_rows, ref_counts = _reference(batches)
    assert vocab.num_ids == len(ref_rows) > 1_000_000
    np.testing.assert_array_equal(vocab.raw_ids, np.fromiter(ref_rows, dtype=np.int64))
    np.testing.assert_array_equal(vocab.counts[1:], [ref_counts[r] for r in range(1, vocab.num_rows)])
    for batch, rows in zip(batches[::7], returned[::7], strict=True):
        np.testing.assert_array_equal(rows, [ref_rows[x] for x in batch.tolist()])
    probe = np.concatenate([batches[-1][:50_000], universe[-100_000:]])  # the last 100k ids were never opened
    assert not set(universe[-100_000:].tolist()) & set(ref_rows)
    np.testing.assert_array_equal(vocab.lookup(probe), [ref_rows.get(x, FALLBACK_ROW) for x in probe.tolist()])
    assert vocab.unseen == 100_000

    capped = Vocabulary(capacity=500_001)  # 500,000 ids fit: the table fills partway through a batch
    capped_rows = np.concatenate([capped.update(batch) for batch in batches[:25]])
    admitted = dict(list(ref_rows.items())[:500_000])
    stream = np.concatenate(batches[:25]).tolist()
    np.testing.assert_array_equal(capped_rows, [admitted.get(x, FALLBACK_ROW) for x in stream])
    assert capped.num_rows == 500_001
    # Refused ids are counted per update: an id refused in two batches counts twice (as before the hash table).
    assert capped.overflow == sum(len(set(b.tolist()) - admitted.keys()) for b in batches[:25])
    assert capped.counts[FALLBACK_ROW] == sum(1 for x in stream if x not in admitted)
    assert capped.unseen == 0  # training updates do not count as unseen lookups


def test_update_refuses_negative_ids() -> None:
    with pytest.raises(ValueError, match="raw ids must be >= 0, got -3"):
        Vocabulary().update(np.array([5, -3]))


def test_direct_index_switches_to_hash_table_when_ids_grow_past_its_range() -> None:
    vocab = Vocabulary()
    vocab.update(np.array([3, 1, 3]))
    np.testing.assert_array_equal(vocab.update(np.array([1, 10**15, 2])), [2, 3, 4])
    np.testing.assert_array_equal(vocab.lookup(np.array([3, 1, 10**15, 2, 7])), [1, 2, 3, 4, FALLBACK_ROW])
