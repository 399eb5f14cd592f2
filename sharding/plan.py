"""`DimensionPlan`: the one artefact every part speaks (DESIGN.md decisions 4–7).

A plan says, per sparse feature, how big its embedding is:

- **field-level**: one logical dim `d` for every row, stored in a table `t_<feature>` of `ceil4(d)` columns (FBGEMM's
  fused kernels need widths divisible by 4; the tail columns beyond `d` are never read);
- **row-level**: a logical dim per row. Rows are grouped into buckets of equal logical dim, each its own table
  `t_<feature>__d<dim>` (`ceil4(dim)` columns), with a row → (bucket, local row) remap. Each bucket's pooled vector
  is projected to the feature's `output_dim` — by zero padding (`pad`, no parameters) or a learned linear map
  (`linear`, counted in the budget) — and the buckets are summed (sum pooling is linear, so this equals pooling
  the per-row embeddings, each projected).

On disk a plan is a directory: `plan.json` (format, version, budget, features, tables, provenance, checksums) and,
for each row-level feature, `rows/<feature>.parquet` mapping each row (and its raw id, when the vocabulary is
known) to its dim, bucket and local row. `load` verifies the checksums, the version, dims > 0, and the budget; a
plan checked against a vocabulary must have one row per vocabulary row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

logger = logging.getLogger(__name__)

PLAN_FORMAT = "dimsearch-plan"
PLAN_VERSION = 3  # 3: row-level bytes (per-row dtypes, dim-0 rows in a shared table); 2: a per-feature `dtype`
READABLE_VERSIONS = (1, 2, 3)  # version 1 plans (no dtype) are read as fp32
PLAN_FILE = "plan.json"
BYTES_PER_PARAM = {"fp32": 4, "fp16": 2}
# The storage dtypes a table can be served in (TorchRec's quantised inference tables).
PRECISIONS = ("fp32", "fp16", "int8", "int4", "int2")
INT2_WIDTH = 8  # int2 rows: FBGEMM's row-wise quantiser needs their codes in whole 2-byte words
SHARED = "shared"  # the table name suffix of a feature's shared rows: `t_<feature>__shared`
ROW_ALIGNMENT = 16  # bytes; torchrec.inference's DEFAULT_ROW_ALIGNMENT (what GPU serving needs)
ROW_ALIGNMENTS = (1, 2, 4, 8, 16)  # FBGEMM's CPU inference kernels read rows at any of these
Projection = Literal["pad", "linear"]


class PlanError(ValueError):
    """A dimension plan that is malformed, tampered with, over its budget or inconsistent with the data."""


def physical_dim(dim: int) -> int:
    """The stored width of a logical dim: the next multiple of 4 (FBGEMM's fused kernels need it)."""
    return 4 * math.ceil(dim / 4)


def row_bytes(dim: int, dtype: str, alignment: int = ROW_ALIGNMENT) -> int:
    """Bytes of one served row of `dim` columns in FBGEMM's inference layout: int8/int4/int2 rows carry a 4-byte fp16
    scale and bias, and every row is padded to `alignment` bytes (TorchRec's default 16; FBGEMM's CPU kernels
    also read rows aligned to 1, 2, 4 or 8).

    Raises:
        PlanError: `dtype` is not one of `PRECISIONS`.
    """
    check_precision(dtype, "dtype")
    raw = {
        "fp32": 4 * dim,
        "fp16": 2 * dim,
        "int8": dim + 4,
        "int4": math.ceil(dim / 2) + 4,
        "int2": math.ceil(dim / 4) + 4,
    }[dtype]
    return alignment * math.ceil(raw / alignment)


def check_precision(dtype: object, where: str) -> None:
    """Raise `PlanError` naming `where` unless `dtype` is a serving precision."""
    if dtype not in PRECISIONS:
        raise PlanError(f"{where} is {dtype!r}, expected one of {list(PRECISIONS)}")


BUDGET_UNITS = ("parameters", "bytes", "logical", "serving_bytes")


@dataclass(frozen=True)
class Budget:
    """An embedding memory budget.

    Args:
        value: the budget, in `unit`s.
        unit: `parameters` (physical embedding parameters plus learned projections), `bytes` (the same in
            bytes of the plan's training dtype; the sharding planner also checks its own estimate, optimizer state
            included, against a bytes budget), `logical` (the sum of every row's logical dim plus learned
            projections: the row-level papers' "kept parameters" accounting, in which a row of dim 6 costs 6
            although it is stored in 8 columns; the plan still reports its physical parameters and bytes), or
            `serving_bytes` (what serving stores: every table's rows in its own dtype, scale and bias included,
            aligned to the plan's `row_alignment`, plus the fp32 projections; `DimensionPlan.serving_bytes`).
    """

    value: int
    unit: Literal["parameters", "bytes", "logical", "serving_bytes"] = "parameters"

    def __post_init__(self) -> None:
        if self.unit not in BUDGET_UNITS:
            raise PlanError(f"budget unit is '{self.unit}', expected one of {list(BUDGET_UNITS)}")
        if self.value <= 0:
            raise PlanError(f"budget is {self.value} {self.unit}; it must be positive")


@dataclass(frozen=True)
class TableSpec:
    """One embedding table of a plan: what `sharding/` builds an `EmbeddingBagConfig` from.

    Args:
        name: `t_<feature>` (field-level) or `t_<feature>__d<dim>` (a row-level bucket).
        feature: the sparse feature the table serves.
        key: the KJT key the table reads: the feature itself, or `<feature>__d<dim>` for a bucket.
        num_embeddings: rows.
        logical_dim: the searched dim.
        embedding_dim: the stored width, `ceil4(logical_dim)`.
        dtype: the dtype serving stores it in (training is fp32).
        row_alignment: the bytes each served row is padded to.
    """

    name: str
    feature: str
    key: str
    num_embeddings: int
    logical_dim: int
    embedding_dim: int
    dtype: str = "fp32"
    row_alignment: int = ROW_ALIGNMENT

    @property
    def serving_bytes(self) -> int:
        """Its rows as served: `num_embeddings × row_bytes(embedding_dim, dtype, row_alignment)`."""
        return self.num_embeddings * row_bytes(self.embedding_dim, self.dtype, self.row_alignment)


@dataclass(frozen=True, eq=False)
class FeaturePlan:
    """The size of one feature's embedding.

    Args:
        feature: the sparse feature.
        num_embeddings: rows (the vocabulary capacity, fallback row included).
        output_dim: the width the model sees for this feature.
        dim: the logical dim of every row (field-level), or None for a row-level plan.
        row_dims: the logical dim of each row (row-level), or None for a field-level plan. Dim 0 means the row is
            not stored: it is served by row `shared_slots()[row]` of the feature's shared table (frequency-based
            admission and the hashing trick, expressed as a dimension).
        projection: how a row-level bucket reaches `output_dim`: `pad` (zeros) or `linear` (a learned map).
        raw_ids: optional raw id of each row (row 0, the fallback row, has raw id -1), saved with row-level plans.
        dtype: the dtype serving stores every table of the feature in (`PRECISIONS`); training stays fp32, and
            the export quantises (`jobs.export`).
        row_alignment: the bytes each served row is padded to (`ROW_ALIGNMENTS`; one for the whole plan).
        row_dtypes: row-level only: each row's serving dtype, as an index into `PRECISIONS` (None: every row in
            `dtype`). Rows of one dim and one dtype form one table, `t_<feature>__d<dim>_<dtype>`.
        shared_rows: rows of the shared table `t_<feature>__shared` that the dim-0 rows are hashed into (0: no
            dim-0 rows). 1 is one shared fallback row for every unstored id.
        shared_dim: the shared table's logical dim (0: `output_dim`).
        shared_dtype: the shared table's serving dtype (None: `dtype`).
    """

    feature: str
    num_embeddings: int
    output_dim: int
    dim: int | None = None
    row_dims: np.ndarray | None = None
    projection: Projection = "pad"
    raw_ids: np.ndarray | None = field(default=None, repr=False)
    dtype: str = "fp32"
    row_alignment: int = ROW_ALIGNMENT
    row_dtypes: np.ndarray | None = field(default=None, repr=False)
    shared_rows: int = 0
    shared_dim: int = 0
    shared_dtype: str | None = None

    def __post_init__(self) -> None:
        where = f"feature '{self.feature}'"
        check_precision(self.dtype, f"{where}: dtype")
        if self.row_alignment not in ROW_ALIGNMENTS:
            raise PlanError(f"{where}: row_alignment is {self.row_alignment!r}, expected one of {list(ROW_ALIGNMENTS)}")
        if self.num_embeddings < 1:
            raise PlanError(f"{where}: num_embeddings is {self.num_embeddings}, expected >= 1")
        if (self.dim is None) == (self.row_dims is None):
            raise PlanError(f"{where}: give exactly one of dim (field-level) or row_dims (row-level)")
        if self.dim is not None and self.dim <= 0:
            raise PlanError(f"{where}: dim is {self.dim}; dims must be > 0")
        if self.row_dims is None and (self.row_dtypes is not None or self.shared_rows):
            raise PlanError(f"{where}: row_dtypes and shared_rows need a row-level plan (row_dims)")
        if self.row_dims is not None:
            rd = np.asarray(self.row_dims)
            if rd.shape != (self.num_embeddings,):
                raise PlanError(f"{where}: row_dims has shape {rd.shape}, expected ({self.num_embeddings},)")
            if rd.size and rd.min() < 0:
                raise PlanError(f"{where}: row {int(rd.argmin())} has dim {int(rd.min())}; dims must be >= 0")
            unstored = int((rd == 0).sum())
            if unstored and self.shared_rows < 1:
                raise PlanError(
                    f"{where}: {unstored:,} rows have dim 0 (not stored) but shared_rows is {self.shared_rows}. "
                    "Give shared_rows >= 1: the shared table that serves them"
                )
            if self.shared_rows < 0 or (self.shared_rows and not unstored):
                raise PlanError(f"{where}: shared_rows is {self.shared_rows} but no row has dim 0; set it to 0")
            if self.projection == "pad" and max(int(rd.max()), self.shared_dim) > self.output_dim:
                raise PlanError(
                    f"{where}: a row has dim {max(int(rd.max()), self.shared_dim)} > output_dim {self.output_dim}; "
                    "zero padding cannot shrink. Raise output_dim or use projection 'linear'"
                )
            if self.row_dtypes is not None:
                rt = np.asarray(self.row_dtypes)
                if rt.shape != rd.shape or (rt.size and (rt.min() < 0 or rt.max() >= len(PRECISIONS))):
                    raise PlanError(
                        f"{where}: row_dtypes must hold one index into {list(PRECISIONS)} per row "
                        f"({self.num_embeddings})"
                    )
        if self.shared_dim < 0:
            raise PlanError(f"{where}: shared_dim is {self.shared_dim}; it must be >= 0 (0: output_dim)")
        if self.shared_dtype is not None:
            check_precision(self.shared_dtype, f"{where}: shared_dtype")
        if self.projection not in ("pad", "linear"):
            raise PlanError(f"{where}: projection is '{self.projection}', expected 'pad' or 'linear'")
        if self.output_dim <= 0:
            raise PlanError(f"{where}: output_dim is {self.output_dim}; it must be > 0")
        if self.dim is not None and self.dim != self.output_dim:
            raise PlanError(
                f"{where}: a field-level plan's output_dim ({self.output_dim}) must equal its dim ({self.dim})"
            )
        if self.raw_ids is not None and np.asarray(self.raw_ids).shape != (self.num_embeddings,):
            raise PlanError(f"{where}: raw_ids must have one entry per row ({self.num_embeddings})")
        if narrow := sorted({d for d, q in self._buckets if q == "int2" and physical_dim(d) % INT2_WIDTH}):
            raise PlanError(
                f"{where}: int2 tables of dims {narrow}: FBGEMM packs int2 rows into 2-byte words, so their stored "
                f"width must be a multiple of {INT2_WIDTH}. Serve them in int4, or give them dim >= {INT2_WIDTH}"
            )

    @property
    def row_level(self) -> bool:
        return self.row_dims is not None

    @cached_property
    def _buckets(self) -> list[tuple[int, str]]:
        """(logical dim, dtype) of each table: the stored buckets by dim then dtype, then the shared table."""
        if self.row_dims is None:
            assert self.dim is not None
            return [(self.dim, self.dtype)]
        stored = np.asarray(self.row_dims) > 0
        out: list[tuple[int, str]] = []
        if stored.any():
            pairs = np.unique(np.stack([np.asarray(self.row_dims)[stored], self._row_codes[stored]]), axis=1)
            out = [(int(d), PRECISIONS[int(c)]) for d, c in pairs.T]
        if self.shared_rows:
            out.append((self.shared_dim or self.output_dim, self.shared_dtype or self.dtype))
        return out

    @cached_property
    def _row_codes(self) -> np.ndarray:
        if self.row_dtypes is not None:
            return np.asarray(self.row_dtypes, dtype=np.int64)
        return np.full(self.num_embeddings, PRECISIONS.index(self.dtype), dtype=np.int64)

    @cached_property
    def bucket_dims(self) -> list[int]:
        """Each table's logical dim, in `tables()` order (row-level: the distinct dims ascending, unless per-row
        dtypes split a dim into several tables; the shared table last); `[dim]` for a field-level plan."""
        return [d for d, _ in self._buckets]

    def shared_slots(self) -> np.ndarray:
        """Per row, the row of the shared table that serves it if its dim is 0: `splitmix64(row) mod
        shared_rows` (deterministic, so serving maps an id exactly as training and export did)."""
        from pipeline.splits import splitmix64

        rows = np.arange(self.num_embeddings, dtype=np.uint64)
        return (splitmix64(rows) % np.uint64(max(1, self.shared_rows))).astype(np.int64)

    @cached_property
    def remap(self) -> tuple[np.ndarray, np.ndarray]:
        """Row → (bucket index into `tables()`, local row within the bucket's table), stored rows kept in order;
        dim-0 rows go to the shared table (last) at their `shared_slots`."""
        if self.row_dims is None:
            return np.zeros(self.num_embeddings, dtype=np.int64), np.arange(self.num_embeddings, dtype=np.int64)
        dims = np.asarray(self.row_dims)
        stored = dims > 0
        keys = [
            d * len(PRECISIONS) + PRECISIONS.index(q)
            for d, q in self._buckets[: len(self._buckets) - bool(self.shared_rows)]
        ]
        row_key = dims * len(PRECISIONS) + self._row_codes
        bucket = np.searchsorted(np.asarray(keys, dtype=np.int64), row_key).astype(np.int64)
        bucket[~stored] = len(self._buckets) - 1
        local = np.empty(self.num_embeddings, dtype=np.int64)
        nstored = len(keys)
        order = np.argsort(np.where(stored, bucket, nstored), kind="stable")
        counts = np.bincount(bucket[stored], minlength=nstored)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if nstored else np.zeros(0, dtype=np.int64)
        n = int(stored.sum())
        first = order[:n]
        local[first] = np.arange(n) - np.repeat(starts, counts)
        if self.shared_rows:
            local[~stored] = self.shared_slots()[~stored]
        return bucket, local

    def _table_name(self, dim: int, dtype: str, shared: bool) -> tuple[str, str]:
        suffix = SHARED if shared else f"d{dim}" + ("" if self.row_dtypes is None else f"_{dtype}")
        return f"t_{self.feature}__{suffix}", f"{self.feature}__{suffix}"

    def tables(self) -> list[TableSpec]:
        if self.row_dims is None:
            assert self.dim is not None
            return [
                TableSpec(
                    f"t_{self.feature}",
                    self.feature,
                    self.feature,
                    self.num_embeddings,
                    self.dim,
                    physical_dim(self.dim),
                    self.dtype,
                    self.row_alignment,
                )
            ]
        stored = np.asarray(self.row_dims) > 0
        counts = np.bincount(self.remap[0][stored], minlength=len(self._buckets)).tolist()
        if self.shared_rows:
            counts[-1] = self.shared_rows
        out = []
        for i, ((d, q), n) in enumerate(zip(self._buckets, counts, strict=True)):
            name, key = self._table_name(d, q, self.shared_rows > 0 and i == len(self._buckets) - 1)
            out.append(TableSpec(name, self.feature, key, int(n), d, physical_dim(d), q, self.row_alignment))
        return out

    @property
    def projection_parameters(self) -> int:
        if not self.row_level or self.projection == "pad":
            return 0
        return sum(d * self.output_dim for d in self.bucket_dims)

    @property
    def parameters(self) -> int:
        """Physical embedding parameters plus learned projection parameters."""
        return sum(t.num_embeddings * t.embedding_dim for t in self.tables()) + self.projection_parameters

    @property
    def serving_bytes(self) -> int:
        """The bytes serving stores: its tables in their dtypes (`TableSpec.serving_bytes`) plus fp32 projections."""
        return sum(t.serving_bytes for t in self.tables()) + 4 * self.projection_parameters

    def with_dtype(self, dtype: str | None = None, row_alignment: int | None = None) -> FeaturePlan:
        """The same sizes, served in `dtype` (None: its own; a dtype given replaces per-row and shared dtypes
        too) with rows aligned to `row_alignment` (None: its own)."""
        if dtype is None:
            return dataclasses.replace(self, row_alignment=row_alignment or self.row_alignment)
        return dataclasses.replace(
            self, dtype=dtype, row_dtypes=None, shared_dtype=None, row_alignment=row_alignment or self.row_alignment
        )

    @property
    def dtype_label(self) -> str:
        """Its serving dtype, or `mixed` when its tables differ."""
        used = {t.dtype for t in self.tables()}
        return used.pop() if len(used) == 1 else "mixed"

    @property
    def logical_parameters(self) -> int:
        if self.row_dims is None:
            assert self.dim is not None
            return self.num_embeddings * self.dim
        return int(np.asarray(self.row_dims).sum()) + self.shared_rows * (self.shared_dim or self.output_dim)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "feature": self.feature,
            "num_embeddings": self.num_embeddings,
            "output_dim": self.output_dim,
            "level": "row" if self.row_level else "field",
            "projection": self.projection,
            "dtype": self.dtype,
            "row_alignment": self.row_alignment,
            "parameters": self.parameters,
            "serving_bytes": self.serving_bytes,
            "tables": [t.__dict__ for t in self.tables()],
        }
        if self.dim is not None:
            d["dim"] = self.dim
        if self.row_dtypes is not None:
            d["row_dtypes"] = True
        if self.shared_rows:
            d["shared"] = {"rows": self.shared_rows, "dim": self.shared_dim, "dtype": self.shared_dtype}
        return d

    def rows_frame(self) -> pl.DataFrame:
        bucket, local = self.remap
        frame = pl.DataFrame(
            {
                "row": np.arange(self.num_embeddings, dtype=np.int64),
                "raw_id": np.asarray(self.raw_ids, dtype=np.int64) if self.raw_ids is not None else None,
                "dim": np.asarray(self.row_dims, dtype=np.int64),
                "bucket": bucket,
                "local_row": local,
            }
        )
        if self.row_dtypes is not None:
            frame = frame.with_columns(
                pl.Series("dtype", np.asarray(PRECISIONS)[self._row_codes], dtype=pl.Enum(list(PRECISIONS)))
            )
        return frame


@dataclass(frozen=True, eq=False)
class DimensionPlan:
    """Per-feature embedding sizes under a budget, with provenance.

    Args:
        features: one `FeaturePlan` per sparse feature, in the model's feature order.
        budget: the budget the plan must meet, or None.
        dtype: the training storage dtype the `bytes` unit counts in (each feature's serving dtype is its own
            `FeaturePlan.dtype`).
        provenance: method, data days, config, metrics — whatever explains where the plan came from.
    """

    features: tuple[FeaturePlan, ...]
    budget: Budget | None = None
    dtype: str = "fp32"
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [f.feature for f in self.features]
        if not names:
            raise PlanError("a plan needs at least one feature")
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise PlanError(f"features repeat in the plan: {dup}")
        if self.dtype not in BYTES_PER_PARAM:
            raise PlanError(f"dtype is '{self.dtype}', expected one of {sorted(BYTES_PER_PARAM)}")
        if len({f.row_alignment for f in self.features}) > 1:
            raise PlanError(
                "the features' row alignments differ "
                f"({ {f.feature: f.row_alignment for f in self.features} }): serving aligns every table alike"
            )

    @classmethod
    def field_level(
        cls,
        dims: Mapping[str, int],
        num_embeddings: Mapping[str, int],
        *,
        budget: Budget | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> DimensionPlan:
        """A plan with one dim per feature, in the order of `dims`."""
        if missing := sorted(set(dims) - set(num_embeddings)):
            raise PlanError(f"no num_embeddings for features {missing}")
        return cls(
            tuple(FeaturePlan(f, int(num_embeddings[f]), int(d), dim=int(d)) for f, d in dims.items()),
            budget,
            provenance=provenance or {},
        )

    @property
    def feature_names(self) -> list[str]:
        return [f.feature for f in self.features]

    def __getitem__(self, feature: str) -> FeaturePlan:
        for f in self.features:
            if f.feature == feature:
                return f
        raise KeyError(f"no feature '{feature}' in the plan (have {self.feature_names})")

    def tables(self) -> list[TableSpec]:
        return [t for f in self.features for t in f.tables()]

    @property
    def parameters(self) -> int:
        return sum(f.parameters for f in self.features)

    @property
    def logical_parameters(self) -> int:
        """Logical embedding parameters (the sum of every row's searched dim) plus learned projections."""
        return sum(f.logical_parameters + f.projection_parameters for f in self.features)

    @property
    def bytes(self) -> int:
        return self.parameters * BYTES_PER_PARAM[self.dtype]

    @property
    def serving_bytes(self) -> int:
        """What serving stores: every table in its feature's dtype (rows aligned to 16 bytes, the quantised kinds'
        scale and bias included) plus the fp32 projections. Equals the bytes of the bundle's `serving/` tensors."""
        return sum(f.serving_bytes for f in self.features)

    @property
    def dtypes(self) -> dict[str, str]:
        """Per table, its serving dtype."""
        return {t.name: t.dtype for t in self.tables()}

    @property
    def row_alignment(self) -> int:
        """The bytes every served row is padded to."""
        return self.features[0].row_alignment

    def with_dtypes(
        self, dtypes: str | Mapping[str, str] | None = None, row_alignment: int | None = None
    ) -> DimensionPlan:
        """The same sizes with every feature (a str) or the named features (a mapping) served in other dtypes, and
        every row aligned to `row_alignment` (None: as before).

        Raises:
            PlanError: an unknown feature, dtype or alignment.
        """
        chosen = {f: dtypes for f in self.feature_names} if isinstance(dtypes, str) else dict(dtypes or {})
        if unknown := sorted(set(chosen) - set(self.feature_names)):
            raise PlanError(f"dtypes name features {unknown} that the plan lacks (its features: {self.feature_names})")
        if all(chosen.get(f.feature, f.dtype) == f.dtype for f in self.features) and row_alignment in (
            None,
            self.row_alignment,
        ):
            return self  # nothing changes (a row-level feature's remap is not computed again)
        features = tuple(f.with_dtype(chosen.get(f.feature), row_alignment) for f in self.features)
        return DimensionPlan(features, self.budget, self.dtype, self.provenance)

    def budget_used(self) -> int:
        """The plan's size in its budget's unit."""
        unit = None if self.budget is None else self.budget.unit
        if unit == "bytes":
            return self.bytes
        if unit == "logical":
            return self.logical_parameters
        if unit == "serving_bytes":
            return self.serving_bytes
        return self.parameters

    def check_budget(self) -> None:
        """Raise `PlanError` with the per-feature breakdown if the plan is over its budget."""
        if self.budget is None or self.budget_used() <= self.budget.value:
            return
        serving = self.budget.unit == "serving_bytes"
        per = ", ".join(
            f"{f.feature}={f.serving_bytes if serving else f.parameters:,}" + (f" ({f.dtype_label})" if serving else "")
            for f in self.features
        )
        raise PlanError(
            f"the plan needs {self.budget_used():,} {self.budget.unit} but the budget is {self.budget.value:,} "
            f"({'serving bytes' if serving else 'parameters'} per feature: {per}). Possible solutions: raise the "
            "budget, serve in a smaller dtype, or search again under it"
        )

    def check_vocabulary(self, num_rows: Mapping[str, int], raw_ids: Mapping[str, np.ndarray] | None = None) -> None:
        """Raise `PlanError` naming the feature if the plan's rows do not fit the data's vocabularies.

        Args:
            num_rows: per feature, the rows the vocabulary uses (fallback row included).
            raw_ids: per feature, the vocabulary's raw id of each row from row 1 (checked against a row-level plan's).
        """
        if missing := sorted(set(self.feature_names) - set(num_rows)):
            raise PlanError(f"the plan sizes features {missing} that the dataset does not have ({sorted(num_rows)})")
        for f in self.features:
            if num_rows[f.feature] > f.num_embeddings:
                raise PlanError(
                    f"feature '{f.feature}': the vocabulary has {num_rows[f.feature]:,} rows but the plan only "
                    f"{f.num_embeddings:,}. Re-plan with the current vocabulary"
                )
            if f.row_level and raw_ids is not None and f.raw_ids is not None and f.feature in raw_ids:
                vocab_ids = np.asarray(raw_ids[f.feature])
                plan_ids = np.asarray(f.raw_ids)[1 : vocab_ids.size + 1]
                if not np.array_equal(plan_ids, vocab_ids):
                    bad = int(np.flatnonzero(plan_ids != vocab_ids)[0]) + 1
                    raise PlanError(
                        f"feature '{f.feature}': row {bad} is raw id {int(plan_ids[bad - 1])} in the plan but "
                        f"{int(vocab_ids[bad - 1])} in the vocabulary. The plan was made for other data"
                    )

    def summary(self) -> str:
        """A per-feature table like TorchRec's planner report."""
        lines = [
            f"{'feature':<12}{'level':<7}{'dims':<22}{'rows':>11}{'params':>13}{'MiB':>9}{'serving':>8}"
            f"{'served MiB':>11}"
        ]
        for f in self.features:
            if f.row_level:
                rd = np.asarray(f.row_dims)
                dims = f"{rd.min()}..{rd.max()} (mean {rd.mean():.1f})"
            else:
                dims = f"{f.dim} (stored {physical_dim(f.dim or 0)})"
            mib = f.parameters * BYTES_PER_PARAM[self.dtype] / 2**20
            lines.append(
                f"{f.feature:<12}{'row' if f.row_level else 'field':<7}{dims:<22}{f.num_embeddings:>11,}"
                f"{f.parameters:>13,}{mib:>9.2f}{f.dtype_label:>8}{f.serving_bytes / 2**20:>11.2f}"
            )
        total = (
            f"total {self.parameters:,} parameters, {self.bytes / 2**20:.2f} MiB to train, "
            f"{self.serving_bytes / 2**20:.2f} MiB served"
        )
        if self.budget is not None:
            share = 100 * self.budget_used() / self.budget.value
            total += f"; budget {self.budget.value:,} {self.budget.unit} ({share:.1f}% used)"
        return "\n".join([*lines, total])

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "dtype": self.dtype,
            "budget": None if self.budget is None else {"value": self.budget.value, "unit": self.budget.unit},
            "parameters": self.parameters,
            "logical_parameters": self.logical_parameters,
            "bytes": self.bytes,
            "serving_bytes": self.serving_bytes,
            "row_alignment": self.row_alignment,
            "features": [f.to_json() for f in self.features],
            "provenance": dict(self.provenance),
        }

    def save(self, directory: str | Path) -> Path:
        """Write the plan atomically (temp dir + rename); checksums cover the JSON body and every row file."""
        from pipeline.dataset import atomic_directory

        directory = Path(directory)
        with atomic_directory(directory, overwrite=True) as tmp:
            body = self.to_json()
            files: dict[str, str] = {}
            for f in self.features:
                if f.row_level:
                    rel = f"rows/{f.feature}.parquet"
                    (tmp / "rows").mkdir(exist_ok=True)
                    f.rows_frame().write_parquet(tmp / rel)
                    files[rel] = sha256_file(tmp / rel)
            body["checksums"] = {"files": files, "body": _sha256_json(body)}
            (tmp / PLAN_FILE).write_text(json.dumps(body, indent=1, default=_json_default))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> DimensionPlan:
        """Read and verify a saved plan.

        Raises:
            PlanError: missing file, unknown format or version, checksum mismatch, bad dims, or over budget.
        """
        directory = Path(directory)
        path = directory / PLAN_FILE
        if not path.is_file():
            raise PlanError(f"{path}: no plan here. Point at a directory written by DimensionPlan.save")
        try:
            body = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not valid JSON ({e}). The file is damaged: export the plan again") from e
        if body.get("format") != PLAN_FORMAT:
            raise PlanError(
                f"{path}: format is {body.get('format')!r}, expected {PLAN_FORMAT!r}. Point at a plan written by "
                "DimensionPlan.save"
            )
        if body.get("version") not in READABLE_VERSIONS:
            raise PlanError(
                f"{path}: plan version {body.get('version')} is not supported (this dimsearch reads versions "
                f"{list(READABLE_VERSIONS)}). Export the plan again with this version"
            )
        checksums = body.pop("checksums", None)
        if not isinstance(checksums, dict) or checksums.get("body") != _sha256_json(body):
            raise PlanError(
                f"{path}: checksum mismatch: the plan was edited or damaged after it was saved. Export it again"
            )
        for rel, digest in checksums.get("files", {}).items():
            if not (directory / rel).is_file():
                raise PlanError(
                    f"{directory / rel}: row file listed in the plan is missing. Restore it, or export the plan again"
                )
            if sha256_file(directory / rel) != digest:
                raise PlanError(
                    f"{directory / rel}: checksum mismatch: the row file was changed after the plan was saved. "
                    "Restore it, or export the plan again"
                )
        features: list[FeaturePlan] = []
        for fj in body["features"]:
            row_dims = raw_ids = row_dtypes = None
            shared = fj.get("shared") or {}
            if fj["level"] == "row":
                rows = pl.read_parquet(directory / f"rows/{fj['feature']}.parquet")
                if rows.height != fj["num_embeddings"]:
                    raise PlanError(
                        f"{directory}/rows/{fj['feature']}.parquet: {rows.height} rows, "
                        f"plan says {fj['num_embeddings']}"
                    )
                row_dims = rows.get_column("dim").to_numpy()
                raw = rows.get_column("raw_id")
                raw_ids = None if raw.null_count() == raw.len() else raw.to_numpy()
                if fj.get("row_dtypes"):
                    if "dtype" not in rows.columns:
                        raise PlanError(
                            f"{directory}/rows/{fj['feature']}.parquet: no 'dtype' column, but the plan gives this "
                            "feature per-row dtypes. Export the plan again"
                        )
                    codes = {q: i for i, q in enumerate(PRECISIONS)}
                    try:
                        row_dtypes = (
                            rows.get_column("dtype").cast(pl.String).replace_strict(codes, return_dtype=pl.Int64)
                        ).to_numpy()
                    except pl.exceptions.InvalidOperationError as e:
                        raise PlanError(
                            f"{directory}/rows/{fj['feature']}.parquet: a row's dtype is not one of "
                            f"{list(PRECISIONS)} ({e}). Export the plan again"
                        ) from e
            try:
                features.append(
                    FeaturePlan(
                        fj["feature"],
                        int(fj["num_embeddings"]),
                        int(fj["output_dim"]),
                        dim=fj.get("dim"),
                        row_dims=row_dims,
                        projection=fj["projection"],
                        raw_ids=raw_ids,
                        dtype=fj.get("dtype", "fp32"),
                        row_alignment=fj.get("row_alignment", ROW_ALIGNMENT),
                        row_dtypes=row_dtypes,
                        shared_rows=int(shared.get("rows", 0)),
                        shared_dim=int(shared.get("dim", 0)),
                        shared_dtype=shared.get("dtype"),
                    )
                )
            except PlanError as e:
                raise PlanError(f"{path}: {e}") from e
        budget = Budget(**body["budget"]) if body.get("budget") else None
        plan = cls(tuple(features), budget, body.get("dtype", "fp32"), body.get("provenance", {}))
        try:
            plan.check_budget()
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from e
        return plan


def _json_default(o: object) -> object:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _sha256_json(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=_json_default).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def uniform_plan(features: Sequence[str], num_embeddings: Mapping[str, int], dim: int, **kw: Any) -> DimensionPlan:
    """Every feature at the same field-level dim (the FIXED / FDE baseline)."""
    return DimensionPlan.field_level({f: dim for f in features}, num_embeddings, **kw)
