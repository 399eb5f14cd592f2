"""Budgets as users state them: an absolute figure, or a fraction of a uniform reference plan's size
(`parse_budget`: `1/16 of fixed-16 fp32`), resolved once the tables' rows are known (`BudgetRequest.resolve`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sharding.plan import ROW_ALIGNMENT, PlanError, check_precision, physical_dim, row_bytes

BUDGET_SYNTAX = (
    "a number (e.g. 2500000), or a fraction of a uniform reference plan: '<fraction> of fixed-<dim> [<dtype>]', "
    "the fraction as 1/16, 0.0625 or 6.25% (e.g. '1/16 of fixed-16 fp32')"
)
BUDGET_FIX = "write it as e.g. '1/16 of fixed-16 fp32', '6.25% of fixed-16' or a whole number"
_BUDGET_RE = re.compile(
    r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?:/\s*(?P<den>\d+(?:\.\d+)?))?\s*(?P<pct>%)?\s+of\s+fixed-(?P<dim>\d+)"
    r"(?:\s+(?P<dtype>[a-z0-9]+))?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class BudgetRequest:
    """A budget as a user states it: an absolute figure, or a fraction of a uniform reference plan's size
    (`parse_budget`). `resolve` turns it into the absolute figure once the tables' rows are known.

    Args:
        text: what the user wrote.
        absolute: the figure itself, or None for a fraction.
        fraction: the fraction of the reference, or None.
        reference_dim: the reference plan's dim (every feature at it).
        reference_dtype: the reference plan's serving dtype.
    """

    text: str
    absolute: int | None = None
    fraction: float | None = None
    reference_dim: int = 16
    reference_dtype: str = "fp32"

    def resolve(
        self, num_embeddings: Mapping[str, int], unit: str = "serving_bytes", row_alignment: int = ROW_ALIGNMENT
    ) -> int:
        """The absolute budget in `unit` (`serving_bytes` or `parameters`): the figure itself, or the fraction of
        the reference plan over `num_embeddings` (serving bytes: its rows in its dtype at `row_alignment`;
        parameters: its physical parameters)."""
        if self.absolute is not None:
            return self.absolute
        assert self.fraction is not None
        width = physical_dim(self.reference_dim)
        per_row = width if unit == "parameters" else row_bytes(width, self.reference_dtype, row_alignment)
        return max(1, int(self.fraction * per_row * sum(num_embeddings.values())))

    def describe(self, value: int, unit: str) -> str:
        return f"{self.text!r} = {value:,} {unit}" if self.absolute is None else f"{value:,} {unit}"


def parse_budget(text: str | int, where: str = "budget") -> BudgetRequest:
    """Read a budget as `BUDGET_SYNTAX` says.

    Raises:
        PlanError: naming `where`, the text, and the syntax.
    """
    if isinstance(text, bool):
        raise PlanError(f"{where} is {text!r}; expected {BUDGET_SYNTAX}. Fix: {BUDGET_FIX}")
    if isinstance(text, int) or (isinstance(text, str) and text.strip().isdigit()):
        value = int(text)
        if value <= 0:
            raise PlanError(f"{where} is {value}; it must be > 0. Fix: {BUDGET_FIX}")
        return BudgetRequest(str(text), absolute=value)
    m = _BUDGET_RE.match(str(text))
    if m is None:
        raise PlanError(f"{where} is {text!r}; expected {BUDGET_SYNTAX}. Fix: {BUDGET_FIX}")
    den = float(m["den"]) if m["den"] else 1.0
    fraction = float(m["num"]) / den / (100.0 if m["pct"] else 1.0) if den else 0.0
    if fraction <= 0:
        raise PlanError(
            f"{where} is {text!r}: the fraction must be > 0 (a positive number over a positive one). Fix: {BUDGET_FIX}"
        )
    dim = int(m["dim"])
    if dim <= 0:
        raise PlanError(f"{where} is {text!r}: the reference dim must be > 0. Fix: {BUDGET_FIX}")
    dtype = (m["dtype"] or "fp32").lower()
    try:
        check_precision(dtype, f"{where} {text!r}: the reference dtype")
    except PlanError as e:
        raise PlanError(f"{e}. Fix: {BUDGET_FIX}") from None
    return BudgetRequest(str(text), fraction=fraction, reference_dim=dim, reference_dtype=dtype)
