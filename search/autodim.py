"""AutoDim: field-level embedding dimension search.

Zhao, Liu, Guo, Tang, Liu, Wang, Yin, Tang, Liu. "Memory-efficient Embedding for Recommendations" (arXiv
2006.14827; WWW'21 as "AutoDim: Field-aware Embedding Dimension Search in Recommender Systems"). Details follow
`../shared/reference/methods.md` §2; the equation numbers below are that section's.

- Search space (§2.1): each field m picks one dim among candidates d_1 < … < d_N (here multiples of 4, since
  FBGEMM's kernels need it; default {4, 8, 16, 24, 32} for the paper's {2, 8, 16, 24, 32}).
- Weight sharing (§2.2, the adopted variant): one d_N-dim table per field; candidate n reads its first d_n
  columns. The search therefore runs on the ordinary max-dim sharded tables.
- Dimension unification (§2.3): x̃_m^n = W_{m,n}ᵀ x_m[:d_n] + b_{m,n}, then BatchNorm per (field, candidate)
  without affine parameters. Decision: W per field and candidate, as the Hetu implementation does, rather than
  one W per candidate shared by all fields as the paper's text says — fields' embeddings are differently
  distributed, and the extra parameters exist only during the search. All candidates of a field are computed in
  one matmul with W's rows past d_n zeroed, which equals the sliced product.
- Selection (§2.4): architecture logits a_m ∈ R^N per field, α_m = softmax(a_m); Gumbel-softmax weights
  p_m^n = softmax_n((log α_m^n + g_n) / τ), g = −log(−log u); the field embedding is Σ_n p_m^n x̂_m^n.
  Temperature τ = max(τ_min, 1 − decay·t) with decay 5e-5 and τ_min 0.01 per model step t (the paper's schedule;
  `decay` is configurable because small datasets take few steps).
- Bi-level optimisation (§2.4, first-order, ξ = 0): 10 model-weight steps on training batches per architecture
  step on a validation batch (f = 10); optional warm-up steps with uniform, fixed weights (the pre-train trick).
  Architecture steps leave the embedding tables untouched (the lookup runs without gradient, so the fused
  optimizer does not fire). The paper's architecture optimizer is Adam; the job also offers SGD
  (`search.autodim.arch_optimizer=sgd`): Adam scales every logit's step to about the learning rate however weak its
  gradient, so a field with no signal — whose validation gradient is noise — can end up confidently on any
  candidate, while with SGD its weights stay near uniform and it is the least certain field, which the budget rule
  shrinks first
  (`tests/test_train.py`, planted importance on the synthetic stream).
- Hard selection (§2.4): k_m = argmax_n α_m^n; the tables are then rebuilt at exactly those dims (the job's
  reconfiguration path) and retrained without Gumbel noise or BN, each field projected to the model's width by
  the dense model's per-field projection.
- Budget (our addition): if the argmax plan is over the parameter budget, the field whose choice is least certain
  (smallest max_n α_m^n) among those above their smallest candidate steps down one candidate, repeatedly, until
  the plan fits. Fields the search is unsure about lose memory first.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from search.base import Phase, PhaseEnd, SearchContext, Searcher, SearchStep
from sharding.plan import Budget, DimensionPlan, PlanError, physical_dim

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoDimConfig:
    """AutoDim's hyper-parameters.

    Args:
        candidate_dims: candidate dims, ascending multiples of 4; the largest is the search tables' width.
        arch_every: model-weight steps per architecture step (the paper's f).
        arch_lr: Adam learning rate of the architecture logits.
        warmup_steps: model-weight steps with uniform, fixed architecture weights before the search.
        temperature_decay: τ = max(min_temperature, 1 − temperature_decay · step).
        min_temperature: the temperature floor.
        search_epochs: passes over the training split during the search.
        seed: seeds the Gumbel noise (with the step and the rank) and the head's initialisation; None in a job
            config means the run's `train.seed`.
        arch_noise: architecture steps mix the candidates with Gumbel-softmax weights, as the paper does; False
            mixes them with softmax(α) instead (a lower-variance gradient, useful on small data). Model-weight steps
            always use Gumbel-softmax.
        arch_optimizer: the architecture optimizer: `adam` (the paper's) or `sgd`. Adam scales every logit's step
            to about `arch_lr` however weak its gradient, so a field whose validation gradient is only noise (a
            field with no signal) can end up confidently on any candidate; with SGD such a field's weights stay
            near uniform, its choice is the least certain, and the budget rule shrinks it first (a few times larger
            `arch_lr` is needed: e.g. 10).
        retrain: the retrain at the derived dims starts from `scratch` (fresh weights, as the paper does) or from
            the `search` (the supernet's table prefixes and the dense weights whose shapes are unchanged).
    """

    candidate_dims: tuple[int, ...] = (4, 8, 16, 24, 32)
    arch_every: int = 10
    arch_lr: float = 1e-3
    warmup_steps: int = 0
    temperature_decay: float = 5e-5
    min_temperature: float = 0.01
    search_epochs: int = 1
    seed: int | None = None
    arch_noise: bool = True
    arch_optimizer: Literal["adam", "sgd"] = "adam"
    retrain: Literal["scratch", "search"] = "scratch"

    def __post_init__(self) -> None:
        dims = list(self.candidate_dims)
        if not dims:
            raise ValueError("search.autodim.candidate_dims is empty; give at least one dim, e.g. [4, 8, 16, 24, 32]")
        if bad := [d for d in dims if d <= 0]:
            raise ValueError(f"search.autodim.candidate_dims must be positive, got {bad}")
        if bad := [d for d in dims if d % 4]:
            raise ValueError(
                f"search.autodim.candidate_dims {bad} are not multiples of 4 (FBGEMM's fused kernels need it); "
                f"use e.g. {[physical_dim(d) for d in bad]}"
            )
        if dims != sorted(set(dims)):
            raise ValueError(f"search.autodim.candidate_dims must be strictly increasing, got {dims}")
        if self.arch_every < 1 or self.search_epochs < 1 or self.warmup_steps < 0:
            raise ValueError(
                "search.autodim.arch_every and search.autodim.search_epochs must be >= 1, warmup_steps >= 0"
            )
        if not 0 < self.min_temperature <= 1 or self.temperature_decay < 0:
            raise ValueError("search.autodim.min_temperature must be in (0, 1] and temperature_decay >= 0")
        if self.arch_optimizer not in ("adam", "sgd"):
            raise ValueError(f"search.autodim.arch_optimizer is '{self.arch_optimizer}', expected 'adam' or 'sgd'")

    @property
    def max_dim(self) -> int:
        return self.candidate_dims[-1]

    def temperature(self, step: int) -> float:
        return max(self.min_temperature, 1.0 - self.temperature_decay * step)

    def arch_step_after(self, step: int) -> bool:
        """Whether model-weight step `step` (0-based) is followed by an architecture step: every `arch_every`-th
        step once the warm-up is over."""
        return step >= self.warmup_steps and (step - self.warmup_steps + 1) % self.arch_every == 0


def gumbel_softmax_weights(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """p = softmax((log softmax(logits) + g) / τ) over the last dim, g ~ Gumbel(0, 1) (methods.md §2.4)."""
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-10, 1.0 - 1e-7)
    gumbel = -torch.log(-torch.log(u))
    return torch.softmax((torch.log_softmax(logits, dim=-1) + gumbel) / temperature, dim=-1)


class AutoDimHead(nn.Module):
    """The search-time transform of the max-dim pooled embeddings: per field, a Gumbel-softmax mixture of its
    candidate prefixes, each linearly aligned to the max dim and batch-normalised.

    Args:
        features: the searched fields, in model order.
        config: candidates and schedule.
        rank: this process's rank (decorrelates the Gumbel noise across ranks).
    """

    step: torch.Tensor
    masks: torch.Tensor

    def __init__(self, features: Sequence[str], config: AutoDimConfig, rank: int = 0) -> None:
        super().__init__()
        self.features, self.config, self.rank = list(features), config, rank
        m, n, d = len(self.features), len(config.candidate_dims), config.max_dim
        self.arch_logits = nn.Parameter(torch.zeros(m, n))
        bound = 1.0 / np.sqrt(d)
        self.align_weight = nn.Parameter(torch.empty(m, n, d, d).uniform_(-bound, bound))
        self.align_bias = nn.Parameter(torch.zeros(m, n, d))
        self.norm = nn.BatchNorm1d(m * n * d, affine=False)
        masks = torch.zeros(n, d)
        for i, dim in enumerate(config.candidate_dims):
            masks[i, :dim] = 1.0
        self.register_buffer("masks", masks)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.uniform = False  # warm-up: fixed uniform weights instead of Gumbel-softmax
        self.noise = True  # Gumbel noise in training mode (off for architecture steps when arch_noise is False)

    def weights(self) -> torch.Tensor:
        """This step's candidate weights p [fields, candidates]."""
        if self.uniform:
            # Uniform, but still a function of the logits (zero gradient): DDP's static graph needs every
            # parameter used in every step.
            return torch.softmax(self.arch_logits * 0.0, dim=-1)
        if not self.training or not self.noise:
            # Evaluation (and noise-free architecture steps) use the architecture's own distribution.
            return torch.softmax(self.arch_logits, dim=-1)
        generator = torch.Generator().manual_seed(
            hash((self.config.seed or 0, int(self.step), self.rank)) & 0x7FFFFFFFFFFFFFFF
        )
        return gumbel_softmax_weights(self.arch_logits, self.config.temperature(int(self.step)), generator)

    def forward(self, pooled: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = torch.stack([pooled[f][:, : self.config.max_dim] for f in self.features], dim=1)  # [B, M, D]
        m, n, d, _ = self.align_weight.shape
        # Candidate n reads the first d_n inputs: zero W's other rows, then one [B, D] @ [D, N*D] matmul per field.
        weight = (self.align_weight * self.masks[None, :, :, None]).permute(0, 2, 1, 3).reshape(m, d, n * d)
        aligned = torch.bmm(x.transpose(0, 1), weight).transpose(0, 1).reshape(-1, m, n, d) + self.align_bias
        normed = self.norm(aligned.reshape(-1, m * n * d)).reshape(-1, m, n, d)
        mixed = (normed * self.weights()[None, :, :, None]).sum(dim=2)
        return {f: mixed[:, i] for i, f in enumerate(self.features)}

    def advance(self) -> int:
        """Count one model-weight step (it drives the temperature and the Gumbel noise); returns the old count."""
        step = int(self.step)
        self.step += 1
        return step

    def probabilities(self) -> np.ndarray:
        """α = softmax(architecture logits) [fields, candidates]."""
        return torch.softmax(self.arch_logits.detach(), dim=-1).numpy()


class AutoDimSearcher(Searcher):
    """Searches one dim per field with AutoDim, then derives the hard plan.

    Args:
        config: hyper-parameters.
        budget: the parameter budget the derived plan must meet, if any.
    """

    name = "autodim"
    settings_class = AutoDimConfig

    def __init__(self, config: AutoDimConfig, budget: Budget | None = None) -> None:
        self.config, self.budget = config, budget
        self.probabilities: np.ndarray | None = None
        self.features: list[str] = []
        self.num_embeddings: dict[str, int] = {}

    @classmethod
    def check(cls, context: SearchContext) -> None:
        context.need_protocol(streaming=False)

    @classmethod
    def from_config(cls, settings: AutoDimConfig, context: SearchContext) -> AutoDimSearcher:
        if settings.seed is None:
            settings = replace(settings, seed=context.seed)
        return cls(settings, Budget(context.budget) if context.budget else None)

    # -- the protocol: search (the head and its architecture step) → derive → retrain --

    def phases(self, epochs: int) -> list[Phase]:
        return [Phase("search", self.config.search_epochs, search=True), Phase("train", epochs)]

    def model_hook(self, rank: int) -> AutoDimHead:
        torch.manual_seed(self.config.seed or 0)  # torch's own initial seed differs in every process
        return self.head(rank)

    @property
    def hook_width(self) -> int:
        return self.config.max_dim

    def search_step(self, hook: nn.Module) -> ArchitectureStep:
        assert isinstance(hook, AutoDimHead)
        return ArchitectureStep(hook)

    def end_phase(self, phase: Phase, hook: nn.Module | None, info: Mapping[str, Any]) -> PhaseEnd | None:
        """After the search: hard dims by argmax (under the budget), retrained at exactly those dims."""
        if not phase.search:
            return None
        assert isinstance(hook, AutoDimHead)
        plan = self.derive(hook.probabilities(), self.num_embeddings, provenance=info)
        logger.info("AutoDim derived plan:\n%s", plan.summary())
        return PhaseEnd(plan, from_scratch=self.config.retrain == "scratch")

    def epoch_record(self, hook: nn.Module | None) -> dict[str, Any]:
        if not isinstance(hook, AutoDimHead):
            return {}
        return {
            "probabilities": {f: p.round(4).tolist() for f, p in zip(self.features, hook.probabilities(), strict=True)}
        }

    def initial_plan(self, features: list[str], num_embeddings: Mapping[str, int]) -> DimensionPlan:
        """The search tables: every field at the largest candidate (no budget: it is the supernet)."""
        self.features = list(features)
        self.num_embeddings = {f: int(num_embeddings[f]) for f in features}
        smallest = DimensionPlan.field_level({f: self.config.candidate_dims[0] for f in features}, num_embeddings)
        if self.budget is not None and smallest.budget_used() > self.budget.value:
            raise PlanError(
                f"the budget of {self.budget.value:,} {self.budget.unit} is below the smallest plan AutoDim can "
                f"derive (every field at {self.config.candidate_dims[0]}: {smallest.budget_used():,}); the "
                f"smallest feasible budget is {smallest.budget_used():,}. Raise search.budget or add a smaller "
                "candidate dim"
            )
        return DimensionPlan.field_level(
            {f: self.config.max_dim for f in features}, num_embeddings, provenance={"method": "autodim-search"}
        )

    def head(self, rank: int = 0) -> AutoDimHead:
        return AutoDimHead(self.features, self.config, rank)

    def derive(
        self, probabilities: np.ndarray, num_embeddings: Mapping[str, int], provenance: Mapping[str, Any] | None = None
    ) -> DimensionPlan:
        """The hard plan: argmax per field, then the budget rule of the module docstring."""
        probs = self.probabilities = np.asarray(probabilities)
        cands = self.config.candidate_dims
        choice = probs.argmax(axis=1)
        certainty = probs.max(axis=1)

        def plan_for(choice: np.ndarray) -> DimensionPlan:
            return DimensionPlan.field_level(
                {f: cands[int(c)] for f, c in zip(self.features, choice, strict=True)},
                num_embeddings,
                budget=self.budget,
                provenance={
                    "method": "autodim",
                    "candidate_dims": list(cands),
                    "probabilities": {f: p.round(4).tolist() for f, p in zip(self.features, probs, strict=True)},
                    **(provenance or {}),
                },
            )

        plan = plan_for(choice)
        while self.budget is not None and plan.budget_used() > self.budget.value:
            shrinkable = np.flatnonzero(choice > 0)
            # Fields that are feasible to shrink, least certain first (ties: the one that saves most).
            saves = np.array([num_embeddings[self.features[i]] for i in shrinkable])
            order = np.lexsort((-saves, certainty[shrinkable]))
            choice = choice.copy()
            choice[shrinkable[order[0]]] -= 1
            plan = plan_for(choice)
        return plan

    def state_dict(self) -> dict[str, Any]:
        return {
            "features": self.features,
            "probabilities": None if self.probabilities is None else self.probabilities.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.features = list(state.get("features", []))
        probs = state.get("probabilities")
        self.probabilities = None if probs is None else np.asarray(probs)


class ArchitectureStep(SearchStep):
    """AutoDim's architecture step inside the search phase: every `arch_every`-th model-weight step (after the
    warm-up), one step of the architecture logits on a validation batch of the same day (the day's validation
    batches taken in turn, so a resumed run takes the same ones). Its lookup runs without gradient, so the fused
    optimizer leaves the tables alone; the dense gradients it leaves are cleared by the job.

    Args:
        head: the live `AutoDimHead` inside the sharded model.
    """

    def __init__(self, head: AutoDimHead) -> None:
        self.head, self.config = head, head.config
        lr = self.config.arch_lr
        self.optimizer: torch.optim.Optimizer = (
            torch.optim.SGD([head.arch_logits], lr=lr)
            if self.config.arch_optimizer == "sgd"
            else torch.optim.Adam([head.arch_logits], lr=lr)
        )
        self.taken = 0  # architecture steps in this pass over the day

    def parameters(self) -> list[nn.Parameter]:
        return [self.head.arch_logits]

    def before_step(self) -> None:
        self.step = int(self.head.step)
        self.head.uniform = self.step < self.config.warmup_steps

    def after_step(self, model: nn.Module, freeze: Any, validation: Sequence[Any]) -> bool:
        self.head.advance()
        if not (self.config.arch_step_after(self.step) and validation):
            return False
        freeze(True)
        self.head.noise = self.config.arch_noise
        self.optimizer.zero_grad()
        loss, _ = model(validation[self.taken % len(validation)])
        loss.backward()
        self.optimizer.step()
        freeze(False)
        self.head.noise = True
        self.taken += 1
        return True

    def end_pass(self) -> None:
        self.head.uniform = False
        self.taken = 0

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class UniformBudgetSearcher(Searcher):
    """The largest equal dim (a multiple of 4) for every feature that fits the parameter budget.

    Args:
        budget: the budget to fill.
        max_dim: never above this dim.
    """

    name = "uniform-budget"

    def __init__(self, budget: Budget, max_dim: int = 128) -> None:
        self.budget, self.max_dim = budget, max_dim

    @classmethod
    def check(cls, context: SearchContext) -> None:
        context.need_budget()

    @classmethod
    def from_config(cls, settings: Any, context: SearchContext) -> UniformBudgetSearcher:
        return cls(Budget(context.need_budget()))

    def initial_plan(self, features: list[str], num_embeddings: Mapping[str, int]) -> DimensionPlan:
        rows = sum(num_embeddings[f] for f in features)
        per_param = 4 if self.budget.unit == "bytes" else 1
        dim = min(self.max_dim, (self.budget.value // (rows * per_param)) // 4 * 4)
        if dim < 4:
            smallest = 4 * rows * per_param
            raise PlanError(
                f"the budget of {self.budget.value:,} {self.budget.unit} cannot give every feature even dim 4 "
                f"({rows:,} rows need {smallest:,}); the smallest feasible budget is {smallest:,}"
            )
        plan = DimensionPlan.field_level(
            {f: dim for f in features}, num_embeddings, budget=self.budget, provenance={"method": self.name}
        )
        plan.check_budget()
        return plan
