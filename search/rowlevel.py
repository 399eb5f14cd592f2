"""What every row-level search shares: budgets, the ES and MR baselines, exact-budget allocation, masked and
bucketed embeddings of the same sizes, and the evaluation environment the RL searches step in.

**Budget.** The row-level papers count "kept parameters" `Σ_n d_n` against `(1 − c)·d_max·(|U| + |V|)` for a
target sparsity `c` (methods.md §1, §5.4). The plans these searches produce carry `Budget(unit="logical")` with
exactly that number; the plan still reports its physical parameters (every bucket stored in `ceil4(d)` columns,
DESIGN.md decision 5) and the benchmark prints both.

**Baselines** (methods.md §7.3), both exact to the budget:
- ES: every row the largest equal dim `⌊B / n⌋` (capped at `d_max`).
- MR: dims drawn uniformly from `[1, 2·B/n − 1]`, then moved by ±1 on random rows until `Σ d = B` exactly.

**Exact allocation** (`allocate`): sizes proportional to non-negative weights, clipped to `[d_min, d_max]`, with the
scale found by bisection so the clipped sum meets the budget, then rounded by largest remainders so the integer sum
is exactly the budget (or `n·d_max` if that is smaller). SCALL's sampler and CIESS's projection of a plan onto a
smaller budget use it; the papers' loop ("clip, renormalise, repeat until in range or one second passes") only
approximates this.

**Masked vs bucketed** (DESIGN.md decision 6): a search runs on one `d_max` table per entity type with a per-row
prefix mask (`MaskedTable`); the chosen plan is materialised as bucket tables with zero-padding projections
(`BucketedTables`, a TorchRec `EmbeddingBagCollection` through `PlannedEmbedding`), and both give the same
embeddings for the same weights.

**Environment** (`SupernetEnv`): CIESS trains a fresh LightGCN for 2,000 batches per RL iteration (300 iterations:
days on this machine); SCALL trains one for 200 batches per step. Here one `d_max` supernet is trained once with
every row's size redrawn uniformly from `[1, d_max]` at every batch (so every prefix of every row is a trained
embedding, as in slimmable networks and OptEmbed's dimension masks), and evaluating a plan is: mask the supernet,
optionally fine-tune a few batches from it (warm start), rank on the held-out split. The RL methods are unchanged;
their environment step costs a second instead of ten minutes. The chosen plans are then retrained from scratch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor

from models.lightgcn import BPRRecipe, GraphTask, train_bpr
from sharding.embedding import PlannedEmbedding
from sharding.plan import Budget, DimensionPlan, FeaturePlan, PlanError

ENTITIES = ("user", "item")
QUALITY_KS = (5, 10, 20)


def kept_budget(sparsity: float, num_rows: int, d_max: int) -> int:
    """The parameters a sparsity `c` keeps: `⌊(1 − c)·d_max·num_rows⌋`."""
    if not 0.0 <= sparsity < 1.0:
        raise PlanError(f"sparsity is {sparsity}; it must be in [0, 1) (0.8 keeps 20% of the parameters)")
    return math.floor((1.0 - sparsity) * d_max * num_rows + 1e-9)


def check_row_budget(budget: int, num_rows: int, d_max: int) -> None:
    """A row-level budget must give every row at least one dim."""
    if budget < num_rows:
        raise PlanError(
            f"the budget of {budget:,} parameters is below one dim per row ({num_rows:,} rows). Raise the budget to "
            f"at least {num_rows:,} (sparsity ≤ {1 - num_rows / (num_rows * d_max):.4f} at d_max {d_max})"
        )


def row_budget(
    budget: int,
    num_embeddings: Mapping[str, int],
    entities: Sequence[str],
    other_dim: int,
    need: int,
    smallest: str,
) -> int:
    """What a job's budget leaves for the row-level features' rows once every other feature has `other_dim`
    parameters per row (the row-level searchers' shared accounting).

    Args:
        budget: the whole plan's parameter budget.
        num_embeddings: rows per feature.
        entities: the row-level features (users and items).
        other_dim: the parameters per row of every other feature (its stored width).
        need: the least the rows must get (the method's smallest plan).
        smallest: what that smallest plan is, for the error.

    Raises:
        PlanError: less than `need` is left, with the budget that would do.
    """
    others = sum(n * other_dim for f, n in num_embeddings.items() if f not in entities)
    rows = budget - others
    if rows < need:
        raise PlanError(
            f"search.budget={budget:,} leaves {rows:,} parameters for the {' and '.join(entities)} rows after the "
            f"other features' {others:,} (at dim {other_dim}), below the {need:,} of {smallest}. Raise search.budget "
            f"to at least {others + need:,} or lower search.other_dim"
        )
    return rows


def uniform_sizes(num_rows: int, budget: int, d_max: int) -> np.ndarray:
    """ES: every row the largest equal dim within the budget."""
    check_row_budget(budget, num_rows, d_max)
    return np.full(num_rows, min(d_max, budget // num_rows), dtype=np.int64)


def random_sizes(num_rows: int, budget: int, d_max: int, generator: np.random.Generator) -> np.ndarray:
    """MR: dims uniform in `[1, 2·mean − 1]` (the NGCF release's recipe), adjusted on random rows to `Σ = budget`."""
    check_row_budget(budget, num_rows, d_max)
    target = min(budget, num_rows * d_max)
    high = max(1, min(d_max, round(2 * target / num_rows) - 1))
    sizes = generator.integers(1, high + 1, num_rows)
    return _settle(sizes, target, 1, d_max, generator)


def _settle(sizes: np.ndarray, target: int, d_min: int, d_max: int, generator: np.random.Generator) -> np.ndarray:
    """Move sizes by ±1 on random rows (within bounds) until they sum to `target`."""
    sizes = sizes.astype(np.int64).copy()
    while (gap := int(target - sizes.sum())) != 0:
        movable = np.flatnonzero(sizes < d_max) if gap > 0 else np.flatnonzero(sizes > d_min)
        pick = generator.choice(movable, size=min(abs(gap), movable.size), replace=False)
        sizes[pick] += 1 if gap > 0 else -1
    return sizes


def allocate(weights: np.ndarray, budget: int, d_min: int = 1, d_max: int = 128) -> np.ndarray:
    """Integer sizes ∝ `weights`, each in `[d_min, d_max]`, summing to exactly `min(budget, n·d_max)`.

    The real scale `s` with `Σ clip(s·w, d_min, d_max) = budget` is found by bisection (the clipped sum is monotone
    in `s`); the sizes are then floored and the remaining units go to the rows with the largest remainders that are
    below `d_max` (ties by row order). Deterministic.
    """
    w = np.asarray(weights, dtype=np.float64)
    n = w.size
    if n == 0:
        raise PlanError("allocate needs at least one row")
    if not np.isfinite(w).all() or (w < 0).any():
        raise PlanError("allocation weights must be finite and non-negative")
    if d_min < 1 or d_max < d_min:
        raise PlanError(f"size bounds must satisfy 1 <= d_min <= d_max, got [{d_min}, {d_max}]")
    if budget < n * d_min:
        raise PlanError(
            f"the budget of {budget:,} parameters is below {d_min} dim(s) per row for {n:,} rows. Raise it to at "
            f"least {n * d_min:,}"
        )
    target = min(budget, n * d_max)
    # Rows of weight 0 get more than d_min only once every other row is at d_max.
    w = w + (w.max() * 1e-9 if w.max() > 0 else 1.0)
    lo, hi = 0.0, d_max / w.min()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.clip(mid * w, d_min, d_max).sum() < target:
            lo = mid
        else:
            hi = mid
    real = np.clip(hi * w, d_min, d_max)
    sizes = np.floor(real).astype(np.int64)
    short = int(target - sizes.sum())
    if short > 0:
        remainder = np.where(sizes < d_max, real - sizes, -1.0)
        order = np.lexsort((np.arange(n), -remainder))
        sizes[order[:short]] += 1
    elif short < 0:  # floating error at the clip bounds: take units back from the largest rows above d_min
        order = np.lexsort((np.arange(n), -(sizes - d_min)))
        sizes[order[:-short]] -= 1
    return sizes


def row_plan(
    sizes: Mapping[str, np.ndarray],
    d_max: int,
    budget: int | None,
    provenance: Mapping[str, Any] | None = None,
) -> DimensionPlan:
    """A row-level `DimensionPlan` (zero-padding projections to `d_max`) with a logical-parameter budget."""
    features = tuple(
        FeaturePlan(name, int(np.asarray(s).size), d_max, row_dims=np.asarray(s, dtype=np.int64), projection="pad")
        for name, s in sizes.items()
    )
    plan = DimensionPlan(
        features, Budget(budget, "logical") if budget is not None else None, provenance=provenance or {}
    )
    plan.check_budget()
    return plan


def job_plan(
    features: list[str],
    num_embeddings: Mapping[str, int],
    rows: Mapping[str, np.ndarray],
    d_max: int,
    other_dim: int,
    budget: Budget | None,
    provenance: Mapping[str, Any],
    check: bool = True,
) -> DimensionPlan:
    """A training job's plan: the features in `rows` row-level at those sizes (zero-padded to `d_max`), every other
    feature field-level at `other_dim`; checked against `budget` unless `check` is false."""
    plans = [
        FeaturePlan(f, rows[f].size, d_max, row_dims=rows[f].astype(np.int64), projection="pad")
        if f in rows
        else FeaturePlan(f, num_embeddings[f], other_dim, dim=other_dim)
        for f in features
    ]
    plan = DimensionPlan(tuple(plans), budget, provenance=dict(provenance))
    if check:
        plan.check_budget()
    return plan


def table_rows(values: Any, num_rows: int, feature: str, what: str, fill: float, dtype: Any) -> np.ndarray:
    """A per-row statistic of a day (`DayStats`) padded with `fill` to the feature's table of `num_rows` rows.

    Raises:
        PlanError: more rows than the table has.
    """
    flat = np.asarray(values, dtype=dtype).reshape(-1)
    if flat.size > num_rows:
        raise PlanError(
            f"feature '{feature}' has {flat.size:,} rows of {what} but its table has {num_rows:,}; raise the table "
            "capacity"
        )
    out = np.full(num_rows, fill, dtype=dtype)
    out[: flat.size] = flat
    return out


def prefix_mask(sizes: torch.Tensor, d_max: int) -> torch.Tensor:
    """`[n, d_max]` float mask with the first `sizes[i]` columns of row i set (methods.md §1)."""
    return (torch.arange(d_max) < sizes[:, None]).to(torch.float32)


class MaskedTable(nn.Module):
    """One `d_max` table for users then items, each row masked to its size: what the searches train and step on.

    Args:
        num_users: U.
        num_items: I.
        d_max: the largest size.
        generator: seeds the N(0, 0.1) init (LightGCN's reference init).
    """

    sizes: torch.Tensor

    def __init__(self, num_users: int, num_items: int, d_max: int, generator: torch.Generator) -> None:
        super().__init__()
        self.num_users, self.num_items, self.d_max = num_users, num_items, d_max
        self.weight = nn.Parameter(torch.randn(num_users + num_items, d_max, generator=generator) * 0.1)
        self.register_buffer("sizes", torch.full((num_users + num_items,), d_max, dtype=torch.int64))

    def set_sizes(self, users: np.ndarray | torch.Tensor, items: np.ndarray | torch.Tensor) -> None:
        sizes = torch.cat([torch.as_tensor(users), torch.as_tensor(items)]).to(torch.int64)
        if sizes.shape != self.sizes.shape or int(sizes.min()) < 1 or int(sizes.max()) > self.d_max:
            raise PlanError(
                f"sizes must be one per user ({self.num_users}) and item ({self.num_items}) in [1, {self.d_max}]"
            )
        self.sizes.copy_(sizes)

    @property
    def width(self) -> int:
        """Columns any row uses (propagation can stop there)."""
        return int(self.sizes.max())

    def forward(self) -> torch.Tensor:
        return self.weight * prefix_mask(self.sizes, self.d_max)


class BucketedTables(nn.Module):
    """The ego embeddings of a row-level plan over `user` and `item` from its bucket tables (a TorchRec EBC via
    `PlannedEmbedding`): what a graph model trains on after the search.

    Every row is looked up as a single-id bag of its bucket's key (bag i of key `f__d<dim>` = local row i; the KJT's
    stride is the largest bucket, so a key's pooled output is no taller than that), then projected to the
    feature's output width as the plan says (zero padding or its learned linear map) and put back in row order.
    Looking every row up through the feature keys instead would pool `[U + I, d]` per bucket — with a hundred buckets
    most of a training step.

    Args:
        plan: a row-level plan with features `user` and `item`.
    """

    def __init__(self, plan: DimensionPlan) -> None:
        super().__init__()
        if plan.feature_names != list(ENTITIES):
            raise PlanError(f"a graph plan has features {list(ENTITIES)}, got {plan.feature_names}")
        self.embedding = PlannedEmbedding(plan)
        tables = plan.tables()
        sizes = [t.num_embeddings for t in tables]
        stride = max(sizes)
        lengths = torch.cat([torch.cat([torch.ones(n), torch.zeros(stride - n)]) for n in sizes]).to(torch.int32)
        values = torch.cat([torch.arange(n) for n in sizes])
        self._kjt = KeyedJaggedTensor(keys=[t.key for t in tables], values=values, lengths=lengths, stride=stride)
        # Rows in (feature, bucket, local) order → their position among users then items.
        order, offset = [], 0
        for f in plan.features:
            bucket, local = f.remap
            position = np.empty(f.num_embeddings, dtype=np.int64)
            position[np.lexsort((local, bucket))] = np.arange(f.num_embeddings)
            order.append(position + offset)
            offset += f.num_embeddings
        self._gather = torch.from_numpy(np.concatenate(order))  # row → its index in the stacked bucket outputs
        self._layout = [(t, plan[t.feature].projection, plan[t.feature].output_dim) for t in tables]
        self.width = max(max(f.bucket_dims) for f in plan.features)

    def forward(self) -> torch.Tensor:
        pooled = self.embedding.ebc(self._kjt).to_dict()
        pieces = []
        for t, projection, output_dim in self._layout:
            x = pooled[t.key][: t.num_embeddings, : t.logical_dim]
            if projection == "linear":
                pieces.append(self.embedding.projections[t.name](x))
            else:
                pieces.append(F.pad(x, (0, output_dim - t.logical_dim)))
        return torch.cat(pieces)[self._gather]

    @torch.no_grad()
    def load_from_masked(self, table: MaskedTable) -> None:
        """Copy each row's logical prefix from a masked table into its bucket."""
        weights = self.embedding.ebc.embedding_bags
        for offset, feature in zip((0, table.num_users), ENTITIES, strict=True):
            f = self.embedding.plan[feature]
            bucket, local = f.remap
            for b, spec in enumerate(f.tables()):
                rows = np.flatnonzero(bucket == b)
                w = weights[spec.name].weight
                w.zero_()
                w[torch.from_numpy(local[rows]), : spec.logical_dim] = table.weight[
                    torch.from_numpy(rows + offset), : spec.logical_dim
                ]


def user_quality(metrics: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """CIESS's per-user quality (Eq. 8): the mean of Recall@k and NDCG@k over k ∈ {5, 10, 20} (nan: no held-out)."""
    return torch.stack([metrics[f"{m}@{k}"] for k in QUALITY_KS for m in ("recall", "ndcg")]).mean(0)


def item_quality(task: GraphTask, users: torch.Tensor) -> torch.Tensor:
    """CIESS's per-item quality (Eq. 9): the mean quality of the users who interacted with it in training (0 for an
    item without evaluated users)."""
    items, item_users = (torch.from_numpy(a) for a in task.item_users)
    q = users[item_users]
    ok = ~torch.isnan(q)
    total = torch.zeros(task.num_items).index_add_(0, items[ok], q[ok].to(torch.float32))
    count = torch.zeros(task.num_items).index_add_(0, items[ok], torch.ones(int(ok.sum())))
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


class SupernetEnv:
    """Evaluates row-level plans on a validation task by masking one pretrained `d_max` supernet.

    Args:
        task: the validation-mode task (train → valid).
        d_max: the largest size.
        recipe: how the supernet is pretrained (every row's size redrawn uniformly in [1, d_max] per batch).
        fine_tune: batches of warm-started training under the plan's masks before each evaluation (0: none).
        seed: seeds the supernet's init and sampling.
        weights: a supernet pretrained before (`env.supernet`, `[U + I, d_max]`) instead of pretraining one.
    """

    def __init__(
        self,
        task: GraphTask,
        d_max: int,
        recipe: BPRRecipe,
        fine_tune: int = 0,
        seed: int = 0,
        weights: torch.Tensor | None = None,
    ) -> None:
        self.task, self.d_max, self.recipe, self.fine_tune = task, d_max, recipe, fine_tune
        self.generator = torch.Generator().manual_seed(seed)
        self.table = MaskedTable(task.num_users, task.num_items, d_max, self.generator)
        n = task.num_nodes

        def resample(_: int) -> None:
            self.table.sizes.copy_(torch.randint(1, d_max + 1, (n,), generator=self.generator))

        self.pretrain_losses: list[float] = []
        if weights is None:
            resample(0)
            self.pretrain_losses = train_bpr(
                task, self.table, self.table.parameters(), recipe, self.generator, None, resample
            )
        elif tuple(weights.shape) != (n, d_max):
            raise PlanError(f"supernet weights have shape {tuple(weights.shape)}, expected ({n}, {d_max})")
        else:
            with torch.no_grad():
                self.table.weight.copy_(weights)
        self.supernet = self.table.weight.detach().clone()
        self.evaluations = 0
        full = np.full(task.num_users, d_max), np.full(task.num_items, d_max)
        self.peak_user, self.peak_item = self.quality(*full)

    def metrics(self, users: np.ndarray, items: np.ndarray) -> dict[str, torch.Tensor]:
        """Per-user held-out metrics of the supernet masked to these sizes (after the optional fine-tune)."""
        self.evaluations += 1
        with torch.no_grad():
            self.table.weight.copy_(self.supernet)
        self.table.set_sizes(users, items)
        if self.fine_tune:
            tune = BPRRecipe(**{**self.recipe.__dict__, "steps": self.fine_tune, "lr": self.recipe.min_lr * 3})
            train_bpr(self.task, self.table, self.table.parameters(), tune, self.generator, self.table.width)
        with torch.no_grad():
            return self.task.evaluate(self.table(), QUALITY_KS, self.table.width)

    def quality(self, users: np.ndarray, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-user and per-item quality (CIESS Eq. 8–9) of a plan."""
        uq = user_quality(self.metrics(users, items))
        return uq, item_quality(self.task, uq)

    @staticmethod
    def fitness(metrics: Mapping[str, torch.Tensor]) -> float:
        """SCALL's plan-level fitness: the mean over users of (Recall@20 + NDCG@20) / 2."""
        per_user = 0.5 * (metrics["recall@20"] + metrics["ndcg@20"])
        return float(per_user[~torch.isnan(per_user)].mean())
