"""CIESS: the random walk, the TD3 target and action choice against slow references, and the search end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.lightgcn import BPRRecipe, GraphTask
from search.ciess import (
    Actor,
    CiessConfig,
    Critic,
    Td3Agent,
    ciess_search,
    normalize_size,
    random_walk,
    td3_target,
    to_size,
    transition_matrix,
)
from search.rowlevel import SupernetEnv, kept_budget
from sharding.plan import PlanError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_transition_matrix_equals_slow_reference() -> None:
    d_max, radius = 20, 5
    got = transition_matrix(d_max, radius)
    for d in range(1, d_max + 1):
        weights = {e: 1.0 / abs(e - d) for e in range(1, d_max + 1) if 0 < abs(e - d) <= radius}
        total = sum(weights.values())
        for e in range(1, d_max + 1):
            assert abs(float(got[d - 1, e - 1]) - weights.get(e, 0.0) / total) < 1e-12


def test_random_walk_follows_the_transition_probabilities() -> None:
    matrix = transition_matrix(128, 5)
    n = 200_000
    for start in (1, 64, 126):
        nodes = random_walk(torch.full((n,), start), 1, matrix, torch.Generator().manual_seed(start))
        assert (nodes[:, 0] == start).all()
        freq = torch.bincount(nodes[:, 1] - 1, minlength=128).double() / n
        torch.testing.assert_close(freq, matrix[start - 1], atol=4e-3, rtol=0)
    walk = random_walk(torch.tensor([1, 128, 50]), 5, matrix, torch.Generator().manual_seed(0))
    assert walk.shape == (3, 6) and walk.min() >= 1 and walk.max() <= 128
    assert ((walk[:, 1:] - walk[:, :-1]).abs() <= 5).all() and ((walk[:, 1:] - walk[:, :-1]) != 0).all()


def test_td3_target_equals_per_sample_reference() -> None:
    torch.manual_seed(0)
    actor, critics = Actor(16), (Critic(16), Critic(16))
    n, d_max, gamma = 12, 128, 0.99
    reward, done = torch.randn(n), (torch.rand(n) < 0.3).float()
    next_state = torch.rand(n, 3) * 2 - 1
    noise = (torch.randn(n) * 2).clamp(-5, 5)
    got = td3_target(reward, done, next_state, actor, critics, noise, gamma, d_max)
    for i in range(n):
        s = next_state[i : i + 1]
        with torch.no_grad():
            raw = 1 + (float(actor(s)) + 1) / 2 * (d_max - 1)
            size = min(max(raw + float(noise[i]), 1), d_max)
            a = torch.tensor([(size - 1) / (d_max - 1) * 2 - 1])
            q = min(float(critics[0](s, a)), float(critics[1](s, a)))
        expected = float(reward[i]) + gamma * (1 - float(done[i])) * q
        assert abs(float(got[i]) - expected) < 1e-5


def test_size_mapping_round_trips() -> None:
    sizes = torch.arange(1, 129).float()
    torch.testing.assert_close(to_size(normalize_size(sizes, 128), 128), sizes)
    assert (
        float(normalize_size(torch.tensor([1]), 128)) == -1.0 and float(normalize_size(torch.tensor([128]), 128)) == 1
    )


def test_exploring_choice_is_the_best_walk_node_by_the_first_critic() -> None:
    torch.manual_seed(0)
    config = CiessConfig(d_max=64, noise_sigma=0.0, hidden=16)
    agent = Td3Agent(config, 10)
    state = torch.rand(10, 3) * 2 - 1
    generator = torch.Generator().manual_seed(5)
    replay = torch.Generator()
    replay.set_state(generator.get_state())
    got = agent.choose(state, generator, explore=True)
    start = to_size(agent.actor(state), 64).round().clamp(1, 64).long()
    nodes = random_walk(start, config.walk_steps, transition_matrix(64, config.walk_radius), replay)
    for i in range(10):
        with torch.no_grad():
            q = [float(agent.critics[0](state[i : i + 1], normalize_size(nodes[i, j : j + 1], 64))) for j in range(6)]
        assert int(got[i]) == int(nodes[i, int(np.argmax(q))])
    assert torch.equal(agent.choose(state, generator, explore=False), start)


def test_td3_updates_learn_a_size_preference() -> None:
    """One-step episodes rewarding size 10: the actor's choice moves there."""
    torch.manual_seed(0)
    config = CiessConfig(d_max=32, hidden=32, batch=256, policy_delay=1, grad_clip=10.0, updates=1, gamma=0.0)
    agent = Td3Agent(config, 200)
    generator = torch.Generator().manual_seed(0)
    state = torch.zeros(200, 3)
    before = float(agent.choose(state, generator, explore=False).float().mean())
    for _ in range(300):
        sizes = torch.randint(1, 33, (200,), generator=generator)
        reward = -(((sizes.float() - 10) / 32) ** 2)
        agent.store(state, sizes, reward, state, True)
        agent.update(generator)
    after = float(agent.choose(state, generator, explore=False).float().mean())
    assert abs(after - 10) < 3 < abs(before - 10)


def _task() -> GraphTask:
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 40, 700), rng.zipf(1.6, 700) % 30
    return GraphTask((users[:500], items[:500]), (users[500:], items[500:]), 40, 30)


def test_ciess_search_meets_the_budget_exactly_and_is_deterministic() -> None:
    task = _task()
    env = SupernetEnv(task, 16, BPRRecipe(steps=20, batch=256), seed=0)
    freq = np.bincount(task.train_users.numpy(), minlength=40), np.bincount(task.train_items.numpy(), minlength=30)
    budget = kept_budget(0.8, 70, 16)
    config = CiessConfig(d_max=16, episodes=2, iterations=3, batch=64, updates=2, hidden=32)
    result = ciess_search(env, *freq, budget, config, seed=0)
    assert result.evaluations == 6 and len(result.history) == 6
    assert result.users.sum() + result.items.sum() == budget
    assert result.users.min() >= 1 and max(result.users.max(), result.items.max()) <= 16
    assert all(abs(h["kept"] - budget / (16 * 70)) < 1e-9 for h in result.history)
    assert result.quality == max(h["quality"] for h in result.history) == result.top[0][0]
    again = ciess_search(env, *freq, budget, config, seed=0)
    assert np.array_equal(again.users, result.users) and np.array_equal(again.items, result.items)
    with pytest.raises(PlanError, match="below one dim per row"):
        ciess_search(env, *freq, 69, config)
    with pytest.raises(ValueError, match="frequencies are for 39 users"):
        ciess_search(env, freq[0][:39], freq[1], budget, config)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("episodes", 0, "episodes=0 must be >= 1"),
        ("d_max", 1, "d_max >= 2"),
        ("gamma", 1.5, "gamma"),
        ("lam", -1.0, "lam"),
        ("policy_delay", 0, "policy_delay"),
    ],
)
def test_bad_config_is_rejected_naming_the_field(field: str, value: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CiessConfig(**{field: value})  # type: ignore[arg-type]
