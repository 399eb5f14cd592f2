"""The day stream: a day-partitioned dataset read day by day into TorchRec `Batch`es.

Each rank reads its own contiguous, disjoint slice of every day (the slices of all ranks together are the whole
day, or the whole of the selected split), maps raw ids to rows through the shared `VocabularySet`, and yields
`torchrec.datasets.utils.Batch` objects — a `KeyedJaggedTensor` over the features in an explicit order, a dense
float tensor and the labels — which implement TorchRec's `Pipelineable` (`to`, `record_stream`, `pin_memory`), so
they feed `TrainPipelineSparseDist` directly. Batches are built in a background thread, `prefetch` ahead.

Every rank gets the same number of batches per day (collective training steps need it): a rank's slice is cut
into `ceil(largest slice / batch_size)` batches of as-equal-as-possible sizes, never above `batch_size`.

Vocabularies grow only from training data (`grow=True`), from the whole day's ids (or the whole split's), in row
order, so every rank admits the same ids in the same order and holds the same vocabulary without communication.
Evaluation (`grow=False`) maps unseen ids to the fallback row and counts them.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np
import polars as pl
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipeline.dataset import Dataset, Day
from pipeline.spec import SparseField
from pipeline.vocab import VocabularySet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """How a day is cut into batches.

    Args:
        batch_size: the most examples per batch, per rank.
        prefetch: batches built ahead in a background thread (0 builds them in the caller's thread).
    """

    batch_size: int = 8192
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")


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

    def slice(self, start: int, stop: int) -> _Column:
        """Examples `[start, stop)`."""
        if self.offsets is None:
            return _Column(self.values[start:stop], None)
        offsets = self.offsets[start : stop + 1]
        return _Column(self.values[offsets[0] : offsets[-1]], offsets - offsets[0])


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
        """Each batch of `batches` with its sparse features as vocabulary rows (before any keying)."""
        it = self._keyed(self._batches(day, grow))
        return _prefetched(it, self.config.prefetch) if self.config.prefetch else it

    def _keyed(self, batches: Iterator[Batch]) -> Iterator[tuple[KeyedJaggedTensor, Batch]]:
        for batch in batches:
            rows = batch.sparse_features
            if self.keying is not None:
                batch.sparse_features = self.keying(rows)
            yield rows, batch

    def _read(self, day: Day, grow: bool) -> tuple[pl.DataFrame, list[_Column]]:
        """This rank's rows of `day` and each feature's rows mapped through the vocabulary."""
        columns = [self.spec.label, *(f.column for f in self.fields), *self.spec.dense]
        if self.row_filter is None and not grow:
            # Only this rank's rows are needed: push the slice down to the Parquet reader.
            start, stop = rank_slice(day.num_rows, self.rank, self.world_size)
            df = self.dataset.read_day(day, columns, start, stop - start)
            return df, [self._map(df, f, grow=False) for f in self.fields]
        df = self.dataset.read_day(day, columns)
        if self.row_filter is not None:
            df = df.filter(pl.Series(self.row_filter(day)))
        start, stop = rank_slice(df.height, self.rank, self.world_size)
        # Training: every rank admits the whole day's ids in row order, so all ranks hold the same vocabulary;
        # the rows that update() returns are then sliced to this rank (no second lookup).
        mapped = [self._map(df, f, grow=grow).slice(start, stop) for f in self.fields]
        return df.slice(start, stop - start), mapped

    def _batches(self, day: Day, grow: bool) -> Iterator[Batch]:
        num_batches = self.num_batches(day)
        df, columns = self._read(day, grow)
        # torch wants writable arrays; polars' zero-copy views are read-only.
        dense = np.require(
            df.select(self.spec.dense).cast(pl.Float32).to_numpy(order="c")
            if self.spec.dense
            else np.zeros((df.height, 0), dtype=np.float32),
            requirements=["C", "W"],
        )
        labels = df.get_column(self.spec.label).cast(pl.Float32).to_numpy(writable=True)
        bounds = batch_bounds(df.height, num_batches)
        for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            yield self._batch(columns, dense, labels, start, stop)

    def _map(self, df: pl.DataFrame, f: SparseField, *, grow: bool) -> _Column:
        col = df.get_column(f.column)
        vocab = self.vocab[f.name]
        to_rows = vocab.update if grow else vocab.lookup
        if not f.multi_hot:
            return _Column(to_rows(col.to_numpy()), None)
        lengths = col.list.len().fill_null(0).to_numpy()
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return _Column(to_rows(col.explode(empty_as_null=False).drop_nulls().to_numpy()), offsets)

    def _batch(self, columns: list[_Column], dense: np.ndarray, labels: np.ndarray, start: int, stop: int) -> Batch:
        size = stop - start
        values, lengths = [], []
        for c in columns:
            if c.offsets is None:
                values.append(c.values[start:stop])
                lengths.append(np.ones(size, dtype=np.int32))
            else:
                values.append(c.values[c.offsets[start] : c.offsets[stop]])
                lengths.append(np.diff(c.offsets[start : stop + 1]).astype(np.int32))
        kjt = KeyedJaggedTensor(
            keys=self.features,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
            stride=size,
        )
        return Batch(
            dense_features=torch.from_numpy(dense[start:stop]),
            sparse_features=kjt,
            labels=torch.from_numpy(labels[start:stop]),
        )


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
