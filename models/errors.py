"""Typed errors of the dense models, their losses and metrics."""

from __future__ import annotations


class ModelConfigError(ValueError):
    """A bad model, loss or metric argument.

    The message quotes the bad value, says what was expected and gives the fix.
    """
