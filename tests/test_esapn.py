"""ESAPN (search/esapn.py) against slow, plainly written references."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from models.lightgcn import BPRRecipe, GraphTask, lightgcn_bpr_loss
from search.base import DayStats
from search.esapn import (
    ENLARGE,
    KEEP,
    EsapnConfig,
    EsapnEmbedding,
    EsapnPolicy,
    EsapnResult,
    EsapnSearcher,
    entity_means,
    esapn_plan,
    esapn_search,
    first_fit,
    load_esapn_weights,
    popularity_bucket,
    reinforce_loss,
    sample_actions,
    size_ladder,
)
from search.rowlevel import BucketedTables
from sharding.plan import Budget, PlanError

CONFIG = EsapnConfig()


pytestmark = pytest.mark.usefixtures("one_thread")


DIMS = CONFIG.candidate_dims


def _embedding(num_users: int = 9, num_items: int = 7, seed: int = 0, grow: int = 3) -> EsapnEmbedding:
    """An embedding whose rows are spread over the sizes by `grow` rounds of random enlargements."""
    gen = torch.Generator().manual_seed(seed)
    emb = EsapnEmbedding(num_users, num_items, CONFIG, gen)
    for _ in range(grow):
        for e in ("user", "item"):
            t = emb[e]
            pick = torch.randperm(t.num_rows, generator=gen)[: t.num_rows // 2 + 1]
            emb.enlarge(e, pick[t.sizes[pick] < len(DIMS) - 1])
    return emb


def _slow_row(emb: EsapnEmbedding, entity: str, row: int) -> torch.Tensor:
    """One row's d_max embedding: its table row chained through the transforms, one matrix-vector product at a time."""
    t = emb[entity]
    s = int(t.sizes[row])
    e = t.weights[s][row].detach().double()
    for j in range(s, len(DIMS) - 1):
        e = t.transform(j).weight.detach().double() @ e
    return e.float()


def test_forward_equals_the_per_row_reference() -> None:
    emb = _embedding(grow=6)
    assert len(set(emb["user"].sizes.tolist())) >= 3  # several size groups are exercised
    out = emb()
    ref = torch.stack([_slow_row(emb, "user", r) for r in range(9)] + [_slow_row(emb, "item", r) for r in range(7)])
    assert out.shape == (16, 128)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_enlarge_moves_rows_to_the_next_bucket_as_the_transform_of_their_old_embedding() -> None:
    emb = _embedding(grow=2)
    t = emb["user"]
    before_sizes = t.sizes.clone()
    before_tables = [w.detach().clone() for w in t.weights]
    before_ego = emb().detach()
    rows = torch.tensor([r for r in range(9) if before_sizes[r] < len(DIMS) - 1][:4])
    undo = emb.enlarge("user", torch.cat([rows, rows[:1]]))  # a repeated row grows once

    others = [r for r in range(9) if r not in rows.tolist()]
    assert t.sizes[rows].tolist() == (before_sizes[rows] + 1).tolist()
    assert t.sizes[others].tolist() == before_sizes[others].tolist()
    for r in rows.tolist():
        i = int(before_sizes[r])
        expected = torch.mv(t.transform(i).weight.detach(), before_tables[i][r])
        torch.testing.assert_close(t.weights[i + 1][r].detach(), expected)
    changed = {(int(before_sizes[r]) + 1, r) for r in rows.tolist()}
    for i, w in enumerate(t.weights):
        for r in range(9):
            if (i, r) not in changed:
                assert torch.equal(w.detach()[r], before_tables[i][r]), (i, r)
    # Growing is function-preserving: every row's ego embedding is unchanged (items were not touched at all).
    torch.testing.assert_close(emb().detach(), before_ego, rtol=1e-5, atol=1e-6)

    t.restore(undo)  # a controller trial leaves the model exactly as it was
    assert torch.equal(t.sizes, before_sizes)
    for w, b in zip(t.weights, before_tables, strict=True):
        assert torch.equal(w.detach(), b)


def test_enlarging_at_the_largest_size_is_masked_and_refused() -> None:
    emb = _embedding(num_users=4, grow=0)
    for _ in range(len(DIMS) - 1):
        emb.enlarge("user", torch.tensor([0]))
    assert int(emb["user"].row_dims[0]) == 128
    with pytest.raises(ValueError, match="largest size 128"):
        emb.enlarge("user", torch.tensor([0, 1]))
    assert emb["user"].sizes.tolist() == [5, 0, 0, 0]  # nothing moved

    torch.manual_seed(0)
    policy = EsapnPolicy(CONFIG)
    head = policy.net[-1]
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([-20.0, 20.0]))  # the policy wants to enlarge everyone
    sizes = torch.tensor([5, 5, 0, 3, 5, 1] * 50)
    logits = policy(torch.zeros_like(sizes), sizes)
    at_top = sizes == len(DIMS) - 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        actions = sample_actions(logits, gen)
        assert (actions[at_top] == KEEP).all()
        assert (actions[~at_top] == ENLARGE).all()
    assert (logits.argmax(1)[at_top] == KEEP).all()
    assert torch.isneginf(logits[at_top, ENLARGE]).all()
    assert reinforce_loss(logits, sample_actions(logits, gen), torch.ones(300), torch.zeros(300)).item() < 1e-3


def test_bucketed_plan_reproduces_the_ego_embeddings_and_counts_the_projections() -> None:
    emb = _embedding(num_users=11, num_items=8, grow=4)
    result = EsapnResult(
        CONFIG,
        emb["user"].row_dims.numpy(),
        emb["item"].row_dims.numpy(),
        emb.kept_fraction(),
        [],
        {},
        0.0,
        emb,
    )
    plan = esapn_plan(result)
    tables = BucketedTables(plan)
    load_esapn_weights(tables, emb)
    with torch.no_grad():
        torch.testing.assert_close(tables(), emb())

    rows = int(result.user_sizes.sum() + result.item_sizes.sum())
    projections = sum(sum(d * 128 for d in np.unique(s).tolist()) for s in (result.user_sizes, result.item_sizes))
    assert plan.parameters == rows + projections  # every candidate is a multiple of 4: physical == logical
    assert plan.logical_parameters == rows + projections
    assert plan.parameters == sum(p.numel() for p in tables.parameters())
    assert [f.projection for f in plan.features] == ["linear", "linear"]
    assert result.kept == pytest.approx(rows / (128 * 19))


def test_plan_mismatch_is_refused() -> None:
    emb = _embedding(grow=2)
    result = EsapnResult(
        CONFIG, emb["user"].row_dims.numpy(), emb["item"].row_dims.numpy(), emb.kept_fraction(), [], {}, 0.0, emb
    )
    tables = BucketedTables(esapn_plan(result))
    emb.enlarge("user", torch.nonzero(emb["user"].sizes < len(DIMS) - 1).squeeze(1)[:1])
    with pytest.raises(ValueError, match="row sizes"):
        load_esapn_weights(tables, emb)
    with pytest.raises(ValueError, match="budget"):
        esapn_plan(result, budget=10)


def test_reinforce_loss_equals_the_slow_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 2, generator=gen)
    logits[4, ENLARGE] = float("-inf")  # a masked row, forced to keep
    actions = torch.tensor([0, 1, 1, 0, 0, 1])
    rewards, baselines = torch.rand(6, generator=gen), torch.rand(6, generator=gen)
    expected = 0.0
    for n in range(6):
        a, b = (float(x) for x in logits[n])
        z = math.exp(a) + (math.exp(b) if math.isfinite(b) else 0.0)
        chosen = float(logits[n, int(actions[n])])
        expected -= (chosen - math.log(z)) * (float(rewards[n]) - float(baselines[n]))
    leaf = logits.clone().requires_grad_(True)
    loss = reinforce_loss(leaf, actions, rewards, baselines)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    assert float(leaf.grad[4].abs().sum()) == 0.0  # a forced action carries no gradient


def test_policy_gradient_raises_the_enlarge_probability_when_enlarging_lowers_the_loss() -> None:
    torch.manual_seed(0)
    config = EsapnConfig(popularity_buckets=8, hidden=64)
    policy = EsapnPolicy(config)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    popularity = torch.randint(0, 8, (128,), generator=gen)
    sizes = torch.randint(0, len(DIMS) - 1, (128,), generator=gen)  # never at the top: enlarging is allowed

    def enlarge_prob() -> float:
        with torch.no_grad():
            return float(torch.softmax(policy(popularity, sizes), 1)[:, ENLARGE].mean())

    before = enlarge_prob()
    last_loss = torch.full((128,), 0.5)
    for _ in range(30):
        logits = policy(popularity, sizes)
        actions = sample_actions(logits, gen)
        loss = torch.where(actions == ENLARGE, 0.2, 0.5)  # enlarging always lowers the loss
        batch_loss = reinforce_loss(logits, actions, 1.0 - loss, 1.0 - last_loss)
        optimizer.zero_grad()
        batch_loss.backward()
        optimizer.step()
    after = enlarge_prob()
    assert after > before + 0.3, (before, after)


def test_per_triple_losses_average_to_the_lightgcn_loss_and_entity_means_match_a_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    fu, fi, eu, ei = (torch.randn(n, 8, generator=gen) for n in (5, 6, 5, 6))
    u, p, n = torch.randint(0, 5, (20,), generator=gen), *torch.randint(0, 6, (2, 20), generator=gen)
    per = lightgcn_bpr_loss(fu, fi, eu, ei, u, p, n, decay=1e-2, reduction="none")
    torch.testing.assert_close(per.mean(), lightgcn_bpr_loss(fu, fi, eu, ei, u, p, n, decay=1e-2))
    ids, means = entity_means(u, per)
    for i, m in zip(ids.tolist(), means.tolist(), strict=True):
        assert m == pytest.approx(float(per[u == i].mean()), rel=1e-6)
    assert ids.tolist() == sorted(set(u.tolist()))


def test_popularity_buckets_are_log2_and_capped() -> None:
    counts = torch.tensor([0, 1, 2, 3, 6, 7, 1000, 10**9])
    assert popularity_bucket(counts, 12).tolist() == [0, 1, 1, 2, 2, 3, 9, 11]


def _tiny_task(seed: int = 0) -> GraphTask:
    rng = np.random.default_rng(seed)
    nu, ni = 60, 40
    users = np.concatenate([np.arange(nu), rng.integers(0, nu, 540)])
    items = rng.integers(0, ni, users.size)
    held = rng.integers(0, nu, 100), rng.integers(0, ni, 100)
    return GraphTask((users, items), held, nu, ni)


def test_esapn_search_runs_on_a_tiny_graph() -> None:
    task = _tiny_task()
    config = EsapnConfig(hidden=64, controller_every=3)
    recipe = BPRRecipe(steps=30, batch=256, lr=0.01)
    result = esapn_search(task, config, recipe, seed=0)
    assert result.user_sizes.shape == (60,) and result.item_sizes.shape == (40,)
    assert set(result.user_sizes.tolist()) | set(result.item_sizes.tolist()) <= set(DIMS)
    assert 0.0 < result.kept <= 1.0
    total = result.user_sizes.sum() + result.item_sizes.sum()
    assert result.kept == pytest.approx(total / (128 * 100))
    assert len(result.history) == 30
    assert all(math.isfinite(h["loss"]) for h in result.history)
    controller = [h for h in result.history if "policy_loss_user" in h]
    assert len(controller) == 9  # steps 3, 6, ..., 27
    assert all(math.isfinite(h["advantage_item"]) for h in controller)
    kept = [h["kept"] for h in result.history]
    assert kept == sorted(kept)  # sizes only grow
    assert 0.0 <= result.metrics["recall@20"] <= 1.0
    # Same seed, same search.
    again = esapn_search(task, config, recipe, seed=0)
    assert np.array_equal(again.user_sizes, result.user_sizes) and again.kept == result.kept
    # The exported plan reproduces the searched model's ego embeddings.
    tables = BucketedTables(esapn_plan(result))
    load_esapn_weights(tables, result.embedding)
    with torch.no_grad():
        torch.testing.assert_close(tables(), result.embedding())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"candidate_dims": (4,)}, "candidate_dims"),
        ({"candidate_dims": (2, 4, 8)}, "candidate_dims"),
        ({"candidate_dims": (8, 4, 16)}, "candidate_dims"),
        ({"popularity_dim": 0}, "popularity_dim"),
        ({"hidden": 0}, "hidden"),
        ({"controller_lr": 0.0}, "controller_lr"),
        ({"controller_every": 0}, "controller_every"),
        ({"reward_base": "ave_loss"}, "reward_base"),
        ({"init_std": -1.0}, "init_std"),
        ({"transform_lr_scale": 0.0}, "transform_lr_scale"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"EsapnConfig.{field}"):
        EsapnConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- in the job's day loop

JOB_CAPACITY = {"user": 60, "item": 40, "tags": 5}


class _Stream:
    """Days as the job reports them to the searcher. A third of the rows appear each day (rows 1-10, 'popular', and
    the fallback row 0 every day); a row's loss in a day's evaluation depends on the size it had while the previous
    day was trained (as in the job, where growing zero-pads a row): it falls up to the third size, then rises."""

    def __init__(self, searcher: EsapnSearcher, capacity: dict[str, int], seed: int) -> None:
        self.searcher, self.capacity = searcher, capacity
        self.rng = np.random.default_rng(seed)
        self.counts = {f: np.zeros(capacity[f] - 3, dtype=np.int64) for f in ("user", "item")}  # 3 rows never seen
        self.trained = {f: np.zeros(capacity[f], dtype=np.int64) for f in ("user", "item")}
        self.index = 0

    def next_day(self) -> DayStats:
        losses = {}
        for f, counts in self.counts.items():
            n = counts.size
            day = np.where(self.rng.random(n) < 0.33, self.rng.integers(1, 3, n), 0)
            day[:11] = 50
            counts += day
            size = self.trained[f][:n]
            loss = 0.7 - 0.05 * np.minimum(size, 2) + 0.05 * np.maximum(size - 2, 0) + self.rng.normal(0, 0.005, n)
            losses[f] = np.where(day > 0, loss, np.nan)
            self.trained[f] = self.searcher.size_index[f].copy()  # what the job trains this day with
        stats = DayStats(
            f"2024-01-{self.index + 1:02d}",
            self.index,
            {f: c.size for f, c in self.counts.items()},
            {f: c.copy() for f, c in self.counts.items()},
            {},
            losses,
        )
        self.index += 1
        return stats


def test_searcher_grows_only_seen_rows_one_size_a_day_and_never_over_the_budget() -> None:
    config = EsapnConfig(candidate_dims=size_ladder(32))  # 4, 8, 16, 32
    budget = Budget(5 * 8 + 100 * 12, "parameters")  # tags at 8; on average 12 per user and item row
    searcher = EsapnSearcher(budget, config=config, other_dim=8, seed=0)
    plan = searcher.initial_plan(["user", "item", "tags"], JOB_CAPACITY)
    assert {int(d) for f in ("user", "item") for d in plan[f].row_dims} == {4} and plan["tags"].dim == 8  # type: ignore[union-attr]
    assert plan.parameters == 5 * 8 + 100 * 4 and searcher.propose() is None  # nothing observed yet
    stream = _Stream(searcher, JOB_CAPACITY, seed=0)
    for _ in range(8):
        before = {f: np.asarray(plan[f].row_dims) for f in ("user", "item")}
        stats = stream.next_day()
        searcher.observe(stats)
        proposal = searcher.propose()
        if proposal is None:
            continue
        plan = proposal
        assert plan.parameters <= budget.value and plan.parameters == plan.logical_parameters
        for f in ("user", "item"):
            after = np.asarray(plan[f].row_dims)
            grew = after != before[f]
            seen = np.zeros(JOB_CAPACITY[f], dtype=bool)
            seen[: stats.row_losses[f].size] = np.isfinite(stats.row_losses[f])
            assert not (grew & ~seen).any()  # only rows seen on the day act
            assert not grew[0]  # nor the fallback row, which serves unseen ids
            assert (after[grew] == 2 * before[f][grew]).all()  # one step up the ladder (4 → 8 → 16 → 32)
            assert (after >= before[f]).all()  # sizes only grow
    assert budget.value - plan.parameters < 4  # the budget binds: no enlargement fits any more
    for f in ("user", "item"):
        assert np.asarray(plan[f].row_dims)[[0, -3, -2, -1]].tolist() == [4, 4, 4, 4]  # fallback, never seen


def test_searcher_carries_out_the_most_likely_enlargements_that_fit() -> None:
    config = EsapnConfig(candidate_dims=size_ladder(32))
    searcher = EsapnSearcher(Budget(20 * 4 + 5, "parameters"), config=config, seed=0)
    searcher.initial_plan(["user", "item"], {"user": 10, "item": 10})  # 80 parameters: 5 left

    def chosen(sizes: list[int], probs: list[float]) -> dict[str, np.ndarray]:
        n = len(sizes)
        return {
            "rows": np.arange(1, n + 1),
            "size": np.asarray(sizes),
            "action": np.full(n, ENLARGE),
            "executed": np.ones(n, dtype=bool),
            "p_enlarge": np.asarray(probs),
        }

    # The likeliest costs 8 (8 → 16) and does not fit; the next, 4 → 8 for 4, does: first fit, not first refusal.
    trial = {"user": chosen([1, 0], [0.9, 0.1])}
    searcher._fit_budget(trial)
    assert trial["user"]["executed"].tolist() == [False, True]
    # Two enlargements of 4 and room for one: the likelier, whichever feature it is in.
    trial = {"user": chosen([0], [0.3]), "item": chosen([0], [0.6])}
    searcher._fit_budget(trial)
    assert trial["user"]["executed"].tolist() == [False] and trial["item"]["executed"].tolist() == [True]
    # A tie goes to users, then to the lower row.
    trial = {"user": chosen([0, 0], [0.5, 0.5]), "item": chosen([0], [0.5])}
    searcher._fit_budget(trial)
    assert trial["user"]["executed"].tolist() == [True, False] and trial["item"]["executed"].tolist() == [False]


def test_searcher_policy_step_raises_the_log_probability_of_actions_with_a_positive_advantage() -> None:
    capacity = {"user": 1000, "item": 800, "tags": 5}
    config = EsapnConfig(candidate_dims=size_ladder(128), controller_lr=1e-2, hidden=32)
    searcher = EsapnSearcher(None, config=config, other_dim=8, seed=0)
    searcher.initial_plan(["user", "item", "tags"], capacity)
    stream = _Stream(searcher, capacity, seed=1)
    correlations = []
    for _ in range(6):
        stats = stream.next_day()
        due = {f: ts[0] for f, ts in searcher.trials.items() if ts and "before" in ts[0]}
        before = {f: copy.deepcopy(p) for f, p in searcher.controller.policies.items()}
        searcher.observe(stats)
        for f, trial in due.items():
            # The proposal of two days ago, on the rows evaluated on both days since: R − b = their loss drop over
            # the day they trained at the new size.
            now = np.asarray(stats.row_losses[f])[trial["rows"]]
            use = np.isfinite(now) & np.isfinite(trial["before"])
            gain = trial["before"][use] - now[use]
            inputs = (torch.from_numpy(trial["bucket"]), torch.from_numpy(trial["size"]))
            actions = torch.from_numpy(trial["action"])[:, None]
            with torch.no_grad():
                delta = [
                    torch.log_softmax(p(*inputs), 1).gather(1, actions)
                    for p in (searcher.controller.policies[f], before[f])
                ]
            step = (delta[0] - delta[1]).squeeze(1).numpy()[use]
            # REINFORCE moves log π(a|s) up where the advantage is positive and down where it is negative.
            correlations.append(np.corrcoef(gain - gain.mean(), step)[0, 1])
        searcher.propose()
    # One Adam step per day (per-parameter normalised, the first one sign-like, so not exactly along the gradient):
    # both policies, days 3-6. (Were the reward taken a day early, before any training at the new sizes, the
    # advantage would not depend on the action and these would scatter around 0.)
    assert len(correlations) == 8 and min(correlations) > 0.05 and np.mean(correlations) > 0.35, correlations
    assert all(h[k] is not None for h in searcher.history for k in h if k.startswith("policy_loss"))


def test_searcher_state_dict_round_trip_through_a_checkpoint_file_gives_the_same_plans() -> None:
    config = EsapnConfig(candidate_dims=size_ladder(32), hidden=16)
    budget = Budget(5 * 8 + 100 * 12, "parameters")
    first = EsapnSearcher(budget, config=config, other_dim=8, seed=3)
    first.initial_plan(["user", "item", "tags"], JOB_CAPACITY)
    stream = _Stream(first, JOB_CAPACITY, seed=2)
    for _ in range(3):
        first.observe(stream.next_day())
        first.propose()
    second = EsapnSearcher(budget, config=config, other_dim=8, seed=99)  # the state carries the seed's effects
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as the job saves it, in the checkpoint's searcher.pt
    saved = first.state_dict()
    second.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    for _ in range(3):
        stats = stream.next_day()
        first.observe(stats)
        second.observe(stats)
        a, b = first.propose(), second.propose()
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            for f in ("user", "item"):
                np.testing.assert_array_equal(a[f].row_dims, b[f].row_dims)
    assert first.history == second.history and len(first.history) == 8  # rewarded on days 3-6, both policies
    # A saved state is a copy: the steps after it did not change it.
    reloaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert saved["history"] == reloaded["history"] and len(saved["history"]) == 2
    for f in ("user", "item"):
        np.testing.assert_array_equal(saved["size_index"][f], reloaded["size_index"][f])
        for p, q in zip(
            first.controller.policies[f].parameters(), second.controller.policies[f].parameters(), strict=True
        ):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_searcher_errors() -> None:
    config = EsapnConfig(candidate_dims=size_ladder(32))
    with pytest.raises(PlanError, match="'parameters' or 'logical'"):
        EsapnSearcher(Budget(1000, "bytes"), config=config)
    with pytest.raises(PlanError, match=r"below ESAPN's starting plan \(440: every user and item row at 4"):
        EsapnSearcher(Budget(400, "parameters"), config=config, other_dim=8).initial_plan(
            ["user", "item", "tags"], JOB_CAPACITY
        )
    with pytest.raises(PlanError, match=r"\['item'\]"):
        EsapnSearcher(None, config=config).initial_plan(["user", "tags"], JOB_CAPACITY)
    searcher = EsapnSearcher(None, config=config)
    searcher.initial_plan(["user", "item"], JOB_CAPACITY)
    counts = {"user": np.ones(60, dtype=np.int64), "item": np.ones(40, dtype=np.int64)}
    with pytest.raises(PlanError, match="no row_losses for feature 'user'"):
        searcher.observe(DayStats("2024-01-01", 0, {"user": 60, "item": 40}, counts))
    with pytest.raises(ValueError, match="multiple of 4 and >= 8"):
        size_ladder(6)
    assert size_ladder(8) == (4, 8) and size_ladder(64) == (4, 8, 16, 32, 64) and size_ladder(48) == (4, 8, 16, 32, 48)


def test_job_row_losses_equal_a_per_example_loop() -> None:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from models.scoring import add_row_losses

    # Three examples: user rows [2], [0], [2]; item rows [1, 3] (a two-id bag), [], [3].
    rows = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item"],
        values=torch.tensor([2, 0, 2, 1, 3, 3]),
        lengths=torch.tensor([1, 1, 1, 2, 0, 1]),
    )
    losses = torch.tensor([0.5, 1.0, 0.25])
    totals = {f: torch.zeros(2, 5, dtype=torch.float64) for f in ("user", "item")}
    add_row_losses(totals, rows, losses)
    add_row_losses(totals, rows, 2 * losses)  # a second batch adds up
    expected = {f: np.zeros((2, 5)) for f in ("user", "item")}
    bags = {"user": [[2], [0], [2]], "item": [[1, 3], [], [3]]}
    for scale in (1, 2):
        for f, per_example in bags.items():
            for example, ids in enumerate(per_example):
                for row in ids:
                    expected[f][0, row] += scale * float(losses[example])
                    expected[f][1, row] += 1
    for f in ("user", "item"):
        np.testing.assert_allclose(totals[f].numpy(), expected[f])


def test_first_fit_equals_the_sequential_loop() -> None:
    def loop(cost: np.ndarray, room: int) -> np.ndarray:
        taken = np.zeros(cost.size, dtype=bool)
        for i, c in enumerate(cost):
            if c <= room:
                taken[i], room = True, room - int(c)
        return taken

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(0, 400))
        cost = rng.choice([4, 8, 16, 32, 64] if trial % 2 else [1, 2, 3, 5, 7, 11], size=n)
        room = int(rng.integers(0, max(int(cost.sum()), 1) + 10))
        np.testing.assert_array_equal(first_fit(cost, room), loop(cost, room), err_msg=f"trial {trial}")
    assert first_fit(np.array([8, 4, 8, 4]), 12).tolist() == [True, True, False, False]
    assert first_fit(np.array([16, 4, 4]), 8).tolist() == [False, True, True]
