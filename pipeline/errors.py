"""Typed errors of the data pipeline.

Every message names the file (and the column or line where there is one), says what was expected, and gives the
fix, so that a user never has to read a traceback to know what to change.
"""

from __future__ import annotations

from pathlib import Path


class DatasetError(ValueError):
    """Bad input data or a bad dataset layout.

    Args:
        path: the file or directory at fault.
        problem: what is wrong, quoting the bad value.
        fix: what the user should do about it.
        column: the column at fault, if any.
        line: the 1-based line number in a text source, if any.
    """

    def __init__(
        self,
        path: str | Path,
        problem: str,
        fix: str,
        *,
        column: str | None = None,
        line: int | None = None,
    ) -> None:
        self.path = str(path)
        self.column = column
        self.line = line
        self.problem = problem
        self.fix = fix
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {problem}\n  Fix: {fix}")


class SpecError(DatasetError):
    """A `dataset.yaml` that is malformed or does not match the Parquet files."""
