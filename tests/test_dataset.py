"""The dataset layout and spec: round trip, and every bad input stopping with a message that names the place."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml

from pipeline.dataset import Dataset, write_dataset
from pipeline.errors import DatasetError, SpecError
from pipeline.spec import DatasetSpec, SparseField, load_spec
from tests.helpers import SPEC, tiny_frame, write_tiny


def _no_leftovers(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if p.name.startswith(".")] == []


def test_round_trip(tmp_path: Path) -> None:
    frame = tiny_frame()
    ds = Dataset(write_tiny(tmp_path / "d"))
    assert ds.spec == SPEC
    assert [d.name for d in ds.days] == ["2024-03-01", "2024-03-02", "2024-03-03"]
    assert [d.num_rows for d in ds.days] == [101, 77, 50]
    back = ds.scan().collect()
    assert back.drop("day").equals(frame.select(SPEC.columns))
    assert back["day"].to_list() == frame["day"].to_list()
    assert ds.read_day(ds.days[1], ["rid"], offset=10, length=5)["rid"].to_list() == frame["rid"][111:116].to_list()


def test_output_is_atomic_and_never_overwritten_silently(tmp_path: Path) -> None:
    write_tiny(tmp_path / "d")
    with pytest.raises(DatasetError, match="already exists"):
        write_tiny(tmp_path / "d")
    bad = tiny_frame().with_columns(label=pl.lit(float("nan"), dtype=pl.Float32))
    with pytest.raises(DatasetError, match=r"column 'label'.*finite"):
        write_dataset(bad, SPEC, tmp_path / "e")
    assert not (tmp_path / "e").exists()
    _no_leftovers(tmp_path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (pl.col("label").cast(pl.Float64) * float("inf"), r"column 'label'.*finite"),
        (
            pl.when(pl.col("rid") > 10**15 + 5_000_000).then(-pl.col("rid")).otherwise(pl.col("rid")),
            r"column 'rid'.*negative id",
        ),
        (pl.lit(3.0).alias("label"), r"column 'label'.*expected 0 or 1"),
    ],
    ids=["inf-label", "negative-id", "non-binary-label"],
)
def test_bad_values_are_rejected(tmp_path: Path, change: pl.Expr, match: str) -> None:
    frame = tiny_frame()
    name = "label" if "label" in match else "rid"
    with pytest.raises(DatasetError, match=match):
        write_dataset(frame.with_columns(change.alias(name)), SPEC, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_wrong_column_type_names_the_file_and_column(tmp_path: Path) -> None:
    ds_dir = write_tiny(tmp_path / "d")
    part = ds_dir / "day=2024-03-02" / "part-00000.parquet"
    pl.read_parquet(part).with_columns(pl.col("user").cast(pl.String)).write_parquet(part)
    with pytest.raises(
        SpecError, match=r"day=2024-03-02/part-00000.parquet, column 'user': has type String, expected int64"
    ):
        Dataset(ds_dir)


def test_missing_column_and_spec_naming_an_absent_column(tmp_path: Path) -> None:
    ds_dir = write_tiny(tmp_path / "d")
    part = ds_dir / "day=2024-03-01" / "part-00000.parquet"
    pl.read_parquet(part).drop("x0").write_parquet(part)
    with pytest.raises(
        SpecError, match=r"part-00000.parquet, column 'x0': the spec names column 'x0' but the file has no"
    ):
        Dataset(ds_dir)
    ds_dir = write_tiny(tmp_path / "e")
    raw = yaml.safe_load((ds_dir / "dataset.yaml").read_text())
    raw["dense"] = ["x0", "price"]
    (ds_dir / "dataset.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=r"(?s)column 'price'.*correct dataset.yaml"):
        Dataset(ds_dir)


def test_day_directory_that_is_not_a_date(tmp_path: Path) -> None:
    ds_dir = write_tiny(tmp_path / "d")
    shutil.move(ds_dir / "day=2024-03-02", ds_dir / "day=2024-13-02")
    with pytest.raises(
        DatasetError, match=r"(?s)day=2024-13-02: day directory '2024-13-02' is not a date.*Fix: rename"
    ):
        Dataset(ds_dir)
    shutil.move(ds_dir / "day=2024-13-02", ds_dir / "extra")
    with pytest.raises(DatasetError, match=r"extra: is not a 'day=YYYY-MM-DD' partition"):
        Dataset(ds_dir)


def test_empty_and_missing_days(tmp_path: Path) -> None:
    ds_dir = write_tiny(tmp_path / "d")
    part = ds_dir / "day=2024-03-03" / "part-00000.parquet"
    pl.read_parquet(part).head(0).write_parquet(part)
    with pytest.raises(DatasetError, match=r"day=2024-03-03: is an empty day"):
        Dataset(ds_dir)
    with pytest.raises(DatasetError, match="no such dataset directory"):
        Dataset(tmp_path / "nope")
    (tmp_path / "bare").mkdir()
    with pytest.raises(SpecError, match=r"bare/dataset.yaml: no dataset spec here"):
        Dataset(tmp_path / "bare")


def test_spec_validation(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="user_field is 'who'"):
        DatasetSpec(name="x", task="binary", label="y", sparse=(SparseField("u", "u"),), user_field="who")
    with pytest.raises(SpecError, match="task is 'ranking'"):
        DatasetSpec(name="x", task="ranking", label="y", sparse=(SparseField("u", "u"),))  # type: ignore[arg-type]
    SPEC.save(tmp_path)
    raw = yaml.safe_load((tmp_path / "dataset.yaml").read_text())
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump({**raw, "lable": "y"}))
    with pytest.raises(SpecError, match=r"unknown keys \['lable'\]"):
        load_spec(tmp_path)
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump({**raw, "version": 9}))
    with pytest.raises(SpecError, match="format/version"):
        load_spec(tmp_path)


def test_write_needs_a_day_column(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="'day' column of type Date"):
        write_dataset(tiny_frame().drop("day"), SPEC, tmp_path / "d")
    frame = tiny_frame().with_columns(day=pl.lit(dt.date(2024, 1, 1)))
    assert len(Dataset(write_dataset(frame, SPEC, tmp_path / "one")).days) == 1
