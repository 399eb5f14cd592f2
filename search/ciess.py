"""CIESS: continuous input embedding size search with TD3 (Qu, Chen, Zhao, Cui, Zheng, Yin; SIGIR'23,
arXiv 2304.03501; official code yorkequ98/CIESS). methods.md §5.

One TD3 actor–critic per entity type (users, items). Every user and item is an agent step of its type's policy:

- state `s_n = [f_n, d_n, q_n]` ∈ [−1, 1]³ (code's `RecSysEnv.get_state`): min-max normalised training frequency,
  current size `2(d−1)/(d_max−1) − 1`, quality ratio `2·min(eval/peak, 1) − 1`, where `eval` is Eq. 8 (users: the
  mean of Recall@k and NDCG@k, k ∈ {5, 10, 20}, on the validation split) or Eq. 9 (items: the mean eval of their
  training users) and `peak` the same under the full-size model;
- action: a size in `[1, d_max]` from the actor `μ(s)` (Linear 3→256→256→1, tanh; last layer U(±3e-3)), explored by
  a 5-step random walk over sizes (neighbours within 5, transition ∝ 1/|d′ − d|; Graph.py) from the rounded actor
  output, the walk's 6 nodes ranked by the first critic (Eq. 14), then Gaussian noise N(0, 6);
- reward (Eq. 10) `r_n = q_n − λ (d_n/d_max)²` with the ratio `q_n` and λ = 0.4 (the paper's best on ML-1M);
- TD3 (Fujimoto et al.): twin critics (Linear 4→256→256→1), target networks with τ = 0.005, target-policy smoothing
  N(0, 2) clipped to ±5 size units, policy delay 2, γ = 0.99, Adam 1e-3 / 3e-3, gradient-norm clip 0.01, replay of
  100 × #entities transitions, 4,096 per update.

Each episode starts at `d_max` for everyone and runs T iterations; each iteration sizes every entity at once
(vectorised: one actor pass, one batched walk, one batched critic pass) and evaluates the plan.

Decisions (where code and paper differ, or where this implementation departs from both; methods.md §9):
- **Environment.** The official code trains a fresh LightGCN for 2,000 batches per iteration (300 iterations): days
  of CPU. Here a plan is evaluated by masking a supernet pretrained with random per-row sizes (`SupernetEnv`), a
  second per iteration. The plans kept are retrained from scratch, as in the paper.
- **Budget.** The paper's reward trades quality against size through λ only, and selective retraining keeps the
  best plans whose sparsity meets each target (Eq. 15–16). Here every iteration's plan is projected onto the
  budget (sizes scaled proportionally, clipped to `[1, d_max]`, summing exactly to the budget:
  `rowlevel.allocate`), and the projected sizes are the actions stored. So every visited plan is a candidate for
  the budget and uses all of it; the policy learns the relative allocation. One search serves one budget.
- **Quality term:** the ratio `q_n` (paper), not the raw quality (code). **Noise:** one scalar per iteration added
  after the walk (code), not per entity before it (paper Eq. 11). **T** = 10 (paper; the code runs 11).
- **Updates.** The code does one TD3 update per agent per iteration; here `updates` per iteration (default 5): with
  a one-second environment step the updates are the search's main cost (20 per agent at batch 4,096 took longer
  than the environment), and one update per iteration barely moves the actor in a few hundred iterations.
- **Selective retraining**: the search returns the `top_k` plans by mean validation user quality; the benchmark
  retrains the best one (`retrain()` is missing from the official release).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from search.base import DayStats, Phase, PhaseEnd, SearchConfigError, SearchContext, Searcher
from search.rowlevel import SupernetEnv, allocate, check_row_budget, job_plan, row_budget, table_rows
from sharding.plan import Budget, DimensionPlan, PlanError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CiessConfig:
    """CIESS's search settings (methods.md §5.2; defaults as discussed in the module docstring).

    Args:
        d_max: the largest size.
        episodes: M.
        iterations: T, iterations per episode.
        lam: λ, the size penalty of the reward.
        noise_sigma: σ of the exploration noise, in size units.
        walk_steps: random-walk steps (candidates = start + steps).
        walk_radius: the walk's neighbourhood, in sizes.
        hidden: width of the actor and critic layers.
        actor_lr: Adam's lr for the actors.
        critic_lr: Adam's lr for the critics.
        grad_clip: gradient-norm clip of both networks.
        gamma: the discount.
        tau: the target networks' soft-update rate.
        policy_delay: critic updates per actor update.
        target_noise: σ of the target-policy smoothing, in size units.
        target_noise_clip: its clip, in size units.
        buffer_per_entity: replay capacity per entity.
        batch: transitions per update.
        updates: TD3 updates per agent per iteration.
        top_k: plans kept for selective retraining.
    """

    d_max: int = 128
    episodes: int = 30
    iterations: int = 10
    lam: float = 0.4
    noise_sigma: float = 6.0
    walk_steps: int = 5
    walk_radius: int = 5
    hidden: int = 256
    actor_lr: float = 1e-3
    critic_lr: float = 3e-3
    grad_clip: float = 0.01
    gamma: float = 0.99
    tau: float = 0.005
    policy_delay: int = 2
    target_noise: float = 2.0
    target_noise_clip: float = 5.0
    buffer_per_entity: int = 100
    batch: int = 4096
    updates: int = 5
    top_k: int = 3

    def __post_init__(self) -> None:
        positive = ("d_max", "episodes", "iterations", "walk_radius", "hidden", "buffer_per_entity", "batch", "top_k")
        if bad := [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) < 1]:
            raise ValueError(f"CiessConfig: {', '.join(bad)} must be >= 1")
        if self.d_max < 2:
            raise ValueError(f"CiessConfig: d_max is {self.d_max}; a size search needs d_max >= 2")
        if self.walk_steps < 0 or self.updates < 0 or self.policy_delay < 1:
            raise ValueError("CiessConfig: walk_steps and updates must be >= 0 and policy_delay >= 1")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 < self.tau <= 1.0:
            raise ValueError(f"CiessConfig: gamma ({self.gamma}) must be in [0, 1] and tau ({self.tau}) in (0, 1]")
        if min(self.lam, self.noise_sigma, self.target_noise, self.target_noise_clip) < 0:
            raise ValueError("CiessConfig: lam, noise_sigma, target_noise and target_noise_clip must be >= 0")


def transition_matrix(d_max: int, radius: int) -> torch.Tensor:
    """The random walk over sizes 1..d_max (Graph.py): from d, each d′ with 0 < |d′ − d| ≤ radius with probability
    ∝ 1/|d′ − d|. Row/column i is size i + 1."""
    sizes = torch.arange(d_max, dtype=torch.float64)
    gap = (sizes[None, :] - sizes[:, None]).abs()
    weight = torch.where((gap > 0) & (gap <= radius), 1.0 / gap.clamp(min=1), torch.zeros_like(gap))
    return weight / weight.sum(1, keepdim=True)


def random_walk(start: torch.Tensor, steps: int, matrix: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Walk `steps` steps from every start size at once; returns `[n, steps + 1]` sizes (start first)."""
    cumulative = matrix.cumsum(1)
    nodes = [start.long()]
    current = start.long() - 1
    for _ in range(steps):
        u = torch.rand(current.numel(), 1, generator=generator, dtype=torch.float64)
        current = torch.searchsorted(cumulative[current], u).squeeze(1).clamp(max=matrix.shape[0] - 1)
        nodes.append(current + 1)
    return torch.stack(nodes, 1)


def to_size(action: torch.Tensor, d_max: int) -> torch.Tensor:
    """Actor output in [−1, 1] → a real size in [1, d_max]."""
    return 1.0 + (action + 1.0) * 0.5 * (d_max - 1)


def normalize_size(size: torch.Tensor, d_max: int) -> torch.Tensor:
    """A size in [1, d_max] → [−1, 1] (the critic's action input and the state's size term)."""
    return (size.to(torch.float32) - 1.0) / (d_max - 1) * 2.0 - 1.0


def _mlp(inputs: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())


class Actor(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.body = _mlp(3, hidden)
        self.head = nn.Linear(hidden, 1)
        nn.init.uniform_(self.head.weight, -3e-3, 3e-3)
        nn.init.uniform_(self.head.bias, -3e-3, 3e-3)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.body(state))).squeeze(-1)


class Critic(nn.Module):
    """Q(s, a) with a normalised action in [−1, 1]."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(_mlp(4, hidden), nn.Linear(hidden, 1))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([state, action[:, None]], 1)).squeeze(-1)


def td3_target(
    reward: torch.Tensor,
    done: torch.Tensor,
    next_state: torch.Tensor,
    target_actor: Actor,
    target_critics: tuple[Critic, Critic],
    noise: torch.Tensor,
    gamma: float,
    d_max: int,
) -> torch.Tensor:
    """TD3's target `y = r + γ(1 − done)·min_i Q′_i(s′, clip(μ′(s′) + noise, 1, d_max))`, with `noise` the clipped
    smoothing noise in size units."""
    with torch.no_grad():
        next_size = (to_size(target_actor(next_state), d_max) + noise).clamp(1, d_max)
        a = normalize_size(next_size, d_max)
        q = torch.minimum(target_critics[0](next_state, a), target_critics[1](next_state, a))
        return reward + gamma * (1.0 - done) * q


class Td3Agent:
    """One entity type's actor, twin critics, targets and replay buffer."""

    def __init__(self, config: CiessConfig, num_entities: int) -> None:
        self.config = config
        self.actor = Actor(config.hidden)
        self.critics = (Critic(config.hidden), Critic(config.hidden))
        self.target_actor = copy.deepcopy(self.actor)
        self.target_critics = (copy.deepcopy(self.critics[0]), copy.deepcopy(self.critics[1]))
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam([p for c in self.critics for p in c.parameters()], lr=config.critic_lr)
        capacity = config.buffer_per_entity * num_entities
        self.buffer = torch.zeros(capacity, 9)  # s(3) a(1) r(1) s'(3) done(1)
        self.size = self.position = self.updates = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor.state_dict(),
            "critics": [c.state_dict() for c in self.critics],
            "target_actor": self.target_actor.state_dict(),
            "target_critics": [c.state_dict() for c in self.target_critics],
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "buffer": self.buffer.clone(),
            "counters": (self.size, self.position, self.updates),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.target_actor.load_state_dict(state["target_actor"])
        nets = (*self.critics, *self.target_critics)
        for net, saved in zip(nets, [*state["critics"], *state["target_critics"]], strict=True):
            net.load_state_dict(saved)
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.buffer = state["buffer"].clone()
        self.size, self.position, self.updates = state["counters"]

    @torch.no_grad()
    def choose(self, state: torch.Tensor, generator: torch.Generator, explore: bool) -> torch.Tensor:
        """Integer sizes for every entity: the actor's, or (exploring) the best walk node by Q1 plus noise."""
        d_max = self.config.d_max
        start = to_size(self.actor(state), d_max).round().clamp(1, d_max)
        if not explore:
            return start.long()
        matrix = transition_matrix(d_max, self.config.walk_radius)
        nodes = random_walk(start.long(), self.config.walk_steps, matrix, generator)
        n, k = nodes.shape
        q = self.critics[0](state.repeat_interleave(k, 0), normalize_size(nodes.reshape(-1), d_max)).view(n, k)
        best = nodes.gather(1, q.argmax(1, keepdim=True)).squeeze(1)
        noise = float(torch.randn((), generator=generator)) * self.config.noise_sigma
        return (best.to(torch.float32) + noise).round().clamp(1, d_max).long()

    def store(
        self, state: torch.Tensor, size: torch.Tensor, reward: torch.Tensor, next_state: torch.Tensor, done: bool
    ) -> None:
        rows = torch.cat(
            [
                state,
                normalize_size(size, self.config.d_max)[:, None],
                reward[:, None].to(torch.float32),
                next_state,
                torch.full((state.shape[0], 1), float(done)),
            ],
            1,
        )
        capacity = self.buffer.shape[0]
        index = (self.position + torch.arange(rows.shape[0])) % capacity
        self.buffer[index] = rows
        self.position = int((self.position + rows.shape[0]) % capacity)
        self.size = min(capacity, self.size + rows.shape[0])

    def update(self, generator: torch.Generator) -> None:
        c = self.config
        pick = torch.randint(0, self.size, (min(c.batch, self.size),), generator=generator)
        s, a, r, s2, done = self.buffer[pick].split([3, 1, 1, 3, 1], 1)
        a, r, done = a.squeeze(1), r.squeeze(1), done.squeeze(1)
        noise = (torch.randn(r.shape, generator=generator) * c.target_noise).clamp(
            -c.target_noise_clip, c.target_noise_clip
        )
        y = td3_target(r, done, s2, self.target_actor, self.target_critics, noise, c.gamma, c.d_max)
        critic_loss = ((self.critics[0](s, a) - y) ** 2).mean() + ((self.critics[1](s, a) - y) ** 2).mean()
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        nn.utils.clip_grad_norm_([p for q in self.critics for p in q.parameters()], c.grad_clip)
        self.critic_optimizer.step()
        self.updates += 1
        if self.updates % c.policy_delay:
            return
        actor_loss = -self.critics[0](s, self.actor(s)).mean()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        nn.utils.clip_grad_norm_(self.actor.parameters(), c.grad_clip)
        self.actor_optimizer.step()
        with torch.no_grad():
            for net, target in ((self.actor, self.target_actor), *zip(self.critics, self.target_critics, strict=True)):
                for p, tp in zip(net.parameters(), target.parameters(), strict=True):
                    tp.mul_(1.0 - c.tau).add_(p, alpha=c.tau)


@dataclass
class CiessResult:
    """The best plan found (by mean validation user quality), the top-k, and the search's history."""

    users: np.ndarray
    items: np.ndarray
    quality: float
    top: list[tuple[float, np.ndarray, np.ndarray]]
    evaluations: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _normalize_frequency(freq: np.ndarray) -> torch.Tensor:
    f = torch.as_tensor(freq, dtype=torch.float32)
    span = float(f.max() - f.min())
    return (f - f.min()) / span * 2.0 - 1.0 if span > 0 else torch.zeros_like(f)


def _ratio(quality: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    quality = torch.nan_to_num(quality, nan=0.0)
    return torch.where(peak > 1e-9, (quality / peak.clamp(min=1e-9)).clamp(0.0, 1.0), torch.ones_like(quality))


class CiessLearner:
    """CIESS's policies and one search iteration, written against an environment that scores per-row sizes:
    the paper benchmark's masked LightGCN supernet (`ciess_search`) and the training job's live model
    (`CiessSearcher`) drive this same class.

    Args:
        config: hyper-parameters (`config.d_max` is the largest size).
        num_rows: rows per entity type (users, items).
        budget: the parameters `Σ d` every plan uses, exactly.
        seed: seeds the networks' initialisation and the exploration.
        multiple: sizes are multiples of this (4 in the job: every size is its stored width).
    """

    def __init__(self, config: CiessConfig, num_rows: tuple[int, int], budget: int, seed: int = 0, multiple: int = 1):
        if config.d_max % multiple:
            raise ValueError(f"d_max ({config.d_max}) must be a multiple of {multiple}")
        self.config, self.num_rows, self.budget, self.multiple = config, num_rows, budget, multiple
        check_row_budget(budget // multiple, sum(num_rows), config.d_max // multiple)
        torch.manual_seed(seed)  # the networks' init
        self.generator = torch.Generator().manual_seed(seed)
        self.agents = tuple(Td3Agent(config, n) for n in num_rows)
        self.frequency = tuple(torch.zeros(n) for n in num_rows)

    def set_frequencies(self, users: np.ndarray, items: np.ndarray) -> None:
        self.frequency = (_normalize_frequency(users), _normalize_frequency(items))

    def state(self, i: int, sizes: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        """`[f, d, q]` per row of entity type `i` (module docstring)."""
        return torch.stack([self.frequency[i], normalize_size(sizes, self.config.d_max), ratio * 2.0 - 1.0], 1)

    def start(self) -> list[torch.Tensor]:
        """An episode's first states: every row at d_max, quality ratio 1."""
        return [
            self.state(i, torch.full((n,), self.config.d_max, dtype=torch.long), torch.ones(n))
            for i, n in enumerate(self.num_rows)
        ]

    def iterate(
        self,
        states: list[torch.Tensor],
        quality: Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]],
        peak: tuple[torch.Tensor, torch.Tensor],
        done: bool,
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor], list[float], list[torch.Tensor]]:
        """One iteration: every row's explored size, projected onto the budget, scored by `quality(users, items)`
        (per-row qualities), rewarded against `peak` (the full-size qualities), stored and learned from.

        Returns:
            the sizes, the qualities, the mean reward per entity type, and the next states.
        """
        c, m = self.config, self.multiple
        chosen = [self.agents[i].choose(states[i], self.generator, explore=True) for i in range(2)]
        if m == 1:
            joint = allocate(torch.cat(chosen).numpy(), self.budget, 1, c.d_max)
        else:
            joint = allocate(torch.cat(chosen).numpy() / m, self.budget // m, 1, c.d_max // m) * m
        n_users = self.num_rows[0]
        sizes = [torch.from_numpy(joint[:n_users]), torch.from_numpy(joint[n_users:])]
        qualities = quality(sizes[0].numpy(), sizes[1].numpy())
        rewards, next_states = [], []
        for i in range(2):
            ratio = _ratio(qualities[i], peak[i])
            reward = ratio - c.lam * (sizes[i].to(torch.float32) / c.d_max) ** 2
            next_state = self.state(i, sizes[i], ratio)
            self.agents[i].store(states[i], sizes[i], reward, next_state, done)
            for _ in range(c.updates):
                self.agents[i].update(self.generator)
            next_states.append(next_state)
            rewards.append(float(reward.mean()))
        return sizes, qualities, rewards, next_states

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "frequency": [f.clone() for f in self.frequency],
            "agents": [agent.state_dict() for agent in self.agents],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.frequency = tuple(state["frequency"])
        for agent, saved in zip(self.agents, state["agents"], strict=True):
            agent.load_state_dict(saved)


def ciess_search(
    env: SupernetEnv,
    user_freq: np.ndarray,
    item_freq: np.ndarray,
    budget: int,
    config: CiessConfig,
    seed: int = 0,
) -> CiessResult:
    """Search per-row sizes for users and items under a logical-parameter budget (see the module docstring)."""
    start_time = time.perf_counter()
    num_users, num_items = len(user_freq), len(item_freq)
    if (num_users, num_items) != (env.task.num_users, env.task.num_items):
        raise ValueError(
            f"frequencies are for {num_users} users and {num_items} items but the environment has "
            f"{env.task.num_users} and {env.task.num_items}"
        )
    check_row_budget(budget, num_users + num_items, config.d_max)
    learner = CiessLearner(config, (num_users, num_items), budget, seed)
    learner.set_frequencies(user_freq, item_freq)
    peak = (torch.nan_to_num(env.peak_user, nan=0.0), env.peak_item)
    d_max = config.d_max

    top: list[tuple[float, np.ndarray, np.ndarray]] = []
    history: list[dict[str, float]] = []
    evaluations = 0
    for episode in range(config.episodes):
        states = learner.start()
        for t in range(config.iterations):
            sizes, qualities, rewards, states = learner.iterate(states, env.quality, peak, t == config.iterations - 1)
            evaluations += 1
            mean_quality = float(torch.nanmean(qualities[0]))
            top.append((mean_quality, sizes[0].numpy().copy(), sizes[1].numpy().copy()))
            top = sorted(top, key=lambda x: -x[0])[: config.top_k]
            history.append(
                {
                    "episode": episode,
                    "iteration": t,
                    "quality": mean_quality,
                    "kept": float(sizes[0].sum() + sizes[1].sum()) / (d_max * (num_users + num_items)),
                    "reward_users": rewards[0],
                    "reward_items": rewards[1],
                }
            )
        logger.info(
            "CIESS episode %d/%d: best valid quality %.4f, last %.4f, %.0fs",
            episode + 1,
            config.episodes,
            top[0][0],
            history[-1]["quality"],
            time.perf_counter() - start_time,
        )
    best = top[0]
    return CiessResult(best[1], best[2], best[0], top, evaluations, time.perf_counter() - start_time, history)


# ---- in the training job -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CiessSettings:
    """CIESS's section of a job config (`search.ciess`).

    Args:
        lam: λ, the size penalty of the reward.
        episodes: static protocol: episodes of the search after the supernet phase.
        iterations: static protocol: iterations per episode.
        day_iterations: stream: iterations per day (one episode goes on across days).
        updates: TD3 updates per agent per iteration.
        batch: transitions per update.
        hidden: width of the actor and critic layers.
        env_batches: batches the environment scores each plan on, per rank: the validation split's first ones
            (static), or the last ones of each day, held out from training (stream).
        search_epochs: static protocol: epochs of supernet training (each example's user and item embedding cut
            to a random multiple of 4 up to `search.dim`) before the search.
    """

    lam: float = 0.4
    episodes: int = 10
    iterations: int = 10
    day_iterations: int = 5
    updates: int = 5
    batch: int = 4096
    hidden: int = 256
    env_batches: int = 8
    search_epochs: int = 1

    def __post_init__(self) -> None:
        names = ("episodes", "iterations", "day_iterations", "batch", "hidden", "env_batches", "search_epochs")
        if bad := [f"search.ciess.{n}={getattr(self, n)}" for n in names if getattr(self, n) < 1]:
            raise ValueError(f"{', '.join(bad)}: must be >= 1")
        if self.lam < 0 or self.updates < 0:
            raise ValueError(f"search.ciess.lam ({self.lam}) and search.ciess.updates ({self.updates}) must be >= 0")


class RandomPrefix(nn.Module):
    """The supernet's training hook: in training mode every example's embedding of each feature keeps a random
    prefix (a multiple of 4 in `[4, d_max]`), so every prefix of every row is trained (slimmable networks, OptEmbed's
    dimension masks); evaluation passes the embeddings through. The draw depends only on (seed, step, rank), so a
    resumed run draws the same prefixes.

    Args:
        features: the features cut (users and items).
        d_max: their width.
        seed: the run's seed.
        rank: this process's rank.
    """

    step: torch.Tensor

    def __init__(self, features: tuple[str, ...], d_max: int, seed: int, rank: int) -> None:
        super().__init__()
        self.features, self.d_max, self.seed, self.rank = features, d_max, seed, rank
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self, pooled: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.training:
            return dict(pooled)
        generator = torch.Generator().manual_seed(hash((self.seed, int(self.step), self.rank)) & 0x7FFFFFFFFFFFFFFF)
        self.step += 1
        out = dict(pooled)
        for f in self.features:
            x = pooled[f]
            size = 4 * torch.randint(1, self.d_max // 4 + 1, (x.shape[0], 1), generator=generator)
            out[f] = x * (torch.arange(x.shape[1])[None, :] < size).to(x.device, x.dtype)
        return out


class CiessSearcher(Searcher):
    """CIESS in the training job, over the live sharded model (`DayStats.env`, `jobs/environment.py`).

    - **Static protocol** (search → derive → retrain): a supernet phase trains users and items at `search.dim`
      with random prefixes (`RandomPrefix`); then `episodes × iterations` CIESS iterations, each plan scored per row
      on the validation split's first `env_batches` batches (`exp(−loss)` of each row's examples, rows cut to the
      plan); the best plan by mean user quality becomes row-level bucket tables, retrained from scratch.
    - **Stream**: one episode goes on across days: after each day, `day_iterations` iterations on the day's
      held-out batches, and the day's best plan is the next day's. The live model's rows exist only up to their
      current sizes, so the environment can score a row below its size but not above it (the extra columns are
      zero until trained): on a stream CIESS learns where to shrink, and growth comes from the budget freed.
    - Every plan uses the budget exactly: sizes are multiples of 4 (stored = searched) allocated by
      `rowlevel.allocate`, after the other features' field-level dims (`search.other_dim`).

    Args:
        budget: stored parameters over every table.
        d_max: the largest size (`search.dim`).
        user_feature: the feature whose rows are users.
        item_feature: the feature whose rows are items.
        settings: the method's settings.
        static: the static protocol (else the stream).
        other_dim: the field-level dim of the other features (None: `d_max`).
        seed: seeds the policies, the exploration and the supernet's prefixes.
    """

    name = "ciess"
    settings_class = CiessSettings

    @classmethod
    def check(cls, context: SearchContext) -> None:
        context.need_budget()
        context.need_multiple_of_4()
        if context.dim < 8:
            raise SearchConfigError(
                f"search.method=ciess sizes rows in multiples of 4 up to search.dim >= 8, got {context.dim}"
            )
        context.need_entities()

    @classmethod
    def from_config(cls, settings: CiessSettings, context: SearchContext) -> CiessSearcher:
        users, items = context.need_entities()
        return cls(
            Budget(context.need_budget(), "parameters"), context.dim, users, items, settings, context.static,
            context.other_dim, context.seed,
        )  # fmt: skip

    def __init__(
        self,
        budget: Budget,
        d_max: int,
        user_feature: str,
        item_feature: str,
        settings: CiessSettings,
        static: bool,
        other_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        self.budget, self.d_max, self.settings, self.static, self.seed = budget, d_max, settings, static, seed
        self.entities = (user_feature, item_feature)
        self.other_dim = d_max if other_dim is None else other_dim
        self.env_batches = settings.env_batches
        self.config = CiessConfig(
            d_max=d_max, episodes=settings.episodes, iterations=settings.iterations, lam=settings.lam,
            hidden=settings.hidden, batch=settings.batch, updates=settings.updates,
        )  # fmt: skip
        self.features: list[str] = []
        self.num_embeddings: dict[str, int] = {}
        self.learner: CiessLearner | None = None
        self.states: list[torch.Tensor] | None = None
        self.proposal: tuple[np.ndarray, np.ndarray] | None = None
        self.day_index: int | None = None
        self.history: list[dict[str, float]] = []

    # -- the protocol --

    def initial_plan(self, features: list[str], num_embeddings: Mapping[str, int]) -> DimensionPlan:
        missing = [f for f in self.entities if f not in features]
        if missing:
            raise PlanError(f"CIESS sizes the features {missing}, which are not among the job's features {features}")
        self.features = list(features)
        self.num_embeddings = {f: int(num_embeddings[f]) for f in features}
        rows = (self.num_embeddings[self.entities[0]], self.num_embeddings[self.entities[1]])
        self.learner = CiessLearner(self.config, rows, self._row_budget(), self.seed, multiple=4)
        if self.static:  # the supernet: users and items at d_max (no budget: it is searched over)
            dims = {f: (self.d_max if f in self.entities else self.other_dim) for f in features}
            return DimensionPlan.field_level(dims, self.num_embeddings, provenance={"method": "ciess-supernet"})
        units = allocate(np.ones(sum(rows)), self._row_budget() // 4, 1, self.d_max // 4)
        return self._plan(units[: rows[0]] * 4, units[rows[0] :] * 4, {"method": "ciess", "day_index": None})

    def phases(self, epochs: int) -> list[Phase]:
        return [Phase("search", self.settings.search_epochs, search=True), Phase("train", epochs)]

    def model_hook(self, rank: int) -> nn.Module:
        return RandomPrefix(self.entities, self.d_max, self.seed, rank)

    def observe(self, stats: DayStats) -> None:
        assert self.learner is not None, "CiessSearcher.observe before initial_plan"
        counts = [table_rows(stats.row_counts[f], self.num_embeddings[f], f, "row_counts", 0, np.int64)
                  for f in self.entities]  # fmt: skip
        self.learner.set_frequencies(*counts)
        self.day_index = stats.day_index
        if self.static:
            return
        if stats.env is None:
            raise PlanError("CIESS on a stream needs the job's environment (DayStats.env); none was given")
        if self.states is None:
            self.states = self.learner.start()
        best = self._search(stats.env, self.settings.day_iterations, episode_end=False)
        self.proposal = best

    def propose(self) -> DimensionPlan | None:
        if self.proposal is None:
            return None
        users, items = self.proposal
        self.proposal = None
        return self._plan(users, items, {"method": "ciess", "day_index": self.day_index})

    def end_phase(self, phase: Phase, hook: nn.Module | None, info: Mapping[str, Any]) -> PhaseEnd | None:
        if not phase.search:
            return None
        env = info.get("env")
        if env is None:
            raise PlanError("CIESS's search phase needs the job's environment over the validation split")
        best: tuple[np.ndarray, np.ndarray] | None = None
        best_quality = -np.inf
        for _ in range(self.settings.episodes):
            assert self.learner is not None
            self.states = self.learner.start()
            users, items = self._search(env, self.settings.iterations, episode_end=True)
            if self.history[-1]["best_quality"] > best_quality:
                best_quality, best = self.history[-1]["best_quality"], (users, items)
        assert best is not None
        plan = self._plan(*best, {"method": "ciess", "quality": best_quality, **info_numbers(info)})
        logger.info("CIESS derived plan (mean valid user quality %.4f):\n%s", best_quality, plan.summary())
        return PhaseEnd(plan, from_scratch=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "learner": None if self.learner is None else self.learner.state_dict(),
            "states": self.states,
            "proposal": self.proposal,
            "day_index": self.day_index,
            "history": self.history,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.learner is not None and state.get("learner") is not None:
            self.learner.load_state_dict(state["learner"])
        self.states = state.get("states")
        self.proposal = state.get("proposal")
        self.day_index = state.get("day_index")
        self.history = list(state.get("history", []))

    # -- helpers --

    def _search(self, env: Any, iterations: int, episode_end: bool) -> tuple[np.ndarray, np.ndarray]:
        """`iterations` CIESS iterations from the current states; the best plan by mean user quality."""
        assert self.learner is not None and self.states is not None
        users_f, items_f = self.entities
        full = {f: np.full(self.num_embeddings[f], self.d_max, dtype=np.int64) for f in self.entities}
        peak_rows = env.row_quality(full)
        peak_users, peak_items = (
            torch.nan_to_num(torch.from_numpy(peak_rows[f]).float(), nan=0.0) for f in self.entities
        )
        peak = (peak_users, peak_items)

        def quality(users: np.ndarray, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            q = env.row_quality({users_f: users, items_f: items})
            return torch.from_numpy(q[users_f]).float(), torch.from_numpy(q[items_f]).float()

        best, best_quality = None, -np.inf
        for t in range(iterations):
            done = episode_end and t == iterations - 1
            sizes, qualities, rewards, self.states = self.learner.iterate(self.states, quality, peak, done)
            mean_quality = float(torch.nanmean(qualities[0]))
            if best is None or mean_quality > best_quality:
                best_quality, best = mean_quality, (sizes[0].numpy().copy(), sizes[1].numpy().copy())
            self.history.append(
                {"day_index": float(self.day_index or 0), "quality": mean_quality, "best_quality": best_quality,
                 "reward_users": rewards[0], "reward_items": rewards[1]}
            )  # fmt: skip
        assert best is not None
        return best

    def _row_budget(self) -> int:
        n = sum(self.num_embeddings[f] for f in self.entities)
        return row_budget(
            self.budget.value, self.num_embeddings, self.entities, self.other_dim, 4 * n, "every row at dim 4"
        )

    def _plan(self, users: np.ndarray, items: np.ndarray, provenance: Mapping[str, Any]) -> DimensionPlan:
        rows = dict(zip(self.entities, (users, items), strict=True))
        return job_plan(self.features, self.num_embeddings, rows, self.d_max, self.other_dim, self.budget, provenance)


def info_numbers(info: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of an end-of-phase `info` (for a plan's provenance)."""
    return {k: float(v) for k, v in info.items() if isinstance(v, int | float)}
