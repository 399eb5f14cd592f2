"""The job's environment for searches that probe the model (`search.base.Environment`): the live sharded model,
as trained on the day, scored on the day's held-out batches with chosen features' rows cut to candidate sizes.

Cutting is `Recommender.column_limits`: each example keeps the first `size[row]` columns of the feature's pooled
embedding (and reads them back from a serving dtype, `Recommender.column_dtypes`, for the joint dims × precision
search). On a single-hot feature (users, items) that is exactly the row truncated to its size (a prefix mask, as
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

from models.recommender import Recommender
from models.scoring import Scorer, score


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
        self, sizes: Mapping[str, np.ndarray], per_row: bool = False, dtypes: Mapping[str, str] | None = None
    ) -> Scorer:
        """One pass over the held-out batches with rows cut to `sizes` and read back from `dtypes` storage (the
        features named; `Recommender.column_dtypes`), all-reduced (per-row losses of the features in `sizes` if
        `per_row`)."""
        self.calls += 1
        table = {f: torch.from_numpy(np.ascontiguousarray(s, dtype=np.int64)) for f, s in sizes.items()}
        scorer = Scorer(self.task, {f: int(s.numel()) for f, s in table.items()} if per_row else None)

        def cut(rows: KeyedJaggedTensor | None) -> None:
            assert rows is not None
            self.recommender.column_limits = {f: example_limits(rows, f, s) for f, s in table.items()}

        self.recommender.column_dtypes = dict(dtypes) if dtypes else None
        try:
            score(self.model, self.batches, scorer, before=cut)
        finally:
            self.recommender.column_limits = self.recommender.column_dtypes = None
        return scorer.reduce(self.reduce)

    def metrics(self, sizes: Mapping[str, np.ndarray], dtypes: Mapping[str, str] | None = None) -> dict[str, float]:
        """The task's metrics (`loss` among them) with rows cut to `sizes` and served in `dtypes`."""
        return {k: float(v) for k, v in self._score(sizes, dtypes=dtypes).metrics().items()}

    def fitness(self, sizes: Mapping[str, np.ndarray]) -> float:
        """The model's quality with each feature in `sizes` cut row by row to those sizes (higher is better)."""
        result = self._score(sizes).metrics()
        return float(result["auc"]) if self.task == "binary" else float(np.exp(-result["loss"]))

    def row_quality(self, sizes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per row of each feature in `sizes`, `exp(−mean loss)` of its held-out examples with the rows cut to
        `sizes` (nan for a row without one)."""
        return {f: np.exp(-loss) for f, loss in self._score(sizes, per_row=True).row_mean_losses().items()}
