"""CIESS in the training job on 2 ranks: the static protocol (supernet → search → derived bucket tables retrained)
and the stream (a search step after every day), each plan exactly the budget; a stream cut after its first
reconfiguration and resumed equals the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.train import plan_digest, table_capacities
from pipeline.dataset import Dataset
from sharding.plan import DimensionPlan
from tests.helpers import metrics_records, run_train_job, tiny_job_args

pytestmark = pytest.mark.multirank


def _args(data: Path) -> tuple[list[str], int]:
    capacity = table_capacities(Dataset(data), None)
    others = sum(n for f, n in capacity.items() if f not in ("user", "item"))
    budget = 8 * others + 12 * (capacity["user"] + capacity["item"])  # a mean of 12 of d_max 16 per row
    common = [
        "search.method=ciess", "search.dim=16", "search.other_dim=8", f"search.budget={budget}",
        "search.ciess.batch=256", "search.ciess.hidden=32", "search.ciess.env_batches=2", "search.ciess.updates=2",
    ]  # fmt: skip
    return common, budget


def test_ciess_static_search_derives_an_exact_plan_and_retrains_it(data: Path, tmp_path: Path) -> None:
    common, budget = _args(data)
    args = [*common, "data.protocol=per-user", "search.ciess.episodes=2", "search.ciess.iterations=3"]
    run = run_train_job(tiny_job_args(data, tmp_path, "static", *args))
    assert run.returncode == 0, run.stderr[-3000:]
    records = metrics_records(tmp_path / "static")
    assert [(r["phase"], r.get("epoch")) for r in records] == [("search", 0), ("train", 0), ("final", None)]
    plan = DimensionPlan.load(tmp_path / "static" / "plan")
    assert plan.parameters == plan.logical_parameters == budget  # exactly the budget, stored = searched
    assert records[1]["embedding_parameters"] == budget and records[2]["embedding_parameters"] == budget
    for f in ("user", "item"):
        dims = np.asarray(plan[f].row_dims)
        assert dims.min() >= 4 and dims.max() <= 16 and not (dims % 4).any()
    assert len(np.unique(np.concatenate([plan["user"].row_dims, plan["item"].row_dims]))) > 1  # a real allocation
    assert plan.provenance["method"] == "ciess" and "CIESS derived plan" in run.stderr
    state = torch.load(tmp_path / "static" / "checkpoints" / "unit-000006" / "searcher.pt", weights_only=False)
    assert len(state["searcher"]["history"]) == 6  # episodes × iterations, each a scored plan

    # Cut right after its first reconfiguration (the search phase's 3 units end with the derived plan, rebuilt
    # from scratch), then resumed: the same plan and the same records.
    cut = run_train_job(tiny_job_args(data, tmp_path, "cut", *args, "train.max_units=3"))
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert DimensionPlan.load(tmp_path / "cut" / "checkpoints" / "unit-000003" / "plan").provenance["method"] == "ciess"
    resumed = run_train_job(tiny_job_args(data, tmp_path, "cut", *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = metrics_records(tmp_path / "cut")
    assert [r["phase"] for r in again] == [r["phase"] for r in records]
    for a, b in zip(again, records, strict=True):
        assert a["eval"] == pytest.approx(b["eval"], rel=1e-6)
    assert plan_digest(DimensionPlan.load(tmp_path / "cut" / "plan")) == plan_digest(plan)


def test_ciess_on_a_stream_resumes_as_if_never_cut(data: Path, tmp_path: Path) -> None:
    common, budget = _args(data)
    args = [*common, "search.ciess.day_iterations=2"]
    whole = run_train_job(tiny_job_args(data, tmp_path, "whole", *args))
    assert whole.returncode == 0, whole.stderr[-3000:]
    days = metrics_records(tmp_path / "whole")
    assert all(d["embedding_parameters"] == budget for d in days)
    assert days[0]["reconfigured"]
    cut = run_train_job(tiny_job_args(data, tmp_path, "cut", *args, "data.days=1"))
    assert cut.returncode == 0, cut.stderr[-3000:]
    resumed = run_train_job(tiny_job_args(data, tmp_path, "cut", *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = metrics_records(tmp_path / "cut")
    for a, b in zip(again, days, strict=True):
        assert a["eval"] == pytest.approx(b["eval"], rel=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    assert plan_digest(DimensionPlan.load(tmp_path / "cut" / "plan")) == plan_digest(
        DimensionPlan.load(tmp_path / "whole" / "plan")
    )
