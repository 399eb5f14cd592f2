"""SCALL learning its policy in the training job: 2 gloo ranks under `torchrun` on a tiny synthetic stream.

Every day the policy steps on the job's environment (the day's held-out batches), every plan spends exactly the
budget, and a run cut after its first reconfiguration and resumed equals an uninterrupted one (plans, metrics,
the agent in the last checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.config import load_config
from jobs.train import build_searcher, plan_digest, table_capacities
from pipeline.dataset import Dataset
from pipeline.synthetic import SyntheticConfig, write_synthetic
from search.scall import ScallSearcher
from sharding.plan import DimensionPlan
from tests.helpers import REPO, metrics_records, run_train_job, tiny_job_args

pytestmark = pytest.mark.multirank

ENV_STEPS, ENV_BATCHES = 3, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 3000 rows a day per rank: 6 batches of 500, the last ENV_BATCHES held out for the environment.
    cfg = SyntheticConfig(days=3, rows_per_day=6000, users=400, items=300, fields=4, field_cardinality=60, dense=2)
    return write_synthetic(cfg, tmp_path_factory.mktemp("synthetic") / "data")


def _budget(data: Path) -> int:
    capacity = table_capacities(Dataset(data), None)
    others = sum(n for f, n in capacity.items() if f not in ("user", "item")) * 16
    return others + (capacity["user"] + capacity["item"]) * 8


def _args(data: Path) -> list[str]:
    return [
        "search.method=scall",
        "search.dim=16",
        f"search.budget={_budget(data)}",
        f"search.scall.env_steps={ENV_STEPS}",
        f"search.scall.env_batches={ENV_BATCHES}",
    ]


@pytest.fixture(scope="module")
def full(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 3-day run (shared by both tests)."""
    out = tmp_path_factory.mktemp("scall-runs")
    run = run_train_job(tiny_job_args(data, out, "full", *_args(data)))
    assert run.returncode == 0, run.stderr[-3000:]
    return out / "full"


def _searcher_state(run: Path, day: int) -> dict[str, Any]:
    state = torch.load(run / "checkpoints" / f"day-{day:04d}" / "searcher.pt", weights_only=False)
    return state["searcher"]


def _digests(run: Path) -> list[str]:
    return [plan_digest(DimensionPlan.load(run / "checkpoints" / f"day-{d:04d}" / "plan")) for d in range(3)]


def test_scall_learns_in_the_job_and_every_plan_is_exactly_the_budget(data: Path, full: Path) -> None:
    budget = _budget(data)
    days = metrics_records(full)
    assert [d["day"] for d in days] == ["2024-01-01", "2024-01-02", "2024-01-03"]
    assert all(d["embedding_parameters"] == budget for d in days)  # exactly, every day (both ranks: digest check)
    assert days[0]["reconfigured"]
    # The environment's held-out batches are trained on after the policy's steps: every row of each day is trained.
    assert [d["train_examples"] for d in days] == [6000, 6000, 6000]
    assert all(d["reconfigure_seconds"] > 0 for d in days)  # each day's move to its new plan is timed
    for d in range(3):
        plan = DimensionPlan.load(full / "checkpoints" / f"day-{d:04d}" / "plan")
        assert plan.parameters == plan.logical_parameters == budget
        assert all(int(x) % 4 == 0 for f in ("user", "item") for x in plan[f].row_dims)  # type: ignore[union-attr]
        assert plan.provenance["method"] == "scall" and plan.provenance["day_index"] == d

    # The environment scored every step: ES reference and sampled plans, AUCs of the held-out batches.
    state = _searcher_state(full, 2)
    history = state["history"]
    assert [h["day_index"] for h in history] == [d for d in range(3) for _ in range(ENV_STEPS)]
    assert all(0 < h["fitness"] <= 1 and 0 < h["reference"] <= 1 for h in history)
    assert len({h["reference"] for h in history}) == 3  # one ES reference a day, on that day's model
    assert state["last_ratio"] == pytest.approx(history[-1]["fitness"] / history[-1]["reference"])

    # The policy learned: 3 updates a step, and the actor's weights moved from the fresh agent's.
    agent = state["learner"]["agent"]
    assert agent["updates"] == 3 * 3 * ENV_STEPS and len(state["learner"]["replay"]["items"]) == 3 * ENV_STEPS
    cfg = load_config(REPO / "jobs/configs/demo.yaml", [f"data.path={data}", *_args(data)])
    fresh = build_searcher(cfg, Dataset(data).spec)
    assert isinstance(fresh, ScallSearcher) and fresh.agent is not None and fresh.env_batches == ENV_BATCHES
    untrained = fresh.agent.actor.state_dict()
    assert any(not torch.equal(t, untrained[k]) for k, t in agent["actor"].items())
    actions = [
        DimensionPlan.load(full / "checkpoints" / f"day-{d:04d}" / "plan").provenance["action"] for d in range(3)
    ]
    assert len({tuple(a) for a in actions}) == 3  # each day's deterministic action is the policy's latest


def test_scall_resumed_after_a_reconfiguration_equals_the_uninterrupted_run(
    data: Path, full: Path, tmp_path: Path
) -> None:
    first = run_train_job(tiny_job_args(data, tmp_path, "cut", *_args(data), "data.days=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert metrics_records(tmp_path / "cut")[0]["reconfigured"]
    resumed = run_train_job(tiny_job_args(data, tmp_path, "cut", *_args(data), "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    cut, days = metrics_records(tmp_path / "cut"), metrics_records(full)
    assert [d["day"] for d in cut] == [d["day"] for d in days]
    for a, b in zip(cut, days, strict=True):
        assert a["eval"] == pytest.approx(b["eval"], rel=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["embedding_parameters"] == b["embedding_parameters"]
    assert _digests(tmp_path / "cut") == _digests(full)

    # The searcher went on learning exactly as it would have: the same steps, the same agent at the end.
    got, want = _searcher_state(tmp_path / "cut", 2), _searcher_state(full, 2)
    actions = [x for h in want["history"] for x in h["action"]]
    assert [x for h in got["history"] for x in h["action"]] == pytest.approx(actions, rel=1e-6)
    assert [h["fitness"] for h in got["history"]] == pytest.approx([h["fitness"] for h in want["history"]], rel=1e-6)
    for key in ("actor", "critic", "target_critic"):
        for name, t in want["learner"]["agent"][key].items():
            torch.testing.assert_close(got["learner"]["agent"][key][name], t)
    assert got["learner"]["replay"]["rng"] == want["learner"]["replay"]["rng"]
