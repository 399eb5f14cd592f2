"""User–item models: matrix factorisation and NCF (NeuMF), on pooled embeddings of searched dims.

Both take the embedding layer's ``{feature: [B, dim]}`` dict and return one score per row (``[B]``, a logit
for ``binary``/``bpr``, a value for ``regression``), and can score every (user, item) pair for full-ranking
evaluation with ``score_all``. The dense features are accepted for a uniform signature and ignored.

Dims that differ. A dimension search gives users and items their own dims (e.g. user 32, item 16), and a
dot product needs equal widths. Each side whose dim differs from the common dim ``c`` gets a bias-free
``Linear(d, c)`` initialised to ``eye(c, d)`` (zero-padding at step 0). With the default ``c = max(d_u,
d_i)`` only the smaller side is projected: the score is then the bilinear form ``u^T W v``, and projecting
both sides (``u^T A^T B v``) would add parameters without adding expressiveness. These projections are dense
parameters (trained by the dense optimiser), not embedding rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from models.errors import ModelConfigError
from models.layers import (
    check_dropout,
    check_feature_dims,
    check_positive,
    mlp,
    projection,
    select_embeddings,
)

logger = logging.getLogger(__name__)


def _check_user_item(model: str, user: str, item: str, dims: Mapping[str, int]) -> None:
    if user == item:
        raise ModelConfigError(f"{model}: user_feature and item_feature are both '{user}'; name two features")
    if missing := [f for f in (user, item) if f not in dims]:
        raise ModelConfigError(
            f"{model}: feature_dims has no {missing} (got {list(dims)}); set user_feature/item_feature to "
            "the dataset's user and item fields"
        )


@dataclass(frozen=True)
class MFConfig:
    """Matrix factorisation.

    Args:
        user_feature: the sparse feature holding the user id.
        item_feature: the sparse feature holding the item id.
        use_bias: add a global bias and a user and an item bias. The embedding layer gives no per-id scalar,
            so each side's bias is a bias-free ``Linear(d, 1)`` of its embedding (zero-initialised, so the
            model starts as a pure dot product): a per-id bias stored as a direction of the embedding.
        common_dim: the width of the dot product when the user and item dims differ; None means the larger
            of the two.
    """

    user_feature: str = "user"
    item_feature: str = "item"
    use_bias: bool = True
    common_dim: int | None = None

    def __post_init__(self) -> None:
        if self.common_dim is not None:
            check_positive("MFConfig", "common_dim", [self.common_dim])


@dataclass(frozen=True)
class NCFConfig:
    """NCF / NeuMF: a GMF branch and an MLP tower, fused by a final linear layer into one logit.

    Args:
        user_feature: the sparse feature holding the user id.
        item_feature: the sparse feature holding the item id.
        mlp: widths of the MLP tower's layers (ReLU after each), applied to ``cat(user, item)``.
        gmf_dim: the width of the GMF product when the user and item dims differ; None means the larger.
        dropout: dropout after each MLP layer.
    """

    user_feature: str = "user"
    item_feature: str = "item"
    mlp: tuple[int, ...] = (64, 32)
    gmf_dim: int | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not self.mlp:
            raise ModelConfigError("NCFConfig.mlp is empty; give the tower at least one layer, e.g. (64, 32)")
        check_positive("NCFConfig", "mlp", self.mlp)
        if self.gmf_dim is not None:
            check_positive("NCFConfig", "gmf_dim", [self.gmf_dim])
        check_dropout("NCFConfig", self.dropout)


class MatrixFactorization(nn.Module):
    """``score = p_u(u) · p_i(v) [+ b + w_u·u + w_i·v]`` with ``p_*`` the projections to the common dim.

    Args:
        feature_dims: each sparse feature's pooled output dim; must hold the user and item features.
        config: the model's options.

    Raises:
        ModelConfigError: if the user or item feature is missing or a dim is not positive.

    Example::

        model = MatrixFactorization({"user": 32, "item": 16})
        logits = model({"user": u, "item": v}, dense)  # [B]
    """

    def __init__(self, feature_dims: Mapping[str, int], config: MFConfig | None = None) -> None:
        super().__init__()
        self.config = config or MFConfig()
        dims = check_feature_dims("MatrixFactorization", feature_dims)
        user, item = self.config.user_feature, self.config.item_feature
        _check_user_item("MatrixFactorization", user, item, dims)
        self.feature_dims = {user: dims[user], item: dims[item]}
        self.features: tuple[str, ...] = (user, item)
        common = self.config.common_dim or max(dims[user], dims[item])
        self.user_projection = projection(dims[user], common)
        self.item_projection = projection(dims[item], common)
        self.user_bias: nn.Linear | None = None
        self.item_bias: nn.Linear | None = None
        self.global_bias: nn.Parameter | None = None
        if self.config.use_bias:
            self.user_bias = nn.Linear(dims[user], 1, bias=False)
            self.item_bias = nn.Linear(dims[item], 1, bias=False)
            nn.init.zeros_(self.user_bias.weight)
            nn.init.zeros_(self.item_bias.weight)
            self.global_bias = nn.Parameter(torch.zeros(()))

    def forward(self, embeddings: Mapping[str, torch.Tensor], dense: torch.Tensor | None = None) -> torch.Tensor:
        """Score each row's (user, item) pair.

        Args:
            embeddings: ``{feature: [B, dim]}``; the user and item entries are used.
            dense: ``[B, D]`` dense features, ignored.

        Returns:
            ``[B]`` scores (logits for a binary task).

        Raises:
            ModelConfigError: if an embedding is missing or has the wrong shape.
        """
        user, item = select_embeddings("MatrixFactorization", embeddings, self.feature_dims)
        score = (self.user_projection(user) * self.item_projection(item)).sum(dim=1)
        return score + self._user_bias(user) + self._item_bias(item)

    def _user_bias(self, user: torch.Tensor) -> torch.Tensor:
        """The user bias plus the global bias (0 without biases)."""
        if self.user_bias is None or self.global_bias is None:
            return user.new_zeros(user.shape[0])
        return self.user_bias(user).squeeze(1) + self.global_bias

    def _item_bias(self, item: torch.Tensor) -> torch.Tensor:
        if self.item_bias is None:
            return item.new_zeros(item.shape[0])
        return self.item_bias(item).squeeze(1)

    def score_all(self, user_embeddings: torch.Tensor, item_embeddings: torch.Tensor) -> torch.Tensor:
        """Score every (user, item) pair, for full-ranking evaluation.

        Args:
            user_embeddings: ``[U, d_user]`` pooled user embeddings.
            item_embeddings: ``[I, d_item]`` pooled item embeddings.

        Returns:
            ``[U, I]`` scores, equal to ``forward`` on each pair.
        """
        users = self.user_projection(user_embeddings)
        items = self.item_projection(item_embeddings)
        return users @ items.T + self._user_bias(user_embeddings)[:, None] + self._item_bias(item_embeddings)[None, :]


class NCF(nn.Module):
    """NeuMF: ``logit = w · cat(p_u(u) ⊙ p_i(v), MLP(cat(u, v))) + b``.

    The GMF branch and the MLP tower share the one pooled embedding per feature that the embedding layer
    gives (the original NeuMF keeps separate GMF and MLP tables; with this model, declare two features over
    the same id column to get them). The tower sees the raw, unprojected embeddings, so it needs no common
    dim. The output layer keeps PyTorch's default init.

    Args:
        feature_dims: each sparse feature's pooled output dim; must hold the user and item features.
        config: the model's options.

    Raises:
        ModelConfigError: if the user or item feature is missing or a dim is not positive.
    """

    def __init__(self, feature_dims: Mapping[str, int], config: NCFConfig | None = None) -> None:
        super().__init__()
        self.config = config or NCFConfig()
        dims = check_feature_dims("NCF", feature_dims)
        user, item = self.config.user_feature, self.config.item_feature
        _check_user_item("NCF", user, item, dims)
        self.feature_dims = {user: dims[user], item: dims[item]}
        self.features: tuple[str, ...] = (user, item)
        gmf_dim = self.config.gmf_dim or max(dims[user], dims[item])
        self.user_projection = projection(dims[user], gmf_dim)
        self.item_projection = projection(dims[item], gmf_dim)
        self.tower = mlp(dims[user] + dims[item], self.config.mlp, activate_last=True, dropout=self.config.dropout)
        self.output = nn.Linear(gmf_dim + self.config.mlp[-1], 1)

    def _score(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        gmf = self.user_projection(user) * self.item_projection(item)
        deep = self.tower(torch.cat([user, item], dim=-1))
        return self.output(torch.cat([gmf, deep], dim=-1)).squeeze(-1)

    def forward(self, embeddings: Mapping[str, torch.Tensor], dense: torch.Tensor | None = None) -> torch.Tensor:
        """Score each row's (user, item) pair.

        Args:
            embeddings: ``{feature: [B, dim]}``; the user and item entries are used.
            dense: ``[B, D]`` dense features, ignored.

        Returns:
            ``[B]`` logits.

        Raises:
            ModelConfigError: if an embedding is missing or has the wrong shape.
        """
        user, item = select_embeddings("NCF", embeddings, self.feature_dims)
        return self._score(user, item)

    def score_all(
        self, user_embeddings: torch.Tensor, item_embeddings: torch.Tensor, chunk_users: int = 256
    ) -> torch.Tensor:
        """Score every (user, item) pair, ``chunk_users`` users at a time to bound memory.

        Args:
            user_embeddings: ``[U, d_user]`` pooled user embeddings.
            item_embeddings: ``[I, d_item]`` pooled item embeddings.
            chunk_users: users per chunk (each chunk builds ``chunk_users × I`` pairs).

        Returns:
            ``[U, I]`` logits, equal to ``forward`` on each pair.

        Raises:
            ModelConfigError: if ``chunk_users`` is not positive.
        """
        if chunk_users <= 0:
            raise ModelConfigError(f"chunk_users must be positive, got {chunk_users}")
        num_items = item_embeddings.shape[0]
        chunks = []
        for users in user_embeddings.split(chunk_users):
            pairs_user = users[:, None, :].expand(-1, num_items, -1)
            pairs_item = item_embeddings[None, :, :].expand(users.shape[0], -1, -1)
            chunks.append(self._score(pairs_user, pairs_item))
        return torch.cat(chunks, dim=0)
