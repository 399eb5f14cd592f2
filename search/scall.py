"""SCALL: row-level embedding sizes from a budget-guaranteed, frequency-ranked size sampler driven by SAC.

Qu, Qu, Chen, Zhao, Nguyen, Yin. "Scalable Dynamic Embedding Size Search for Streaming Recommendation" (CIKM'24,
arXiv 2407.15411). Official code: yorkequ98/Scalable-Dynamic-Embedding-Size-Search-for-Streaming-Recommendation
(`Action.py`, `State.py`, `ActorCritic.py`, `Buffer.py`, `Engine.py`, `Config.py`). The paper's text beyond its
abstract was not available, so everything below follows the code as summarised in
`../shared/reference/methods.md` §6 (section numbers below are that file's).

**Sampler** (§6.2, `sample_sizes`). The action `a = (ratio, α_U, α_V) ∈ (0, 1)³`; `ratio` is clipped to
`[1e-5, 1 − 1e-5]`, each α clipped to `[0, 1]` and rescaled to `alpha_range` (`[0.1, 30]` for the power law).
Per side, the shares are the sorted-descending power-law values, normalised; sizes ∝ shares fill the side's budget;
the i-th largest size goes to the i-th most frequent row. Decisions:
- *Deterministic shares.* The code averages 100 sorted `powerlaw.rvs(a=α)` draws. Here the shares are the exact
  expected order statistics: for `X = U^{1/α}` (the power law on [0, 1]) the j-th smallest of n has
  `E[X_(j)] = Γ(j + 1/α) Γ(n + 1) / (Γ(j) Γ(n + 1 + 1/α))` (U_(j) ~ Beta(j, n + 1 − j)), computed with `lgamma`
  (vectorised, O(n)). It is the limit of the code's Monte Carlo mean (up to normalising each draw before averaging,
  a vanishing difference for large n), costs nothing, and every rank gets the same plan. Passing `rng` runs the
  code's Monte Carlo mean of `mc_draws` draws instead.
- *Exact allocation.* The code clips to `[1, 256]` and renormalises until in range or one second passes, then
  rounds (so the budget holds only approximately, and not at all in exploration, `correct=False`). Here the side's
  sizes come from `search.rowlevel.allocate` (bisection on the scale, largest-remainder rounding), then are sorted
  descending so rank order is monotone. Shares are floored at `1e-12 ×` the largest share so the bisection stays
  well conditioned for α near 0.1 (a row that small gets `d_min` either way).
- *Exact split.* The total is `P = min(budget, (|U| + |V|)·d_max)`; the user side gets `round(ratio·P)` moved into
  the feasible interval `[max(|U|·d_min, P − |V|·d_max), min(|U|·d_max, P − |V|·d_min)]`, the items the rest. So
  `Σ user + Σ item = P` exactly for every action and every frequency vector.
- *Ties.* Equal frequencies are broken by row id, the smaller id (the earlier arrival) ranking first (the code
  sorts (frequency, id) descending, so the larger id wins; either is arbitrary).

**State** (§6.3, `scall_state`, `STATE = 0`), length `2·user_groups + 2·d_max + 4`: min-max normalised sorted
frequencies of users, then items, each mean-pooled into `user_groups` groups; the last reward ratio (fitness /
reference, not rescaled, as the code stores it); `|U| / (|U| + |V|)`; the mean user and mean item ego embedding of
the current masked table; the user and item size spreads. Decisions: pooling integrates the step function of the
sorted values over `user_groups` equal slices of [0, 1], which is the code's mean pooling when the groups divide
evenly and also defined when there are fewer rows than groups (each group then reads the row it falls in, the
code's windows would be empty); a spread is `(max size − min size) / (d_max − d_min)` of the allocated sizes, in
[0, 1] (the code's `ratio·(max p − min p)·P / 255` is the same quantity before clipping and rounding, unbounded);
the initial reward is 1.0 (the reference plan's own ratio; the code starts at an arbitrary 0.5).

**SAC** (§6.4, `SacAgent`, `RecencyReplay`, `sac_target`): actor `Linear(S, 512) → ReLU → Linear(512, 512) → ReLU`
with mean and log-std heads (log-std clamped to [−20, 2]); reparameterised Normal sample, tanh, then `0.5·y + 0.5`;
`log π = Σ log N(x) − log(0.5(1 − y²) + 1e-6)`; the deterministic action is `0.5·tanh(mean) + 0.5`. Twin critics
on `[s, a]` with a Polyak-averaged target (τ = 0.005), no target actor; xavier-uniform init, zero biases; Adam
(actor 2e-4, critic 3e-4, weight decay 1e-4), actor gradient norm clipped to 1. Fixed entropy temperature α = 0.2.
Target `y = r + γ(min Q′(s′, a′) − α log π(a′|s′))` with `a′ ~ π(s′)` (no terminal states); critic loss the sum of
the two MSEs; actor loss `α log π − min Q`. Replay of 10,000 transitions sampled without replacement ∝ (insertion
position + 1); batch 1, or 8 once it holds more than 12. Three updates per environment step. (The code's sampling
weights break once the ring buffer wraps; here they are the positions of the transitions held, oldest first.)

**Static search** (§6.4 "Environment step", `scall_search`): each step samples an action, builds sizes with the
sampler, and evaluates them on a `SupernetEnv` (the pretrained `d_max` supernet masked to the sizes, optionally
fine-tuned a few batches: see `search/rowlevel.py`) instead of training a fresh LightGCN for 200 batches. Fitness is
`SupernetEnv.fitness` (mean over users of (Recall@20 + NDCG@20) / 2); the reward is `fitness / reference`,
rescaled `10·(reward − low)/(high − low)` with `(low, high) = (0.9, 1.1)`. Decision: the reference is the fitness of
the ES plan (every row `⌊B / n⌋`) at the same budget, evaluated once — the code divides by the fitness after the
first 200 batches of the previous segment's converged run, which the static benchmark does not have. The loop
stops when the deterministic action's ratio changed by at most `converge_tol` over each of the last
`converge_window − 1` steps (the code's `has_converged(num=5, threshold=0.01)`) and more than `min_steps` steps
ran, or at `max_steps`. The result is the deterministic action's sizes at the final state (the code's exploitation
action), plus the best plan by fitness seen during the search.

**One policy step** (`ScallLearner`): the agent and its replay, and the step both environments take: act (a sampled
action and the deterministic one), sizes from the sampler, fitness, reward `rescale(fitness / reference)`, the next
state, a replay transition, `updates_per_step` SAC updates. `scall_search` steps it on a `SupernetEnv` and
`ScallSearcher` on the job's `DayStats.env`; neither has a copy of the loop.

**Streaming** (§6.5, `ScallSearcher`): the policy learns in the job. After each day, `observe` takes `env_steps`
policy steps on the job's environment (the live sharded model as trained on the day, scored on the day's last
`env_batches` batches of each rank, which are never trained on: `jobs/environment.py`), rewarded against the ES
plan's fitness on the same environment that day (one more evaluation); then `propose` applies the deterministic
action at the state the steps end in, as the code's segment loop applies its exploitation action after
`update_policy`. With a fixed `action` (the ablation) nothing is learned and no batch is held out. The sampler
ranks by the day's counts (the code's frequencies are the current segment's counts, 0 for rows seen only earlier),
ties broken by cumulative counts, then row id; so rows never seen rank last and get the smallest shares, and sizes
grow and shrink with each day's traffic. The sizes for day t + 1 come from day t's counts and model (the job
proposes after training on a day; the code, offline, uses the segment's own counts). Decisions:
- *State.* The day's frequency ranking (the dense rank of the ranking key, pooled as above), the last reward ratio
  (1.0 before the first step, then carried across days, as the code carries its last reward), `|U| / (|U| + |V|)`,
  and the spreads of the sizes last evaluated or applied. The mean user and item ego embeddings are **zeros**: the
  searcher cannot read the sharded tables (a gather of two full tables every step is what the job cannot afford),
  so those `2·d_max` inputs are constant and the policy learns from the rest.
- *Reference.* The code divides by the fitness of the previous segment's converged run after 200 batches; the job
  has no second run, so the reference is the ES plan (every row the same size, in multiples of 4, as
  `initial_plan`) on the same held-out batches and model that day. A reference that is not a positive number (e.g.
  an AUC over held-out batches of one class) skips that day's learning with a warning, on every rank alike.
- *Ranks.* The environment's fitness is all-reduced and every rank seeds the agent and the replay alike, so every
  rank takes the same steps and ends with the same agent and the same plan (the job checks the plan's digest).
- *Exactness.* Sampled and proposed sizes are multiples of `multiple` (4 in the job), so every plan's stored
  parameters equal the budget exactly.
Features other than the user and item features get the field-level dim `other_dim`, whose parameters come off the
budget first. The initial plan is SCALL's segment-0 uniform plan (ES), made exact by giving the remainder one unit
per row to the first rows.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from search.base import DayStats, Environment, SearchContext, Searcher
from search.rowlevel import (
    SupernetEnv,
    allocate,
    check_row_budget,
    job_plan,
    row_budget,
    row_plan,
    table_rows,
    uniform_sizes,
)
from sharding.plan import Budget, DimensionPlan, PlanError

logger = logging.getLogger(__name__)

ACTION_SIZE = 3
Action = tuple[float, float, float]


@dataclass(frozen=True)
class ScallSettings:
    """SCALL's section of a job config (`search.scall`).

    Args:
        action: a fixed `(user share, α_U, α_V)` in (0, 1)³ (the fixed-action ablation: nothing is learned and no
            batch is held out, `env_steps` and `env_batches` are ignored); None: the SAC policy learns in the job
            and its deterministic action sizes the next day.
        frequency: rows are ranked by the last `day`'s counts (ties by the cumulative counts) or `cumulative`.
        env_steps: policy steps (each one evaluation of the live model, plus one a day for the ES reference) after
            every day; 0 applies the policy without learning.
        env_batches: batches at the end of each day's training stream, per rank, held out (never trained on) for
            the environment the policy steps are scored on.
    """

    action: tuple[float, ...] | None = None
    frequency: Literal["day", "cumulative"] = "day"
    env_steps: int = 4
    env_batches: int = 4

    def __post_init__(self) -> None:
        errors = []
        if self.action is not None and (len(self.action) != 3 or not all(0.0 < a < 1.0 for a in self.action)):
            errors.append(f"search.scall.action must be three numbers in (0, 1), got {list(self.action)}")
        if self.frequency not in ("day", "cumulative"):
            errors.append(f"search.scall.frequency is '{self.frequency}', expected 'day' or 'cumulative'")
        for name in ("env_steps", "env_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                errors.append(f"search.scall.{name} must be an integer >= 0, got {value!r}")
        if not errors and self.learns and self.env_batches == 0:
            errors.append(
                f"search.scall.env_steps={self.env_steps} scores each step on held-out batches, but "
                "search.scall.env_batches=0 holds none out. Fix: set env_batches >= 1 (e.g. 4), or env_steps=0 to "
                "apply the policy without learning, or a fixed search.scall.action"
            )
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def learns(self) -> bool:
        """Whether the policy learns in the job (no fixed action and at least one step a day)."""
        return self.action is None and self.env_steps > 0


@dataclass(frozen=True)
class ScallConfig:
    """SCALL's hyper-parameters (the official code's defaults, methods.md §6.2–6.4).

    Args:
        d_max: the largest size (the masked table's width; 256 in the code).
        d_min: the smallest size.
        alpha_range: `[MIN_ALPHA, MAX_ALPHA]` the action's α is rescaled to ([0.1, 30] for the power law).
        user_groups: groups the sorted frequencies of each side are mean-pooled into (the state's length).
        hidden: width of the actor's and the critics' two hidden layers.
        actor_lr: the actor's Adam learning rate.
        critic_lr: the critics' Adam learning rate.
        weight_decay: Adam weight decay of both.
        actor_grad_clip: the actor's gradient-norm clip.
        gamma: discount γ.
        tau: Polyak rate of the target critics.
        entropy_alpha: the fixed entropy temperature α.
        log_std_range: the actor's log-std clamp.
        replay_capacity: transitions the replay keeps.
        batch_small: replay batch while the replay holds at most `large_batch_after` transitions.
        batch_large: replay batch after that.
        large_batch_after: see `batch_small`.
        updates_per_step: SAC updates per environment step.
        reward_range: `(low, high)` of the reward rescaling `scale·(reward − low)/(high − low)`.
        reward_scale: the rescaling's factor (10 in the code).
        converge_window: the ratio means whose consecutive changes decide convergence.
        converge_tol: the largest change that counts as converged.
        min_steps: the policy loop runs more than this many steps.
        max_steps: and at most this many.
        mc_draws: power-law draws averaged when `sample_sizes` is given an `rng` (the code's 100).
    """

    d_max: int = 256
    d_min: int = 1
    alpha_range: tuple[float, float] = (0.1, 30.0)
    user_groups: int = 256
    hidden: int = 512
    actor_lr: float = 2e-4
    critic_lr: float = 3e-4
    weight_decay: float = 1e-4
    actor_grad_clip: float = 1.0
    gamma: float = 0.99
    tau: float = 0.005
    entropy_alpha: float = 0.2
    log_std_range: tuple[float, float] = (-20.0, 2.0)
    replay_capacity: int = 10_000
    batch_small: int = 1
    batch_large: int = 8
    large_batch_after: int = 12
    updates_per_step: int = 3
    reward_range: tuple[float, float] = (0.9, 1.1)
    reward_scale: float = 10.0
    converge_window: int = 5
    converge_tol: float = 0.01
    min_steps: int = 10
    max_steps: int = 100
    mc_draws: int = 100

    def __post_init__(self) -> None:
        errors = []

        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                errors.append(f"ScallConfig.{name} is {getattr(self, name)!r}; expected {expected}")

        need(self.d_min >= 1, "d_min", ">= 1")
        need(self.d_max >= max(1, self.d_min), "d_max", f">= d_min ({self.d_min})")
        lo, hi = self.alpha_range
        need(0 < lo < hi, "alpha_range", "0 < low < high, e.g. (0.1, 30.0) for the power law")
        need(self.user_groups >= 1, "user_groups", ">= 1")
        need(self.hidden >= 1, "hidden", ">= 1")
        for name in ("actor_lr", "critic_lr", "actor_grad_clip", "tau", "reward_scale"):
            need(getattr(self, name) > 0, name, "> 0")
        need(self.tau <= 1, "tau", "in (0, 1]")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(0 <= self.gamma <= 1, "gamma", "in [0, 1]")
        need(self.entropy_alpha >= 0, "entropy_alpha", ">= 0")
        need(self.log_std_range[0] < self.log_std_range[1], "log_std_range", "low < high, e.g. (-20, 2)")
        need(self.replay_capacity >= 1, "replay_capacity", ">= 1")
        need(1 <= self.batch_small <= self.replay_capacity, "batch_small", "in [1, replay_capacity]")
        need(1 <= self.batch_large <= self.replay_capacity, "batch_large", "in [1, replay_capacity]")
        need(
            self.large_batch_after >= self.batch_large - 1,
            "large_batch_after",
            f">= batch_large - 1 ({self.batch_large - 1}) so the large batch can be drawn without replacement",
        )
        need(self.updates_per_step >= 0, "updates_per_step", ">= 0")
        need(self.reward_range[0] < self.reward_range[1], "reward_range", "low < high, e.g. (0.9, 1.1)")
        need(self.converge_window >= 2, "converge_window", ">= 2")
        need(self.converge_tol >= 0, "converge_tol", ">= 0")
        need(self.min_steps >= 0, "min_steps", ">= 0")
        need(self.max_steps >= 1, "max_steps", ">= 1")
        need(self.mc_draws >= 1, "mc_draws", ">= 1")
        if errors:
            raise ValueError("invalid SCALL config:\n  " + "\n  ".join(errors))

    @property
    def state_size(self) -> int:
        """`2·user_groups + 2·d_max + 4` (1028 for the code's 256 and 256)."""
        return 2 * self.user_groups + 2 * self.d_max + 4

    def batch_size(self, stored: int) -> int:
        return self.batch_large if stored > self.large_batch_after else min(self.batch_small, stored)

    def rescale_reward(self, reward: float) -> float:
        low, high = self.reward_range
        return self.reward_scale * (reward - low) / (high - low)


# ---- the budget-guaranteed sampler (§6.2) -----------------------------------------------------------------------


def powerlaw_shares(alpha: float, n: int) -> np.ndarray:
    """Normalised expected order statistics of n power-law(α) draws, largest first (see the module docstring)."""
    if n < 1 or not alpha > 0:
        raise ValueError(f"powerlaw_shares needs n >= 1 and alpha > 0, got n={n}, alpha={alpha}")
    s = 1.0 / alpha
    j = torch.arange(n, 0, -1, dtype=torch.float64)  # the k-th largest is the (n + 1 − k)-th smallest
    log_e = torch.lgamma(j + s) - torch.lgamma(j)  # log E[X_(j)] up to a constant
    shares = torch.exp(log_e - log_e.max()).numpy()
    return shares / shares.sum()


def _monte_carlo_shares(alpha: float, n: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """The code's shares: the mean of `draws` sorted-descending, normalised power-law samples."""
    total = np.zeros(n)
    for _ in range(draws):
        r = np.sort(rng.power(alpha, n))[::-1]
        total += r / r.sum()
    return total / draws


def _split_budget(ratio: float, total: int, n_users: int, n_items: int, d_min: int, d_max: int) -> tuple[int, int]:
    """Integer user and item budgets summing to `total`, the user one as near `ratio·total` as feasibility allows."""
    low = max(n_users * d_min, total - n_items * d_max)
    high = min(n_users * d_max, total - n_items * d_min)
    users = min(max(math.floor(ratio * total + 0.5), low), high)
    return users, total - users


def _rank_sizes(sizes_desc: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Give the i-th largest size to the i-th most frequent row (ties: the smaller row id first)."""
    order = np.lexsort((np.arange(freq.size), -freq))
    out = np.empty_like(sizes_desc)
    out[order] = sizes_desc
    return out


def _check_frequencies(freq: np.ndarray, name: str) -> np.ndarray:
    f = np.asarray(freq, dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array (one frequency per row), got shape {f.shape}")
    if not np.isfinite(f).all() or (f < 0).any():
        raise ValueError(f"{name} must be finite and non-negative (training counts per row)")
    return f


def clip_action(action: Sequence[float] | np.ndarray) -> np.ndarray:
    """`(ratio, α_U, α_V)` with the ratio clipped to [1e-5, 1 − 1e-5] and the αs to [0, 1], as `Action.py`."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.shape != (ACTION_SIZE,) or not np.isfinite(a).all():
        raise ValueError(f"a SCALL action is (ratio, alpha_user, alpha_item), finite; got {action!r}")
    return np.array([np.clip(a[0], 1e-5, 1 - 1e-5), np.clip(a[1], 0.0, 1.0), np.clip(a[2], 0.0, 1.0)])


def sample_sizes(
    action: Sequence[float] | np.ndarray,
    user_freq: np.ndarray,
    item_freq: np.ndarray,
    budget: int,
    config: ScallConfig,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """SCALL's budget-guaranteed sampler: sizes for every user and item from one action.

    Args:
        action: `(ratio, α_U, α_V)` in (0, 1)³ (clipped as the code does).
        user_freq: each user row's frequency (any non-negative numbers; only the order matters).
        item_freq: each item row's frequency.
        budget: the logical parameters `Σ d` the sizes must use.
        config: `d_min`, `d_max`, `alpha_range` (and `mc_draws` with `rng`).
        rng: None for the deterministic expected-order-statistic shares; a generator for the code's Monte Carlo
            mean of `mc_draws` draws.

    Returns:
        (user sizes, item sizes), int64, each in `[d_min, d_max]`, summing to exactly
        `min(budget, (|U| + |V|)·d_max)`; a more frequent row never has a smaller size than a less frequent one.

    Raises:
        PlanError: the budget is below `d_min` dims per row.
        ValueError: a malformed action or frequency vector.
    """
    uf, itf = _check_frequencies(user_freq, "user_freq"), _check_frequencies(item_freq, "item_freq")
    n_users, n_items = uf.size, itf.size
    d_min, d_max = config.d_min, config.d_max
    check_row_budget(budget, n_users + n_items, d_max)
    if budget < (n_users + n_items) * d_min:
        raise PlanError(
            f"the budget of {budget:,} parameters is below d_min={d_min} dims per row ({n_users + n_items:,} rows). "
            f"Raise it to at least {(n_users + n_items) * d_min:,} or lower d_min"
        )
    ratio, alpha_u, alpha_i = clip_action(action)
    total = min(int(budget), (n_users + n_items) * d_max)
    sides = _split_budget(float(ratio), total, n_users, n_items, d_min, d_max)
    lo, hi = config.alpha_range
    out = []
    for raw_alpha, freq, side_budget in ((alpha_u, uf, sides[0]), (alpha_i, itf, sides[1])):
        alpha = float(raw_alpha) * (hi - lo) + lo
        if rng is None:
            shares = powerlaw_shares(alpha, freq.size)
        else:
            shares = _monte_carlo_shares(alpha, freq.size, config.mc_draws, rng)
        shares = np.maximum(shares, shares.max() * 1e-12)
        sizes = np.sort(allocate(shares, side_budget, d_min, d_max))[::-1]
        out.append(_rank_sizes(sizes, freq))
    users, items = out
    if int(users.sum()) + int(items.sum()) != total:  # allocate guarantees it; a cheap check of the invariant
        raise PlanError(f"internal error: SCALL sizes sum to {users.sum() + items.sum()}, expected {total}")
    return users, items


# ---- the state (§6.3) -------------------------------------------------------------------------------------------


def pool_frequencies(freq: np.ndarray, groups: int) -> np.ndarray:
    """Min-max normalised frequencies, sorted descending, mean-pooled into `groups` equal slices.

    Group g is the mean of the step function `x ↦ v[⌊x·n⌋]` over `[g/groups, (g+1)/groups)`: the plain mean of
    each window when `groups` divides n, and defined for any n (fewer rows than groups included). All-equal
    frequencies normalise to ones (as the code).
    """
    f = _check_frequencies(freq, "freq")
    span = f.max() - f.min()
    v = np.sort((f - f.min()) / span if span > 0 else np.ones_like(f))[::-1]
    n = v.size
    cumulative = np.concatenate([[0.0], np.cumsum(v)])
    edges = np.interp(np.linspace(0.0, n, groups + 1), np.arange(n + 1), cumulative)
    return np.diff(edges) * groups / n


def size_spread(sizes: np.ndarray, d_min: int, d_max: int) -> float:
    """`(max − min) / (d_max − d_min)` of a side's sizes, in [0, 1] (0 when d_min == d_max)."""
    return 0.0 if d_max == d_min else float(sizes.max() - sizes.min()) / (d_max - d_min)


def scall_state(
    user_freq: np.ndarray,
    item_freq: np.ndarray,
    last_reward: float,
    mean_user: np.ndarray | torch.Tensor,
    mean_item: np.ndarray | torch.Tensor,
    user_sizes: np.ndarray,
    item_sizes: np.ndarray,
    config: ScallConfig,
) -> torch.Tensor:
    """SCALL's state (`STATE = 0`), `[config.state_size]` float32, the same length for any |U| and |V|.

    Args:
        user_freq: per-user frequencies.
        item_freq: per-item frequencies.
        last_reward: the last reward ratio (fitness / reference, before rescaling).
        mean_user: the mean user row of the current masked table, `[d_max]`.
        mean_item: the mean item row, `[d_max]`.
        user_sizes: the current user sizes (for the spread).
        item_sizes: the current item sizes.
        config: `user_groups`, `d_min`, `d_max`.
    """
    spreads = (
        size_spread(np.asarray(user_sizes), config.d_min, config.d_max),
        size_spread(np.asarray(item_sizes), config.d_min, config.d_max),
    )
    return _state(user_freq, item_freq, last_reward, mean_user, mean_item, spreads, config)


def _state(
    user_freq: np.ndarray,
    item_freq: np.ndarray,
    last_reward: float,
    mean_user: np.ndarray | torch.Tensor,
    mean_item: np.ndarray | torch.Tensor,
    spreads: tuple[float, float],
    config: ScallConfig,
) -> torch.Tensor:
    parts = [
        pool_frequencies(user_freq, config.user_groups),
        pool_frequencies(item_freq, config.user_groups),
        np.array([last_reward, np.size(user_freq) / (np.size(user_freq) + np.size(item_freq))]),
    ]
    for name, emb in (("mean_user", mean_user), ("mean_item", mean_item)):
        e = torch.as_tensor(emb).detach().to(torch.float64).reshape(-1).numpy()
        if e.size != config.d_max:
            raise ValueError(f"{name} has {e.size} entries; the state needs d_max={config.d_max}")
        parts.append(e)
    parts.append(np.array(spreads, dtype=np.float64))
    return torch.from_numpy(np.concatenate(parts)).float()


# ---- Soft Actor-Critic (§6.4) ------------------------------------------------------------------------------------


def _xavier(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight, gain=1.0)
        nn.init.zeros_(module.bias)


def _mlp(inputs: int, hidden: int, outputs: int | None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()]
    if outputs is not None:
        layers.append(nn.Linear(hidden, outputs))
    return nn.Sequential(*layers)


class ScallActor(nn.Module):
    """Tanh-squashed Gaussian policy over (0, 1)³."""

    def __init__(self, state_size: int, hidden: int, log_std_range: tuple[float, float]) -> None:
        super().__init__()
        self.body = _mlp(state_size, hidden, None)
        self.mean = nn.Linear(hidden, ACTION_SIZE)
        self.log_std = nn.Linear(hidden, ACTION_SIZE)
        self.log_std_range = log_std_range
        self.apply(_xavier)

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(state)
        return self.mean(h), self.log_std(h).clamp(*self.log_std_range)

    def sample(
        self, state: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sampled action in (0, 1)³, its log-probability [B, 1], the deterministic action)."""
        mean, log_std = self(state)
        std = log_std.exp()
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        x = mean + std * noise  # reparameterised
        y = torch.tanh(x)
        log_normal = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        log_prob = (log_normal - torch.log(0.5 * (1 - y.pow(2)) + 1e-6)).sum(-1, keepdim=True)
        return 0.5 * y + 0.5, log_prob, 0.5 * torch.tanh(mean) + 0.5


class ScallCritic(nn.Module):
    """Twin Q networks on `[state, action]`."""

    def __init__(self, state_size: int, hidden: int) -> None:
        super().__init__()
        self.q1 = _mlp(state_size + ACTION_SIZE, hidden, 1)
        self.q2 = _mlp(state_size + ACTION_SIZE, hidden, 1)
        self.apply(_xavier)

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([state, action], dim=-1)
        return self.q1(x), self.q2(x)


def sac_target(
    reward: torch.Tensor,
    next_q1: torch.Tensor,
    next_q2: torch.Tensor,
    next_log_prob: torch.Tensor,
    gamma: float,
    entropy_alpha: float,
) -> torch.Tensor:
    """The soft Bellman target `y = r + γ(min(Q′₁, Q′₂) − α log π(a′|s′))` (no terminal states), all `[B, 1]`."""
    return reward + gamma * (torch.minimum(next_q1, next_q2) - entropy_alpha * next_log_prob)


@dataclass(frozen=True)
class Transition:
    state: torch.Tensor
    action: torch.Tensor
    reward: float
    next_state: torch.Tensor


class RecencyReplay:
    """A bounded replay sampled without replacement with probability ∝ (position + 1), oldest first (§6.4).

    Args:
        capacity: transitions kept (the oldest is dropped first).
        rng: draws the batches.
    """

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.items: deque[Transition] = deque(maxlen=capacity)
        self.rng = rng

    def __len__(self) -> int:
        return len(self.items)

    def add(self, transition: Transition) -> None:
        self.items.append(transition)

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states [B, S], actions [B, 3], rewards [B, 1], next states [B, S])."""
        n = len(self.items)
        if not 1 <= batch <= n:
            raise ValueError(f"cannot draw {batch} transitions without replacement from {n}")
        weights = np.arange(1, n + 1, dtype=np.float64)
        pick = self.rng.choice(n, size=batch, replace=False, p=weights / weights.sum())
        chosen = [self.items[int(i)] for i in pick]
        return (
            torch.stack([t.state for t in chosen]),
            torch.stack([t.action for t in chosen]),
            torch.tensor([[t.reward] for t in chosen], dtype=torch.float32),
            torch.stack([t.next_state for t in chosen]),
        )

    def state_dict(self) -> dict[str, Any]:
        """The transitions held (oldest first) and the sampling RNG's state."""
        return {
            "items": [
                {"state": t.state, "action": t.action, "reward": t.reward, "next_state": t.next_state}
                for t in self.items
            ],
            "rng": copy.deepcopy(self.rng.bit_generator.state),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.items.clear()
        for t in state["items"]:
            self.items.append(Transition(t["state"], t["action"], float(t["reward"]), t["next_state"]))
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])


class SacAgent:
    """SCALL's Soft Actor-Critic: actor, twin critics and target critics with their optimisers.

    Args:
        config: network widths, learning rates, γ, τ, α.
        seed: seeds the initialisation and the policy's sampling noise (the global torch RNG is untouched).
    """

    def __init__(self, config: ScallConfig, seed: int = 0) -> None:
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = ScallActor(config.state_size, config.hidden, config.log_std_range)
            self.critic = ScallCritic(config.state_size, config.hidden)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(
            self.actor.parameters(), lr=config.actor_lr, weight_decay=config.weight_decay
        )
        self.critic_optimizer = torch.optim.Adam(
            self.critic.parameters(), lr=config.critic_lr, weight_decay=config.weight_decay
        )
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.updates = 0

    @torch.no_grad()
    def act(self, state: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(a sampled action, the deterministic action) for one state, each `[3]` float64 in (0, 1)."""
        action, _, mean = self.actor.sample(state.reshape(1, -1), self.generator)
        return action[0].double().numpy(), mean[0].double().numpy()

    @torch.no_grad()
    def mean_action(self, state: torch.Tensor) -> np.ndarray:
        mean, _ = self.actor(state.reshape(1, -1))
        return (0.5 * torch.tanh(mean[0]) + 0.5).double().numpy()

    def update(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, float]:
        """One SAC update (critics, actor, then the target critics) on a replay batch; returns the losses."""
        cfg = self.config
        state, action, reward, next_state = batch
        with torch.no_grad():
            next_action, next_log_prob, _ = self.actor.sample(next_state, self.generator)
            next_q1, next_q2 = self.target_critic(next_state, next_action)
            target = sac_target(reward, next_q1, next_q2, next_log_prob, cfg.gamma, cfg.entropy_alpha)
        q1, q2 = self.critic(state, action)
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        self.critic.requires_grad_(False)  # the actor's loss must not leave gradients on the critics
        pi, log_prob, _ = self.actor.sample(state, self.generator)
        actor_loss = (cfg.entropy_alpha * log_prob - torch.minimum(*self.critic(state, pi))).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        nn.utils.clip_grad_norm_(self.actor.parameters(), cfg.actor_grad_clip)
        self.actor_optimizer.step()
        self.critic.requires_grad_(True)

        with torch.no_grad():
            for target_p, p in zip(self.target_critic.parameters(), self.critic.parameters(), strict=True):
                target_p.mul_(1 - cfg.tau).add_(p, alpha=cfg.tau)
        self.updates += 1
        return {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item()}

    def state_dict(self) -> dict[str, Any]:
        """Actor, critics, target critics, both Adam states, the sampling generator and the update count (copies:
        later updates do not change a state taken before them)."""
        return copy.deepcopy(
            {
                "actor": self.actor.state_dict(),
                "critic": self.critic.state_dict(),
                "target_critic": self.target_critic.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "updates": self.updates,
            }
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from `state_dict()` of an agent with the same config."""
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.generator.set_state(state["generator"].clone())
        self.updates = int(state["updates"])


def ratio_converged(ratios: Sequence[float], window: int, tol: float) -> bool:
    """Whether each consecutive change among the last `window` ratio means is at most `tol` (`has_converged`)."""
    if len(ratios) < window:
        return False
    return bool(np.all(np.abs(np.diff(np.asarray(ratios[-window:], dtype=np.float64))) <= tol))


# ---- the policy step, shared by both environments -----------------------------------------------------------------

SizesFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
FitnessFn = Callable[[np.ndarray, np.ndarray], float]
NextStateFn = Callable[[float, np.ndarray, np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class LearnerStep:
    """What one policy step did.

    Args:
        action: the sampled action, `[3]` in (0, 1).
        mean_action: the deterministic action at the same state.
        user_sizes: the sampled action's user sizes.
        item_sizes: its item sizes.
        fitness: their fitness.
        ratio: `fitness / reference` (the next state's last reward).
        reward: the rescaled reward stored in the replay.
        next_state: the state after the step.
    """

    action: np.ndarray
    mean_action: np.ndarray
    user_sizes: np.ndarray
    item_sizes: np.ndarray
    fitness: float
    ratio: float
    reward: float
    next_state: torch.Tensor


class ScallLearner:
    """SCALL's policy and its replay, and the one environment step both `scall_search` (a `SupernetEnv`) and
    `ScallSearcher` (the job's environment) take (methods.md §6.4 "Environment step").

    Args:
        config: the sampler's and the agent's settings.
        seed: seeds a fresh agent (`SacAgent(config, seed)`) and the replay's RNG.
        agent: a policy to go on from (e.g. `ScallResult.agent`) instead of a fresh one.
    """

    def __init__(self, config: ScallConfig, seed: int = 0, agent: SacAgent | None = None) -> None:
        if agent is not None and agent.config.state_size != config.state_size:
            raise ValueError(
                f"the agent's state size {agent.config.state_size} does not match the config's {config.state_size} "
                "(user_groups and d_max must agree)"
            )
        self.config = config
        self.agent = agent if agent is not None else SacAgent(config, seed)
        self.replay = RecencyReplay(config.replay_capacity, np.random.default_rng(seed))

    def step(
        self, state: torch.Tensor, sizes: SizesFn, fitness: FitnessFn, reference: float, next_state: NextStateFn
    ) -> LearnerStep:
        """One environment step: act at `state`, size the rows, score them, store the transition, update the agent.

        Args:
            state: the current state (`scall_state`).
            sizes: the sampler: action → (user sizes, item sizes).
            fitness: the environment: (user sizes, item sizes) → fitness (higher is better).
            reference: the fitness the reward is relative to (the ES plan's), > 0.
            next_state: (reward ratio, user sizes, item sizes) → the state after the step.

        Returns:
            The step's action, sizes, fitness, reward and next state.
        """
        cfg = self.config
        action, mean = self.agent.act(state)
        users, items = sizes(action)
        fit = float(fitness(users, items))
        ratio = fit / reference
        reward = cfg.rescale_reward(ratio)
        after = next_state(ratio, users, items)
        self.replay.add(Transition(state, torch.from_numpy(action).float(), reward, after))
        for _ in range(cfg.updates_per_step):
            self.agent.update(self.replay.sample(cfg.batch_size(len(self.replay))))
        return LearnerStep(action, mean, users, items, fit, ratio, reward, after)

    def mean_action(self, state: torch.Tensor) -> np.ndarray:
        """The policy's deterministic action at `state` (clipped as the sampler clips it)."""
        return clip_action(self.agent.mean_action(state))

    def state_dict(self) -> dict[str, Any]:
        return {"agent": self.agent.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.agent.load_state_dict(state["agent"])
        self.replay.load_state_dict(state["replay"])


# ---- the static search ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScallStep:
    """One environment step: the sampled action, its plan's fitness and its rescaled reward."""

    action: tuple[float, float, float]
    mean_action: tuple[float, float, float]
    fitness: float
    reward: float


@dataclass
class ScallResult:
    """What `scall_search` found.

    Args:
        user_sizes: the deterministic action's user sizes at the final state (the plan SCALL applies).
        item_sizes: its item sizes.
        action: that deterministic action.
        fitness: its fitness.
        best_user_sizes: the user sizes of the fittest plan evaluated during the search.
        best_item_sizes: its item sizes.
        best_fitness: its fitness.
        reference_fitness: the ES plan's fitness (the reward's denominator).
        history: one record per environment step.
        seconds: wall time of the search (the reference evaluation included).
        budget: the logical budget searched under.
        d_max: the largest size.
        agent: the trained policy (e.g. for `ScallSearcher`).
    """

    user_sizes: np.ndarray
    item_sizes: np.ndarray
    action: tuple[float, float, float]
    fitness: float
    best_user_sizes: np.ndarray
    best_item_sizes: np.ndarray
    best_fitness: float
    reference_fitness: float
    history: list[ScallStep]
    seconds: float
    budget: int
    d_max: int
    agent: SacAgent | None = field(default=None, repr=False)

    def plan(self, best: bool = False, provenance: Mapping[str, Any] | None = None) -> DimensionPlan:
        """The row-level plan (features `user`, `item`) of the final (or best) sizes."""
        users, items = (self.best_user_sizes, self.best_item_sizes) if best else (self.user_sizes, self.item_sizes)
        return row_plan(
            {"user": users, "item": items},
            self.d_max,
            self.budget,
            {"method": "scall", "action": list(self.action), "steps": len(self.history), **(provenance or {})},
        )


def _mean_rows(env: SupernetEnv) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        ego = env.table()
    return ego[: env.task.num_users].mean(0), ego[env.task.num_users :].mean(0)


def scall_search(
    env: SupernetEnv,
    user_freq: np.ndarray,
    item_freq: np.ndarray,
    budget: int,
    config: ScallConfig,
    seed: int = 0,
) -> ScallResult:
    """SCALL's policy loop on one (static) segment: SAC over sampler actions, rewarded by masked-supernet fitness.

    Args:
        env: evaluates a plan (its `d_max` must equal `config.d_max`).
        user_freq: per-user training frequencies, `[num_users]`.
        item_freq: per-item training frequencies, `[num_items]`.
        budget: the logical parameters `Σ d` every plan uses.
        config: hyper-parameters.
        seed: seeds the policy, its sampling and the replay.

    Returns:
        The deterministic action's sizes at the end, the best sizes seen, and the per-step history.

    Raises:
        PlanError: the budget is below one dim per row.
        ValueError: mismatched sizes, or a reference fitness of 0 (nothing to compare with).
    """
    start = time.perf_counter()
    n_users, n_items = env.task.num_users, env.task.num_items
    if config.d_max != env.d_max:
        raise ValueError(f"ScallConfig.d_max is {config.d_max} but the environment's supernet has {env.d_max}")
    uf, itf = _check_frequencies(user_freq, "user_freq"), _check_frequencies(item_freq, "item_freq")
    if (uf.size, itf.size) != (n_users, n_items):
        raise ValueError(f"frequencies have {uf.size} users and {itf.size} items; the task has {n_users} and {n_items}")
    check_row_budget(budget, n_users + n_items, config.d_max)

    reference = uniform_sizes(n_users + n_items, budget, config.d_max)
    ref_users, ref_items = reference[:n_users], reference[n_users:]
    reference_fitness = env.fitness(env.metrics(ref_users, ref_items))
    if not reference_fitness > 0:
        raise ValueError(
            f"the ES plan's fitness is {reference_fitness}; SCALL's reward divides by it. Use a validation split "
            "with held-out hits (or a longer supernet pretraining)"
        )
    state = scall_state(uf, itf, 1.0, *_mean_rows(env), ref_users, ref_items, config)

    learner = ScallLearner(config, seed)
    history: list[ScallStep] = []
    ratios: list[float] = []
    best = (-math.inf, ref_users, ref_items)

    def sizes(action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return sample_sizes(action, uf, itf, budget, config)

    def fitness_of(users: np.ndarray, items: np.ndarray) -> float:
        return env.fitness(env.metrics(users, items))

    def next_state(ratio: float, users: np.ndarray, items: np.ndarray) -> torch.Tensor:
        return scall_state(uf, itf, ratio, *_mean_rows(env), users, items, config)

    for step in range(config.max_steps):
        out = learner.step(state, sizes, fitness_of, reference_fitness, next_state)
        ratios.append(float(out.mean_action[0]))
        if out.fitness > best[0]:
            best = (out.fitness, out.user_sizes, out.item_sizes)
        history.append(ScallStep(_as_action(out.action), _as_action(out.mean_action), out.fitness, out.reward))
        logger.debug(
            "scall step %d: action %s fitness %.5f reward %.3f", step, np.round(out.action, 4), out.fitness, out.reward
        )
        state = out.next_state
        if step + 1 > config.min_steps and ratio_converged(ratios, config.converge_window, config.converge_tol):
            break

    agent = learner.agent
    final = agent.mean_action(state)
    users, items = sample_sizes(final, uf, itf, budget, config)
    fitness = env.fitness(env.metrics(users, items))
    if fitness > best[0]:
        best = (fitness, users, items)
    seconds = time.perf_counter() - start
    logger.info(
        "scall: %d steps in %.1fs; action %s fitness %.5f (ES %.5f, best %.5f)",
        len(history),
        seconds,
        np.round(final, 4).tolist(),
        fitness,
        reference_fitness,
        best[0],
    )
    return ScallResult(
        user_sizes=users,
        item_sizes=items,
        action=_as_action(final),
        fitness=fitness,
        best_user_sizes=best[1],
        best_item_sizes=best[2],
        best_fitness=best[0],
        reference_fitness=reference_fitness,
        history=history,
        seconds=seconds,
        budget=budget,
        d_max=config.d_max,
        agent=agent,
    )


def _as_action(a: np.ndarray | Sequence[float]) -> Action:
    x = [float(v) for v in np.asarray(a).reshape(-1)]
    return (x[0], x[1], x[2])


# ---- streaming ----------------------------------------------------------------------------------------------------


def _dense_rank(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """An int64 key ordering rows lexicographically by (primary, secondary), equal pairs equal keys."""
    order = np.lexsort((secondary, primary))
    p, s = primary[order], secondary[order]
    changed = np.concatenate([[False], (p[1:] != p[:-1]) | (s[1:] != s[:-1])])
    key = np.empty(primary.size, dtype=np.int64)
    key[order] = np.cumsum(changed)
    return key


class ScallSearcher(Searcher):
    """SCALL in the training job's day loop: each day the policy takes a few steps on the job's environment, then
    the sampler sizes every user and item row by its frequency rank under an exact budget with the policy's
    deterministic action, or with a fixed action (module docstring, "Streaming").

    Args:
        budget: the logical budget (`Budget(unit="logical")`), covering every row of every feature.
        d_max: the largest size (the plan's output width).
        user_feature: the feature whose rows are users.
        item_feature: the feature whose rows are items.
        action: a fixed `(ratio, α_U, α_V)` (nothing is learned); None uses the policy's deterministic action.
        agent: the policy to start from (e.g. `ScallResult.agent`); None with no `action` builds a fresh one from
            `config` and `seed`.
        config: sampler and policy settings (`config.d_max` must equal `d_max`); default `ScallConfig(d_max=d_max)`.
        frequency: `day` ranks rows by the last day's counts (SCALL's current-segment frequencies), ties by the
            cumulative counts; `cumulative` ranks by the cumulative counts.
        other_dim: the field-level dim of every other feature (default `d_max`).
        seed: seeds a fresh agent and the replay.
        multiple: sizes are multiples of this (4: every row's logical dim is its physical width, DESIGN.md decision
            5, so the budget may be counted in stored `parameters`; 1: any size, `logical` budget).
        env_steps: policy steps on `DayStats.env` after every day (0: the policy does not learn; ignored with a
            fixed `action`).
        env_batches: the batches per rank the job holds out for that environment (the searcher's `env_batches`;
            0 whenever nothing is learned, so the job then trains on every batch).
    """

    name = "scall"
    settings_class = ScallSettings

    @classmethod
    def check(cls, context: SearchContext) -> None:
        context.need_protocol(streaming=True)
        context.need_budget()
        context.need_multiple_of_4()
        context.need_entities()

    @classmethod
    def from_config(cls, settings: ScallSettings, context: SearchContext) -> ScallSearcher:
        users, items = context.need_entities()
        return cls(
            Budget(context.need_budget(), "parameters"),
            context.dim,
            users,
            items,
            action=settings.action,
            frequency=settings.frequency,
            other_dim=context.other_dim,
            seed=context.seed,
            multiple=4,  # sizes are stored widths: the plan's parameters are exactly the budget
            env_steps=settings.env_steps,
            env_batches=settings.env_batches,
        )

    def __init__(
        self,
        budget: Budget,
        d_max: int,
        user_feature: str = "user",
        item_feature: str = "item",
        action: Sequence[float] | None = None,
        agent: SacAgent | None = None,
        config: ScallConfig | None = None,
        frequency: Literal["day", "cumulative"] = "day",
        other_dim: int | None = None,
        seed: int = 0,
        multiple: int = 1,
        env_steps: int = 0,
        env_batches: int = 0,
    ) -> None:
        if multiple < 1 or d_max % multiple:
            raise ValueError(f"multiple must be >= 1 and divide d_max ({d_max}), got {multiple}")
        physical = multiple % 4 == 0 and (other_dim is None or other_dim % 4 == 0)
        if budget.unit != "logical" and not (budget.unit == "parameters" and physical):
            raise PlanError(
                f"SCALL counts kept parameters (Σ d per row): its budget unit must be 'logical', or 'parameters' when "
                f"every size is a multiple of 4 (multiple={multiple}, other_dim={other_dim}); got '{budget.unit}'"
            )
        self.multiple = multiple
        if user_feature == item_feature:
            raise ValueError(f"user_feature and item_feature must differ, both are '{user_feature}'")
        self.config = config if config is not None else ScallConfig(d_max=d_max)
        if self.config.d_max != d_max:
            raise ValueError(f"config.d_max is {self.config.d_max} but d_max is {d_max}")
        if frequency not in ("day", "cumulative"):
            raise ValueError(f"frequency is '{frequency}', expected 'day' or 'cumulative'")
        if env_steps < 0 or env_batches < 0:
            raise ValueError(f"env_steps and env_batches must be >= 0, got {env_steps} and {env_batches}")
        self.budget, self.d_max, self.frequency = budget, d_max, frequency
        self.user_feature, self.item_feature = user_feature, item_feature
        self.other_dim = d_max if other_dim is None else other_dim
        if self.other_dim < 1:
            raise ValueError(f"other_dim must be >= 1, got {self.other_dim}")
        self.action = None if action is None else clip_action(action)
        self.learner = None if action is not None else ScallLearner(self.config, seed, agent)
        self.env_steps = env_steps if self.learner is not None else 0
        self.env_batches = env_batches if self.env_steps > 0 else 0  # the fixed-action job trains on every batch
        self.features: list[str] = []
        self.num_embeddings: dict[str, int] = {}
        self.previous: dict[str, np.ndarray] = {}  # cumulative counts at the day before the last observed one
        self.current: dict[str, np.ndarray] = {}  # cumulative counts after the last observed day
        self.day_index: int | None = None
        self.pending = False
        self.spreads = (0.0, 0.0)  # of the sizes last evaluated or applied
        self.last_ratio = 1.0  # the last reward ratio (the ES plan's own before the first step)
        self.history: list[dict[str, Any]] = []  # one record per policy step

    @property
    def agent(self) -> SacAgent | None:
        """The policy (None with a fixed action)."""
        return None if self.learner is None else self.learner.agent

    # -- the interface --

    def initial_plan(self, features: list[str], num_embeddings: Mapping[str, int]) -> DimensionPlan:
        """SCALL's segment-0 plan: equal sizes (ES), the remainder one unit per row on the first rows."""
        missing = [f for f in (self.user_feature, self.item_feature) if f not in features]
        if missing:
            raise PlanError(f"SCALL sizes the features {missing}, which are not among the job's features {features}")
        self.features = list(features)
        self.num_embeddings = {f: int(num_embeddings[f]) for f in features}
        users, items = self._es_sizes()
        return self._plan(users, items, {"method": "scall", "day_index": None})

    def observe(self, stats: DayStats) -> None:
        """Take in the day's counts and, when the policy learns, take `env_steps` steps on `stats.env`.

        Raises:
            PlanError: before `initial_plan`, a day without the user's or item's `row_counts`, or no environment
                while the policy learns.
        """
        if not self.features:
            raise PlanError("ScallSearcher.observe before initial_plan: the searcher does not know the tables yet")
        for f in (self.user_feature, self.item_feature):
            if f not in stats.row_counts:
                raise PlanError(f"the day's statistics have no row_counts for feature '{f}'")
            padded = table_rows(stats.row_counts[f], self.num_embeddings[f], f, "row_counts", 0, np.int64)
            self.previous[f] = self.current.get(f, np.zeros_like(padded))
            self.current[f] = padded
        self.day_index = stats.day_index
        self.pending = True
        if self.env_steps:
            if stats.env is None:
                raise PlanError(
                    "SCALL learns its policy on the job's environment (DayStats.env), but none was given. Fix: hold "
                    "out batches (search.scall.env_batches >= 1), or set search.scall.env_steps=0 to apply the policy "
                    "without learning"
                )
            self._learn(stats.env)

    def propose(self) -> DimensionPlan | None:
        if not self.pending:
            return None
        self.pending = False
        users_key, items_key = self._keys()
        if self.action is not None:
            action = self.action
        else:
            assert self.learner is not None  # the constructor builds one when no action is given
            action = self.learner.mean_action(self._state(users_key, items_key))
        users, items = self._sizes(action, users_key, items_key)
        self.spreads = self._spreads(users, items)
        return self._plan(users, items, {"method": "scall", "day_index": self.day_index, "action": action.tolist()})

    def state_dict(self) -> dict[str, Any]:
        """Counts, the pending proposal, the state's last ratio and spreads, the step history and the learner (agent
        with its optimisers and generator, replay with its RNG); tensors included (the job uses `torch.save`)."""
        return {
            "features": self.features,
            "num_embeddings": self.num_embeddings,
            "previous": {f: c.tolist() for f, c in self.previous.items()},
            "current": {f: c.tolist() for f, c in self.current.items()},
            "day_index": self.day_index,
            "pending": self.pending,
            "spreads": list(self.spreads),
            "last_ratio": self.last_ratio,
            "history": copy.deepcopy(self.history),
            "learner": None if self.learner is None else self.learner.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.features = list(state.get("features", []))
        self.num_embeddings = {f: int(n) for f, n in state.get("num_embeddings", {}).items()}
        self.previous = {f: np.asarray(c, dtype=np.int64) for f, c in state.get("previous", {}).items()}
        self.current = {f: np.asarray(c, dtype=np.int64) for f, c in state.get("current", {}).items()}
        self.day_index = state.get("day_index")
        self.pending = bool(state.get("pending", False))
        spreads = state.get("spreads", (0.0, 0.0))
        self.spreads = (float(spreads[0]), float(spreads[1]))
        self.last_ratio = float(state.get("last_ratio", 1.0))
        self.history = copy.deepcopy(list(state.get("history", [])))
        if self.learner is not None and state.get("learner") is not None:
            self.learner.load_state_dict(state["learner"])

    # -- helpers --

    def _learn(self, env: Environment) -> None:
        """`env_steps` policy steps on the day's environment, rewarded against the ES plan's fitness on it."""
        assert self.learner is not None
        users_f, items_f = self.user_feature, self.item_feature
        users_key, items_key = self._keys()
        es_users, es_items = self._es_sizes()
        reference = float(env.fitness({users_f: es_users, items_f: es_items}))
        if not (math.isfinite(reference) and reference > 0):
            logger.warning(
                "scall day %s: the ES plan's fitness on the held-out batches is %s; SCALL's reward divides by it, so "
                "the policy does not learn today (more held-out batches, search.scall.env_batches, may help)",
                self.day_index,
                reference,
            )
            return

        def sizes(action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return self._sizes(action, users_key, items_key)

        def fitness(users: np.ndarray, items: np.ndarray) -> float:
            return env.fitness({users_f: users, items_f: items})

        def next_state(ratio: float, users: np.ndarray, items: np.ndarray) -> torch.Tensor:
            return self._state(users_key, items_key, ratio, self._spreads(users, items))

        for _ in range(self.env_steps):
            out = self.learner.step(self._state(users_key, items_key), sizes, fitness, reference, next_state)
            self.last_ratio, self.spreads = out.ratio, self._spreads(out.user_sizes, out.item_sizes)
            self.history.append(
                {
                    "day_index": self.day_index,
                    "action": out.action.tolist(),
                    "mean_action": out.mean_action.tolist(),
                    "fitness": out.fitness,
                    "reference": reference,
                    "reward": out.reward,
                }
            )
        last = self.history[-1]
        logger.info(
            "scall day %s: %d policy steps, last action %s fitness %.5f (ES %.5f) reward %.3f",
            self.day_index,
            self.env_steps,
            np.round(last["action"], 4).tolist(),
            last["fitness"],
            reference,
            last["reward"],
        )

    def _keys(self) -> tuple[np.ndarray, np.ndarray]:
        return self._ranking_key(self.user_feature), self._ranking_key(self.item_feature)

    def _state(
        self,
        users_key: np.ndarray,
        items_key: np.ndarray,
        ratio: float | None = None,
        spreads: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """The policy's state: the day's ranking, the last reward ratio, zero mean embeddings (the searcher cannot
        read the sharded tables), the size spreads."""
        zeros = np.zeros(self.d_max)
        ratio = self.last_ratio if ratio is None else ratio
        return _state(
            users_key, items_key, ratio, zeros, zeros, self.spreads if spreads is None else spreads, self.config
        )

    def _sizes(self, action: np.ndarray, users_key: np.ndarray, items_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sampler's sizes for `action`, multiples of `multiple` summing exactly to the rows' budget."""
        m = self.multiple
        coarse = replace(self.config, d_max=self.d_max // m, d_min=1) if m > 1 else self.config
        users, items = sample_sizes(action, users_key, items_key, self._row_budget() // m, coarse)
        return users * m, items * m

    def _es_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Equal sizes (multiples of `multiple`), the remainder one unit per row on the first rows."""
        n_users, n_items = self._rows()
        m = self.multiple
        units = allocate(np.ones(n_users + n_items), self._row_budget() // m, 1, self.d_max // m)
        sizes = units * m
        return sizes[:n_users], sizes[n_users:]

    def _spreads(self, users: np.ndarray, items: np.ndarray) -> tuple[float, float]:
        return size_spread(users, self.config.d_min, self.d_max), size_spread(items, self.config.d_min, self.d_max)

    def _rows(self) -> tuple[int, int]:
        return self.num_embeddings[self.user_feature], self.num_embeddings[self.item_feature]

    def _others(self) -> list[str]:
        return [f for f in self.features if f not in (self.user_feature, self.item_feature)]

    def _row_budget(self) -> int:
        """The budget left for the user and item rows once the other features have their field-level dims."""
        n = sum(self._rows())
        smallest = "one dim per row" if self.multiple == 1 else f"{self.multiple} (the size multiple) per row"
        entities = (self.user_feature, self.item_feature)
        return row_budget(self.budget.value, self.num_embeddings, entities, self.other_dim, self.multiple * n, smallest)

    def _ranking_key(self, feature: str) -> np.ndarray:
        cumulative = self.current[feature]
        if self.frequency == "cumulative":
            return cumulative.astype(np.float64)
        day = cumulative - self.previous[feature]
        return _dense_rank(day, cumulative).astype(np.float64)

    def _plan(self, users: np.ndarray, items: np.ndarray, provenance: Mapping[str, Any]) -> DimensionPlan:
        rows = {self.user_feature: users, self.item_feature: items}
        return job_plan(self.features, self.num_embeddings, rows, self.d_max, self.other_dim, self.budget, provenance)
