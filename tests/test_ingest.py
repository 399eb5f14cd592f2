"""Tests of `pipeline.ingest` on the real datasets in ../shared (skipped when absent) and on small bad inputs.

Expected counts come from each folder's PROVENANCE.md, or are recounted here from the source file with a plain
reader that does not share code with the ingest.
"""

from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

import pipeline.ingest as ingest_module
from pipeline.dataset import Dataset
from pipeline.errors import DatasetError
from pipeline.ingest import (
    CRITEO_DENSE,
    CRITEO_SPARSE,
    MISSING_ID,
    hashed_day_index,
    ingest,
    main,
    read_criteo,
    read_ml_1m,
    splitmix64,
)
from tests.conftest import shared_dataset

pytestmark = pytest.mark.data


def _frame(out: Path) -> tuple[Dataset, pl.DataFrame]:
    """Open the dataset (validating it) and read all of it.

    One hive scan rather than `Dataset.scan()`, which concatenates one lazy scan per day and takes minutes
    on the 4,110 days of ml-latest-small.
    """
    ds = Dataset(out)
    df = pl.scan_parquet(out / "**/*.parquet", hive_partitioning=True).collect()
    assert df.schema["day"] == pl.Date and df.height == ds.num_rows
    return ds, df


def _assert_nothing_written(folder: Path, inputs: set[str]) -> None:
    """Only the inputs remain: no output directory and no `.out.tmp-*` directory."""
    assert {p.name for p in folder.iterdir()} == inputs


# ------------------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def ml_1m(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, pl.DataFrame]:
    src = shared_dataset("ml-1m")
    out = ingest("ml-1m", src, tmp_path_factory.mktemp("ml1m") / "out")
    return _frame(out)


def test_ml_100k(tmp_path: Path) -> None:
    src = shared_dataset("ml-100k")
    ds, df = _frame(ingest("ml-100k", src, tmp_path / "out"))
    assert df.height == 100_000
    assert df["user"].n_unique() == 943
    assert df["item"].n_unique() == 1_682
    spec = ds.spec
    assert spec.feature_names == ["user", "item", "age", "gender", "occupation", "zip", "genres", "year"]
    assert spec.field("genres").multi_hot and df.schema["genres"] == pl.List(pl.Int64)
    assert (spec.task, spec.timestamp, spec.user_field, spec.item_field) == (
        "binary",
        "timestamp",
        "user",
        "item",
    )
    raw = pl.read_csv(src / "u.data", separator="\t", has_header=False, new_columns=["u", "i", "r", "t"])
    assert df["label"].sum() == (raw["r"] >= 4).sum()
    assert (df["day"] == pl.from_epoch(df["timestamp"], time_unit="s").dt.date()).all()
    assert df["timestamp"].is_sorted()
    # Item 267 is "unknown" with no release date: genre 0 (unknown), year 0.
    unknown = df.filter(pl.col("item") == 267).row(0, named=True)
    assert (unknown["genres"], unknown["year"]) == ([0], 0)
    toy_story = df.filter(pl.col("item") == 1).row(0, named=True)
    assert (toy_story["genres"], toy_story["year"]) == ([3, 4, 5], 1995)  # Animation, Children's, Comedy
    assert set(df["gender"].unique()) == {0, 1}
    assert df["occupation"].min() == 0 and df["occupation"].max() == 20


def test_ml_100k_regression(tmp_path: Path) -> None:
    src = shared_dataset("ml-100k")
    ds, df = _frame(ingest("ml-100k", src, tmp_path / "out", task="regression"))
    assert ds.spec.task == "regression"
    assert df["label"].sum() == pytest.approx(
        pl.read_csv(src / "u.data", separator="\t", has_header=False, new_columns=["u", "i", "r", "t"])["r"].sum()
    )


def test_ml_1m_without_timestamps(ml_1m: tuple[Dataset, pl.DataFrame]) -> None:
    ds, df = ml_1m
    assert df.height == 1_000_209
    assert df["user"].n_unique() == 6_040
    assert df["item"].n_unique() == 3_706
    assert ds.spec.timestamp is None and "timestamp" not in df.columns
    assert [d.date for d in ds.days] == [dt.date(2000, 4, 25) + dt.timedelta(days=k) for k in range(30)]
    assert "splitmix64" in ds.spec.meta["day_rule"] and ds.spec.meta["days"] == 30
    assert any("ratings_no_timestamp.dat" in f for f in ds.spec.meta["source_files"])
    # The rating histogram of PROVENANCE.md: 4 and 5 stars are 348,971 + 226,310.
    assert df["label"].sum() == 348_971 + 226_310
    # Zips like 55117-1234 are hashed like any string; every user has a zip id.
    assert (df["zip"] >= 0).all() and df.filter(pl.col("user") == 161)["zip"].n_unique() == 1
    # The day follows from (user, movie) alone.
    expected = hashed_day_index(df["user"], df["item"], 30)
    offset = df.select((pl.col("day") - pl.lit(dt.date(2000, 4, 25))).dt.total_days()).to_series()
    assert (offset == expected).all()


def test_ml_1m_days_are_deterministic(ml_1m: tuple[Dataset, pl.DataFrame]) -> None:
    _, first = ml_1m
    again, _ = read_ml_1m(shared_dataset("ml-1m"))
    key = ["user", "item"]
    assert first.select(*key, "day").sort(key).equals(again.select(*key, "day").sort(key))


def test_splitmix64_reference_value() -> None:
    # The first output of splitmix64 seeded with 0 (Steele, Lea and Flood 2014; Vigna's reference code).
    assert int(splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


def test_ml_1m_gzip_prefix_with_timestamps(tmp_path: Path) -> None:
    src = shared_dataset("ml-1m") / "ratings_prefix_487650.dat.gz"
    ds, df = _frame(ingest("ml-1m", src, tmp_path / "out"))
    assert df.height == 487_650
    assert df["user"].n_unique() == 2_999  # users 1..2999, all complete
    assert ds.spec.timestamp == "timestamp"
    assert (df["day"] == pl.from_epoch(df["timestamp"], time_unit="s").dt.date()).all()
    with gzip.open(src, "rt") as f:
        first = f.readline().strip().split("::")
    assert df.filter((pl.col("user") == 1) & (pl.col("item") == 1193))["timestamp"].to_list() == [int(first[3])]


def test_ml_latest_small(tmp_path: Path) -> None:
    src = shared_dataset("ml-latest-small")
    ds, df = _frame(ingest("ml-latest", src / "ratings.csv", tmp_path / "out", threshold=3.5))
    raw = pl.read_csv(src / "ratings.csv")
    assert (raw.height, raw["userId"].n_unique(), raw["movieId"].n_unique()) == (100_836, 610, 9_724)
    assert df.height == 100_836
    assert df["user"].n_unique() == 610
    assert df["item"].n_unique() == 9_724
    assert df["label"].sum() == (raw["rating"] >= 3.5).sum()
    assert ds.days[0].date == dt.date(1996, 3, 29)


def test_lightgcn(tmp_path: Path) -> None:
    src = shared_dataset("ml-1m") / "lightgcn_split"
    ds, df = _frame(ingest("lightgcn", src, tmp_path / "out"))
    entries = {s: sum(len(line.split()) - 1 for line in (src / f"{s}.txt").open()) for s in ("train", "test")}
    assert entries == {"train": 800_167, "test": 200_042}
    assert df.height == sum(entries.values()) == 1_000_209
    assert dict(df.group_by("split").len().iter_rows()) == entries
    assert (df["user"].n_unique(), df["item"].n_unique()) == (6_040, 3_706)
    assert (df["label"] == 1).all()
    assert [d.date for d in ds.days] == [dt.date(1970, 1, 1)]
    assert ds.spec.split == "split"


def test_criteo_folder(tmp_path: Path) -> None:
    src = shared_dataset("criteo-sample")
    ds, df = _frame(ingest("criteo", src, tmp_path / "out", days=4))
    counts = dict(df.group_by("split").agg(pl.len()).iter_rows())
    clicks = dict(df.group_by("split").agg(pl.col("label").sum()).iter_rows())
    assert counts == {"train": 7_200, "valid": 409, "test": 391}
    assert clicks == {"train": 1_549, "valid": 93, "test": 86}
    assert ds.spec.feature_names == list(CRITEO_SPARSE) and ds.spec.dense == CRITEO_DENSE
    assert all(df.schema[c] == pl.Float32 for c in CRITEO_DENSE)
    assert df.select(pl.col(CRITEO_DENSE).min()).min_horizontal().item() >= 0
    # 8,000 rows in 4 contiguous chunks of 2,000, from 2014-01-01, train rows first.
    assert [(d.name, d.num_rows) for d in ds.days] == [(f"2014-01-0{k}", 2_000) for k in range(1, 5)]
    first = df.row(0, named=True)  # the first line of Kaggle's train.txt: 0 1 1 5 0 1382 ...
    assert first["I5"] == pytest.approx(np.log1p(1382)) and first["I12"] == 0.0  # I12 is empty
    assert first["C22"] == MISSING_ID  # an empty categorical


def test_criteo_parse_mode_reads_hex(tmp_path: Path) -> None:
    src = shared_dataset("criteo-sample") / "wideresdnn_train.tsv"
    df, spec = read_criteo(src, id_mode="parse")
    assert df.height == 7_200 and spec.split is None
    assert df.row(0, named=True)["C1"] == 0x68FD1E64
    hashed, _ = read_criteo(src)
    assert hashed["C1"][0] != 0x68FD1E64 and (hashed["C1"] >= 0).all()


def test_criteo_deepctr_header_csv(tmp_path: Path) -> None:
    src = shared_dataset("criteo-sample") / "deepctr_criteo_sample.txt"
    _, df = _frame(ingest("criteo", src, tmp_path / "out"))
    assert df.height == 200 and df["label"].sum() == 49
    assert df.row(0, named=True)["I3"] == pytest.approx(np.log1p(260.0))


@pytest.mark.parametrize("chunk_bytes", [4_096, 150_000])
def test_criteo_streamed_ingest_equals_the_whole_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int
) -> None:
    """The streamed ingest, with chunks far smaller than the files (parts cut across the day boundaries), writes
    the rows, days, order and spec of the whole-file read."""
    src = shared_dataset("criteo-sample")
    monkeypatch.setattr(ingest_module, "CHUNK_BYTES", chunk_bytes)
    ds, got = _frame(ingest("criteo", src, tmp_path / "out", days=3))
    want, spec = read_criteo(src, days=3)
    assert ds.spec.to_dict() == spec.to_dict()
    assert got.select(want.columns).equals(want)
    assert [d.num_rows for d in ds.days] == [2_667, 2_667, 2_666]  # row i of 8,000 -> day i * 3 // 8,000
    assert min(len(d.files) for d in ds.days) >= (2 if chunk_bytes > 100_000 else 50)
    assert not list((tmp_path / "out").rglob("_chunks"))


def _criteo_line(k: int, sep: str) -> str:
    """A Criteo row: label, 13 dense values (some empty), 26 hex categoricals (some empty)."""
    dense = ["" if (k + j) % 5 == 0 else str((k * 7 + j) % 400) for j in range(13)]
    sparse = ["" if (k + j) % 7 == 0 else f"{(k * 2_654_435_761 + j * 40_503) % 2**32:08x}" for j in range(26)]
    return sep.join([str(k % 2), *dense, *sparse])


def test_criteo_streamed_gzip_header_blank_lines_and_lines_longer_than_a_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header = ",".join(["label", *CRITEO_DENSE, *CRITEO_SPARSE])
    lines = ["", header, *(_criteo_line(k, ",") + ("\r" if k % 3 == 0 else "") for k in range(300)), "", ""]
    lines.insert(100, "   ")
    (tmp_path / "rows.csv.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "rows.csv").write_text("\n".join(lines))
    want, _ = read_criteo(tmp_path / "src" / "rows.csv", days=2)
    assert want.height == 300
    for chunk_bytes in (50, 1_000):  # a line is about 300 bytes: some chunks end inside their first line
        monkeypatch.setattr(ingest_module, "CHUNK_BYTES", chunk_bytes)
        out = ingest("criteo", tmp_path / "rows.csv.gz", tmp_path / f"out{chunk_bytes}", days=2)
        ds, got = _frame(out)
        assert got.select(want.columns).equals(want)
        assert [d.num_rows for d in ds.days] == [150, 150]


def test_criteo_streamed_bad_line_in_a_later_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value or bad text deep in the file is named with its line in the whole file, and nothing is left."""
    monkeypatch.setattr(ingest_module, "CHUNK_BYTES", 2_000)
    rows = [_criteo_line(k, "\t") for k in range(200)]
    bad = rows.copy()
    bad[150] = "x" + bad[150]  # the label 'x0', on line 152 (a blank line is above it)
    (tmp_path / "bad.tsv").write_text("\n".join([*bad[:10], "", *bad[10:]]))
    err = _raises(tmp_path, {"bad.tsv"}, "criteo", tmp_path / "bad.tsv")
    assert (err.line, err.column) == (152, "label") and "the value 'x0' is not a number" in str(err)
    head = "\n".join(rows[:150]).encode() + b"\n"
    (tmp_path / "bad.tsv").write_bytes(head + b"\xff\xfe" + rows[151].encode())
    err = _raises(tmp_path, {"bad.tsv"}, "criteo", tmp_path / "bad.tsv")
    assert err.line == 151 and f"is not valid utf-8 text (invalid start byte at byte {len(head)})" in str(err)


def test_avazu_folder(tmp_path: Path) -> None:
    src = shared_dataset("avazu-sample")
    ds, df = _frame(ingest("avazu", src, tmp_path / "out"))
    counts = dict(df.group_by("split").agg(pl.len()).iter_rows())
    clicks = dict(df.group_by("split").agg(pl.col("label").sum()).iter_rows())
    assert counts == {"train": 8_087, "valid": 480, "test": 432}
    assert clicks == {"train": 1_397, "valid": 86, "test": 80}
    assert len(ds.spec.sparse) == 21 and "id" not in df.columns and "hour" not in df.columns
    assert [d.date for d in ds.days] == [dt.date(2014, 10, 21)]
    assert (df["timestamp"] == int(dt.datetime(2014, 10, 21, tzinfo=dt.UTC).timestamp())).all()


def test_avazu_parse_mode_rejects_negative_c20(tmp_path: Path) -> None:
    src = shared_dataset("avazu-sample") / "wideresdnn_dev.csv"
    with pytest.raises(DatasetError) as e:
        ingest("avazu", src, tmp_path / "out", id_mode="parse")
    assert e.value.column == "C20" and e.value.line == 2 and "negative" in str(e.value)
    assert "--id-mode hash" in e.value.fix
    _assert_nothing_written(tmp_path, set())


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = shared_dataset("criteo-sample") / "wideresdnn_dev.tsv"
    out = tmp_path / "out"
    assert main(["--format", "criteo", "--src", str(src), "--out", str(out)]) == 0
    assert "criteo: 409 rows, 1 days" in capsys.readouterr().out
    assert main(["--format", "criteo", "--src", str(src), "--out", str(out)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["--format", "criteo", "--src", str(src), "--out", str(out), "--overwrite", "--days", "2"]) == 0
    assert len(Dataset(out).days) == 2


# ---------------------------------------------------------------------------------------------- bad inputs


def _tiny_ml_1m(folder: Path, ratings: str, name: str = "ratings_no_timestamp.dat") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::55117-1234\n")
    (folder / "movies.dat").write_text("1::Toy Story (1995)::Animation|Children's|Comedy\n2::Heat::Action\n")
    (folder / name).write_text(ratings)
    return folder


def _raises(tmp_path: Path, inputs: set[str], fmt: str, src: Path, **options: Any) -> DatasetError:
    with pytest.raises(DatasetError) as e:
        ingest(fmt, src, tmp_path / "out", **options)
    _assert_nothing_written(tmp_path, inputs)
    return e.value


def test_tiny_ml_1m_ok_and_deterministic(tmp_path: Path) -> None:
    src = _tiny_ml_1m(tmp_path / "src", "1::1::5\n1::2::3\n2::1::4\n")
    a, _ = read_ml_1m(src, days=7)
    b, _ = read_ml_1m(src / "ratings_no_timestamp.dat", days=7)
    assert a.equals(b)
    assert a["genres"].to_list() == [[3, 4, 5], [1], [3, 4, 5]] and a["year"].to_list() == [1995, 0, 1995]
    zips, _ = read_ml_1m(src, id_mode="parse")
    assert zips["zip"].to_list() == [48067, 48067, 551171234]


def test_missing_file(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    err = _raises(tmp_path, {"src"}, "ml-100k", tmp_path / "src")
    assert "u.data" in err.path and "no such file" in str(err) and "ML-100k ratings" in str(err)
    _tiny_ml_1m(tmp_path / "src", "1::1::5\n")
    (tmp_path / "src" / "users.dat").unlink()
    err = _raises(tmp_path, {"src"}, "ml-1m", tmp_path / "src")
    assert err.path.endswith("users.dat") and "UserID::Gender" in str(err)


def test_malformed_double_colon_line(tmp_path: Path) -> None:
    src = _tiny_ml_1m(tmp_path / "src", "1::1::5\n1::2::3\n\n2::1\n")
    err = _raises(tmp_path, {"src"}, "ml-1m", src)
    assert err.line == 4 and err.path.endswith("ratings_no_timestamp.dat")  # the blank line 3 still counts
    assert "has 2 fields" in str(err) and "'2::1'" in str(err)
    src = _tiny_ml_1m(tmp_path / "src", "1::1::5\n1::x::3\n")
    err = _raises(tmp_path, {"src"}, "ml-1m", src)
    assert (err.line, err.column) == (2, "item") and "'x' is not a decimal integer" in str(err)
    src = _tiny_ml_1m(tmp_path / "src", "1::1::5\n1::2::three\n")
    err = _raises(tmp_path, {"src"}, "ml-1m", src)
    assert (err.line, err.column) == (2, "rating") and "not a number" in str(err)


def test_unknown_user_in_ratings(tmp_path: Path) -> None:
    src = _tiny_ml_1m(tmp_path / "src", "1::1::5\n3::1::4\n")
    err = _raises(tmp_path, {"src"}, "ml-1m", src)
    assert (err.line, err.column) == (2, "user") and "users.dat" in str(err)


def test_malformed_tsv_line(tmp_path: Path) -> None:
    good = "\t".join(["1", *["3"] * 13, *["68fd1e64"] * 26])
    (tmp_path / "bad.tsv").write_text(f"{good}\n{good}\n{good.rsplit(chr(9), 1)[0]}\n")
    err = _raises(tmp_path, {"bad.tsv"}, "criteo", tmp_path / "bad.tsv")
    assert err.line == 3 and err.path.endswith("bad.tsv") and "has 39 fields" in str(err) and "expected 40" in str(err)


def test_negative_id(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,4.0,964982703\n-7,3,4.0,964982703\n")
    err = _raises(tmp_path, {"ratings.csv"}, "ml-latest", tmp_path / "ratings.csv")
    assert (err.line, err.column) == (3, "user") and "ratings.csv" in err.path and "-7 is negative" in str(err)


def test_nan_label(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,4.0,964982703\n1,3,nan,964982703\n")
    err = _raises(tmp_path, {"ratings.csv"}, "ml-latest", tmp_path / "ratings.csv", task="regression")
    assert (err.line, err.column) == (3, "rating") and "not finite" in str(err)


def test_id_overflow_in_parse_mode(tmp_path: Path) -> None:
    row = ["0", *[""] * 13, *["68fd1e64"] * 26]
    big = [*row[:14], "ffffffffffffffffff", *row[15:]]
    (tmp_path / "big.tsv").write_text("\t".join(row) + "\n" + "\t".join(big) + "\n")
    err = _raises(tmp_path, {"big.tsv"}, "criteo", tmp_path / "big.tsv", id_mode="parse")
    assert (err.line, err.column) == (2, "C1") and "'ffffffffffffffffff' does not fit in int64" in str(err)
    assert "--id-mode hash" in err.fix
    df, _ = read_criteo(tmp_path / "big.tsv")  # hashing takes it
    assert df.height == 2 and (df["C1"] >= 0).all() and (df.select(CRITEO_DENSE).sum_horizontal() == 0).all()


def test_missing_column_in_header_csv(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text("userId,movieId,timestamp\n1,2,964982703\n")
    err = _raises(tmp_path, {"ratings.csv"}, "ml-latest", tmp_path / "ratings.csv")
    assert (err.line, err.column) == (1, "rating") and "header has no column 'rating'" in str(err)
    header = ",".join(["label", *CRITEO_DENSE, *CRITEO_SPARSE[:-1]])
    (tmp_path / "c.csv").write_text(header + "\n" + ",".join(["0"] * 39) + "\n")
    err = _raises(tmp_path, {"ratings.csv", "c.csv"}, "criteo", tmp_path / "c.csv")
    assert err.column == "C26" and err.path.endswith("c.csv")


def test_option_that_does_not_apply(tmp_path: Path) -> None:
    (tmp_path / "x.tsv").write_text("")
    err = _raises(tmp_path, {"x.tsv"}, "criteo", tmp_path / "x.tsv", threshold=3.0)
    assert "--threshold do not apply to format criteo" in str(err)
    src = _tiny_ml_1m(tmp_path / "src", "1::1::5::978300760\n", name="ratings.dat")
    err = _raises(tmp_path, {"x.tsv", "src"}, "ml-1m", src, days=3)
    assert "--days" in str(err) and "timestamps" in str(err)


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").mkdir()
    code = main(["--format", "lightgcn", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "train.txt" in capsys.readouterr().err
    _assert_nothing_written(tmp_path, {"src"})


def test_out_never_replaces_the_source(tmp_path: Path) -> None:
    src = tmp_path / "raw" / "ml"
    src.mkdir(parents=True)
    (src / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.0,964982703\n2,20,3.0,964982224\n")
    for out, problem in [
        (src, "is --src"),
        (tmp_path / "raw", "contains --src"),
        (src / "dataset", "lies inside --src"),
    ]:
        with pytest.raises(DatasetError, match=problem) as e:
            ingest("ml-latest", src, out, overwrite=True)
        assert "choose an --out outside" in e.value.fix
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["ml", "ratings.csv", "raw"]
    # --overwrite onto an earlier dataset still replaces it.
    out = ingest("ml-latest", src, tmp_path / "out")
    assert ingest("ml-latest", src, out, overwrite=True, task="regression") == out
    assert Dataset(out).spec.task == "regression"
