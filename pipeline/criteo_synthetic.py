"""A Criteo-like synthetic stream at industrial scale, written one chunk at a time in bounded memory.

Generate a dataset (30 days of 1M rows, fields of up to 10M ids)::

    python -m pipeline.criteo_synthetic --out data/criteo-synthetic --days 30 --rows-per-day 1000000 --seed 0

Memory does not grow with `--rows-per-day` or `--days`: each chunk of at most `--chunk-rows` rows is generated,
written as its own zstd-compressed `day=YYYY-MM-DD/part-NNNNN.parquet` and dropped before the next one, and no
per-id table is held (popularity, drift and the planted effects are closed-form functions of the id's rank).

Data model (one row = one impression, rows i.i.d. within a day; the same config gives the same data, the chunk
size being part of the config):

* Columns: `label` (float32 0/1), dense `i1..i13` (float32), sparse `c1..c26` (int64; `multi_hot` fields, by
  default `c24..c26`, are list<int64> with 1..`max_multi_hot` ids per row).
* Cardinalities: field `c_k` has `round(min_cardinality · (max_cardinality / min_cardinality) ** (q_k / 25))`
  ids on a day, log-uniform from tens to `max_cardinality`, where `q_k` (`CARDINALITY_RANK`) puts the fields in
  the size order of the Criteo Kaggle fields (`c3` the largest, `c9` the smallest).
* Popularity: p(rank r) ∝ (r + 1) ** -zipf on ranks 0..N-1, drawn by inverse CDF: exact (`np.searchsorted`)
  on the first `_HEAD_RANKS` ranks, and the inverse of the continuous integral of x ** -zipf (midpoint
  corrected) on the tail, so a 10M-id field costs no 10M-entry table.
* Drift: rank r of a field holds on day d the id of index `r + N · floor(d · drift + phase(r))`, with
  `phase(r)` a hash-uniform in [0, 1): each day a `drift` fraction of the ranks, head ranks included, gets an
  id never seen before, so new ids appear and the popular ids change.
* Raw ids: `((index ^ salt(seed, field)) · C) mod 2**63` with C odd — a bijection, so distinct indices give
  distinct, large, non-contiguous non-negative int64 ids (a vocabulary's hash path is needed downstream).
* Dense: `i_j = log1p(floor(expm1(mu_j + sigma_j · z_j)))` with z_j ~ N(0, 1): log-normal-ish counts, stored
  as `log(1 + count)` like `pipeline.ingest` stores Criteo's I1..I13.
* Label: logit = bias + Σ_f w_f · e_f + Σ_j v_j · z_j; label ~ Bernoulli(sigmoid(logit)). e_f is the id's
  effect: a standard normal from a hash of (seed, field, raw id) (`pipeline.synthetic.raw_latents`: no table),
  standardised to mean 0 and variance 1 under day 0's popularity; a multi-hot field's e_f is the sum of its
  ids' effects over sqrt(#ids). The `signal_fields` carry w = `signal_weight` · `signal_decay` ** i (by
  default c1 1.0, c2 0.8, c3 0.64, c4 0.51, c7 0.41, c10 0.33, c24 0.26), every other field 0. The dense
  weights are v_j = 0.4 · (-0.75) ** j for j < 6, else 0. `bias` is solved so that the expected CTR is about
  `target_ctr` (a normal approximation of the logit). The weights are recorded as
  `meta.criteo_synthetic.field_importance` in `dataset.yaml`.
* User and item: the spec's `user_field` and `item_field` (the rows that the row-level searches SCALL, ESAPN, CIESS
  and MD size) name two single-hot fields, by default `c3` and `c12`, the two largest (10M and 5.75M ids a day at
  the default `max_cardinality`), so that a search sizes the largest tables; `c3` carries signal, `c12` none. They
  are labels in the spec only: the data does not depend on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset import DATASET_OUTPUT, DAY_COLUMN, atomic_directory, check_output_dir
from pipeline.errors import DatasetError
from pipeline.spec import DatasetSpec, SparseField
from pipeline.synthetic import add_config_flags, raw_latents

logger = logging.getLogger(__name__)

LABEL = "label"
NUM_DENSE = 13
NUM_SPARSE = 26
DENSE: tuple[str, ...] = tuple(f"i{j}" for j in range(1, NUM_DENSE + 1))
SPARSE: tuple[str, ...] = tuple(f"c{k}" for k in range(1, NUM_SPARSE + 1))
# The size order (0 smallest .. 25 largest) of c1..c26: that of the Criteo Kaggle fields' cardinalities.
CARDINALITY_RANK: tuple[int, ...] = (
    *(11, 9, 25, 21, 8, 5, 16, 10, 0, 18, 15, 24, 13),  # c1..c13
    *(6, 17, 22, 2, 14, 12, 1, 23, 4, 3, 20, 7, 19),  # c14..c26
)
# Dense columns: log1p(count) = mu + sigma · z; the first six carry signal.
_DENSE_MU = np.linspace(0.5, 4.0, NUM_DENSE)
_DENSE_SIGMA = np.linspace(0.6, 1.4, NUM_DENSE)[::-1].copy()
_DENSE_WEIGHTS = tuple(0.4 * (-0.75) ** j if j < 6 else 0.0 for j in range(NUM_DENSE))

_HEAD_RANKS = 4096  # ranks whose popularity is tabulated exactly; beyond, the continuous inverse CDF
_ID_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so `x * C mod 2**63` is a bijection on [0, 2**63)
_ID_MASK = np.uint64((1 << 63) - 1)
_MAX_CARDINALITY = 1 << 40  # keeps index = r + N · epoch far inside 63 bits for any number of days


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class CriteoSyntheticConfig:
    """How to generate the Criteo-like stream. See the module docstring for the data model.

    Args:
        days: number of days.
        rows_per_day: rows (impressions) per day.
        chunk_rows: rows per generated and written chunk (one Parquet file each); bounds the memory used.
        max_cardinality: ids per day of the largest field.
        min_cardinality: ids per day of the smallest field.
        zipf: popularity exponent: p(rank r) ∝ (r + 1) ** -zipf (> 0).
        drift: the fraction of each field's popularity ranks that gets a new id each day.
        multi_hot: the fields stored as list<int64>.
        max_multi_hot: a multi-hot row has a uniform number of ids in [1, max_multi_hot].
        signal_fields: the fields that carry signal, most important first.
        signal_weight: the logit weight (standard deviation of the term) of the first signal field.
        signal_decay: each further signal field's weight is the previous one's times this.
        target_ctr: the approximate expected mean label.
        start_date: the date of the first day.
        seed: the random seed.
        user_field: the single-hot field the spec names as `user_field` (None: none). The default `c3` is the
            largest field; only the spec changes with it, not the data.
        item_field: the single-hot field the spec names as `item_field` (None: none); by default `c12`, the
            second largest.
    """

    days: int = 7
    rows_per_day: int = 1_000_000
    chunk_rows: int = 1_000_000
    max_cardinality: int = 10_000_000
    min_cardinality: int = 10
    zipf: float = 1.1
    drift: float = 0.05
    multi_hot: tuple[str, ...] = ("c24", "c25", "c26")
    max_multi_hot: int = 5
    signal_fields: tuple[str, ...] = ("c1", "c2", "c3", "c4", "c7", "c10", "c24")
    signal_weight: float = 1.0
    signal_decay: float = 0.8
    target_ctr: float = 0.25
    start_date: dt.date = dt.date(2024, 1, 1)
    seed: int = 0
    user_field: str | None = "c3"
    item_field: str | None = "c12"

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("days", "rows_per_day", "chunk_rows", "max_multi_hot"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                problems.append(f"{name} is {value!r}, expected an integer >= 1: pass a positive count")
        for name in ("min_cardinality", "max_cardinality"):
            value = getattr(self, name)
            if not _is_int(value) or not 2 <= value <= _MAX_CARDINALITY:
                problems.append(f"{name} is {value!r}, expected an integer in [2, 2**40]: e.g. 10_000_000")
        if (
            _is_int(self.min_cardinality)
            and _is_int(self.max_cardinality)
            and self.min_cardinality > self.max_cardinality
        ):
            problems.append(
                f"min_cardinality {self.min_cardinality} exceeds max_cardinality {self.max_cardinality}: "
                "lower min_cardinality or raise max_cardinality"
            )
        if not _is_real(self.zipf) or not 0.0 < self.zipf <= 5.0:
            problems.append(f"zipf is {self.zipf!r}, expected a number in (0, 5]: e.g. 1.1")
        if not _is_real(self.drift) or not 0.0 <= self.drift <= 1.0:
            problems.append(f"drift is {self.drift!r}, expected a fraction in [0, 1]: e.g. 0.05 for 5%")
        for name in ("multi_hot", "signal_fields"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not set(value) <= set(SPARSE):
                problems.append(f"{name} is {value!r}, expected a tuple of fields among c1..c26")
            elif len(set(value)) != len(value):
                problems.append(f"{name} is {value!r}: a field is named twice")
        for name in ("signal_weight", "signal_decay"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                problems.append(f"{name} is {value!r}, expected a finite number >= 0: e.g. 1.0")
        if not _is_real(self.target_ctr) or not 0.0 < self.target_ctr < 1.0:
            problems.append(f"target_ctr is {self.target_ctr!r}, expected a probability in (0, 1): e.g. 0.25")
        if not isinstance(self.start_date, dt.date) or isinstance(self.start_date, dt.datetime):
            problems.append(f"start_date is {self.start_date!r}, expected a datetime.date: e.g. 2024-01-01")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            problems.append(f"seed is {self.seed!r}, expected an integer in [0, 2**63): pass e.g. 0")
        for name in ("user_field", "item_field"):
            value = getattr(self, name)
            if value is None:
                continue
            if value not in SPARSE:
                problems.append(f"{name} is {value!r}, expected one of the sparse fields c1..c26 (or None): e.g. 'c3'")
            elif isinstance(self.multi_hot, tuple) and value in self.multi_hot:
                problems.append(
                    f"{name} is {value!r}, a multi-hot field (multi_hot={self.multi_hot!r}): a user or item field "
                    "must be single-hot: name another field, or drop it from multi_hot"
                )
        if self.user_field is not None and self.user_field == self.item_field:
            problems.append(
                f"user_field and item_field are both {self.user_field!r}: name two different fields, e.g. 'c3', 'c12'"
            )
        if problems:
            raise ValueError("invalid CriteoSyntheticConfig: " + "; ".join(problems))

    @property
    def cardinalities(self) -> dict[str, int]:
        """Ids per day of each sparse field: log-uniform from `min_cardinality` to `max_cardinality`."""
        ratio = self.max_cardinality / self.min_cardinality
        return {
            f: min(self.max_cardinality, round(self.min_cardinality * ratio ** (q / (NUM_SPARSE - 1))))
            for f, q in zip(SPARSE, CARDINALITY_RANK, strict=True)
        }

    @property
    def field_importance(self) -> dict[str, float]:
        """Every sparse field's logit weight: the standard deviation of its term on day 0 (0 for noise fields)."""
        weights = {f: self.signal_weight * self.signal_decay**i for i, f in enumerate(self.signal_fields)}
        return {f: round(float(weights.get(f, 0.0)), 12) for f in SPARSE}

    @property
    def dense_weights(self) -> dict[str, float]:
        """Each dense column's logit weight (on its standardised log-count)."""
        return {c: round(w, 12) for c, w in zip(DENSE, _DENSE_WEIGHTS, strict=True)}

    def date(self, day_index: int) -> dt.date:
        """The date of day `day_index` (0-based)."""
        return self.start_date + dt.timedelta(days=day_index)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML/JSON values."""
        d = dataclasses.asdict(self)
        d["start_date"] = self.start_date.isoformat()
        d["multi_hot"] = list(self.multi_hot)
        d["signal_fields"] = list(self.signal_fields)
        return d


# ------------------------------------------------------------------------------------------------------------
# Hashing, ids and popularity: closed-form functions of (seed, field, rank, day), no per-id tables.


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (multiplications wrap mod 2**64 by design)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(seed: int, field: str, purpose: int) -> np.uint64:
    code = np.array([(zlib.crc32(field.encode()) << 8) | purpose], dtype=np.uint64)
    return np.uint64(_mix(np.array([seed], dtype=np.uint64) ^ _mix(code))[0])


def raw_ids(seed: int, field: str, index: np.ndarray) -> np.ndarray:
    """The raw int64 ids (non-negative, scattered over [0, 2**63)) of a field's id indices 0, 1, 2, ...

    XOR with a salt and multiplication by an odd constant are bijections mod 2**63: distinct indices give
    distinct ids.
    """
    salt = _key(seed, field, 1) & _ID_MASK
    return (((index.astype(np.uint64) ^ salt) * _ID_MULTIPLIER) & _ID_MASK).astype(np.int64)


def rank_ids(cfg: CriteoSyntheticConfig, field: str, ranks: np.ndarray, day_index: int) -> np.ndarray:
    """The raw ids that hold popularity ranks `ranks` of `field` on day `day_index` (see "Drift")."""
    n = cfg.cardinalities[field]
    phase = ((_mix(ranks.astype(np.uint64) ^ _key(cfg.seed, field, 2)) >> np.uint64(11)).astype(np.float64)) * 2.0**-53
    epoch = np.floor(day_index * cfg.drift + phase).astype(np.int64)
    return raw_ids(cfg.seed, field, ranks + n * epoch)


@dataclass(frozen=True)
class _Zipf:
    """The truncated Zipf law on ranks 0..n-1: an exact head table and the continuous inverse CDF beyond it."""

    n: int
    s: float
    head_cdf: np.ndarray  # unnormalised cumulative weights of ranks 0..head-1
    total: float  # head mass + the tail integral

    @classmethod
    def build(cls, n: int, s: float) -> _Zipf:
        head = min(n, _HEAD_RANKS)
        head_cdf = np.cumsum(np.arange(1, head + 1, dtype=np.float64) ** -s)
        return cls(n, s, head_cdf, float(head_cdf[-1]) + cls._integral(s, head + 0.5, n + 0.5))

    @staticmethod
    def _integral(s: float, a: float, b: float) -> float:
        """∫_a^b x**-s dx (0 when the tail is empty)."""
        if b <= a:
            return 0.0
        return math.log(b / a) if s == 1.0 else (b ** (1 - s) - a ** (1 - s)) / (1 - s)

    @property
    def head(self) -> int:
        return len(self.head_cdf)

    def probabilities_of_head(self) -> np.ndarray:
        """p(rank r) for the head ranks."""
        return np.diff(self.head_cdf, prepend=0.0) / self.total

    def ranks(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """`size` ranks drawn by inverse CDF."""
        u = rng.random(size) * self.total
        head_mass = float(self.head_cdf[-1])
        ranks = np.searchsorted(self.head_cdf, u, side="right").astype(np.int64)
        tail = u >= head_mass
        if self.n > self.head and tail.any():
            a, v = self.head + 0.5, u[tail] - head_mass
            if self.s == 1.0:
                x = a * np.exp(v)
            else:
                x = np.maximum(a ** (1 - self.s) + (1 - self.s) * v, 1e-300) ** (1 / (1 - self.s))
            ranks[tail] = np.floor(x + 0.5).astype(np.int64) - 1
        return np.clip(ranks, 0, self.n - 1, out=ranks)


# ------------------------------------------------------------------------------------------------------------
# The planted model.


@dataclass(frozen=True)
class _Model:
    zipf: dict[str, _Zipf]
    effect_mean: dict[str, float]
    effect_sd: dict[str, float]
    bias: float


def _raw_effects(seed: int, field: str, ids: np.ndarray) -> np.ndarray:
    return raw_latents(seed, f"criteo_synthetic:{field}", ids, 1)[:, 0]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _solve_bias(target_ctr: float, sd: float) -> float:
    """The bias b with E[sigmoid(b + sd · Z)] = target_ctr, Z ~ N(0, 1) (Gauss–Hermite and bisection)."""
    x, w = np.polynomial.hermite_e.hermegauss(64)
    w = w / w.sum()
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(np.dot(w, _sigmoid(mid + sd * x))) < target_ctr else (lo, mid)
    return 0.5 * (lo + hi)


def _build_model(cfg: CriteoSyntheticConfig) -> _Model:
    """Popularity laws, and each signal field's effect moments under day 0's popularity.

    The head ranks' ids and effects are exact; the tail (mass `1 - Σ p_head`) has i.i.d. standard-normal effects,
    so it adds its mass to the second moment and nothing to the mean.
    """
    cards = cfg.cardinalities
    zipf = {f: _Zipf.build(cards[f], cfg.zipf) for f in SPARSE}
    mean: dict[str, float] = {}
    sd: dict[str, float] = {}
    for f in cfg.signal_fields:
        p = zipf[f].probabilities_of_head()
        e = _raw_effects(cfg.seed, f, rank_ids(cfg, f, np.arange(zipf[f].head, dtype=np.int64), 0))
        m = float(p @ e)
        second = float(p @ (e * e)) + (1.0 - float(p.sum()))
        mean[f], sd[f] = m, math.sqrt(max(second - m * m, 1e-12))
    var = sum(w * w for w in cfg.field_importance.values()) + sum(w * w for w in _DENSE_WEIGHTS)
    return _Model(zipf, mean, sd, _solve_bias(cfg.target_ctr, math.sqrt(var)))


def criteo_synthetic_spec(cfg: CriteoSyntheticConfig) -> DatasetSpec:
    """The spec of the stream, with the config and the ground-truth field importance in `meta`."""
    return _spec(cfg, _build_model(cfg))


def _spec(cfg: CriteoSyntheticConfig, model: _Model) -> DatasetSpec:
    return DatasetSpec(
        name="criteo_synthetic",
        task="binary",
        label=LABEL,
        sparse=tuple(SparseField(f, f, multi_hot=f in cfg.multi_hot) for f in SPARSE),
        dense=DENSE,
        user_field=cfg.user_field,
        item_field=cfg.item_field,
        meta={
            "criteo_synthetic": {
                "config": cfg.to_dict(),
                "field_importance": cfg.field_importance,
                "dense_weights": cfg.dense_weights,
                "cardinalities": cfg.cardinalities,
                "bias": model.bias,
            }
        },
    )


# ------------------------------------------------------------------------------------------------------------
# Generation, one chunk at a time.


def _rng(cfg: CriteoSyntheticConfig, day_index: int, chunk: int, column: str) -> np.random.Generator:
    """One independent stream per (seed, day, chunk, column)."""
    entropy = [cfg.seed, day_index, chunk, zlib.crc32(column.encode())]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def generate_chunk(
    cfg: CriteoSyntheticConfig, day_index: int, chunk: int, rows: int, model: _Model | None = None
) -> pa.Table:
    """Generate chunk `chunk` (of `rows` rows) of day `day_index` as an Arrow table.

    Args:
        cfg: the generator config.
        day_index: 0-based day.
        chunk: 0-based chunk within the day (it seeds the chunk's random streams).
        rows: the number of rows.
        model: the planted model of `cfg` (built when not given; pass it to reuse it across chunks).

    Returns:
        A table with `label`, `i1..i13` and `c1..c26` (the `multi_hot` fields as list<int64>).
    """
    model = model or _build_model(cfg)
    importance = cfg.field_importance
    logit = np.full(rows, model.bias)
    columns: dict[str, pa.Array] = {}
    for f in SPARSE:
        multi = f in cfg.multi_hot
        rng = _rng(cfg, day_index, chunk, f)
        if multi:
            count = rng.integers(1, cfg.max_multi_hot + 1, size=rows)
            offsets = np.zeros(rows + 1, dtype=np.int64)
            np.cumsum(count, out=offsets[1:])
            size = int(offsets[-1])
        else:
            size = rows
        ids = rank_ids(cfg, f, model.zipf[f].ranks(rng, size), day_index)
        if w := importance[f]:
            effect = (_raw_effects(cfg.seed, f, ids) - model.effect_mean[f]) / model.effect_sd[f]
            if multi:
                effect = np.add.reduceat(effect, offsets[:-1]) / np.sqrt(count)
            logit += w * effect
        columns[f] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(ids)) if multi else pa.array(ids)
    z = _rng(cfg, day_index, chunk, "dense").standard_normal((rows, NUM_DENSE))
    logit += z @ np.asarray(_DENSE_WEIGHTS)
    counts = np.floor(np.expm1(_DENSE_MU + _DENSE_SIGMA * z).clip(min=0.0))
    dense = np.log1p(counts).astype(np.float32)
    label = (_rng(cfg, day_index, chunk, LABEL).random(rows) < _sigmoid(logit)).astype(np.float32)
    return pa.table(
        {LABEL: label, **{c: dense[:, j] for j, c in enumerate(DENSE)}, **columns},
    )


def write_criteo_synthetic(cfg: CriteoSyntheticConfig, out: str | Path, overwrite: bool = False) -> Path:
    """Generate the stream and write it as a day-partitioned dataset at `out`, one chunk at a time, atomically.

    Each chunk of at most `cfg.chunk_rows` rows is one zstd-compressed `day=YYYY-MM-DD/part-NNNNN.parquet`; the
    files go to a temporary sibling directory renamed to `out` at the end.

    Args:
        cfg: the generator config.
        out: the dataset directory to create.
        overwrite: replace `out` if it exists (and is a dataset).

    Returns:
        The dataset directory.

    Raises:
        DatasetError: `out` exists and `overwrite` is False, or `out` holds something other than a dataset (see
            `check_output_dir`); checked before anything is generated.
    """
    check_output_dir(out, kind=DATASET_OUTPUT, overwrite=overwrite)
    started = time.perf_counter()
    model = _build_model(cfg)
    clicks = 0.0
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for d in range(cfg.days):
            day_dir = tmp / f"{DAY_COLUMN}={cfg.date(d).isoformat()}"
            day_dir.mkdir()
            for chunk, offset in enumerate(range(0, cfg.rows_per_day, cfg.chunk_rows)):
                table = generate_chunk(cfg, d, chunk, min(cfg.chunk_rows, cfg.rows_per_day - offset), model)
                clicks += float(np.asarray(table.column(LABEL)).sum())
                pq.write_table(table, day_dir / f"part-{chunk:05d}.parquet", compression="zstd")
                del table  # the next chunk reuses the memory
            elapsed = time.perf_counter() - started
            logger.info(
                "day %d/%d (%s) written: %.0f rows/s so far",
                d + 1,
                cfg.days,
                cfg.date(d),
                (d + 1) * cfg.rows_per_day / elapsed,
            )
        _spec(cfg, model).save(tmp)
    rows = cfg.days * cfg.rows_per_day
    elapsed = time.perf_counter() - started
    logger.info(
        "wrote %d rows over %d days to %s in %.1fs (%.0f rows/s), mean label %.3f",
        rows,
        cfg.days,
        out,
        elapsed,
        rows / max(elapsed, 1e-9),
        clicks / rows,
    )
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m pipeline.criteo_synthetic --out DIR [options]` (see `--help`)."""
    defaults = CriteoSyntheticConfig()
    parser = argparse.ArgumentParser(prog="python -m pipeline.criteo_synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the dataset directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    flags: list[tuple[str, type]] = [
        ("days", int),
        ("rows_per_day", int),
        ("chunk_rows", int),
        ("max_cardinality", int),
        ("min_cardinality", int),
        ("zipf", float),
        ("drift", float),
        ("target_ctr", float),
        ("seed", int),
        ("user_field", str),
        ("item_field", str),
    ]
    add_config_flags(parser, defaults, flags)
    parser.add_argument("--start-date", type=dt.date.fromisoformat, default=defaults.start_date, help="YYYY-MM-DD")
    args = parser.parse_args(argv)
    try:
        cfg = CriteoSyntheticConfig(**{name: getattr(args, name) for name, _ in flags}, start_date=args.start_date)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        out = write_criteo_synthetic(cfg, args.out, overwrite=args.overwrite)
    except DatasetError as e:
        parser.exit(2, f"error: {e}\n")
    signal = ", ".join(f"{k}={v:g}" for k, v in cfg.field_importance.items() if v)
    print(f"wrote {cfg.days} days × {cfg.rows_per_day} rows to {out}; signal fields: {signal}")


if __name__ == "__main__":
    main()
