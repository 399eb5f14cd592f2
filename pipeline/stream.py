"""The day stream: a day-partitioned dataset read day by day into TorchRec `Batch`es.

Each rank reads its own contiguous, disjoint slice of every day (the slices of all ranks together are the whole
day, or the whole of the selected split), maps raw ids to rows through the shared `VocabularySet`, and yields
`torchrec.datasets.utils.Batch` objects — a `KeyedJaggedTensor` over the features in an explicit order, a dense
float tensor and the labels — which implement TorchRec's `Pipelineable` (`to`, `record_stream`, `pin_memory`), so
they feed `TrainPipelineSparseDist` directly. Batches are built in a background thread, `prefetch` ahead.

Every rank gets the same number of batches per day (collective training steps need it): a rank's slice is cut
into `ceil(largest slice / batch_size)` batches of as-equal-as-possible sizes, never above `batch_size`.

A rank reads only its own rows, `chunk_rows` at a time (a Parquet slice pushed down to the reader, cut on batch
boundaries), so its memory is bounded by a chunk, not by a day (DESIGN.md decision 18).

Vocabularies grow only from training data (`grow=True`), and every rank ends a day holding the same vocabulary as
one process that admitted the whole day's ids (or the whole split's) in row order. Growth takes two passes over the
rank's rows. Pass 1 reads the sparse columns chunk by chunk and keeps, per feature, the distinct ids in order of first
appearance with their counts. One `gather` per feature and day (an all-gather in rank order, passed in by the job)
then hands every rank all ranks' lists. The slices are contiguous and in rank order, so rank 0's list, then rank 1's
deduplicated against it, and so on, is the whole day's order of first appearance. Every rank admits that merged list
and adds its counts (`Vocabulary.update_distinct`). Pass 2 re-reads the rows chunk by chunk and maps them with
`lookup`, which grows nothing. Without a `gather` on more than one rank, pass 1 reads the whole day (still chunk by
chunk), so the ranks agree without any communication. On one rank, pass 1 is `Vocabulary.update` on each chunk in
row order instead (each id looked up once, only the new ones deduplicated), and a day read in one chunk keeps its
frame and mapped rows, so pass 2 reads and maps nothing again. Growth runs in the caller's thread, never the
prefetch thread, because the gather is a collective. Evaluation (`grow=False`) maps unseen ids to the fallback row and
counts them.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import polars as pl
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.dataset import Dataset, Day
from pipeline.spec import SparseField
from pipeline.vocab import Vocabulary, VocabularySet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """How a day is cut into batches.

    Args:
        batch_size: the most examples per batch, per rank.
        prefetch: batches built ahead in a background thread (0 builds them in the caller's thread).
        chunk_rows: the most rows read from Parquet at once, per rank. It is rounded down to whole batches (at least
            one batch), so a chunk boundary is always a batch boundary.
    """

    batch_size: int = 8192
    prefetch: int = 2
    chunk_rows: int = 1_000_000

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")

    @property
    def batches_per_chunk(self) -> int:
        """Whole batches in one chunk (at least one)."""
        return max(self.chunk_rows // self.batch_size, 1)


def rank_slice(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous `[start, stop)` rows of `rank` among `world_size`: disjoint, together complete, sizes within 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return num_rows * rank // world_size, num_rows * (rank + 1) // world_size


def batch_bounds(num_rows: int, num_batches: int) -> np.ndarray:
    """`num_batches + 1` boundaries cutting `num_rows` rows into batches whose sizes differ by at most one."""
    return (np.arange(num_batches + 1, dtype=np.int64) * num_rows) // max(num_batches, 1)


@dataclass
class _Column:
    """One feature's mapped rows for a slice of a day: `values` and, for multi-hot, per-example `offsets`."""

    values: np.ndarray
    offsets: np.ndarray | None


# A chunk that pass 1 read with every column, and (on one rank) its mapped columns, which pass 2 then reuses.
_Chunk = tuple[pl.DataFrame, list[_Column] | None]

# Pass 1's summary of one feature over some rows: the distinct raw ids in order of first appearance, and their counts.
_Distinct = pl.DataFrame


def _distinct_counts(ids: np.ndarray) -> _Distinct:
    """The distinct ids of `ids` in order of first appearance, with how often each occurs."""
    frame = pl.DataFrame({"id": np.asarray(ids, dtype=np.int64)})
    return frame.group_by("id", maintain_order=True).agg(pl.len().cast(pl.Int64).alias("count"))


def _merge(parts: list[_Distinct]) -> _Distinct:
    """Summaries of consecutive row ranges, in row order, merged into the summary of their union."""
    if len(parts) == 1:
        return parts[0]
    frame = pl.concat(parts)
    return frame.group_by("id", maintain_order=True).agg(pl.col("count").sum())


class _Rows:
    """The rows of a day that a stream selects (all, or a split's), read a range at a time.

    Positions are indices into the selection; `row_filter`'s selection is read as the span of original rows that
    holds the range, filtered (only that span is read).
    """

    def __init__(self, dataset: Dataset, day: Day, row_filter: Callable[[Day], np.ndarray] | None) -> None:
        self.dataset, self.day = dataset, day
        self.selected = None if row_filter is None else np.flatnonzero(row_filter(day))
        self.num_rows = day.num_rows if self.selected is None else int(self.selected.size)

    def read(self, columns: list[str], start: int, stop: int) -> pl.DataFrame:
        """Selected rows `[start, stop)`, `columns` only."""
        if self.selected is None or start >= stop:
            offset = start if self.selected is None else 0
            return self.dataset.read_day(self.day, columns, offset, stop - start)
        picked = self.selected[start:stop]
        low, high = int(picked[0]), int(picked[-1]) + 1
        df = self.dataset.read_day(self.day, columns, low, high - low)
        if picked.size == high - low:
            return df
        mask = np.zeros(high - low, dtype=bool)
        mask[picked - low] = True
        return df.filter(pl.Series(mask))


class DayStream:
    """Batches of a dataset, day by day, for one rank.

    Args:
        dataset: the dataset to read.
        vocab: the vocabularies of (at least) the features read; shared across days.
        config: batch size and prefetch depth.
        features: the sparse features to emit, in KJT key order (default: the spec's order).
        rank: this rank.
        world_size: the number of ranks.
        row_filter: optional `(day) -> bool mask over the day's rows` selecting a split; applied before slicing.
        keying: optional map of a batch's vocabulary-row KJT to the model's table keys (the job hands it the plan's
            remap: row-level features to one key per dim bucket with local rows); applied when the batch is built,
            in the prefetch thread, so training, evaluation and export never remap by hand. Without it the batches
            carry vocabulary rows.
        gather: an all-gather in rank order over the ranks' process group (`obj -> [obj of rank 0, rank 1, ...]`),
            called once per feature on each day that grows the vocabulary; the job builds it from its process group.
            Without it a stream on more than one rank scans the whole day's sparse columns to grow (chunk by chunk, no
            communication); on one rank it is not needed.
    """

    def __init__(
        self,
        dataset: Dataset,
        vocab: VocabularySet,
        config: StreamConfig | None = None,
        *,
        features: list[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        row_filter: Callable[[Day], np.ndarray] | None = None,
        keying: Callable[[KeyedJaggedTensor], KeyedJaggedTensor] | None = None,
        gather: Callable[[Any], list[Any]] | None = None,
    ) -> None:
        self.dataset = dataset
        self.spec = dataset.spec
        self.vocab = vocab
        self.config = config or StreamConfig()
        self.features = list(features) if features is not None else self.spec.feature_names
        unknown = [f for f in self.features if f not in self.spec.feature_names]
        if unknown:
            raise KeyError(f"features {unknown} are not in dataset '{self.spec.name}' ({self.spec.feature_names})")
        if missing := [f for f in self.features if f not in vocab.features]:
            raise KeyError(f"no vocabulary for features {missing}")
        self.fields: list[SparseField] = [self.spec.field(f) for f in self.features]
        self.rank, self.world_size = rank, world_size
        rank_slice(0, rank, world_size)  # validates rank and world size
        self.row_filter = row_filter
        self.keying = keying
        self.gather = gather

    @property
    def days(self) -> list[Day]:
        return self.dataset.days

    def num_batches(self, day: Day) -> int:
        """Batches per rank for `day` (the same on every rank)."""
        n = int(self.row_filter(day).sum()) if self.row_filter else day.num_rows
        largest = -(-n // self.world_size)
        return -(-largest // self.config.batch_size)

    def batches(self, day: Day, *, grow: bool) -> Iterator[Batch]:
        """This rank's batches of `day` (keyed for the model if the stream has a `keying`); `grow` admits the day's
        new ids into the vocabularies first (training)."""
        for _, batch in self.batches_with_rows(day, grow=grow):
            yield batch

    def batches_with_rows(self, day: Day, *, grow: bool) -> Iterator[tuple[KeyedJaggedTensor, Batch]]:
        """Each batch of `batches` with its sparse features as vocabulary rows (before any keying).

        With `grow` the day's new ids are admitted here, before the first batch is built, in the caller's thread (it
        may gather over the process group, so every rank must call it at the same point of its collectives).
        """
        rows = _Rows(self.dataset, day, self.row_filter)
        edges = self._chunk_edges(rows.num_rows, self.num_batches(day))
        cached = self._grow(rows, edges) if grow else None
        it = self._keyed(self._batches(rows, edges, grow, cached))
        return _prefetched(it, self.config.prefetch) if self.config.prefetch else it

    def _keyed(self, batches: Iterator[Batch]) -> Iterator[tuple[KeyedJaggedTensor, Batch]]:
        for batch in batches:
            rows = batch.sparse_features
            if self.keying is not None:
                batch.sparse_features = self.keying(rows)
            yield rows, batch

    @property
    def _columns(self) -> list[str]:
        return [self.spec.label, *(f.column for f in self.fields), *self.spec.dense]

    def _chunk_edges(self, num_rows: int, num_batches: int) -> list[np.ndarray]:
        """This rank's batch boundaries (in selected rows), cut into chunks of `batches_per_chunk` batches."""
        start, stop = rank_slice(num_rows, self.rank, self.world_size)
        bounds = start + batch_bounds(stop - start, num_batches)
        k = self.config.batches_per_chunk
        return [bounds[i : i + k + 1] for i in range(0, max(bounds.size - 1, 1), k)]

    def _grow(self, rows: _Rows, edges: list[np.ndarray]) -> _Chunk | None:
        """Pass 1: admit the day's new ids on every rank, in whole-day row order, and count every id.

        Returns the rank's first chunk with every column when pass 1 read it last (pass 2 starts with it), and on one
        rank its mapped columns too.
        """
        if self.world_size == 1:
            return self._grow_alone(rows, edges)
        sparse = [f.column for f in self.fields]
        if self.world_size == 1 or self.gather is not None:
            own = [(int(e[0]), int(e[-1])) for e in edges]
        else:  # no communication: every rank scans the whole selection
            step = self.config.batches_per_chunk * self.config.batch_size
            own = [(a, min(a + step, rows.num_rows)) for a in range(0, rows.num_rows, step)] or [(0, 0)]
        cache_first = own[0] == (int(edges[0][0]), int(edges[0][-1]))
        # Backwards, so that the chunk read last is the first one, which pass 2 uses at once instead of re-reading.
        summaries: list[list[_Distinct]] = [[] for _ in self.fields]
        first: pl.DataFrame | None = None
        for i in reversed(range(len(own))):
            cache = i == 0 and cache_first
            df = rows.read(self._columns if cache else sparse, *own[i])
            for parts, f in zip(summaries, self.fields, strict=True):
                parts.append(_distinct_counts(_ids(df, f)))
                if len(parts) > 1:  # keep one summary per feature, not one per chunk
                    parts[:] = [_merge(parts[::-1])]
            first = df if cache else None
        # One gather per feature, not one for all: all_gather_object holds several pickled copies of what it moves,
        # and one feature's summaries are a small part of a day's.
        for parts, f in zip(summaries, self.fields, strict=True):
            local, parts[:] = parts[0], []
            gathered = self.gather(local) if self.world_size > 1 and self.gather is not None else [local]
            del local
            _update_distinct(self.vocab[f.name], _merge(gathered))
        return None if first is None else (first, None)

    def _grow_alone(self, rows: _Rows, edges: list[np.ndarray]) -> _Chunk | None:
        """Pass 1 on one rank: `Vocabulary.update` on each chunk in row order, so each id is looked up once and only
        the new ones are hashed again to order them. A day read in one chunk keeps its frame and mapped columns, and
        pass 2 maps nothing again."""
        sparse = [f.column for f in self.fields]
        whole = len(edges) == 1
        for bounds in edges:
            df = rows.read(self._columns if whole else sparse, int(bounds[0]), int(bounds[-1]))
            mapped = [self._column(df, f, self.vocab[f.name].update(_ids(df, f))) for f in self.fields]
            if whole:
                return df, mapped
        return None

    def _batches(self, rows: _Rows, edges: list[np.ndarray], grow: bool, cached: _Chunk | None) -> Iterator[Batch]:
        """Pass 2: each chunk of this rank's rows, mapped with `lookup` (unless pass 1 mapped it), cut into batches."""
        for i, bounds in enumerate(edges):
            start, stop = int(bounds[0]), int(bounds[-1])
            df, columns = cached if i == 0 and cached is not None else (rows.read(self._columns, start, stop), None)
            cached = None  # held no longer than its chunk
            if columns is None:
                # Training already counted its ids in pass 1, so only evaluation counts the unseen here.
                columns = [
                    self._column(df, f, self.vocab[f.name].lookup(_ids(df, f), count_unseen=not grow))
                    for f in self.fields
                ]
            # torch wants writable arrays; polars' zero-copy views are read-only.
            dense = np.require(
                df.select(self.spec.dense).cast(pl.Float32).to_numpy(order="c")
                if self.spec.dense
                else np.zeros((df.height, 0), dtype=np.float32),
                requirements=["C", "W"],
            )
            labels = df.get_column(self.spec.label).cast(pl.Float32).to_numpy(writable=True)
            del df
            local = (bounds - start).tolist()
            # Per batch, not per chunk: one chunk-wide copy lands in freshly mapped pages (slower in a profile, 4x),
            # where a batch's few MiB reuse memory that is still in cache.
            ones = np.ones(max((b - a for a, b in itertools.pairwise(local)), default=0), dtype=np.int32)
            lengths = [None if c.offsets is None else np.diff(c.offsets).astype(np.int32) for c in columns]
            for a, b in itertools.pairwise(local):
                kjt = KeyedJaggedTensor(
                    keys=self.features,
                    values=torch.from_numpy(
                        np.concatenate(
                            [
                                c.values[a:b] if c.offsets is None else c.values[c.offsets[a] : c.offsets[b]]
                                for c in columns
                            ]
                        )
                    ),
                    lengths=torch.from_numpy(np.concatenate([ones[: b - a] if n is None else n[a:b] for n in lengths])),
                    stride=b - a,
                )
                yield Batch(
                    dense_features=torch.from_numpy(dense[a:b]),
                    sparse_features=kjt,
                    labels=torch.from_numpy(labels[a:b]),
                )

    @staticmethod
    def _column(df: pl.DataFrame, f: SparseField, rows: np.ndarray) -> _Column:
        """Feature `f`'s mapped `rows` (in the order `_ids` gives) as a column of `df`'s examples."""
        if not f.multi_hot:
            return _Column(rows, None)
        lengths = df.get_column(f.column).list.len().fill_null(0).to_numpy()
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return _Column(rows, offsets)


def _ids(df: pl.DataFrame, f: SparseField) -> np.ndarray:
    """The raw ids of feature `f` in row order (a multi-hot field's lists flattened, nulls and empty lists dropped)."""
    col = df.get_column(f.column)
    if f.multi_hot:
        col = col.explode(empty_as_null=False).drop_nulls()
    return col.to_numpy()


def _update_distinct(vocab: Vocabulary, summary: _Distinct) -> None:
    vocab.update_distinct(summary.get_column("id").to_numpy(), summary.get_column("count").to_numpy())


_DONE = object()


T = TypeVar("T")


def _prefetched(it: Iterator[T], depth: int) -> Iterator[T]:
    """Run `it` in a daemon thread, `depth` items ahead; exceptions are re-raised in the consumer.

    Closing the consumer early stops the producer at its next item, so no thread is left blocked.
    """
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in it:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:
            put(e)

    thread = threading.Thread(target=produce, name="dimsearch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield cast(T, item)
    finally:
        stop.set()
