"""Multi-field CTR models on pooled embeddings of searched dims: DLRM and DeepFM.

Both take the embedding layer's ``{feature: [B, dim_f]}`` dict (one entry per sparse field, dims may differ
per field) and the ``[B, D]`` dense features, and return ``[B]`` (one logit or value) or ``[B, C]`` (class
logits when built with ``num_outputs=C``).

Dims that differ. DLRM's dot-product interaction and the FM term need every field vector in one width ``E``
(``embedding_dim`` of the config), but a dimension search gives each field its own dim. Each field whose dim
differs from ``E`` therefore gets a bias-free ``Linear(dim_f, E)`` (``nn.Identity`` when equal), initialised
to ``eye(E, dim_f)``, i.e. zero-padding (or truncation) at step 0, learned from there. A learned map rather
than fixed zero-padding lets a small field interact with every coordinate of the others. These projections
are dense parameters (the dense optimiser trains them), not embedding rows; ``projection_parameters()``
counts them so a report can show them beside the embedding budget.

Inits: MLPs and output layers keep PyTorch's ``nn.Linear`` default; all deterministic under
``torch.manual_seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from models.errors import ModelConfigError
from models.layers import (
    check_dense,
    check_dropout,
    check_feature_dims,
    check_positive,
    mlp,
    projection,
    select_embeddings,
)

logger = logging.getLogger(__name__)


def _check_io(model: str, num_dense: int, num_outputs: int) -> None:
    if num_dense < 0:
        raise ModelConfigError(f"{model}: num_dense must be >= 0, got {num_dense}")
    if num_outputs < 1:
        raise ModelConfigError(f"{model}: num_outputs must be >= 1 (C for multiclass), got {num_outputs}")


def _squeeze_single(logits: torch.Tensor) -> torch.Tensor:
    return logits.squeeze(1) if logits.shape[1] == 1 else logits


@dataclass(frozen=True)
class DLRMConfig:
    """DLRM.

    Args:
        embedding_dim: ``E``, the width of the interaction: the bottom MLP's output and every projected field.
        bottom_mlp: hidden widths of the bottom MLP on the dense features, before its final ``E`` layer (ReLU
            after every layer, the last included, as in TorchRec's DLRM).
        top_mlp: hidden widths of the top MLP (ReLU after each), followed by a linear output layer.
        dropout: dropout after each hidden layer of the top MLP.
    """

    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64,)
    top_mlp: tuple[int, ...] = (64, 32)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive("DLRMConfig", "embedding_dim", [self.embedding_dim])
        check_positive("DLRMConfig", "bottom_mlp", self.bottom_mlp)
        check_positive("DLRMConfig", "top_mlp", self.top_mlp)
        check_dropout("DLRMConfig", self.dropout)


@dataclass(frozen=True)
class DeepFMConfig:
    """DeepFM.

    Args:
        embedding_dim: ``E``, the width of the FM latent vectors (each field is projected to it).
        deep_mlp: hidden widths of the deep MLP (ReLU after each) over the concatenated raw field
            embeddings, followed by a linear output layer.
        dropout: dropout after each hidden layer of the deep MLP.
    """

    embedding_dim: int = 16
    deep_mlp: tuple[int, ...] = (64, 32)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive("DeepFMConfig", "embedding_dim", [self.embedding_dim])
        if not self.deep_mlp:
            raise ModelConfigError("DeepFMConfig.deep_mlp is empty; give the deep part at least one layer")
        check_positive("DeepFMConfig", "deep_mlp", self.deep_mlp)
        check_dropout("DeepFMConfig", self.dropout)


class _FieldModel(nn.Module):
    """Shared parts: feature dims, per-field projections to ``E`` and input checks."""

    def __init__(self, name: str, feature_dims: Mapping[str, int], embedding_dim: int) -> None:
        super().__init__()
        self._name = name
        self.feature_dims = check_feature_dims(name, feature_dims)
        self.features: tuple[str, ...] = tuple(self.feature_dims)
        self.projections = nn.ModuleDict({f: projection(d, embedding_dim) for f, d in self.feature_dims.items()})

    def projection_parameters(self) -> int:
        """The number of parameters of the per-field projections (0 where a field already has dim ``E``)."""
        return sum(p.numel() for p in self.projections.parameters())

    def _fields(self, embeddings: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return select_embeddings(self._name, embeddings, self.feature_dims)

    def _projected(self, fields: list[torch.Tensor]) -> torch.Tensor:
        """``[B, F, E]``: every field projected to ``E``, in feature order."""
        return torch.stack([self.projections[f](x) for f, x in zip(self.features, fields, strict=True)], dim=1)


class DLRM(_FieldModel):
    """DLRM: bottom MLP on dense → ``E``; fields projected to ``E``; pairwise dots; top MLP → output.

    The interaction takes the ``n = F (+1 with dense features)`` vectors
    ``t = [x_dense, p_1(e_1), ..., p_F(e_F)]``, all pairwise dot products ``<t_i, t_j>`` for ``i < j`` (the
    strict upper triangle, ``n(n-1)/2`` values), and concatenates them with ``x_dense``; the top MLP maps
    that to the output. With no dense features there is no bottom MLP and the top MLP sees only the field
    interactions.

    Args:
        feature_dims: each sparse field's pooled output dim, in the model's feature order.
        num_dense: the number of dense features (0 allowed).
        num_outputs: 1 for a binary logit or a regression value (output ``[B]``), C for multiclass
            (``[B, C]``).
        config: the model's options.

    Raises:
        ModelConfigError: on bad dims, or fewer than two vectors to interact.
    """

    _rows: torch.Tensor
    _cols: torch.Tensor

    def __init__(
        self,
        feature_dims: Mapping[str, int],
        num_dense: int,
        num_outputs: int = 1,
        config: DLRMConfig | None = None,
    ) -> None:
        config = config or DLRMConfig()
        super().__init__("DLRM", feature_dims, config.embedding_dim)
        self.config = config
        _check_io("DLRM", num_dense, num_outputs)
        self.num_dense = num_dense
        self.num_outputs = num_outputs
        num_vectors = len(self.features) + (1 if num_dense > 0 else 0)
        if num_vectors < 2:
            raise ModelConfigError(
                f"DLRM: needs at least two vectors to interact, got {len(self.features)} sparse field(s) and "
                f"{num_dense} dense features; add a field or dense features, or use MatrixFactorization"
            )
        embedding_dim = self.config.embedding_dim
        self.bottom = (
            mlp(num_dense, (*self.config.bottom_mlp, embedding_dim), activate_last=True) if num_dense else None
        )
        rows, cols = torch.triu_indices(num_vectors, num_vectors, offset=1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        top_in = len(rows) + (embedding_dim if num_dense else 0)
        self.top = nn.Sequential(
            mlp(top_in, self.config.top_mlp, activate_last=True, dropout=self.config.dropout),
            nn.Linear(self.config.top_mlp[-1] if self.config.top_mlp else top_in, num_outputs),
        )

    def forward(self, embeddings: Mapping[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """Score each row.

        Args:
            embeddings: ``{feature: [B, dim_f]}`` for every field of ``feature_dims``.
            dense: ``[B, num_dense]`` dense features.

        Returns:
            ``[B]`` (``num_outputs == 1``) or ``[B, num_outputs]``.

        Raises:
            ModelConfigError: if an input is missing or has the wrong shape.
        """
        fields = self._fields(embeddings)
        check_dense("DLRM", dense, self.num_dense, fields[0].shape[0])
        vectors = self._projected(fields)
        if self.bottom is None:
            return _squeeze_single(self.top(self._interact(vectors)))
        dense_vector = self.bottom(dense)
        vectors = torch.cat([dense_vector.unsqueeze(1), vectors], dim=1)
        return _squeeze_single(self.top(torch.cat([dense_vector, self._interact(vectors)], dim=1)))

    def _interact(self, vectors: torch.Tensor) -> torch.Tensor:
        """``[B, n, E]`` → ``[B, n(n-1)/2]``: the dot products of every pair ``i < j``."""
        return torch.bmm(vectors, vectors.transpose(1, 2))[:, self._rows, self._cols]


class DeepFM(_FieldModel):
    """DeepFM: ``output = linear(dense) + FM(projected fields) + deep(cat(raw fields))``.

    * First order: a global bias (zero-initialised) plus a bias-free ``Linear(num_dense, C)`` over the dense
      features (left out when there are none). The classic per-id first-order weights would need 1-dim
      tables from the embedding layer and are left out.
    * Second order (FM): with ``v_f`` the fields projected to ``E``,
      ``0.5 * ((Σ_f v_f)² - Σ_f v_f²)`` per coordinate (``[B, E]``, ``= Σ_{f<g} v_f ⊙ v_g``), summed over
      the coordinates for one output; for C outputs, mapped by a bias-free ``Linear(E, C)`` instead (a
      constant added to every class would not change a softmax).
    * Deep: an MLP over the concatenated raw (unprojected) field embeddings, so each field keeps its searched
      width there.

    Args:
        feature_dims: each sparse field's pooled output dim, in the model's feature order.
        num_dense: the number of dense features (0 allowed).
        num_outputs: 1 for a binary logit or a regression value (output ``[B]``), C for multiclass
            (``[B, C]``).
        config: the model's options.

    Raises:
        ModelConfigError: on bad dims.
    """

    def __init__(
        self,
        feature_dims: Mapping[str, int],
        num_dense: int,
        num_outputs: int = 1,
        config: DeepFMConfig | None = None,
    ) -> None:
        config = config or DeepFMConfig()
        super().__init__("DeepFM", feature_dims, config.embedding_dim)
        self.config = config
        _check_io("DeepFM", num_dense, num_outputs)
        self.num_dense = num_dense
        self.num_outputs = num_outputs
        self.bias = nn.Parameter(torch.zeros(num_outputs))
        self.first_order = nn.Linear(num_dense, num_outputs, bias=False) if num_dense else None
        self.fm_output = nn.Linear(self.config.embedding_dim, num_outputs, bias=False) if num_outputs > 1 else None
        deep_in = sum(self.feature_dims.values())
        self.deep = nn.Sequential(
            mlp(deep_in, self.config.deep_mlp, activate_last=True, dropout=self.config.dropout),
            nn.Linear(self.config.deep_mlp[-1], num_outputs),
        )

    def forward(self, embeddings: Mapping[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """Score each row.

        Args:
            embeddings: ``{feature: [B, dim_f]}`` for every field of ``feature_dims``.
            dense: ``[B, num_dense]`` dense features.

        Returns:
            ``[B]`` (``num_outputs == 1``) or ``[B, num_outputs]``.

        Raises:
            ModelConfigError: if an input is missing or has the wrong shape.
        """
        fields = self._fields(embeddings)
        check_dense("DeepFM", dense, self.num_dense, fields[0].shape[0])
        vectors = self._projected(fields)
        summed = vectors.sum(dim=1)
        pairwise = 0.5 * (summed * summed - (vectors * vectors).sum(dim=1))
        second = pairwise.sum(dim=1, keepdim=True) if self.fm_output is None else self.fm_output(pairwise)
        deep = self.deep(torch.cat(fields, dim=1))
        logits = self.bias + second + deep
        if self.first_order is not None:
            logits = logits + self.first_order(dense)
        return _squeeze_single(logits)
