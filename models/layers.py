"""Building blocks shared by the dense models: MLPs, per-feature projections and input checks.

Initialisation (all deterministic under ``torch.manual_seed``): ``nn.Linear`` layers of the MLPs keep
PyTorch's default (Kaiming-uniform weights, uniform biases in ±1/sqrt(fan_in)). Projections between
embedding dims are initialised to ``torch.eye(out_dim, in_dim)``: at step 0 a smaller embedding is
zero-padded (a bigger one truncated), which is the parameter-free projection of DESIGN.md decision 6, and
training moves on from there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from models.errors import ModelConfigError

logger = logging.getLogger(__name__)


def mlp(in_dim: int, sizes: Sequence[int], *, activate_last: bool, dropout: float = 0.0) -> nn.Sequential:
    """A stack of ``Linear`` layers with ReLU (and dropout) between them.

    Args:
        in_dim: input width.
        sizes: output width of each layer, in order.
        activate_last: whether the last layer is followed by ReLU (and dropout) too.
        dropout: dropout probability after each activation; 0 adds no dropout layer.

    Returns:
        The ``nn.Sequential``; empty (the identity) when ``sizes`` is empty.
    """
    layers: list[nn.Module] = []
    width = in_dim
    for i, size in enumerate(sizes):
        layers.append(nn.Linear(width, size))
        if i < len(sizes) - 1 or activate_last:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        width = size
    return nn.Sequential(*layers)


def projection(in_dim: int, out_dim: int) -> nn.Module:
    """A bias-free linear map between embedding dims, initialised to the identity-padding map.

    Args:
        in_dim: the feature's embedding dim.
        out_dim: the common dim.

    Returns:
        ``nn.Identity`` when the dims are equal, else ``nn.Linear(in_dim, out_dim, bias=False)`` with weight
        ``torch.eye(out_dim, in_dim)``.
    """
    if in_dim == out_dim:
        return nn.Identity()
    linear = nn.Linear(in_dim, out_dim, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(out_dim, in_dim))
    return linear


def check_positive(owner: str, name: str, values: Sequence[int]) -> None:
    """Raise if any layer width is not a positive int.

    Args:
        owner: the config class, for the message.
        name: the field name, for the message.
        values: the widths.

    Raises:
        ModelConfigError: quoting the bad widths.
    """
    if bad := [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v <= 0]:
        raise ModelConfigError(f"{owner}.{name} must hold positive ints, got {list(values)} (bad: {bad})")


def check_dropout(owner: str, dropout: float) -> None:
    """Raise unless ``0 <= dropout < 1``.

    Args:
        owner: the config class, for the message.
        dropout: the probability.

    Raises:
        ModelConfigError: quoting the bad value.
    """
    if not 0.0 <= dropout < 1.0:
        raise ModelConfigError(f"{owner}.dropout must be in [0, 1), got {dropout}")


def check_feature_dims(model: str, feature_dims: Mapping[str, int]) -> dict[str, int]:
    """Validate a ``{feature: output dim}`` mapping and copy it (keeping its order).

    Args:
        model: the model name, for the message.
        feature_dims: each sparse feature's pooled embedding dim, in the model's feature order.

    Returns:
        A plain dict copy.

    Raises:
        ModelConfigError: if it is empty or a dim is not a positive int.
    """
    if not feature_dims:
        raise ModelConfigError(f"{model}: feature_dims is empty; pass each sparse feature's output dim")
    if bad := {f: d for f, d in feature_dims.items() if not isinstance(d, int) or isinstance(d, bool) or d <= 0}:
        raise ModelConfigError(
            f"{model}: embedding output dims must be positive ints, got {bad}; take them from the "
            "DimensionPlan's output dims"
        )
    return dict(feature_dims)


def select_embeddings(
    model: str, embeddings: Mapping[str, torch.Tensor], feature_dims: Mapping[str, int]
) -> list[torch.Tensor]:
    """The pooled embeddings of ``feature_dims``' features, in its order, after checking their shapes.

    Args:
        model: the model name, for the message.
        embeddings: ``{feature: [B, dim]}`` from the embedding layer.
        feature_dims: the expected features and dims.

    Returns:
        One ``[B, dim]`` tensor per feature.

    Raises:
        ModelConfigError: if a feature is missing or a tensor has the wrong shape.
    """
    if missing := [f for f in feature_dims if f not in embeddings]:
        raise ModelConfigError(
            f"{model}: no pooled embedding for features {missing} (got {sorted(embeddings)}); regroup the "
            "embedding layer's output by the model's feature order"
        )
    out = []
    for feature, dim in feature_dims.items():
        tensor = embeddings[feature]
        if tensor.dim() != 2 or tensor.shape[1] != dim:
            raise ModelConfigError(
                f"{model}: the pooled embedding of '{feature}' has shape {tuple(tensor.shape)}, expected "
                f"[B, {dim}]; build the model from the same output dims as the embedding tables"
            )
        out.append(tensor)
    return out


def check_dense(model: str, dense: torch.Tensor, num_dense: int, batch_size: int) -> None:
    """Raise unless ``dense`` is ``[batch_size, num_dense]``.

    Args:
        model: the model name, for the message.
        dense: the dense features.
        num_dense: the expected width.
        batch_size: the batch size of the embeddings.

    Raises:
        ModelConfigError: quoting the shapes.
    """
    if dense.dim() != 2 or dense.shape[0] != batch_size or dense.shape[1] != num_dense:
        raise ModelConfigError(
            f"{model}: dense features have shape {tuple(dense.shape)}, expected [{batch_size}, {num_dense}]; "
            "build the model with the dataset's number of dense columns"
        )
