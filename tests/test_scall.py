"""SCALL's parts against slow, plainly written references: the budget-guaranteed sampler, the fixed-length state,
the SAC target and updates, the static search on a tiny graph, and the streaming searcher."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from models.lightgcn import BPRRecipe, GraphTask
from search.base import DayStats, SearchContext
from search.rowlevel import SupernetEnv
from search.scall import (
    RecencyReplay,
    SacAgent,
    ScallConfig,
    ScallLearner,
    ScallSearcher,
    ScallSettings,
    Transition,
    pool_frequencies,
    powerlaw_shares,
    ratio_converged,
    sac_target,
    sample_sizes,
    scall_search,
    scall_state,
)
from sharding.plan import Budget, DimensionPlan, PlanError

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_rank_order(freq: np.ndarray) -> list[int]:
    """Rows from the most to the least frequent, ties by the smaller row id (plain Python sort)."""
    return sorted(range(len(freq)), key=lambda r: (-float(freq[r]), r))


def _random_freq(rng: np.random.Generator, n: int) -> np.ndarray:
    kind = rng.integers(0, 4)
    if kind == 0:
        return rng.integers(0, 3, n).astype(np.float64)  # many ties and zeros
    if kind == 1:
        return np.zeros(n)  # never seen
    if kind == 2:
        return rng.zipf(1.3, n).astype(np.float64)  # heavy tail
    return rng.random(n) * 1e6


# ---- the sampler --------------------------------------------------------------------------------------------------


def test_sampler_meets_the_budget_exactly_within_bounds_and_monotone_in_frequency() -> None:
    rng = np.random.default_rng(0)
    for case in range(300):
        d_max = int(rng.choice([1, 2, 7, 16, 64, 256]))
        d_min = 1 if case % 3 else int(rng.integers(1, d_max + 1))
        cfg = ScallConfig(d_max=d_max, d_min=d_min, user_groups=4)
        n_users, n_items = (int(x) for x in rng.integers(1, 400, 2))
        rows = n_users + n_items
        budget = int(
            rng.choice(
                [
                    rows * d_min,  # the smallest feasible
                    rows * d_min + int(rng.integers(0, 3)),
                    int(rng.integers(rows * d_min, rows * d_max + 1)),
                    rows * d_max,
                    rows * d_max * 10**3,  # huge: capped at every row d_max
                ]
            )
        )
        action = rng.random(3)
        if case % 7 == 0:
            action = rng.choice([0.0, 1.0, -3.0, 4.0], 3)  # out of range: clipped as the code does
        uf, itf = _random_freq(rng, n_users), _random_freq(rng, n_items)
        users, items = sample_sizes(action, uf, itf, budget, cfg)

        assert users.shape == (n_users,) and items.shape == (n_items,)
        assert int(users.sum() + items.sum()) == min(budget, rows * d_max)
        for sizes in (users, items):
            assert sizes.min() >= d_min and sizes.max() <= d_max
        for sizes, freq in ((users, uf), (items, itf)):
            by_rank = sizes[_reference_rank_order(freq)]
            # The i-th most frequent row gets the i-th largest size: non-increasing along the reference ranking.
            assert (np.diff(by_rank) <= 0).all(), (case, by_rank)
            more = freq[:, None] > freq[None, :]
            assert not (more & (sizes[:, None] < sizes[None, :])).any()


def test_sampler_shifts_parameters_with_the_ratio_and_skews_with_alpha() -> None:
    cfg = ScallConfig(d_max=64, user_groups=4)
    uf, itf = np.arange(200, 0, -1.0), np.arange(100, 0, -1.0)
    budget = 300 * 16
    u_lo, _ = sample_sizes((0.2, 0.5, 0.5), uf, itf, budget, cfg)
    u_hi, _ = sample_sizes((0.8, 0.5, 0.5), uf, itf, budget, cfg)
    assert abs(int(u_lo.sum()) - round(0.2 * budget)) <= 1 and abs(int(u_hi.sum()) - round(0.8 * budget)) <= 1
    skewed, _ = sample_sizes((0.5, 0.0, 0.5), uf, itf, budget, cfg)  # α = 0.1: a steep power law
    flat, _ = sample_sizes((0.5, 1.0, 0.5), uf, itf, budget, cfg)  # α = 30: nearly equal
    assert skewed[0] == 64 and skewed[-1] == 1
    assert flat.max() - flat.min() <= 3  # the smallest of 200 draws of U^(1/30) is ~0.84 of the largest
    # The most frequent row gets the largest size: row 0 of `uf` is the most frequent.
    assert skewed[0] == skewed.max()


def test_ratio_is_moved_to_keep_one_dim_per_row() -> None:
    cfg = ScallConfig(d_max=8, user_groups=4)
    users, items = sample_sizes((1.0, 0.3, 0.3), np.ones(10), np.ones(30), 80, cfg)
    assert items.tolist() == [1] * 30 and users.sum() == 50  # every item keeps one dim
    users, items = sample_sizes((0.0, 0.3, 0.3), np.ones(10), np.ones(30), 300, cfg)
    assert items.tolist() == [8] * 30 and users.sum() == 60  # items are full, the rest must go to users
    users, items = sample_sizes((0.0, 0.3, 0.3), np.ones(10), np.ones(30), 200, cfg)
    assert users.tolist() == [1] * 10 and items.sum() == 190


def test_powerlaw_shares_equal_the_expected_order_statistics() -> None:
    for alpha, n in ((0.1, 6), (1.0, 5), (2.5, 7), (30.0, 4)):
        s = 1.0 / alpha
        # E[X_(j)] for X = U^(1/α), j-th smallest of n (Beta moments), written out per element.
        expected = [
            math.exp(math.lgamma(j + s) + math.lgamma(n + 1) - math.lgamma(j) - math.lgamma(n + 1 + s))
            for j in range(n, 0, -1)
        ]
        ref = np.array(expected) / sum(expected)
        np.testing.assert_allclose(powerlaw_shares(alpha, n), ref, rtol=1e-10)
    # And they are the limit of the code's Monte Carlo mean of sorted draws.
    rng = np.random.default_rng(0)
    draws = np.sort(rng.power(2.0, (20000, 5)), axis=1)[:, ::-1]
    mc = draws.mean(0)
    np.testing.assert_allclose(powerlaw_shares(2.0, 5), mc / mc.sum(), atol=2e-3)


def test_monte_carlo_shares_also_meet_the_budget() -> None:
    cfg = ScallConfig(d_max=32, user_groups=4, mc_draws=5)
    rng = np.random.default_rng(3)
    users, items = sample_sizes((0.4, 0.2, 0.8), np.arange(50.0), np.arange(70.0), 999, cfg, rng)
    assert users.sum() + items.sum() == 999 and users.max() <= 32 and users.min() >= 1
    assert users[49] == users.max() and users[0] == users.min()


def test_a_budget_below_one_dim_per_row_is_a_plan_error() -> None:
    cfg = ScallConfig(d_max=16, user_groups=4)
    with pytest.raises(PlanError, match=r"below one dim per row \(50 rows\)"):
        sample_sizes((0.5, 0.5, 0.5), np.ones(20), np.ones(30), 49, cfg)
    with pytest.raises(PlanError, match="d_min=2"):
        sample_sizes((0.5, 0.5, 0.5), np.ones(20), np.ones(30), 99, ScallConfig(d_max=16, d_min=2, user_groups=4))
    with pytest.raises(ValueError, match="non-negative"):
        sample_sizes((0.5, 0.5, 0.5), -np.ones(20), np.ones(30), 99, cfg)
    with pytest.raises(ValueError, match="ratio, alpha_user, alpha_item"):
        sample_sizes((0.5, 0.5), np.ones(20), np.ones(30), 99, cfg)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"d_max": 0}, "d_max"),
        ({"d_min": 0}, "d_min"),
        ({"alpha_range": (5.0, 1.0)}, "alpha_range"),
        ({"user_groups": 0}, "user_groups"),
        ({"gamma": 1.5}, "gamma"),
        ({"tau": 0.0}, "tau"),
        ({"actor_lr": -1.0}, "actor_lr"),
        ({"reward_range": (1.1, 0.9)}, "reward_range"),
        ({"batch_large": 8, "large_batch_after": 3}, "large_batch_after"),
        ({"converge_window": 1}, "converge_window"),
        ({"max_steps": 0}, "max_steps"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"ScallConfig.{field} is"):
        ScallConfig(**kwargs)  # type: ignore[arg-type]


def test_config_errors_are_collected_into_one_message() -> None:
    with pytest.raises(ValueError) as err:
        ScallConfig(d_min=0, hidden=0, entropy_alpha=-1.0)
    assert all(f"ScallConfig.{f}" in str(err.value) for f in ("d_min", "hidden", "entropy_alpha"))


# ---- the state ----------------------------------------------------------------------------------------------------


def _slow_pool(freq: list[float], groups: int) -> list[float]:
    """Min-max normalise, sort descending, then the mean of each group's share of the unit interval, by hand."""
    lo, hi = min(freq), max(freq)
    v = sorted(((f - lo) / (hi - lo) if hi > lo else 1.0 for f in freq), reverse=True)
    n = len(v)
    out = []
    for g in range(groups):
        a, b = g / groups * n, (g + 1) / groups * n  # the group's span in row units
        total = sum(v[r] * max(0.0, min(b, r + 1) - max(a, r)) for r in range(n))
        out.append(total / (b - a))
    return out


def test_pooling_equals_a_slow_reference_for_more_and_fewer_rows_than_groups() -> None:
    rng = np.random.default_rng(1)
    for n, groups in ((256, 8), (1000, 7), (5, 12), (3, 3), (1, 4), (37, 37)):
        freq = rng.integers(0, 20, n).astype(np.float64)
        np.testing.assert_allclose(
            pool_frequencies(freq, groups), np.array(_slow_pool(freq.tolist(), groups)), atol=1e-12
        )
    # Windows that divide evenly are plain means (the code's mean pooling).
    freq = np.arange(12.0)
    np.testing.assert_allclose(
        pool_frequencies(freq, 3), [np.mean((np.arange(11, -1, -1) / 11)[i : i + 4]) for i in (0, 4, 8)]
    )


def test_state_has_a_fixed_length_for_any_number_of_users_and_items() -> None:
    cfg = ScallConfig(d_max=16, user_groups=32)
    rng = np.random.default_rng(2)
    lengths = set()
    for n_users, n_items in ((3, 900), (60, 40), (5000, 7), (1, 1)):
        uf, itf = rng.integers(0, 9, n_users), rng.integers(0, 9, n_items)
        users, items = sample_sizes((0.5, 0.5, 0.5), uf, itf, 4 * (n_users + n_items), cfg)
        state = scall_state(uf, itf, 0.97, torch.randn(16), torch.randn(16), users, items, cfg)
        lengths.add(state.shape)
        assert torch.isfinite(state).all()
        assert state[2 * 32 + 1] == pytest.approx(n_users / (n_users + n_items))
        assert state[2 * 32] == pytest.approx(0.97)
        assert 0 <= float(state[-2]) <= 1 and 0 <= float(state[-1]) <= 1
    assert lengths == {(cfg.state_size,)} and cfg.state_size == 2 * 32 + 2 * 16 + 4
    assert ScallConfig().state_size == 1028  # the code's STATE_SIZE
    with pytest.raises(ValueError, match="d_max=16"):
        scall_state(np.ones(3), np.ones(3), 1.0, torch.zeros(8), torch.zeros(16), np.ones(3), np.ones(3), cfg)


# ---- SAC ----------------------------------------------------------------------------------------------------------


def test_sac_target_equals_a_per_sample_reference() -> None:
    g = torch.Generator().manual_seed(0)
    r, q1, q2, logp = (torch.randn(9, 1, generator=g) for _ in range(4))
    y = sac_target(r, q1, q2, logp, gamma=0.99, entropy_alpha=0.2)
    ref = torch.tensor(
        [[float(r[i]) + 0.99 * (min(float(q1[i]), float(q2[i])) - 0.2 * float(logp[i]))] for i in range(9)]
    )
    torch.testing.assert_close(y, ref)


def test_actor_log_prob_equals_the_change_of_variables_reference() -> None:
    cfg = ScallConfig(d_max=2, user_groups=2, hidden=16)
    agent = SacAgent(cfg, seed=0)
    state = torch.randn(4, cfg.state_size)
    action, log_prob, mean = agent.actor.sample(state, torch.Generator().manual_seed(1))
    mu, log_std = agent.actor(state)
    y = 2 * action - 1
    x = torch.atanh(y.clamp(-1 + 1e-6, 1 - 1e-6))
    normal = torch.distributions.Normal(mu, log_std.exp())
    ref = (normal.log_prob(x) - torch.log(0.5 * (1 - y.pow(2)) + 1e-6)).sum(-1, keepdim=True)
    torch.testing.assert_close(log_prob, ref, rtol=1e-3, atol=1e-3)
    assert ((action > 0) & (action < 1)).all()
    torch.testing.assert_close(mean, 0.5 * torch.tanh(mu) + 0.5)


def test_recency_replay_prefers_recent_transitions_and_batches_as_the_code() -> None:
    cfg = ScallConfig(d_max=2, user_groups=2)
    assert [cfg.batch_size(n) for n in (1, 5, 12, 13, 100)] == [1, 1, 1, 8, 8]
    replay = RecencyReplay(capacity=4, rng=np.random.default_rng(0))
    for k in range(6):  # the first two fall out
        replay.add(Transition(torch.full((2,), float(k)), torch.zeros(3), float(k), torch.zeros(2)))
    counts = np.zeros(6)
    for _ in range(4000):
        _, _, reward, _ = replay.sample(1)
        counts[int(reward)] += 1
    assert counts[:2].sum() == 0
    np.testing.assert_allclose(counts[2:] / 4000, np.arange(1, 5) / 10, atol=0.03)  # ∝ position + 1
    _, _, rewards, _ = replay.sample(4)
    assert sorted(rewards.reshape(-1).tolist()) == [2.0, 3.0, 4.0, 5.0]  # without replacement


def test_sac_updates_move_the_mean_action_toward_the_rewarded_region() -> None:
    """A one-step bandit: reward −10·‖a − target‖², the same state every step."""
    cfg = ScallConfig(d_max=2, user_groups=2, hidden=32, gamma=0.0, actor_lr=3e-3, critic_lr=3e-3, entropy_alpha=0.05)
    agent = SacAgent(cfg, seed=0)
    replay = RecencyReplay(cfg.replay_capacity, np.random.default_rng(0))
    state = torch.ones(cfg.state_size)
    target = np.array([0.85, 0.15, 0.85])
    before = np.abs(agent.mean_action(state) - target).sum()
    for _ in range(60):
        action, _ = agent.act(state)
        replay.add(
            Transition(state, torch.from_numpy(action).float(), -10 * float(((action - target) ** 2).sum()), state)
        )
        for _ in range(cfg.updates_per_step):
            agent.update(replay.sample(cfg.batch_size(len(replay))))
    after = np.abs(agent.mean_action(state) - target).sum()
    assert after < 0.5 * before, (before, after)


def test_ratio_convergence_rule() -> None:
    assert not ratio_converged([0.5, 0.5, 0.5, 0.5], 5, 0.01)
    assert ratio_converged([0.1, 0.50, 0.505, 0.51, 0.515, 0.52], 5, 0.01)
    assert not ratio_converged([0.50, 0.505, 0.53, 0.535, 0.54], 5, 0.01)


# ---- the static search --------------------------------------------------------------------------------------------


def _tiny_task(seed: int = 0) -> tuple[GraphTask, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_users, n_items = 60, 40
    users = np.concatenate([np.arange(n_users), rng.integers(0, n_users, 540)])  # every user has a pair
    items = (users % 8 * 5 + rng.zipf(1.6, users.size)) % n_items  # some taste structure and a popularity tail
    pairs = np.unique(np.stack([users, items], 1), axis=0)
    held = rng.random(len(pairs)) < 0.2
    train, valid = pairs[~held], pairs[held]
    task = GraphTask((train[:, 0], train[:, 1]), (valid[:, 0], valid[:, 1]), n_users, n_items, layers=2)
    return task, np.bincount(train[:, 0], minlength=n_users), np.bincount(train[:, 1], minlength=n_items)


def test_scall_search_runs_on_a_tiny_graph_and_meets_the_budget_exactly() -> None:
    task, user_freq, item_freq = _tiny_task()
    env = SupernetEnv(task, d_max=16, recipe=BPRRecipe(steps=20, batch=256, lr=0.05), seed=0)
    cfg = ScallConfig(d_max=16, user_groups=16, hidden=32, min_steps=2, max_steps=6)
    budget = 100 * 5 + 3  # a mean size of ~5, not a multiple of the rows
    result = scall_search(env, user_freq, item_freq, budget, cfg, seed=0)

    assert 3 <= len(result.history) <= 6
    assert int(result.user_sizes.sum() + result.item_sizes.sum()) == budget
    assert int(result.best_user_sizes.sum() + result.best_item_sizes.sum()) == budget
    assert result.reference_fitness > 0 and result.best_fitness >= max(s.fitness for s in result.history)
    assert all(0 < a < 1 for s in result.history for a in s.action)
    assert all(
        s.reward == pytest.approx(10 * (s.fitness / result.reference_fitness - 0.9) / 0.2) for s in result.history
    )
    assert result.seconds > 0 and result.agent is not None and result.agent.updates == 3 * len(result.history)
    plan = result.plan()
    assert plan.logical_parameters == budget and plan.budget_used() == budget
    # More frequent users never get smaller sizes.
    more = user_freq[:, None] > user_freq[None, :]
    assert not (more & (result.user_sizes[:, None] < result.user_sizes[None, :])).any()
    # The same seed gives the same search.
    again = scall_search(
        SupernetEnv(task, d_max=16, recipe=BPRRecipe(steps=20, batch=256, lr=0.05), seed=0),
        user_freq,
        item_freq,
        budget,
        cfg,
        seed=0,
    )
    assert [s.action for s in again.history] == [s.action for s in result.history]
    np.testing.assert_array_equal(again.user_sizes, result.user_sizes)
    # Recorded before the policy step moved into `ScallLearner` (shared with the job): the search is unchanged.
    assert [x for s in result.history[:3] for x in (*s.action, s.fitness)] == pytest.approx(GOLDEN_STEPS, rel=1e-5)
    assert result.action == pytest.approx(GOLDEN_FINAL, rel=1e-5)
    assert result.reference_fitness == pytest.approx(0.5187007188796997, rel=1e-5)


# `scall_search` on the tiny graph above: the first three steps' (sampled action, fitness) and the final action.
GOLDEN_STEPS = [
    *(0.674841582775116, 0.7737836837768555, 0.6170178055763245, 0.5063846111297607),
    *(0.04004153609275818, 0.994428277015686, 0.12289142608642578, 0.5417268872261047),
    *(0.2876492738723755, 0.9602286219596863, 0.3203572630882263, 0.5352044105529785),
]
GOLDEN_FINAL = (0.47421494126319885, 0.5908825397491455, 0.5798234939575195)


def test_scall_search_checks_its_inputs() -> None:
    task, user_freq, item_freq = _tiny_task()
    env = SupernetEnv(task, d_max=8, recipe=BPRRecipe(steps=2, batch=64), seed=0)
    with pytest.raises(ValueError, match="d_max is 16"):
        scall_search(env, user_freq, item_freq, 500, ScallConfig(d_max=16, user_groups=4))
    with pytest.raises(ValueError, match="the task has 60 and 40"):
        scall_search(env, user_freq[:10], item_freq, 500, ScallConfig(d_max=8, user_groups=4))
    with pytest.raises(PlanError, match="below one dim per row"):
        scall_search(env, user_freq, item_freq, 99, ScallConfig(d_max=8, user_groups=4))


# ---- streaming ----------------------------------------------------------------------------------------------------

CAPACITY = {"user": 80, "item": 120, "tags": 10}


def _days(n: int, seed: int = 0) -> list[DayStats]:
    """Cumulative counts over vocabularies that grow each day (new ids arrive, popularity drifts)."""
    rng = np.random.default_rng(seed)
    counts = {"user": np.zeros(0, dtype=np.int64), "item": np.zeros(0, dtype=np.int64)}
    days = []
    for d in range(n):
        for f, grow, cap in (("user", 12, CAPACITY["user"]), ("item", 20, CAPACITY["item"])):
            size = min(cap, counts[f].size + grow)
            c = np.zeros(size, dtype=np.int64)
            c[: counts[f].size] = counts[f]
            hot = rng.integers(0, size, 200) if d % 2 else size - 1 - rng.integers(0, max(1, size // 3), 200)
            counts[f] = c + np.bincount(hot, minlength=size)
        days.append(
            DayStats(
                f"2024-03-0{d + 1}", d, {f: c.size for f, c in counts.items()}, {f: c.copy() for f, c in counts.items()}
            )
        )
    return days


def test_searcher_meets_the_budget_exactly_every_day_and_sizes_follow_the_day() -> None:
    budget = Budget(10 * 4 + 200 * 6 + 7, "logical")  # tags at dim 4, a mean of ~6 over user and item rows
    searcher = ScallSearcher(budget, d_max=16, action=(0.45, 0.3, 0.5), other_dim=4)
    plan = searcher.initial_plan(["user", "item", "tags"], CAPACITY)
    assert plan.logical_parameters == budget.value
    assert set(np.unique(np.asarray(plan["user"].row_dims)).tolist()) <= {6, 7}  # ES, the remainder one unit per row
    assert plan["tags"].dim == 4
    assert searcher.propose() is None  # nothing observed yet

    previous: dict[str, np.ndarray] | None = None
    last_user = np.asarray(plan["user"].row_dims)
    for stats in _days(5):
        searcher.observe(stats)
        proposal = searcher.propose()
        assert isinstance(proposal, DimensionPlan) and searcher.propose() is None
        plan = proposal
        assert plan.logical_parameters == budget.value  # exactly, every day
        assert plan["user"].num_embeddings == 80 and plan["item"].num_embeddings == 120
        for f in ("user", "item"):
            dims = np.asarray(plan[f].row_dims)
            assert dims.min() >= 1 and dims.max() <= 16
            counts = np.zeros(CAPACITY[f], dtype=np.int64)
            counts[: stats.row_counts[f].size] = stats.row_counts[f]
            unseen = counts == 0
            if unseen.any():  # rows never seen rank last: no larger than any seen row
                assert dims[unseen].max() <= dims[~unseen].min()
            if previous is not None:
                day = counts - previous[f]
                more = day[:, None] > day[None, :]
                assert not (more & (dims[:, None] < dims[None, :])).any()  # the day's frequency decides
        assert (np.asarray(plan["user"].row_dims) != last_user).any()  # sizes move with the traffic
        previous = {
            f: np.pad(stats.row_counts[f], (0, CAPACITY[f] - stats.row_counts[f].size)) for f in ("user", "item")
        }
        last_user = np.asarray(plan["user"].row_dims)


def _torch_round_trip(state: object) -> object:
    """What the job does with a searcher's state: `torch.save`, then `torch.load(weights_only=False)`."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_searcher_state_dict_round_trip_gives_the_same_plans() -> None:
    budget = Budget(200 * 5, "logical")
    days = _days(4, seed=3)
    first = ScallSearcher(budget, 16, config=ScallConfig(d_max=16, user_groups=8, hidden=16), seed=1)
    first.initial_plan(["user", "item"], {"user": 80, "item": 120})
    for stats in days[:2]:
        first.observe(stats)
        first.propose()
    state = _torch_round_trip(first.state_dict())

    second = ScallSearcher(budget, 16, config=ScallConfig(d_max=16, user_groups=8, hidden=16), seed=1)
    second.initial_plan(["user", "item"], {"user": 80, "item": 120})
    second.load_state_dict(state)  # type: ignore[arg-type]
    for stats in days[2:]:
        a, b = first, second
        a.observe(stats)
        b.observe(stats)
        pa, pb = a.propose(), b.propose()
        assert pa is not None and pb is not None
        assert pa.logical_parameters == pb.logical_parameters == budget.value
        for f in ("user", "item"):
            np.testing.assert_array_equal(pa[f].row_dims, pb[f].row_dims)
        assert pa.provenance["action"] == pb.provenance["action"]


def test_searcher_errors() -> None:
    with pytest.raises(PlanError, match="'logical'"):
        ScallSearcher(Budget(1000, "parameters"), 16, action=(0.5, 0.5, 0.5))
    searcher = ScallSearcher(Budget(150, "logical"), 16, action=(0.5, 0.5, 0.5))
    with pytest.raises(PlanError, match="below the 200 of one dim per row"):
        searcher.initial_plan(["user", "item"], {"user": 80, "item": 120})
    with pytest.raises(PlanError, match=r"\['item'\]"):
        searcher.initial_plan(["user", "tags"], {"user": 80, "tags": 3})
    with pytest.raises(PlanError, match="other features"):
        ScallSearcher(Budget(250, "logical"), 16, action=(0.5, 0.5, 0.5), other_dim=8).initial_plan(
            ["user", "item", "tags"], CAPACITY
        )


def test_searcher_with_sizes_in_multiples_of_4_spends_exactly_the_stored_budget() -> None:
    budget = Budget(10 * 8 + 200 * 12, "parameters")  # stored parameters: tags at 8, user and item rows ~12
    searcher = ScallSearcher(budget, d_max=32, action=(0.45, 0.3, 0.5), other_dim=8, multiple=4)
    plans = [searcher.initial_plan(["user", "item", "tags"], CAPACITY)]
    for stats in _days(3):
        searcher.observe(stats)
        proposal = searcher.propose()
        assert proposal is not None
        plans.append(proposal)
    for plan in plans:
        assert plan.parameters == plan.logical_parameters == budget.value  # stored exactly as searched
        for f in ("user", "item"):
            dims = np.asarray(plan[f].row_dims)
            assert (dims % 4 == 0).all() and dims.min() >= 4 and dims.max() <= 32
    with pytest.raises(PlanError, match=r"below the 800 of 4 \(the size multiple\) per row"):
        ScallSearcher(
            Budget(10 * 8 + 200 * 3, "parameters"), 32, action=(0.5, 0.5, 0.5), other_dim=8, multiple=4
        ).initial_plan(["user", "item", "tags"], CAPACITY)
    with pytest.raises(ValueError, match="divide d_max"):
        ScallSearcher(budget, 30, action=(0.5, 0.5, 0.5), multiple=4)


# ---- the policy step and SCALL learning in the job ----------------------------------------------------------------


class _ShareEnv:
    """A stand-in for the job's environment: fitness rises with the users' share of the parameters (a bandit the
    policy can learn); records every call."""

    def __init__(self, rows: Mapping[str, int] | None = None) -> None:
        self.rows = rows
        self.calls: list[dict[str, np.ndarray]] = []

    def fitness(self, sizes: Mapping[str, np.ndarray]) -> float:
        if self.rows is not None:
            assert {f: s.size for f, s in sizes.items()} == self.rows  # one size per vocabulary row
        self.calls.append({f: np.array(s) for f, s in sizes.items()})
        users, items = float(sizes["user"].sum()), float(sizes["item"].sum())
        return 0.5 + 0.1 * users / (users + items)

    def row_quality(self, sizes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise AssertionError("SCALL scores whole plans, never rows")


def _share_fitness(users: np.ndarray, items: np.ndarray) -> float:
    return 0.5 + 0.1 * float(users.sum()) / float(users.sum() + items.sum())


def _learner_env(cfg: ScallConfig) -> tuple[np.ndarray, np.ndarray, torch.Tensor, object, object]:
    rng = np.random.default_rng(0)
    uf, itf = rng.zipf(1.5, 30).astype(np.float64), rng.zipf(1.5, 50).astype(np.float64)
    zeros = np.zeros(cfg.d_max)

    def sizes(action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return sample_sizes(action, uf, itf, 80 * 5, cfg)

    def next_state(ratio: float, users: np.ndarray, items: np.ndarray) -> torch.Tensor:
        return scall_state(uf, itf, ratio, zeros, zeros, users, items, cfg)

    return uf, itf, scall_state(uf, itf, 1.0, zeros, zeros, *sizes(np.full(3, 0.5)), cfg), sizes, next_state


def test_learner_step_is_act_sample_score_store_update_as_a_plain_reference() -> None:
    cfg = ScallConfig(d_max=16, user_groups=8, hidden=16)
    _, _, state, sizes, next_state = _learner_env(cfg)
    learner = ScallLearner(cfg, seed=3)
    agent, replay = SacAgent(cfg, seed=3), RecencyReplay(cfg.replay_capacity, np.random.default_rng(3))
    ref_state = state
    for _ in range(15):  # past 12 transitions: the large batch
        out = learner.step(state, sizes, _share_fitness, 0.55, next_state)  # type: ignore[arg-type]
        # The reference: the loop `scall_search` had before the step was shared.
        action, mean = agent.act(ref_state)
        users, items = sizes(action)  # type: ignore[operator]
        ratio = _share_fitness(users, items) / 0.55
        after = next_state(ratio, users, items)  # type: ignore[operator]
        replay.add(Transition(ref_state, torch.from_numpy(action).float(), cfg.rescale_reward(ratio), after))
        for _ in range(cfg.updates_per_step):
            agent.update(replay.sample(cfg.batch_size(len(replay))))
        np.testing.assert_array_equal(out.action, action)
        np.testing.assert_array_equal(out.mean_action, mean)
        np.testing.assert_array_equal(out.user_sizes, users)
        assert out.ratio == ratio and out.reward == cfg.rescale_reward(ratio)
        torch.testing.assert_close(out.next_state, after, rtol=0, atol=0)
        state, ref_state = out.next_state, after
    assert learner.agent.updates == agent.updates == 45 and len(learner.replay) == 15
    for p, q in zip(learner.agent.actor.parameters(), agent.actor.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_learner_state_dict_resumes_exactly() -> None:
    cfg = ScallConfig(d_max=16, user_groups=8, hidden=16)
    _, _, state0, sizes, next_state = _learner_env(cfg)
    first = ScallLearner(cfg, seed=0)
    state = state0
    for _ in range(7):
        state = first.step(state, sizes, _share_fitness, 0.55, next_state).next_state  # type: ignore[arg-type]
    saved = _torch_round_trip(first.state_dict())
    second = ScallLearner(cfg, seed=99)  # other weights and RNGs: everything must come from the state
    second.load_state_dict(saved)  # type: ignore[arg-type]
    a = b = state
    for _ in range(8):  # crosses the large-batch threshold after the cut
        oa = first.step(a, sizes, _share_fitness, 0.55, next_state)  # type: ignore[arg-type]
        ob = second.step(b, sizes, _share_fitness, 0.55, next_state)  # type: ignore[arg-type]
        np.testing.assert_array_equal(oa.action, ob.action)
        a, b = oa.next_state, ob.next_state
    sa, sb = first.state_dict(), second.state_dict()
    for key in ("actor", "critic", "target_critic"):
        for name, t in sa["agent"][key].items():
            torch.testing.assert_close(t, sb["agent"][key][name], rtol=0, atol=0)
    for k, v in sa["agent"]["critic_optimizer"]["state"].items():  # Adam moments too
        torch.testing.assert_close(v["exp_avg_sq"], sb["agent"]["critic_optimizer"]["state"][k]["exp_avg_sq"])
    assert sa["replay"]["rng"] == sb["replay"]["rng"] and len(sa["replay"]["items"]) == 15


def _learning_searcher(seed: int = 0, env_steps: int = 10, **config: Any) -> ScallSearcher:
    cfg = ScallConfig(d_max=32, user_groups=8, hidden=32, **config)
    budget = Budget(10 * 8 + 200 * 12, "parameters")
    return ScallSearcher(budget, 32, config=cfg, other_dim=8, multiple=4, seed=seed, env_steps=env_steps, env_batches=2)


def test_searcher_learns_on_the_environment_and_every_plan_is_exactly_the_budget() -> None:
    """The policy steps on each day's environment, rewarded against the ES plan there, and moves toward what the
    environment rewards (here: a larger user share)."""
    bandit: dict[str, Any] = {"gamma": 0.0, "actor_lr": 3e-3, "critic_lr": 3e-3, "entropy_alpha": 0.05}
    searcher = _learning_searcher(**bandit)
    assert searcher.env_batches == 2  # the job holds out two batches a day
    initial = searcher.initial_plan(["user", "item", "tags"], CAPACITY)
    es_users = np.asarray(initial["user"].row_dims)
    fresh = _learning_searcher(**bandit)  # the same seed, never stepped
    env = _ShareEnv({"user": 80, "item": 120})
    actions = []
    for stats in _days(4, seed=1):
        searcher.observe(replace(stats, env=env))
        plan = searcher.propose()
        assert plan is not None
        assert plan.parameters == plan.logical_parameters == 10 * 8 + 200 * 12  # exactly, every day
        assert all((np.asarray(plan[f].row_dims) % 4 == 0).all() for f in ("user", "item"))
        actions.append(plan.provenance["action"])
    assert len(env.calls) == 4 * (1 + 10)  # per day: the ES reference, then the steps
    np.testing.assert_array_equal(env.calls[0]["user"], es_users)  # the reference is the ES plan
    assert len(searcher.history) == 40 and searcher.agent is not None and searcher.agent.updates == 120
    assert all(
        h["reference"] == pytest.approx(_share_fitness(es_users, env.calls[0]["item"])) for h in searcher.history
    )
    assert searcher.last_ratio == pytest.approx(searcher.history[-1]["fitness"] / searcher.history[-1]["reference"])
    assert fresh.agent is not None
    untrained = fresh.agent.actor.state_dict()
    assert any(not torch.equal(t, untrained[k]) for k, t in searcher.agent.actor.state_dict().items())
    assert actions[0] != actions[-1]
    assert actions[-1][0] > 0.85, actions  # the user share the environment rewards (0.4 is ES's, ~0.5 untrained)


def test_searcher_learning_resumes_exactly_through_torch_save() -> None:
    days = _days(4, seed=2)
    first = _learning_searcher(seed=5, env_steps=3)
    first.initial_plan(["user", "item", "tags"], CAPACITY)
    for stats in days[:2]:
        first.observe(replace(stats, env=_ShareEnv()))
        first.propose()
    state = _torch_round_trip(first.state_dict())
    second = _learning_searcher(seed=5, env_steps=3)
    second.initial_plan(["user", "item", "tags"], CAPACITY)
    second.load_state_dict(state)  # type: ignore[arg-type]
    for stats in days[2:]:
        first.observe(replace(stats, env=_ShareEnv()))
        second.observe(replace(stats, env=_ShareEnv()))
        pa, pb = first.propose(), second.propose()
        assert pa is not None and pb is not None
        assert pa.provenance["action"] == pb.provenance["action"]
        for f in ("user", "item"):
            np.testing.assert_array_equal(pa[f].row_dims, pb[f].row_dims)
    assert first.history == second.history and first.last_ratio == second.last_ratio
    assert first.agent is not None and second.agent is not None
    for p, q in zip(first.agent.critic.parameters(), second.agent.critic.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_searcher_learning_needs_an_environment_and_a_usable_reference(caplog: pytest.LogCaptureFixture) -> None:
    searcher = _learning_searcher(env_steps=2)
    searcher.initial_plan(["user", "item", "tags"], CAPACITY)
    day = _days(1)[0]
    with pytest.raises(PlanError, match="env_steps=0"):
        searcher.observe(day)

    class _Zero:
        def fitness(self, sizes: Mapping[str, np.ndarray]) -> float:
            return 0.0

        def row_quality(self, sizes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            raise AssertionError("unused")

    searcher.observe(replace(day, env=_Zero()))  # an AUC of nothing: no learning today, a warning
    assert searcher.agent is not None and searcher.agent.updates == 0 and "does not learn today" in caplog.text
    plan = searcher.propose()
    assert plan is not None and plan.parameters == 10 * 8 + 200 * 12


def test_fixed_action_holds_out_nothing_and_settings_are_checked() -> None:
    fixed = ScallSearcher.from_config(ScallSettings(action=(0.5, 0.1, 0.1)), _context())
    assert fixed.env_batches == 0 and fixed.env_steps == 0 and fixed.agent is None
    learned = ScallSearcher.from_config(ScallSettings(), _context())
    assert (learned.env_steps, learned.env_batches) == (4, 4) and learned.agent is not None
    untrained = ScallSearcher.from_config(ScallSettings(env_steps=0), _context())
    assert untrained.env_batches == 0  # nothing learned: nothing held out
    with pytest.raises(ValueError, match="env_batches=0 holds none out"):
        ScallSettings(env_batches=0)
    ScallSettings(env_batches=0, env_steps=0)
    ScallSettings(action=(0.5, 0.1, 0.1), env_batches=0)
    with pytest.raises(ValueError, match="env_steps must be an integer >= 0, got -1"):
        ScallSettings(env_steps=-1)


def _context() -> SearchContext:
    return SearchContext("scall", features=("user", "item"), dim=16, budget=200 * 8)
