"""MD: mixed-dimension embeddings, row-level, under an exact parameter budget, re-sized every day of the stream.

Ginart, Naumov, Mudigere, Yang, Zou. "Mixed Dimension Embeddings with Application to Memory-Efficient Recommendation
Systems" (ISIT 2021, arXiv 1909.11810). Reference code: facebookresearch/dlrm `tricks/md_embedding_bag.py`
(`md_solver`, `alpha_power_rule`, `PrEmbeddingBag`) behind `dlrm_s_pytorch.py --md-flag`; summarised in
`../shared/reference/methods.md` §7.4.

**The rule** (the paper's alpha power rule). Rows are partitioned into blocks; block i has `n_i` rows and mean
access probability `p_i`; it gets `d_i = λ · p_i^α`, α ∈ [0, 1] the temperature (α = 0: uniform). Popular blocks
get *more* dimensions: DLRM's `md_solver(n, alpha, d0=...)` sorts the tables by row count ascending, takes
`p_i ∝ k_i / n_i` (`k` the lookups per example, 1 by default), and `alpha_power_rule` sets `d = λ · (n/k)^(−α)` with
`λ = d0 · n_0^α`, so the smallest table (whose rows are hit most often) gets the base dim `d0`, larger ones less.
Every block is stored as `E_i ∈ R^{n_i × d_i}` and mapped to the common width by a learned `P_i ∈ R^{d_i × d̄}`
(`PrEmbeddingBag`); here each distinct dim of a feature is one bucket table `t_<feature>__d<dim>` of a row-level
`FeaturePlan` with `projection="linear"` and `output_dim = search.dim`, whose `nn.Linear(d, d̄, bias=False)`
`PlannedEmbedding` builds and whose `d · d̄` parameters the plan counts in the budget. (DLRM uses `nn.Identity` for
a block already at `d̄`; this project's plan gives every bucket a projection, so the `d_max` bucket costs `d̄²`.)

**Blocks: equal lookup mass** (the decision). Per entity (the user and the item feature), rows are sorted by
their cumulative frequency, descending, ties by row id (the earlier arrival first), and cut into `blocks` blocks of
equal mass: the row at sorted position j, with `m_j` lookups before it, goes to block `⌊blocks · m_j / M⌋` (M the
feature's total, clipped to the last block), so each block holds about `M / blocks` lookups, and rows never looked
up (m_j = M) fall in the last block. Why equal mass rather than geometric row counts: DLRM's blocks are the tables,
and each table receives the same number of lookups per example (k_i = 1), so `p_i ∝ 1 / n_i` — equal-mass blocks
are exactly that situation inside one table, and the power rule then reads `d_i ∝ n_i^(−α)` as in `md_solver`.
Geometric boundaries (block sizes growing by a constant ratio) fix the row counts regardless of the traffic, so on
a flat distribution they split rows of equal popularity into different dims and on a very skewed one they can put
the whole head in one block; equal mass adapts to the skew of the day's counts with no extra parameter. A row
holding more than `1 / blocks` of the mass leaves blocks empty; they are dropped (fewer blocks). The popularity
used is `p_i = mass_i / n_i` (the mean count of a block's rows: DLRM's `k / n` with `k` the lookups), one λ for the
blocks of both features, so a feature looked up more often gets more dims, as DLRM's `k` does. Before the first day
there are no counts: the initial plan is one block per feature at α = 0, i.e. the largest uniform multiple-of-4 dim
that fits (a feature whose rows were never looked up is likewise one block, of p = 0).

**The budget, exactly.** `T` = `search.budget` − the other features' parameters (field-level at `other_dim`). The
plan's stored parameters are `Σ_i n_i d_i + d̄ · Σ_(feature, distinct d) d`. Dims are multiples of 4 in [4, d_max]:

1. *Scale.* The real dims `r_i = clip(λ p_i^α, 4, d_max)` with λ found by bisection so that the relaxed cost
   `Σ_i (n_i + d̄) r_i` (one projection per block) equals T (or every block at d_max when that is below T).
2. *Round down.* `d_i = 4 ⌊r_i / 4⌋` (at least 4). The real plan costs no more than the relaxed one (blocks that
   share a dim share a projection), so it fits.
3. *Largest remainders, in units of 4.* While some raise fits: raise by 4 the blocks of the largest remainder
   `r_i − d_i` (ties: the more popular first), a block always together with every block of the same `p^α` (so
   α = 0 stays one dim), and with the more popular blocks of its feature it would pass (dims stay non-increasing
   in popularity, at most d_max); the first such raise (in that order) whose exact cost fits is taken. When no
   raise by 4 fits, a group may instead jump to the next wider dim of its feature: that shares the wider block's
   table and projection and frees its own, so it can fit where a step of 4 (a new projection) does not (a small
   block may then end well above its real dim: the projections make narrow small blocks expensive).
4. *Move boundaries.* What is left is spent on single rows: at a boundary between blocks i and i + 1 of a feature
   with `d_i > d_(i+1)`, the most popular rows of block i + 1 move up to `d_i`, each costing `s = d_i − d_(i+1)`
   (no new table, no new projection; block i + 1 keeps at least one row); boundaries with the smallest step first.

So `plan.parameters ≤ budget` always, and the leftover `budget − plan.parameters` is below the smallest step `s` of
a boundary with rows left to move (at most `d_max − 4`); where no feature has two dims (α = 0, a flat distribution,
the initial plan) it is below the cost of raising a feature's dim by 4 (`4 n_f + 4 d̄` for each feature raised; at
α = 0 both are raised together). A budget above every row at d_max leaves the excess unspent. Below every row at 4
(`4 n_f + 4 d̄` per feature, plus the other features) no plan fits: `PlanError` names that smallest budget. Dims never
decrease with popularity (a row with more lookups has a dim at least as large); rows of equal count on either side
of a boundary may differ.

**Streaming.** `observe` keeps the vocabularies' cumulative `row_counts` of the user and item features (padded to
the table capacity); `propose` re-sizes from them. Everything is vectorised numpy (a stable argsort per feature;
about 3 s for 10M user and item rows on a 2-core machine, half of it the plan's own bucket remap); the loops run
over blocks. State: the last counts, so a resumed searcher proposes
the same plan; the plan is a pure function of the counts, identical on every rank.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from search.base import DayStats, SearchConfigError, SearchContext, Searcher
from search.rowlevel import row_budget, table_rows
from sharding.plan import Budget, DimensionPlan, FeaturePlan, PlanError, physical_dim

logger = logging.getLogger(__name__)

MIN_DIM = 4  # the smallest stored width (FBGEMM needs multiples of 4; DESIGN.md decision 5)
MAX_BLOCKS = 64  # each block is a bucket table with its own projection; more than d_max/4 of them merge anyway


@dataclass(frozen=True)
class MdSettings:
    """MD's section of a job config (`search.md`).

    Args:
        alpha: the temperature α of the power rule `d ∝ p^α`, in [0, 1] (0: every row the same dim; the paper's
            best values are about 0.2–0.4).
        blocks: equal-lookup-mass blocks each of the user and item features is cut into (1..64).
    """

    alpha: float = 0.3
    blocks: int = 4

    def __post_init__(self) -> None:
        errors = []
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0.0 <= self.alpha <= 1.0:
            errors.append(f"search.md.alpha is {self.alpha!r}; expected a number in [0, 1] (0: uniform, e.g. 0.3)")
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or not 1 <= self.blocks <= MAX_BLOCKS:
            errors.append(
                f"search.md.blocks is {self.blocks!r}; expected an integer in [1, {MAX_BLOCKS}] (e.g. 4): each block "
                "is a table with its own learned projection"
            )
        if errors:
            raise ValueError("; ".join(errors))


# ---- blocks -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocks:
    """A feature's rows cut into blocks of equal lookup mass.

    Args:
        order: row ids from the most to the least frequent (ties: the smaller row id first).
        block: each sorted position's block, non-decreasing from 0 (the most popular) to `len(rows) − 1`.
        rows: rows per block (all ≥ 1).
        mass: lookups per block.
    """

    order: np.ndarray
    block: np.ndarray
    rows: np.ndarray
    mass: np.ndarray

    @property
    def starts(self) -> np.ndarray:
        """The first sorted position of each block."""
        return np.concatenate([[0], np.cumsum(self.rows)[:-1]]).astype(np.int64)


def md_blocks(counts: np.ndarray, blocks: int) -> Blocks:
    """Sort rows by `counts` (descending, ties by row id) and cut them into at most `blocks` equal-mass blocks.

    The row at sorted position j goes to block `min(blocks − 1, ⌊blocks · m_j / M⌋)`, `m_j` the lookups of the rows
    before it and `M` the total (all rows in one block when M = 0); empty blocks are dropped.

    Raises:
        PlanError: negative counts, no rows, or `blocks` < 1.
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    if c.size == 0:
        raise PlanError("md_blocks needs at least one row")
    if blocks < 1:
        raise PlanError(f"md_blocks needs blocks >= 1, got {blocks}")
    if (c < 0).any():
        raise PlanError(f"row counts must be >= 0; row {int(np.argmin(c))} has {int(c.min())}")
    if int(c.max()) >= np.iinfo(np.int64).max // (c.size * blocks):  # the running sums below must not overflow
        raise PlanError(f"row counts up to {int(c.max()):,} over {c.size:,} rows are too large to sum in int64")
    order = np.argsort(-c, kind="stable")  # stable: equal counts keep row order, the earlier row first
    sorted_counts = c[order]
    total = int(sorted_counts.sum())
    if total == 0:
        raw = np.zeros(c.size, dtype=np.int64)
    else:
        before = np.cumsum(sorted_counts) - sorted_counts  # lookups of the rows ranked before each row
        raw = np.minimum(before * blocks // total, blocks - 1)
    change = np.flatnonzero(np.diff(raw)) + 1  # raw is non-decreasing: renumber its runs 0, 1, ... (drops empties)
    starts = np.concatenate([[0], change]).astype(np.int64)
    block = np.zeros(c.size, dtype=np.int64)
    block[change] = 1
    block = np.cumsum(block)
    rows = np.diff(np.concatenate([starts, [c.size]])).astype(np.int64)
    mass = np.add.reduceat(sorted_counts, starts).astype(np.int64)
    return Blocks(order, block, rows, mass)


# ---- dims under the budget ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """Block dims of every row-level feature, under the budget.

    Args:
        dims: per feature, each block's dim (multiples of 4, non-increasing).
        promoted: per feature, how many of each block's most popular rows moved up to the previous block's dim.
        real: per feature, each block's real dim `clip(λ p^α, 4, d_max)` before rounding.
        scale: λ.
        parameters: the row-level features' stored parameters (projections included).
    """

    dims: list[np.ndarray]
    promoted: list[np.ndarray]
    real: list[np.ndarray]
    scale: float
    parameters: int


def min_budget(rows: Sequence[int], output_dim: int) -> int:
    """The smallest row budget: every row of every feature at 4, one projection of `4 × output_dim` per feature."""
    return sum(MIN_DIM * int(n) + MIN_DIM * output_dim for n in rows)


def _cost(rows: Sequence[np.ndarray], dims: Sequence[np.ndarray], output_dim: int) -> int:
    """Stored parameters of blocks at `dims`: rows plus one projection per distinct dim of each feature."""
    return sum(int((n * d).sum()) + output_dim * int(np.unique(d).sum()) for n, d in zip(rows, dims, strict=True))


def allocate_md(
    rows: Sequence[np.ndarray],
    popularity: Sequence[np.ndarray],
    alpha: float,
    budget: int,
    d_max: int,
    output_dim: int,
) -> Allocation:
    """Multiple-of-4 dims `∝ p^α` for the blocks of every feature, spending at most `budget` stored parameters and as
    much of it as the rule of the module docstring (steps 1–4) allows.

    Args:
        rows: per feature, rows per block, the most popular block first.
        popularity: per feature, each block's popularity p (mean lookups per row; non-increasing).
        alpha: the temperature α in [0, 1].
        budget: stored parameters for these features (rows and learned projections).
        d_max: the largest dim (a multiple of 4).
        output_dim: the width every block is projected to.

    Raises:
        PlanError: `budget` is below every row at 4 (the message names the smallest budget), or bad inputs.
    """
    if d_max < MIN_DIM or d_max % MIN_DIM:
        raise PlanError(f"d_max must be a multiple of {MIN_DIM} and >= {MIN_DIM}, got {d_max}")
    n_list = [np.asarray(n, dtype=np.int64) for n in rows]
    if not n_list or any(n.size == 0 or (n < 1).any() for n in n_list):
        raise PlanError("every feature needs at least one block, and every block at least one row")
    need = min_budget([int(n.sum()) for n in n_list], output_dim)
    if budget < need:
        raise PlanError(
            f"the budget leaves {budget:,} parameters for {sum(int(n.sum()) for n in n_list):,} user and item rows, "
            f"below every row at dim {MIN_DIM} with its {MIN_DIM}x{output_dim} projection per feature. Raise "
            f"search.budget by at least {need - budget:,} (to {need:,} for these rows), or lower search.other_dim"
        )
    sizes = np.array([n.size for n in n_list])
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    n_all = np.concatenate(n_list)
    p_all = np.concatenate([np.asarray(p, dtype=np.float64) for p in popularity])
    if p_all.shape != n_all.shape or not np.isfinite(p_all).all() or (p_all < 0).any():
        raise PlanError("popularity must be finite, >= 0 and one per block")
    w = np.power(p_all, alpha)  # 0^0 = 1: at α = 0 never-seen blocks are as wide as the rest
    if not (w > 0).any():
        w = np.ones_like(w)  # no lookups anywhere: uniform

    def split(x: np.ndarray) -> list[np.ndarray]:
        return [x[bounds[i] : bounds[i + 1]] for i in range(len(n_list))]

    # 1. the real scale: Σ (n_i + d̄) clip(λ w_i) = budget, one projection per block (an upper bound on the cost)
    def relaxed(scale: float) -> float:
        return float(((n_all + output_dim) * np.clip(scale * w, MIN_DIM, d_max)).sum())

    lo, hi = 0.0, d_max / float(w[w > 0].min())
    if relaxed(hi) <= budget:
        lo = hi
    else:
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if relaxed(mid) <= budget else (lo, mid)
    real = np.clip(lo * w, MIN_DIM, d_max)
    # 2. round down to multiples of 4 (relaxed(lo) <= budget unless even all-4 is over it relaxed: then all at 4)
    dims = np.clip(MIN_DIM * np.floor(real / MIN_DIM), MIN_DIM, d_max).astype(np.int64)

    def lift(d: np.ndarray) -> np.ndarray:
        """Raise every block to the widest less popular block of its feature (dims non-increasing again)."""
        for i in range(len(n_list)):
            part = d[bounds[i] : bounds[i + 1]]
            part[:] = np.maximum.accumulate(part[::-1])[::-1]
        return d

    def cost(d: np.ndarray) -> int:
        return _cost(split(n_all), split(d), output_dim)

    # 3. largest remainders in units of 4, a tie group (equal w) at a time; then merges into a wider block's dim
    _, group = np.unique(w, return_inverse=True)
    group = group.reshape(-1)
    feature = np.repeat(np.arange(len(n_list)), sizes)

    def step_up(members: np.ndarray) -> np.ndarray | None:
        if (dims[members] + MIN_DIM > d_max).any():
            return None
        trial = dims.copy()
        trial[members] += MIN_DIM
        return lift(trial)

    def merge_up(members: np.ndarray) -> np.ndarray | None:
        """Each member to the next wider dim of a more popular block of its feature (no new projection)."""
        trial = dims.copy()
        for j in np.flatnonzero(members):
            above = dims[bounds[feature[j]] : j]
            wider = above[above > dims[j]]
            if wider.size == 0:
                return None
            trial[j] = wider.min()
        return lift(trial)

    spent = cost(dims)
    while True:
        remainder = real - dims
        first = np.unique(group, return_index=True)[1]  # one representative per group: its remainder and weight
        candidates = first[np.lexsort((first, -w[first], -remainder[first]))]
        for move in (step_up, merge_up):
            for c in candidates:
                trial = move(group == group[c])
                if trial is not None and (trial_cost := cost(trial)) <= budget:
                    dims, spent = trial, trial_cost
                    break
            else:
                continue
            break
        else:
            break
    # 4. spend the rest on single rows: move boundaries down, the smallest step first
    left = budget - spent
    promoted = np.zeros_like(n_all)
    moves = [
        (int(dims[j - 1] - dims[j]), -float(w[j]), j)
        for i in range(len(n_list))
        for j in range(int(bounds[i]) + 1, int(bounds[i + 1]))
        if dims[j - 1] > dims[j]
    ]
    for step, _, j in sorted(moves):
        take = min(int(n_all[j]) - 1, left // step)
        promoted[j] = take
        left -= take * step
    parameters = budget - left
    return Allocation(split(dims), split(promoted), split(real), float(lo), int(parameters))


def row_dims(blocks: Blocks, dims: np.ndarray, promoted: np.ndarray) -> np.ndarray:
    """Each row's dim: its block's, or the previous block's for the `promoted` most popular rows of a block."""
    by_position = np.asarray(dims, dtype=np.int64)[blocks.block]
    for b, (start, up) in enumerate(zip(blocks.starts, promoted, strict=True)):
        if up:
            by_position[start : start + up] = dims[b - 1]
    out = np.empty_like(by_position)
    out[blocks.order] = by_position
    return out


# ---- the searcher -------------------------------------------------------------------------------------------------


class MdSearcher(Searcher):
    """Mixed-dimension embeddings in the job's day loop: after each day, the user and item rows are re-cut into
    equal-mass blocks by their cumulative counts and sized by the alpha power rule under the exact budget.

    Args:
        budget: `search.budget`: stored embedding parameters of the whole plan, learned projections included.
        d_max: the largest dim, also the output width every block is projected to (`search.dim`, a multiple of 4).
        user_feature: the feature whose rows are users.
        item_feature: the feature whose rows are items.
        alpha: the temperature α in [0, 1].
        blocks: equal-mass blocks per feature.
        other_dim: the field-level dim of every other feature (default `d_max`); its parameters come off first.
    """

    name = "md"
    settings_class = MdSettings

    @classmethod
    def check(cls, context: SearchContext) -> None:
        context.need_protocol(streaming=True)
        context.need_budget()
        context.need_multiple_of_4()
        context.need_entities()

    @classmethod
    def from_config(cls, settings: MdSettings, context: SearchContext) -> MdSearcher:
        if not isinstance(settings, MdSettings):
            raise SearchConfigError(f"search.method=md needs MdSettings, got {type(settings).__name__}")
        users, items = context.need_entities()
        return cls(
            context.need_budget(),
            context.dim,
            users,
            items,
            alpha=settings.alpha,
            blocks=settings.blocks,
            other_dim=context.other_dim,
        )

    def __init__(
        self,
        budget: int,
        d_max: int,
        user_feature: str = "user",
        item_feature: str = "item",
        alpha: float = 0.3,
        blocks: int = 4,
        other_dim: int | None = None,
    ) -> None:
        settings = MdSettings(alpha, blocks)  # the same checks as the config's
        if budget <= 0:
            raise ValueError(f"budget must be > 0, got {budget}")
        if d_max < MIN_DIM or d_max % MIN_DIM:
            raise ValueError(f"d_max must be a positive multiple of {MIN_DIM}, got {d_max}")
        if user_feature == item_feature:
            raise ValueError(f"user_feature and item_feature must differ, both are '{user_feature}'")
        self.budget, self.d_max = int(budget), int(d_max)
        self.alpha, self.blocks = float(settings.alpha), int(settings.blocks)
        self.user_feature, self.item_feature = user_feature, item_feature
        self.other_dim = self.d_max if other_dim is None else int(other_dim)
        if self.other_dim < 1:
            raise ValueError(f"other_dim must be >= 1, got {self.other_dim}")
        self.features: list[str] = []
        self.num_embeddings: dict[str, int] = {}
        self.counts: dict[str, np.ndarray] = {}  # cumulative counts after the last observed day, padded
        self.day_index: int | None = None
        self.pending = False

    @property
    def entities(self) -> tuple[str, str]:
        return self.user_feature, self.item_feature

    # -- the interface --

    def initial_plan(self, features: list[str], num_embeddings: Mapping[str, int]) -> DimensionPlan:
        """Every user and item row at the largest uniform multiple of 4 that fits (one block per feature, α = 0)."""
        missing = [f for f in self.entities if f not in features]
        if missing:
            raise PlanError(f"MD sizes the features {missing}, which are not among the job's features {features}")
        self.features = list(features)
        self.num_embeddings = {f: int(num_embeddings[f]) for f in features}
        zeros = {f: np.zeros(self.num_embeddings[f], dtype=np.int64) for f in self.entities}
        return self._plan(zeros, alpha=0.0, blocks=1, provenance={"method": self.name, "day_index": None})

    def observe(self, stats: DayStats) -> None:
        if not self.features:
            raise PlanError("MdSearcher.observe before initial_plan: the searcher does not know the tables yet")
        counts = {}
        for f in self.entities:
            if f not in stats.row_counts:
                raise PlanError(f"the day's statistics have no row_counts for feature '{f}'")
            padded = table_rows(stats.row_counts[f], self.num_embeddings[f], f, "row_counts", 0, np.int64)
            if (padded < 0).any():
                raise PlanError(f"feature '{f}': row {int(np.argmin(padded))} has a negative count")
            counts[f] = padded
        self.counts = counts
        self.day_index = stats.day_index
        self.pending = True

    def propose(self) -> DimensionPlan | None:
        if not self.pending:
            return None
        self.pending = False
        provenance = {"method": self.name, "day_index": self.day_index, "alpha": self.alpha}
        return self._plan(self.counts, self.alpha, self.blocks, provenance)

    def state_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "num_embeddings": dict(self.num_embeddings),
            "counts": {f: c.copy() for f, c in self.counts.items()},
            "day_index": self.day_index,
            "pending": self.pending,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from `state_dict()` (counts as numpy arrays, or lists after a JSON round trip)."""
        self.features = list(state.get("features", []))
        self.num_embeddings = {f: int(n) for f, n in state.get("num_embeddings", {}).items()}
        self.counts = {f: np.asarray(c, dtype=np.int64).copy() for f, c in state.get("counts", {}).items()}
        self.day_index = state.get("day_index")
        self.pending = bool(state.get("pending", False))

    # -- helpers --

    def _others(self) -> list[str]:
        return [f for f in self.features if f not in self.entities]

    def _row_budget(self) -> int:
        """The budget left for the user and item rows once the other features have their field-level dims."""
        need = min_budget([self.num_embeddings[f] for f in self.entities], self.d_max)
        smallest = f"the smallest MD plan (every row at dim {MIN_DIM}, with a {MIN_DIM}x{self.d_max} projection each)"
        return row_budget(self.budget, self.num_embeddings, self.entities, physical_dim(self.other_dim), need, smallest)

    def _plan(
        self, counts: Mapping[str, np.ndarray], alpha: float, blocks: int, provenance: dict[str, Any]
    ) -> DimensionPlan:
        cut = {f: md_blocks(counts[f], blocks) for f in self.entities}
        popularity = [cut[f].mass / cut[f].rows for f in self.entities]
        alloc = allocate_md(
            [cut[f].rows for f in self.entities], popularity, alpha, self._row_budget(), self.d_max, self.d_max
        )
        dims = {f: row_dims(cut[f], d, up) for f, d, up in zip(self.entities, alloc.dims, alloc.promoted, strict=True)}
        provenance["blocks"] = {
            f: {"rows": cut[f].rows.tolist(), "dims": d.tolist(), "promoted": up.tolist()}
            for f, d, up in zip(self.entities, alloc.dims, alloc.promoted, strict=True)
        }
        provenance["scale"] = alloc.scale
        plans = [
            FeaturePlan(f, self.num_embeddings[f], self.d_max, row_dims=dims[f], projection="linear")
            if f in dims
            else FeaturePlan(f, self.num_embeddings[f], self.other_dim, dim=self.other_dim)
            for f in self.features
        ]
        plan = DimensionPlan(tuple(plans), Budget(self.budget, "parameters"), provenance=provenance)
        plan.check_budget()
        row_parameters = sum(plan[f].parameters for f in self.entities)
        if row_parameters != alloc.parameters:  # the allocation's accounting must be the plan's (a bug, not bad input)
            raise PlanError(f"MD counted {alloc.parameters:,} row parameters but the plan has {row_parameters:,}")
        return plan
