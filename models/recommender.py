"""`Recommender`: the embedding layer, a dense model and the task loss as one module TorchRec can pipeline.

`TrainPipelineSparseDist` calls `model(batch)` and wants `(loss, output)`; the output carries the detached loss,
the logits and the labels so the job can log without another forward pass. The embedding layer is whatever maps
a KJT to a dict of per-feature pooled tensors (`sharding.embedding.PlannedEmbedding`); DMP shards the
`EmbeddingBagCollection` inside it. An optional `head` (a search's transform, e.g. AutoDim's candidate mixture)
sits between the two; `frozen_embeddings` runs the lookup without gradient, so a step that must not touch the
tables (a search's architecture step) leaves the fused embedding optimizer idle. `column_limits`, when set, keeps
only the first `limit[b]` columns of feature `f`'s embedding in example `b` (the rest zeroed), and `column_dtypes`,
when set, reads feature `f`'s kept columns as serving would store them in `dtype[f]`
(`sharding.embedding.quantize_dequantize`): how a search's environment scores rows cut to candidate sizes and
precisions on the live model without touching its tables. The quantisation is of the pooled vector: exactly the
served row's for a single-hot feature, an approximation (the sum quantised, not each row) for a multi-hot one.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torchrec.datasets.utils import Batch

from models.losses import loss_for_task
from sharding.embedding import quantize_dequantize


def served_columns(x: torch.Tensor, dtype: str, limit: torch.Tensor | None = None) -> torch.Tensor:
    """`x` (`[B, d]`) with each example's first `limit[b]` columns (all: None) read back from `dtype` storage, the rest
    zero; one quantisation per distinct limit."""
    if dtype == "fp32":
        return x
    if limit is None:
        return quantize_dequantize(x, dtype)
    out = torch.zeros_like(x)
    limit = limit.to(x.device).clamp(max=x.shape[1])
    for width in torch.unique(limit).tolist():
        if width > 0:
            at = limit == width
            out[at, :width] = quantize_dequantize(x[at, :width], dtype)
    return out


class Recommender(nn.Module):
    """Embeddings → dense model → loss.

    Args:
        embedding: maps a `KeyedJaggedTensor` to `{feature: [B, dim]}`.
        dense_model: maps `(embeddings, dense features)` to logits `[B]` (or `[B, C]`).
        task: `binary`, `regression` or `multiclass`.
        head: optional transform of the embeddings dict before the dense model.
    """

    def __init__(self, embedding: nn.Module, dense_model: nn.Module, task: str, head: nn.Module | None = None) -> None:
        super().__init__()
        self.embedding = embedding
        self.dense_model = dense_model
        self.head = head
        self.task = task
        self.loss_fn = loss_for_task(task)
        self.frozen_embeddings = False
        self.column_limits: dict[str, torch.Tensor] | None = None
        self.column_dtypes: dict[str, str] | None = None

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        with torch.no_grad() if self.frozen_embeddings else contextlib.nullcontext():
            embeddings = self.embedding(batch.sparse_features)
        if self.column_limits is not None:
            embeddings = dict(embeddings)
            for f, limit in self.column_limits.items():
                x = embeddings[f]
                keep = torch.arange(x.shape[1], device=x.device)[None, :] < limit.to(x.device)[:, None]
                embeddings[f] = x * keep
        if self.column_dtypes is not None:
            embeddings = dict(embeddings)
            for f, dtype in self.column_dtypes.items():
                cut = None if self.column_limits is None else self.column_limits.get(f)
                embeddings[f] = served_columns(embeddings[f], dtype, cut)
        if self.head is not None:
            embeddings = self.head(embeddings)
        logits = self.dense_model(embeddings, batch.dense_features)
        labels = batch.labels.long() if self.task == "multiclass" else batch.labels
        loss = self.loss_fn(logits, labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)
