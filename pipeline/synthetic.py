"""The built-in synthetic stream: a day-partitioned binary CTR-like dataset with a planted, known signal.

It is the default data of the main job and the ground truth of the search tests: every sparse feature's
importance is known (`meta.synthetic.field_importance` in `dataset.yaml`), so a dimension search can be
checked to give the informative fields the bigger dims.

Generate a dataset::

    python -m pipeline.synthetic --out data/synthetic --days 7 --rows-per-day 100000 --seed 0

Data model (one row = one impression; rows are i.i.d. within a day, sorted by timestamp):

* Sparse features, raw ids non-negative int64 scrambled as `((pool_index + salt) * C) mod 2**62`, so a
  vocabulary is needed downstream: `user`, `item`, single-hot `f0..f{F-1}`, and multi-hot `tags`
  (0..`max_tags` ids per row, list<int64>).
* Popularity: within each feature, ids are ranked and drawn with p(rank r) ∝ 1 / (r + 1)**zipf (inverse CDF
  via `np.searchsorted`). Each day after the first, the pools of `user`, `item` and `f_i` grow by
  `new_ids_per_day` × pool size, new ids entering at uniformly random ranks, and a `drift` fraction of the
  ranks of every pool (tags too) is shuffled among themselves. A day's pools are a function of (seed, day).
* Latents: each id has a standard-normal latent drawn from a hash of (seed, feature, raw id) (splitmix64 +
  Box–Muller, vectorised): a `latent_dim` vector for users and items, a scalar for `f_i` and tags. Each
  latent is standardised under the first day's popularity, so every term below has mean 0 and standard
  deviation equal to its weight on day 0, which makes the weights the features' importance.
* Logit = bias + w_ui · (u · v) / scale + Σ_i w_i z_{f_i} + w_tag Σ_tags z_t / sqrt(#tags) + Σ_j w_dj d_j
  + N(0, noise²); label ~ Bernoulli(sigmoid(logit)). The first `informative_fraction` of the `f_i` carry the
  weights 2.0 · 0.75**i (2.0, 1.5, 1.125, ...), the rest weight 0 (pure noise). `bias` is solved so that the
  expected CTR is `target_ctr` (Gauss–Hermite quadrature over the logit's variance).
* Dense columns `d0..d{D-1}`: float32 standard normal, weights 0.5 · (-0.8)**j.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import logging
import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.dataset import DATASET_OUTPUT, DAY_COLUMN, check_output_dir, write_dataset
from pipeline.errors import DatasetError
from pipeline.spec import DatasetSpec, SparseField

logger = logging.getLogger(__name__)

USER = "user"
ITEM = "item"
TAGS = "tags"
LABEL = "label"
TIMESTAMP = "timestamp"
SECONDS_PER_DAY = 86_400

_ID_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so `x * C mod 2**62` is a bijection on [0, 2**62)
_ID_MASK = np.uint64((1 << 62) - 1)
# Independent random streams: (seed, stream, day, feature code) seed a PCG64 each.
_STREAM_POOL = 1
_STREAM_ROWS = 2
_FIRST_FIELD_WEIGHT = 2.0
_FIELD_WEIGHT_DECAY = 0.75


def field_name(i: int) -> str:
    """The name (and column) of the `i`-th single-hot categorical field."""
    return f"f{i}"


def dense_name(j: int) -> str:
    """The name of the `j`-th dense column."""
    return f"d{j}"


@dataclass(frozen=True)
class SyntheticConfig:
    """How to generate the synthetic stream. See the module docstring for the data model.

    Args:
        days: number of days.
        rows_per_day: rows (impressions) per day.
        users: size of the user pool on the first day.
        items: size of the item pool on the first day.
        fields: number of single-hot categorical fields `f0..f{fields-1}`.
        field_cardinality: size of each field's id pool on the first day.
        tags: size of the tag vocabulary of the multi-hot `tags` feature (it does not grow).
        max_tags: each row has a uniform number of tags in `[0, max_tags]`.
        zipf: popularity exponent: p(rank r) ∝ 1 / (r + 1)**zipf (0 is uniform).
        new_ids_per_day: each day after the first, the user, item and field pools grow by this fraction.
        drift: each day after the first, this fraction of every pool's popularity ranks is shuffled.
        dense: number of dense float columns `d0..d{dense-1}`.
        latent_dim: dimension of the user and item latent vectors.
        field_latent_dim: the dim k of the most important field's signal (see `field_dims`; 1: a scalar per id).
        field_partner: what a k-dim field latent is dotted with: a per-field item latent (`item`), or the row's
            first k dense values (`dense`: the partner costs no embedding capacity, so a model needs k dims for
            that field and nothing more elsewhere — DLRM's dense·field interaction can express it).
        interaction_weight: standard deviation of the user–item dot-product term of the logit.
        informative_fraction: the first `ceil(fraction * fields)` fields carry signal; the rest are noise.
        tag_weight: standard deviation of the tags' term of the logit.
        noise: standard deviation of the Gaussian noise added to the logit before drawing the label.
        target_ctr: the expected mean label; the logit's bias is solved to reach it.
        start_date: the date of the first day.
        seed: the random seed; a day's rows are a function of (config, day) alone.
    """

    days: int = 7
    rows_per_day: int = 100_000
    users: int = 10_000
    items: int = 5_000
    fields: int = 6
    field_cardinality: int = 1_000
    tags: int = 200
    max_tags: int = 5
    zipf: float = 1.1
    new_ids_per_day: float = 0.02
    drift: float = 0.05
    dense: int = 4
    latent_dim: int = 8
    field_latent_dim: int = 1
    field_partner: Literal["item", "dense"] = "item"
    interaction_weight: float = 1.5
    informative_fraction: float = 0.5
    tag_weight: float = 0.5
    noise: float = 0.25
    target_ctr: float = 0.3
    start_date: dt.date = dt.date(2024, 1, 1)
    seed: int = 0

    def __post_init__(self) -> None:
        problems: list[str] = []
        positive = (
            "days",
            "rows_per_day",
            "users",
            "items",
            "field_cardinality",
            "tags",
            "max_tags",
            "latent_dim",
            "field_latent_dim",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} is {value!r}, expected an integer >= 1: pass a positive count")
        for name in ("fields", "dense"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"{name} is {value!r}, expected an integer >= 0: pass 0 for none")
        for name in ("new_ids_per_day", "drift", "informative_fraction"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value <= 1.0:
                problems.append(f"{name} is {value!r}, expected a fraction in [0, 1]: e.g. 0.05 for 5%")
        for name in ("zipf", "interaction_weight", "tag_weight", "noise"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value < math.inf:
                problems.append(f"{name} is {value!r}, expected a finite number >= 0: pass e.g. 1.1 (0 turns it off)")
        if self.field_partner not in ("item", "dense"):
            problems.append(f"field_partner is {self.field_partner!r}, expected 'item' or 'dense'")
        elif self.field_partner == "dense" and self.field_latent_dim > self.dense:
            problems.append(
                f"field_partner 'dense' with field_latent_dim {self.field_latent_dim} needs at least that many dense "
                f"columns, got dense={self.dense}: raise dense or lower field_latent_dim"
            )
        if not _is_real(self.target_ctr) or not 0.0 < self.target_ctr < 1.0:
            problems.append(f"target_ctr is {self.target_ctr!r}, expected a probability in (0, 1): e.g. 0.3")
        if not isinstance(self.start_date, dt.date) or isinstance(self.start_date, dt.datetime):
            problems.append(f"start_date is {self.start_date!r}, expected a datetime.date: e.g. 2024-01-01")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            problems.append(f"seed is {self.seed!r}, expected an integer in [0, 2**63): pass e.g. 0")
        if problems:
            raise ValueError("invalid SyntheticConfig: " + "; ".join(problems))

    @property
    def field_weights(self) -> tuple[float, ...]:
        """The logit weight of each single-hot field `f_i`: 2.0 · 0.75**i for the informative ones, else 0."""
        informative = math.ceil(self.informative_fraction * self.fields - 1e-9)
        return tuple(
            _FIRST_FIELD_WEIGHT * _FIELD_WEIGHT_DECAY**i if i < informative else 0.0 for i in range(self.fields)
        )

    @property
    def field_dims(self) -> tuple[int, ...]:
        """The latent dim each single-hot field's signal lives in (0 for noise fields).

        With `field_latent_dim` 1 (the default) a field acts through one number per id. With k > 1 the most
        important field acts through a k-dim dot product with a per-field item latent, and the others through
        dims scaled down with their weight — so a model needs more embedding dims for more important fields,
        which is what a dimension search should find.
        """
        first = _FIRST_FIELD_WEIGHT
        return tuple(max(1, round(self.field_latent_dim * w / first)) if w else 0 for w in self.field_weights)

    @property
    def dense_weights(self) -> tuple[float, ...]:
        """The logit weight of each dense column `d_j`: 0.5 · (-0.8)**j."""
        return tuple(0.5 * (-0.8) ** j for j in range(self.dense))

    @property
    def feature_names(self) -> list[str]:
        """The sparse features in model order: user, item, f0..f{F-1}, tags."""
        return [USER, ITEM, *(field_name(i) for i in range(self.fields)), TAGS]

    @property
    def field_importance(self) -> dict[str, float]:
        """Every sparse feature's ground-truth importance: the standard deviation of its logit term on day 0.

        The user and item both get the interaction weight (their latents only act through the dot product).
        """
        importance = {USER: float(self.interaction_weight), ITEM: float(self.interaction_weight)}
        importance.update({field_name(i): w for i, w in enumerate(self.field_weights)})
        importance[TAGS] = float(self.tag_weight)
        return importance

    def date(self, day_index: int) -> dt.date:
        """The date of day `day_index` (0-based)."""
        return self.start_date + dt.timedelta(days=day_index)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML/JSON values (the date as an ISO string)."""
        d = dataclasses.asdict(self)
        d["start_date"] = self.start_date.isoformat()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SyntheticConfig:
        """The inverse of `to_dict` (e.g. for `dataset.yaml`'s `meta.synthetic.config`).

        Raises:
            ValueError: unknown keys or bad values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"unknown SyntheticConfig keys {unknown}: use only {sorted(known)}")
        kwargs = dict(d)
        if isinstance(kwargs.get("start_date"), str):
            try:
                kwargs["start_date"] = dt.date.fromisoformat(kwargs["start_date"])
            except ValueError:
                raise ValueError(
                    f"start_date is {kwargs['start_date']!r}, expected an ISO date: e.g. 2024-01-01"
                ) from None
        return cls(**kwargs)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------------------------
# Ids and latents: pure functions of (seed, feature, raw id).


def _feature_code(name: str) -> int:
    """A stable per-feature integer (not Python's salted `hash`)."""
    return zlib.crc32(name.encode())


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (multiplications wrap mod 2**64 by design)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def raw_ids(feature: str, pool_index: np.ndarray) -> np.ndarray:
    """The raw int64 ids (non-negative, scattered over [0, 2**62)) of a feature's pool entries 0, 1, 2, ...

    Distinct pool indices of one feature give distinct ids: multiplying by an odd constant is a bijection
    mod 2**62.
    """
    x = (pool_index.astype(np.uint64) + np.uint64(_feature_code(feature))) * _ID_MULTIPLIER
    return (x & _ID_MASK).astype(np.int64)


def _unit_interval(h: np.ndarray) -> np.ndarray:
    """53 random bits of `h` as a float64 in (0, 1)."""
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def raw_latents(seed: int, feature: str, ids: np.ndarray, dim: int) -> np.ndarray:
    """Standard-normal latents of shape `(len(ids), dim)`, a pure function of (seed, feature, raw id).

    Hash-seeded Box–Muller, vectorised: no random state, so any id's latent can be recomputed from any frame.
    """
    key = _mix(np.array([seed], dtype=np.uint64) ^ _mix(np.array([_feature_code(feature)], dtype=np.uint64)))
    base = _mix(ids.astype(np.int64).view(np.uint64) ^ key)[:, None]
    component = np.arange(dim, dtype=np.uint64)[None, :] * np.uint64(2)
    u1 = _unit_interval(_mix(base + component + np.uint64(1)))
    u2 = _unit_interval(_mix(base + component + np.uint64(2)))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _zipf_cdf(n: int, zipf: float) -> np.ndarray:
    """The unnormalised cumulative popularity of ranks 0..n-1."""
    return np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -zipf)


def _zipf_probabilities(n: int, zipf: float) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=np.float64) ** -zipf
    return p / p.sum()


# ------------------------------------------------------------------------------------------------------------
# Pools: which ids are active on a day and their popularity ranking.


@dataclass
class _Pool:
    """A feature's active ids on one day: `order[r]` is the pool index of the id at popularity rank r."""

    feature: str
    order: np.ndarray
    created: int
    grows: bool

    def advance(self, cfg: SyntheticConfig, day_index: int) -> None:
        """Move from day `day_index - 1` to `day_index`: add new ids at random ranks, then drift the ranks."""
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([cfg.seed, _STREAM_POOL, day_index, _feature_code(self.feature)]))
        )
        if self.grows and (new := round(cfg.new_ids_per_day * len(self.order))) > 0:
            at = rng.integers(0, len(self.order) + 1, size=new)
            self.order = np.insert(self.order, at, np.arange(self.created, self.created + new, dtype=np.int64))
            self.created += new
        if (moved := round(cfg.drift * len(self.order))) > 1:
            ranks = rng.choice(len(self.order), size=moved, replace=False)
            self.order[ranks] = self.order[rng.permutation(ranks)]


def _initial_pools(cfg: SyntheticConfig) -> dict[str, _Pool]:
    sizes = {
        USER: cfg.users,
        ITEM: cfg.items,
        **{field_name(i): cfg.field_cardinality for i in range(cfg.fields)},
    }
    pools = {name: _Pool(name, np.arange(n, dtype=np.int64), n, grows=True) for name, n in sizes.items()}
    pools[TAGS] = _Pool(TAGS, np.arange(cfg.tags, dtype=np.int64), cfg.tags, grows=False)
    return pools


def _pools_on(cfg: SyntheticConfig, day_index: int) -> dict[str, _Pool]:
    pools = _initial_pools(cfg)
    for d in range(1, day_index + 1):
        for pool in pools.values():
            pool.advance(cfg, d)
    return pools


# ------------------------------------------------------------------------------------------------------------
# The planted model.


@dataclass(frozen=True)
class _Standardiser:
    """Maps raw latents to the standardised ones that enter the logit (mean 0, unit variance on day 0)."""

    mean: np.ndarray
    scale: float

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        return (latents - self.mean) / self.scale


@dataclass(frozen=True)
class _PlantedModel:
    bias: float
    standardisers: dict[str, _Standardiser]


def _logit_sd(cfg: SyntheticConfig) -> float:
    """The standard deviation of the logit without its bias on day 0 (the terms are independent)."""
    var = cfg.interaction_weight**2 + sum(w * w for w in cfg.field_weights) + sum(w * w for w in cfg.dense_weights)
    var += cfg.tag_weight**2 * cfg.max_tags / (cfg.max_tags + 1)  # rows without tags have no tag term
    return math.sqrt(var + cfg.noise**2)


def _solve_bias(target_ctr: float, sd: float) -> float:
    """The bias b with E[sigmoid(b + sd · Z)] = target_ctr, Z ~ N(0, 1) (Gauss–Hermite and bisection)."""
    x, w = np.polynomial.hermite_e.hermegauss(64)
    w = w / w.sum()
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float(np.dot(w, _sigmoid(mid + sd * x))) < target_ctr:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@functools.lru_cache(maxsize=16)
def _planted_model(cfg: SyntheticConfig) -> _PlantedModel:
    """Standardise every feature's latents under day 0's popularity, and solve the bias for `target_ctr`."""
    standardisers: dict[str, _Standardiser] = {}
    moments: dict[str, np.ndarray] = {}
    for name, pool in _initial_pools(cfg).items():
        dim = cfg.latent_dim if name in (USER, ITEM) else 1
        z = raw_latents(cfg.seed, name, raw_ids(name, pool.order), dim)
        p = _zipf_probabilities(len(pool.order), cfg.zipf)
        mean = p @ z
        centred = z - mean
        second = (centred * p[:, None]).T @ centred  # the popularity-weighted second moment
        moments[name] = second
        standardisers[name] = _Standardiser(mean, math.sqrt(max(float(second[0, 0]), 1e-12)))
    # The dot product of the centred user and item vectors has variance trace(Σ_u Σ_v): scale one of them.
    inner = math.sqrt(max(float(np.trace(moments[USER] @ moments[ITEM])), 1e-12))
    standardisers[USER] = _Standardiser(standardisers[USER].mean, inner)
    standardisers[ITEM] = _Standardiser(standardisers[ITEM].mean, 1.0)
    return _PlantedModel(_solve_bias(cfg.target_ctr, _logit_sd(cfg)), standardisers)


def _field_terms(
    cfg: SyntheticConfig,
    field_ids: list[np.ndarray],
    item_ids: np.ndarray,
    scalar: list[np.ndarray],
    dense: np.ndarray,
) -> list[np.ndarray]:
    """Each single-hot field's unit-variance signal per row: its scalar latent, or (`field_latent_dim` > 1) the
    dot product of a k-dim field latent with a k-dim partner — a per-field item latent, or (`field_partner`
    `dense`) the row's first k dense values —, over sqrt(k)."""
    if cfg.field_latent_dim == 1:
        return scalar
    terms = []
    for i, (k, ids) in enumerate(zip(cfg.field_dims, field_ids, strict=True)):
        if k == 0:
            terms.append(scalar[i])
            continue
        name = field_name(i)
        z = _latents_by_unique(cfg.seed, name, ids, k)
        if cfg.field_partner == "dense":
            y = dense[:, :k].astype(np.float64)
        else:
            y = _latents_by_unique(cfg.seed, f"{ITEM}~{name}", item_ids, k)
        terms.append(np.einsum("ij,ij->i", z, y) / np.sqrt(k))
    return terms


def _latents_by_unique(seed: int, feature: str, ids: np.ndarray, dim: int) -> np.ndarray:
    unique, inverse = np.unique(ids, return_inverse=True)
    return raw_latents(seed, feature, unique, dim)[inverse.reshape(-1)]


def _combine(
    cfg: SyntheticConfig,
    model: _PlantedModel,
    user: np.ndarray,
    item: np.ndarray,
    fields: list[np.ndarray],
    tag_sum: np.ndarray,
    tag_count: np.ndarray,
    dense: np.ndarray,
) -> np.ndarray:
    """The noiseless logit from standardised per-row latents (one code path: generation and recomputation)."""
    logit = np.full(len(user), model.bias)
    logit += cfg.interaction_weight * np.einsum("ij,ij->i", user, item)
    for w, z in zip(cfg.field_weights, fields, strict=True):
        if w:
            logit += w * z
    logit += cfg.tag_weight * tag_sum / np.sqrt(np.maximum(tag_count, 1))
    if cfg.dense:
        logit += dense.astype(np.float64) @ np.asarray(cfg.dense_weights)
    return logit


def planted_logit(cfg: SyntheticConfig, df: pl.DataFrame) -> np.ndarray:
    """Recompute the planted (noiseless) logit of rows generated with `cfg`, from their ids and dense values.

    Args:
        cfg: the config the rows were generated with.
        df: rows with the columns of `synthetic_spec(cfg)` (a generated day, or a day read back from disk).

    Returns:
        float64 logits, one per row; sigmoid of them plus N(0, noise²) is each row's click probability.
    """
    model = _planted_model(cfg)

    def latents(feature: str, ids: np.ndarray, dim: int) -> np.ndarray:
        unique, inverse = np.unique(ids, return_inverse=True)
        return model.standardisers[feature](raw_latents(cfg.seed, feature, unique, dim))[inverse.reshape(-1)]

    user = latents(USER, df.get_column(USER).to_numpy(), cfg.latent_dim)
    item = latents(ITEM, df.get_column(ITEM).to_numpy(), cfg.latent_dim)
    fields = [latents(f, df.get_column(f).to_numpy(), 1)[:, 0] for f in map(field_name, range(cfg.fields))]
    dense = df.select([dense_name(j) for j in range(cfg.dense)]).to_numpy() if cfg.dense else np.zeros((df.height, 0))
    fields = _field_terms(
        cfg,
        [df.get_column(field_name(i)).to_numpy() for i in range(cfg.fields)],
        df.get_column(ITEM).to_numpy(),
        fields,
        dense,
    )
    tags = df.get_column(TAGS)
    count = tags.list.len().to_numpy().astype(np.int64)
    values = tags.explode().drop_nulls().to_numpy()
    tag_z = latents(TAGS, values, 1)[:, 0] if len(values) else np.zeros(0)
    tag_sum = np.bincount(np.repeat(np.arange(df.height), count), weights=tag_z, minlength=df.height)
    return _combine(cfg, model, user, item, fields, tag_sum, count, dense)


# ------------------------------------------------------------------------------------------------------------
# Generation.


def synthetic_spec(cfg: SyntheticConfig) -> DatasetSpec:
    """The spec of the synthetic stream, with the config and the ground-truth field importance in `meta`."""
    model = _planted_model(cfg)
    return DatasetSpec(
        name="synthetic",
        task="binary",
        label=LABEL,
        sparse=tuple(SparseField(n, n, multi_hot=n == TAGS) for n in cfg.feature_names),
        dense=tuple(dense_name(j) for j in range(cfg.dense)),
        timestamp=TIMESTAMP,
        user_field=USER,
        item_field=ITEM,
        meta={
            "synthetic": {
                "config": cfg.to_dict(),
                "field_importance": cfg.field_importance,
                "dense_weights": [round(w, 12) for w in cfg.dense_weights],
                "bias": model.bias,
            }
        },
    )


def _row_rng(cfg: SyntheticConfig, day_index: int, stream: str) -> np.random.Generator:
    """One independent stream per (seed, day, column): adding a field leaves the other columns unchanged."""
    entropy = [cfg.seed, _STREAM_ROWS, day_index, _feature_code(stream)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _sample_ranks(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    """Popularity ranks drawn by inverse CDF."""
    ranks = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
    return np.minimum(ranks, len(cdf) - 1, out=ranks)


def _sample_day(cfg: SyntheticConfig, pools: dict[str, _Pool], day_index: int) -> tuple[pl.DataFrame, np.ndarray]:
    """One day's rows from that day's pools, and their noiseless logits."""
    model = _planted_model(cfg)
    n = cfg.rows_per_day
    columns: dict[str, Any] = {}
    standardised: dict[str, np.ndarray] = {}

    def draw(feature: str, size: int, dim: int) -> None:
        pool = pools[feature]
        ranks = _sample_ranks(_row_rng(cfg, day_index, feature), _zipf_cdf(len(pool.order), cfg.zipf), size)
        # Latents are computed once per pool entry and gathered per row: the pool is far smaller than the day.
        ids_by_rank = raw_ids(feature, pool.order)
        latents_by_rank = model.standardisers[feature](raw_latents(cfg.seed, feature, ids_by_rank, dim))
        columns[feature] = ids_by_rank[ranks]
        standardised[feature] = latents_by_rank[ranks]

    draw(USER, n, cfg.latent_dim)
    draw(ITEM, n, cfg.latent_dim)
    for i in range(cfg.fields):
        draw(field_name(i), n, 1)
    count = _row_rng(cfg, day_index, "tag_count").integers(0, cfg.max_tags + 1, size=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(count, out=offsets[1:])
    draw(TAGS, int(offsets[-1]), 1)
    tag_sum = np.bincount(np.repeat(np.arange(n), count), weights=standardised[TAGS][:, 0], minlength=n)
    tags = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(columns.pop(TAGS)))

    dense = _row_rng(cfg, day_index, "dense").standard_normal((n, cfg.dense), dtype=np.float32)
    fields = [standardised[field_name(i)][:, 0] for i in range(cfg.fields)]
    fields = _field_terms(cfg, [columns[field_name(i)] for i in range(cfg.fields)], columns[ITEM], fields, dense)
    logit = _combine(cfg, model, standardised[USER], standardised[ITEM], fields, tag_sum, count, dense)
    outcome = _row_rng(cfg, day_index, "label")
    noisy = logit + outcome.normal(0.0, cfg.noise, size=n) if cfg.noise else logit
    label = (outcome.random(n) < _sigmoid(noisy)).astype(np.float32)

    start = int(dt.datetime.combine(cfg.date(day_index), dt.time(), tzinfo=dt.UTC).timestamp())
    # Rows are i.i.d., so giving them sorted timestamps is the same as sorting them by time.
    timestamp = start + np.sort(_row_rng(cfg, day_index, TIMESTAMP).integers(0, SECONDS_PER_DAY, size=n))
    df = pl.DataFrame(
        {
            TIMESTAMP: timestamp,
            **columns,
            TAGS: pl.Series(TAGS, tags, dtype=pl.List(pl.Int64)),
            **{dense_name(j): dense[:, j] for j in range(cfg.dense)},
            LABEL: label,
        }
    ).with_columns(pl.lit(cfg.date(day_index)).alias(DAY_COLUMN))
    return df.select(DAY_COLUMN, pl.exclude(DAY_COLUMN)), logit


def generate_day(cfg: SyntheticConfig, day_index: int) -> pl.DataFrame:
    """Generate day `day_index` alone; it equals that day of `generate(cfg)`.

    Args:
        cfg: the generator config.
        day_index: 0-based day, in `[0, cfg.days)`.

    Returns:
        The day's rows: `day` (Date), then the columns of `synthetic_spec(cfg)`.

    Raises:
        ValueError: `day_index` is out of range.
    """
    if isinstance(day_index, bool) or not isinstance(day_index, int) or not 0 <= day_index < cfg.days:
        raise ValueError(
            f"day_index is {day_index!r}, expected an integer in [0, {cfg.days}): pass a day of the config, "
            "or raise SyntheticConfig.days"
        )
    return _sample_day(cfg, _pools_on(cfg, day_index), day_index)[0]


def generate(cfg: SyntheticConfig) -> tuple[pl.DataFrame, DatasetSpec]:
    """Generate every day of the stream.

    Returns:
        The rows of all days in day order (with a `day` Date column), and the dataset spec.
    """
    pools = _initial_pools(cfg)
    frames = []
    for d in range(cfg.days):
        if d:
            for pool in pools.values():
                pool.advance(cfg, d)
        frames.append(_sample_day(cfg, pools, d)[0])
    return pl.concat(frames, how="vertical"), synthetic_spec(cfg)


def write_synthetic(cfg: SyntheticConfig, out: str | Path, overwrite: bool = False) -> Path:
    """Generate the stream and write it as a day-partitioned dataset (atomically) at `out`.

    Raises:
        DatasetError: `out` exists and `overwrite` is False, or `out` holds something other than a dataset (see
            `check_output_dir`); checked before anything is generated.
    """
    check_output_dir(out, kind=DATASET_OUTPUT, overwrite=overwrite)
    started = time.perf_counter()
    df, spec = generate(cfg)
    elapsed = time.perf_counter() - started
    logger.info(
        "generated %d rows over %d days in %.2fs (%.0f rows/s), mean label %.3f",
        df.height,
        cfg.days,
        elapsed,
        df.height / max(elapsed, 1e-9),
        df.get_column(LABEL).mean(),
    )
    return write_dataset(df, spec, out, source=f"synthetic(seed={cfg.seed})", overwrite=overwrite)


def add_config_flags(parser: argparse.ArgumentParser, defaults: object, flags: list[tuple[str, type]]) -> None:
    """One `--name-with-dashes` option per config field in `flags` (name, type), defaulting to `defaults`' value."""
    for name, kind in flags:
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=f"(default {default})")


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m pipeline.synthetic --out DIR [options]` (see `--help`)."""
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(prog="python -m pipeline.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the dataset directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    flags: list[tuple[str, type]] = [
        ("days", int),
        ("rows_per_day", int),
        ("users", int),
        ("items", int),
        ("fields", int),
        ("field_cardinality", int),
        ("tags", int),
        ("zipf", float),
        ("new_ids_per_day", float),
        ("drift", float),
        ("dense", int),
        ("field_latent_dim", int),
        ("field_partner", str),
        ("seed", int),
    ]
    add_config_flags(parser, defaults, flags)
    parser.add_argument("--start-date", type=dt.date.fromisoformat, default=defaults.start_date, help="YYYY-MM-DD")
    args = parser.parse_args(argv)
    try:
        cfg = SyntheticConfig(**{name: getattr(args, name) for name, _ in flags}, start_date=args.start_date)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        out = write_synthetic(cfg, args.out, overwrite=args.overwrite)
    except DatasetError as e:
        parser.exit(2, f"error: {e}\n")
    importance = ", ".join(f"{k}={v:g}" for k, v in cfg.field_importance.items())
    print(f"wrote {cfg.days} days × {cfg.rows_per_day} rows to {out}; field importance: {importance}")


if __name__ == "__main__":
    main()
