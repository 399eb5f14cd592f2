"""Offline evaluation (`jobs.evaluate`) of three real runs trained under `torchrun` (2 gloo ranks) on one tiny stream.

The runs: `d16` (prequential, `search.dim=16`), `d8` (random 80/10/10 split, `search.dim=8`) and `d16q` (`d16`
served in int8: `search.dtype=int8`), all trained on the first 2 of 3 days, so day 3 brings ids they never saw. The
job's numbers are checked against a slow reference (batch by batch, then `models.metrics`; the int8 run through
`jobs.export.served_model`), its unseen-id counts against a direct count over the raw ids, the `--compare` report's
files and memory against the plans, and its frontier against a brute-force Pareto set.
"""

from __future__ import annotations

import math
import random
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from jobs.evaluate import (
    OVERALL,
    DayEvaluation,
    RunEvaluation,
    evaluate,
    main,
    pareto_set,
    plan_dtypes,
    plot_dims_vs_frequency,
    table_memory,
)
from jobs.export import served_model
from jobs.runs import load_run
from models import metrics
from pipeline.splits import assign_splits
from pipeline.stream import DayStream, StreamConfig
from pipeline.synthetic import SyntheticConfig, write_synthetic
from sharding.embedding import RowRemap
from sharding.plan import DimensionPlan, FeaturePlan, row_bytes
from tests.helpers import launch_train_job, tiny_job_args

pytestmark = pytest.mark.multirank
REPO = Path(__file__).resolve().parents[1]
DAYS = ["2024-01-01", "2024-01-02", "2024-01-03"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _launch(data: Path, out: Path, name: str, *extra: str) -> subprocess.Popen[str]:
    return launch_train_job(tiny_job_args(data, out, name, "data.days=2", *extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three runs trained side by side (most of a launch is imports, so they overlap well on 2 cores)."""
    root = tmp_path_factory.mktemp("evaluate")
    cfg = SyntheticConfig(days=3, rows_per_day=2000, users=400, items=300, fields=4, field_cardinality=60, dense=2)
    data = write_synthetic(cfg, root / "data")
    procs = {
        "d16": _launch(data, root / "runs", "d16", "search.dim=16"),
        "d8": _launch(data, root / "runs", "d8", "search.dim=8", "data.protocol=random"),
        # Table-wise, as planned before small tables were replicated by default: replicated (initialised and
        # trained otherwise), one day's AUC moved by only 8e-7 in int8, under the 1e-6 the metrics are matched to,
        # so the int8 check below could not tell that day apart.
        "d16q": _launch(
            data, root / "runs", "d16q", "search.dim=16", "search.dtype=int8", "sharding.data_parallel_max_bytes=0"
        ),
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
    return {name: root / "runs" / name for name in procs}


def _reference(
    run_dir: Path, split: str | None = None, served: bool = False
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Slow and plain: per day, small batches one at a time, logits and labels concatenated; plus the row count.
    `served`: through `served_model(run.model, run.plan)` (quantised tables), else the trained fp32 model."""
    run = load_run(run_dir)
    model = served_model(run.model, run.plan) if served else run.model
    row_filter = None
    if split is not None:
        fractions = tuple(run.cfg.data.fractions) if run.cfg.data.fractions else None
        row_filter = assign_splits(
            run.dataset,
            run.cfg.data.protocol,  # type: ignore[arg-type]
            fractions=fractions,  # type: ignore[arg-type]
            seed=run.cfg.data.split_seed,
        ).row_filter(split)
    stream = DayStream(run.dataset, run.vocab, StreamConfig(batch_size=333, prefetch=0), row_filter=row_filter)
    remap = RowRemap(run.plan)
    per_day = []
    for day in run.dataset.days:
        logits, labels = [], []
        for batch in stream.batches(day, grow=False):
            batch.sparse_features = remap(batch.sparse_features)
            with torch.no_grad():
                _, (_, out, y) = model(batch)
            logits.append(out)
            labels.append(y)
        per_day.append((torch.cat(logits), torch.cat(labels)))
    rows = sum(int(row_filter(d).sum()) if row_filter else d.num_rows for d in run.dataset.days)
    return per_day, rows


def _binary(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {
        "auc": float(metrics.auc(logits, labels)),
        "log_loss": float(metrics.log_loss(logits, labels)),
        "accuracy": float(metrics.accuracy(logits, labels)),
    }


def _assert_metrics(got: dict[str, float], expected: dict[str, float], rtol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    torch.testing.assert_close(
        torch.tensor(list(got.values()), dtype=torch.float64),
        torch.tensor(list(expected.values()), dtype=torch.float64),
        rtol=rtol,
        atol=1e-6,
    )


def test_metrics_equal_a_slow_reference_per_day_and_overall(runs: dict[str, Path], tmp_path: Path) -> None:
    report = evaluate([runs["d16"]], days="1..3", out=tmp_path / "d16", batch_size=4096)
    (result,) = report.runs
    reference, rows = _reference(runs["d16"])
    assert [d.day for d in result.days] == DAYS
    for day, (logits, labels) in zip(result.days, reference, strict=True):
        assert day.examples == labels.numel() == 2000
        _assert_metrics(day.metrics, _binary(logits, labels))
    everything = _binary(torch.cat([r[0] for r in reference]), torch.cat([r[1] for r in reference]))
    _assert_metrics(result.overall.metrics, everything)
    assert result.overall.examples == rows == 6000
    assert 0.55 < result.overall.metrics["auc"] < 1.0  # it learned the planted signal
    # The prequential run trained on every row of days 1-2: in-sample, and no unseen ids there.
    assert [d.in_training for d in result.days] == [True, True, False]
    assert all(n == 0 for d in result.days[:2] for n in d.unseen.values())
    # metrics.parquet holds the same numbers.
    frame = pl.read_parquet(report.out / "metrics.parquet")
    auc = frame.filter(pl.col("metric") == "auc").sort("day")
    assert auc.get_column("day").to_list() == [*DAYS, OVERALL]
    assert auc.get_column("value").to_list() == [*(d.metrics["auc"] for d in result.days), everything["auc"]]

    # A run on a static split is scored on its test split by default, again equal to the reference.
    static = evaluate([runs["d8"]], out=tmp_path / "d8", batch_size=4096)
    assert static.selection.split == "test"
    split_reference, test_rows = _reference(runs["d8"], "test")
    _assert_metrics(
        static.runs[0].overall.metrics,
        _binary(torch.cat([r[0] for r in split_reference]), torch.cat([r[1] for r in split_reference])),
    )
    assert static.runs[0].overall.examples == test_rows and 0 < test_rows < 6000
    assert not any(d.in_training for d in static.runs[0].days)  # held-out rows of the run's own split


def test_compare_two_runs_side_by_side(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "reports" / "cmp"
    main(["--run", str(runs["d16"]), "--compare", str(runs["d8"]), "--days", "2024-01-01..", "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed and "d16" in printed and "d8" in printed

    plans = {name: DimensionPlan.load(runs[name] / "plan") for name in ("d16", "d8")}
    assert plans["d8"].parameters * 2 == plans["d16"].parameters
    text = (out / "report.md").read_text()
    assert "# Evaluation: d16 vs d8" in text
    for name, plan in plans.items():
        assert f"| {name} | `{runs[name]}` |" in text
        assert f"{plan.parameters:,}" in text
    assert "| d8 | t_user | user | 393 | 8 | 8 | 3,144 |" in text  # per table: rows × stored dim
    assert "rank 1 MiB" in text  # per rank, from metrics.jsonl
    assert "No run has a row-level plan" in text

    pngs = ["quality_per_day.png", "bytes_per_table.png", "quality_vs_memory.png"]
    for png in pngs:
        assert f"]({png})" in text
        head = (out / png).read_bytes()[:24]
        assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
        assert int.from_bytes(head[16:20], "big") > 100 and int.from_bytes(head[20:24], "big") > 100
    assert sorted(p.name for p in out.iterdir()) == sorted([*pngs, "report.md", "metrics.parquet", "unseen.parquet"])
    assert [p.name for p in out.parent.iterdir()] == ["cmp"]  # nothing left of the temp dir

    frame = pl.read_parquet(out / "metrics.parquet")
    assert frame.columns == ["run", "day", "metric", "value", "examples"]
    assert frame.height == 2 * 4 * 3
    expected = {(r, d, m) for r in ("d16", "d8") for d in [*DAYS, OVERALL] for m in ("auc", "log_loss", "accuracy")}
    assert set(frame.select("run", "day", "metric").iter_rows()) == expected
    examples = frame.filter(pl.col("metric") == "auc").select("day", "examples").unique().sort("day")
    assert examples.rows() == [*((d, 2000) for d in DAYS), (OVERALL, 6000)]


def test_ids_unseen_in_training_are_counted(runs: dict[str, Path], tmp_path: Path) -> None:
    report = evaluate([runs["d16"], runs["d8"]], days="3", out=tmp_path / "day3")
    assert [d.name for d in report.selection.days] == ["2024-01-03"]
    for result in report.runs:
        run = load_run(result.run_dir)
        df = run.dataset.read_day(run.dataset.days[2])
        direct = {}
        for f in run.dataset.spec.sparse:
            ids = df.get_column(f.column)
            ids = ids.explode(empty_as_null=False).drop_nulls() if f.multi_hot else ids
            direct[f.name] = int(np.count_nonzero(~np.isin(ids.to_numpy(), run.vocab[f.name].raw_ids)))
        assert result.overall.unseen == result.days[0].unseen == direct, result.name
        assert direct["user"] > 0 and direct["item"] > 0 and sum(direct.values()) > 0
        assert result.overall.lookups["user"] == 2000
    unseen = pl.read_parquet(report.out / "unseen.parquet")
    d16 = unseen.filter((pl.col("run") == "d16") & (pl.col("day") == OVERALL))
    assert dict(d16.select("feature", "unseen").rows()) == report.runs[0].overall.unseen
    assert "## Ids never seen in training" in (report.out / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--run", "{root}/nope"], "no such run directory"),
        (["--run", "{empty}"], "no complete checkpoint"),
        (["--run", "{d16}", "--days", "2..5"], "day number 5 is outside the dataset; the dataset"),
        (["--run", "{d16}", "--days", "2024-02-01"], "day 2024-02-01 is not in the dataset"),
        (["--run", "{d16}", "--days", "3..1"], "the range is empty"),
        (["--run", "{d8}", "--split", "tset"], "--split 'tset' is not a split. Fix: choose one of train, valid, test"),
        (["--run", "{d16}", "--split", "test"], "was trained prequentially"),
        (["--run", "{d16}", "--out", "{d8}"], "exists and is not a report directory"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((runs["d16"] / "config.yaml").read_text())
    where = {"root": tmp_path, "empty": empty, "d16": runs["d16"], "d8": runs["d8"]}
    with pytest.raises(SystemExit) as exit_:
        main([a.format(**where) for a in args])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and message in stderr, stderr
    assert (runs["d8"] / "config.yaml").is_file()  # --out never replaced the run


def test_dims_vs_frequency_plot_for_row_level_plans(tmp_path: Path) -> None:
    rows = 50
    counts = np.arange(rows, dtype=np.int64)[::-1].copy()
    row_dims = np.where(counts > 25, 8, 4)
    plan = DimensionPlan(
        (
            FeaturePlan("user", rows, 8, row_dims=row_dims),
            FeaturePlan("item", 10, 4, dim=4),
        )
    )
    day = DayEvaluation("2024-01-01", 10, {"auc": 0.7, "log_loss": 0.5, "accuracy": 0.7}, {"user": 10}, {"user": 1})
    result = RunEvaluation(
        "row", tmp_path, tmp_path, "fixed", "prequential", "binary", plan, [day], day, None, [], {"user": counts}
    )
    assert plot_dims_vs_frequency([result], tmp_path / "dims.png")
    assert (tmp_path / "dims.png").read_bytes()[:8] == PNG_MAGIC
    field_only = DimensionPlan((FeaturePlan("item", 10, 4, dim=4),))
    result.plan = field_only
    assert not plot_dims_vs_frequency([result], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def _pareto_brute_force(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Straight from the definition, O(n²): no other point has bytes <= and quality at least as good, strictly
    better in one; nan quality is never on the set and dominates nothing."""

    def at_least(a: float, b: float) -> bool:
        return a >= b if higher_is_better else a <= b

    def dominates(j: int, i: int) -> bool:
        (bj, qj), (bi, qi) = points[j], points[i]
        return bj <= bi and at_least(qj, qi) and (bj < bi or qj != qi)

    def dominated(i: int) -> bool:
        return any(j != i and not math.isnan(points[j][1]) and dominates(j, i) for j in range(len(points)))

    kept = [i for i, (_, q) in enumerate(points) if not math.isnan(q) and not dominated(i)]
    return sorted(kept, key=lambda i: (points[i][0], i))


def test_pareto_set_equals_a_brute_force_reference() -> None:
    # By hand: equal points both stay; a cheaper point as good as a dearer one dominates it.
    points = [(1.0, 0.7), (1.0, 0.7), (2.0, 0.8), (2.0, 0.6), (3.0, 0.8), (0.5, math.nan)]
    assert pareto_set(points, higher_is_better=True) == [0, 1, 2]
    assert pareto_set(points, higher_is_better=False) == [0, 1, 3]  # lower is better: (2, 0.8) and (3, 0.8) lose
    assert pareto_set([(3.0, 0.5), (1.0, 0.5), (2.0, 0.4)], higher_is_better=False) == [1, 2]
    assert pareto_set([], higher_is_better=True) == []
    rng = random.Random(0)
    sizes = []
    for trial in range(600):
        n = rng.randint(1, 14)
        if trial % 2:  # few distinct values: many ties in bytes, in quality and in both
            points = [(float(rng.randint(1, 4) * 2**20), rng.choice([0.6, 0.7, 0.8, math.nan])) for _ in range(n)]
        else:
            points = [(rng.uniform(1e3, 1e9), rng.uniform(0.5, 0.9)) for _ in range(n)]
        for higher in (True, False):
            got = pareto_set(points, higher)
            assert got == _pareto_brute_force(points, higher), (points, higher)
            sizes.append(len(got))
    assert min(sizes) == 0 and max(sizes) >= 5  # the draws cover all-nan sets and long frontiers


def test_table_memory_sums_to_the_plan_in_mixed_dtypes() -> None:
    rows = 50
    counts = np.arange(rows, dtype=np.int64)[::-1].copy()
    plan = DimensionPlan(
        (
            FeaturePlan("user", rows, 8, row_dims=np.where(counts > 25, 8, 4), projection="linear", dtype="int4"),
            FeaturePlan("item", 10, 6, dim=6),
            FeaturePlan("tag", 7, 12, dim=12, dtype="fp16"),
        )
    )
    tables = table_memory(plan)
    assert sum(t.serving_bytes for t in tables) == plan.serving_bytes
    assert sum(t.parameters for t in tables) == plan.parameters
    assert sum(t.bytes for t in tables) == plan.bytes
    by_name = {t.table: t for t in tables}
    # int4 rows of 4 or 8 columns: 2 or 4 bytes + 4 (scale, bias), aligned to 16; the linear maps (dim × 8) in fp32.
    user = [t for t in tables if t.feature == "user"]
    assert [(t.logical_dim, t.dtype) for t in user] == [(4, "int4"), (8, "int4")]
    assert [t.serving_bytes for t in user] == [t.rows * 16 + 4 * t.logical_dim * 8 for t in user]
    assert sum(t.rows for t in user) == rows
    assert (by_name["t_item"].dtype, by_name["t_item"].serving_bytes) == ("fp32", 10 * 32)  # 8 stored columns × 4
    assert (by_name["t_tag"].dtype, by_name["t_tag"].serving_bytes) == ("fp16", 7 * 32)  # 12 × 2 = 24 -> 32
    assert plan_dtypes(plan) == "fp32+fp16+int4"
    assert plan_dtypes(plan.with_dtypes({"user": "fp32", "tag": "fp32"})) == "fp32"
    assert plan_dtypes(plan.with_dtypes("int8")) == "int8"


def _section_rows(text: str, title: str) -> list[list[str]]:
    """The cells of the first markdown table under `## title`."""
    lines = text.split(f"\n## {title}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    stop = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2 : stop]]  # past the rule


def test_quantised_run_is_scored_as_served(runs: dict[str, Path], tmp_path: Path) -> None:
    report = evaluate([runs["d16"], runs["d16q"], runs["d8"]], days="1..3", out=tmp_path / "q", batch_size=4096)
    d16, d16q, _ = report.runs
    assert set(d16q.plan.dtypes.values()) == {"int8"} and set(d16.plan.dtypes.values()) == {"fp32"}
    fp32_run = load_run(runs["d16"])
    assert served_model(fp32_run.model, fp32_run.plan) is fp32_run.model  # an fp32 plan: the trained model itself

    # The int8 run's scores are the served model's, on the same rows, per day and overall.
    served, rows = _reference(runs["d16q"], served=True)
    assert d16q.overall.examples == rows == 6000
    for day, (logits, labels) in zip(d16q.days, served, strict=True):
        _assert_metrics(day.metrics, _binary(logits, labels), rtol=0.0)
    served_all = _binary(torch.cat([r[0] for r in served]), torch.cat([r[1] for r in served]))
    _assert_metrics(d16q.overall.metrics, served_all, rtol=0.0)
    # ... and not the trained fp32 model's: int8 rows move the logits, a little.
    fp32, _ = _reference(runs["d16q"])
    fp32_logits, served_logits = torch.cat([r[0] for r in fp32]), torch.cat([r[0] for r in served])
    assert 1e-4 < float((fp32_logits - served_logits).abs().max()) < 0.5
    fp32_all = _binary(fp32_logits, torch.cat([r[1] for r in fp32]))
    # The trained fp32 model's scores miss the reported ones, per day and overall, by more than the 1e-6 the served
    # model's meet (each miss: the largest metric difference of that day).
    fp32_scores = [_binary(logits, labels) for logits, labels in fp32]
    misses = [
        max(abs(expected[m] - got.metrics[m]) for m in expected)
        for expected, got in zip([*fp32_scores, fp32_all], [*d16q.days, d16q.overall], strict=True)
    ]
    assert min(misses) > 1e-6 and max(misses) > 2e-5, misses
    assert max(misses) < 0.02  # int8 moves the scores only a little
    # Memory: the same rows served in int8 (16 + 4 bytes -> 32 per row) take half of fp32's 64.
    assert [t.num_embeddings for t in d16q.plan.tables()] == [t.num_embeddings for t in d16.plan.tables()]
    assert d16q.plan.serving_bytes * 2 == d16.plan.serving_bytes == d16.plan.bytes
    for result in report.runs:
        tables = table_memory(result.plan)
        assert sum(t.serving_bytes for t in tables) == result.plan.serving_bytes
        assert sum(t.bytes for t in tables) == result.plan.bytes
        assert all(t.serving_bytes == t.rows * row_bytes(t.embedding_dim, t.dtype) for t in tables)
    text = (report.out / "report.md").read_text()
    memory = _section_rows(text, "Embedding memory")
    user = next(t for t in table_memory(d16q.plan) if t.feature == "user")
    assert ["d16q", "t_user", "user", f"{user.rows:,}", "16", "16", f"{user.parameters:,}"] in [r[:7] for r in memory]
    assert ["d16q", "t_user", "int8", f"{user.serving_bytes / 2**20:.3f}"] in [[r[0], r[1], r[8], r[9]] for r in memory]

    # The frontier: by served bytes, each run's dtype, MiB, share of the largest, AUC and Pareto membership.
    frontier = _section_rows(text, "Frontier")
    points = [(float(r.plan.serving_bytes), r.overall.metrics["auc"]) for r in report.runs]
    front = _pareto_brute_force(points, higher_is_better=True)
    order = sorted(range(3), key=lambda i: (points[i][0], i))
    largest = max(b for b, _ in points)
    assert frontier == [
        [
            str(i + 1),  # the key the plot labels points with past a dozen runs
            report.runs[i].name,
            plan_dtypes(report.runs[i].plan),
            f"{points[i][0] / 2**20:.3f}",
            f"{points[i][0] / largest:.3f}",
            f"{points[i][1]:.6f}",
            "yes" if i in front else "no",
        ]
        for i in order
    ]
    assert [row[2] for row in frontier if row[1] == "d16q"] == ["int8"]
    assert [row[2] for row in frontier if row[1] == "d16"] == ["fp32"]
    assert [row[4] for row in frontier if row[1] == "d16q"] == ["0.500"]  # d16 (fp32, dim 16) is the largest
    assert frontier[0][6] == "yes"  # the cheapest run is always on the set
    # The runs table says how each run is served.
    served_as = {row[0]: row[-2:] for row in _section_rows(text, "Runs")}
    assert served_as == {r.name: [plan_dtypes(r.plan), f"{r.plan.serving_bytes / 2**20:.3f}"] for r in report.runs}
