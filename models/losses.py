"""Task losses of the dense models.

Every loss takes two tensors and returns a scalar mean over the batch:

* ``bce(logits [B], labels [B])``: binary cross-entropy on logits (``binary`` task).
* ``mse(predictions [B], targets [B])``: mean squared error (``regression`` task).
* ``cross_entropy(logits [B, C], labels [B])``: softmax cross-entropy, ``labels`` hold class ids (float32 as
  they come in a ``Batch`` is fine, they are cast to int64) (``multiclass`` task).
* ``bpr(positive [B], negative [B])``: Bayesian personalised ranking, ``mean(-log sigmoid(pos - neg))``
  (``bpr`` task, implicit feedback with one sampled negative per positive).

``loss_for_task`` maps a task name (the pipeline's ``binary``/``regression``/``multiclass``, plus ``bpr``) to
its loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from models.errors import ModelConfigError

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over the batch.

    Args:
        logits: ``[B]`` raw scores (before the sigmoid).
        labels: ``[B]`` targets in {0, 1} (any float dtype).

    Returns:
        A scalar tensor.
    """
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def mse(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error, averaged over the batch.

    Args:
        predictions: ``[B]`` predicted values.
        targets: ``[B]`` true values.

    Returns:
        A scalar tensor.
    """
    return F.mse_loss(predictions, targets.to(predictions.dtype))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over classes, averaged over the batch.

    Args:
        logits: ``[B, C]`` raw class scores.
        labels: ``[B]`` class ids in ``0..C-1``; float labels (as a ``Batch`` carries them) are cast to int64.

    Returns:
        A scalar tensor.

    Raises:
        ModelConfigError: if ``logits`` is not two-dimensional.
    """
    if logits.dim() != 2:
        raise ModelConfigError(
            f"cross_entropy expects logits of shape [B, C], got {tuple(logits.shape)}; "
            "build the model with task='multiclass' and num_classes=C"
        )
    return F.cross_entropy(logits, labels.long())


def bpr(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking loss: ``mean(-log sigmoid(positive - negative))``.

    Computed as ``softplus(negative - positive)``, which equals ``-log sigmoid(positive - negative)`` and does
    not underflow for large score gaps.

    Args:
        positive: ``[B]`` scores of the observed (user, item) pairs.
        negative: ``[B]`` scores of the sampled (user, negative item) pairs, aligned with ``positive``.

    Returns:
        A scalar tensor.

    Raises:
        ModelConfigError: if the two shapes differ.
    """
    if positive.shape != negative.shape:
        raise ModelConfigError(
            f"bpr needs aligned positive and negative scores, got shapes {tuple(positive.shape)} and "
            f"{tuple(negative.shape)}; score one sampled negative per positive"
        )
    return F.softplus(negative - positive).mean()


LOSSES: dict[str, LossFn] = {
    "binary": bce,
    "regression": mse,
    "multiclass": cross_entropy,
    "bpr": bpr,
}


def example_losses(task: str, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's loss `[B]` under the task's loss (their mean is `loss_for_task(task)(output, labels)`).

    Args:
        task: ``binary``, ``regression`` or ``multiclass`` (``bpr`` scores pairs, not examples).
        output: the model's output for the batch.
        labels: the batch's labels.

    Raises:
        ModelConfigError: if the task has no per-example loss.
    """
    if task == "binary":
        return F.binary_cross_entropy_with_logits(output, labels.to(output.dtype), reduction="none")
    if task == "regression":
        return (output - labels.to(output.dtype)) ** 2
    if task == "multiclass":
        return F.cross_entropy(output, labels.long(), reduction="none")
    raise ModelConfigError(f"task '{task}' has no per-example loss; expected binary, regression or multiclass")


def loss_for_task(task: str) -> LossFn:
    """The loss of a task.

    Args:
        task: ``binary`` (bce), ``regression`` (mse), ``multiclass`` (cross_entropy) or ``bpr``.

    Returns:
        The loss function, called as ``loss(output, labels)`` (``loss(positive, negative)`` for ``bpr``).

    Raises:
        ModelConfigError: if the task is unknown.
    """
    if task not in LOSSES:
        raise ModelConfigError(
            f"unknown task '{task}', expected one of {list(LOSSES)}; set the dataset spec's task (or the job "
            "config's training objective) to one of them"
        )
    return LOSSES[task]
