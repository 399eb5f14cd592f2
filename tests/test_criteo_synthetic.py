"""The Criteo-like stream: layout and schema, determinism, Zipf head, daily drift, planted signal, bounded memory."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.criteo_synthetic import (
    DENSE,
    SPARSE,
    CriteoSyntheticConfig,
    criteo_synthetic_spec,
    generate_chunk,
    main,
    write_criteo_synthetic,
)
from pipeline.dataset import Dataset
from pipeline.errors import DatasetError

SMALL = CriteoSyntheticConfig(days=3, rows_per_day=30_000, chunk_rows=10_000, max_cardinality=100_000, seed=3)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_criteo_synthetic(SMALL, tmp_path_factory.mktemp("criteo") / "ds")


@pytest.fixture(scope="module")
def rows(small: Path) -> pl.DataFrame:
    return Dataset(small).scan().collect()


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    ranks = pl.Series(score).rank("average").to_numpy()
    pos = label == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _target_encoding_auc(df: pl.DataFrame, field: str) -> float:
    """AUC on the second half of the rows of a smoothed per-id mean label fitted on the first half."""
    half = df.height // 2
    fit, held = df.slice(0, half), df.slice(half)
    prior, strength = float(fit["label"].mean()), 20.0  # type: ignore[arg-type]
    means = fit.group_by(field).agg(((pl.col("label").sum() + strength * prior) / (pl.len() + strength)).alias("m"))
    scored = held.join(means, on=field, how="left").with_columns(pl.col("m").fill_null(prior))
    return _auc(scored["m"].to_numpy(), scored["label"].to_numpy())


def test_layout_schema_and_values(small: Path, rows: pl.DataFrame) -> None:
    ds = Dataset(small)
    assert ds.check_values() >= 1
    assert [d.num_rows for d in ds.days] == [30_000] * 3
    assert all(len(d.files) >= 2 for d in ds.days)
    assert [f.name for f in ds.days[0].files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert ds.spec.dense == DENSE and ds.spec.feature_names == list(SPARSE)
    assert len(DENSE) == 13 and len(SPARSE) == 26
    assert {f.name for f in ds.spec.sparse if f.multi_hot} == set(SMALL.multi_hot)
    for c in DENSE:
        assert rows.schema[c] == pl.Float32
    for f in SPARSE:
        assert rows.schema[f] == (pl.List(pl.Int64) if f in SMALL.multi_hot else pl.Int64)
    lengths = rows["c24"].list.len().to_numpy()
    assert lengths.min() == 1 and lengths.max() == SMALL.max_multi_hot
    ids = rows["c3"].to_numpy()
    assert ids.min() >= 0 and ids.max() > 2**40  # large scrambled ids, not 0..N-1
    assert 0.15 < float(rows["label"].mean()) < 0.35  # type: ignore[arg-type]
    meta = ds.spec.meta["criteo_synthetic"]
    assert meta["field_importance"]["c1"] == 1.0 and meta["field_importance"]["c11"] == 0.0
    assert meta["config"]["rows_per_day"] == 30_000
    assert pq.ParquetFile(ds.days[0].files[0]).metadata.row_group(0).column(0).compression == "ZSTD"


def test_deterministic(small: Path, tmp_path: Path) -> None:
    again = Dataset(write_criteo_synthetic(SMALL, tmp_path / "again"))
    first = Dataset(small)
    for a, b in zip(first.days, again.days, strict=True):
        for fa, fb in zip(a.files, b.files, strict=True):
            assert pl.read_parquet(fa).equals(pl.read_parquet(fb))
    other = Dataset(write_criteo_synthetic(dataclasses.replace(SMALL, seed=4), tmp_path / "other"))
    assert not pl.read_parquet(other.days[0].files[0]).equals(pl.read_parquet(first.days[0].files[0]))


def test_planted_signal(rows: pl.DataFrame) -> None:
    day0 = rows.filter(pl.col("day") == pl.col("day").min())
    assert _target_encoding_auc(day0, "c1") > 0.6
    assert abs(_target_encoding_auc(day0, "c11") - 0.5) < 0.03  # weight 0
    assert abs(_target_encoding_auc(day0, "c5") - 0.5) < 0.03  # weight 0


def test_zipf_head(rows: pl.DataFrame) -> None:
    counts = rows.filter(pl.col("day") == pl.col("day").min())["c3"].value_counts()["count"].to_numpy()
    assert SMALL.cardinalities["c3"] == 100_000
    top = np.sort(counts)[::-1][: SMALL.cardinalities["c3"] // 100]
    assert top.sum() / counts.sum() > 0.2


def test_daily_drift(tmp_path: Path) -> None:
    def unseen(drift: float) -> float:
        """The share of day 1's occurrences of c7's ids that day 0 did not have."""
        cfg = dataclasses.replace(SMALL, days=2, drift=drift)
        df = Dataset(write_criteo_synthetic(cfg, tmp_path / f"drift{drift}")).scan().select("day", "c7").collect()
        first, second = (part["c7"] for part in df.partition_by("day", maintain_order=True))
        return float((~second.is_in(first.unique().implode())).mean())  # type: ignore[arg-type]

    still, drifting = unseen(0.0), unseen(0.2)
    assert still > 0  # the Zipf tail alone brings ids a day did not see
    assert drifting > still + 0.05, (still, drifting)  # drift gives ranks new ids, head ones included


def test_memory_does_not_grow_with_rows(tmp_path: Path) -> None:
    def peak(rows_per_day: int) -> int:
        cfg = dataclasses.replace(SMALL, days=2, rows_per_day=rows_per_day, chunk_rows=20_000)
        write_criteo_synthetic(cfg, tmp_path / "warm", overwrite=True)  # imports and caches outside the measure
        tracemalloc.start()
        try:
            write_criteo_synthetic(cfg, tmp_path / f"m{rows_per_day}")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(60_000), peak(240_000)
    assert large < 1.5 * small, (small, large)


def test_refuses_existing_output_and_bad_config(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DatasetError, match="already exists"):
        write_criteo_synthetic(SMALL, small)
    with pytest.raises(ValueError, match="chunk_rows is 0"):
        CriteoSyntheticConfig(chunk_rows=0)
    with pytest.raises(ValueError, match="multi_hot"):
        CriteoSyntheticConfig(multi_hot=("c27",))
    with pytest.raises(SystemExit):
        main(["--out", str(small), "--days", "1", "--rows-per-day", "10"])
    assert "already exists" in capsys.readouterr().err


def test_user_and_item_fields(small: Path) -> None:
    spec = Dataset(small).spec
    assert (spec.user_field, spec.item_field) == ("c3", "c12")  # the two largest fields by default
    assert not spec.field("c3").multi_hot and not spec.field("c12").multi_hot
    chosen = dataclasses.replace(SMALL, user_field="c1", item_field="c2")
    assert (criteo_synthetic_spec(chosen).user_field, criteo_synthetic_spec(chosen).item_field) == ("c1", "c2")
    unset = criteo_synthetic_spec(dataclasses.replace(SMALL, user_field=None, item_field=None))
    assert unset.user_field is None and unset.item_field is None
    # Only the spec names them: the data is the same whichever fields they are.
    for cfg in (chosen, dataclasses.replace(SMALL, user_field=None, item_field=None)):
        assert generate_chunk(cfg, 1, 0, 2_000).equals(generate_chunk(SMALL, 1, 0, 2_000))
    with pytest.raises(ValueError, match="user_field is 'user', expected one of the sparse fields"):
        CriteoSyntheticConfig(user_field="user")
    with pytest.raises(ValueError, match="item_field is 'c25', a multi-hot field"):
        CriteoSyntheticConfig(item_field="c25")
    with pytest.raises(ValueError, match="user_field and item_field are both 'c3'"):
        CriteoSyntheticConfig(item_field="c3")


def test_command_line(tmp_path: Path) -> None:
    main(["--out", str(tmp_path / "cli"), "--days", "2", "--rows-per-day", "500", "--chunk-rows", "200"])
    ds = Dataset(tmp_path / "cli")
    assert [len(d.files) for d in ds.days] == [3, 3] and ds.check_values() == 6
