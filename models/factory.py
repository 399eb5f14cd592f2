"""``build_model``: the dense model of a job, by name, from the embedding output dims and the task."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Literal

from torch import nn

from models.dlrm import DLRM, DeepFM, DeepFMConfig, DLRMConfig
from models.errors import ModelConfigError
from models.losses import LOSSES
from models.mf import NCF, MatrixFactorization, MFConfig, NCFConfig

logger = logging.getLogger(__name__)

ModelName = Literal["mf", "ncf", "dlrm", "deepfm"]
_CONFIGS: dict[str, type] = {"mf": MFConfig, "ncf": NCFConfig, "dlrm": DLRMConfig, "deepfm": DeepFMConfig}


def _config(name: str, kwargs: dict[str, Any]) -> Any:
    config_cls = _CONFIGS[name]
    valid = [f.name for f in dataclasses.fields(config_cls)]
    if unknown := sorted(set(kwargs) - set(valid)):
        raise ModelConfigError(f"model '{name}' got unknown options {unknown}; {config_cls.__name__} takes {valid}")
    # YAML gives lists where the configs hold tuples (layer widths).
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})


def _num_outputs(name: str, task: str, num_classes: int | None) -> int:
    if task not in LOSSES:
        raise ModelConfigError(f"unknown task '{task}', expected one of {list(LOSSES)}")
    if task == "multiclass":
        if num_classes is None or num_classes < 2:
            raise ModelConfigError(f"task 'multiclass' needs num_classes >= 2, got {num_classes}")
        if name in ("mf", "ncf"):
            raise ModelConfigError(
                f"model '{name}' scores (user, item) pairs and has no multiclass output; use 'dlrm' or "
                "'deepfm' for a multiclass task"
            )
        return num_classes
    if num_classes is not None:
        raise ModelConfigError(
            f"num_classes={num_classes} is only meaningful for task 'multiclass', got task '{task}'; leave it None"
        )
    return 1


def build_model(
    name: ModelName,
    feature_dims: Mapping[str, int],
    num_dense: int,
    task: str,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a dense model on top of the embedding layer.

    Every model is called as ``model(embeddings: dict[str, Tensor], dense: Tensor)`` and returns ``[B]``
    (``[B, num_classes]`` for multiclass); its ``features`` attribute names the sparse features it reads, in
    order.

    Args:
        name: ``mf`` (MatrixFactorization), ``ncf`` (NCF), ``dlrm`` (DLRM) or ``deepfm`` (DeepFM).
        feature_dims: each sparse feature's pooled output dim. ``mf``/``ncf`` read the user and item features
            only; ``dlrm``/``deepfm`` read every feature, in this mapping's order.
        num_dense: the number of dense features (ignored by ``mf``/``ncf``).
        task: ``binary``, ``regression``, ``multiclass`` or ``bpr`` (see ``models.losses``).
        num_classes: the number of classes of a ``multiclass`` task; None otherwise.
        **kwargs: options of the model's config dataclass (``MFConfig``, ``NCFConfig``, ``DLRMConfig``,
            ``DeepFMConfig``), e.g. ``user_feature="uid"`` or ``top_mlp=(128, 64)``.

    Returns:
        The model, its parameters initialised from the current torch RNG state.

    Raises:
        ModelConfigError: on an unknown name, task or option, a missing user/item feature, or a task the model
            cannot serve.
    """
    if name not in _CONFIGS:
        raise ModelConfigError(f"unknown model '{name}', expected one of {list(_CONFIGS)}")
    num_outputs = _num_outputs(name, task, num_classes)
    config = _config(name, kwargs)
    if name == "mf":
        return MatrixFactorization(feature_dims, config)
    if name == "ncf":
        return NCF(feature_dims, config)
    if name == "dlrm":
        return DLRM(feature_dims, num_dense, num_outputs, config)
    return DeepFM(feature_dims, num_dense, num_outputs, config)
