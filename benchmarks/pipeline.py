"""Throughput of the data pipeline on one CPU core: generation, ingest, and Parquet → TorchRec `Batch`.

Run (figures go to BENCHMARKS.md)::

    python -m benchmarks.pipeline            # full: 7 days × 300k synthetic rows, ml-1m, 2M Criteo-like rows; < 1 min
    python -m benchmarks.pipeline --quick    # smaller synthetic stream, fewer repeats; < 40 s
    python -m benchmarks.pipeline --work /tmp/bench   # where the temporary datasets go (default: system temp)

Measurements (each run `--repeats` times, the best time reported):

1. `pipeline.synthetic.generate` rows/s. Target ≥ 200,000 rows/s.
2. `pipeline.ingest.ingest` rows/s, end to end (read, validate, write Parquet): ml-1m
   (`ratings_no_timestamp.dat`), and for information ml-100k and the Criteo sample.
3. `DayStream.batches` rows/s at batch 8192 on one rank (no prefetch thread), batches consumed: the training
   pass (`grow=True`, a fresh vocabulary grown day by day in order) and the evaluation pass (`grow=False`,
   with the vocabulary the training pass built, reading only this rank's slice). Targets: ≥ 2,000,000 rows/s,
   and ≥ 0.8× (training) and ≥ 0.9× (evaluation) the plain pyarrow read of the same files, measured interleaved
   with it (pyarrow, training, evaluation, per round).
4. The reference: `pyarrow.parquet.read_table(f, columns=..., use_threads=False)` per file, the same columns.
5. KJT batches/s against TorchRec's own `InMemoryBinaryCriteoIterDataPipe` on the same rows (`bench_torchrec_loader`:
   a Criteo-like stream written in its `.npy` layout with the ids already mapped). Target: ≥ 1×.

Opening a `Dataset` (listing days, reading footers) is not timed. Real data are read from `DIMSEARCH_DATASETS`
(default `<repo>/../shared/datasets`); if a dataset is absent its rows are skipped with the reason printed.
The last line of the output is `RESULT pipeline: key=value ...`.
"""

from __future__ import annotations

import os

# Benchmarks are entry points, so this one may set the environment. Polars sizes its thread pool from this
# variable when it is first imported: it must be set before polars (or any `pipeline` module) is imported.
os.environ["POLARS_MAX_THREADS"] = "1"

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch

from pipeline.dataset import Dataset, write_dataset
from pipeline.ingest import ingest
from pipeline.spec import DatasetSpec
from pipeline.stream import DayStream, StreamConfig
from pipeline.synthetic import SyntheticConfig, generate
from pipeline.vocab import VocabularySet

GENERATE_TARGET = 200_000  # rows/s
STREAM_TARGET = 2_000_000  # rows/s per core
# The stream against a plain pyarrow read of the same files: the training pass (with growth) and the evaluation pass.
ARROW_RATIO_TARGETS = {"train": 0.8, "eval": 0.9}
TORCHREC_RATIO_TARGET = 1.0  # KJT batches/s against TorchRec's in-memory Criteo loader
BATCH_SIZE = 8192
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Measurement:
    """One row of the table.

    Args:
        key: the short name used in the RESULT line.
        what: the human-readable description.
        rows: rows processed per run.
        seconds: the best wall time over the repeats.
        checks: the targets as `(key, text, met)`; empty for a figure reported for information only.
    """

    key: str
    what: str
    rows: int
    seconds: float
    checks: tuple[tuple[str, str, bool], ...] = ()

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-12)


def pin_to_one_core() -> int:
    """Pin the process to its lowest allowed CPU; torch and pyarrow single-threaded. Returns the CPU."""
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    return cpu


def best_of(repeats: int, run: Callable[[], int]) -> tuple[int, float]:
    """Run `run` (which returns its row count) `repeats` times; return the rows and the best wall time."""
    best, rows = float("inf"), 0
    for _ in range(repeats):
        started = time.perf_counter()
        rows = run()
        best = min(best, time.perf_counter() - started)
    return rows, best


def datasets_root() -> Path:
    """The read-only real datasets: `$DIMSEARCH_DATASETS`, else `<repo>/../shared/datasets`."""
    env = os.environ.get("DIMSEARCH_DATASETS")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


def stream_columns(ds: Dataset) -> list[str]:
    """The columns `DayStream` reads: the label, the sparse features' columns, the dense columns."""
    spec = ds.spec
    return [spec.label, *(f.column for f in spec.sparse), *spec.dense]


def _consume(batches: Iterator[Batch]) -> int:
    n = 0
    for b in batches:
        n += int(b.labels.numel())
    return n


def training_pass(ds: Dataset) -> tuple[int, VocabularySet]:
    """Every day in order with `grow=True` into a fresh vocabulary; returns the rows and the vocabulary."""
    vocab = VocabularySet(ds.spec.feature_names)
    stream = DayStream(ds, vocab, StreamConfig(batch_size=BATCH_SIZE, prefetch=0), rank=0, world_size=1)
    return sum(_consume(iter(stream.batches(day, grow=True))) for day in stream.days), vocab


def evaluation_pass(ds: Dataset, vocab: VocabularySet) -> int:
    """Every day with `grow=False` against a built vocabulary (rank 0 of 1 reads its pushed-down slice)."""
    stream = DayStream(ds, vocab, StreamConfig(batch_size=BATCH_SIZE, prefetch=0), rank=0, world_size=1)
    return sum(_consume(iter(stream.batches(day, grow=False))) for day in stream.days)


def arrow_read(ds: Dataset) -> int:
    """The reference: a plain single-threaded pyarrow read of every file, the stream's columns."""
    columns = stream_columns(ds)
    return sum(pq.read_table(f, columns=columns, use_threads=False).num_rows for day in ds.days for f in day.files)


def bench_stream(name: str, ds: Dataset, repeats: int) -> list[Measurement]:
    """The training pass, the evaluation pass and the pyarrow reference on `ds`, each against the targets.

    Interleaved (pyarrow, training, evaluation, then again), the best of `repeats` kept for each, so that a change
    of load hits all three alike.
    """
    vocabs: list[VocabularySet] = []

    def train() -> int:
        n, vocab = training_pass(ds)
        vocabs[:] = [vocab]
        return n

    runs: dict[str, Callable[[], int]] = {
        "arrow": lambda: arrow_read(ds),
        "train": train,
        "eval": lambda: evaluation_pass(ds, vocabs[0]),
    }
    best: dict[str, tuple[int, float]] = {}
    for _ in range(repeats):
        for key, run in runs.items():
            rows, seconds = best_of(1, run)
            best[key] = (rows, min(seconds, best.get(key, (0, float("inf")))[1]))
    arrow = Measurement(f"{name}_arrow", f"{name}: pyarrow read_table (reference)", *best["arrow"])
    out = [arrow]
    for key, label in (("train", "training pass (grow=True)"), ("eval", "evaluation pass (grow=False)")):
        n, seconds = best[key]
        if n != ds.num_rows:
            raise RuntimeError(f"{name} {key}: the stream yielded {n} rows, the dataset has {ds.num_rows}")
        rate = n / seconds
        ratio = rate / arrow.rows_per_s
        target = ARROW_RATIO_TARGETS[key]
        checks = (
            ("2M", f">= {STREAM_TARGET / 1e6:g}M/s", rate >= STREAM_TARGET),
            ("arrow", f">= {target:g}x arrow (is {ratio:.2f}x)", ratio >= target),
        )
        out.append(Measurement(f"{name}_{key}", f"{name}: Parquet -> Batch, {label}", n, seconds, checks))
    return out


def write_criteo_npy(ds: Dataset, vocab: VocabularySet, out: Path) -> tuple[list[str], list[str], list[str]]:
    """Every day of `ds` in the `.npy` layout of TorchRec's binary Criteo loader, the ids already mapped to rows.

    Per day: `day_{i}_dense.npy` (float32 [N, 13]), `day_{i}_sparse.npy` (int32 [N, 26], features in spec order) and
    `day_{i}_labels.npy` (int32 [N, 1]), as `torchrec/datasets/scripts/npy_preproc_criteo.py` writes them.

    Returns:
        The dense, sparse and labels paths, in day order.
    """
    spec = ds.spec
    paths: tuple[list[str], list[str], list[str]] = ([], [], [])
    for i, day in enumerate(ds.days):
        df = ds.read_day(day, stream_columns(ds))
        sparse = np.stack([vocab[f.name].lookup(df.get_column(f.column).to_numpy()) for f in spec.sparse], axis=1)
        arrays = (
            df.select(spec.dense).cast(pl.Float32).to_numpy(),
            sparse.astype(np.int32),
            df.get_column(spec.label).cast(pl.Int32).to_numpy().reshape(-1, 1),
        )
        for kind, array, kept in zip(("dense", "sparse", "labels"), arrays, paths, strict=True):
            path = out / f"day_{i}_{kind}.npy"
            np.save(path, np.ascontiguousarray(array))
            kept.append(str(path))
    return paths


def bench_torchrec_loader(work: Path, rows: int, repeats: int) -> list[Measurement]:
    """KJT batches/s of the stream against TorchRec's `InMemoryBinaryCriteoIterDataPipe`, same rows and batch size.

    The rows are the Criteo-like stream (`pipeline.criteo_synthetic`, 2 days, 26 single-hot fields up to 1M ids, 13
    dense columns). TorchRec's loader reads `.npy` files whose ids are already rows (the vocabulary the training pass
    built), so it does no vocabulary work; it loads them whole, then slices batches. Its time counts the load and
    the iteration (as a user meets it; the iteration alone is printed for information). A plain pyarrow read of the
    Parquet files is printed for information too. Rounds are interleaved: loader, pyarrow, evaluation pass, training
    pass; the best of `repeats` is kept.
    """
    from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe

    from pipeline.criteo_synthetic import CriteoSyntheticConfig, write_criteo_synthetic

    cfg = CriteoSyntheticConfig(days=2, rows_per_day=rows // 2, max_cardinality=1_000_000, multi_hot=())
    ds = Dataset(write_criteo_synthetic(cfg, work / "criteo-like"))
    _, vocab = training_pass(ds)
    npy = work / "criteo-npy"
    npy.mkdir()
    dense, sparse, labels = write_criteo_npy(ds, vocab, npy)
    timings: dict[str, float] = {}
    batch_counts: dict[str, int] = {}

    def loader() -> None:
        started = time.perf_counter()
        pipe = InMemoryBinaryCriteoIterDataPipe("train", dense, sparse, labels, BATCH_SIZE, rank=0, world_size=1)
        loaded = time.perf_counter()
        n = sum(1 for _ in pipe)
        end = time.perf_counter()
        for key, seconds in (("torchrec", end - started), ("torchrec_iter", end - loaded)):
            timings[key] = min(timings.get(key, float("inf")), seconds)
            batch_counts[key] = n

    def ours(key: str, grow: bool) -> None:
        fresh = VocabularySet(ds.spec.feature_names)
        stream = DayStream(
            ds, fresh if grow else vocab, StreamConfig(batch_size=BATCH_SIZE, prefetch=0), rank=0, world_size=1
        )
        started = time.perf_counter()
        n = sum(1 for day in stream.days for _ in stream.batches(day, grow=grow))
        timings[key] = min(timings.get(key, float("inf")), time.perf_counter() - started)
        batch_counts[key] = n

    def arrow() -> None:
        started = time.perf_counter()
        arrow_read(ds)
        timings["criteo_arrow"] = min(timings.get("criteo_arrow", float("inf")), time.perf_counter() - started)

    for _ in range(repeats):
        loader()
        arrow()
        ours("criteo_eval", grow=False)
        ours("criteo_train", grow=True)
    reference = batch_counts["torchrec"] / timings["torchrec"]
    out = [
        Measurement(
            "criteo_arrow", "criteo-like: pyarrow read_table (reference)", ds.num_rows, timings["criteo_arrow"]
        ),
        Measurement(
            "criteo_torchrec",
            "criteo-like: TorchRec InMemoryBinaryCriteo (load + iterate)",
            ds.num_rows,
            timings["torchrec"],
        ),
        Measurement(
            "criteo_torchrec_iter",
            "criteo-like: TorchRec InMemoryBinaryCriteo (iterate only)",
            ds.num_rows,
            timings["torchrec_iter"],
        ),
    ]
    for key, label in (("criteo_eval", "evaluation pass"), ("criteo_train", "training pass")):
        rate = batch_counts[key] / timings[key]
        checks = (
            (
                "torchrec",
                f">= {TORCHREC_RATIO_TARGET:g}x TorchRec batches/s (is {rate / reference:.2f}x)",
                rate >= TORCHREC_RATIO_TARGET * reference,
            ),
        )
        out.append(Measurement(key, f"criteo-like: Parquet -> Batch, {label}", ds.num_rows, timings[key], checks))
    return out


def bench_ingest(root: Path, work: Path, repeats: int) -> tuple[list[Measurement], Dataset | None, list[str]]:
    """Ingest ml-1m (headline figure, best of `repeats`), ml-100k and the Criteo sample (one run each).

    Returns:
        The measurements, the ingested ml-1m dataset (or `None` if absent), and the reasons for skipped rows.
    """
    jobs = (
        ("ml1m", "ml-1m", root / "ml-1m" / "ratings_no_timestamp.dat", repeats),
        ("ml100k", "ml-100k", root / "ml-100k", 1),
        ("criteo", "criteo", root / "criteo-sample", 1),
    )
    out: list[Measurement] = []
    skipped: list[str] = []
    ml1m: Dataset | None = None
    for key, fmt, src, n in jobs:
        if not src.exists():
            skipped.append(f"ingest {fmt}: {src} does not exist (set DIMSEARCH_DATASETS)")
            continue
        dest = work / key

        def run(fmt: str = fmt, src: Path = src, dest: Path = dest) -> int:
            return Dataset(ingest(fmt, src, dest, overwrite=True)).num_rows

        rows, seconds = best_of(n, run)
        out.append(Measurement(f"ingest_{key}", f"ingest {fmt} ({src.name}), incl. write", rows, seconds))
        if key == "ml1m":
            ml1m = Dataset(dest)
    return out, ml1m, skipped


def print_table(rows: list[Measurement]) -> None:
    """One line per measurement: what, rows, seconds, rows/s, target, met/missed."""
    header = ("what", "rows", "seconds", "rows/s", "target", "met")
    cells = [
        (
            m.what,
            f"{m.rows:,}",
            f"{m.seconds:.3f}",
            f"{m.rows_per_s:,.0f}",
            " & ".join(text for _, text, _ in m.checks) or "-",
            " & ".join("met" if ok else "MISSED" for _, _, ok in m.checks) or "info",
        )
        for m in rows
    ]
    widths = [max(len(r[i]) for r in (header, *cells)) for i in range(len(header))]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in cells:
        print(
            " | ".join(c.rjust(w) if 0 < i < 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )


def result_line(rows: list[Measurement]) -> str:
    """`RESULT pipeline: key=value ...`: rows/s of every measurement, ratios to pyarrow, and met/missed."""
    by_key = {m.key: m for m in rows}
    parts: list[str] = []
    for m in rows:
        parts.append(f"{m.key}_rows_s={m.rows_per_s:.0f}")
        name, _, kind = m.key.rpartition("_")
        if kind in ("train", "eval") and f"{name}_arrow" in by_key:
            parts.append(f"{m.key}_vs_arrow={m.rows_per_s / by_key[f'{name}_arrow'].rows_per_s:.2f}")
        if kind in ("train", "eval") and f"{name}_torchrec" in by_key:
            parts.append(f"{m.key}_vs_torchrec={m.rows_per_s / by_key[f'{name}_torchrec'].rows_per_s:.2f}")
        parts += [f"{m.key}_target_{k}={'met' if ok else 'missed'}" for k, _, ok in m.checks]
    graded = [ok for m in rows for _, _, ok in m.checks]
    parts.append(f"targets_met={sum(graded)}/{len(graded)}")
    return "RESULT pipeline: " + " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and the RESULT line; returns 0 (a missed target is not an error)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller synthetic stream and fewer repeats")
    parser.add_argument("--work", type=Path, help="where temporary datasets go (default: system temp)")
    parser.add_argument(
        "--criteo-rows", type=int, default=2_000_000, help="rows of the Criteo-like stream (a quarter with --quick)"
    )
    args = parser.parse_args(argv)

    cpu = pin_to_one_core()
    repeats = 2 if args.quick else 3
    cfg = SyntheticConfig(days=3, rows_per_day=100_000) if args.quick else SyntheticConfig(rows_per_day=300_000)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dimsearch-bench-", dir=args.work))
    print(
        f"pipeline benchmark: CPU {cpu} only, torch threads {torch.get_num_threads()}, "
        f"polars threads {pl.thread_pool_size()}, best of {repeats} runs (ingest of ml-100k/criteo: 1 run); "
        # Other processes on the machine compete for the core: the load average says how quiet it was.
        f"load average {os.getloadavg()[0]:.2f}; work dir {work}"
    )
    started = time.perf_counter()
    try:
        results: list[Measurement] = []
        generated: list[tuple[pl.DataFrame, DatasetSpec]] = []

        def gen() -> int:
            df, spec = generate(cfg)
            generated[:] = [(df, spec)]
            return df.height

        rows, seconds = best_of(repeats, gen)
        results.append(
            Measurement(
                "generate",
                f"synthetic generate ({cfg.days} days x {cfg.rows_per_day:,})",
                rows,
                seconds,
                (("200k", f">= {GENERATE_TARGET:,}/s", rows / seconds >= GENERATE_TARGET),),
            )
        )
        df, spec = generated.pop()
        t = time.perf_counter()
        synthetic = Dataset(write_dataset(df, spec, work / "synthetic"))
        results.append(
            Measurement("write_synth", "synthetic write_dataset (1 run)", df.height, time.perf_counter() - t)
        )
        del df

        ingested, ml1m, skipped = bench_ingest(datasets_root(), work, repeats)
        results += ingested
        results += bench_stream("synth", synthetic, repeats)
        if ml1m is not None:
            results += bench_stream("ml1m", ml1m, repeats)
        else:
            skipped.append("ml-1m Parquet -> Batch: ml-1m was not ingested")
        results += bench_torchrec_loader(work, args.criteo_rows // (4 if args.quick else 1), repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print_table(results)
    for reason in skipped:
        print(f"skipped: {reason}")
    print(f"total {time.perf_counter() - started:.1f}s")
    print(result_line(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
