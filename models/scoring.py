"""One scoring path: a model's quality over a set of batches, for the job's prequential and static evaluation, the
searches' environment (`jobs/environment.py`) and the offline `jobs.evaluate` alike (DESIGN.md decision 13).

`score` runs the model (a callable `batch -> (loss, (loss, logits, labels))`, e.g. the sharded `Recommender`) over
`(rows, batch)` pairs without gradient and sums what the metrics need: the loss, `TaskMetricsAccumulator`'s sums and
AUC histograms, and optionally every row's example losses. Across ranks the sums are all-reduced (`Scorer.reduce`),
so no logit leaves its rank. An offline single-process caller may keep the scores for exact metrics
(`keep_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models import metrics
from models.losses import example_losses

Reduce = Callable[[torch.Tensor], torch.Tensor]


def add_row_losses(totals: dict[str, torch.Tensor], rows: KeyedJaggedTensor, losses: torch.Tensor) -> None:
    """Add each example's loss to every row it looks up: `totals[f]` is `[2, num_rows]` (loss sum, examples) for
    each feature `f` it names; `rows` holds the batch's vocabulary rows, `losses` its per-example losses `[B]`."""
    for f, total in totals.items():
        jt = rows[f]
        ids = jt.values().long()
        total[0].index_add_(0, ids, losses.to(torch.float64).repeat_interleave(jt.lengths().long()))
        total[1].index_add_(0, ids, torch.ones(ids.numel(), dtype=torch.float64))


class Scorer:
    """The sums a model's scores add up to.

    Args:
        task: `binary`, `regression` or `multiclass`.
        row_features: features (and their row counts) whose per-row example losses are summed.
        keep_scores: keep every logit and label (single process only: for exact metrics offline).
    """

    def __init__(self, task: str, row_features: Mapping[str, int] | None = None, keep_scores: bool = False) -> None:
        self.task = task
        self.accumulator = metrics.TaskMetricsAccumulator(task)
        self.loss_sum = torch.zeros(1, dtype=torch.float64)
        self.totals = {f: torch.zeros(2, n, dtype=torch.float64) for f, n in (row_features or {}).items()}
        self.keep_scores = keep_scores
        self.scores: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._state: torch.Tensor | None = None

    def add(
        self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, rows: KeyedJaggedTensor | None
    ) -> None:
        logits, labels = logits.cpu(), labels.cpu()
        self.accumulator.update(logits, labels)
        self.loss_sum += loss.detach().double().cpu() * labels.numel()
        if self.totals:
            assert rows is not None, "per-row losses need the batch's vocabulary rows"
            add_row_losses(self.totals, rows, example_losses(self.task, logits, labels))
        if self.keep_scores:
            self.scores.append((logits, labels))

    def reduce(self, reduce: Reduce) -> Scorer:
        """Sum everything over the ranks with `reduce` (an all-reduce of a CPU tensor)."""
        self._state = reduce(self.state())
        self.totals = {f: reduce(t) for f, t in self.totals.items()}
        return self

    def state(self) -> torch.Tensor:
        """`[loss sum, metric sums...]` of this process (or of every rank once reduced)."""
        return self._state if self._state is not None else torch.cat([self.loss_sum, self.accumulator.state()])

    @property
    def examples(self) -> int:
        return int(self.state()[1])

    def metrics(self) -> dict[str, float]:
        """`loss`, `examples` and the task's metrics (histogram AUC: within 1e-4 of the exact one)."""
        state = self.state()
        examples = int(state[1])
        result = {"loss": float(state[0]) / max(examples, 1), "examples": examples}
        return {**result, **self.accumulator.compute(state[1:])}

    def exact_metrics(self) -> dict[str, float]:
        """The task's metrics from the kept scores (`keep_scores`), exactly."""
        logits, labels = self.kept()
        return metrics.task_metrics(self.task, logits, labels)

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keep_scores, "exact metrics need keep_scores=True"
        parts = [(s, y) for s, y in self.scores if y.numel()]
        if not parts:
            return torch.zeros(0), torch.zeros(0)
        return torch.cat([s for s, _ in parts]), torch.cat([y for _, y in parts])

    def row_mean_losses(self) -> dict[str, np.ndarray]:
        """Each row's mean example loss (nan for a row with no example)."""
        return {f: (t[0] / t[1]).numpy() for f, t in self.totals.items()}  # 0/0 = nan: no example


def score(
    model: nn.Module,
    batches: Iterable[tuple[KeyedJaggedTensor | None, Batch]],
    scorer: Scorer,
    before: Callable[[KeyedJaggedTensor | None], None] | None = None,
) -> Scorer:
    """Run `model` in evaluation mode over `batches` (each with its vocabulary rows, if known) into `scorer`;
    `before(rows)` runs ahead of each forward pass (e.g. to set a search's column limits)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for rows, batch in batches:
                if before is not None:
                    before(rows)
                loss, (_, out, y) = model(batch)
                scorer.add(loss, out, y, rows)
    finally:
        model.train(was_training)
    return scorer
