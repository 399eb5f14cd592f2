"""Offline evaluation (`jobs.evaluate`) of two real runs trained under `torchrun` (2 gloo ranks) on one tiny stream.

The runs: `d16` (prequential, `search.dim=16`) and `d8` (random 80/10/10 split, `search.dim=8`), both trained on
the first 2 of 3 days, so day 3 brings ids they never saw. The job's numbers are checked against a slow reference
(batch by batch, then `models.metrics`), its unseen-id counts against a direct count over the raw ids, and the
`--compare` report's files and memory against the plans.
"""

from __future__ import annotations

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
    plot_dims_vs_frequency,
)
from jobs.runs import load_run
from models import metrics
from pipeline.splits import assign_splits
from pipeline.stream import DayStream, StreamConfig
from pipeline.synthetic import SyntheticConfig, write_synthetic
from sharding.embedding import RowRemap
from sharding.plan import DimensionPlan, FeaturePlan
from tests.helpers import launch_train_job, tiny_job_args

pytestmark = pytest.mark.multirank
REPO = Path(__file__).resolve().parents[1]
DAYS = ["2024-01-01", "2024-01-02", "2024-01-03"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _launch(data: Path, out: Path, name: str, *extra: str) -> subprocess.Popen[str]:
    return launch_train_job(tiny_job_args(data, out, name, "data.days=2", *extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two runs trained side by side (most of a launch is imports, so they overlap well on 2 cores)."""
    root = tmp_path_factory.mktemp("evaluate")
    cfg = SyntheticConfig(days=3, rows_per_day=2000, users=400, items=300, fields=4, field_cardinality=60, dense=2)
    data = write_synthetic(cfg, root / "data")
    procs = {
        "d16": _launch(data, root / "runs", "d16", "search.dim=16"),
        "d8": _launch(data, root / "runs", "d8", "search.dim=8", "data.protocol=random"),
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
    return {name: root / "runs" / name for name in procs}


def _reference(run_dir: Path, split: str | None = None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Slow and plain: per day, small batches one at a time, logits and labels concatenated; plus the row count."""
    run = load_run(run_dir)
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
                _, (_, out, y) = run.model(batch)
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


def _assert_metrics(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() == expected.keys()
    torch.testing.assert_close(
        torch.tensor(list(got.values()), dtype=torch.float64),
        torch.tensor(list(expected.values()), dtype=torch.float64),
        rtol=1e-5,
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

    plans = {name: DimensionPlan.load(path / "plan") for name, path in runs.items()}
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
