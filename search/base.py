"""The one search protocol every dimension search implements (DESIGN.md decision 16), and the fixed baseline.

A `Searcher` owns its whole algorithm; the training job knows it only through this interface:

- `from_config(settings, context)`: built from its own config section (`search.<method>`, a dataclass named by
  `settings_class`) and what the job knows (`SearchContext`); `check(context)` refuses, before any worker starts, a
  protocol, model or dataset it cannot serve.
- `initial_plan(features, num_embeddings)`: the plan training starts with.
- `phases(epochs)`: the phases of a static protocol (default: one `train` phase of `train.epochs` epochs; AutoDim:
  `search` then `train`). The prequential protocol is one pass over the stream.
- `model_hook(rank)`: during a `search` phase, an optional module between the embeddings and the dense model
  (AutoDim's weighted head, a PEP-style mask); the dense model then sees every feature at `hook_width`.
- `search_step(hook)`: an optional step of its own inside training (AutoDim's architecture step on validation
  batches), given the live hook; `SearchStep.parameters` are the hook's weights it trains (the job's dense
  optimizer leaves them alone).
- `observe(stats)` / `propose()` after every day of training: a plan it returns (different from the current one) is
  applied by reconfiguring the tables. `DayStats.env`, when the job gives one, scores candidate per-row sizes on the
  live model (the job's environment; the paper benchmarks hand the same searchers a LightGCN environment).
- `end_phase(phase, hook, info)`: at the end of a phase, an optional new plan (AutoDim's derived dims) and whether
  to retrain it from scratch.
- `state_dict` / `load_state_dict`: the searcher's state (a `Stateful`), saved in every checkpoint, so a resumed
  run searches on exactly as an uninterrupted one. A searcher is deterministic given its seed.

`search.registry` maps `search.method` to the searcher class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
from torch import nn

from sharding.plan import Budget, DimensionPlan, uniform_plan


class SearchConfigError(ValueError):
    """A search that cannot run as configured: a missing setting, or a protocol, model or dataset it cannot serve."""


@dataclass(frozen=True)
class NoSettings:
    """The settings of a method that has none beyond `search.dim` and `search.budget`."""


@dataclass(frozen=True)
class SearchContext:
    """What the job tells a searcher when building it.

    Args:
        method: the `search.method` it was registered under.
        dataset: the dataset's name; None while only the config is checked (the dataset's checks wait for it).
        features: the sparse features, in model order.
        user_field: the feature whose rows are users (None: the dataset names none).
        item_field: the feature whose rows are items.
        protocol: `prequential`, or a static split (`random`, `per-user`, `given`).
        model: the dense model's name.
        seed: the run's seed.
        dim: `search.dim`: every feature's dim for `fixed`; the widest row (d_max) for row-level methods.
        other_dim: `search.other_dim`: the field-level dim of the features a row-level method does not size.
        budget: `search.budget` in embedding parameters (None: no budget).
        row_alignment: `search.row_alignment`: the bytes every served row is padded to.
    """

    method: str
    dataset: str | None = None
    features: tuple[str, ...] = ()
    user_field: str | None = None
    item_field: str | None = None
    protocol: str = "prequential"
    model: str = "dlrm"
    seed: int = 0
    dim: int = 16
    other_dim: int | None = None
    budget: int | None = None
    row_alignment: int = 16

    @property
    def static(self) -> bool:
        return self.protocol != "prequential"

    def need_budget(self) -> int:
        if self.budget is None:
            raise SearchConfigError(f"search.method={self.method} needs search.budget (embedding parameters)")
        return self.budget

    def need_entities(self) -> tuple[str, str]:
        """The user and item features, or an error saying the row-level method needs them (nothing is checked
        before the dataset is known: the features are then returned as given)."""
        if self.dataset is not None and (self.user_field is None or self.item_field is None):
            raise SearchConfigError(
                f"search.method={self.method} sizes user and item rows, but dataset '{self.dataset}' names no "
                "user_field or item_field in its dataset.yaml. Fix: set both in its dataset.yaml, or use a "
                "field-level method (fixed, uniform-budget, autodim)"
            )
        return self.user_field or "user", self.item_field or "item"

    def need_protocol(self, streaming: bool) -> None:
        if streaming and self.static:
            raise SearchConfigError(
                f"search.method={self.method} is a streaming search: set data.protocol to prequential"
            )
        if not streaming and not self.static:
            raise SearchConfigError(
                f"search.method={self.method} searches on a static split: set data.protocol to random (80/10/10), "
                "per-user or given"
            )

    def need_multiple_of_4(self) -> None:
        other = self.dim if self.other_dim is None else self.other_dim
        if self.dim % 4 or other % 4:
            raise SearchConfigError(
                f"search.method={self.method} stores every size as it is searched: search.dim ({self.dim}) and "
                f"search.other_dim ({self.other_dim}) must be multiples of 4"
            )


class Environment(Protocol):
    """Scores per-row sizes on a trained model: the job's (the live sharded model on held-out batches, rows truncated
    to the sizes) or a paper protocol's (LightGCN on a graph)."""

    def fitness(self, sizes: Mapping[str, np.ndarray]) -> float:
        """Quality (higher is better) with each named feature's rows cut to `sizes[feature]` dims."""
        ...

    def row_quality(self, sizes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per row of each named feature, its quality (higher is better; nan: no evidence) under `sizes`."""
        ...


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
        env: scores candidate sizes on the model as trained on the day, for searchers that probe it (None where the
            job gives none). Its verdict is identical on every rank.
    """

    day: str
    day_index: int
    num_rows: Mapping[str, int]
    row_counts: Mapping[str, np.ndarray] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    row_losses: Mapping[str, np.ndarray] = field(default_factory=dict)
    env: Environment | None = None


@dataclass(frozen=True)
class Phase:
    """One phase of a static protocol: `epochs` passes over the train split; `search` phases run the searcher's
    model hook and search step."""

    name: str
    epochs: int
    search: bool = False


@dataclass(frozen=True)
class PhaseEnd:
    """A searcher's plan at the end of a phase; `from_scratch` retrains it from fresh weights."""

    plan: DimensionPlan
    from_scratch: bool = False


class SearchStep(ABC):
    """A searcher's own step inside training during a search phase (AutoDim's architecture step)."""

    @abstractmethod
    def parameters(self) -> list[nn.Parameter]:
        """The hook's weights this step trains (the job's dense optimizer leaves them alone)."""

    def before_step(self) -> None:  # noqa: B027 - optional hook
        """Before a model-weight step."""

    @abstractmethod
    def after_step(self, model: nn.Module, freeze: Any, validation: Sequence[Any]) -> bool:
        """After a model-weight step: its own step if due, on `validation` batches through `model` (a callable
        `batch -> (loss, ...)`), with `freeze(True/False)` to run the lookup without gradient. Returns whether it ran
        one (the job then clears the gradients it left on the model)."""

    def end_pass(self) -> None:  # noqa: B027 - optional hook
        """At the end of a pass over a day."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - stateless by default
        """Restore from `state_dict()`."""


class Searcher(ABC):
    """Proposes `DimensionPlan`s under a budget, by the protocol of the module docstring."""

    name: str = "base"
    settings_class: ClassVar[type] = NoSettings
    row_loss_features: tuple[str, ...] = ()  # features whose per-row losses the job reports in `DayStats`
    # Batches at the end of each day's training stream the job holds out (never trained on) to give `observe` an
    # environment (`DayStats.env`) over the model as trained on the day; 0: no environment.
    env_batches: int = 0

    @classmethod  # noqa: B027 - accepts everything by default
    def check(cls, context: SearchContext) -> None:
        """Refuse a protocol, model, dataset or setting this method cannot serve (raise `SearchConfigError`)."""

    @classmethod
    @abstractmethod
    def from_config(cls, settings: Any, context: SearchContext) -> Searcher:
        """The searcher for its `settings` (a `settings_class`) and the job's `context`."""

    @abstractmethod
    def initial_plan(self, features: list[str], num_embeddings: Mapping[str, int]) -> DimensionPlan:
        """The plan to start training with."""

    def phases(self, epochs: int) -> list[Phase]:
        """The phases of a static protocol; `epochs` is `train.epochs`."""
        return [Phase("train", epochs)]

    def model_hook(self, rank: int) -> nn.Module | None:
        """A module between the embeddings and the dense model during search phases, or None."""
        return None

    @property
    def hook_width(self) -> int | None:
        """The width the dense model sees per feature while the hook is on."""
        return None

    def search_step(self, hook: nn.Module) -> SearchStep | None:
        """The searcher's own step inside training on the live `hook`, or None."""
        return None

    def end_phase(self, phase: Phase, hook: nn.Module | None, info: Mapping[str, Any]) -> PhaseEnd | None:
        """A new plan at the end of `phase`, or None. `info` holds e.g. `search_seconds`, and at the end of a search
        phase of a searcher with `env_batches`, `env`: the job's environment over the validation split."""
        return None

    def epoch_record(self, hook: nn.Module | None) -> dict[str, Any]:
        """Extra fields for the epoch's metrics record (e.g. AutoDim's architecture probabilities)."""
        return {}

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

    @classmethod
    def from_config(cls, settings: Any, context: SearchContext) -> FixedSearcher:
        return cls(context.dim, Budget(context.budget) if context.budget else None)

    def initial_plan(self, features: list[str], num_embeddings: Mapping[str, int]) -> DimensionPlan:
        plan = uniform_plan(features, num_embeddings, self.dim, budget=self.budget, provenance={"method": self.name})
        plan.check_budget()
        return plan
