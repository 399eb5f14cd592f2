"""ESAPN's distinct-state policy path (search/esapn.py: `policy_states`, `weighted_batch_norm`,
`EsapnPolicy.state_logits`, `state_reinforce_loss`, and `EsapnSearcher.propose` / `_reinforce` built on them)
against the per-row forward it replaces.

The plainly correct reference is the per-row network itself (`EsapnPolicy.forward` on every row) run in float64.
The float32 per-row forward is not exact enough to be the reference at scale: torch's CPU BatchNorm accumulates its
batch statistics in float32 over the n rows, an error that grows with n (about 1e-5 in the logits at 5,000 rows,
5e-4 at 200,000 and 3e-3 at 1,000,000), while the distinct path runs the network on k ≤ `popularity_buckets ×
num_sizes` states in float64 and rounds the logits to float32 (about 5e-7 at any n). On a 1,000,000-row day (outside
the tests) the old float32 searcher's sampled actions differed from the float64 reference's in 42 rows, the distinct
path's in none.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from search.base import DayStats
from search.esapn import (
    ENLARGE,
    KEEP,
    EsapnConfig,
    EsapnController,
    EsapnPolicy,
    EsapnSearcher,
    policy_states,
    popularity_bucket,
    reinforce_loss,
    size_ladder,
    state_reinforce_loss,
)
from sharding.plan import Budget

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = EsapnConfig()
TOP = CONFIG.num_sizes - 1
# Parameters the policy's training-mode output does not depend on (the hidden BatchNorm undoes a constant shift):
# their gradient is zero, so Adam would move them by ±lr on rounding noise alone.
INVARIANT = ("popularity_norm.bias", "net.0.bias")


def _rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows' (popularity bucket, size index): Zipf-like counts, random sizes (the top one included), and one
    row alone in its state (bucket 31, size 2: no other count reaches 2^31)."""
    rng = np.random.default_rng(seed)
    counts = np.minimum(rng.zipf(1.4, n), 2**20)
    counts[n // 2] = 2**31
    size = rng.integers(0, CONFIG.num_sizes, n)
    size[n // 2] = 2
    return popularity_bucket(torch.from_numpy(counts), CONFIG.popularity_buckets), torch.from_numpy(size)


def _policy(seed: int = 0) -> EsapnPolicy:
    """A policy whose BatchNorm affine parameters and running statistics are not their defaults (so a wrong
    weighting or update shows)."""
    torch.manual_seed(seed)
    policy = EsapnPolicy(CONFIG)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in (policy.popularity_norm, policy.net[1]):
            assert isinstance(bn, torch.nn.BatchNorm1d)
            for name in ("weight", "bias", "running_mean"):
                t = getattr(bn, name)
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
            assert bn.running_var is not None and bn.num_batches_tracked is not None
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.num_batches_tracked.fill_(3)
    return policy


def _buffers(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in policy.named_buffers()}


def test_policy_states_group_rows_as_torch_unique_does() -> None:
    bucket, size = _rows(5000, seed=0)
    states = policy_states(bucket, size, CONFIG.popularity_buckets, CONFIG.num_sizes)
    key, inverse, counts = torch.unique(bucket * CONFIG.num_sizes + size, return_inverse=True, return_counts=True)
    assert torch.equal(states.bucket * CONFIG.num_sizes + states.size_index, key)
    assert torch.equal(states.inverse, inverse) and torch.equal(states.counts, counts)
    assert states.num_rows == 5000 and int(states.counts.sum()) == 5000
    assert torch.equal(states.bucket[states.inverse], bucket) and torch.equal(states.size_index[states.inverse], size)
    lone = int(states.inverse[2500])
    assert (int(states.bucket[lone]), int(states.size_index[lone]), int(states.counts[lone])) == (31, 2, 1)
    with pytest.raises(ValueError, match=r"size indices must lie in \[0, 6\), got \[0, 6\]"):
        policy_states(bucket[:3], torch.tensor([0, 6, 1]), CONFIG.popularity_buckets, CONFIG.num_sizes)
    with pytest.raises(ValueError, match=r"popularity buckets must lie in \[0, 32\), got \[-1, 3\]"):
        policy_states(torch.tensor([-1, 3]), size[:2], CONFIG.popularity_buckets, CONFIG.num_sizes)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_distinct_forward_equals_the_per_row_forward_and_its_batchnorm_update(momentum: float | None) -> None:
    policy = _policy()
    for bn in (policy.popularity_norm, policy.net[1]):
        assert isinstance(bn, torch.nn.BatchNorm1d)
        bn.momentum = momentum
    reference = copy.deepcopy(policy).double()  # the per-row forward, in float64
    per_row32 = copy.deepcopy(policy)  # the per-row forward as the searcher ran it before, in float32
    keys = list(policy.state_dict())
    for call in range(3):  # the running statistics' updates compound over calls
        bucket, size = _rows(6000 + call, seed=call)
        got = policy.forward_distinct(bucket, size)
        want = reference(bucket, size)
        assert got.dtype == torch.float32 and got.shape == (6000 + call, 2)
        at_top = size == TOP
        assert torch.isneginf(got[at_top, ENLARGE]).all() and torch.isfinite(got[~at_top]).all()
        assert torch.isfinite(got[:, KEEP]).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, per_row32(bucket, size), rtol=1e-4, atol=1e-4)
        for name, buffer in reference.named_buffers():
            mine = dict(policy.named_buffers())[name]
            if name.endswith("num_batches_tracked"):
                assert int(mine) == int(buffer) == 4 + call, name
            else:
                torch.testing.assert_close(mine.double(), buffer, rtol=1e-6, atol=1e-6, msg=name)
    assert list(policy.state_dict()) == keys  # nothing added: saved checkpoints still load
    assert all(v.dtype == per_row32.state_dict()[k].dtype for k, v in policy.state_dict().items())


def test_distinct_forward_in_eval_mode_or_on_one_row_is_the_per_row_forward_and_leaves_the_buffers() -> None:
    policy = _policy()
    bucket, size = _rows(3000, seed=4)
    before = _buffers(policy)
    one = policy.forward_distinct(bucket[:1], size[:1])  # one row: served from the running statistics
    assert policy.training  # and the policy stays in training mode
    torch.testing.assert_close(one, policy(bucket[:1], size[:1]), rtol=0, atol=0)
    policy.eval()
    torch.testing.assert_close(policy.forward_distinct(bucket, size), policy(bucket, size), rtol=1e-6, atol=1e-6)
    for name, buffer in policy.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_state_reinforce_loss_equals_the_per_row_loss_and_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    k, n = 40, 5000
    logits = torch.randn(k, 2, generator=gen, dtype=torch.float64)
    logits[:7, ENLARGE] = float("-inf")  # states at the top size: forced to keep
    states = torch.randint(0, k, (n,), generator=gen)
    actions = torch.where(states < 7, KEEP, torch.randint(0, 2, (n,), generator=gen))
    advantages = torch.randn(n, generator=gen, dtype=torch.float64)
    per_state = logits.clone().requires_grad_(True)
    per_row = logits.clone().requires_grad_(True)
    got = state_reinforce_loss(per_state, states, actions, advantages)
    want = reinforce_loss(per_row[states], actions, advantages, torch.zeros(n, dtype=torch.float64))
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    got.backward()
    want.backward()
    assert per_state.grad is not None and per_row.grad is not None
    torch.testing.assert_close(per_state.grad, per_row.grad, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(per_state.grad).all() and float(per_state.grad[:7].abs().sum()) == 0.0


def _controller(reference: bool) -> EsapnController:
    controller = EsapnController(("user", "item"), CONFIG, seed=5, generator=torch.Generator().manual_seed(0))
    if reference:
        _to_float64(controller)
    return controller


def _to_float64(controller: EsapnController) -> None:
    """The controller's policies in float64, with fresh Adam optimisers on the converted parameters."""
    for e, policy in controller.policies.items():
        policy.double()
        controller.optimizers[e] = torch.optim.Adam(policy.parameters(), lr=controller.config.controller_lr)


def test_distinct_reinforce_step_equals_the_per_row_step() -> None:
    fast, slow = _controller(False), _controller(True)
    bucket, size = _rows(8000, seed=1)
    rng = np.random.default_rng(2)
    use = torch.from_numpy(rng.random(8000) < 0.7)
    with torch.no_grad():
        probs = torch.softmax(fast.logits("user", bucket, size), 1)
    actions = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(1)[use]
    reward = torch.from_numpy(rng.random(int(use.sum()))).float()
    baseline = torch.from_numpy(rng.random(int(use.sum()))).float()
    # As the searcher's _reinforce: the policy runs on the whole batch, the loss on the used rows.
    states = fast.states("user", bucket, size)
    got = fast.state_logits("user", states)
    got_loss = state_reinforce_loss(got, states.inverse[use], actions, reward - baseline)
    want_loss = reinforce_loss(slow.logits("user", bucket, size)[use], actions, reward.double(), baseline.double())
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
    got_loss.backward()
    want_loss.backward()
    fast_grads = {name: p.grad for name, p in fast.policies["user"].named_parameters()}
    slow_grads = {name: p.grad for name, p in slow.policies["user"].named_parameters()}
    assert fast_grads.keys() == slow_grads.keys()
    scale = max(float(g.abs().max()) for g in slow_grads.values() if g is not None)
    for name, want_grad in slow_grads.items():
        got_grad = fast_grads[name]
        assert got_grad is not None and want_grad is not None, name
        assert got_grad.dtype == torch.float32, name
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
    # Both paths give the invariant biases zero gradient up to float64 rounding (the float32 per-row loss gave
    # rounding noise, on which Adam moved them by ±lr).
    for name in INVARIANT:
        assert float(fast_grads[name].abs().max()) < 1e-9 * scale, name  # type: ignore[union-attr]

    # The controller's step on each path: the same loss, and the same parameters and buffers after the Adam step.
    fast, slow = _controller(False), _controller(True)
    initial = {name: p.detach().clone() for name, p in slow.policies["user"].named_parameters()}
    states = fast.states("user", bucket, size)
    got = fast.update_states("user", fast.state_logits("user", states), states.inverse[use], actions, reward, baseline)
    want = slow.update("user", slow.logits("user", bucket, size)[use], actions, reward.double(), baseline.double())
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    fast_params = dict(fast.policies["user"].named_parameters())
    for name, q in slow.policies["user"].named_parameters():
        torch.testing.assert_close(fast_params[name].detach().double(), q.detach(), rtol=2e-7, atol=1e-7, msg=name)
        if name not in INVARIANT:  # the step moved it (Adam's first step: about lr = 1e-4 per coordinate)
            assert float((q.detach() - initial[name]).abs().max()) > 5e-5, name
    fast_buffers = dict(fast.policies["user"].named_buffers())
    for name, buffer in slow.policies["user"].named_buffers():
        torch.testing.assert_close(fast_buffers[name].double(), buffer.double(), rtol=1e-6, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------- the searcher on large days


class _PerRowSearcher(EsapnSearcher):
    """The searcher as it was before the distinct-state path, with its policies in float64: `propose` runs the
    policy on every row and samples from the per-row probabilities; `_reinforce` takes the per-row loss. Only the
    two policy hooks differ from the searcher under test; sampling, the budget fit and the rewards are its own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _to_float64(self.controller)

    def _row_probabilities(self, f: str, bucket: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(self.controller.logits(f, bucket, size), dim=1).float()

    def _policy_step(
        self,
        f: str,
        bucket: torch.Tensor,
        size: torch.Tensor,
        use: torch.Tensor,
        actions: torch.Tensor,
        reward: torch.Tensor,
        baseline: torch.Tensor,
    ) -> torch.Tensor:
        logits = self.controller.logits(f, bucket, size)
        return self.controller.update(f, logits[use], actions, reward.double(), baseline.double())


CAPACITY = {"user": 160_000, "item": 60_000, "tags": 5}


def _large_days(days: int, seed: int) -> list[DayStats]:
    """Days of a large stream: about 200,000 user and item rows seen a day with Zipf-like counts, each row's loss
    a noisy function of its count."""
    rng = np.random.default_rng(seed)
    counts = {f: np.zeros(CAPACITY[f], dtype=np.int64) for f in ("user", "item")}
    out = []
    for day in range(days):
        losses = {}
        for f, total in counts.items():
            n = total.size
            seen = rng.random(n) < 0.92
            total += np.where(seen, np.minimum(rng.zipf(1.3, n), 10**6), 0)
            losses[f] = np.where(seen, 0.7 - 0.01 * np.log1p(total) + rng.normal(0, 0.05, n), np.nan)
        out.append(
            DayStats(
                f"2024-01-{day + 1:02d}",
                day,
                {f: c.size for f, c in counts.items()},
                {f: c.copy() for f, c in counts.items()},
                {},
                losses,
            )
        )
    return out


@pytest.mark.parametrize("budget", [None, Budget(5 * 8 + 220_000 * 6, "parameters")])
def test_searcher_on_large_days_makes_the_per_row_searchers_plans(budget: Budget | None) -> None:
    config = EsapnConfig(candidate_dims=size_ladder(32), hidden=64)  # 4, 8, 16, 32
    fast = EsapnSearcher(budget, config=config, other_dim=8, seed=7)
    slow = _PerRowSearcher(budget, config=config, other_dim=8, seed=7)
    for searcher in (fast, slow):
        searcher.initial_plan(["user", "item", "tags"], CAPACITY)
        if budget is None:  # rows start spread over the sizes, the top (enlarge masked) included
            for f in ("user", "item"):
                searcher.size_index[f][:] = np.random.default_rng(11).integers(0, 4, CAPACITY[f])
    enlarged, grew = [], []
    for stats in _large_days(4, seed=3):
        plans = []
        for searcher in (fast, slow):
            searcher.observe(stats)
            plans.append(searcher.propose())
        assert (plans[0] is None) == (plans[1] is None)
        grew.append(plans[0] is not None)
        for f in ("user", "item"):
            assert len(fast.trials[f]) == len(slow.trials[f])
            for a, b in zip(fast.trials[f], slow.trials[f], strict=True):
                assert a.keys() == b.keys()
                for key in a:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{f} {key}")
            np.testing.assert_array_equal(fast.size_index[f], slow.size_index[f])
            enlarged.append(int((fast.trials[f][-1]["action"] == ENLARGE).sum()))
            if plans[0] is not None and plans[1] is not None:
                np.testing.assert_array_equal(plans[0][f].row_dims, plans[1][f].row_dims)
    assert fast.trials["user"][-1]["rows"].size > 140_000 and min(enlarged) > 1000
    if budget is None:
        assert grew == [True] * 4
    else:  # the budget binds on day 2: some sampled enlargements were not carried out, then none fits any more
        assert grew == [True, True, False, False]
        assert fast.trials["user"][1]["executed"].sum() < (fast.trials["user"][1]["action"] == ENLARGE).sum()
        assert budget.value - fast._spent(fast._plan({}, check=False)) < 4
    # Days 3 and 4 rewarded the proposals of days 1 and 2, both policies: the same history, the same policies.
    assert len(fast.history) == len(slow.history) == 4
    for mine, theirs in zip(fast.history, slow.history, strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine:
            if key.startswith("policy_loss"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key
            else:
                assert mine[key] == theirs[key], key
    for f in ("user", "item"):
        fast_state = fast.controller.policies[f].state_dict()
        for name, value in slow.controller.policies[f].state_dict().items():
            if name.endswith("num_batches_tracked"):
                assert int(fast_state[name]) == int(value) == 6, name  # four proposals, two policy steps
            else:
                torch.testing.assert_close(fast_state[name].double(), value.double(), rtol=1e-5, atol=1e-5, msg=name)
