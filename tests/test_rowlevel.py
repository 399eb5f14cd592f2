"""Row-level groundwork: budgets, ES/MR, exact allocation, masked vs bucketed tables, the LightGCN task, metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from models.lightgcn import BPRRecipe, GraphTask, LightGCN, normalized_adjacency
from models.metrics import ndcg_at_k, ranking_metrics, recall_at_k
from pipeline.dataset import Dataset, write_dataset
from pipeline.interactions import interactions
from pipeline.spec import DatasetSpec, SparseField
from pipeline.splits import per_user_split
from search.ciess import CiessSearcher, CiessSettings
from search.rowlevel import (
    BucketedTables,
    MaskedTable,
    SupernetEnv,
    allocate,
    item_quality,
    kept_budget,
    random_sizes,
    row_budget,
    row_plan,
    uniform_sizes,
    user_quality,
)
from sharding.plan import Budget, DimensionPlan, PlanError


def _task(seed: int = 0, users: int = 30, items: int = 20, n: int = 400) -> GraphTask:
    rng = np.random.default_rng(seed)
    u, i = rng.integers(0, users, n), rng.integers(0, items, n)
    cut = n * 3 // 4
    return GraphTask((u[:cut], i[:cut]), (u[cut:], i[cut:]), users, items)


def test_kept_budget_and_baselines_are_exact() -> None:
    assert kept_budget(0.8, 9746, 128) == 249_497  # ⌊0.2 · 128 · 9,746⌋
    es = uniform_sizes(100, kept_budget(0.9, 100, 128), 128)
    assert set(es.tolist()) == {12} and es.sum() <= kept_budget(0.9, 100, 128)
    rng = np.random.default_rng(0)
    for n, budget in ((100, 640), (7, 800), (50, 50), (33, 4224)):
        mr = random_sizes(n, budget, 128, rng)
        assert mr.sum() == min(budget, n * 128) and mr.min() >= 1 and mr.max() <= 128
    with pytest.raises(PlanError, match=r"below one dim per row.*at least 100"):
        uniform_sizes(100, 99, 128)
    with pytest.raises(PlanError, match="sparsity"):
        kept_budget(1.0, 10, 128)


def test_allocate_meets_the_budget_exactly_and_follows_the_weights() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 200))
        d_min, d_max = int(rng.integers(1, 4)), int(rng.integers(4, 130))
        weights = rng.pareto(rng.uniform(0.3, 3), n) * (rng.random(n) < 0.9)
        budget = int(rng.integers(n * d_min, n * d_max * 2))
        sizes = allocate(weights, budget, d_min, d_max)
        assert sizes.sum() == min(budget, n * d_max)
        assert sizes.min() >= d_min and sizes.max() <= d_max
        order = np.argsort(-weights, kind="stable")
        # heavier rows never get smaller sizes than lighter ones, up to one unit of rounding
        assert (np.diff(sizes[order]) <= 1).all()
    with pytest.raises(PlanError, match="below 2 dim"):
        allocate(np.ones(10), 19, 2, 8)


def test_row_plan_counts_logical_parameters_against_the_budget() -> None:
    users, items = np.array([1, 6, 128]), np.array([4, 5])
    plan = row_plan({"user": users, "item": items}, 128, budget=144)
    assert plan.logical_parameters == 144 and plan.budget == Budget(144, "logical")
    assert plan.parameters == 4 + 8 + 128 + 4 + 8  # physical: ceil4 per row
    with pytest.raises(PlanError, match="145 logical but the budget is 144"):
        row_plan({"user": users, "item": items + np.array([0, 1])}, 128, budget=144)


def test_plan_with_a_logical_budget_round_trips(tmp_path: Path) -> None:
    plan = row_plan({"user": np.array([3, 9]), "item": np.array([1])}, 16, budget=13)
    loaded = DimensionPlan.load(plan.save(tmp_path / "plan"))
    assert loaded.budget == Budget(13, "logical") and loaded.logical_parameters == 13


def test_masked_and_bucketed_tables_agree_for_the_same_sizes() -> None:
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    table = MaskedTable(40, 25, 16, g)
    users, items = rng.integers(1, 17, 40), rng.integers(1, 17, 25)
    table.set_sizes(users, items)
    masked = table()
    # slow reference: each row's first d columns, zeros after
    for row, d in enumerate(np.concatenate([users, items])):
        assert torch.equal(masked[row, d:], torch.zeros(16 - d))
        assert torch.equal(masked[row, :d], table.weight[row, :d])
    bucketed = BucketedTables(row_plan({"user": users, "item": items}, 16, None))
    bucketed.load_from_masked(table)
    torch.testing.assert_close(bucketed(), masked, rtol=0, atol=0)
    task = _task(users=40, items=25)
    torch.testing.assert_close(task.final(bucketed(), bucketed.width), task.final(masked, table.width))
    # bucket tables really are of the plan's widths (ceil4), not d_max
    widths = {n: m.weight.shape for n, m in bucketed.embedding.ebc.embedding_bags.items()}
    assert widths["t_user__d5"][1] == 8 and sum(s[0] for s in widths.values()) == 65


def test_set_sizes_rejects_bad_sizes() -> None:
    table = MaskedTable(3, 2, 8, torch.Generator().manual_seed(0))
    with pytest.raises(PlanError, match=r"in \[1, 8\]"):
        table.set_sizes(np.array([1, 2, 9]), np.array([1, 1]))


def test_symmetric_propagation_gradient_equals_dense_reference() -> None:
    rng = np.random.default_rng(2)
    u, i = rng.integers(0, 7, 30), rng.integers(0, 5, 30)
    adjacency = normalized_adjacency(u, i, 7, 5)
    x = torch.randn(12, 4, dtype=torch.float32, requires_grad=True)
    fu, fi = LightGCN(adjacency, 7, 3)(x[:7], x[7:])
    (fu.sum() * 2 + (fi**2).sum()).backward()
    dense = adjacency.to_dense()
    y = x.detach().clone().requires_grad_(True)
    total, h = y, y
    for _ in range(3):
        h = dense @ h
        total = total + h
    final = total / 4
    (final[:7].sum() * 2 + (final[7:] ** 2).sum()).backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_bpr_negatives_are_never_training_items() -> None:
    task = _task(users=10, items=6, n=40)
    users, positives, negatives = task.sample(5000, torch.Generator().manual_seed(0))
    assert task.train_mask[users, positives].all()
    assert not task.train_mask[users, negatives].any()


def test_ranking_metrics_equal_the_per_metric_functions() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 30, generator=g)
    held = torch.rand(50, 30, generator=g) < 0.1
    train = (torch.rand(50, 30, generator=g) < 0.2) & ~held
    got = ranking_metrics(scores, held, train, (5, 10, 20), reduction="none")
    for k in (5, 10, 20):
        torch.testing.assert_close(got[f"recall@{k}"], recall_at_k(scores, held, train, k, "none"), equal_nan=True)
        torch.testing.assert_close(got[f"ndcg@{k}"], ndcg_at_k(scores, held, train, k, "none"), equal_nan=True)


def test_user_and_item_quality_equal_slow_references() -> None:
    task = _task()
    metrics = {f"{m}@{k}": torch.rand(task.num_users) for k in (5, 10, 20) for m in ("recall", "ndcg")}
    metrics["recall@5"][3] = float("nan")
    uq = user_quality(metrics)
    for u in range(task.num_users):
        ref = np.mean([float(metrics[f"{m}@{k}"][u]) for k in (5, 10, 20) for m in ("recall", "ndcg")])
        assert np.isnan(ref) == bool(torch.isnan(uq[u])) and (np.isnan(ref) or abs(ref - float(uq[u])) < 1e-6)
    iq = item_quality(task, uq)
    items, users = task.item_users
    for i in range(task.num_items):
        vals = [float(uq[u]) for u in users[items == i] if not torch.isnan(uq[u])]
        expected = float(np.mean(vals)) if vals else 0.0
        assert abs(float(iq[i]) - expected) < 1e-5


def test_supernet_env_prefers_larger_plans() -> None:
    task = _task(users=40, items=25, n=900)
    env = SupernetEnv(task, 16, BPRRecipe(steps=60, batch=256, decay_every=20), seed=0)
    small = env.quality(np.full(40, 1), np.full(25, 1))[0].nanmean()
    full = env.peak_user.nanmean()
    assert float(full) > float(small)
    assert env.evaluations == 2


def test_interactions_factorise_ids_and_keep_the_split(tmp_path: Path) -> None:
    spec = DatasetSpec(
        name="tiny",
        label="label",
        task="binary",
        sparse=(SparseField("user", "user"), SparseField("item", "item")),
        user_field="user",
        item_field="item",
    )
    rng = np.random.default_rng(0)
    n = 600
    frame = pl.DataFrame(
        {
            "user": rng.integers(0, 20, n) * 1000,
            "item": rng.integers(0, 15, n) + 7,
            "label": np.ones(n, dtype=np.int8),
            "day": np.repeat(np.array(["2024-01-01", "2024-01-02"], dtype="datetime64[D]"), n // 2),
        }
    ).with_columns(pl.col("day").cast(pl.Date))
    dataset = Dataset(write_dataset(frame, spec, tmp_path / "d"))
    split = per_user_split(dataset, seed=0)
    inter = interactions(dataset, split)
    assert sum(v[0].size for v in inter.splits.values()) == n
    assert inter.user_ids.tolist() == sorted(set(frame["user"].to_list()))
    users, items = inter.merged("train", "valid", "test")
    raw = dataset.scan().collect()
    codes = np.concatenate([split.codes[d.date] for d in dataset.days])
    order = np.argsort(codes, kind="stable")
    assert (inter.user_ids[users] == raw["user"].to_numpy()[order]).all()
    assert (inter.item_ids[items] == raw["item"].to_numpy()[order]).all()
    uf, itf = inter.frequencies("train")
    assert uf.sum() == itf.sum() == split.counts()["train"]


def test_migration_into_a_bucket_wider_than_every_old_row_pads_them() -> None:
    """Every row grows (6 → 7 and 3 → 7): no row keeps its dim, the new bucket is wider than the old table."""
    from sharding.checkpoint import migrate_weights

    old = row_plan({"user": np.array([6, 6, 3]), "item": np.array([3])}, 8, None)
    new = row_plan({"user": np.array([7, 7, 7]), "item": np.array([3])}, 8, None)
    old_model, new_model = BucketedTables(old), BucketedTables(new)
    state = migrate_weights(old, new, old_model.state_dict(), new_model.state_dict())
    new_model.load_state_dict(state)
    expected = torch.nn.functional.pad(old_model()[:3, :6], (0, 2))
    torch.testing.assert_close(new_model()[:3], expected, rtol=0, atol=0)
    torch.testing.assert_close(new_model()[3], old_model()[3], rtol=0, atol=0)


def test_row_budget_is_what_the_other_features_leave_and_names_the_budget_that_would_do() -> None:
    rows = {"user": 10, "item": 20, "tags": 5}
    assert row_budget(1000, rows, ("user", "item"), 8, 120, "every row at dim 4") == 1000 - 5 * 8
    with pytest.raises(
        PlanError,
        match=r"search.budget=159 leaves 119 parameters for the user and item rows after the other features' 40 "
        r"\(at dim 8\), below the 120 of every row at dim 4. Raise search.budget to at least 160",
    ):
        row_budget(159, rows, ("user", "item"), 8, 120, "every row at dim 4")
    assert row_budget(160, rows, ("user", "item"), 8, 120, "every row at dim 4") == 120
    # CIESS's job searcher: the smallest budget is every user and item row at 4, the other features at other_dim.
    smallest = 4 * 30 + 5 * 8
    settings = CiessSettings(hidden=8, batch=16)
    with pytest.raises(PlanError, match=f"at least {smallest}"):
        CiessSearcher(Budget(smallest - 1, "parameters"), 16, "user", "item", settings, False, 8).initial_plan(
            ["user", "item", "tags"], rows
        )
    plan = CiessSearcher(Budget(smallest, "parameters"), 16, "user", "item", settings, False, 8).initial_plan(
        ["user", "item", "tags"], rows
    )
    assert plan.parameters == smallest and set(plan["user"].row_dims.tolist()) == {4}
