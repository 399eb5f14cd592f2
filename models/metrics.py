"""Evaluation metrics, vectorised in torch (no Python loops over rows or users).

Pointwise metrics (CTR and rating tasks): ``auc``, ``log_loss``, ``accuracy``, ``mse``. Full-ranking metrics
(CIESS protocol, DESIGN.md decision 13): ``recall_at_k`` and ``ndcg_at_k`` rank every item for every user,
with the user's training items masked out.

Every metric returns a detached 0-d tensor (or a ``[U]`` tensor of per-user values with
``reduction="none"``, which is what a distributed evaluation all-reduces: the sum of the non-nan values and
their count).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

from models.errors import ModelConfigError

logger = logging.getLogger(__name__)

Reduction = Literal["mean", "none"]


def _check_same_length(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ModelConfigError(
            f"{name}: predictions and labels must have the same batch size, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}; pass one label per prediction"
        )


def _check_binary_labels(name: str, labels: torch.Tensor) -> None:
    if bool(((labels != 0) & (labels != 1)).any()):
        bad = labels[(labels != 0) & (labels != 1)][:5].tolist()
        raise ModelConfigError(
            f"{name}: binary labels must be 0 or 1, got values such as {bad}; use task 'regression' or "
            "'multiclass' for other labels"
        )


def auc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of binary scores (ties count one half).

    Only the order of the scores matters, so logits, probabilities or any monotone transform give the same
    value. The scores are replaced by their dense ranks scaled into [0, 1] before calling torchmetrics'
    ``binary_auroc``: passing raw logits would make torchmetrics apply a float32 sigmoid, which saturates and
    turns distinct large logits into ties.

    Args:
        scores: ``[N]`` scores, higher meaning more likely positive.
        labels: ``[N]`` labels in {0, 1}.

    Returns:
        A 0-d float64 tensor (torchmetrics integrates in float32, so it is exact to about 1e-7); ``nan`` if
        the labels hold only one class (or are empty), where AUC is undefined.

    Raises:
        ModelConfigError: on mismatched lengths, labels other than 0/1, or nan scores.
    """
    scores = scores.detach().reshape(-1)
    labels = labels.detach().reshape(-1)
    _check_same_length("auc", scores, labels)
    _check_binary_labels("auc", labels)
    if bool(torch.isnan(scores).any()):
        raise ModelConfigError("auc: scores contain nan; check the model output (diverged training?)")
    num_pos = int(labels.sum().item())
    if num_pos == 0 or num_pos == labels.numel():
        return torch.tensor(math.nan, dtype=torch.float64)
    _, dense_rank = torch.unique(scores, sorted=True, return_inverse=True)
    preds = dense_rank.to(torch.float64) / max(int(dense_rank.max().item()), 1)
    return binary_auroc(preds, labels.long(), thresholds=None).to(torch.float64)


def log_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the labels, from logits (computed in float64).

    Args:
        logits: ``[N]`` binary logits, or ``[N, C]`` class logits.
        labels: ``[N]`` labels in {0, 1} (binary) or class ids (multiclass).

    Returns:
        A 0-d float64 tensor.

    Raises:
        ModelConfigError: on mismatched lengths or logits that are neither 1-D nor 2-D.
    """
    logits = logits.detach().to(torch.float64)
    labels = labels.detach()
    _check_same_length("log_loss", logits, labels)
    if logits.dim() == 1:
        return F.binary_cross_entropy_with_logits(logits, labels.to(torch.float64))
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels.long())
    raise ModelConfigError(f"log_loss expects logits [N] or [N, C], got {tuple(logits.shape)}")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of correct predictions.

    Binary (``logits`` is ``[N]``): predicts 1 where the logit is > 0 (probability > 0.5). Multiclass
    (``logits`` is ``[N, C]``): predicts the argmax class.

    Args:
        logits: ``[N]`` binary logits or ``[N, C]`` class logits.
        labels: ``[N]`` labels in {0, 1} or class ids.

    Returns:
        A 0-d float64 tensor.

    Raises:
        ModelConfigError: on mismatched lengths or logits that are neither 1-D nor 2-D.
    """
    logits = logits.detach()
    labels = labels.detach()
    _check_same_length("accuracy", logits, labels)
    if logits.dim() == 1:
        correct = (logits > 0) == (labels > 0.5)
    elif logits.dim() == 2:
        correct = logits.argmax(dim=1) == labels.long()
    else:
        raise ModelConfigError(f"accuracy expects logits [N] or [N, C], got {tuple(logits.shape)}")
    return correct.to(torch.float64).mean()


def mse(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error (computed in float64).

    Args:
        predictions: ``[N]`` predicted values.
        targets: ``[N]`` true values.

    Returns:
        A 0-d float64 tensor.

    Raises:
        ModelConfigError: on mismatched lengths.
    """
    _check_same_length("mse", predictions, targets)
    diff = predictions.detach().to(torch.float64) - targets.detach().to(torch.float64)
    return (diff * diff).mean()


def _dense_bool(name: str, mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if mask.layout != torch.strided:
        mask = mask.to_dense()
    if mask.shape != shape:
        raise ModelConfigError(
            f"{name} must have the shape of scores {tuple(shape)}, got {tuple(mask.shape)}; index it by "
            "(user row, item row) like the scores"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def _ranked_hits(
    scores: torch.Tensor, held_out: torch.Tensor, train_mask: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hits in each user's top-k (``[U, min(k, I)]`` bool) and each user's number of held-out items."""
    if scores.dim() != 2:
        raise ModelConfigError(f"scores must be [users, items], got shape {tuple(scores.shape)}")
    if scores.shape[1] == 0:
        raise ModelConfigError("scores have no items (shape [U, 0]); rank at least one item")
    if k < 1:
        raise ModelConfigError(f"k must be >= 1, got {k}")
    scores = scores.detach()
    held = _dense_bool("held_out", held_out.detach(), scores.shape)
    if train_mask is not None:
        train = _dense_bool("train_mask", train_mask.detach(), scores.shape)
        scores = scores.masked_fill(train, -math.inf)
        # A masked item cannot be recommended, so it can be neither a hit nor a missed positive.
        held = held & ~train
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return held.gather(1, top), held.sum(dim=1)


def _reduce(per_user: torch.Tensor, valid: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    per_user = per_user.masked_fill(~valid, math.nan)
    if reduction == "none":
        return per_user
    if reduction == "mean":
        return per_user[valid].mean() if bool(valid.any()) else per_user.new_tensor(math.nan)
    raise ModelConfigError(f"reduction must be 'mean' or 'none', got '{reduction}'")


def recall_at_k(
    scores: torch.Tensor,
    held_out: torch.Tensor,
    train_mask: torch.Tensor | None,
    k: int,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Full-ranking Recall@K with training items masked.

    For each user, all items are ranked by score after setting the user's training items to ``-inf``;
    ``recall_u = |top-k ∩ held-out_u| / |held-out_u|`` (the denominator is the number of held-out items, not
    ``min(k, ·)``, as in LightGCN's and CIESS's evaluation code). Held-out items that are also training
    items are dropped (they can never be ranked). The mean is over the users with at least one held-out item;
    the others are left out, not counted as 0. ``k`` larger than the number of items ranks all of them. Ties
    in the scores are broken by ``torch.topk``'s order.

    Args:
        scores: ``[U, I]`` predicted scores.
        held_out: ``[U, I]`` held-out positives, bool or 0/1, dense or sparse (COO/CSR).
        train_mask: ``[U, I]`` training items to exclude from the ranking (dense or sparse), or None.
        k: the cut-off, >= 1.
        reduction: ``mean`` (a 0-d tensor, nan if no user has a held-out item) or ``none`` (``[U]``, nan for
            users without held-out items).

    Returns:
        The recall, in the dtype of ``scores``.

    Raises:
        ModelConfigError: on a bad shape, ``k < 1`` or an unknown reduction.
    """
    hits, num_held = _ranked_hits(scores, held_out, train_mask, k)
    per_user = hits.sum(dim=1).to(scores.dtype) / num_held.clamp(min=1).to(scores.dtype)
    return _reduce(per_user, num_held > 0, reduction)


def ndcg_at_k(
    scores: torch.Tensor,
    held_out: torch.Tensor,
    train_mask: torch.Tensor | None,
    k: int,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Full-ranking NDCG@K with binary gains and training items masked.

    Ranking, masking, ``k`` and the set of averaged users as in ``recall_at_k``.
    ``DCG_u = Σ_{r=1..k} hit_u(r) / log2(r + 1)``; ``IDCG_u`` is the DCG of a perfect ranking,
    ``Σ_{r=1..min(k, |held-out_u|)} 1 / log2(r + 1)``; ``NDCG_u = DCG_u / IDCG_u``.

    Args:
        scores: ``[U, I]`` predicted scores.
        held_out: ``[U, I]`` held-out positives, bool or 0/1, dense or sparse (COO/CSR).
        train_mask: ``[U, I]`` training items to exclude from the ranking (dense or sparse), or None.
        k: the cut-off, >= 1.
        reduction: ``mean`` (a 0-d tensor, nan if no user has a held-out item) or ``none`` (``[U]``, nan for
            users without held-out items).

    Returns:
        The NDCG, in the dtype of ``scores``.

    Raises:
        ModelConfigError: on a bad shape, ``k < 1`` or an unknown reduction.
    """
    hits, num_held = _ranked_hits(scores, held_out, train_mask, k)
    k_eff = hits.shape[1]
    discounts = 1.0 / torch.log2(torch.arange(k_eff, dtype=scores.dtype, device=scores.device) + 2.0)
    dcg = (hits.to(scores.dtype) * discounts).sum(dim=1)
    ideal = torch.cumsum(discounts, dim=0)
    idcg = ideal[(num_held.clamp(min=1, max=k_eff) - 1)]
    return _reduce(dcg / idcg, num_held > 0, reduction)


def ranking_metrics(
    scores: torch.Tensor,
    held_out: torch.Tensor,
    train_mask: torch.Tensor | None,
    ks: tuple[int, ...] = (5, 20),
    reduction: Reduction = "mean",
) -> dict[str, torch.Tensor]:
    """``recall@k`` and ``ndcg@k`` for every ``k`` in ``ks`` from one ranking (one top-``max(ks)``).

    Each value equals ``recall_at_k`` / ``ndcg_at_k`` at that ``k`` (same masking, users and reduction); this
    ranks once instead of once per metric, which is what a search evaluating thousands of plans needs.
    """
    if not ks or min(ks) < 1:
        raise ModelConfigError(f"ks must be cut-offs >= 1, got {ks}")
    hits, num_held = _ranked_hits(scores, held_out, train_mask, max(ks))
    valid = num_held > 0
    k_all = hits.shape[1]
    discounts = 1.0 / torch.log2(torch.arange(k_all, dtype=scores.dtype, device=scores.device) + 2.0)
    hits_f = hits.to(scores.dtype)
    cum_hits = torch.cumsum(hits_f, dim=1)
    cum_dcg = torch.cumsum(hits_f * discounts, dim=1)
    ideal = torch.cumsum(discounts, dim=0)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        k_eff = min(k, k_all)
        recall = cum_hits[:, k_eff - 1] / num_held.clamp(min=1).to(scores.dtype)
        ndcg = cum_dcg[:, k_eff - 1] / ideal[num_held.clamp(min=1, max=k_eff) - 1]
        out[f"recall@{k}"] = _reduce(recall, valid, reduction)
        out[f"ndcg@{k}"] = _reduce(ndcg, valid, reduction)
    return out


TASK_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("auc", "log_loss", "accuracy"),
    "regression": ("mse",),
    "multiclass": ("accuracy",),
}


def task_metrics(task: str, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The task's metrics of `logits` against `labels` (nan for every metric if there are no rows).

    Raises:
        ModelConfigError: labels that do not fit the task, or nan scores.
    """
    names = TASK_METRICS[task]
    if labels.numel() == 0:
        return dict.fromkeys(names, math.nan)
    if task == "binary":
        return {
            "auc": float(auc(logits, labels)),
            "log_loss": float(log_loss(logits, labels)),
            "accuracy": float(accuracy(logits, labels)),
        }
    if task == "regression":
        return {"mse": float(mse(logits, labels))}
    return {"accuracy": float(accuracy(logits, labels.long()))}


AUC_BITS = 20  # histogram bins for the distributed AUC: the top 20 bits of each score's order-preserving float32 key


def _score_bins(scores: torch.Tensor, bits: int = AUC_BITS) -> torch.Tensor:
    """Each score's bin, monotone in the score: the float32 bit pattern mapped to an unsigned order (negative
    numbers' bits flipped, positive numbers' sign bit set), keeping its top `bits` bits. So a bin holds scores that
    share their sign, exponent and first `bits - 9` mantissa bits: a relative width of 2^-(bits-9) at any scale."""
    raw = scores.detach().reshape(-1).to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    key = torch.where(raw >= 1 << 31, 0xFFFFFFFF - raw, raw | (1 << 31))
    return key >> (32 - bits)


class TaskMetricsAccumulator:
    """The task's metrics over many batches and ranks without keeping (or gathering) any logit.

    Sums are float64: loss, correct predictions, squared error and row counts. AUC comes from per-class histograms
    over `_score_bins` (2^20 bins). `state()` is one float64 tensor that ranks all-reduce (sum); `compute(state)`
    gives what `task_metrics` would give on the concatenation of every batch on every rank: log loss, accuracy and
    MSE exactly (up to float64 summation order), AUC up to the positive–negative pairs that share a bin, counted as
    ties. A bin is 2^-11 of its scores' magnitude wide, so the error is ~1e-7 for scores spread over a range, and
    grows when they crowd into a few bins: 2.5e-5 measured on the tiny test stream's first day, whose barely
    trained logits sit in a narrow band (`tests/test_models.py` holds it to 1e-4).

    Args:
        task: `binary`, `regression` or `multiclass`.
    """

    def __init__(self, task: str) -> None:
        if task not in TASK_METRICS:
            raise ModelConfigError(f"unknown task '{task}', expected one of {sorted(TASK_METRICS)}")
        self.task = task
        # [rows, loss sum, correct, squared error]; for binary tasks the negative then the positive histogram, counts
        # kept apart (int64) so that a batch adds to its own bins only: a bincount over all 2^21 bins cost 7 ms a batch.
        self._sums = torch.zeros(4, dtype=torch.float64)
        self._hist = torch.zeros(2 << AUC_BITS if task == "binary" else 0, dtype=torch.int64)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach(), labels.detach()
        n = labels.numel()
        if n == 0:
            return
        s = self._sums
        s[0] += n
        if self.task == "binary":
            _check_binary_labels("auc", labels)
            if bool(torch.isnan(logits).any()):
                raise ModelConfigError("auc: scores contain nan; check the model output (diverged training?)")
            s[1] += float(log_loss(logits, labels)) * n
            s[2] += float(accuracy(logits, labels)) * n
            bins = _score_bins(logits) + (labels.reshape(-1).long() << AUC_BITS)
            self._hist.index_put_((bins,), torch.ones_like(bins), accumulate=True)
        elif self.task == "regression":
            s[3] += float(mse(logits, labels)) * n
        else:
            s[2] += float(accuracy(logits, labels.long())) * n

    def state(self) -> torch.Tensor:
        """The sums to all-reduce (a copy)."""
        return torch.cat([self._sums, self._hist.to(torch.float64)])

    def compute(self, state: torch.Tensor | None = None) -> dict[str, float]:
        """The metrics of `state` (this accumulator's own sums by default); nan for every metric with no rows."""
        s = self.state() if state is None else state
        n = float(s[0])
        if n == 0:
            return dict.fromkeys(TASK_METRICS[self.task], math.nan)
        if self.task == "regression":
            return {"mse": float(s[3]) / n}
        if self.task == "multiclass":
            return {"accuracy": float(s[2]) / n}
        neg, pos = s[4 : 4 + (1 << AUC_BITS)], s[4 + (1 << AUC_BITS) :]
        num_pos, num_neg = float(pos.sum()), float(neg.sum())
        if num_pos == 0 or num_neg == 0:
            value = math.nan
        else:
            below = torch.cumsum(neg, 0) - neg  # negatives in lower bins
            value = float((pos * (below + 0.5 * neg)).sum()) / (num_pos * num_neg)
        return {"auc": value, "log_loss": float(s[1]) / n, "accuracy": float(s[2]) / n}
