"""The project's ESAPN and CIESS against the official research code's figures, on MovieLens-1M, in one run.

Run (figures go to BENCHMARKS.md)::

    python -m benchmarks.peers                  # both parts, full protocol (about 11 min on 2 cores)
    python -m benchmarks.peers --quick          # a fifth of the stream, one seed, short CIESS (< 3 min)
    python -m benchmarks.peers --parts esapn    # one part (esapn, ciess)

The official code is not run here: its figures were measured earlier on the same kind of machine (2-core AMD EPYC,
24 GB, no GPU; `../shared/reference/methods.md` §10) and are constants below.

**1. ESAPN's streaming protocol** (methods.md §4.4, binary task). The 1,000,209 ML-1M ratings
(`ratings_no_timestamp.dat`, read by `pipeline.ingest.read`), label 1 if rating > 3.5 (`threshold=3.5`: ratings are
integers), user and item ids only, shuffled with `numpy.random.default_rng(seed)`; the first 800,167 rows are the
train stream, cut into `TRAIN_DAYS` equal days (as `benchmarks.streaming` cuts its stream), and the remaining 200,042
one test day, written with `pipeline.dataset.write_dataset` to a temp dir. Each method is the real job
(`jobs.train`, 2 ranks under torchrun, `jobs/configs/streaming.yaml`: MF, batch 1,000 per rank, row-wise Adagrad),
prequential: every day is scored before it is trained on, so the test day's score is the model after the whole
train stream, with no update during the test stream (the official code keeps updating through it). Methods:
ESAPN (`search.method=esapn`, sizes 4, 8, 16, 32, 64, 128, no budget: ESAPN as published; each train day every row
seen keeps or doubles its size by its policy) and Fixed-222 (`search.method=fixed search.dim=222`: every row at
222 = Σ of the official candidate sizes, the official "Fixed" baseline; stored in 224 columns). Seeds 0, 1, 2 (each
seed its own shuffle and `train.seed`). Measured: rows/s of the train stream = 800,167 / the wall time from the end
of the job's setup (its `metrics.jsonl` appears) to the last train day's record (evaluation, training, the
searcher's step and reconfiguration, all inside; dataset preparation, process start and the test day outside),
split in the table into `fit s` (the training steps, from the job's per-day examples/s), `reconf s` (moving to each
day's new plan) and `other s` (the rest: each day's prequential evaluation, stream and vocabulary work, the
searcher's observe/propose);
test accuracy (logit > 0, the job's `accuracy`) and AUC of the test day; "allocated" = the embedding parameters
the plan stores (rows × stored width over every bucket table: what is in memory) and "chosen" = rows × logical dim,
both for the plan that scores the test day. Official: ESAPN 10.3k rows/s, accuracy 0.7219, 1.11M chosen parameters
with all six candidate tables (2.22M) allocated; Fixed-222 24.9k rows/s, accuracy 0.7193. Targets: ESAPN rows/s
≥ 10 × 10.3k; ESAPN accuracy ≥ 0.7219 (mean of the seeds); ESAPN allocated ≤ 25% of Fixed-222's allocated (ours,
same tables). Each is judged on the mean over the seeds.

**2. CIESS on the CIESS protocol** (methods.md §5.4), as `benchmarks.ciess_ml1m` runs it (its `Bench`, at 90%
sparsity): per-user 50/25/25 split, LightGCN, d_max 128; the search = a supernet pretrained 600 batches + 10 × 10
TD3 iterations, each scoring a plan on the masked supernet; its plan then retrained from scratch (2,000 batches) and
tested. Measured: the search's wall time from its start to the plan it retrains (data preparation outside), the
retrained test Recall@20, and the wall time of one 10,000-triple LightGCN BPR batch at d = 128 on the search's
training split (median of `BATCH_TIMING_STEPS` after `BATCH_WARMUP`; a short window, so the supernet's
pretraining, 600 such batches, is given per batch too). Official: ≈ 0.3 s per such batch × 2,000
batches per iteration × 330 iterations (30 episodes × 11) ≈ 198,000 s (extrapolated, not run); its Recall@20 is the
paper's CIESS row (Table 1, LightGCN, c = 90%: 0.2248), since the official code's own retrained figure was not
measured. Targets: search ≤ 198,000 s / 100; Recall@20 ≥ 0.2248. The table says how much less work the project's
search does (BPR batches, plan evaluations), so the speed-up is read as what it is.

`--quick`: the first fifth of the shuffled stream (160,033 train + 40,008 test rows), seed 0 only, and
`ciess_ml1m`'s quick settings (supernet 150 batches, 2 × 4 iterations, retrain 200 batches); its figures are not
comparable and no target is judged. The last line is `RESULT peers: key=value ...`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from benchmarks.ciess_ml1m import D_MAX, FULL_SETTINGS, PAPER_CIESS, QUICK_SETTINGS, Bench, datasets_root, load_ml1m
from benchmarks.streaming import REPO, SEGMENTS, job_command
from jobs.train import table_capacities
from models.lightgcn import BPRRecipe, GraphTask, train_bpr
from pipeline.dataset import Dataset, write_dataset
from pipeline.ingest import read
from pipeline.spec import DatasetSpec, SparseField
from search.rowlevel import MaskedTable

PARTS = ("esapn", "ciess")
CONFIG = "jobs/configs/streaming.yaml"
TRAIN_ROWS, TEST_ROWS = 800_167, 200_042  # the official stream's split of the 1,000,209 ratings
TRAIN_DAYS = SEGMENTS
FIRST_DAY = dt.date(2000, 1, 1)
QUICK_FRACTION = 0.2
SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
ESAPN_DIMS = (4, 8, 16, 32, 64, 128)  # the job's ladder (`size_ladder(128)`): the official sizes as multiples of 4
FIXED_DIM = 222  # the official Fixed baseline: Σ of the official candidate sizes {2, 4, 8, 16, 64, 128}
METHODS: dict[str, list[str]] = {
    "ESAPN": ["search.method=esapn", f"search.dim={ESAPN_DIMS[-1]}", "search.budget="],
    f"Fixed-{FIXED_DIM}": ["search.method=fixed", f"search.dim={FIXED_DIM}", "search.budget="],
}
POLL_SECONDS = 0.02

# The official code's figures on this kind of machine (methods.md §10 and the brief of this benchmark).
OFFICIAL_ESAPN_ROWS_S = 10_300
OFFICIAL_ESAPN_ACCURACY = 0.7219
OFFICIAL_ESAPN_CHOSEN = 1_110_000
OFFICIAL_ESAPN_ALLOCATED = 2_220_000  # all six candidate tables
OFFICIAL_FIXED_ROWS_S = 24_900
OFFICIAL_FIXED_ACCURACY = 0.7193
OFFICIAL_BATCH_S = (0.26, 0.32)  # one 10,000-triple LightGCN batch at d = 128
OFFICIAL_BATCHES, OFFICIAL_ITERATIONS = 2_000, 330  # per iteration; 30 episodes × 11 iterations
OFFICIAL_CIESS_S = 0.3 * OFFICIAL_BATCHES * OFFICIAL_ITERATIONS
SPARSITY = 0.9
ROWS_S_FACTOR, ALLOCATED_SHARE, CIESS_FACTOR = 10.0, 0.25, 100.0
BATCH_WARMUP, BATCH_TIMING_STEPS = 2, 10


@dataclass
class StreamRun:
    """One job over the ESAPN stream."""

    method: str
    seed: int
    train_rows: int
    train_seconds: float  # setup's end → the last train day's record
    fit_seconds: float  # of which training steps (the job's per-day examples/s)
    reconfigure_seconds: float  # of which moving to new plans (save, rebuild, re-plan, load)
    job_seconds: float  # the whole subprocess, start and test day included
    test_rows: int
    accuracy: float
    auc: float
    allocated: int  # stored embedding parameters of the plan scoring the test day
    chosen: int  # its logical parameters (rows × chosen dim)
    rows: int  # embedding rows over the tables (fallback rows included)

    @property
    def rows_per_s(self) -> float:
        return self.train_rows / self.train_seconds


@dataclass
class CiessRun:
    """The CIESS search at one sparsity, its retrained plan, and the per-batch timing."""

    search_seconds: float  # supernet pretraining + TD3 iterations, up to the plan
    retrain_seconds: float
    recall20: float
    ndcg20: float
    reached: float
    batch_seconds: float  # one 10k-triple BPR batch at d = 128 (median)
    supernet_seconds: float  # the supernet's pretraining (and its full-size evaluation), part of the search
    supernet_batches: int
    evaluations: int
    retrain_batches: int
    note: str


@dataclass
class Comparison:
    """One line of the comparison table."""

    what: str
    ours: str
    official: str
    target: str
    met: bool | None  # None: for information


# ---- 1. ESAPN's stream ---------------------------------------------------------------------------------------------


def esapn_stream(ratings: pl.DataFrame, out: Path, seed: int, train_rows: int, test_rows: int) -> Path:
    """The shuffled binary stream as a dataset: `TRAIN_DAYS` equal train days, then one test day."""
    order = np.random.default_rng(seed).permutation(ratings.height)[: train_rows + test_rows]
    index = np.arange(order.size)
    day = np.where(index < train_rows, index * TRAIN_DAYS // train_rows, TRAIN_DAYS)
    frame = (
        ratings[order]
        .with_columns(pl.Series("day", day))
        .with_columns((pl.lit(FIRST_DAY) + pl.duration(days=pl.col("day"))).cast(pl.Date).alias("day"))
    )
    spec = DatasetSpec(
        name="ml-1m-esapn",
        task="binary",
        label="label",
        sparse=(SparseField("user", "user"), SparseField("item", "item")),
        user_field="user",
        item_field="item",
        meta={
            "source": "MovieLens-1M ratings_no_timestamp.dat",
            "label_rule": "label = 1 if rating > 3.5 else 0",
            "day_rule": f"shuffled (numpy default_rng({seed})); first {train_rows} rows in {TRAIN_DAYS} equal days, "
            f"the next {test_rows} one test day",
        },
    )
    return write_dataset(frame, spec, out)


def complete_lines(path: Path) -> int:
    """Records fully written to a JSONL file (0 if it does not exist yet)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_stream_job(method: str, seed: int, data: Path, work: Path, train_rows: int) -> StreamRun:
    """Run the job on the stream, timing the train days by when their records reach `metrics.jsonl`."""
    name = f"{method.lower()}-seed{seed}"
    cmd, env = job_command(CONFIG, name, work, [f"data.path={data}", f"train.seed={seed}", *METHODS[method]])
    metrics, log = work / name / "metrics.jsonl", work / f"{name}.log"
    setup_done = train_done = None
    work.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            now = time.perf_counter()
            if setup_done is None and metrics.exists():  # written at the end of setup, with no records yet
                setup_done = now
            if setup_done is not None and train_done is None and complete_lines(metrics) >= TRAIN_DAYS:
                train_done = now
            time.sleep(POLL_SECONDS)
        job_seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"job {name} failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    if setup_done is None or train_done is None:
        raise RuntimeError(f"job {name}: could not time its train days from {metrics} (polled too slowly?)")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    if len(records) != TRAIN_DAYS + 1:
        raise RuntimeError(f"job {name}: {len(records)} day records, expected {TRAIN_DAYS} train days + 1 test day")
    trained = sum(r["train_examples"] for r in records[:TRAIN_DAYS])
    if trained != train_rows:
        raise RuntimeError(f"job {name} trained on {trained:,} rows of the train days, expected {train_rows:,}")
    last_train, test = records[TRAIN_DAYS - 1], records[TRAIN_DAYS]
    run = StreamRun(
        method=method,
        seed=seed,
        train_rows=trained,
        train_seconds=train_done - setup_done,
        fit_seconds=sum(r["train_examples"] / r["examples_per_s"] for r in records[:TRAIN_DAYS]),
        reconfigure_seconds=sum(r["reconfigure_seconds"] for r in records[:TRAIN_DAYS]),
        job_seconds=job_seconds,
        test_rows=int(test["eval"]["examples"]),
        accuracy=float(test["eval"]["accuracy"]),
        auc=float(test["eval"]["auc"]),
        allocated=int(last_train["embedding_parameters"]),
        chosen=int(last_train["embedding_logical_parameters"]),
        rows=sum(table_capacities(Dataset(data), None).values()),
    )
    print(
        f"  {method:<10} seed {seed}: {run.rows_per_s:>9,.0f} rows/s  test acc {run.accuracy:.4f}  "
        f"allocated {run.allocated:,}  chosen {run.chosen:,}  (job {job_seconds:.0f}s)",
        flush=True,
    )
    return run


def esapn_part(work: Path, quick: bool) -> list[StreamRun]:
    """ESAPN and Fixed-222 over the stream of every seed (the two methods interleaved, so drifting load on the
    machine touches both alike)."""
    ratings, _ = read("ml-1m", datasets_root() / "ml-1m", threshold=3.5)
    ratings = ratings.select("user", "item", "label")
    if ratings.height != TRAIN_ROWS + TEST_ROWS:
        raise RuntimeError(f"ML-1M has {ratings.height:,} ratings here, expected {TRAIN_ROWS + TEST_ROWS:,}")
    fraction = QUICK_FRACTION if quick else 1.0
    train_rows, test_rows = round(TRAIN_ROWS * fraction), round(TEST_ROWS * fraction)
    runs = []
    for seed in QUICK_SEEDS if quick else SEEDS:
        data = esapn_stream(ratings, work / f"stream-seed{seed}", seed, train_rows, test_rows)
        for method in METHODS:
            runs.append(run_stream_job(method, seed, data, work / "runs", train_rows))
    return runs


# ---- 2. CIESS ------------------------------------------------------------------------------------------------------


def lightgcn_batch_seconds(task: GraphTask, seed: int = 0) -> float:
    """Wall time of one BPR batch (the recipe's 10,000 triples) of LightGCN with every row at d_max: the median over
    `BATCH_TIMING_STEPS` batches after `BATCH_WARMUP` (the first builds Adam's state)."""
    generator = torch.Generator().manual_seed(seed)
    table = MaskedTable(task.num_users, task.num_items, D_MAX, generator)  # every row at d_max
    stamps = [time.perf_counter()]
    recipe = BPRRecipe(steps=BATCH_WARMUP + BATCH_TIMING_STEPS)
    train_bpr(task, table, table.parameters(), recipe, generator, None, lambda _: stamps.append(time.perf_counter()))
    return float(np.median(np.diff(stamps)[BATCH_WARMUP:]))


def ciess_part(work: Path, quick: bool) -> CiessRun:
    """`benchmarks.ciess_ml1m`'s CIESS row at `SPARSITY` (search, then its plan retrained and tested), and the
    per-batch timing on the search's training split."""
    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    bench = Bench(load_ml1m(work), settings, None)
    batch_seconds = lightgcn_batch_seconds(bench.valid)
    print(f"  LightGCN BPR batch ({BPRRecipe().batch:,} triples, d {D_MAX}): {batch_seconds:.3f}s", flush=True)
    row = bench.ciess(SPARSITY)
    return CiessRun(
        search_seconds=row.search_seconds,
        retrain_seconds=row.retrain_seconds,
        recall20=row.recall20,
        ndcg20=row.ndcg20,
        reached=row.reached,
        batch_seconds=batch_seconds,
        supernet_seconds=bench.env_seconds,
        supernet_batches=settings.supernet.steps,
        evaluations=settings.ciess_episodes * settings.ciess_iterations,
        retrain_batches=settings.retrain.steps,
        note=row.note,
    )


# ---- report --------------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan")


def print_runs(runs: list[StreamRun]) -> None:
    print(
        f"{'method':<10}{'seed':>5}{'train rows':>11}{'train s':>8}{'fit s':>7}{'reconf s':>9}{'other s':>8}"
        f"{'rows/s':>9}{'test rows':>10}{'test acc':>9}{'test AUC':>9}{'allocated':>11}{'chosen':>11}{'mean dim':>9}"
        f"{'job s':>7}"
    )
    for r in runs:
        print(
            f"{r.method:<10}{r.seed:>5}{r.train_rows:>11,}{r.train_seconds:>8.1f}{r.fit_seconds:>7.1f}"
            f"{r.reconfigure_seconds:>9.1f}{r.train_seconds - r.fit_seconds - r.reconfigure_seconds:>8.1f}"
            f"{r.rows_per_s:>9,.0f}"
            f"{r.test_rows:>10,}{r.accuracy:>9.4f}{r.auc:>9.4f}{r.allocated:>11,}{r.chosen:>11,}"
            f"{r.chosen / r.rows:>9.1f}{r.job_seconds:>7.0f}"
        )


def esapn_comparisons(runs: list[StreamRun], parts: dict[str, Any]) -> list[Comparison]:
    esapn = [r for r in runs if r.method == "ESAPN"]
    fixed = [r for r in runs if r.method != "ESAPN"]
    speed, speed_sd = mean_std([r.rows_per_s for r in esapn])
    acc, acc_sd = mean_std([r.accuracy for r in esapn])
    allocated, chosen = mean_std([r.allocated for r in esapn])[0], mean_std([r.chosen for r in esapn])[0]
    f_speed, f_speed_sd = mean_std([r.rows_per_s for r in fixed])
    f_acc, f_acc_sd = mean_std([r.accuracy for r in fixed])
    f_allocated = mean_std([r.allocated for r in fixed])[0]
    share = allocated / f_allocated
    fixed_name = fixed[0].method
    parts.update(
        esapn_rows_per_s=f"{speed:.0f}",
        esapn_rows_per_s_std=f"{speed_sd:.0f}",
        esapn_accuracy=f"{acc:.4f}",
        esapn_accuracy_std=f"{acc_sd:.4f}",
        esapn_allocated=f"{allocated:.0f}",
        esapn_chosen=f"{chosen:.0f}",
        esapn_allocated_share=f"{share:.3f}",
        fixed_rows_per_s=f"{f_speed:.0f}",
        fixed_accuracy=f"{f_acc:.4f}",
        fixed_allocated=f"{f_allocated:.0f}",
    )
    return [
        Comparison(
            "ESAPN train rows/s",
            f"{speed:,.0f} ± {speed_sd:,.0f}",
            f"{OFFICIAL_ESAPN_ROWS_S:,}",
            f">= {ROWS_S_FACTOR * OFFICIAL_ESAPN_ROWS_S:,.0f} ({ROWS_S_FACTOR:.0f}x)",
            speed >= ROWS_S_FACTOR * OFFICIAL_ESAPN_ROWS_S,
        ),
        Comparison(
            "ESAPN test accuracy",
            f"{acc:.4f} ± {acc_sd:.4f}",
            f"{OFFICIAL_ESAPN_ACCURACY}",
            f">= {OFFICIAL_ESAPN_ACCURACY}",
            acc >= OFFICIAL_ESAPN_ACCURACY,
        ),
        Comparison(
            "ESAPN allocated params",
            f"{allocated:,.0f} ({share:.1%} of {fixed_name}'s {f_allocated:,.0f})",
            f"{OFFICIAL_ESAPN_ALLOCATED:,} (all 6 tables)",
            f"<= {ALLOCATED_SHARE:.0%} of {fixed_name}'s",
            share <= ALLOCATED_SHARE,
        ),
        Comparison("ESAPN chosen params", f"{chosen:,.0f}", f"{OFFICIAL_ESAPN_CHOSEN:,}", "-", None),
        Comparison(
            f"{fixed_name} train rows/s", f"{f_speed:,.0f} ± {f_speed_sd:,.0f}", f"{OFFICIAL_FIXED_ROWS_S:,}", "-", None
        ),
        Comparison(
            f"{fixed_name} test accuracy", f"{f_acc:.4f} ± {f_acc_sd:.4f}", f"{OFFICIAL_FIXED_ACCURACY}", "-", None
        ),
        Comparison(
            f"ESAPN / {fixed_name} speed",
            f"{speed / f_speed:.2f}x",
            f"{OFFICIAL_ESAPN_ROWS_S / OFFICIAL_FIXED_ROWS_S:.2f}x",
            "-",
            None,
        ),
    ]


def ciess_comparisons(run: CiessRun, parts: dict[str, Any]) -> list[Comparison]:
    paper_r20, paper_n20 = PAPER_CIESS[SPARSITY]
    limit = OFFICIAL_CIESS_S / CIESS_FACTOR
    pct = round(SPARSITY * 100)
    parts.update(
        ciess_search_s=f"{run.search_seconds:.0f}",
        ciess_speedup=f"{OFFICIAL_CIESS_S / run.search_seconds:.0f}x",
        ciess_retrain_s=f"{run.retrain_seconds:.0f}",
        ciess_r20=f"{run.recall20:.4f}",
        ciess_n20=f"{run.ndcg20:.4f}",
        ciess_batch_s=f"{run.batch_seconds:.3f}",
    )
    low, high = OFFICIAL_BATCH_S
    return [
        Comparison(
            f"CIESS search wall s (c={pct}%)",
            f"{run.search_seconds:,.0f} ({OFFICIAL_CIESS_S / run.search_seconds:,.0f}x faster)",
            f"~{OFFICIAL_CIESS_S:,.0f} (extrapolated)",
            f"<= {limit:,.0f} ({CIESS_FACTOR:.0f}x)",
            run.search_seconds <= limit,
        ),
        Comparison(
            "CIESS retrained Recall@20",
            f"{run.recall20:.4f} (reached {run.reached:.1%})",
            f"{paper_r20} (paper Table 1)",
            f">= {paper_r20}",
            run.recall20 >= paper_r20,
        ),
        Comparison("CIESS retrained NDCG@20", f"{run.ndcg20:.4f}", f"{paper_n20} (paper Table 1)", "-", None),
        Comparison("LightGCN batch s (10k, d 128)", f"{run.batch_seconds:.3f}", f"{low}-{high}", "-", None),
        Comparison(
            "supernet pretraining s/batch",
            f"{run.supernet_seconds / run.supernet_batches:.3f} ({run.supernet_seconds:,.0f} s in all)",
            "-",
            "-",
            None,
        ),
        Comparison(
            "BPR batches in the search",
            f"{run.supernet_batches:,} (one supernet)",
            f"{OFFICIAL_ITERATIONS * OFFICIAL_BATCHES:,} ({OFFICIAL_ITERATIONS} x {OFFICIAL_BATCHES:,})",
            "-",
            None,
        ),
        Comparison(
            "plans evaluated",
            f"{run.evaluations} (masked supernet)",
            f"{OFFICIAL_ITERATIONS} (each a fresh model)",
            "-",
            None,
        ),
        Comparison(
            "retrain of the plan, s",
            f"{run.retrain_seconds:,.0f} ({run.retrain_batches:,} batches)",
            "not in the 198,000 s",
            "-",
            None,
        ),
    ]


def print_comparisons(rows: list[Comparison], quick: bool) -> None:
    width = [max(len(getattr(r, k)) for r in rows) for k in ("what", "ours", "official", "target")]
    names = ("what", "ours", "official", "target")
    header = " | ".join(f"{n:<{w}}" for n, w in zip(names, width, strict=True)) + " | met"
    print(header)
    print("-" * len(header))
    for r in rows:
        met = "info" if r.met is None else "-" if quick else "met" if r.met else "MISSED"
        print(" | ".join(f"{getattr(r, n):<{w}}" for n, w in zip(names, width, strict=True)) + f" | {met}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fifth of the stream, one seed, short CIESS (< 3 min)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if bad := sorted(set(parts) - set(PARTS)):
        parser.error(f"unknown parts {bad}; choose from {PARTS}")
    if not (datasets_root() / "ml-1m").is_dir():
        print(f"skip: {datasets_root() / 'ml-1m'} not found (licensed data is read from ../shared/datasets)")
        return 0
    if "OMP_NUM_THREADS" not in os.environ:  # the CIESS part runs in this process; the jobs set their own
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.quick:
        quick = QUICK_SETTINGS
        print(
            f"QUICK MODE: {QUICK_FRACTION:.0%} of the ESAPN stream, seed {QUICK_SEEDS[0]} only; CIESS supernet "
            f"{quick.supernet.steps} batches, {quick.ciess_episodes}x{quick.ciess_iterations} iterations, retrain "
            f"{quick.retrain.steps} — figures are not comparable, no target is judged"
        )
    # force: importing torchrec has already given the root logger a WARNING handler, which would hide the progress.
    logging.basicConfig(level=logging.INFO, format="  %(message)s", force=True)
    start, load = time.perf_counter(), os.getloadavg()
    runs: list[StreamRun] = []
    ciess: CiessRun | None = None
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        work = Path(tmp)
        if "esapn" in parts:
            print("ESAPN streaming protocol (jobs.train, 2 ranks):", flush=True)
            runs = esapn_part(work, args.quick)
        if "ciess" in parts:
            print(f"CIESS at {SPARSITY:.0%} (benchmarks.ciess_ml1m's protocol):", flush=True)
            ciess = ciess_part(work / "ciess", args.quick)
    result: dict[str, Any] = {"mode": "quick" if args.quick else "full"}
    comparisons = []
    if runs:
        print_runs(runs)
        comparisons += esapn_comparisons(runs, result)
    if ciess is not None:
        comparisons += ciess_comparisons(ciess, result)
    print()
    print_comparisons(comparisons, args.quick)
    if not args.quick:
        keys = {
            "ESAPN train rows/s": "esapn_rows_per_s_target",
            "ESAPN test accuracy": "esapn_accuracy_target",
            "ESAPN allocated params": "esapn_allocated_target",
            "CIESS retrained Recall@20": "ciess_recall_target",
        }
        for c in comparisons:
            key = keys.get(c.what, "ciess_time_target" if c.what.startswith("CIESS search") else None)
            if key is not None and c.met is not None:
                result[key] = "met" if c.met else "missed"
    print(
        f"total wall time {time.perf_counter() - start:.0f}s on {os.cpu_count()} cores; load average "
        f"{load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    )
    print("RESULT peers: " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
