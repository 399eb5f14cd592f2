"""MD (mixed-dimension embeddings): equal-mass blocks against a plain reference, the alpha power rule under the exact
budget (learned projections counted), the registry and config checks, state round trips, and the embedding layer a
plan builds."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from search.base import DayStats, SearchConfigError, SearchContext
from search.md import MdSearcher, MdSettings, allocate_md, md_blocks, min_budget
from search.registry import build_searcher, searcher_class
from sharding.embedding import PlannedEmbedding, RowRemap
from sharding.plan import DimensionPlan, PlanError

pytestmark = pytest.mark.usefixtures("one_thread")

D_MAX = 64
CAPACITY = {"user": 300, "item": 500, "tags": 10}
FEATURES = ["user", "item", "tags"]


def _counts(rng: np.random.Generator, n: int, kind: int) -> np.ndarray:
    if kind == 0:
        return np.minimum(rng.zipf(1.3, n), 10**5).astype(np.int64)  # heavy tail
    if kind == 1:
        return rng.integers(0, 3, n).astype(np.int64)  # many ties and zeros
    if kind == 2:
        c = np.minimum(rng.zipf(1.6, n), 10**4).astype(np.int64)
        c[rng.random(n) < 0.4] = 0  # capacity not yet used
        return c
    return rng.integers(50, 60, n).astype(np.int64)  # nearly flat


def _day(counts: dict[str, np.ndarray], index: int = 0) -> DayStats:
    return DayStats(f"2024-03-{index + 1:02d}", index, {f: c.size for f, c in counts.items()}, counts)


def _reference_blocks(counts: np.ndarray, blocks: int) -> list[int]:
    """Each row's block, plainly: sort (count desc, row asc), block = ⌊blocks · mass before / total⌋, renumbered."""
    rows = sorted(range(len(counts)), key=lambda r: (-int(counts[r]), r))
    total = int(sum(int(c) for c in counts))
    raw, before = {}, 0
    for r in rows:
        raw[r] = 0 if total == 0 else min(blocks - 1, before * blocks // total)
        before += int(counts[r])
    used = sorted(set(raw.values()))
    return [used.index(raw[r]) for r in range(len(counts))]


def _check_monotone(counts: np.ndarray, dims: np.ndarray) -> None:
    """A row with more lookups never has a smaller dim."""
    values, inverse = np.unique(-counts, return_inverse=True)  # most frequent first
    lo = np.full(values.size, np.iinfo(np.int64).max)
    hi = np.zeros(values.size, dtype=np.int64)
    np.minimum.at(lo, inverse, dims)
    np.maximum.at(hi, inverse, dims)
    later_max = np.maximum.accumulate(hi[::-1])[::-1]  # the widest row among this count and every smaller one
    assert (later_max[1:] <= lo[:-1]).all()


def _max_cost(n_users: int, n_items: int, others: int) -> int:
    return (n_users + n_items) * D_MAX + 2 * D_MAX * D_MAX + others


# ---- settings -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"alpha": -0.1}, "search.md.alpha"),
        ({"alpha": 1.5}, "search.md.alpha"),
        ({"alpha": float("nan")}, "search.md.alpha"),
        ({"blocks": 0}, "search.md.blocks"),
        ({"blocks": 65}, "search.md.blocks"),
        ({"blocks": True}, "search.md.blocks"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        MdSettings(**kwargs)  # type: ignore[arg-type]


# ---- blocks ---------------------------------------------------------------------------------------------------------


def test_blocks_equal_a_plain_reference() -> None:
    rng = np.random.default_rng(0)
    for case in range(60):
        n = int(rng.integers(1, 120))
        counts = _counts(rng, n, case % 4) if case % 9 else np.zeros(n, dtype=np.int64)
        k = int(rng.integers(1, 9))
        cut = md_blocks(counts, k)
        block_of_row = np.empty(n, dtype=np.int64)
        block_of_row[cut.order] = cut.block
        assert block_of_row.tolist() == _reference_blocks(counts, k)
        assert cut.rows.sum() == n and (cut.rows >= 1).all() and len(cut.rows) <= k
        assert cut.mass.sum() == counts.sum()
        assert (np.diff(counts[cut.order]) <= 0).all()  # the most frequent first


def test_blocks_have_equal_mass_and_the_configured_count() -> None:
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 100, 10_000)  # no row holds more than 1/blocks of the mass
    for k in (1, 2, 4, 7, 16):
        cut = md_blocks(counts, k)
        assert len(cut.rows) == k
        assert np.abs(cut.mass - counts.sum() / k).max() <= counts.max()  # equal mass up to one row
    skewed = np.array([1000, 1, 1, 1])  # one row holds most of the mass: the blocks it spans are dropped
    assert md_blocks(skewed, 4).rows.tolist() == [1, 3]
    with pytest.raises(PlanError, match="must be >= 0"):
        md_blocks(np.array([3, -1]), 2)


# ---- dims under the budget ------------------------------------------------------------------------------------------


def test_plans_meet_the_budget_with_a_small_leftover_and_dims_follow_popularity() -> None:
    rng = np.random.default_rng(2)
    leftovers = []
    for case in range(80):
        capacity = {"user": int(rng.integers(1, 400)), "item": int(rng.integers(1, 600)), "tags": 7}
        others = 7 * 16
        low = min_budget([capacity["user"], capacity["item"]], D_MAX) + others
        high = _max_cost(capacity["user"], capacity["item"], others)
        mid = int(rng.integers(low, high + 1))
        budget = int(rng.choice([low, low + int(rng.integers(0, 50)), mid, mid, mid, high]))
        alpha = float(rng.choice([0.1, 0.3, 0.5, 1.0]))
        blocks = int(rng.integers(1, 9))
        searcher = MdSearcher(budget, D_MAX, alpha=alpha, blocks=blocks, other_dim=16)
        searcher.initial_plan(FEATURES, capacity)
        counts = {f: _counts(rng, int(rng.integers(1, capacity[f] + 1)), case % 4) for f in ("user", "item")}
        searcher.observe(_day(counts))
        plan = searcher.propose()
        assert plan is not None and searcher.propose() is None
        assert plan.parameters <= budget
        assert plan["tags"].dim == 16 and plan["tags"].parameters == others
        two_dims = False
        for f in ("user", "item"):
            fp = plan[f]
            dims = np.asarray(fp.row_dims)
            assert fp.projection == "linear" and fp.output_dim == D_MAX
            assert (dims % 4 == 0).all() and dims.min() >= 4 and dims.max() <= D_MAX
            assert len(fp.bucket_dims) <= blocks
            padded = np.zeros(capacity[f], dtype=np.int64)
            padded[: counts[f].size] = counts[f]
            _check_monotone(padded, dims)
            two_dims |= len(fp.bucket_dims) > 1
        leftover = budget - plan.parameters
        if budget == high:  # enough for every row at d_max: exactly that
            assert leftover == 0 and plan["user"].bucket_dims == plan["item"].bucket_dims == [D_MAX]
        else:
            if two_dims:  # below the smallest boundary step (≤ d_max − 4)
                assert leftover < D_MAX - 4 + 1, (case, leftover)
                leftovers.append(leftover)
            else:  # one dim per feature: below raising it by 4
                assert leftover < 4 * (capacity["user"] + capacity["item"]) + 8 * D_MAX, (case, leftover)
    assert len(leftovers) > 30 and max(leftovers) < D_MAX


def test_allocation_grows_popular_blocks_and_spends_the_budget_exactly_when_it_can() -> None:
    rows = [np.array([10, 100, 1000]), np.array([20, 2000])]
    popularity = [np.array([100.0, 10.0, 1.0]), np.array([50.0, 0.5])]
    for alpha in (0.2, 0.5, 1.0):
        alloc = allocate_md(rows, popularity, alpha, 40_000, D_MAX, D_MAX)
        for d, real in zip(alloc.dims, alloc.real, strict=True):
            assert (np.diff(d) <= 0).all() and (np.diff(real) <= 0).all()  # more popular → wider
        assert alloc.parameters <= 40_000 and 40_000 - alloc.parameters < D_MAX
    users, items = allocate_md(rows, popularity, 0.5, 40_000, D_MAX, D_MAX).real
    assert users[1] / users[2] == pytest.approx((10.0 / 1.0) ** 0.5)  # unclipped blocks: d ∝ p^α, one λ
    assert users[2] / items[1] == pytest.approx((1.0 / 0.5) ** 0.5)  # across features too
    with pytest.raises(PlanError, match="below every row at dim 4"):
        allocate_md(rows, popularity, 0.5, 1000, D_MAX, D_MAX)


def test_alpha_zero_gives_one_dim() -> None:
    rng = np.random.default_rng(3)
    searcher = MdSearcher(40_000, D_MAX, alpha=0.0, blocks=4, other_dim=8)
    searcher.initial_plan(FEATURES, CAPACITY)
    searcher.observe(_day({f: _counts(rng, CAPACITY[f], 0) for f in ("user", "item")}))
    plan = searcher.propose()
    assert plan is not None
    assert plan["user"].bucket_dims == plan["item"].bucket_dims and len(plan["user"].bucket_dims) == 1
    d = plan["user"].bucket_dims[0]
    assert plan.parameters == 800 * d + 2 * d * D_MAX + 10 * 8 <= 40_000
    assert 800 * (d + 4) + 2 * (d + 4) * D_MAX + 10 * 8 > 40_000  # the largest such dim


def test_initial_plan_is_the_largest_uniform_dim_that_fits() -> None:
    budget = 300 * 24 + 500 * 24 + 2 * 24 * D_MAX + 10 * 64 + 100  # other_dim defaults to d_max
    plan = MdSearcher(budget, D_MAX).initial_plan(FEATURES, CAPACITY)
    assert plan["user"].bucket_dims == plan["item"].bucket_dims == [24]
    assert plan["tags"].dim == D_MAX and budget - plan.parameters == 100
    assert plan.provenance["method"] == "md" and plan.provenance["day_index"] is None


def test_a_budget_below_every_row_at_4_names_the_smallest_budget() -> None:
    smallest = 4 * 800 + 2 * 4 * D_MAX + 10 * 8
    with pytest.raises(PlanError, match=f"at least {smallest:,}"):
        MdSearcher(smallest - 1, D_MAX, other_dim=8).initial_plan(FEATURES, CAPACITY)
    plan = MdSearcher(smallest, D_MAX, other_dim=8).initial_plan(FEATURES, CAPACITY)
    assert plan.parameters == smallest and plan["user"].bucket_dims == [4]


def test_large_case_meets_the_budget() -> None:
    rng = np.random.default_rng(4)
    capacity = {"user": 1_200_000, "item": 800_000}
    counts = {f: np.minimum(rng.zipf(1.2, n), 10**6).astype(np.int64) for f, n in capacity.items()}
    budget = 2_000_000 * 16
    searcher = MdSearcher(budget, D_MAX, alpha=0.3, blocks=8)
    searcher.initial_plan(["user", "item"], capacity)
    searcher.observe(_day(counts))  # vectorised: about 0.5 s for 2M rows on this machine (tests never time)
    plan = searcher.propose()
    assert plan is not None and 0 <= budget - plan.parameters < D_MAX


# ---- the protocol ---------------------------------------------------------------------------------------------------


def test_registry_builds_the_searcher_from_its_settings() -> None:
    assert searcher_class("md") is MdSearcher and MdSearcher.settings_class is MdSettings
    context = SearchContext(method="md", dim=32, budget=50_000, other_dim=8, user_field="u", item_field="i")
    searcher = build_searcher("md", MdSettings(alpha=0.5, blocks=3), context)
    assert isinstance(searcher, MdSearcher)
    assert (searcher.alpha, searcher.blocks, searcher.d_max, searcher.other_dim) == (0.5, 3, 32, 8)
    assert searcher.entities == ("u", "i") and searcher.budget == 50_000
    defaults = build_searcher("md", None, context)
    assert isinstance(defaults, MdSearcher) and (defaults.alpha, defaults.blocks) == (0.3, 4)


def test_check_refuses_what_it_cannot_serve() -> None:
    ok = SearchContext(method="md", dim=64, budget=10_000)
    MdSearcher.check(ok)  # no dataset yet: the entities wait for it
    with pytest.raises(SearchConfigError, match="user_field or item_field"):
        MdSearcher.check(SearchContext(method="md", dataset="criteo", dim=64, budget=10_000))
    with pytest.raises(SearchConfigError, match=r"streaming search.*prequential"):
        MdSearcher.check(SearchContext(method="md", protocol="random", dim=64, budget=10_000))
    with pytest.raises(SearchConfigError, match=r"needs search\.budget"):
        MdSearcher.check(SearchContext(method="md", dim=64))
    with pytest.raises(SearchConfigError, match="multiples of 4"):
        MdSearcher.check(SearchContext(method="md", dim=30, budget=10_000))


def test_searcher_errors() -> None:
    searcher = MdSearcher(100_000, D_MAX)
    with pytest.raises(PlanError, match="before initial_plan"):
        searcher.observe(_day({"user": np.ones(3, dtype=np.int64), "item": np.ones(3, dtype=np.int64)}))
    with pytest.raises(PlanError, match=r"\['item'\]"):
        searcher.initial_plan(["user", "tags"], {"user": 10, "tags": 3})
    searcher.initial_plan(FEATURES, CAPACITY)
    assert searcher.propose() is None  # nothing observed
    with pytest.raises(PlanError, match="no row_counts for feature 'item'"):
        searcher.observe(_day({"user": np.ones(3, dtype=np.int64)}))
    with pytest.raises(PlanError, match="raise the table capacity"):
        searcher.observe(_day({"user": np.ones(301, dtype=np.int64), "item": np.ones(3, dtype=np.int64)}))
    with pytest.raises(ValueError, match="multiple of 4"):
        MdSearcher(100_000, 30)


def test_state_round_trip_gives_identical_proposals() -> None:
    rng = np.random.default_rng(5)
    cumulative = {f: np.zeros(CAPACITY[f] - 50, dtype=np.int64) for f in ("user", "item")}
    days = []
    for d in range(4):
        for f in cumulative:
            cumulative[f] = cumulative[f] + _counts(rng, cumulative[f].size, d % 3)
        days.append(_day({f: c.copy() for f, c in cumulative.items()}, d))

    def fresh() -> MdSearcher:
        return MdSearcher(60_000, D_MAX, alpha=0.4, blocks=5, other_dim=8)

    first = fresh()
    first.initial_plan(FEATURES, CAPACITY)
    for stats in days[:2]:
        first.observe(stats)
        first.propose()
    first.observe(days[2])  # saved with a proposal pending
    state = first.state_dict()
    resumed = []
    for restored in (pickle.loads(pickle.dumps(state)), json.loads(json.dumps(state, default=lambda x: x.tolist()))):
        searcher = fresh()
        searcher.load_state_dict(restored)
        resumed.append(searcher)
    uninterrupted = [first.propose()]
    first.observe(days[3])
    uninterrupted.append(first.propose())
    for searcher in resumed:
        plans = [searcher.propose()]
        searcher.observe(days[3])
        plans.append(searcher.propose())
        for a, b in zip(uninterrupted, plans, strict=True):
            assert a is not None and b is not None
            _assert_same(a, b)


def _assert_same(a: DimensionPlan, b: DimensionPlan) -> None:
    assert a.parameters == b.parameters and a.provenance == b.provenance
    for f in ("user", "item"):
        np.testing.assert_array_equal(a[f].row_dims, b[f].row_dims)


def test_planned_embedding_has_the_learned_projections_the_plan_counts() -> None:
    rng = np.random.default_rng(6)
    searcher = MdSearcher(30_000, D_MAX, alpha=0.5, blocks=4, other_dim=8)
    searcher.initial_plan(FEATURES, CAPACITY)
    searcher.observe(_day({f: _counts(rng, CAPACITY[f], 0) for f in ("user", "item")}))
    plan = searcher.propose()
    assert plan is not None and len(plan["user"].bucket_dims) > 1
    layer = PlannedEmbedding(plan)
    expected = {t.name for f in ("user", "item") for t in plan[f].tables()}
    assert set(layer.projections) == expected
    for f in ("user", "item"):
        for t in plan[f].tables():
            projection = layer.projections[t.name]
            assert isinstance(projection, torch.nn.Linear) and projection.bias is None
            assert tuple(projection.weight.shape) == (D_MAX, t.logical_dim)
    counted = sum(p.numel() for p in layer.ebc.parameters()) + sum(p.numel() for p in layer.projections.parameters())
    assert counted == plan.parameters
    batch = 6
    values = {f: torch.from_numpy(rng.integers(0, CAPACITY[f], batch)) for f in FEATURES}
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=torch.cat([values[f] for f in FEATURES]), lengths=torch.ones(3 * batch, dtype=torch.int64)
    )
    out = layer(RowRemap(plan)(kjt))
    assert (
        out["user"].shape == (batch, D_MAX)
        and out["item"].shape == (batch, D_MAX)
        and out["tags"].shape
        == (
            batch,
            8,
        )
    )
