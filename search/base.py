"""The `Searcher` interface every dimension search implements (field- and row-level), and the fixed baseline.

The training job calls, per day (DESIGN.md decision 12): `observe(stats)` after training on the day, then
`propose()`; a plan it returns (different from the current one) is applied by reconfiguring the tables. A searcher
is deterministic given its seed, and its `state_dict` is saved in every checkpoint so a resumed run searches on
exactly as an uninterrupted one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sharding.plan import Budget, DimensionPlan, uniform_plan


@dataclass(frozen=True)
class DayStats:
    """What a searcher sees after a day of training.

    Args:
        day: the day's date (ISO).
        day_index: its position in the stream.
        num_rows: per feature, the rows its vocabulary uses (fallback included).
        row_counts: per feature, each row's training frequency so far (identical on every rank).
        metrics: the day's prequential metrics (e.g. auc, loss).
        row_losses: for each of the searcher's `row_loss_features`, every row's mean example loss in the day's
            prequential evaluation (before training on the day; nan for rows without an example), over all ranks.
    """

    day: str
    day_index: int
    num_rows: Mapping[str, int]
    row_counts: Mapping[str, np.ndarray] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    row_losses: Mapping[str, np.ndarray] = field(default_factory=dict)


class Searcher(ABC):
    """Proposes `DimensionPlan`s under a budget from training statistics."""

    name: str = "base"
    row_loss_features: tuple[str, ...] = ()  # features whose per-row losses the job reports in `DayStats`

    @abstractmethod
    def initial_plan(self, features: list[str], num_embeddings: Mapping[str, int]) -> DimensionPlan:
        """The plan to start training with."""

    def observe(self, stats: DayStats) -> None:  # noqa: B027 - optional hook
        """Take in a day's statistics."""

    def propose(self) -> DimensionPlan | None:
        """A new plan to move to, or None to keep the current one."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - stateless by default
        """Restore from `state_dict()`."""


class FixedSearcher(Searcher):
    """Every feature at the same dim for the whole run (FIXED / FDE in the papers): the no-op searcher.

    Args:
        dim: the embedding dim of every feature.
        budget: the budget the plan is checked against, if any.
    """

    name = "fixed"

    def __init__(self, dim: int, budget: Budget | None = None) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be > 0, got {dim}")
        self.dim, self.budget = dim, budget

    def initial_plan(self, features: list[str], num_embeddings: Mapping[str, int]) -> DimensionPlan:
        plan = uniform_plan(features, num_embeddings, self.dim, budget=self.budget, provenance={"method": self.name})
        plan.check_budget()
        return plan
