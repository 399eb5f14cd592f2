"""Id vocabularies: raw id → embedding row per feature, in order of first appearance (DESIGN.md decision 3).

Row 0 of every feature is the fallback row: ids never seen in training (or seen after the table's capacity was
reached) map to it at lookup, and are counted, never a crash and never a silent wrong row. Real ids take rows
1, 2, ... in the order they first appear in the stream, so a table can grow day by day without moving a row.
Every row also counts how often it was seen in training: the row-level searches (ESAPN, CIESS, SCALL) size rows
by these frequencies.

Everything is vectorised, and an update costs time in the ids it admits, not in the ids already held (a feature
may hold 10M ids and admit a few hundred thousand a day). Small non-negative raw ids are looked up through a
direct index array (one gather), grown geometrically. Other ids go through a growable open-addressing hash table
(`HashTable`: multiplicative hashing, linear probing, load at most 1/3, doubled when full, so each id is re-hashed
O(1) times amortised). `update` looks each id up once: the ids it misses are deduplicated in order of first
appearance with their inverse, so their rows follow without a second lookup. `python -m benchmarks.vocab` compares
this table with the previous static two-level hash, a polars join, `pandas.Index.get_indexer` and a sorted
`np.searchsorted` (BENCHMARKS.md, "vocab"); `tests/test_vocab.py` checks it against a plain Python dict.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.errors import DatasetError

logger = logging.getLogger(__name__)

FALLBACK_ROW = 0
VOCAB_VERSION = 1
# Raw ids below this bound are looked up through a direct int32 index array (at most 16 MiB per feature).
_DIRECT_LIMIT = 1 << 22
_EMPTY = -1  # marks a free slot; raw ids are non-negative (checked in `update`) so it never matches a query
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio (Fibonacci hashing)
_MIN_BITS = 10
_SLOTS_PER_KEY = 3  # the load stays at most 1/3 (at 1/2 lookups ran at half the speed: BENCHMARKS.md, "pipeline")


def _slot(ids: np.ndarray, bits: int) -> np.ndarray:
    """Home slot of each id in a table of 2**bits slots: the top bits of a multiplicative hash."""
    x = ids.view(np.uint64)
    # Fold the high half in first: ids that differ only in their high bits (k << 40) still spread over the slots.
    x = (x ^ (x >> np.uint64(32))) * _MULTIPLIER
    # The shifted product is below 2**bits, so viewing it as int64 is exact and copies nothing.
    return (x >> np.uint64(64 - bits)).view(np.int64)


class HashTable:
    """A growable raw id → row hash table with linear probing, vectorised over batches of ids.

    Key and row sit side by side in one (2**bits, 2) int64 array, so a probe is one gather (one cache line). The
    load stays at most 1/3: a hit takes 1.25 probes and a miss 1.6 on average, each round of probes one vectorised
    pass over the ids still unresolved. Nothing is ever deleted, so a slot once filled stays filled, which is all
    linear probing needs to stay correct under inserts.
    """

    def __init__(self) -> None:
        self.bits = _MIN_BITS
        self.size = 0
        self.table = np.full((1 << self.bits, 2), _EMPTY, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return int(self.table.nbytes)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids`; `FALLBACK_ROW` for ids not in the table."""
        mask = (1 << self.bits) - 1
        slot = _slot(ids, self.bits)
        entries = np.take(self.table, slot, axis=0)
        hit = entries[:, 0] == ids
        rows = np.where(hit, entries[:, 1], FALLBACK_ROW)
        # Ids whose probe met another key go on to the next slot; the rest are resolved (hit or empty slot).
        pending = np.flatnonzero(~hit & (entries[:, 0] != _EMPTY))
        keys, slot = ids[pending], slot[pending]
        while pending.size:
            slot = (slot + 1) & mask
            entries = np.take(self.table, slot, axis=0)
            hit = entries[:, 0] == keys
            rows[pending[hit]] = entries[hit, 1]
            more = ~hit & (entries[:, 0] != _EMPTY)
            pending, keys, slot = pending[more], keys[more], slot[more]
        return rows

    def insert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Add `keys` → `rows`. The keys must be distinct and not yet in the table (`Vocabulary.update` ensures it)."""
        if _SLOTS_PER_KEY * (self.size + keys.size) > self.table.shape[0]:
            self._grow(self.size + keys.size)
        self._place(keys, rows)
        self.size += int(keys.size)

    def _grow(self, size: int) -> None:
        old = self.table[self.table[:, 0] != _EMPTY]
        self.bits = max(int(np.ceil(np.log2(_SLOTS_PER_KEY * size))), _MIN_BITS)
        self.table = np.full((1 << self.bits, 2), _EMPTY, dtype=np.int64)
        self._place(old[:, 0], old[:, 1])

    def _place(self, keys: np.ndarray, rows: np.ndarray) -> None:
        mask = (1 << self.bits) - 1
        slot = _slot(keys, self.bits)
        while keys.size:
            free = self.table[slot, 0] == _EMPTY
            # Keys that race for one free slot: one write lands (the keys are distinct, so exactly one reads back).
            self.table[slot[free], 0] = keys[free]
            won = np.zeros(keys.size, dtype=bool)
            won[free] = self.table[slot[free], 0] == keys[free]
            self.table[slot[won], 1] = rows[won]
            # The losers' slots are all filled now, so they probe on: no empty slot is ever left behind them.
            lost = ~won
            keys, rows, slot = keys[lost], rows[lost], (slot[lost] + 1) & mask


def _distinct_with_inverse(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ids in order of first appearance, and for each id its position among them.

    One hash group-by (polars): each id gets the index of its first occurrence; the first occurrences, in order,
    are the distinct ids, and a running count of them numbers each id's group.
    """
    first = (
        pl.DataFrame({"id": ids})
        .with_row_index("i")
        .select(pl.col("i").min().over("id"))
        .to_series()
        .to_numpy()
        .astype(np.int64, copy=False)
    )
    is_first = first == np.arange(ids.size)
    code = np.cumsum(is_first) - 1
    return ids[is_first], code[first]


class Vocabulary:
    """The id → row map of one feature.

    Args:
        capacity: the most rows the feature's table has, fallback row included; `None` for unbounded. Ids that
            arrive when the table is full are not admitted: they map to the fallback row and are counted in
            `overflow`.
    """

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1 (the fallback row), got {capacity}")
        self.capacity = capacity
        self.unseen = 0  # lookups that fell back to row 0 because the id was never admitted
        self.overflow = 0  # distinct ids refused because the table was full
        self.counts = np.zeros(1, dtype=np.int64)  # training occurrences per row; row 0 counts unadmitted ids
        # Raw id of row r+1, over-allocated and grown geometrically so that admitting a day's ids does not copy
        # everything admitted before.
        self._raw_ids = np.zeros(0, dtype=np.int64)
        self._num_ids = 0
        # Raw id → row while every id < _DIRECT_LIMIT. One slot longer than the ids it covers: the last slot stays 0
        # (the fallback row), and a lookup clamps every id past the range onto it, so it is one gather with no mask.
        self._direct: np.ndarray | None = np.zeros(1, dtype=np.int32)
        self._hashed: HashTable | None = None

    @property
    def raw_ids(self) -> np.ndarray:
        """Raw id of row r+1, in order of first appearance (a read-only view)."""
        return _read_only(self._raw_ids[: self._num_ids])

    @property
    def num_rows(self) -> int:
        """Rows in use, fallback row included."""
        return self._num_ids + 1

    @property
    def num_ids(self) -> int:
        """Distinct raw ids admitted."""
        return self._num_ids

    @property
    def index_nbytes(self) -> int:
        """Bytes held by the id → row index (the direct array or the hash table), not counting `raw_ids`."""
        return int(self._direct.nbytes) if self._direct is not None else self._hashed.nbytes if self._hashed else 0

    def lookup(self, ids: np.ndarray, *, count_unseen: bool = True) -> np.ndarray:
        """Map raw ids to rows; ids never admitted map to `FALLBACK_ROW` (and are counted in `unseen`)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._direct is not None:
            # Viewed as unsigned, a negative id is past the range too.
            end = np.uint64(self._direct.size - 1)
            rows = self._direct.take(np.minimum(ids.view(np.uint64), end)).astype(np.int64)
        else:
            assert self._hashed is not None
            rows = self._hashed.lookup(ids)
        if count_unseen:
            self.unseen += int(np.count_nonzero(rows == FALLBACK_ROW))
        return rows

    def update(self, ids: np.ndarray) -> np.ndarray:
        """Admit new ids (in order of first appearance in `ids`), count every occurrence, and return the rows.

        Raises:
            ValueError: an id is negative (datasets are validated to hold non-negative ids).
        """
        ids = np.asarray(ids, dtype=np.int64)
        rows = self.lookup(ids, count_unseen=False)
        new_mask = rows == FALLBACK_ROW
        if new_mask.any():
            # The only lookup of these ids was the one above: their rows follow from their order of first appearance.
            new_ids, position = _distinct_with_inverse(ids[new_mask])
            rows[new_mask] = self._admit_capped(new_ids)[position]
        # A new array, not an in-place add: callers keep earlier days' counts (ESAPN diffs them day to day).
        counts = np.bincount(rows, minlength=self.num_rows)
        counts[: self.counts.size] += self.counts
        self.counts = counts
        return rows

    def update_distinct(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """`update` over a multiset of ids given as its distinct ids, in order of first appearance, and their counts.

        The vocabulary ends exactly as `update` over the ids themselves would leave it (admitted ids, their order,
        `counts`, `overflow`), but it takes one entry per distinct id: `DayStream` merges the ranks' chunked
        summaries of a day into this form instead of holding the day's ids.

        `ids` must be distinct (not checked: it would cost a sort per feature and day).

        Raises:
            ValueError: `counts` does not match `ids`, or a new id is negative.
        """
        ids = np.asarray(ids, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        if ids.shape != counts.shape or ids.ndim != 1:
            raise ValueError(f"ids and counts must be 1-d of one length, got shapes {ids.shape} and {counts.shape}")
        rows = self.lookup(ids, count_unseen=False)
        new_mask = rows == FALLBACK_ROW
        if new_mask.any():
            rows[new_mask] = self._admit_capped(ids[new_mask])
        admitted = rows != FALLBACK_ROW
        # Admitted ids have one row each; every refused or unadmitted id adds to the fallback row.
        total = np.zeros(self.num_rows, dtype=np.int64)
        total[rows[admitted]] = counts[admitted]
        total[FALLBACK_ROW] = int(counts[~admitted].sum())
        total[: self.counts.size] += self.counts
        self.counts = total  # a new array, as in `update`

    def _admit_capped(self, new_ids: np.ndarray) -> np.ndarray:
        """Admit `new_ids` (distinct, not yet admitted, in order) up to the capacity, counting the refused ones in
        `overflow`: each id's row (the fallback row where refused).

        Raises:
            ValueError: a new id is negative.
        """
        if (low := int(new_ids.min())) < 0:
            raise ValueError(f"raw ids must be >= 0, got {low}; datasets are validated to hold non-negative ids")
        room = new_ids.size if self.capacity is None else max(self.capacity - self.num_rows, 0)
        if new_ids.size > room:
            self.overflow += int(new_ids.size - room)
        position = np.arange(new_ids.size, dtype=np.int64)
        rows = np.where(position < room, self.num_rows + position, FALLBACK_ROW)
        if room and new_ids.size:
            self._admit(new_ids[:room])
        return rows

    def _admit(self, new_ids: np.ndarray) -> None:
        """Append `new_ids` (distinct, non-negative, not yet admitted) as the next rows and index them."""
        start, stop = self.num_rows, self.num_rows + new_ids.size
        if stop - 1 > self._raw_ids.size:
            grown = np.zeros(max(stop - 1, 2 * self._raw_ids.size), dtype=np.int64)
            grown[: self._num_ids] = self._raw_ids[: self._num_ids]
            self._raw_ids = grown
        self._raw_ids[start - 1 : stop - 1] = new_ids
        self._num_ids = stop - 1
        rows = np.arange(start, stop, dtype=np.int64)
        if self._direct is not None:
            top = int(new_ids.max()) + 1
            if top <= _DIRECT_LIMIT:
                covered = self._direct.size - 1
                if top > covered:
                    grown = np.zeros(min(max(top, 2 * covered), _DIRECT_LIMIT) + 1, dtype=np.int32)
                    grown[:covered] = self._direct[:covered]
                    self._direct = grown
                self._direct[new_ids] = rows
                return
            # An id past the direct range: index everything admitted so far in a hash table, once.
            self._direct, self._hashed = None, HashTable()
            new_ids, rows = self.raw_ids, np.arange(1, stop, dtype=np.int64)
        assert self._hashed is not None
        self._hashed.insert(new_ids, rows)

    def to_frame(self) -> pl.DataFrame:
        """One row per admitted id: raw id, row and count (the fallback row is row 0 and is not listed)."""
        return pl.DataFrame(
            {
                "raw_id": self.raw_ids.copy(),
                "row": np.arange(1, self.num_rows, dtype=np.int64),
                "count": self.counts[1:],
            }
        )

    @classmethod
    def from_frame(
        cls, df: pl.DataFrame, *, capacity: int | None, fallback_count: int, unseen: int, overflow: int
    ) -> Vocabulary:
        vocab = cls(capacity)
        rows = df.get_column("row").to_numpy()
        if not np.array_equal(rows, np.arange(1, rows.size + 1)):
            raise ValueError("rows must be 1..n in order")
        raw = df.get_column("raw_id").to_numpy().astype(np.int64)
        if np.unique(raw).size != raw.size:
            raise ValueError("raw ids repeat")
        if raw.size and int(raw.min()) < 0:
            raise ValueError(f"raw ids must be >= 0, got {int(raw.min())}")
        if raw.size:  # an empty vocabulary (nothing admitted yet) has nothing to index
            vocab._admit(raw)
        vocab.counts = np.concatenate([[fallback_count], df.get_column("count").to_numpy()]).astype(np.int64)
        vocab.unseen, vocab.overflow = unseen, overflow
        return vocab


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


class VocabularySet:
    """The vocabularies of a dataset's sparse features, persisted together.

    Args:
        features: the feature names.
        capacity: per-feature table capacity (rows, fallback included), or `None` for unbounded.
    """

    def __init__(self, features: list[str], capacity: Mapping[str, int | None] | None = None) -> None:
        capacity = capacity or {}
        if unknown := sorted(set(capacity) - set(features)):
            raise ValueError(f"capacity names unknown features {unknown}; features are {features}")
        self.vocabs: dict[str, Vocabulary] = {f: Vocabulary(capacity.get(f)) for f in features}

    def __getitem__(self, feature: str) -> Vocabulary:
        return self.vocabs[feature]

    @property
    def features(self) -> list[str]:
        return list(self.vocabs)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per feature: ids admitted, rows used, unseen lookups and refused ids."""
        return {
            f: {"ids": v.num_ids, "rows": v.num_rows, "unseen": v.unseen, "overflow": v.overflow}
            for f, v in self.vocabs.items()
        }

    def save(self, directory: str | Path) -> Path:
        """Write one Parquet file per feature and `vocab.json`, into a temp dir renamed into place."""
        from pipeline.dataset import atomic_directory

        directory = Path(directory)
        with atomic_directory(directory, overwrite=True) as tmp:
            meta: dict[str, Any] = {"version": VOCAB_VERSION, "features": {}}
            for i, (f, v) in enumerate(self.vocabs.items()):
                v.to_frame().write_parquet(tmp / f"{i:03d}.parquet")
                meta["features"][f] = {
                    "file": f"{i:03d}.parquet",
                    "capacity": v.capacity,
                    "fallback_count": int(v.counts[0]),
                    "unseen": v.unseen,
                    "overflow": v.overflow,
                }
            (tmp / "vocab.json").write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> VocabularySet:
        """Read a saved set back.

        Raises:
            DatasetError: the directory, `vocab.json` or a feature file is missing or inconsistent.
        """
        directory = Path(directory)
        meta_path = directory / "vocab.json"
        if not meta_path.is_file():
            raise DatasetError(meta_path, "no vocabulary here", "point at a directory written by VocabularySet.save")
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != VOCAB_VERSION:
            raise DatasetError(
                meta_path,
                f"version {meta.get('version')}, expected {VOCAB_VERSION}",
                "rebuild the vocabulary",
            )
        out = cls(list(meta["features"]))
        for f, m in meta["features"].items():
            path = directory / m["file"]
            if not path.is_file():
                raise DatasetError(path, f"vocabulary file of feature '{f}' is missing", "rebuild the vocabulary")
            try:
                out.vocabs[f] = Vocabulary.from_frame(
                    pl.read_parquet(path),
                    capacity=m["capacity"],
                    fallback_count=m["fallback_count"],
                    unseen=m["unseen"],
                    overflow=m["overflow"],
                )
            except (ValueError, pl.exceptions.ColumnNotFoundError) as e:
                raise DatasetError(path, f"is not a valid vocabulary ({e})", "rebuild the vocabulary") from e
        return out
