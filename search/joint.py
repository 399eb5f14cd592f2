"""Joint: each table's dim *and* serving precision, chosen together under one serving-byte budget.

No published method searches dims and precision together (`../shared/reference/methods.md` has none); this one is
a measured rule, not a learned policy:

1. **Train** every feature at `search.dim` in fp32 (the FIXED-d model), for `search_epochs` epochs of a static
   split, or `search_days` days of a stream.
2. **Measure.** On held-out batches (the validation split's first `env_batches`, or the day's held-out tail on a
   stream: never the test split), the job's environment scores the trained model with *one* feature at a time
   cut to each candidate dim (its first `d` columns, the rest zero) and its kept columns read back from each
   candidate dtype (`sharding.embedding.quantize_dequantize`: FBGEMM's own row-wise quantisation, what serving
   stores). That is `Δ(f, d, q)` = the loss with feature `f` at `(d, q)` − the loss of the model as trained: one
   forward pass over the held-out batches per candidate (`features × dims × dtypes` passes). For a single-hot
   feature this is exactly the served model's loss change; for a multi-hot one the pooled sum is quantised instead
   of each row (an approximation).
3. **Choose.** A multiple-choice knapsack: one `(d, q)` per feature, minimising `Σ_f Δ(f, d, q)` (the change of
   each feature alone, taken as additive; a change within `tolerance` of the loss, or a gain, counts as none, and
   ties go to the wider dim, then the fewer bytes: `JointSearcher.values`) subject to
   `Σ_f rows_f × row_bytes(d, q) ≤ budget`, solved exactly by dynamic programming over the budget in `RESOLUTION`
   units with every cost rounded *up* — so the chosen plan never exceeds the budget (the plan is also checked
   against it, `Budget(unit="serving_bytes")`).
4. **Fine-tune** at the chosen dims (or, with `from_scratch` on a static split, retrain them from fresh weights):
   the tables keep their first `d` columns (`PlannedModel.reconfigure`'s prefix migration, the cut that was
   measured), each feature at `d < search.dim` becomes a one-bucket row-level feature zero-padded to `search.dim`
   (the dense model is unchanged), for `finetune_epochs` epochs (0: serve the cut as measured); on a stream the
   following days train on. Training stays fp32; each table is quantised to its chosen dtype at export
   (`jobs.export`) and scored that way by `jobs.evaluate`.

Why a measured rule: the quantities a budget trades — a table's bytes and its effect on the loss — are both
observable on the trained model for every candidate at the cost of a forward pass, so no policy has to learn them;
the knapsack then spends the bytes where the measured loss is most sensitive. Its limits: `Δ` is measured before
fine-tuning (an upper bound on what a cut costs after it), features are assumed not to interact, and dims are
chosen per table, not per row (mixed-dimension methods size rows by frequency; MD is the baseline for that).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from search.base import DayStats, Phase, PhaseEnd, SearchConfigError, SearchContext, Searcher
from sharding.plan import (
    PRECISIONS,
    ROW_ALIGNMENT,
    Budget,
    DimensionPlan,
    FeaturePlan,
    PlanError,
    row_bytes,
    uniform_plan,
)

logger = logging.getLogger(__name__)

RESOLUTION = 100_000  # budget units of the knapsack; costs are rounded up to them


@dataclass(frozen=True)
class JointSettings:
    """`search.joint`.

    Args:
        budget_bytes: the serving-byte budget (`DimensionPlan.serving_bytes`).
        budget_fraction: or the budget as a fraction of every feature at `search.dim` in fp32 (FIXED-d fp32's
            serving bytes); give exactly one of the two.
        dims: candidate dims (multiples of 4, at most `search.dim`; larger ones are dropped).
        dtypes: candidate serving dtypes.
        search_epochs: epochs at `search.dim` before the search (static protocols).
        finetune_epochs: epochs at the chosen dims after it (static protocols; 0: none).
        from_scratch: static protocols: train the chosen plan from fresh weights for `finetune_epochs` (a retrain,
            as AutoDim and CIESS retrain their derived plans) instead of fine-tuning the cut model.
        search_days: days of the stream at `search.dim` before the search (prequential).
        env_batches: held-out batches every candidate is scored on.
        tolerance: a loss change below this fraction of the trained model's held-out loss counts as none.
    """

    budget_bytes: int | None = None
    budget_fraction: float | None = None
    dims: tuple[int, ...] = (4, 8, 12, 16, 24, 32, 48, 64)
    dtypes: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")  # int2 only when asked: it rarely pays per table
    search_epochs: int = 1
    finetune_epochs: int = 1
    from_scratch: bool = False
    search_days: int = 1
    env_batches: int = 8
    tolerance: float = 1e-3

    def __post_init__(self) -> None:
        problems = []
        if (self.budget_bytes is None) == (self.budget_fraction is None):
            problems.append("give exactly one of search.joint.budget_bytes or search.joint.budget_fraction")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            problems.append(f"search.joint.budget_bytes must be > 0, got {self.budget_bytes}")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            problems.append(f"search.joint.budget_fraction must be in (0, 1], got {self.budget_fraction}")
        if not self.dims or any(d <= 0 or d % 4 for d in self.dims):
            problems.append(f"search.joint.dims must be positive multiples of 4, got {list(self.dims)}")
        if not self.dtypes or any(q not in PRECISIONS for q in self.dtypes):
            problems.append(f"search.joint.dtypes must be some of {list(PRECISIONS)}, got {list(self.dtypes)}")
        if self.search_epochs < 1 or self.search_days < 1 or self.env_batches < 1 or self.finetune_epochs < 0:
            problems.append(
                "search.joint.search_epochs, search_days and env_batches must be >= 1 and finetune_epochs >= 0"
            )
        if problems:
            raise SearchConfigError("; ".join(problems))


@dataclass(frozen=True)
class Choice:
    """One feature's chosen size: dim, dtype, serving bytes and its measured loss change."""

    dim: int
    dtype: str
    bytes: int
    delta: float


def solve_knapsack(costs: Sequence[np.ndarray], values: Sequence[np.ndarray], budget: int) -> list[int]:
    """One option per group minimising the summed value with the summed cost at most `budget`.

    Exact for costs rounded up to `budget / RESOLUTION` units (so the result never exceeds `budget`; it may miss a
    plan that fits only within the rounding, at most one unit per group).

    Args:
        costs: per group, each option's cost (bytes).
        values: per group, each option's value to minimise (a loss change).
        budget: the most the chosen options may cost together.

    Returns:
        per group, the index of its chosen option.

    Raises:
        PlanError: not even the cheapest options fit.
    """
    unit = budget / RESOLUTION
    slots = RESOLUTION + 1
    best = np.zeros(slots)  # best[c]: the least value with cost <= c units, over the groups so far
    picks = []
    for cost, value in zip(costs, values, strict=True):
        units = np.ceil(np.asarray(cost, dtype=np.float64) / unit - 1e-9).astype(np.int64)
        new = np.full(slots, np.inf)
        pick = np.full(slots, -1, dtype=np.int32)
        for k, (u, v) in enumerate(zip(units, np.asarray(value, dtype=np.float64), strict=True)):
            if u >= slots:
                continue
            candidate = np.full(slots, np.inf)
            candidate[u:] = best[: slots - u] + v
            better = candidate < new
            new[better], pick[better] = candidate[better], k
        best = new
        picks.append(pick)
    if not np.isfinite(best[-1]):
        smallest = sum(int(np.min(c)) for c in costs)
        raise PlanError(
            f"no plan fits a budget of {budget:,} serving bytes: the smallest the candidates allow is {smallest:,} "
            "(every table at its smallest dim and dtype). Possible solutions: raise the budget, or add smaller dims or "
            "dtypes"
        )
    chosen = [0] * len(costs)
    c = RESOLUTION
    for g in range(len(costs) - 1, -1, -1):
        k = int(picks[g][c])
        chosen[g] = k
        c -= math.ceil(costs[g][k] / unit - 1e-9)
    return chosen


class JointSearcher(Searcher):
    """Dims × precision per table under a serving-byte budget (module docstring).

    Args:
        settings: `search.joint`.
        dim: `search.dim`: the dim trained before the search, the widest candidate and every feature's output width.
        static: a static protocol (search at the end of the search phase) or a stream (after `search_days`).
    """

    name = "joint"
    settings_class = JointSettings

    def __init__(self, settings: JointSettings, dim: int, static: bool, row_alignment: int = ROW_ALIGNMENT) -> None:
        self.settings, self.dim, self.static, self.alignment = settings, dim, static, row_alignment
        self.dims = sorted(d for d in set(settings.dims) if d <= dim)
        if not self.dims:
            raise SearchConfigError(f"search.joint.dims {list(settings.dims)} has no dim <= search.dim ({dim})")
        self.env_batches = settings.env_batches
        self.num_embeddings: dict[str, int] = {}
        self.budget: Budget | None = None
        self.choices: dict[str, Choice] | None = None
        self.proposal: DimensionPlan | None = None

    @classmethod
    def check(cls, context: SearchContext) -> None:
        if context.budget is not None:
            raise SearchConfigError(
                "search.method=joint takes its budget in serving bytes: set search.joint.budget_bytes or "
                "search.joint.budget_fraction, and leave search.budget (parameters) unset"
            )
        context.need_multiple_of_4()

    @classmethod
    def from_config(cls, settings: JointSettings, context: SearchContext) -> JointSearcher:
        return cls(settings, context.dim, context.static, context.row_alignment)

    def phases(self, epochs: int) -> list[Phase]:
        return [
            Phase("search", self.settings.search_epochs, search=True),
            Phase("train", self.settings.finetune_epochs),
        ]

    def initial_plan(self, features: list[str], num_embeddings: Mapping[str, int]) -> DimensionPlan:
        self.num_embeddings = {f: int(num_embeddings[f]) for f in features}
        full = sum(n * row_bytes(self.dim, "fp32", self.alignment) for n in self.num_embeddings.values())
        value = self.settings.budget_bytes or int(full * (self.settings.budget_fraction or 1.0))
        self.budget = Budget(value, "serving_bytes")
        smallest = sum(
            n * min(row_bytes(d, q, self.alignment) for d in self.dims for q in self.settings.dtypes)
            for n in self.num_embeddings.values()
        )
        if smallest > value:
            raise PlanError(
                f"search.joint: no plan fits a budget of {value:,} serving bytes ({value / full:.4f} of every table "
                f"at dim {self.dim} in fp32): the smallest the candidates allow is {smallest:,} "
                f"({smallest / full:.4f}; rows are padded to {self.alignment} bytes). Possible solutions: raise the "
                "budget, lower search.row_alignment, or add smaller dims or dtypes"
            )
        return uniform_plan(features, num_embeddings, self.dim, provenance={"method": self.name})

    # ---- the search ------------------------------------------------------------------------------------------
    def search(self, env: Any) -> DimensionPlan:
        """Measure every (feature, dim, dtype) on `env` and solve the knapsack (module docstring, 2–3)."""
        assert self.budget is not None, "initial_plan sets the budget"
        start = time.perf_counter()
        features = list(self.num_embeddings)
        reference = env.metrics({})["loss"]
        options = [(d, q) for d in self.dims for q in self.settings.dtypes]
        costs, deltas = [], []
        for f in features:
            n = self.num_embeddings[f]
            loss = []
            for d, q in options:
                if d == self.dim and q == "fp32":
                    loss.append(reference)
                    continue
                sizes = {f: np.full(n, d, dtype=np.int64)} if d < self.dim else {}  # full width: no cut
                loss.append(env.metrics(sizes, {f: q} if q != "fp32" else None)["loss"])
            costs.append(np.array([n * row_bytes(d, q, self.alignment) for d, q in options], dtype=np.int64))
            deltas.append(np.asarray(loss) - reference)
        picks = solve_knapsack(costs, self.values(deltas, costs, reference, options), self.budget.value)
        self.choices = {
            f: Choice(options[k][0], options[k][1], int(costs[i][k]), float(deltas[i][k]))
            for i, (f, k) in enumerate(zip(features, picks, strict=True))
        }
        seconds = time.perf_counter() - start
        plan = self._plan(reference, seconds, len(options) * len(features))
        plan.check_budget()
        logger.info(
            "joint search: %d candidates scored in %.1f s; %s serving bytes of a %s budget; chosen %s",
            len(options) * len(features),
            seconds,
            f"{plan.serving_bytes:,}",
            f"{self.budget.value:,}",
            {f: f"{c.dim}/{c.dtype}" for f, c in self.choices.items()},
        )
        return plan

    def values(
        self, deltas: list[np.ndarray], costs: list[np.ndarray], reference: float, options: list[tuple[int, str]]
    ) -> list[np.ndarray]:
        """What the knapsack minimises per feature and option: the measured loss change, with changes within
        `tolerance` of the reference loss — a cut measured as *better* than the model as trained among them — taken
        as none (on a model that trains on after the search such a gain is noise that training at full width
        overtakes), and ties broken toward the wider dim, then the fewer bytes: dims are what training can still
        use, precision only what serving stores."""
        assert self.budget is not None
        floor, budget = self.settings.tolerance * abs(reference), self.budget.value
        width = np.array([d for d, _ in options], dtype=np.float64) / self.dim
        out = []
        for delta, cost in zip(deltas, costs, strict=True):
            loss = np.where(delta <= floor, 0.0, delta)
            out.append(loss - 1e-9 * width + 1e-12 * cost / budget)
        return out

    def _plan(self, reference: float, seconds: float, candidates: int) -> DimensionPlan:
        assert self.choices is not None and self.budget is not None
        features = []
        for f, c in self.choices.items():
            n = self.num_embeddings[f]
            if c.dim == self.dim:
                features.append(FeaturePlan(f, n, self.dim, dim=self.dim, dtype=c.dtype, row_alignment=self.alignment))
            else:  # the first d columns, zero-padded: the dense model still sees search.dim
                row_dims = np.full(n, c.dim, dtype=np.int64)
                features.append(
                    FeaturePlan(
                        f, n, self.dim, row_dims=row_dims, projection="pad", dtype=c.dtype, row_alignment=self.alignment
                    )
                )
        provenance = {
            "method": self.name,
            "reference_loss": reference,
            "budget_bytes": self.budget.value,
            "search_seconds": seconds,
            "candidates": candidates,
            "choices": {f: c.__dict__ for f, c in self.choices.items()},
        }
        return DimensionPlan(tuple(features), self.budget, provenance=provenance)

    def end_phase(self, phase: Phase, hook: Any, info: Mapping[str, Any]) -> PhaseEnd | None:
        if phase.name != "search" or self.choices is not None:
            return None
        if info.get("env") is None:
            raise SearchConfigError("search.method=joint needs the job's environment at the end of its search phase")
        return PhaseEnd(self.search(info["env"]), from_scratch=self.settings.from_scratch)

    def observe(self, stats: DayStats) -> None:
        if self.static or self.choices is not None or stats.day_index + 1 < self.settings.search_days:
            return
        if stats.env is None:
            raise SearchConfigError("search.method=joint needs the job's environment (held-out batches) on a stream")
        self.proposal = self.search(stats.env)

    def propose(self) -> DimensionPlan | None:
        proposal, self.proposal = self.proposal, None
        return proposal

    def state_dict(self) -> dict[str, Any]:
        return {"choices": None if self.choices is None else {f: c.__dict__ for f, c in self.choices.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        choices = state.get("choices")
        self.choices = None if choices is None else {f: Choice(**c) for f, c in choices.items()}
