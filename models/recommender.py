"""`Recommender`: the embedding layer, a dense model and the task loss as one module TorchRec can pipeline.

`TrainPipelineSparseDist` calls `model(batch)` and wants `(loss, output)`; the output carries the detached loss,
the logits and the labels so the job can log without another forward pass. The embedding layer is whatever maps
a KJT to a dict of per-feature pooled tensors (`sharding.embedding.PlannedEmbedding`); DMP shards the
`EmbeddingBagCollection` inside it.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.datasets.utils import Batch

from models.losses import loss_for_task


class Recommender(nn.Module):
    """Embeddings → dense model → loss.

    Args:
        embedding: maps a `KeyedJaggedTensor` to `{feature: [B, dim]}`.
        dense_model: maps `(embeddings, dense features)` to logits `[B]` (or `[B, C]`).
        task: `binary`, `regression` or `multiclass`.
    """

    def __init__(self, embedding: nn.Module, dense_model: nn.Module, task: str) -> None:
        super().__init__()
        self.embedding = embedding
        self.dense_model = dense_model
        self.task = task
        self.loss_fn = loss_for_task(task)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        embeddings = self.embedding(batch.sparse_features)
        logits = self.dense_model(embeddings, batch.dense_features)
        labels = batch.labels.long() if self.task == "multiclass" else batch.labels
        loss = self.loss_fn(logits, labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)
