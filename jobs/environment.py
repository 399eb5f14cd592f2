"""The job's environment for searches that probe the model (`search.base.Environment`): the live sharded model,
as trained on the day, scored on the day's held-out batches with chosen features' rows cut to candidate sizes.

Cutting is `Recommender.column_limits`: each example keeps the first `size[row]` columns of the feature's pooled
embedding. On a single-hot feature (users, items) that is exactly the row truncated to its size (a prefix mask, as
CIESS's and SCALL's masked supernets mean); an example with several rows of the feature keeps the largest of their
sizes (an upper bound: sum pooling mixes the rows before the cut). The tables are not touched, so a score costs one
forward pass over the held-out batches, and the verdict (all-reduced) is identical on every rank.

Fitness is the AUC for a binary task and `exp(−loss)` otherwise: higher is better, and near 1 relative to a
reference plan, as SCALL's reward ratio wants. Per-row quality (CIESS's per-entity reward) is `exp(−mean loss)` of
each row's held-out examples, nan for a row without one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models import metrics
from models.losses import example_losses
from models.recommender import Recommender


def add_row_losses(totals: dict[str, torch.Tensor], rows: KeyedJaggedTensor, losses: torch.Tensor) -> None:
    """Add each example's loss to every row it looks up: `totals[f]` is `[2, num_rows]` (loss sum, examples) for
    each feature `f` it names; `rows` holds the batch's vocabulary rows, `losses` its per-example losses `[B]`."""
    for f, total in totals.items():
        jt = rows[f]
        ids = jt.values().long()
        total[0].index_add_(0, ids, losses.to(torch.float64).repeat_interleave(jt.lengths().long()))
        total[1].index_add_(0, ids, torch.ones(ids.numel(), dtype=torch.float64))


def example_limits(rows: KeyedJaggedTensor, feature: str, sizes: torch.Tensor) -> torch.Tensor:
    """Per example, the size of its row of `feature` (the largest, if it has several; 0 if none)."""
    jt = rows[feature]
    lengths = jt.lengths().long()
    sample = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    out = torch.zeros(lengths.numel(), dtype=torch.int64)
    return out.scatter_reduce_(0, sample, sizes[jt.values().long()], reduce="amax", include_self=True)


class ModelEnvironment:
    """Scores per-row sizes on the live model over held-out batches.

    Args:
        model: the sharded model (a callable `batch -> (loss, (loss, logits, labels))`).
        recommender: the `Recommender` inside it (its `column_limits` are set while scoring).
        task: the dataset's task.
        batches: this rank's held-out batches, each with its vocabulary rows (before the plan's remap).
        reduce: sums a CPU tensor over all ranks (in place or returned).
    """

    def __init__(
        self,
        model: nn.Module,
        recommender: Recommender,
        task: str,
        batches: Sequence[tuple[KeyedJaggedTensor, Batch]],
        reduce: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.model, self.recommender, self.task = model, recommender, task
        self.batches, self.reduce = batches, reduce
        self.calls = 0

    def _score(
        self, sizes: Mapping[str, np.ndarray], per_row: Mapping[str, int] | None = None
    ) -> tuple[torch.Tensor, metrics.TaskMetricsAccumulator, dict[str, torch.Tensor]]:
        """One pass over the held-out batches with rows cut to `sizes`: all-reduced (loss sum, examples, metric
        state), and for each feature of `per_row` (its number of rows) the all-reduced `[2, rows]` loss sums."""
        self.calls += 1
        table = {f: torch.from_numpy(np.ascontiguousarray(s, dtype=np.int64)) for f, s in sizes.items()}
        scores = metrics.TaskMetricsAccumulator(self.task)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        totals = {f: torch.zeros(2, n, dtype=torch.float64) for f, n in (per_row or {}).items()}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for rows, batch in self.batches:
                    self.recommender.column_limits = {f: example_limits(rows, f, s) for f, s in table.items()}
                    loss, (_, out, y) = self.model(batch)
                    out, y = out.cpu(), y.cpu()
                    scores.update(out, y)
                    loss_sum += loss.detach().double().cpu() * y.numel()
                    if totals:
                        add_row_losses(totals, rows, example_losses(self.task, out, y))
        finally:
            self.recommender.column_limits = None
            self.model.train(was_training)
        state = self.reduce(torch.cat([loss_sum, scores.state()]))
        return state, scores, {f: self.reduce(t) for f, t in totals.items()}

    def fitness(self, sizes: Mapping[str, np.ndarray]) -> float:
        """The model's quality with each feature in `sizes` cut row by row to those sizes (higher is better)."""
        state, scores, _ = self._score(sizes)
        if self.task == "binary":
            return float(scores.compute(state[1:])["auc"])
        return float(np.exp(-float(state[0]) / max(float(state[1]), 1.0)))

    def row_quality(self, sizes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per row of each feature in `sizes`, `exp(−mean loss)` of its held-out examples with the rows cut to
        `sizes` (nan for a row without one)."""
        _, _, totals = self._score(sizes, {f: int(np.asarray(s).size) for f, s in sizes.items()})
        return {f: np.exp(-(t[0] / t[1]).numpy()) for f, t in totals.items()}  # 0/0 = nan: no example
