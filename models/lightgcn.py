"""LightGCN (He et al., SIGIR'20) on top of the embedding layer, as the CIESS protocol uses it (methods.md §5.3).

The user–item graph of the training interactions, A = [[0, R], [Rᵀ, 0]], is normalised symmetrically,
Â = D^{-1/2} A D^{-1/2}; the layers propagate E^{k+1} = Â E^k from the ego embeddings E^0 (all users, then all
items, as the embedding layer gives them), and the final embedding is the mean of E^0 … E^K. A user–item score is
the dot product. Training is BPR over (user, positive, negative) triples with L2 decay on the ego embeddings of
the triple (1e-4 in CIESS).

The adjacency is a sparse CSR buffer built once from the training pairs (vectorised); propagation is
`torch.sparse.mm`, so a step costs O(K · nnz · d). Â is symmetric, so the backward of a layer is the same sparse
product (`_SymmetricSpMM`): torch's generic sparse backward is ~3× slower here. Columns that are zero in every
ego row (the tail beyond the largest row size of a masked or bucketed table) stay zero through propagation, so
`GraphTask.final` propagates only the used width.

`GraphTask` holds one (training graph, held-out set) pair of the CIESS protocol — validation mode (train →
valid) or test mode (train ∪ valid → test) — with vectorised BPR sampling (negatives rejected if they are the
user's training items) and full-ranking per-user evaluation. `train_bpr` is the official CIESS recipe (Adam,
lr 0.03 decayed ×0.9 every 200 batches to a floor of 1e-3, batches of 10,000 triples).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.losses import bpr
from models.metrics import ranking_metrics


def normalized_adjacency(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> torch.Tensor:
    """Â = D^{-1/2} A D^{-1/2} of the bipartite graph of (user, item) pairs, as a sparse CSR tensor [N, N].

    Duplicate pairs count once; nodes without edges keep a zero row.
    """
    if users.shape != items.shape:
        raise ValueError(f"users and items must pair up, got shapes {users.shape} and {items.shape}")
    if users.size and (users.min() < 0 or users.max() >= num_users or items.min() < 0 or items.max() >= num_items):
        raise ValueError("user or item ids out of range [0, num_users) / [0, num_items)")
    n = num_users + num_items
    pairs = np.unique(np.stack([users.astype(np.int64), items.astype(np.int64)], 1), axis=0)
    rows = np.concatenate([pairs[:, 0], pairs[:, 1] + num_users])
    cols = np.concatenate([pairs[:, 1] + num_users, pairs[:, 0]])
    degree = np.bincount(rows, minlength=n).astype(np.float64)
    inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1)), 0.0)
    values = inv_sqrt[rows] * inv_sqrt[cols]
    coo = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(values).float(), (n, n), check_invariants=False
    ).coalesce()
    return coo.to_sparse_csr()


class _SymmetricSpMM(torch.autograd.Function):
    """y = Â x for a symmetric sparse Â; the gradient is Â g (no transpose needed)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adjacency = adjacency  # type: ignore[attr-defined]
        return torch.sparse.mm(adjacency, x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, torch.sparse.mm(ctx.adjacency, grad.contiguous())  # type: ignore[attr-defined]


class LightGCN(nn.Module):
    """Propagates user and item embeddings over the normalised interaction graph.

    Args:
        adjacency: Â from `normalized_adjacency`, [U + I, U + I].
        num_users: U (users come first in the node order).
        layers: K, the propagation depth (3 in CIESS).
    """

    adjacency: torch.Tensor

    def __init__(self, adjacency: torch.Tensor, num_users: int, layers: int = 3) -> None:
        super().__init__()
        if layers < 0:
            raise ValueError(f"layers must be >= 0, got {layers}")
        self.register_buffer("adjacency", adjacency, persistent=False)
        self.num_users, self.layers = num_users, layers

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final user and item embeddings ([U, d], [I, d]) from the ego embeddings."""
        x = torch.cat([users, items])
        total = x
        for _ in range(self.layers):
            x = _SymmetricSpMM.apply(self.adjacency, x)
            total = total + x
        final = total / (self.layers + 1)
        return final[: self.num_users], final[self.num_users :]

    @staticmethod
    def scores(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Full-ranking scores [U, I]."""
        return users @ items.T


def lightgcn_bpr_loss(
    final_users: torch.Tensor,
    final_items: torch.Tensor,
    ego_users: torch.Tensor,
    ego_items: torch.Tensor,
    user: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    decay: float = 1e-4,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """BPR on (user, positive, negative) triples plus L2 decay on the triple's ego embeddings (CIESS's loss).

    Per triple: `softplus(ŷ_un − ŷ_up) + decay · ½(‖e_u‖² + ‖e_p‖² + ‖e_n‖²)`; `mean` (the batch loss, as
    LightGCN's reference implementation) or `none` (`[B]`, each triple's share: ESAPN's per-sample loss).
    """
    u, p, n = final_users[user], final_items[positive], final_items[negative]
    if reduction == "mean":
        rank_loss = bpr((u * p).sum(-1), (u * n).sum(-1))
        reg = 0.5 * (ego_users[user].pow(2).sum() + ego_items[positive].pow(2).sum() + ego_items[negative].pow(2).sum())
        return rank_loss + decay * reg / user.numel()
    rank = F.softplus((u * n).sum(-1) - (u * p).sum(-1))
    reg_each = 0.5 * (
        ego_users[user].pow(2).sum(-1) + ego_items[positive].pow(2).sum(-1) + ego_items[negative].pow(2).sum(-1)
    )
    return rank + decay * reg_each


@dataclass(frozen=True)
class BPRRecipe:
    """How a LightGCN is trained (CIESS's official LightGCN recipe by default, methods.md §5.2 and §10).

    Args:
        steps: BPR batches.
        batch: (user, positive, negative) triples per batch.
        lr: Adam's initial learning rate.
        decay_every: batches between learning-rate decays.
        gamma: the decay factor.
        min_lr: the learning-rate floor.
        decay: L2 decay on the batch's ego embeddings.
    """

    steps: int = 2000
    batch: int = 10_000
    lr: float = 0.03
    decay_every: int = 200
    gamma: float = 0.9
    min_lr: float = 1e-3
    decay: float = 1e-4

    def lr_at(self, step: int) -> float:
        return max(self.min_lr, self.lr * self.gamma ** (step // self.decay_every))


class GraphTask:
    """A training graph and its held-out interactions, ready for BPR training and full-ranking evaluation.

    Args:
        train: (users, items) training pairs, ids in [0, num_users) × [0, num_items).
        held_out: (users, items) pairs to evaluate on.
        num_users: U.
        num_items: I.
        layers: LightGCN's depth.
    """

    def __init__(
        self,
        train: tuple[np.ndarray, np.ndarray],
        held_out: tuple[np.ndarray, np.ndarray],
        num_users: int,
        num_items: int,
        layers: int = 3,
    ) -> None:
        self.num_users, self.num_items = num_users, num_items
        users, items = (np.asarray(a, dtype=np.int64) for a in train)
        self.model = LightGCN(normalized_adjacency(users, items, num_users, num_items), num_users, layers)
        self.train_users, self.train_items = torch.from_numpy(users), torch.from_numpy(items)
        self._train_keys = torch.from_numpy(np.unique(users * num_items + items))
        # A user who trained on every item has no negative: their pairs cannot form a triple.
        full = np.bincount(self._train_keys.numpy() // num_items, minlength=num_users) >= num_items
        self._samplable = torch.from_numpy(np.flatnonzero(~full[users]))
        if self._samplable.numel() == 0:
            raise ValueError("no training pair can form a BPR triple: every user trained on every item")
        self.train_mask = torch.zeros(num_users, num_items, dtype=torch.bool)
        self.train_mask[self.train_users, self.train_items] = True
        hu, hi = (torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in held_out)
        self.held_out = torch.zeros(num_users, num_items, dtype=torch.bool)
        self.held_out[hu, hi] = True
        self.item_users = (items, users)  # who interacted with each item in training (CIESS's item quality)

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`batch` (user, positive, negative) triples: positives uniform over training pairs, negatives uniform
        over items the user has not trained on (rejected and redrawn, vectorised). Users who trained on every item
        are skipped."""
        pick = self._samplable[torch.randint(0, self._samplable.numel(), (batch,), generator=generator)]
        users, positives = self.train_users[pick], self.train_items[pick]
        negatives = torch.randint(0, self.num_items, (batch,), generator=generator)
        while True:
            keys = users * self.num_items + negatives
            hit = torch.searchsorted(self._train_keys, keys).clamp(max=self._train_keys.numel() - 1)
            bad = self._train_keys[hit] == keys
            if not bool(bad.any()):
                break
            negatives[bad] = torch.randint(0, self.num_items, (int(bad.sum()),), generator=generator)
        return users, positives, negatives

    def final(self, ego: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final user and item embeddings from ego embeddings [U + I, d], propagating only the first `width`
        columns (the others must be zero in every row)."""
        if width is not None and width < ego.shape[1]:
            ego = ego[:, :width]
        return self.model(ego[: self.num_users], ego[self.num_users :])

    def loss(
        self,
        ego: torch.Tensor,
        triples: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        decay: float,
        width: int | None = None,
    ) -> torch.Tensor:
        """LightGCN's BPR loss of a batch of triples (see `lightgcn_bpr_loss`)."""
        if width is not None and width < ego.shape[1]:
            ego = ego[:, :width]
        users, items = self.final(ego)
        user, positive, negative = triples
        return lightgcn_bpr_loss(
            users, items, ego[: self.num_users], ego[self.num_users :], user, positive, negative, decay=decay
        )

    @torch.no_grad()
    def evaluate(
        self, ego: torch.Tensor, ks: tuple[int, ...] = (5, 20), width: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-user full-ranking Recall@k and NDCG@k (nan for users without held-out items), training items
        masked."""
        users, items = self.final(ego, width)
        return ranking_metrics(LightGCN.scores(users, items), self.held_out, self.train_mask, ks, reduction="none")


def train_bpr(
    task: GraphTask,
    ego: Callable[[], torch.Tensor],
    parameters: Iterable[nn.Parameter],
    recipe: BPRRecipe,
    generator: torch.Generator,
    width: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train with BPR under `recipe`; `ego()` gives the ego embeddings [U + I, d] (a masked table, a bucketed
    EBC, ...). Returns the loss of every batch."""
    optimizer = torch.optim.Adam(list(parameters), lr=recipe.lr)
    losses = []
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(step)
        loss = task.loss(ego(), task.sample(recipe.batch, generator), recipe.decay, width)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
    return losses
