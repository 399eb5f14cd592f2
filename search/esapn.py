"""ESAPN: row-level embedding sizes chosen online by policy networks (hard selection, sizes only grow).

Liu, Zhao, Wang, Liu, Tang. "Automated Embedding Size Search in Deep Recommender Systems" (SIGIR'20,
pp. 2307–2316). Official code: `zgahhblhc/ESAPN` (`model/train.py`). Only the paper's abstract is accessible, so
the algorithm follows the official code; `../shared/reference/methods.md` §4 summarises it, and the section numbers
below are that page's.

What is implemented (the official code's steps, adapted to LightGCN with BPR for the CIESS protocol, §5.5):

- **Candidate sizes and tables** (§4.1). One table per candidate size d_0 < … < d_{L−1} for users and one for items
  (`emb[i]: [rows, d_i]`), and bias-free linear transforms between consecutive sizes, `W[i]: d_i → d_{i+1}`. A row at
  size index s is `e = emb[s][row]` chained up to d_max: `e ← W[j] e` for j = s … L−2. The chain is computed per size
  group in one pass (rows at size ≤ i are transformed together by `W[i]`), never per row.
- **Enlarge** (§4.1). Moving a row from index i to i + 1 initialises its row of the larger table with the transform
  of its old embedding, `emb[i+1][row] ← W[i] emb[i][row]` (under `no_grad`, batched over all moving rows). Sizes only
  grow; everyone starts at the smallest size.
- **Policies** (§4.2, `Policy_Type` 1). One for users, one for items. State = BN(popularity embedding, 32-d) ⊕
  one-hot(current size index); network `Linear(in, 512) → BN → Tanh → Linear(512, 2)` giving logits [keep, enlarge];
  enlarge is masked at the largest size.
- **Controller update** (§4.3, `update_controller`, `Val_Type='last_batch'`, `Reward_Base='last_loss'`). On the
  previous batch's entities: sample actions from softmax(policy), apply them, re-predict that batch under `no_grad`,
  reward `R = 1 − ℓ`, baseline `b = 1 − (that entity's last loss)`, policy loss `−Σ log π(a|s)(R − b)`, Adam at 1e-4;
  users and items separately.
- **Recommender update** (§4.3, `update_RS`). On the current batch: argmax actions, enlarge, predict, record each
  entity's loss (prequential: before the update; it is the next baseline), one Adam step of the recommender.
- **Stream** (§4.4). One pass over a stream of `recipe.steps` BPR batches of `recipe.batch` triples drawn from the
  training interactions (`GraphTask.sample`: uniform over training pairs, as the official stream is a random shuffle
  of them, §9); popularity is each entity's running count of interactions so far in the stream.

Decisions (each departs from, or fills a gap in, the official code):

- **Sizes {4, 8, 16, 32, 64, 128}** instead of {2, 4, 8, 16, 64, 128}: physical dims must be multiples of 4
  (DESIGN.md decision 5), so 2 → 4; the official list then has a 16 → 64 jump, and keeping six sizes with one
  doubling per step (…, 16, 32, 64, 128) is the natural multiple-of-4 ladder with the same d_max and count.
- **Transforms have no bias** (the official `nn.Linear` has one). Then a row at size d reaches d_max through one
  linear map (the product of its chain), which is what a bucketed plan's learned projection is (DESIGN.md decision
  6): the exported plan reproduces the search's embeddings exactly. They are initialised N(0, 1/d_in), which keeps
  the embedding scale through the chain, so every row starts at LightGCN's init scale whatever its size (the
  official default init shrinks the variance ×3 per transform, ×243 from the smallest size).
- **LightGCN adaptation.** The ego embeddings `[U + I, d_max]` that LightGCN propagates are the chained embeddings
  themselves: the official `tanh(BN_128(·))` on top is left out, since LightGCN uses raw ego embeddings (a BN on the
  ego table would make them depend on the batch). ℓ is the per-triple BPR loss of `lightgcn_bpr_loss` (ranking term
  plus that triple's share of the L2 decay, so the mean of ℓ over a batch is the batch loss). The official stream's
  records are (user, movie) pairs; here a triple's entities are its user and its positive item (the sampled
  negative only enters the loss), and an entity's ℓ is the mean over the batch's triples it appears in. Model
  learning rate and decay are the recipe's (CIESS's LightGCN recipe, Adam; the official ESAPN uses Adam 1e-3);
  `transform_lr_scale` optionally scales the transforms' rate (default 1: the recipe's for everything).
- **Controller every `controller_every` batches** (default 10; official: every batch). On CPU each controller update
  re-predicts a batch through a full LightGCN propagation of all U + I nodes (an MLP re-predicts only 500 rows), so
  doing it every batch would add a full no-grad forward to every step.
- **The controller's trial is undone.** As in the official code (it writes `user_weights` only in `update_RS`), the
  sampled sizes are a trial: after the re-prediction the sizes are reverted — and here also the overwritten rows of
  the larger tables, so a trial leaves the model exactly as it was.
- **Masking** puts −inf on the enlarge logit at the largest size, so π(keep) = 1 there and those entities add
  nothing to the policy loss (the official code multiplies the sampled action by the mask but still back-propagates
  CE(logits, keep) · advantage for them).
- **Popularity buckets.** The official policy embeds the raw running count (a table of `max_popularity` rows); here
  the count c goes to bucket ⌊log2(1 + c)⌋ (capped at `popularity_buckets − 1`), since the CIESS stream's counts run
  to tens of thousands per entity.
- **Policies' BatchNorm is in training mode throughout** (as in the official code, which never calls `eval()`), and
  falls back to running statistics for a batch of a single entity.
- Last losses start at 1 (the official `np.ones`).

A consequence worth knowing: enlarging is function-preserving — `W[i..] (W[i] e) = W[i..] e`, so a row's embedding
right after it grows equals its embedding before. Without the official BN over each candidate's batch, the
controller's re-prediction therefore does not depend on the sampled actions, and its advantage `R − b` is the drop in
the entities' loss since their last recommender step. In expectation the policy gradient is then zero (E_a ∇log π = 0)
and the argmax policy that sets the sizes drifts; the official MLP version differs only through the BN batch
statistics. This implementation keeps the algorithm as published rather than inventing a look-ahead reward.

In the training job (`EsapnSearcher`, `search.method=esapn`): the same policies, state and REINFORCE update, acting
once per day of a prequential stream instead of once per batch (the issue's "batched, e.g. once per day"). The
algorithm exists once, as `EsapnController` (policies, their optimisers, the sampled and greedy actions, the
REINFORCE step and its state); `esapn_search` and `EsapnSearcher` are its two schedules. Per batch inside the job
would re-shard the tables at every step, so the job's schedule is per day:

- The job evaluates each day before training on it and reports every user and item row's mean example loss in that
  evaluation, all-reduced over the ranks (`DayStats.row_losses`). After day t−1's training, `propose` samples
  keep/enlarge for every row seen that day (ESAPN acts on the entities of the current data; not the fallback row,
  which serves unseen ids) from the policy in training mode, as the official controller samples. The trial is
  real here, not undone, and it is rewarded when its effect can show: growing a row zero-pads it (the same
  function), so day t's evaluation still measures the old size — it is the baseline, `b = 1 − ℓ_t` — and day
  t + 1's, after a day of training at the new size, gives `R = 1 − ℓ_{t+1}`. So each `observe` rewards the proposal
  of two days before (REINFORCE with ESAPN's last-loss baseline, on the rows evaluated on both days), centred by
  the mean advantage over those rows (less variance; the centre includes each row's own advantage, an O(1/n)
  bias), with the policy re-run on the proposal's whole batch so its BatchNorm statistics are those the actions
  were sampled under (the policy itself has taken one step since: a one-step-old π).
- A day has millions of rows but a row's policy input is only (popularity bucket, size index): at most
  `popularity_buckets × num_sizes` distinct states. `propose` and the REINFORCE step run the policy on those
  (`EsapnPolicy.state_logits`: BatchNorm statistics over the rows, count-weighted, and the same running-statistics
  update; the loss summed per (state, action), `state_reinforce_loss`), so its cost no longer grows with the rows'
  512-wide activations; each row still draws its own action from its state's π, the same draws as a per-row
  forward. The paper loop (a batch's few thousand entities) keeps the per-row forward.
- Sizes are a ladder of multiples of 4 (`size_ladder`: 4, 8, 16, … doubling up to `search.dim`) in bucket tables
  with zero-padding projections, so the stored parameters are the searched ones; a row's growth goes through the
  job's reconfiguration path, whose default migration copies the row and zero-pads it — the function-preserving
  enlarge of ESAPN with the identity transform (the learned per-size transforms of the batch version have no
  counterpart in a padded bucket plan).
- A budget is a cap, not a target (ESAPN cannot target one): the sampled enlargements are carried out by
  π(enlarge), highest first, each one that still fits; the others are not executed and not rewarded. Unseen ids
  (the fallback row) and never-seen rows stay at the smallest size.

Outputs: `esapn_search` returns each row's final logical size and the kept fraction `Σ d / (d_max · (U + I))` (the
papers' accounting, §1); `esapn_plan` turns them into a row-level `DimensionPlan` with learned linear projections (one
map per bucket, the product of its chain: `d · d_max` parameters per bucket, counted in the plan — more than the
chain's own `Σ d_i d_{i+1}`, and the top bucket's map is the identity); `load_esapn_weights` fills a
`PlannedEmbedding` / `BucketedTables` built from that plan so it gives ESAPN's ego embeddings.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.lightgcn import BPRRecipe, GraphTask, lightgcn_bpr_loss
from search.base import DayStats, SearchConfigError, SearchContext, Searcher
from search.rowlevel import ENTITIES, BucketedTables, job_plan, table_rows
from sharding.embedding import PlannedEmbedding
from sharding.plan import Budget, DimensionPlan, FeaturePlan, PlanError

logger = logging.getLogger(__name__)

KEEP, ENLARGE = 0, 1


@dataclass(frozen=True)
class EsapnConfig:
    """ESAPN's hyper-parameters (official values unless the module docstring says otherwise).

    The recommender's learning rate, schedule, batch size, decay and number of batches are the `BPRRecipe`'s.

    Args:
        candidate_dims: candidate sizes, strictly increasing multiples of 4; rows start at the first, the last is
            d_max (the paper's {2, 4, 8, 16, 64, 128} mapped to multiples of 4).
        popularity_dim: width of the policies' popularity embedding (32).
        popularity_buckets: log2 buckets of the running interaction count.
        hidden: the policies' hidden width (512).
        controller_lr: the policies' Adam learning rate (1e-4).
        controller_every: recommender batches per controller update (official: 1; 10 for CPU cost).
        reward_base: the REINFORCE baseline: `last_loss` (b = 1 − the entity's last loss).
        init_std: std of the entities' initial embedding at d_max (LightGCN init scale, as `MaskedTable`).
        transform_lr_scale: the transforms' learning rate as a multiple of the recipe's (1: the same, as the
            official single Adam). The transforms are shared by every row below d_max and chained up to five deep,
            so at CIESS's lr 0.03 a smaller scale may steady the first batches.
        log_every: batches between progress log lines.
    """

    candidate_dims: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    popularity_dim: int = 32
    popularity_buckets: int = 32
    hidden: int = 512
    controller_lr: float = 1e-4
    controller_every: int = 10
    reward_base: Literal["last_loss"] = "last_loss"
    init_std: float = 0.1
    transform_lr_scale: float = 1.0
    log_every: int = 200

    def __post_init__(self) -> None:
        dims = list(self.candidate_dims)
        if len(dims) < 2:
            raise ValueError(
                f"EsapnConfig.candidate_dims is {dims}; ESAPN needs at least two sizes to grow between, "
                "e.g. (4, 8, 16, 32, 64, 128)"
            )
        if bad := [d for d in dims if not isinstance(d, int) or d <= 0 or d % 4]:
            raise ValueError(
                f"EsapnConfig.candidate_dims {bad} are not positive multiples of 4 (FBGEMM's kernels need it); "
                f"use e.g. {[4 * max(1, math.ceil(d / 4)) for d in bad]}"
            )
        if dims != sorted(set(dims)):
            raise ValueError(f"EsapnConfig.candidate_dims must be strictly increasing, got {dims}")
        for name in ("popularity_dim", "popularity_buckets", "hidden", "controller_every", "log_every"):
            if (value := getattr(self, name)) < 1:
                raise ValueError(f"EsapnConfig.{name} is {value}; it must be >= 1")
        if not self.controller_lr > 0:
            raise ValueError(f"EsapnConfig.controller_lr is {self.controller_lr}; it must be > 0 (official: 1e-4)")
        if self.reward_base != "last_loss":
            raise ValueError(
                f"EsapnConfig.reward_base is {self.reward_base!r}; only 'last_loss' is implemented "
                "(b = 1 − the entity's last loss)"
            )
        if not self.init_std > 0:
            raise ValueError(f"EsapnConfig.init_std is {self.init_std}; it must be > 0")
        if not self.transform_lr_scale > 0:
            raise ValueError(f"EsapnConfig.transform_lr_scale is {self.transform_lr_scale}; it must be > 0")

    @property
    def max_dim(self) -> int:
        return self.candidate_dims[-1]

    @property
    def num_sizes(self) -> int:
        return len(self.candidate_dims)


@dataclass
class EnlargeUndo:
    """What `EsapnTables.enlarge` changed, so a controller trial can be reverted exactly.

    Args:
        rows: the rows that grew.
        old_index: their size index before.
        overwritten: per size index i + 1 written to, the rows and their previous contents.
    """

    rows: torch.Tensor
    old_index: torch.Tensor
    overwritten: list[tuple[int, torch.Tensor, torch.Tensor]]


class EsapnTables(nn.Module):
    """One entity type's candidate tables, transforms and per-row size index.

    Args:
        num_rows: rows (users or items).
        config: the candidate sizes and init scale.
        generator: seeds the init.
    """

    sizes: torch.Tensor

    def __init__(self, num_rows: int, config: EsapnConfig, generator: torch.Generator) -> None:
        super().__init__()
        dims = config.candidate_dims
        self.dims, self.num_rows = dims, num_rows
        # Variance-preserving init: W[i] ~ N(0, 1/d_i) keeps each coordinate's variance through the chain, so a row
        # at any size starts at std `init_std` per coordinate of its d_max output.
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(num_rows, d, generator=generator) * config.init_std) for d in dims
        )
        transforms = []
        for d_in, d_out in itertools.pairwise(dims):
            linear = nn.Linear(d_in, d_out, bias=False)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(d_out, d_in, generator=generator) / math.sqrt(d_in))
            transforms.append(linear)
        self.transforms = nn.ModuleList(transforms)
        self.register_buffer("sizes", torch.zeros(num_rows, dtype=torch.int64))

    @property
    def row_dims(self) -> torch.Tensor:
        """Each row's logical size."""
        return torch.tensor(self.dims)[self.sizes]

    def transform(self, i: int) -> nn.Linear:
        t = self.transforms[i]
        assert isinstance(t, nn.Linear)
        return t

    def forward(self) -> torch.Tensor:
        """Every row at d_max, `[num_rows, d_max]`: rows grouped by size, chained together level by level."""
        x = self.weights[0].new_zeros(0, self.dims[0])
        order = []
        for i in range(len(self.dims)):
            rows = torch.nonzero(self.sizes == i).squeeze(1)
            order.append(rows)
            x = torch.cat([x, self.weights[i][rows]])
            if i < len(self.dims) - 1:
                x = self.transform(i)(x)
        return x[torch.argsort(torch.cat(order))]

    @torch.no_grad()
    def enlarge(self, rows: torch.Tensor) -> EnlargeUndo:
        """Move `rows` to the next size, each initialised as the transform of its old embedding.

        Raises:
            ValueError: if a row is already at the largest size (the policies mask that action).
        """
        rows = torch.unique(torch.as_tensor(rows, dtype=torch.int64))
        old = self.sizes[rows].clone()
        if bool((old == len(self.dims) - 1).any()):
            top = rows[old == len(self.dims) - 1][:5].tolist()
            raise ValueError(f"rows {top} are already at the largest size {self.dims[-1]}; they cannot grow")
        overwritten = []
        for i in range(len(self.dims) - 1):
            part = rows[old == i]
            if part.numel():
                overwritten.append((i + 1, part, self.weights[i + 1][part].clone()))
                self.weights[i + 1][part] = self.transform(i)(self.weights[i][part])
        self.sizes[rows] = old + 1
        return EnlargeUndo(rows, old, overwritten)

    @torch.no_grad()
    def restore(self, undo: EnlargeUndo) -> None:
        """Revert an `enlarge`: sizes and the overwritten rows of the larger tables."""
        for i, part, values in undo.overwritten:
            self.weights[i][part] = values
        self.sizes[undo.rows] = undo.old_index

    def composed_projections(self) -> list[torch.Tensor]:
        """Per size index s, the chain's single linear map `W[L−2] ⋯ W[s]` as a `[d_max, d_s]` matrix."""
        out = [torch.eye(self.dims[-1])]
        for i in reversed(range(len(self.dims) - 1)):
            out.append(out[-1] @ self.transform(i).weight)
        return out[::-1]


class EsapnEmbedding(nn.Module):
    """ESAPN's variable-size embeddings of users then items, giving LightGCN's ego embeddings `[U + I, d_max]`.

    Args:
        num_users: U.
        num_items: I.
        config: candidate sizes and init scale.
        generator: seeds the init.
    """

    def __init__(self, num_users: int, num_items: int, config: EsapnConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.config = config
        self.num_users, self.num_items = num_users, num_items
        self.entities = nn.ModuleDict(
            {"user": EsapnTables(num_users, config, generator), "item": EsapnTables(num_items, config, generator)}
        )

    def __getitem__(self, entity: str) -> EsapnTables:
        tables = self.entities[entity]
        assert isinstance(tables, EsapnTables)
        return tables

    def forward(self) -> torch.Tensor:
        return torch.cat([self["user"](), self["item"]()])

    def enlarge(self, entity: str, rows: torch.Tensor) -> EnlargeUndo:
        """Grow `rows` of `entity` ("user" or "item") by one size (see `EsapnTables.enlarge`)."""
        return self[entity].enlarge(rows)

    def kept_fraction(self) -> float:
        """`Σ d / (d_max · (U + I))` over every row."""
        total = sum(int(self[e].row_dims.sum()) for e in ENTITIES)
        return total / (self.config.max_dim * (self.num_users + self.num_items))


class EsapnPolicy(nn.Module):
    """The keep/enlarge policy of one entity type (§4.2, `Policy_Type` 1).

    Args:
        config: popularity buckets and width, hidden width, number of sizes.
    """

    def __init__(self, config: EsapnConfig) -> None:
        super().__init__()
        self.num_sizes = config.num_sizes
        self.popularity = nn.Embedding(config.popularity_buckets, config.popularity_dim)
        self.popularity_norm = nn.BatchNorm1d(config.popularity_dim)
        self.net = nn.Sequential(
            nn.Linear(config.popularity_dim + config.num_sizes, config.hidden),
            nn.BatchNorm1d(config.hidden),
            nn.Tanh(),
            nn.Linear(config.hidden, 2),
        )

    def forward(self, popularity_bucket: torch.Tensor, size_index: torch.Tensor) -> torch.Tensor:
        """Masked logits [n, 2] (keep, enlarge): enlarge is −inf at the largest size."""
        training = self.training
        if training and popularity_bucket.numel() < 2:
            self.eval()  # BatchNorm cannot take batch statistics of one entity
        try:
            state = torch.cat(
                [
                    self.popularity_norm(self.popularity(popularity_bucket)),
                    F.one_hot(size_index, self.num_sizes).to(torch.float32),
                ],
                dim=1,
            )
            logits = self.net(state)
        finally:
            self.train(training)
        return mask_logits(logits, size_index, self.num_sizes)

    def states(self, popularity_bucket: torch.Tensor, size_index: torch.Tensor) -> PolicyStates:
        """The distinct (popularity bucket, size index) states of these rows (see `PolicyStates`)."""
        return policy_states(popularity_bucket, size_index, self.popularity.num_embeddings, self.num_sizes)

    def state_logits(self, states: PolicyStates) -> torch.Tensor:
        """Masked logits `[k, 2]` of the k distinct states, as `forward` gives them on the rows they stand for.

        In training mode on two rows or more, each BatchNorm takes its batch statistics over the rows, weighted by
        the states' row counts (`weighted_batch_norm`), and updates its running statistics as `forward` does on the
        rows: the network runs on at most `popularity_buckets × num_sizes` inputs instead of one per row, with the
        same logits, gradients and BatchNorm buffers. On so few inputs it runs in float64 (the parameters cast,
        differentiably), and the logits are rounded to the parameters' dtype at the end: exact to that rounding
        (about 5e-7 at any n), where the per-row float32 forward accumulates its BatchNorm statistics over the n
        rows in float32, an error that grows with n (measured with the default policy: 1e-5 in the logits at 5,000
        rows, 5e-4 at 200,000, 3e-3 at a million). Otherwise (eval mode, or one row, which `forward` serves from the
        running statistics) the network is row-wise and runs on the states as `forward` does.
        """
        if not self.training or states.num_rows < 2:
            return self(states.bucket, states.size_index)
        wide = torch.float64
        x = weighted_batch_norm(
            self.popularity_norm,
            F.embedding(states.bucket, self.popularity.weight.to(wide)),
            states.counts,
            states.num_rows,
        )
        x = torch.cat([x, F.one_hot(states.size_index, self.num_sizes).to(wide)], dim=1)
        for module in self.net:
            if isinstance(module, nn.BatchNorm1d):
                x = weighted_batch_norm(module, x, states.counts, states.num_rows)
            elif isinstance(module, nn.Linear):
                x = F.linear(x, module.weight.to(wide), None if module.bias is None else module.bias.to(wide))
            else:
                x = module(x)
        return mask_logits(x, states.size_index, self.num_sizes).to(self.popularity.weight.dtype)

    def forward_distinct(self, popularity_bucket: torch.Tensor, size_index: torch.Tensor) -> torch.Tensor:
        """`forward`'s per-row logits `[n, 2]`, computed on the distinct states and gathered back to the rows."""
        states = self.states(popularity_bucket, size_index)
        return self.state_logits(states)[states.inverse]


@dataclass(frozen=True)
class PolicyStates:
    """The distinct policy inputs of a batch of rows, each with its row count and each row's state.

    A row's policy input is only its (popularity bucket, size index), so a day's millions of rows share at most
    `popularity_buckets × num_sizes` states; the policy runs on those (`EsapnPolicy.state_logits`).

    Args:
        bucket: `[k]` the states' popularity buckets (states in ascending `bucket · num_sizes + size_index`).
        size_index: `[k]` their size indices.
        counts: `[k]` int64, how many rows each state stands for (all ≥ 1).
        inverse: `[n]` int64, each row's state.
    """

    bucket: torch.Tensor
    size_index: torch.Tensor
    counts: torch.Tensor
    inverse: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.inverse.numel())


def policy_states(
    popularity_bucket: torch.Tensor, size_index: torch.Tensor, num_buckets: int, num_sizes: int
) -> PolicyStates:
    """Group rows by (popularity bucket, size index).

    The combined key `bucket · num_sizes + size_index` takes at most `num_buckets · num_sizes` values, so one
    `bincount` and a lookup table give what `torch.unique(key, return_inverse=True, return_counts=True)` gives
    (ascending keys, each row's state, the counts) in O(n), without sorting the rows.

    Raises:
        ValueError: if a bucket or size index is out of range (the key would alias another state).
    """
    bucket, size = popularity_bucket.to(torch.int64), size_index.to(torch.int64)
    if bucket.shape != size.shape or bucket.dim() != 1:
        raise ValueError(
            f"popularity buckets and size indices must be two 1-d tensors of the same length, got shapes "
            f"{tuple(bucket.shape)} and {tuple(size.shape)}"
        )
    for name, values, bound in (("popularity buckets", bucket, num_buckets), ("size indices", size, num_sizes)):
        if not values.numel():
            continue
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= bound:
            raise ValueError(
                f"{name} must lie in [0, {bound}), got [{low}, {high}]; buckets come "
                "from popularity_bucket and size indices from the candidate sizes"
            )
    key = bucket * num_sizes + size
    all_counts = torch.bincount(key, minlength=num_buckets * num_sizes)
    present = torch.nonzero(all_counts).squeeze(1)
    lookup = torch.full_like(all_counts, -1)
    lookup[present] = torch.arange(present.numel())
    return PolicyStates(
        bucket=torch.div(present, num_sizes, rounding_mode="floor"),
        size_index=present % num_sizes,
        counts=all_counts[present],
        inverse=lookup[key],
    )


def weighted_batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor, counts: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`bn` in training mode on `num_rows` rows given as the distinct rows `x` `[k, C]`, row j standing `counts[j]`
    times: the batch statistics are count-weighted (mean `Σ w x / n`, biased variance `Σ w (x − mean)² / n`), and
    the running statistics, `num_batches_tracked` and the momentum are updated as `nn.BatchNorm1d.forward` updates
    them on the rows (running_var with the unbiased variance, `· n / (n − 1)`). Computed in float64 (sums of k terms
    rather than of n) and returned in `x`'s dtype; differentiable in `x` and the affine parameters, like the per-row
    BatchNorm.

    Args:
        bn: a `BatchNorm1d` (its own parameters and buffers are used and updated).
        x: `[k, C]` the distinct inputs.
        counts: `[k]` their multiplicities, summing to `num_rows`.
        num_rows: n ≥ 2.
    """
    weights, wide = counts.to(torch.float64)[:, None], x.to(torch.float64)
    mean = (weights * wide).sum(0) / num_rows
    centred = wide - mean
    var = (weights * centred.square()).sum(0) / num_rows
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            factor = 0.0 if bn.momentum is None else bn.momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if bn.momentum is None:  # a cumulative moving average, as torch's BatchNorm
                    factor = 1.0 / float(bn.num_batches_tracked)
            unbiased = var.detach() * (num_rows / (num_rows - 1))
            bn.running_mean.copy_((1 - factor) * bn.running_mean.double() + factor * mean.detach())
            bn.running_var.copy_((1 - factor) * bn.running_var.double() + factor * unbiased)
    y = centred * torch.rsqrt(var + bn.eps)
    if bn.affine:
        y = y * bn.weight.to(y.dtype) + bn.bias.to(y.dtype)
    return y.to(x.dtype)


def mask_logits(logits: torch.Tensor, size_index: torch.Tensor, num_sizes: int) -> torch.Tensor:
    """Forbid enlarging at the largest size: its logit becomes −inf (π(keep) = 1 there)."""
    at_top = size_index == num_sizes - 1
    enlarge = logits[:, ENLARGE].masked_fill(at_top, float("-inf"))
    return torch.stack([logits[:, KEEP], enlarge], dim=1)


def popularity_bucket(counts: torch.Tensor, buckets: int) -> torch.Tensor:
    """`min(⌊log2(1 + count)⌋, buckets − 1)`."""
    return torch.floor(torch.log2(counts.to(torch.float64) + 1.0)).to(torch.int64).clamp(max=buckets - 1)


def reinforce_loss(
    logits: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, baselines: torch.Tensor
) -> torch.Tensor:
    """REINFORCE with a baseline: `−Σ log π(a|s) (R − b)` (the official `Σ CE(logits, a) · (R − b)`).

    Args:
        logits: `[n, 2]` masked policy logits.
        actions: `[n]` the sampled actions.
        rewards: `[n]` R.
        baselines: `[n]` b.
    """
    log_prob = torch.log_softmax(logits, dim=1).gather(1, actions[:, None]).squeeze(1)
    # A masked action is never sampled, so its log-prob (−inf) never appears; a forced keep has log-prob 0.
    return -(log_prob * (rewards - baselines).detach()).sum()


def state_reinforce_loss(
    logits: torch.Tensor, states: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """`reinforce_loss` with the policy evaluated once per distinct state:
    `−Σ_rows log π(a_r|s_r) (R_r − b_r) = −Σ_(s, a) log π(a|s) · Σ_{rows r: s_r = s, a_r = a} (R_r − b_r)`.

    The advantages are summed per (state, action) pair in float64, and only the pairs some row took enter the sum
    (so a masked action, never sampled, never contributes its −inf log-prob): the same value and gradient as the
    per-row loss, with the policy's network and its gradient over k states instead of n rows.

    Args:
        logits: `[k, 2]` masked policy logits of the distinct states.
        states: `[n]` each row's state (an index into `logits`).
        actions: `[n]` the rows' sampled actions.
        advantages: `[n]` R − b.
    """
    pair = states.to(torch.int64) * 2 + actions.to(torch.int64)
    total = torch.zeros(logits.shape[0] * 2, dtype=torch.float64).index_add_(0, pair, advantages.detach().double())
    taken = torch.nonzero(torch.bincount(pair, minlength=total.numel())).squeeze(1)
    log_prob = torch.log_softmax(logits, dim=1).flatten()[taken]
    return -(log_prob.double() * total[taken]).sum().to(logits.dtype)


def sample_actions(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Actions drawn from softmax(logits), one per row."""
    return torch.multinomial(torch.softmax(logits.detach(), dim=1), 1, generator=generator).squeeze(1)


class EsapnController:
    """ESAPN's decision-maker, the one implementation both schedules drive: the per-batch paper loop (`esapn_search`,
    whose controller trials are undone) and the job's per-day searcher (`EsapnSearcher`, whose trials are real and
    rewarded once a day has trained at the new sizes). Per entity: the keep/enlarge policy on (popularity bucket,
    size index), its Adam optimiser and the REINFORCE step; every sampled action comes from one generator.

    Args:
        entities: the entity names (users first), in the order their policies are initialised.
        config: the policies' widths, popularity buckets and learning rate.
        seed: seeds the policies' default initialisation, without touching the global RNG.
        generator: draws the sampled actions.
    """

    def __init__(self, entities: tuple[str, ...], config: EsapnConfig, seed: int, generator: torch.Generator) -> None:
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policies = {e: EsapnPolicy(config) for e in entities}
        self.optimizers = {
            e: torch.optim.Adam(p.parameters(), lr=config.controller_lr) for e, p in self.policies.items()
        }
        self.generator = generator

    def bucket(self, counts: torch.Tensor) -> torch.Tensor:
        """The popularity state of rows with these running interaction counts."""
        return popularity_bucket(counts, self.config.popularity_buckets)

    def logits(self, entity: str, bucket: torch.Tensor, size_index: torch.Tensor) -> torch.Tensor:
        """Masked [keep, enlarge] logits of `entity`'s rows (the policy in its current mode), one network row per
        row: the paper loop's path (a batch's few thousand entities), kept so its results do not move."""
        return self.policies[entity](bucket, size_index)

    def states(self, entity: str, bucket: torch.Tensor, size_index: torch.Tensor) -> PolicyStates:
        """The distinct states of `entity`'s rows (see `PolicyStates`)."""
        return self.policies[entity].states(bucket, size_index)

    def state_logits(self, entity: str, states: PolicyStates) -> torch.Tensor:
        """Masked [keep, enlarge] logits `[k, 2]` of `entity`'s distinct states, equal to `logits` on the rows they
        stand for (BatchNorm statistics over the rows, count-weighted; see `EsapnPolicy.state_logits`): the job's
        path, whose days have millions of rows."""
        return self.policies[entity].state_logits(states)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Actions drawn from softmax(logits): the controller's trial."""
        return sample_actions(logits, self.generator)

    def sample_probabilities(self, probs: torch.Tensor) -> torch.Tensor:
        """Actions drawn from per-row probabilities `[n, 2]`, one per row: `sample` when π is already computed (the
        same draws from the generator as `sample` on logits whose softmax is `probs`)."""
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)

    def update(
        self, entity: str, logits: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, baselines: torch.Tensor
    ) -> torch.Tensor:
        """One Adam step of `entity`'s policy on `−Σ log π(a|s)(R − b)`; the loss (detached)."""
        return self._step(entity, reinforce_loss(logits, actions, rewards, baselines))

    def update_states(
        self,
        entity: str,
        state_logits: torch.Tensor,
        states: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        baselines: torch.Tensor,
    ) -> torch.Tensor:
        """`update` with the logits of the distinct states (`state_logits`) and each row's state (`states`): the
        same loss and step, the sum over rows taken per (state, action) (`state_reinforce_loss`)."""
        return self._step(entity, state_reinforce_loss(state_logits, states, actions, rewards - baselines))

    def _step(self, entity: str, loss: torch.Tensor) -> torch.Tensor:
        optimizer = self.optimizers[entity]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {
            "policies": {e: p.state_dict() for e, p in self.policies.items()},
            "optimizers": {e: o.state_dict() for e, o in self.optimizers.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for e, policy in self.policies.items():
            policy.load_state_dict(state["policies"][e])
            self.optimizers[e].load_state_dict(state["optimizers"][e])
        self.generator.set_state(state["generator"])


def entity_means(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ids (ascending) and the mean of `values` over each id's occurrences."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    total = torch.zeros(unique.numel(), dtype=values.dtype).index_add_(0, inverse, values)
    count = torch.bincount(inverse, minlength=unique.numel()).to(values.dtype)
    return unique, total / count


def triple_entities(triples: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A triple's entities: its user and its positive item (the sampled negative only enters the loss)."""
    return {"user": triples[0], "item": triples[1]}


@dataclass
class EsapnResult:
    """The outcome of a search.

    Args:
        config: the configuration searched with.
        user_sizes: each user's final logical size.
        item_sizes: each item's final logical size.
        kept: `Σ d / (d_max · (U + I))`.
        history: one record per batch (`step`, `loss`, `kept`, and on controller batches `reward_<e>`,
            `advantage_<e>`, `policy_loss_<e>`, `enlarge_prob_<e>`).
        metrics: the search model's mean held-out metrics at the end (Recall@k, NDCG@k, k ∈ {5, 20}).
        seconds: wall time of the search.
        embedding: the trained ESAPN embedding (its weights can be loaded into the plan's tables).
    """

    config: EsapnConfig
    user_sizes: np.ndarray
    item_sizes: np.ndarray
    kept: float
    history: list[dict[str, float]]
    metrics: dict[str, float]
    seconds: float
    embedding: EsapnEmbedding = field(repr=False)


def _batch_losses(
    task: GraphTask, ego: torch.Tensor, triples: tuple[torch.Tensor, torch.Tensor, torch.Tensor], decay: float
) -> torch.Tensor:
    users, items = task.final(ego)
    user, positive, negative = triples
    return lightgcn_bpr_loss(
        users, items, ego[: task.num_users], ego[task.num_users :], user, positive, negative, decay, "none"
    )


def esapn_search(task: GraphTask, config: EsapnConfig, recipe: BPRRecipe, seed: int = 0) -> EsapnResult:
    """Run ESAPN over one stream of `recipe.steps` BPR batches on a LightGCN (module docstring).

    Args:
        task: the graph task (validation mode for a search: train → valid).
        config: ESAPN's hyper-parameters.
        recipe: the recommender's training recipe (batches, batch size, learning-rate schedule, decay).
        seed: seeds the init, the stream, the sampled actions and the policies.

    Returns:
        The final sizes, kept fraction, per-batch history, the model's held-out metrics and the wall time.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    embedding = EsapnEmbedding(task.num_users, task.num_items, config, generator)
    controller = EsapnController(ENTITIES, config, seed, generator)
    tables = [w for e in ENTITIES for w in embedding[e].weights]
    transforms = [p for e in ENTITIES for p in embedding[e].transforms.parameters()]
    model_optimizer = torch.optim.Adam([{"params": tables}, {"params": transforms}], lr=recipe.lr)
    lr_scales = (1.0, config.transform_lr_scale)
    sizes_of = {"user": task.num_users, "item": task.num_items}
    counts = {e: torch.zeros(n, dtype=torch.int64) for e, n in sizes_of.items()}
    last_loss = {e: torch.ones(n) for e, n in sizes_of.items()}
    previous: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    history: list[dict[str, float]] = []

    for step in range(recipe.steps):
        record: dict[str, float] = {"step": float(step)}
        triples = task.sample(recipe.batch, generator)

        if previous is not None and step % config.controller_every == 0:
            record.update(_controller_update(task, embedding, controller, previous, counts, last_loss, recipe.decay))

        # Recommender update on the current batch: popularity now includes it, argmax actions, enlarge, one step.
        entities = triple_entities(triples)
        rows = {}
        with torch.no_grad():
            for e in ENTITIES:
                counts[e] += torch.bincount(entities[e], minlength=sizes_of[e])
                rows[e] = torch.unique(entities[e])
                logits = controller.logits(e, controller.bucket(counts[e][rows[e]]), embedding[e].sizes[rows[e]])
                embedding.enlarge(e, rows[e][logits.argmax(1) == ENLARGE])
        for group, scale in zip(model_optimizer.param_groups, lr_scales, strict=True):
            group["lr"] = recipe.lr_at(step) * scale
        per_triple = _batch_losses(task, embedding(), triples, recipe.decay)
        loss = per_triple.mean()
        model_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model_optimizer.step()
        for e in ENTITIES:
            ids, means = entity_means(entities[e], per_triple.detach())
            last_loss[e][ids] = means
        previous = triples

        record["loss"] = loss.item()
        record["kept"] = embedding.kept_fraction()
        history.append(record)
        if step % config.log_every == 0 or step == recipe.steps - 1:
            logger.info(
                "esapn step %d/%d loss %.4f kept %.4f (%.1fs)",
                step + 1,
                recipe.steps,
                record["loss"],
                record["kept"],
                time.perf_counter() - start,
            )

    with torch.no_grad():
        per_user = task.evaluate(embedding(), (5, 20))
    metrics = {
        k: float(np.nanmean(v.numpy())) if bool((~torch.isnan(v)).any()) else float("nan") for k, v in per_user.items()
    }
    return EsapnResult(
        config=config,
        user_sizes=embedding["user"].row_dims.numpy(),
        item_sizes=embedding["item"].row_dims.numpy(),
        kept=embedding.kept_fraction(),
        history=history,
        metrics=metrics,
        seconds=time.perf_counter() - start,
        embedding=embedding,
    )


def _controller_update(
    task: GraphTask,
    embedding: EsapnEmbedding,
    controller: EsapnController,
    triples: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    counts: Mapping[str, torch.Tensor],
    last_loss: Mapping[str, torch.Tensor],
    decay: float,
) -> dict[str, float]:
    """One REINFORCE step of both policies on the previous batch (a trial: the model is left as it was)."""
    entities = triple_entities(triples)
    rows, logits, actions, undo = {}, {}, {}, {}
    for e in ENTITIES:
        rows[e] = torch.unique(entities[e])
        logits[e] = controller.logits(e, controller.bucket(counts[e][rows[e]]), embedding[e].sizes[rows[e]])
        actions[e] = controller.sample(logits[e])
        undo[e] = embedding.enlarge(e, rows[e][actions[e] == ENLARGE])
    with torch.no_grad():
        per_triple = _batch_losses(task, embedding(), triples, decay)
    for e in ENTITIES:
        embedding[e].restore(undo[e])
    out: dict[str, float] = {}
    for e in ENTITIES:
        ids, mean_loss = entity_means(entities[e], per_triple)  # ids == rows[e]: both sorted and distinct
        reward, baseline = 1.0 - mean_loss, 1.0 - last_loss[e][ids]
        loss = controller.update(e, logits[e], actions[e], reward, baseline)
        out |= {
            f"reward_{e}": float(reward.mean()),
            f"advantage_{e}": float((reward - baseline).mean()),
            f"policy_loss_{e}": loss.item(),
            f"enlarge_prob_{e}": float(torch.softmax(logits[e].detach(), 1)[:, ENLARGE].mean()),
        }
    return out


def esapn_plan(
    result: EsapnResult, budget: int | None = None, provenance: Mapping[str, Any] | None = None
) -> DimensionPlan:
    """The row-level plan of a search: features `user` and `item`, each row in the bucket of its final size, each
    bucket projected to d_max by a learned linear map (the product of its chain of transforms), counted in the plan.

    Args:
        result: the search's outcome.
        budget: a logical-parameter budget to check the plan against (ESAPN cannot target one), or None.
        provenance: extra provenance (data, recipe, ...).

    Raises:
        PlanError: if the plan is over `budget`.
    """
    d_max = result.config.max_dim
    features = tuple(
        FeaturePlan(name, int(sizes.size), d_max, row_dims=np.asarray(sizes, dtype=np.int64), projection="linear")
        for name, sizes in (("user", result.user_sizes), ("item", result.item_sizes))
    )
    plan = DimensionPlan(
        features,
        Budget(budget, "logical") if budget is not None else None,
        provenance={
            "method": "esapn",
            "candidate_dims": list(result.config.candidate_dims),
            "kept": result.kept,
            "config": {k: v for k, v in result.config.__dict__.items() if k != "candidate_dims"},
            "metrics": dict(result.metrics),
            "seconds": result.seconds,
            **(provenance or {}),
        },
    )
    plan.check_budget()
    return plan


@torch.no_grad()
def load_esapn_weights(target: PlannedEmbedding | BucketedTables, embedding: EsapnEmbedding) -> None:
    """Copy an ESAPN embedding into the bucket tables of its plan: each row into its bucket (at its local row), each
    bucket's projection set to the product of the chain of transforms from its size to d_max. The bucketed model
    then gives the same ego embeddings as `embedding()`.

    Raises:
        PlanError: if the plan's features or row sizes are not the embedding's.
    """
    planned = target.embedding if isinstance(target, BucketedTables) else target
    plan = planned.plan
    for entity in ENTITIES:
        tables = embedding[entity]
        try:
            f = plan[entity]
        except KeyError as e:
            raise PlanError(f"the plan has no feature '{entity}' (features {plan.feature_names})") from e
        dims = tables.row_dims.numpy()
        if f.row_dims is None or not np.array_equal(np.asarray(f.row_dims), dims):
            raise PlanError(
                f"feature '{entity}': the plan's row sizes are not the ESAPN embedding's current sizes. Build the "
                "plan with esapn_plan from the same search"
            )
        if f.projection != "linear" or f.output_dim != embedding.config.max_dim:
            raise PlanError(
                f"feature '{entity}': ESAPN needs linear projections to d_max {embedding.config.max_dim}, the plan "
                f"has projection '{f.projection}' to {f.output_dim}"
            )
        bucket, local = f.remap
        maps = tables.composed_projections()
        for b, spec in enumerate(f.tables()):
            s = tables.dims.index(spec.logical_dim)
            rows = torch.from_numpy(np.flatnonzero(bucket == b))
            weight = planned.ebc.embedding_bags[spec.name].weight
            weight[torch.from_numpy(local)[rows], : spec.logical_dim] = tables.weights[s][rows]
            projection = planned.projections[spec.name]
            assert isinstance(projection, nn.Linear)
            projection.weight.copy_(maps[s])


def size_ladder(d_max: int) -> tuple[int, ...]:
    """The job's candidate sizes up to `d_max` (a multiple of 4): 4, 8, 16, … doubling below d_max, then d_max."""
    if d_max < 8 or d_max % 4:
        raise ValueError(f"ESAPN's d_max must be a multiple of 4 and >= 8 (two sizes to grow between), got {d_max}")
    dims = [4]
    while dims[-1] * 2 < d_max:
        dims.append(dims[-1] * 2)
    return (*dims, d_max)


@dataclass(frozen=True)
class EsapnSettings:
    """ESAPN's section of a job config (`search.esapn`); the rest of `EsapnConfig` keeps its official values.

    Args:
        candidate_dims: the sizes rows grow through (ascending multiples of 4); None: 4, 8, 16, … doubling up to
            `search.dim` (`size_ladder`).
        controller_lr: the policies' Adam learning rate.
        hidden: the policies' hidden width.
    """

    candidate_dims: tuple[int, ...] | None = None
    controller_lr: float = 1e-4
    hidden: int = 512

    def __post_init__(self) -> None:
        if self.controller_lr <= 0 or self.hidden < 1:
            raise ValueError(
                f"search.esapn.controller_lr must be > 0 and search.esapn.hidden >= 1, got {self.controller_lr} "
                f"and {self.hidden}"
            )


def first_fit(cost: np.ndarray, room: int) -> np.ndarray:
    """Which items a first-fit pass takes, in order: each whose cost still fits what the earlier ones left.

    Vectorised, exact: up to the first item that does not fit, a prefix of the cumulative cost is taken; from then
    on no item of that cost or more can fit again (the room only shrinks), so those are dropped and the pass goes on
    with the cheaper ones. That is one cumulative sum per distinct cost at most (ESAPN's enlargement costs take a few
    values: the steps between its sizes), not a Python step per row.

    Args:
        cost: `[n]` non-negative costs, in the order the items are considered.
        room: what the budget has left.

    Returns:
        `[n]` bool: taken.
    """
    taken = np.zeros(cost.size, dtype=bool)
    left = np.arange(cost.size)
    while left.size:
        spent = np.cumsum(cost[left])
        fail = np.flatnonzero(spent > room)
        if fail.size == 0:
            taken[left] = True
            break
        j = int(fail[0])
        taken[left[:j]] = True
        room -= int(spent[j - 1]) if j else 0
        rest = left[j + 1 :]
        left = rest[cost[rest] < cost[left[j]]]
    return taken


class EsapnSearcher(Searcher):
    """ESAPN in the training job's day loop (module docstring, "In the training job"): each day every user and item
    row seen that day keeps or enlarges its size by its policy; rows move between bucket tables once per day.

    Args:
        budget: the budget over every table (`parameters`: row sizes are multiples of 4 and padded, so stored =
            searched; or `logical`), or None: rows grow wherever the policies say (ESAPN as published).
        user_feature: the feature whose rows are users.
        item_feature: the feature whose rows are items.
        config: candidate sizes (the last is d_max) and the policies' settings; default `size_ladder(128)`.
        other_dim: the field-level dim of every other feature (default d_max).
        seed: seeds the policies' initialisation and the action sampling.
    """

    name = "esapn"
    settings_class = EsapnSettings

    @classmethod
    def check(cls, context: SearchContext) -> None:
        context.need_protocol(streaming=True)
        context.need_multiple_of_4()
        if context.dim < 8:
            raise SearchConfigError(
                f"search.method=esapn grows rows from 4 up to search.dim: it must be >= 8, got {context.dim}"
            )
        context.need_entities()

    @classmethod
    def from_config(cls, settings: EsapnSettings, context: SearchContext) -> EsapnSearcher:
        users, items = context.need_entities()
        dims = settings.candidate_dims or size_ladder(context.dim)
        try:
            config = EsapnConfig(candidate_dims=dims, controller_lr=settings.controller_lr, hidden=settings.hidden)
        except ValueError as e:
            raise SearchConfigError(f"search.esapn: {e}") from None
        return cls(
            Budget(context.budget) if context.budget else None,
            users,
            items,
            config,
            other_dim=context.other_dim,
            seed=context.seed,
        )

    def __init__(
        self,
        budget: Budget | None,
        user_feature: str = "user",
        item_feature: str = "item",
        config: EsapnConfig | None = None,
        other_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        if budget is not None and budget.unit not in ("parameters", "logical"):
            raise PlanError(
                f"ESAPN counts row sizes: its budget unit must be 'parameters' or 'logical', got '{budget.unit}'"
            )
        if user_feature == item_feature:
            raise ValueError(f"user_feature and item_feature must differ, both are '{user_feature}'")
        self.config = config if config is not None else EsapnConfig(candidate_dims=size_ladder(128))
        self.dims = np.asarray(self.config.candidate_dims, dtype=np.int64)
        self.d_max = self.config.max_dim
        self.other_dim = self.d_max if other_dim is None else other_dim
        if self.other_dim < 1:
            raise ValueError(f"other_dim must be >= 1, got {self.other_dim}")
        self.budget = budget
        self.entities = (user_feature, item_feature)
        self.row_loss_features = self.entities
        self.controller = EsapnController(self.entities, self.config, seed, torch.Generator().manual_seed(seed))
        self.features: list[str] = []
        self.num_embeddings: dict[str, int] = {}
        self.size_index: dict[str, np.ndarray] = {}  # each row's index into the candidate sizes
        self.counts: dict[str, np.ndarray] = {}  # cumulative interaction counts after the last observed day
        self.day_counts: dict[str, np.ndarray] = {}  # the last observed day's counts
        # Proposals not yet rewarded, oldest first: rows, states, executed actions (+ `before`, their losses on the
        # day after the proposal, once known).
        self.trials: dict[str, list[dict[str, np.ndarray]]] = {}
        self.pending = False
        self.day_index: int | None = None
        self.history: list[dict[str, float | None]] = []

    # -- the interface --

    def initial_plan(self, features: list[str], num_embeddings: Mapping[str, int]) -> DimensionPlan:
        """Every user and item row at the smallest size (ESAPN's start), the other features at `other_dim`."""
        missing = [f for f in self.entities if f not in features]
        if missing:
            raise PlanError(f"ESAPN sizes the features {missing}, which are not among the job's features {features}")
        self.features = list(features)
        self.num_embeddings = {f: int(num_embeddings[f]) for f in features}
        for f in self.entities:
            n = self.num_embeddings[f]
            self.size_index[f] = np.zeros(n, dtype=np.int64)
            self.counts[f] = np.zeros(n, dtype=np.int64)
            self.day_counts[f] = np.zeros(n, dtype=np.int64)
            self.trials[f] = []
        if self.budget is not None and (need := self._spent(self._plan({}, check=False))) > self.budget.value:
            raise PlanError(
                f"the budget of {self.budget.value:,} {self.budget.unit} is below ESAPN's starting plan ({need:,}: "
                f"every user and item row at {self.dims[0]}, the other features at {self.other_dim}). Raise the "
                f"budget to at least {need:,} or lower other_dim"
            )
        return self._plan({"method": "esapn", "day_index": None})

    def observe(self, stats: DayStats) -> None:
        """Reward the proposal made two days ago with each row's loss drop over the last day, the first it trained at
        its new size (REINFORCE, the last-loss baseline), then record the day's counts and losses."""
        if not self.features:
            raise PlanError("EsapnSearcher.observe before initial_plan: the searcher does not know the tables yet")
        for f in self.entities:
            n = self.num_embeddings[f]
            for what, table in (("row_counts", stats.row_counts), ("row_losses", stats.row_losses)):
                if f not in table:
                    raise PlanError(f"the day's statistics have no {what} for feature '{f}' (ESAPN needs both)")
            counts = table_rows(stats.row_counts[f], n, f, "row_counts", 0, np.int64)
            losses = table_rows(stats.row_losses[f], n, f, "row_losses", np.nan, np.float64)
            waiting = []
            for trial in self.trials[f]:
                if "before" in trial:
                    self._reinforce(f, trial, losses[trial["rows"]], stats.day_index)
                else:
                    # The day after a proposal is evaluated before any training at the new sizes (growing a row
                    # zero-pads it: the same function), so its losses are the baseline the next day is rewarded on.
                    waiting.append({**trial, "before": losses[trial["rows"]]})
            self.trials[f] = waiting
            self.day_counts[f] = counts - self.counts[f]
            self.counts[f] = counts
        self.day_index = stats.day_index
        self.pending = True

    def propose(self) -> DimensionPlan | None:
        """Sample keep/enlarge for every row seen on the last day (not the fallback row 0, which serves unseen ids);
        under a budget, enlarge the rows most likely to (π(enlarge) descending) that fit. None if no row grows."""
        if not self.pending:
            return None
        self.pending = False
        chosen: dict[str, dict[str, np.ndarray]] = {}
        for f in self.entities:
            rows = np.flatnonzero(self.day_counts[f] > 0)
            rows = rows[rows > 0]
            if rows.size < 2:  # the policies' BatchNorm needs two rows
                continue
            bucket = self.controller.bucket(torch.from_numpy(self.counts[f][rows]))
            size = torch.from_numpy(self.size_index[f][rows])
            probs = self._row_probabilities(f, bucket, size)
            actions = self.controller.sample_probabilities(probs)
            chosen[f] = {
                "rows": rows,
                "bucket": bucket.numpy(),
                "size": size.numpy(),
                "action": actions.numpy(),
                "executed": np.ones(rows.size, dtype=bool),
                "p_enlarge": probs[:, ENLARGE].numpy(),
            }
        self._fit_budget(chosen)
        grew = 0
        for f, t in chosen.items():
            grow = t["rows"][(t["action"] == ENLARGE) & t["executed"]]
            self.size_index[f][grow] += 1
            grew += grow.size
            self.trials[f].append({k: v for k, v in t.items() if k != "p_enlarge"})
        if grew == 0:
            return None
        return self._plan({"method": "esapn", "day_index": self.day_index, "enlarged": grew})

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (saved with `torch.save` in the checkpoint's `searcher.pt`): copies, so a
        later step does not change a saved state."""
        return copy.deepcopy(
            {
                "features": self.features,
                "num_embeddings": self.num_embeddings,
                **{name: getattr(self, name) for name in ("size_index", "counts", "day_counts", "trials")},
                "pending": self.pending,
                "day_index": self.day_index,
                "history": self.history,
                "controller": self.controller.state_dict(),
            }
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = copy.deepcopy(dict(state))
        self.features = list(state["features"])
        self.num_embeddings = dict(state["num_embeddings"])
        for name in ("size_index", "counts", "day_counts", "trials"):
            setattr(self, name, state[name])
        self.pending = bool(state["pending"])
        self.day_index = state["day_index"]
        self.history = list(state["history"])
        self.controller.load_state_dict(state["controller"])

    # -- helpers --

    def _reinforce(self, f: str, trial: Mapping[str, np.ndarray], now: np.ndarray, day_index: int) -> None:
        """One policy step on a proposal's executed actions of the rows evaluated on both days after it:
        R = 1 − ℓ_now, b = 1 − ℓ_before (the loss drop over the day trained at the new size), centred by the mean
        advantage over those rows (less variance). The policy is re-run on the proposal's whole batch, so its
        BatchNorm statistics, and π, are those the actions were sampled from: on the batch's distinct states, the
        loss summed per (state, action), which is the per-row loss and gradient at the cost of a few hundred
        network rows."""
        use = trial["executed"] & np.isfinite(now) & np.isfinite(trial["before"])
        if use.sum() < 2:
            return
        reward = torch.from_numpy(1.0 - now[use]).float()
        baseline = torch.from_numpy(1.0 - trial["before"][use]).float()
        advantage = reward - baseline
        self.controller.policies[f].train()
        actions = torch.from_numpy(trial["action"][use])
        bucket, size = torch.from_numpy(trial["bucket"]), torch.from_numpy(trial["size"])
        loss = self._policy_step(f, bucket, size, torch.from_numpy(use), actions, reward, baseline + advantage.mean())
        enlarged = actions == ENLARGE
        self.history.append(
            {
                "day_index": float(day_index),
                f"rows_{f}": float(use.sum()),
                f"enlarged_{f}": float(enlarged.sum()),
                f"advantage_enlarged_{f}": float(advantage[enlarged].mean()) if enlarged.any() else None,
                f"advantage_kept_{f}": float(advantage[~enlarged].mean()) if (~enlarged).any() else None,
                f"policy_loss_{f}": float(loss),
            }
        )

    def _row_probabilities(self, f: str, bucket: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """π `[n, 2]` of each of the day's rows. The policy runs on the day's distinct states (a few hundred at
        most, BatchNorm statistics over the rows), not on each of its millions of rows; every row still draws its own
        action from its state's probabilities, so the sampled stream is that of a per-row forward."""
        states = self.controller.states(f, bucket, size)
        with torch.no_grad():
            return torch.softmax(self.controller.state_logits(f, states), dim=1)[states.inverse]

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
        """One policy step on the rewarded rows `use` of a proposal's batch (`bucket`, `size`), re-run whole on its
        distinct states; the loss."""
        states = self.controller.states(f, bucket, size)
        logits = self.controller.state_logits(f, states)
        return self.controller.update_states(f, logits, states.inverse[use], actions, reward, baseline)

    def _fit_budget(self, chosen: dict[str, dict[str, np.ndarray]]) -> None:
        """Under a budget, go through the sampled enlargements by π(enlarge), highest first (ties: users first, then
        by row), and carry out each that still fits; the others are not executed (and not rewarded)."""
        if self.budget is None or not chosen:
            return
        names = list(chosen)
        want = [np.flatnonzero(chosen[f]["action"] == ENLARGE) for f in names]
        sizes = [chosen[f]["size"][w] for f, w in zip(names, want, strict=True)]
        cost = np.concatenate([self.dims[s + 1] - self.dims[s] for s in sizes])
        prob = np.concatenate([chosen[f]["p_enlarge"][w] for f, w in zip(names, want, strict=True)])
        owner = np.concatenate([np.full(w.size, k) for k, w in enumerate(want)])
        position = np.concatenate(want)
        room = self.budget.value - self._spent(self._plan({}, check=False))
        order = np.lexsort((position, owner, -prob))
        fits = first_fit(cost[order], room)
        for k, f in enumerate(names):
            rejected = order[~fits & (owner[order] == k)]
            chosen[f]["executed"][position[rejected]] = False

    def _spent(self, plan: DimensionPlan) -> int:
        """What `plan` counts against the budget (its stored or its logical parameters)."""
        assert self.budget is not None
        return plan.parameters if self.budget.unit == "parameters" else plan.logical_parameters

    def _plan(self, provenance: Mapping[str, Any], check: bool = True) -> DimensionPlan:
        rows = {f: self.dims[self.size_index[f]] for f in self.entities}
        return job_plan(
            self.features, self.num_embeddings, rows, self.d_max, self.other_dim, self.budget, provenance, check
        )
