"""Post-training row-level compression: each row's serving bytes chosen on the final model, under a byte budget.

Precision does not change training, and neither does which rows are stored: both are serving decisions, so they
are made on the weights that will be served (issue "plans that beat uniform × int4"), not on a 1-epoch or day-1
model. Every candidate here starts from one trained model with one dim per feature and spends a serving-byte
budget over its rows, ranked by how often training looked them up (the vocabulary's counts, across all features at
once, as CAFE's single sketch does):

- **stored tiers**: the most frequent rows keep their own row at the trained dim, in `hot_dtype`; optionally the
  next ones in `warm_dtype` (row-level dtypes: e.g. int8 for hot rows, int4 or int2 for warm ones);
- **dim 0**: every other row is not stored. It is served by a shared table of the feature (`FeaturePlan.shared_rows`
  rows, hashed by `FeaturePlan.shared_slots`), each shared row the count-weighted mean of the trained rows it
  serves (what minimises the expected squared error of the vectors looked up).

The baselines of `reference/methods.md` §7.6 are points of this one family, built as carefully as the rest:

- **admission threshold** (rows seen fewer than k times share one row): one shared row per feature
  (`shared_share = 0`), the rows above the threshold that the budget pays for stored in one dtype;
- **hashing trick**: no stored row, every id hashed into a table sized by the budget (`hot_share = 0`);
- **CAFE-style split** (Zhang et al., SIGMOD 2024): hot rows stored, the rest in a hashed table, the budget split
  between them (`shared_share` in (0, 1)); here the hot set is the exact top of the training counts, which a
  HotSketch approximates online.

The quotient-remainder trick is not one of them: it combines two tables by an element-wise product, which a plan's
sum of bucket tables cannot express.

`compress` builds one candidate (the plan's features, the tables' fp32 weights to export, and every row's vector
as served, for scoring); `recipes` lists the candidate set a budget is searched over; `search.verify` picks among
them on held-out data.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sharding.embedding import quantize_dequantize
from sharding.plan import INT2_WIDTH, PRECISIONS, FeaturePlan, physical_dim, row_bytes


@dataclass(frozen=True)
class Recipe:
    """How one candidate spends the bytes.

    Args:
        name: the candidate's family, as reported (`uniform`, `admission`, `hashing`, `cafe`, `tiered`).
        hot_dtype: the dtype of the stored rows (of the first tier).
        warm_dtype: the dtype of a second stored tier (None: one tier).
        hot_share: the share of the stored rows' bytes that the first tier gets (1 with one tier; 0 with
            `hot_dtype` unused: the hashing trick).
        shared_share: the share of the budget the shared tables get, split over features by their rows (0: one
            shared row per feature, the admission threshold).
        shared_dtype: the shared tables' dtype.
    """

    name: str
    hot_dtype: str
    warm_dtype: str | None = None
    hot_share: float = 1.0
    shared_share: float = 0.0
    shared_dtype: str = "int8"

    @property
    def label(self) -> str:
        if self.name == "uniform":
            return f"uniform {self.hot_dtype}"
        if self.name == "hashing":
            return f"hashing {self.shared_dtype}"
        stored = self.hot_dtype if self.warm_dtype is None else f"{self.hot_dtype}/{self.warm_dtype}"
        shared = "" if self.shared_share == 0 else f" +{self.shared_share:.2f} hashed {self.shared_dtype}"
        return f"{self.name} {stored}{shared}"


def recipes(dtypes: Sequence[str] = ("fp16", "int8", "int4", "int2")) -> list[Recipe]:
    """The candidate recipes a budget is searched over: every uniform dtype, admission, hashing and CAFE-style
    splits in each dtype, and two-tier row-level dtypes (the hot third of the stored bytes one step more
    precise)."""
    out = [Recipe("uniform", q) for q in ("fp32", *dtypes)]
    out += [Recipe("admission", q) for q in dtypes]
    out += [Recipe("hashing", q, hot_share=0.0, shared_share=1.0, shared_dtype=q) for q in ("int8", "int4")]
    out += [Recipe("cafe", q, shared_share=s, shared_dtype="int4") for q in ("int8", "int4") for s in (0.2, 0.5)]
    steps = list(itertools.pairwise(dtypes))
    out += [Recipe("tiered", a, b, hot_share=1 / 3) for a, b in steps]
    out += [Recipe("tiered", a, b, hot_share=1 / 3, shared_share=0.2, shared_dtype="int4") for a, b in steps]
    return out


@dataclass
class Candidate:
    """One compressed plan of a trained model.

    Args:
        recipe: how it was made.
        features: the plan's features (row-level where compressed; field-level where every row is kept in one dtype).
        tables: per table, the fp32 weights the export stores (`[rows, logical_dim]`), quantised when served.
        served_rows: per feature, every row's vector as served (`[num_embeddings, dim]`, dequantised): what the
            model looks up, for scoring the candidate in the trained fp32 model.
        serving_bytes: the bytes of its tables as served.
    """

    recipe: Recipe
    features: dict[str, FeaturePlan]
    tables: dict[str, torch.Tensor]
    served_rows: dict[str, torch.Tensor]
    serving_bytes: int

    @property
    def stored_share(self) -> float:
        """The share of rows with a row of their own."""
        kept = sum(
            int((np.asarray(f.row_dims) > 0).sum()) if f.row_level else f.num_embeddings for f in self.features.values()
        )
        return kept / sum(f.num_embeddings for f in self.features.values())


def _uniform(weights: Mapping[str, torch.Tensor], dtype: str, alignment: int) -> Candidate:
    features, tables, served = {}, {}, {}
    for f, w in weights.items():
        plan = FeaturePlan(f, w.shape[0], w.shape[1], dim=w.shape[1], dtype=dtype, row_alignment=alignment)
        features[f] = plan
        tables[plan.tables()[0].name] = w
        served[f] = quantize_dequantize(w, dtype)
    nbytes = sum(p.serving_bytes for p in features.values())
    return Candidate(Recipe("uniform", dtype), features, tables, served, nbytes)


def _shared_means(w: torch.Tensor, counts: np.ndarray, slots: np.ndarray, unstored: np.ndarray, m: int) -> torch.Tensor:
    """Per shared row, the count-weighted mean of the unstored rows hashed to it (plain mean where they have no
    count; zeros where none is)."""
    rows = torch.from_numpy(np.flatnonzero(unstored))
    idx = torch.from_numpy(slots[unstored])
    weight = torch.from_numpy(counts[unstored].astype(np.float64))
    total = torch.zeros(m, dtype=torch.float64).index_add_(0, idx, weight)
    plain = total[idx] == 0  # a slot whose rows were never looked up: their plain mean
    weight = torch.where(plain, torch.ones_like(weight), weight)
    total = torch.zeros(m, dtype=torch.float64).index_add_(0, idx, weight)
    sums = torch.zeros(m, w.shape[1], dtype=torch.float64).index_add_(0, idx, w[rows].double() * weight[:, None])
    return (sums / total.clamp_min(1e-12)[:, None]).float()


@dataclass(frozen=True)
class Ranking:
    """Every row of every feature (features in `weights`' order, rows concatenated), ranked by training count.

    Args:
        feature: per concatenated row, its feature's index.
        order: the concatenated rows, most looked-up first (row 0 of each feature last; ties to the earlier feature,
            then the earlier row).
    """

    feature: np.ndarray
    order: np.ndarray


def rank_rows(weights: Mapping[str, torch.Tensor], counts: Mapping[str, np.ndarray]) -> Ranking:
    """The rows of `weights`' features ranked by `counts` (see `Ranking`)."""
    n = [int(w.shape[0]) for w in weights.values()]
    feat = np.concatenate([np.full(k, i, dtype=np.int64) for i, k in enumerate(n)])
    row = np.concatenate([np.arange(k, dtype=np.int64) for k in n])
    cnt = np.concatenate([_counts(counts.get(f), k) for f, k in zip(weights, n, strict=True)])
    cnt[row == 0] = -1.0
    return Ranking(feat, np.lexsort((row, feat, -cnt)))


def compress(
    weights: Mapping[str, torch.Tensor],
    counts: Mapping[str, np.ndarray],
    budget_bytes: int,
    recipe: Recipe,
    alignment: int,
    ranking: Ranking | None = None,
) -> Candidate | None:
    """One candidate of `recipe` within `budget_bytes`, or None where the recipe cannot meet it.

    Args:
        weights: per feature, the trained rows' logical columns `[num_embeddings, dim]` (fp32).
        counts: per feature, each row's lookups in training (`Vocabulary.counts`; rows past it count 0). Row 0,
            the fallback row of unseen ids, is never stored unless every row is: unseen ids then share the cold
            rows' vector.
        budget_bytes: the serving bytes the features' tables may take.
        recipe: how to spend them.
        alignment: the bytes each served row is padded to.
        ranking: `rank_rows(weights, counts)`, when the caller builds many candidates of the same rows.

    Returns:
        The candidate; None when it does not fit, or when the recipe would store every row (the uniform candidate
        of its dtype is that plan).
    """
    names = list(weights)
    n = {f: int(weights[f].shape[0]) for f in names}
    dim = {f: int(weights[f].shape[1]) for f in names}
    used = {recipe.hot_dtype, recipe.warm_dtype, recipe.shared_dtype if recipe.name != "uniform" else None}
    if "int2" in used and any(physical_dim(d) % INT2_WIDTH for d in dim.values()):
        return None  # FBGEMM cannot pack int2 rows narrower than 8 columns
    if recipe.name == "uniform":
        cand = _uniform(weights, recipe.hot_dtype, alignment)
        return cand if cand.serving_bytes <= budget_bytes else None
    total_rows = sum(n.values())
    shared_rb = {f: row_bytes(physical_dim(dim[f]), recipe.shared_dtype, alignment) for f in names}
    if recipe.shared_share == 0:
        m = dict.fromkeys(names, 1)
    else:
        pool = recipe.shared_share * budget_bytes
        m = {f: max(1, min(n[f], int(pool * n[f] / total_rows) // shared_rb[f])) for f in names}
    ranked = ranking if ranking is not None else rank_rows(weights, counts)
    feat, order = ranked.feature, ranked.order
    tiers = [(recipe.hot_dtype, recipe.hot_share)]
    if recipe.warm_dtype is not None:
        tiers.append((recipe.warm_dtype, 1.0))
    # Row 0 of every feature ranks last, so each feature keeps at least one dim-0 row and its shared table.
    left = float(budget_bytes - sum(m[f] * shared_rb[f] for f in names))
    if left < 0:
        return None
    assigned = np.full(order.size, -1, dtype=np.int64)  # per ranked row: its dtype's index, -1 unstored
    start = 0
    for t, (dtype, share) in enumerate(tiers):
        cost = np.asarray([row_bytes(physical_dim(dim[f]), dtype, alignment) for f in names])[feat[order[start:]]]
        take = int(np.searchsorted(np.cumsum(cost), left * share if t < len(tiers) - 1 else left, side="right"))
        assigned[start : start + take] = PRECISIONS.index(dtype)
        left -= float(cost[:take].sum())
        start += take
    if (assigned >= 0).all():
        return None  # every row stored: that is a uniform (or two-dtype) plan without the row-level machinery
    features, tables, served = {}, {}, {}
    per_row = np.empty(order.size, dtype=np.int64)
    per_row[order] = assigned
    offset = 0
    for f in names:
        codes = per_row[offset : offset + n[f]]
        offset += n[f]
        w = weights[f].float()
        stored = codes >= 0
        plan = FeaturePlan(
            f,
            n[f],
            dim[f],
            row_dims=np.where(stored, dim[f], 0).astype(np.int64),
            row_dtypes=np.where(stored, codes, PRECISIONS.index(recipe.shared_dtype)).astype(np.int64),
            dtype=recipe.shared_dtype,
            row_alignment=alignment,
            shared_rows=m[f],
            shared_dim=dim[f],
            shared_dtype=recipe.shared_dtype,
        )
        features[f] = plan
        bucket, local = plan.remap
        specs = plan.tables()
        out = torch.empty_like(w)
        for b, spec in enumerate(specs):
            members = np.flatnonzero(bucket == b)
            if plan.shared_rows and b == len(specs) - 1:
                shared = _shared_means(w, _counts(counts.get(f), n[f]), plan.shared_slots(), ~stored, m[f])
                tables[spec.name] = shared
                out[members] = quantize_dequantize(shared, spec.dtype)[torch.from_numpy(local[members])]
            else:
                block = torch.empty(spec.num_embeddings, dim[f])
                block[torch.from_numpy(local[members])] = w[torch.from_numpy(members)]
                tables[spec.name] = block
                out[members] = quantize_dequantize(block, spec.dtype)[torch.from_numpy(local[members])]
        served[f] = out
    nbytes = sum(p.serving_bytes for p in features.values())
    assert nbytes <= budget_bytes, (nbytes, budget_bytes)  # by construction; a bug otherwise
    return Candidate(recipe, features, tables, served, nbytes)


def _counts(counts: np.ndarray | None, rows: int) -> np.ndarray:
    out = np.zeros(rows, dtype=np.float64)
    if counts is not None:
        c = np.asarray(counts, dtype=np.float64)[:rows]
        out[: c.size] = c
    return out


def fraction_label(fraction: float) -> str:
    """`1/16` for 0.0625; the decimal where the fraction is not 1/k."""
    k = 1 / fraction
    return f"1/{round(k)}" if math.isclose(k, round(k), rel_tol=1e-9) else f"{fraction:.4g}"
