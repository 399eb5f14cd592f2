"""The dataset layout and spec: round trip, and every bad input stopping with a message that names the place."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml

from pipeline import dataset as dataset_module
from pipeline.dataset import DATASET_OUTPUT, Dataset, check_output_dir, validate_frame, write_dataset
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


def test_distinct_ids_count_every_days_ids_as_a_whole_stream_n_unique_does(tmp_path: Path) -> None:
    """Several files a day (rows_per_part), ids repeated across files and days, empty multi-hot lists."""
    frame = tiny_frame((301, 177, 250), seed=3)
    ds = Dataset(write_dataset(frame, SPEC, tmp_path / "d", rows_per_part=40))
    assert min(len(d.files) for d in ds.days) == 5
    want = {
        "rid": 728,
        "user": frame["user"].n_unique(),
        "item": frame["item"].n_unique(),
        "tags": frame["tags"].explode().drop_nulls().n_unique(),
    }
    assert want["user"] == 30 and want["tags"] == 20 and 0 < want["item"] < 728  # the fixture's ids
    assert frame["tags"].list.len().min() == 0
    assert ds.distinct_ids() == want


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


# ---- values of whole files: Dataset.check_values -----------------------------------------------------------------


def _set(part: Path, column: str, row: int, value: object) -> None:
    df = pl.read_parquet(part)
    dtype = df.schema[column]
    changed = pl.when(pl.int_range(pl.len()) == row).then(pl.lit(value, dtype)).otherwise(pl.col(column))
    df.with_columns(changed.alias(column)).write_parquet(part)


def test_check_values_names_the_last_days_file_and_row(tmp_path: Path) -> None:
    # Days of 2-4 files each: the NaN is in the second file of the last day.
    ds_dir = write_dataset(tiny_frame(), SPEC, tmp_path / "d", rows_per_part=30)
    last = sorted((ds_dir / "day=2024-03-03").glob("*.parquet"))
    assert len(last) == 2
    _set(last[1], "label", 7, float("nan"))
    ds = Dataset(ds_dir)  # opening reads footers only: the value is found by check_values
    assert ds.check_values(ds.days[:2]) == 7  # the first two days are fine (4 + 3 files)
    with pytest.raises(DatasetError) as e:
        ds.check_values()
    assert (e.value.path, e.value.column) == (str(last[1]), "label")
    assert "label is nan in row 7; labels must be finite numbers" in str(e.value)


@pytest.mark.parametrize(
    ("column", "row", "value", "problem"),
    [
        ("label", 40, float("nan"), "label is nan in row 40"),
        ("label", 3, None, "label is None in row 3"),
        ("label", 12, 0.5, "label is 0.5 in row 12, expected 0 or 1 for task binary"),
        ("user", 9, -4, "has negative id -4 in row 9; ids must be >= 0"),
        ("item", 0, None, "id is missing in row 0"),
        ("tags", 33, [5, None], "id is missing in row 33"),
        ("tags", 21, [7, -1], "has negative id -1 in row 21"),
        ("x0", 60, float("inf"), "has non-finite dense value inf in row 60"),
    ],
    ids=["nan-label", "null-label", "non-binary", "negative-id", "null-id", "null-tag", "negative-tag", "inf-dense"],
)
def test_check_values_agrees_with_the_per_frame_check(
    tmp_path: Path, column: str, row: int, value: object, problem: str
) -> None:
    ds_dir = write_tiny(tmp_path / "d")
    part = ds_dir / "day=2024-03-01" / "part-00000.parquet"
    _set(part, column, row, value)
    frame = pl.read_parquet(part)
    with pytest.raises(DatasetError) as per_frame:
        validate_frame(frame, SPEC, part)
    with pytest.raises(DatasetError) as whole_file:
        Dataset(ds_dir).check_values()
    assert str(whole_file.value) == str(per_frame.value)
    assert whole_file.value.column == column and problem in str(whole_file.value)
    # A plain reference for the row: the first row whose value is the planted one.
    values = frame.get_column(column).to_list()
    assert values.index(next(v for v in values if v != v or v is None or v == value)) == row  # nan != nan
    with pytest.raises(DatasetError) as read:  # reading the day names the file too
        Dataset(ds_dir).read_day(Dataset(ds_dir).days[0])
    assert str(read.value) == str(whole_file.value)


def test_check_values_is_cached_per_file_and_read_day_skips_the_frame_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds_dir = write_tiny(tmp_path / "d", seed=11)
    ds = Dataset(ds_dir)
    assert ds.check_values() == 3
    assert ds.check_values() == 0 and Dataset(ds_dir).check_values(ds.days[1:]) == 0  # cached, across instances
    calls: list[object] = []
    monkeypatch.setattr(dataset_module, "validate_frame", lambda *a: calls.append(a))
    ds.read_day(ds.days[0])
    assert calls == []  # passed files are not checked again
    part = ds_dir / "day=2024-03-02" / "part-00000.parquet"
    _set(part, "user", 0, -1)  # rewriting a file (new size/mtime) makes it unchecked again
    ds = Dataset(ds_dir)
    ds.read_day(ds.days[1])
    assert len(calls) == 1
    ds.read_day(ds.days[1], ["user", "item"], 1, 2)
    assert len(calls) == 1  # a day read whole once is not checked again, whatever slice is read later
    _set(ds_dir / "day=2024-03-03" / "part-00000.parquet", "user", 0, 5)  # valid, but unchecked again
    day3 = Dataset(ds_dir).days[2]
    ds.read_day(day3, ["user"], 1, 2)
    ds.read_day(day3, ["user"], 1, 2)
    assert len(calls) == 2  # a slice is checked once for the columns it has
    ds.read_day(day3, ["user", "label"], 1, 2)
    assert len(calls) == 3  # and again for a column it did not have
    ds.read_day(day3, ["label"], 1, 2)
    assert len(calls) == 3
    monkeypatch.undo()
    _set(part, "user", 0, -2)  # rewritten again: unchecked again (the fake check above let the first rewrite pass)
    with pytest.raises(DatasetError, match="negative id -2 in row 0"):
        Dataset(ds_dir).read_day(ds.days[1])
    with pytest.raises(DatasetError, match="negative id -2 in row 0"):
        ds.check_values()


def test_unreadable_parquet_is_named(tmp_path: Path) -> None:
    ds_dir = write_tiny(tmp_path / "d")
    part = ds_dir / "day=2024-03-02" / "part-00000.parquet"
    data = part.read_bytes()
    for content in (data[: len(data) // 2], b"PAR1 garbage " * 30, b""):
        part.write_bytes(content)
        with pytest.raises(DatasetError, match=r"part-00000.parquet: cannot be read as Parquet.*\n  Fix: restore"):
            Dataset(ds_dir)


# ---- the output guard --------------------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_output_guard_refuses_inputs_and_foreign_directories(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("x: 1\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("a")
    (tmp_path / "file").write_text("f")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    before = _tree(tmp_path)
    refused = {
        src: "is --src",
        src / "sub": "lies inside --src",
        src / "sub" / ".." / "new": "lies inside --src",
        tmp_path: "contains --src",
        tmp_path / "run": "it holds a training run",
        tmp_path / "mine": "it holds a.txt",
        tmp_path / "file": "exists and is a file",
        tmp_path / "link": "is a symbolic link",
    }
    for out, message in refused.items():
        with pytest.raises(DatasetError, match=re.escape(message)):
            check_output_dir(out, kind=DATASET_OUTPUT, protected={"--src": src}, overwrite=True)
    assert _tree(tmp_path) == before
    # A new path, and an earlier dataset with --overwrite, pass; without --overwrite an earlier one does not.
    assert check_output_dir(tmp_path / "new", kind=DATASET_OUTPUT, protected={"--src": src}) == tmp_path / "new"
    write_tiny(tmp_path / "d")
    check_output_dir(tmp_path / "d", kind=DATASET_OUTPUT, overwrite=True)
    with pytest.raises(DatasetError, match=r"already exists \(an earlier dataset\)"):
        check_output_dir(tmp_path / "d", kind=DATASET_OUTPUT)
    # write_dataset replaces an earlier dataset atomically, and nothing else.
    write_dataset(tiny_frame((5, 5)), SPEC, tmp_path / "d", overwrite=True)
    assert [d.num_rows for d in Dataset(tmp_path / "d").days] == [5, 5]
    with pytest.raises(DatasetError, match=r"it holds a\.txt"):
        write_dataset(tiny_frame((5, 5)), SPEC, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "a.txt").read_text() == "a"
