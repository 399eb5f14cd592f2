"""MD in the training job on 2 ranks: every day's plan within the budget with learned projections, and a stream cut
after its first reconfiguration and resumed equals the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.train import plan_digest, table_capacities
from pipeline.dataset import Dataset
from sharding.plan import DimensionPlan
from tests.helpers import metrics_records, run_train_job, tiny_job_args

pytestmark = pytest.mark.multirank


def test_md_stream_stays_within_budget_and_resumes_as_if_never_cut(data: Path, tmp_path: Path) -> None:
    capacity = table_capacities(Dataset(data), None)
    budget = 12 * sum(capacity.values())
    args = ["search.method=md", "search.dim=16", f"search.budget={budget}", "search.md.alpha=0.5"]
    whole = run_train_job(tiny_job_args(data, tmp_path, "whole", *args))
    assert whole.returncode == 0, whole.stderr[-3000:]
    days = metrics_records(tmp_path / "whole")
    assert all(0 <= budget - d["embedding_parameters"] < 64 for d in days)  # type: ignore[operator]
    assert days[0]["reconfigured"]
    plan = DimensionPlan.load(tmp_path / "whole" / "plan")
    for f in ("user", "item"):
        assert plan[f].projection == "linear" and len(np.unique(plan[f].row_dims)) > 1
    assert plan.provenance["method"] == "md"
    cut = run_train_job(tiny_job_args(data, tmp_path, "cut", *args, "data.days=1"))
    assert cut.returncode == 0, cut.stderr[-3000:]
    resumed = run_train_job(tiny_job_args(data, tmp_path, "cut", *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for a, b in zip(metrics_records(tmp_path / "cut"), days, strict=True):
        assert a["eval"] == pytest.approx(b["eval"], rel=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    assert plan_digest(DimensionPlan.load(tmp_path / "cut" / "plan")) == plan_digest(plan)
