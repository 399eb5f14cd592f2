"""The synthetic stream: determinism, the on-disk round trip, popularity dynamics and the planted signal."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from pipeline.dataset import Dataset
from pipeline.errors import DatasetError
from pipeline.synthetic import (
    SyntheticConfig,
    _planted_model,
    _pools_on,
    _sample_day,
    generate,
    generate_day,
    main,
    planted_logit,
    raw_ids,
    raw_latents,
    synthetic_spec,
    write_synthetic,
)

SMALL = SyntheticConfig(
    days=4,
    rows_per_day=20_000,
    users=300,
    items=200,
    fields=4,
    field_cardinality=100,
    tags=50,
    new_ids_per_day=0.05,
    drift=0.1,
    dense=2,
    seed=7,
)


@pytest.fixture(scope="module")
def small() -> pl.DataFrame:
    return generate(SMALL)[0]


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    """Rank-based (Mann–Whitney) AUC with average ranks for ties."""
    order = np.argsort(score, kind="stable")
    sorted_score = score[order]
    ranks = np.empty(len(score))
    # Average the ranks within each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    ends = np.r_[starts[1:], len(score)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    pos = label == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _day(df: pl.DataFrame, cfg: SyntheticConfig, d: int) -> pl.DataFrame:
    return df.filter(pl.col("day") == cfg.date(d))


def test_auc_helper_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    score, label = rng.integers(0, 5, 200).astype(float), rng.integers(0, 2, 200)
    pos, neg = score[label == 1], score[label == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert _auc(score, label) == pytest.approx(pairs)


def test_same_config_same_frames_and_a_day_alone_equals_that_day(small: pl.DataFrame) -> None:
    again, _ = generate(SMALL)
    assert again.equals(small)
    for d in (0, SMALL.days - 1):
        assert generate_day(SMALL, d).equals(_day(small, SMALL, d))
    other = generate_day(dataclasses.replace(SMALL, seed=8), 0)
    assert not other.get_column("user").equals(_day(small, SMALL, 0).get_column("user"))


def test_columns_types_and_values(small: pl.DataFrame) -> None:
    spec = synthetic_spec(SMALL)
    assert spec.feature_names == ["user", "item", "f0", "f1", "f2", "f3", "tags"]
    assert spec.columns == ["label", "user", "item", "f0", "f1", "f2", "f3", "tags", "d0", "d1", "timestamp"]
    assert (spec.name, spec.task, spec.user_field, spec.item_field) == ("synthetic", "binary", "user", "item")
    assert [f.name for f in spec.sparse if f.multi_hot] == ["tags"]
    assert small.schema["day"] == pl.Date and small.schema["tags"] == pl.List(pl.Int64)
    assert all(small.schema[c] == pl.Int64 for c in ("timestamp", "user", "item", "f0", "f3"))
    assert small.schema["d0"] == pl.Float32 and small.schema["label"] == pl.Float32
    assert set(small.get_column("label").unique()) == {0.0, 1.0}
    assert 0.2 <= small.get_column("label").to_numpy().mean() <= 0.4
    tag_count = small.get_column("tags").list.len()
    assert tag_count.min() == 0 and tag_count.max() == SMALL.max_tags
    users = small.get_column("user")
    # Non-negative but scattered: a vocabulary is needed downstream.
    assert users.min() >= 0 and users.max() > 2**40  # type: ignore[operator]
    day0 = _day(small, SMALL, 0)
    start = int(dt.datetime(2024, 1, 1, tzinfo=dt.UTC).timestamp())
    ts = day0.get_column("timestamp")
    assert start <= ts.min() and ts.max() < start + 86_400 and ts.is_sorted()  # type: ignore[operator]


def test_meta_holds_config_and_importance() -> None:
    meta = synthetic_spec(SMALL).meta["synthetic"]
    assert SyntheticConfig.from_dict(meta["config"]) == SMALL
    importance = meta["field_importance"]
    assert list(importance) == SMALL.feature_names
    assert importance["f0"] > importance["f1"] > 0 and importance["f2"] == importance["f3"] == 0
    assert importance["user"] == importance["item"] == SMALL.interaction_weight
    default = SyntheticConfig().field_importance
    assert [default[f"f{i}"] for i in range(6)] == [2.0, 1.5, 1.125, 0.0, 0.0, 0.0]


def test_written_dataset_reads_back(tmp_path: Path, small: pl.DataFrame) -> None:
    cfg = dataclasses.replace(SMALL, days=3, rows_per_day=2_000)
    out = write_synthetic(cfg, tmp_path / "syn")
    ds = Dataset(out)
    assert [d.date for d in ds.days] == [cfg.date(d) for d in range(3)]
    assert [d.num_rows for d in ds.days] == [2_000] * 3
    assert ds.spec == synthetic_spec(cfg)
    back = ds.scan().collect()
    expected = generate(cfg)[0]
    assert back.select(expected.columns).equals(expected)
    with pytest.raises(DatasetError, match="already exists"):
        write_synthetic(cfg, out)
    assert write_synthetic(cfg, out, overwrite=True) == out


def test_command_line(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    main(["--out", str(out), "--days", "2", "--rows-per-day", "500", "--users", "50", "--items", "40"])
    ds = Dataset(out)
    assert [d.num_rows for d in ds.days] == [500, 500]
    assert ds.spec.meta["synthetic"]["config"]["users"] == 50


def test_popularity_is_zipf(small: pl.DataFrame) -> None:
    counts = _day(small, SMALL, 0).get_column("f0").value_counts(sort=True).get_column("count").to_numpy()
    top_1pct = counts[: max(1, SMALL.field_cardinality // 100)].sum() / counts.sum()
    assert top_1pct > 0.15  # uniform popularity would give 0.01
    assert counts[0] > 20 * np.median(counts)


def test_pools_grow_with_new_ids_each_day(small: pl.DataFrame) -> None:
    seen: set[int] = set()
    distinct_by_day = []
    for d in range(SMALL.days):
        seen |= set(_day(small, SMALL, d).get_column("user").to_list())
        distinct_by_day.append(len(seen))
    assert all(b > a for a, b in itertools.pairwise(distinct_by_day))
    assert distinct_by_day[-1] > SMALL.users
    # The ids seen beyond the first day's pool are exactly the new ones (pool indices >= users).
    first_pool = set(raw_ids("user", np.arange(SMALL.users)).tolist())
    new_last_day = set(_day(small, SMALL, SMALL.days - 1).get_column("user").to_list()) - first_pool
    grown = len(_pools_on(SMALL, SMALL.days - 1)["user"].order) - SMALL.users
    assert 0 < len(new_last_day) <= grown
    # The tag vocabulary is fixed.
    assert small.get_column("tags").explode().n_unique() <= SMALL.tags


def test_drift_changes_the_top_ids_somewhat() -> None:
    def top_ranked(cfg: SyntheticConfig, d: int, k: int = 20) -> set[int]:
        return set(_pools_on(cfg, d)["item"].order[:k].tolist())

    def top_sampled(cfg: SyntheticConfig, d: int, k: int = 20) -> set[int]:
        return set(generate_day(cfg, d).get_column("item").value_counts(sort=True).get_column("item")[:k].to_list())

    still = dataclasses.replace(SMALL, drift=0.0, new_ids_per_day=0.0)
    assert top_ranked(still, 0) == top_ranked(still, 3)
    assert len(top_sampled(still, 0) & top_sampled(still, 3)) >= 15  # only sampling noise at the edge
    assert 5 <= len(top_ranked(SMALL, 0) & top_ranked(SMALL, 3)) < 20
    assert 5 <= len(top_sampled(SMALL, 0) & top_sampled(SMALL, 3)) < 20


def test_labels_follow_the_planted_logit(small: pl.DataFrame) -> None:
    day = _day(small, SMALL, 2)
    logit = planted_logit(SMALL, day)
    # The logit recomputed from the frame's raw ids is the one the labels were drawn from.
    _, drawn_from = _sample_day(SMALL, _pools_on(SMALL, 2), 2)
    np.testing.assert_allclose(logit, drawn_from, rtol=0, atol=1e-9)
    label = day.get_column("label").to_numpy()
    assert _auc(logit, label) >= 0.75
    p = 1 / (1 + np.exp(-logit))
    assert abs(p.mean() - label.mean()) < 0.03


def test_dense_partner_fields_act_through_the_first_dense_columns() -> None:
    cfg = SyntheticConfig(
        days=1, rows_per_day=4000, users=50, items=40, fields=4, field_cardinality=30, dense=6,
        field_latent_dim=6, field_partner="dense", interaction_weight=0.0, tag_weight=0.0, noise=0.0,
    )  # fmt: skip
    assert cfg.field_dims == (6, 4, 0, 0)  # two informative fields of four
    day = generate_day(cfg, 0)
    logit = planted_logit(cfg, day)
    _, drawn_from = _sample_day(cfg, _pools_on(cfg, 0), 0)
    np.testing.assert_allclose(logit, drawn_from, rtol=0, atol=1e-9)
    # A plainly written reference: bias + Σ_i w_i <z_i[id], dense[:k_i]> / sqrt(k_i) + the dense term.
    dense = day.select([f"d{j}" for j in range(6)]).to_numpy().astype(np.float64)
    expected = dense @ np.asarray(cfg.dense_weights) + _planted_model(cfg).bias
    for i, (w, k) in enumerate(zip(cfg.field_weights, cfg.field_dims, strict=True)):
        if w:
            ids = day.get_column(f"f{i}").to_numpy()
            z = raw_latents(cfg.seed, f"f{i}", ids, k)
            expected += w * (z * dense[:, :k]).sum(1) / np.sqrt(k)
    np.testing.assert_allclose(logit, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs at least that many dense columns, got dense=4"):
        SyntheticConfig(dense=4, field_latent_dim=6, field_partner="dense")
    with pytest.raises(ValueError, match="field_partner is 'user', expected 'item' or 'dense'"):
        SyntheticConfig(field_partner="user")  # type: ignore[arg-type]


def _target_encoding_auc(train: pl.DataFrame, test: pl.DataFrame, feature: str) -> float:
    prior = float(train.get_column("label").to_numpy().mean())
    rates = train.group_by(feature).agg(((pl.col("label").sum() + prior * 10) / (pl.len() + 10)).alias("rate"))
    score = test.join(rates, on=feature, how="left").get_column("rate").fill_null(prior).to_numpy()
    return _auc(score, test.get_column("label").to_numpy())


def test_informative_fields_carry_signal_and_noise_fields_do_not(small: pl.DataFrame) -> None:
    train = small.filter(pl.col("day") < SMALL.date(SMALL.days - 1))
    test = _day(small, SMALL, SMALL.days - 1)
    auc = {f: _target_encoding_auc(train, test, f) for f in ("f0", "f1", "f2", "f3")}
    assert auc["f0"] > 0.65 and auc["f1"] > 0.58, auc
    assert abs(auc["f2"] - 0.5) < 0.03 and abs(auc["f3"] - 0.5) < 0.03, auc


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"days": 0}, "days"),
        ({"rows_per_day": -5}, "rows_per_day"),
        ({"users": 1.5}, "users"),
        ({"fields": -1}, "fields"),
        ({"drift": 1.5}, "drift"),
        ({"new_ids_per_day": -0.1}, "new_ids_per_day"),
        ({"zipf": float("nan")}, "zipf"),
        ({"target_ctr": 1.0}, "target_ctr"),
        ({"seed": -1}, "seed"),
        ({"start_date": "2024-01-01"}, "start_date"),
    ],
)
def test_bad_config_names_the_field_and_the_fix(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"{field} is .*expected .*: "):
        SyntheticConfig(**change)


def test_bad_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ValueError, match=r"days is 0.*drift is 2"):
        SyntheticConfig(days=0, drift=2.0)
    with pytest.raises(ValueError, match="unknown SyntheticConfig keys"):
        SyntheticConfig.from_dict({"dayz": 3})
    with pytest.raises(ValueError, match="day_index is 4"):
        generate_day(SMALL, 4)
