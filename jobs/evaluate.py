"""Offline evaluation of finished runs: quality per day and overall, unseen ids, embedding memory, side by side.

    python -m jobs.evaluate --run runs/demo
    python -m jobs.evaluate --run runs/demo --days 2024-01-04..2024-01-05 --out reports/demo-late
    python -m jobs.evaluate --run runs/autodim --split test --compare runs/demo runs/demo2 --out reports/cmp
    python -m jobs.evaluate --run plans/demo-int8 --compare runs/demo    # a bundle, scored as it serves

Each run is opened with `jobs.runs.load_run` (its newest complete checkpoint, unsharded, on CPU), each export bundle
with `jobs.export.load_bundle` (verified; scored through its own serving bytes), and scored in this one process,
without gradients, in large batches. Every run is scored on the same rows, the ones the first run selects:

- `--days A..B`: days of the dataset, as dates (`2024-01-04`) or 1-based day numbers (`4`); either end may be left
  out (`3..`), and a single `A` is one day;
- `--split train|valid|test`: the rows of that split of the first run's static protocol (its `data.protocol`,
  `data.fractions` and `data.split_seed` reproduce its assignment); combined with `--days`, of those days only;
- neither: the test split of all days for a run trained on a static split, all days for a prequential run.

Each run is scored as serving runs it (`jobs.export.served_model`): a plan whose tables are served in fp16, int8 or
int4 (`FeaturePlan.dtype`, e.g. from `search.dtype`) is scored through TorchRec's quantised inference tables in those
dtypes (the trained fp32 weights quantised as the export quantises them), so the quality reported is the quality
served; an all-fp32 plan is scored on the trained model itself. Metrics follow the dataset's task (binary: AUC,
log loss, accuracy; regression: MSE; multiclass: accuracy), per day and over all selected rows together (not an
average of days). Ids that a run's vocabulary never admitted in training fall back to row 0; those lookups are
counted per feature and day.

The report directory (`--out`, default `reports/<first run>`) is written atomically (temp dir + rename), and it
replaces only an earlier report: an `--out` that is, contains or lies inside a run or its data, or that holds
anything but a report's files, is refused before any scoring (`pipeline.dataset.check_output_dir`):

- `report.md`: the runs, overall and per-day quality, unseen ids, embedding parameters, training bytes and served
  bytes per table (from the plan: `TableSpec.serving_bytes`, rows in the table's dtype padded to the plan's row
  alignment, plus fp32 projections) and per rank (the sharding planner's estimate, optimizer state included, from
  the run's last metrics record), and the frontier: each run's served bytes and primary metric, and the Pareto set
  (the runs no other run beats on both, `pareto_set`);
- `quality_per_day.png`, `bytes_per_table.png` (served bytes), `quality_vs_memory.png` (the primary metric against
  served bytes, log scale, the Pareto set filled and joined), and `dims_vs_frequency.png` when a run has a row-level
  plan;
- `metrics.parquet`: one row per run × day (or `overall`) × metric: `run`, `day`, `metric`, `value`, `examples`;
- `unseen.parquet`: one row per run × day (or `overall`) × feature: `run`, `day`, `feature`, `lookups`, `unseen`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from jobs.config import ConfigError
from jobs.export import MANIFEST, BundleError, load_bundle, run_inputs, served_model
from jobs.logs import setup_logging
from jobs.runs import LoadedRun, load_run
from models.errors import ModelConfigError
from models.metrics import TASK_METRICS, task_metrics
from models.scoring import Scorer, score
from pipeline.dataset import Dataset, Day, OutputKind, atomic_directory, check_output_dir
from pipeline.errors import DatasetError
from pipeline.splits import SPLIT_NAMES, assign_splits
from pipeline.stream import DayStream, StreamConfig
from sharding.checkpoint import latest_checkpoint
from sharding.embedding import RowRemap
from sharding.plan import BYTES_PER_PARAM, PRECISIONS, DimensionPlan, PlanError

logger = logging.getLogger(__name__)

OVERALL = "overall"
# The metric the plots show for each task, and whether higher is better.
PRIMARY_METRIC: dict[str, tuple[str, bool]] = {
    "binary": ("auc", True),
    "regression": ("mse", False),
    "multiclass": ("accuracy", True),
}
PLOTS = ("quality_per_day.png", "bytes_per_table.png", "quality_vs_memory.png")
NAMED_POINTS = 12  # quality_vs_memory.png names this many runs; more are keyed by number (the frontier table's key)
DIMS_PLOT = "dims_vs_frequency.png"
REPORT = "report.md"
# What a report directory holds: it is replaced whole, so only a directory holding exactly this is replaced.
REPORT_OUTPUT = OutputKind("report", REPORT, (REPORT, *PLOTS, DIMS_PLOT, "metrics.parquet", "unseen.parquet"))


class EvaluationError(ValueError):
    """Bad evaluation input: a missing run, days outside the dataset, an unknown split, runs that cannot be compared."""


@dataclass(frozen=True)
class Selection:
    """The rows every run is scored on.

    Args:
        dataset: the dataset read (the first run's, or `--data`).
        days: the days, in order.
        split: the split the rows are restricted to, or None for whole days.
        split_source: `(protocol, fractions, seed)` the split assignment was made with, or None.
        row_filter: the `DayStream` row filter of `split`, or None.
        description: one line saying what was selected.
    """

    dataset: Dataset
    days: list[Day]
    split: str | None
    split_source: tuple[str, tuple[float, ...] | None, int] | None
    row_filter: Callable[[Day], np.ndarray] | None
    description: str


@dataclass
class DayEvaluation:
    """One run's scores on one day (or `overall`).

    Args:
        day: the day's name, or `overall`.
        examples: rows scored.
        metrics: the task's metrics (nan where undefined, e.g. AUC of a day with one class).
        lookups: per feature, ids looked up.
        unseen: per feature, lookups that fell back to row 0 (ids never admitted in training).
        in_training: whether the rows scored include rows the run trained on.
    """

    day: str
    examples: int
    metrics: dict[str, float]
    lookups: dict[str, int]
    unseen: dict[str, int]
    in_training: bool = False


@dataclass
class RunEvaluation:
    """Everything the report says about one run.

    Args:
        name: the run's name in the report.
        run_dir: the run directory.
        checkpoint: the checkpoint scored.
        method: the run's `search.method`.
        protocol: the run's `data.protocol`.
        task: the dataset's task.
        plan: the run's dimension plan.
        days: per-day scores, in the selection's order.
        overall: scores over all selected rows.
        bytes_per_rank: the planner's embedding bytes per rank in the run's last metrics record, if any.
        trained_days: the days the run trained on (names).
        row_counts: per row-level feature, the training count of each vocabulary row.
    """

    name: str
    run_dir: Path
    checkpoint: Path
    method: str
    protocol: str
    task: str
    plan: DimensionPlan
    days: list[DayEvaluation]
    overall: DayEvaluation
    bytes_per_rank: list[int] | None
    trained_days: list[str]
    row_counts: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class EvaluationReport:
    """What `evaluate` wrote: the report directory, the selection and each run's scores."""

    out: Path
    selection: Selection
    runs: list[RunEvaluation]
    files: list[str]


# ---- selecting the data ------------------------------------------------------------------------------------------


def parse_days(text: str, dataset: Dataset) -> list[Day]:
    """The days `A..B`, `A..`, `..B` or `A` name, as dates (YYYY-MM-DD) or 1-based day numbers.

    Raises:
        EvaluationError: a malformed or out-of-range end, or an empty range.
    """
    days = dataset.days
    have = f"the dataset {dataset.root} has days 1..{len(days)} ({days[0].name} .. {days[-1].name})"
    fix = f"give dates (YYYY-MM-DD) or 1-based day numbers within them, e.g. --days 1..{len(days)}"

    def position(token: str, default: int) -> int:
        token = token.strip()
        if not token:
            return default
        if token.isdigit():
            number = int(token)
            if not 1 <= number <= len(days):
                raise EvaluationError(
                    f"--days {text!r}: day number {number} is outside the dataset; {have}. Fix: {fix}"
                )
            return number - 1
        try:
            date = dt.date.fromisoformat(token)
        except ValueError:
            raise EvaluationError(
                f"--days {text!r}: {token!r} is neither a date nor a day number; {have}. Fix: {fix}"
            ) from None
        for i, day in enumerate(days):
            if day.date == date:
                return i
        raise EvaluationError(f"--days {text!r}: day {date} is not in the dataset; {have}. Fix: {fix}")

    lo, sep, hi = text.partition("..")
    if not sep:
        if not lo.strip():
            raise EvaluationError(f"--days is empty; {have}. Fix: {fix}")
        hi = lo
    start, stop = position(lo, 0), position(hi, len(days) - 1)
    if start > stop:
        raise EvaluationError(f"--days {text!r}: the range is empty (it starts after it ends); {have}. Fix: {fix}")
    return days[start : stop + 1]


def select_data(run: LoadedRun, days: str | None, split: str | None) -> Selection:
    """The rows to score, chosen by `--days`/`--split` against `run` (the first run).

    Raises:
        EvaluationError: unknown split, a split of a prequential run, or bad days.
    """
    cfg = run.cfg.data
    if split is not None and split not in SPLIT_NAMES:
        raise EvaluationError(
            f"--split {split!r} is not a split. Fix: choose one of {', '.join(SPLIT_NAMES)} (for a run trained on a "
            "static split), or select whole days with --days A..B"
        )
    if split is not None and cfg.protocol == "prequential":
        raise EvaluationError(
            f"--split {split}: run {run.run_dir} was trained prequentially (data.protocol=prequential), so its data "
            "has no train/valid/test split. Fix: select days with --days A..B instead (e.g. the days after the "
            "run's data.days), or list a run trained on a static split first"
        )
    if split is None and days is None and cfg.protocol != "prequential":
        split = "test"
    dataset = run.dataset
    chosen = parse_days(days, dataset) if days is not None else list(dataset.days)
    span = chosen[0].name if len(chosen) == 1 else f"{chosen[0].name} .. {chosen[-1].name}"
    if split is None:
        return Selection(dataset, chosen, None, None, None, f"days {span} ({len(chosen)} days, all rows)")
    fractions = tuple(cfg.fractions) if cfg.fractions else None
    assignment = assign_splits(
        dataset,
        cfg.protocol,  # type: ignore[arg-type]  # not prequential: checked above
        fractions=fractions,  # type: ignore[arg-type]  # validated by DataConfig
        seed=cfg.split_seed,
    )
    description = (
        f"the {split} split of days {span} ({len(chosen)} days; data.protocol={cfg.protocol}, "
        f"fractions={list(fractions) if fractions else 'default'}, split_seed={cfg.split_seed}, from {run.run_dir})"
    )
    return Selection(
        dataset, chosen, split, (cfg.protocol, fractions, cfg.split_seed), assignment.row_filter(split), description
    )


# ---- scoring -----------------------------------------------------------------------------------------------------


def _trained_days(run: LoadedRun) -> list[str]:
    if run.cfg.data.protocol == "prequential":
        return [str(d["day"]) for d in run.progress.get("days", [])]
    days = run.dataset.days[: run.cfg.data.days] if run.cfg.data.days else run.dataset.days
    if not run.progress.get("epochs"):  # stopped inside the first epoch: only the days before its position
        days = days[: int(run.progress["position"][2])]
    return [d.name for d in days]


def _bytes_per_rank(run_dir: Path) -> list[int] | None:
    """`embedding_bytes_per_rank` of the last metrics record that has it."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    last: list[int] | None = None
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "embedding_bytes_per_rank" in record:
                last = [int(b) for b in record["embedding_bytes_per_rank"]]
    return last


def evaluate_run(run: LoadedRun, selection: Selection, name: str, batch_size: int = 8192) -> RunEvaluation:
    """Score `run` as served (`jobs.export.served_model`) on `selection`, per day and overall; count the lookups
    that fell back to row 0.

    Args:
        run: an opened run. When its plan serves a table in fp16, int8 or int4, `run.model`'s tables are swapped
            for TorchRec's quantised inference tables in place (as `quantize_inference_model` does).
        selection: the rows to score (read from `selection.dataset`, whose spec must be the run's).
        name: the run's name in the report.
        batch_size: rows per forward pass.

    Returns:
        The run's scores, unseen-id counts and memory.
    """
    remap = RowRemap(run.plan)
    stream = DayStream(
        selection.dataset,
        run.vocab,
        StreamConfig(batch_size=batch_size, chunk_rows=run.cfg.data.chunk_rows),
        row_filter=selection.row_filter,
        keying=None if remap.identity else remap,
    )
    features = stream.features
    # Scored as served: quantised plans through TorchRec's inference tables (this swaps `run.model`'s tables in
    # place; nothing below needs the fp32 weights); an all-fp32 plan is `run.model` itself.
    model = run.served if run.served is not None else served_model(run.model.eval(), run.plan)
    task = selection.dataset.spec.task
    trained = set(_trained_days(run))
    run_split = (run.cfg.data.protocol, tuple(run.cfg.data.fractions) if run.cfg.data.fractions else None)
    # Held-out rows only when the rows are a valid/test split of the very assignment the run trained under.
    held_out = (
        selection.split in ("valid", "test")
        and selection.split_source is not None
        and (*run_split, run.cfg.data.split_seed) == selection.split_source
    )
    per_day: list[DayEvaluation] = []
    scorers: list[Scorer] = []
    total = sum(stream.num_batches(d) for d in selection.days)
    with tqdm(total=total, desc=f"evaluate {name}", leave=False) as bar:
        for day in selection.days:
            before = {f: run.vocab[f].unseen for f in features}
            lookups = torch.zeros(len(features), dtype=torch.int64)

            def batches(day: Day = day) -> Iterator[tuple[None, Batch]]:
                nonlocal lookups
                for rows, batch in stream.batches_with_rows(day, grow=False):  # keyed for the plan by the stream
                    lookups += torch.tensor(rows.length_per_key(), dtype=torch.int64)
                    bar.update(1)
                    yield None, batch

            # One process holds the model: the scores are kept for exact metrics (the job's own evaluation sums
            # histograms over ranks instead; `models.scoring` is the one path for both).
            scorer = score(model, batches(), Scorer(task, keep_scores=True))
            scorers.append(scorer)
            # The stream maps a whole day's ids before its first batch, so the counters are final here.
            per_day.append(
                DayEvaluation(
                    day.name,
                    scorer.examples,
                    scorer.exact_metrics(),
                    dict(zip(features, (int(n) for n in lookups), strict=True)),
                    {f: run.vocab[f].unseen - before[f] for f in features},
                    in_training=day.name in trained and not held_out,
                )
            )
            logger.info("%s %s: %s", name, day.name, {k: round(v, 4) for k, v in per_day[-1].metrics.items()})
    everything = Scorer(task, keep_scores=True)
    everything.scores = [kept for s in scorers for kept in s.scores]
    logits_all, labels_all = everything.kept()
    overall = DayEvaluation(
        OVERALL,
        int(labels_all.numel()),
        task_metrics(task, logits_all, labels_all),
        {f: sum(d.lookups[f] for d in per_day) for f in features},
        {f: sum(d.unseen[f] for d in per_day) for f in features},
        in_training=any(d.in_training for d in per_day),
    )
    row_counts = {f.feature: run.vocab[f.feature].counts.copy() for f in run.plan.features if f.row_level}
    return RunEvaluation(
        name=name,
        run_dir=run.run_dir,
        checkpoint=run.checkpoint,
        method=run.cfg.search.method,
        protocol=run.cfg.data.protocol,
        task=task,
        plan=run.plan,
        days=per_day,
        overall=overall,
        bytes_per_rank=_bytes_per_rank(run.run_dir),
        trained_days=sorted(trained),
        row_counts=row_counts,
    )


# ---- tables ------------------------------------------------------------------------------------------------------


def metrics_frame(runs: Sequence[RunEvaluation]) -> pl.DataFrame:
    """One row per run × day (then `overall`) × metric."""
    rows = [
        {"run": r.name, "day": d.day, "metric": m, "value": v, "examples": d.examples}
        for r in runs
        for d in [*r.days, r.overall]
        for m, v in d.metrics.items()
    ]
    schema = {"run": pl.String, "day": pl.String, "metric": pl.String, "value": pl.Float64, "examples": pl.Int64}
    return pl.DataFrame(rows, schema=schema)


def unseen_frame(runs: Sequence[RunEvaluation]) -> pl.DataFrame:
    """One row per run × day (then `overall`) × feature: ids looked up and lookups that fell back to row 0."""
    rows = [
        {"run": r.name, "day": d.day, "feature": f, "lookups": d.lookups[f], "unseen": d.unseen[f]}
        for r in runs
        for d in [*r.days, r.overall]
        for f in d.lookups
    ]
    schema = {"run": pl.String, "day": pl.String, "feature": pl.String, "lookups": pl.Int64, "unseen": pl.Int64}
    return pl.DataFrame(rows, schema=schema)


@dataclass(frozen=True)
class TableMemory:
    """One embedding table's size under a plan (the learned projection of a row-level bucket counted with it).

    Args:
        table: the table's name.
        feature: the feature it serves.
        rows: `num_embeddings`.
        logical_dim: the searched dim.
        embedding_dim: the stored width, `ceil4(logical_dim)`.
        parameters: stored parameters, projection included.
        bytes: `parameters` in the plan's training dtype (`plan.dtype`).
        dtype: the dtype serving stores the table in.
        serving_bytes: the table as served (`TableSpec.serving_bytes`: rows in `dtype`, padded to its row alignment, the
            int8/int4 scale and bias included) plus its projection in fp32.
    """

    table: str
    feature: str
    rows: int
    logical_dim: int
    embedding_dim: int
    parameters: int
    bytes: int
    dtype: str
    serving_bytes: int


def table_memory(plan: DimensionPlan) -> list[TableMemory]:
    """Parameters, training bytes and served bytes of every table of `plan`; they sum to `plan.parameters`,
    `plan.bytes` and `plan.serving_bytes`."""
    out = []
    for f in plan.features:
        for t in f.tables():
            projection = t.logical_dim * f.output_dim if f.row_level and f.projection == "linear" else 0
            parameters = t.num_embeddings * t.embedding_dim + projection
            out.append(
                TableMemory(
                    t.name,
                    f.feature,
                    t.num_embeddings,
                    t.logical_dim,
                    t.embedding_dim,
                    parameters,
                    parameters * BYTES_PER_PARAM[plan.dtype],
                    t.dtype,
                    t.serving_bytes + 4 * projection,  # projections are served in fp32
                )
            )
    return out


def plan_dtypes(plan: DimensionPlan) -> str:
    """The serving dtypes of `plan`'s tables, in `PRECISIONS` order: `int8`, or `fp32+int4` when mixed."""
    used = set(plan.dtypes.values())
    return "+".join(d for d in PRECISIONS if d in used)


def pareto_set(points: Sequence[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """The points no other point dominates, as indices sorted by bytes (then by index).

    A point `(bytes, quality)` is dominated by another with bytes <= and quality at least as good (>= when
    `higher_is_better`, else <=) that is strictly better in at least one of the two; equal points do not dominate
    each other, so both stay on the set. A point whose quality is nan is never on the set (and dominates nothing).

    Args:
        points: `(serving bytes, quality)` per run.
        higher_is_better: the quality's direction (`PRIMARY_METRIC`).

    Returns:
        The indices of the Pareto set, in order of bytes.
    """
    sign = 1.0 if higher_is_better else -1.0
    order = sorted((i for i, (_, q) in enumerate(points) if not math.isnan(q)), key=lambda i: (points[i][0], i))
    best_cheaper = -math.inf  # the best quality of every point with fewer bytes than the current group
    kept: list[int] = []
    start = 0
    while start < len(order):
        stop = start
        while stop < len(order) and points[order[stop]][0] == points[order[start]][0]:
            stop += 1
        group = order[start:stop]  # equal bytes
        best = max(sign * points[i][1] for i in group)
        if best > best_cheaper:  # else a cheaper point is at least as good: it dominates the whole group
            kept += [i for i in group if sign * points[i][1] == best]
            best_cheaper = best
        start = stop
    return kept


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def numeric(c: object) -> bool:
        return isinstance(c, int | float) or (
            isinstance(c, str) and re.fullmatch(r"-?[\d,]+(\.\d+)?|n/a", c) is not None
        )

    right = ["---:" if rows and numeric(rows[0][i]) else "---" for i in range(len(header))]
    lines = [f"| {' | '.join(header)} |", f"|{'|'.join(right)}|"]
    lines += [f"| {' | '.join(_fmt(c) if isinstance(c, float) else str(c) for c in row)} |" for row in rows]
    return "\n".join(lines)


# ---- plots -------------------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no global pyplot state
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_quality_per_day(runs: Sequence[RunEvaluation], path: Path) -> None:
    """One panel per metric: the metric per day, one line per run."""
    names = TASK_METRICS[runs[0].task]
    fig = Figure(figsize=(4.5 * len(names), 3.6))
    days = [d.day for d in runs[0].days]
    x = np.arange(len(days))
    for i, metric in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        for r in runs:
            ax.plot(x, [d.metrics[metric] for d in r.days], marker="o", label=r.name)
        ax.set_xticks(x, days, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    _save(fig, path)


def plot_bytes_per_table(runs: Sequence[RunEvaluation], path: Path) -> None:
    """Grouped horizontal bars: each table's served bytes (KiB, in its serving dtype), one bar per run."""
    tables: list[str] = []
    per_run = []
    for r in runs:
        sizes = {t.table: t.serving_bytes for t in table_memory(r.plan)}
        tables += [t for t in sizes if t not in tables]
        per_run.append(sizes)
    fig = Figure(figsize=(7, 1.2 + 0.35 * len(tables) * max(1, len(runs) / 2)))
    ax = fig.add_subplot(1, 1, 1)
    height = 0.8 / len(runs)
    y = np.arange(len(tables))
    for i, (r, sizes) in enumerate(zip(runs, per_run, strict=True)):
        ax.barh(y + i * height, [sizes.get(t, 0) / 1024 for t in tables], height, label=r.name)
    ax.set_yticks(y + height * (len(runs) - 1) / 2, tables, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("KiB served (rows in the table's dtype, rows padded to the row alignment, + fp32 projections)")
    ax.set_title("served embedding bytes per table")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def _frontier_points(runs: Sequence[RunEvaluation]) -> tuple[list[tuple[float, float]], list[int]]:
    """Each run's `(serving bytes, overall primary metric)`, and the indices of the Pareto set."""
    metric, higher = PRIMARY_METRIC[runs[0].task]
    points = [(float(r.plan.serving_bytes), r.overall.metrics[metric]) for r in runs]
    return points, pareto_set(points, higher)


def plot_quality_vs_memory(runs: Sequence[RunEvaluation], path: Path) -> None:
    """The overall primary metric against served embedding bytes (log scale), one point per run: the Pareto set
    filled and joined by a step line, dominated runs hollow."""
    metric, higher = PRIMARY_METRIC[runs[0].task]
    points, front = _frontier_points(runs)
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot(1, 1, 1)
    if front:
        xs, ys = [points[i][0] / 2**20 for i in front], [points[i][1] for i in front]
        ax.step(xs, ys, where="post", color="C0", alpha=0.6, label="Pareto set")
        ax.scatter(xs, ys, s=40, color="C0", zorder=3)
    dominated = [i for i in range(len(runs)) if i not in front]
    if dominated:
        ax.scatter(
            [points[i][0] / 2**20 for i in dominated],
            [points[i][1] for i in dominated],
            s=40,
            facecolors="none",
            edgecolors="C1",
            zorder=3,
            label="dominated",
        )
    for i, (r, (x, y)) in enumerate(zip(runs, points, strict=True)):
        if not math.isnan(y):
            # Past a dozen runs names overlap: each point carries its key in the report's frontier table.
            label = r.name if len(runs) <= NAMED_POINTS else str(i + 1)
            ax.annotate(label, (x / 2**20, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("served embedding MiB (log scale)")
    ax.set_ylabel(f"{metric} (overall; {'higher' if higher else 'lower'} is better)")
    ax.set_title("quality vs served memory")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_dims_vs_frequency(runs: Sequence[RunEvaluation], path: Path) -> bool:
    """For every row-level feature of every run: each row's chosen dim against its training frequency.

    Returns:
        False (and writes nothing) when no run has a row-level feature.
    """
    panels = [(r, f) for r in runs for f in r.plan.features if f.row_level]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    for i, (r, f) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        counts = r.row_counts[f.feature]
        dims = np.asarray(f.row_dims)[: counts.size]  # rows past the vocabulary are unused capacity
        ax.scatter(counts[: dims.size] + 1, dims, s=6, alpha=0.4)
        ax.set_xscale("log")
        ax.set_xlabel("training count + 1")
        ax.set_ylabel("dim")
        ax.set_title(f"{r.name}: {f.feature}", fontsize=9)
        ax.grid(alpha=0.3)
    _save(fig, path)
    return True


# ---- the report --------------------------------------------------------------------------------------------------


def render_markdown(runs: Sequence[RunEvaluation], selection: Selection, has_dims_plot: bool) -> str:
    """The text of `report.md`."""
    task = runs[0].task
    names = TASK_METRICS[task]
    primary, higher = PRIMARY_METRIC[task]
    direction = "higher is better" if higher else "lower is better"
    title = runs[0].name if len(runs) == 1 else " vs ".join(r.name for r in runs)
    out = [
        f"# Evaluation: {title}",
        "",
        f"Data: `{selection.dataset.root}`, {selection.description}; task {task}. Every run is scored on these rows, "
        "as served (tables served in fp16, int8 or int4 through TorchRec's quantised inference tables).",
        "",
        "## Runs",
        "",
        _md_table(
            [
                "run",
                "directory",
                "checkpoint",
                "method",
                "protocol",
                "trained on",
                "embedding parameters",
                "MiB",
                "served as",
                "served MiB",
            ],
            [
                [
                    r.name,
                    f"`{r.run_dir}`",
                    r.checkpoint.name,
                    r.method,
                    r.protocol,
                    _span(r.trained_days),
                    f"{r.plan.parameters:,}",
                    _mib(r.plan.bytes),
                    plan_dtypes(r.plan),
                    _mib(r.plan.serving_bytes),
                ]
                for r in runs
            ],
        ),
        "",
        "## Quality over all selected rows",
        "",
        _md_table(
            ["run", "examples", *names], [[r.name, r.overall.examples, *r.overall.metrics.values()] for r in runs]
        ),
        "",
        f"Higher {primary} is better." if higher else f"Lower {primary} is better.",
        "",
    ]
    if any(r.overall.in_training for r in runs):
        out += [
            "Rows marked * include rows the run trained on (in-sample): "
            + ", ".join(r.name for r in runs if r.overall.in_training)
            + ".",
            "",
        ]
    out += [
        "## Quality per day",
        "",
        _md_table(
            ["day", "run", "examples", *names],
            [
                [d.day + (" *" if d.in_training else ""), r.name, d.examples, *d.metrics.values()]
                for i in range(len(selection.days))
                for r in runs
                for d in [r.days[i]]
            ],
        ),
        "",
        "![quality per day](quality_per_day.png)",
        "",
        "## Ids never seen in training",
        "",
        "Lookups that fell back to row 0 of the run's vocabulary (the id was never admitted in training, or arrived "
        "when its table was full), over all selected rows, and per day.",
        "",
    ]
    features = list(runs[0].overall.lookups)
    out += [
        _md_table(
            ["run", "feature", "lookups", "unseen", "unseen %", *(d.day for d in runs[0].days)],
            [
                [
                    r.name,
                    f,
                    f"{r.overall.lookups[f]:,}",
                    f"{r.overall.unseen[f]:,}",
                    f"{100 * r.overall.unseen[f] / max(r.overall.lookups[f], 1):.2f}",
                    *(f"{d.unseen[f]:,}" for d in r.days),
                ]
                for r in runs
                for f in features
            ],
        ),
        "",
        "## Embedding memory",
        "",
        "Per table, from the plan: parameters are the stored width `ceil4(dim)` × rows, learned projections included; "
        f"MiB is them in training storage ({runs[0].plan.dtype}); served MiB is the table as serving stores it, in "
        "its dtype (rows padded to the plan's row alignment, an int8/int4 row with its 4-byte scale and bias), "
        "projections in fp32:",
        "",
        _md_table(
            ["run", "table", "feature", "rows", "dim", "stored dim", "parameters", "MiB", "dtype", "served MiB"],
            [
                [
                    r.name,
                    t.table,
                    t.feature,
                    f"{t.rows:,}",
                    t.logical_dim,
                    t.embedding_dim,
                    f"{t.parameters:,}",
                    _mib(t.bytes),
                    t.dtype,
                    _mib(t.serving_bytes),
                ]
                for r in runs
                for t in table_memory(r.plan)
            ],
        ),
        "",
        "![bytes per table](bytes_per_table.png)",
        "",
        "Per rank, the sharding planner's estimate (weights and optimizer state) in the run's last metrics record:",
        "",
    ]
    ranks = max((len(r.bytes_per_rank or []) for r in runs), default=0)
    out += [
        _md_table(
            ["run", *(f"rank {i} MiB" for i in range(ranks)), "total MiB"],
            [
                [r.name, *(_mib(b) for b in r.bytes_per_rank), _mib(sum(r.bytes_per_rank))]
                if r.bytes_per_rank
                else [r.name, *(["n/a"] * ranks), "n/a (no metrics record)"]
                for r in runs
            ],
        ),
        "",
        "## Frontier",
        "",
        f"Each run's served embedding memory and overall {primary}, by served bytes. A run is on the Pareto set "
        f"when no other run is served in no more bytes with a {primary} at least as good ({direction}) and is "
        f"strictly better in one of the two; runs with equal bytes and {primary} are both on it.",
        "",
        _frontier_table(runs),
        "",
        "![quality vs memory](quality_vs_memory.png)",
        "",
        "## Chosen dim vs row frequency",
        "",
        f"![dims vs frequency]({DIMS_PLOT})"
        if has_dims_plot
        else "No run has a row-level plan (every feature has one dim for all its rows), so there is nothing to plot.",
        "",
    ]
    return "\n".join(out)


def _frontier_table(runs: Sequence[RunEvaluation]) -> str:
    primary, _ = PRIMARY_METRIC[runs[0].task]
    points, front = _frontier_points(runs)
    largest = max(b for b, _ in points)
    order = sorted(range(len(runs)), key=lambda i: (points[i][0], i))
    return _md_table(
        ["key", "run", "served as", "served MiB", "of largest", primary, "Pareto set"],
        [
            [
                i + 1,
                runs[i].name,
                plan_dtypes(runs[i].plan),
                _mib(points[i][0]),
                f"{points[i][0] / largest:.3f}" if largest > 0 else "n/a",
                "n/a" if math.isnan(points[i][1]) else f"{points[i][1]:.6f}",  # enough digits to tell close runs apart
                "yes" if i in front else "no",
            ]
            for i in order
        ],
    )


def _span(days: list[str]) -> str:
    if not days:
        return "nothing yet"
    return days[0] if len(days) == 1 else f"{days[0]} .. {days[-1]} ({len(days)} days)"


def write_report(runs: Sequence[RunEvaluation], selection: Selection, out: Path) -> list[str]:
    """Write `report.md`, the plots and the Parquet tables into `out`, atomically (temp dir + rename).

    Returns:
        The names of the files written.
    """
    check_output_dir(out, kind=REPORT_OUTPUT, overwrite=True)
    with atomic_directory(out, overwrite=True) as tmp:
        plot_quality_per_day(runs, tmp / PLOTS[0])
        plot_bytes_per_table(runs, tmp / PLOTS[1])
        plot_quality_vs_memory(runs, tmp / PLOTS[2])
        has_dims = plot_dims_vs_frequency(runs, tmp / DIMS_PLOT)
        metrics_frame(runs).write_parquet(tmp / "metrics.parquet")
        unseen_frame(runs).write_parquet(tmp / "unseen.parquet")
        (tmp / REPORT).write_text(render_markdown(runs, selection, has_dims))
        files = sorted(p.name for p in tmp.iterdir())
    return files


def _check_run_dir(path: Path) -> None:
    """Fail before any scoring when a run directory, its config or its checkpoint is missing (a bundle directory
    is verified when it is opened)."""
    fix = "pass a run directory written by jobs.train (<train.out_dir>/<train.name>, e.g. runs/demo) or a bundle"
    if (path / MANIFEST).is_file():
        return
    if not path.is_dir():
        raise EvaluationError(f"{path}: no such run directory. Fix: {fix}")
    if not (path / "config.yaml").is_file():
        raise EvaluationError(f"{path}: not a run directory (no config.yaml). Fix: {fix}")
    if latest_checkpoint(path / "checkpoints") is None:
        raise EvaluationError(
            f"{path}: the run has no complete checkpoint (checkpoints/*/ with a done marker). Fix: train with "
            "train.checkpoint=true (the default) and let at least one day finish, or resume the run with --resume"
        )


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


def evaluate(
    run_dirs: Sequence[str | Path],
    *,
    days: str | None = None,
    split: str | None = None,
    out: str | Path | None = None,
    data_path: str | Path | None = None,
    batch_size: int = 8192,
) -> EvaluationReport:
    """Score every run on the rows the first run selects and write the report.

    Args:
        run_dirs: run directories; the first one selects the data and names the default `out`.
        days: `--days` (see `parse_days`), or None.
        split: `train`, `valid` or `test` of the first run's static protocol, or None.
        out: the report directory (replaced as a whole); default `reports/<first run>`.
        data_path: score on this dataset (same spec) instead of the first run's `data.path`.
        batch_size: rows per forward pass.

    Returns:
        Where the report went and what it says.

    Raises:
        EvaluationError: a missing run, bad days, an unknown split, runs on different datasets.
        DatasetError: a run's checkpoint, plan or vocabulary cannot be read; or `out` is, contains or lies inside a
            run or its data, or exists and is not a report (checked before any scoring; see `check_output_dir`).
    """
    paths = list(dict.fromkeys(Path(p) for p in run_dirs))
    if not paths:
        raise EvaluationError("no run to evaluate. Fix: pass --run runs/<name> (and optionally --compare runs/a ...)")
    if batch_size < 1:
        raise EvaluationError(f"--batch-size is {batch_size}; it must be >= 1")
    for p in paths:
        _check_run_dir(p)
    names = _run_names(paths)
    out_dir = Path(out) if out is not None else Path("reports") / names[0].replace("/", "-")
    # The report replaces out_dir whole: never a run, a dataset or anything but an earlier report.
    protected: dict[str, Path] = {}
    for i, p in enumerate(paths):
        protected.update(run_inputs(p, "--run" if i == 0 else "--compare" if len(paths) == 2 else f"--compare #{i}"))
    if data_path is not None:
        protected["--data"] = Path(data_path)
    check_output_dir(out_dir, kind=REPORT_OUTPUT, protected=protected, overwrite=True)
    results: list[RunEvaluation] = []
    selection: Selection | None = None
    for path, name in zip(paths, names, strict=True):
        # One run in memory at a time; a bundle is scored through the tables it serves.
        run = load_bundle(path).as_run(data_path) if (path / MANIFEST).is_file() else load_run(path, data_path)
        if selection is None:
            selection = select_data(run, days, split)
            logger.info("scoring on %s", selection.description)
        else:
            _check_same_data(run, selection)
        results.append(evaluate_run(run, selection, name, batch_size))
        del run
    assert selection is not None
    files = write_report(results, selection, out_dir)
    return EvaluationReport(out_dir, selection, results, files)


def _check_same_data(run: LoadedRun, selection: Selection) -> None:
    first, other = selection.dataset.spec, run.dataset.spec
    if (first.feature_names, first.task, first.num_classes, first.label) != (
        other.feature_names,
        other.task,
        other.num_classes,
        other.label,
    ):
        raise EvaluationError(
            f"{run.run_dir} was trained on {run.dataset.root} (features {other.feature_names}, task {other.task}), "
            f"but the runs are scored on {selection.dataset.root} (features {first.feature_names}, task {first.task}). "
            "Fix: compare runs trained on the same dataset"
        )
    if run.dataset.root.resolve() != selection.dataset.root.resolve():
        logger.warning("%s was trained on %s; scoring it on %s", run.run_dir, run.dataset.root, selection.dataset.root)


def print_summary(report: EvaluationReport) -> None:
    """The overall table, then where the report is."""
    names = TASK_METRICS[report.runs[0].task]
    header = (
        f"{'run':<24}{'examples':>10}"
        + "".join(f"{m:>10}" for m in names)
        + f"{'emb MiB':>10}{'served':>11}{'served MiB':>11}{'unseen %':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in report.runs:
        lookups, unseen = sum(r.overall.lookups.values()), sum(r.overall.unseen.values())
        print(
            f"{r.name:<24}{r.overall.examples:>10,}"
            + "".join(f"{_fmt(r.overall.metrics[m]):>10}" for m in names)
            + f"{r.plan.bytes / 2**20:>10.3f}{plan_dtypes(r.plan):>11}{r.plan.serving_bytes / 2**20:>11.3f}"
            + f"{100 * unseen / max(lookups, 1):>10.2f}"
        )
    print(f"report: {report.out / 'report.md'}  ({', '.join(report.files)})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.evaluate",
        description="Score finished runs per day and overall; write report.md, plots and metrics.parquet.",
    )
    parser.add_argument(
        "--run",
        type=Path,
        help="the run directory (runs/<name>) or an export bundle (scored as served); it selects the data",
    )
    parser.add_argument(
        "--compare", type=Path, nargs="+", default=[], help="more run directories or bundles, side by side"
    )
    parser.add_argument("--days", help="days A..B (dates YYYY-MM-DD or 1-based numbers; A.., ..B and A work too)")
    parser.add_argument("--split", help="train, valid or test split of the first run's static protocol")
    parser.add_argument(
        "--out", type=Path, help="report directory (default reports/<run name>); replaces only an earlier report"
    )
    parser.add_argument("--data", type=Path, help="score on this dataset (same spec) instead of the run's data.path")
    parser.add_argument("--batch-size", type=int, default=8192, help="rows per forward pass")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    runs = ([args.run] if args.run is not None else []) + list(args.compare)
    try:
        report = evaluate(
            runs, days=args.days, split=args.split, out=args.out, data_path=args.data, batch_size=args.batch_size
        )
    except (EvaluationError, DatasetError, PlanError, ConfigError, ModelConfigError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_summary(report)


if __name__ == "__main__":
    main()
