"""The verification stage: score each candidate plan on held-out data and deliver the best.

A search's own ranking of its candidates is an estimate (a supernet's, a 1-epoch model's, a knapsack's sum of
per-feature losses). Before a plan is delivered, its top candidates are scored as they will be served, on rows that
are neither trained on by the candidate's model nor the rows the plan is finally reported on (the validation
split, or a stream day other than the scored one), and the best is delivered. The candidate set always holds the
uniform plans that fit the budget (FIXED-d × dtype), so on the verification rows the delivered plan is never worse
than the best of them.

`verify` is the selection, written against a `score` callable so that any fidelity can stand behind it: a
post-training candidate is scored directly (`jobs.compress`), a candidate that needs training would be trained for a
few batches or days first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

C = TypeVar("C")
HIGHER_IS_BETTER = {"auc": True, "accuracy": True, "log_loss": False, "mse": False, "loss": False}


class VerificationError(ValueError):
    """No candidate to verify, or a metric that the scores do not have."""


@dataclass
class Scored(Generic[C]):
    """A candidate with its held-out metrics and its serving bytes."""

    candidate: C
    metrics: Mapping[str, float]
    serving_bytes: int


def verify(
    candidates: Sequence[C],
    score: Callable[[C], Mapping[str, float]],
    serving_bytes: Callable[[C], int],
    metric: str = "auc",
    budget: str = "the budget",
) -> tuple[Scored[C], list[Scored[C]]]:
    """Score every candidate and return the best with every score (in the candidates' order).

    The best has the highest `metric` (the lowest, for a loss); ties go to the fewer serving bytes, then to the
    earlier candidate. A candidate whose metric is NaN never wins. `budget` names the budget in the error.

    Raises:
        VerificationError: no candidates, or `metric` is not one the scores hold.
    """
    if not candidates:
        raise VerificationError(f"no candidate fits {budget}, so none can be verified. Fix: raise --budget")
    if metric not in HIGHER_IS_BETTER:
        raise VerificationError(f"metric {metric!r} is not one of {sorted(HIGHER_IS_BETTER)}")
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    scored: list[Scored[C]] = []
    for c in candidates:
        metrics = dict(score(c))
        if metric not in metrics:
            raise VerificationError(f"the scores hold {sorted(metrics)}, not {metric!r}")
        scored.append(Scored(c, metrics, int(serving_bytes(c))))

    def key(i: int) -> tuple[float, int, int]:
        value = scored[i].metrics[metric]
        return (-math.inf if math.isnan(value) else sign * value, -scored[i].serving_bytes, -i)

    best = max(range(len(scored)), key=key)
    return scored[best], scored
