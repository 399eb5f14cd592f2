"""LightGCN (He et al., SIGIR'20) on top of the embedding layer, as the CIESS protocol uses it (methods.md §5.3).

The user–item graph of the training interactions, A = [[0, R], [Rᵀ, 0]], is normalised symmetrically,
Â = D^{-1/2} A D^{-1/2}; the layers propagate E^{k+1} = Â E^k from the ego embeddings E^0 (all users, then all
items, as the embedding layer gives them), and the final embedding is the mean of E^0 … E^K. A user–item score is
the dot product. Training is BPR over (user, positive, negative) triples with L2 decay on the ego embeddings of
the triple (1e-4 in CIESS).

The adjacency is a sparse CSR buffer built once from the training pairs (vectorised); propagation is
`torch.sparse.mm`, so a step costs O(K · nnz · d).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.losses import bpr


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
        torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(values).float(), (n, n)
    ).coalesce()
    return coo.to_sparse_csr()


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
            x = torch.sparse.mm(self.adjacency, x)
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
) -> torch.Tensor:
    """BPR on (user, positive, negative) triples plus L2 decay on the triple's ego embeddings (CIESS's loss).

    The decay term is `decay · ½(‖e_u‖² + ‖e_p‖² + ‖e_n‖²) / batch`, as LightGCN's reference implementation.
    """
    u, p, n = final_users[user], final_items[positive], final_items[negative]
    rank_loss = bpr((u * p).sum(-1), (u * n).sum(-1))
    reg = 0.5 * (ego_users[user].pow(2).sum() + ego_items[positive].pow(2).sum() + ego_items[negative].pow(2).sum())
    return rank_loss + decay * reg / user.numel()
