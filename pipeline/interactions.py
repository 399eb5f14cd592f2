"""User–item interaction pairs of a dataset, split, with ids factorised to dense rows: what graph models train on.

Users and items are numbered `0..U-1` and `0..I-1` in ascending raw-id order (vectorised: `np.unique`), over the
whole dataset, so every split indexes the same rows. Duplicate (user, item) pairs are kept as the source has them
(the adjacency counts a pair once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline.dataset import Dataset
from pipeline.errors import DatasetError
from pipeline.splits import SPLIT_NAMES, SplitAssignment

Pairs = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Interactions:
    """Factorised (user, item) pairs per split.

    Args:
        num_users: U.
        num_items: I.
        splits: per split name, the (user rows, item rows) arrays.
        user_ids: the raw id of each user row.
        item_ids: the raw id of each item row.
    """

    num_users: int
    num_items: int
    splits: dict[str, Pairs]
    user_ids: np.ndarray
    item_ids: np.ndarray

    def merged(self, *names: str) -> Pairs:
        """The pairs of several splits, concatenated."""
        return (
            np.concatenate([self.splits[n][0] for n in names]),
            np.concatenate([self.splits[n][1] for n in names]),
        )

    def frequencies(self, *names: str) -> tuple[np.ndarray, np.ndarray]:
        """Interactions per user row and per item row in the given splits."""
        users, items = self.merged(*names)
        return np.bincount(users, minlength=self.num_users), np.bincount(items, minlength=self.num_items)


def interactions(dataset: Dataset, assignment: SplitAssignment) -> Interactions:
    """The dataset's (user, item) pairs, factorised, grouped by the assignment's splits."""
    spec = dataset.spec
    if spec.user_field is None or spec.item_field is None:
        raise DatasetError(
            dataset.root / "dataset.yaml",
            "interaction pairs need user_field and item_field, but the spec lacks one",
            "set both in dataset.yaml (e.g. user_field: user, item_field: item)",
        )
    user_col, item_col = spec.field(spec.user_field).column, spec.field(spec.item_field).column
    frame = dataset.scan().select(pl.col(user_col), pl.col(item_col)).collect()
    codes = np.concatenate([assignment.codes[d.date] for d in dataset.days])
    user_ids, users = np.unique(frame.get_column(user_col).to_numpy(), return_inverse=True)
    item_ids, items = np.unique(frame.get_column(item_col).to_numpy(), return_inverse=True)
    splits = {name: (users[codes == i], items[codes == i]) for i, name in enumerate(SPLIT_NAMES)}
    return Interactions(user_ids.size, item_ids.size, splits, user_ids, item_ids)
