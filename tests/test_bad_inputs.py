"""The bad-input catalogue (DESIGN.md decision 15; docs/bad-inputs.md lists every case).

Each `Case` builds one malformed input in its own `tmp_path`, runs the real command in this process (a module's
`main([...])`, or the library call a job makes), and checks what a user would see:

(a) the message names the file, column or key at fault, and (b) says what was expected — both through the case's
`expect` substrings; (c) it gives a fix (`FIX` wording); (d) there is no Python traceback; and (e) the directory
tree (paths, sizes, modification times, contents of small files) is exactly as the case built it, apart from the
paths the case declares in `changes`: nothing is written, moved or deleted when an input is refused.

Every case is single-process and quick. A tiny trained run and its export bundle, for the cases that need them, are
built once in-process (a model of the demo config with a DCP checkpoint written without a process group; no
`torchrun`) and copied into each case's directory. More cases belong in `JOB_CASES` at the end of the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml

from jobs import compress as compress_job
from jobs import evaluate as evaluate_job
from jobs import export as export_job
from jobs.config import ConfigError
from jobs.evaluate import EvaluationError
from jobs.export import BundleError, ExportError
from pipeline import ingest, synthetic
from pipeline.dataset import Dataset
from pipeline.errors import DatasetError
from pipeline.spec import SPEC_FILE
from sharding.plan import PLAN_FILE, PLAN_VERSION, DimensionPlan, FeaturePlan, PlanError
from tests.helpers import REPO, write_tiny

# The typed errors a library call may raise for bad input; anything else is a bug and fails the case.
TYPED_ERRORS = (DatasetError, PlanError, BundleError, ExportError, EvaluationError, ConfigError)  # jobs.compress's too
# The wordings of a fix used across the project.
FIX = re.compile(
    r"Fix: |Possible solutions: |Re-export|re-export|[Ee]xport (it|the plan) again|Point at|point at|Restore it"
)
TRACEBACK = "Traceback (most recent call last)"
SMALL_FILE = 1 << 20  # files up to this size are hashed in the snapshot
CPU2 = REPO / "jobs/configs/topology/cpu2.yaml"


@dataclass(frozen=True)
class Case:
    """One malformed input and what the user must see.

    Args:
        id: the case's name (the pytest id, and its line in docs/bad-inputs.md).
        make: builds the bad input under the given directory and returns what `run` needs.
        run: runs the command on what `make` returned: a `main([...])` (its exit code or `SystemExit`, stderr
            captured) or a library call that raises one of `TYPED_ERRORS`.
        expect: substrings of the message: the file/column/key at fault, what was expected, the fix.
        changes: paths (relative to the case's directory, glob patterns) the command may change.
    """

    id: str
    make: Callable[[Path], Any]
    run: Callable[[Any], Any]
    expect: tuple[str, ...]
    changes: tuple[str, ...] = ()


# ---- snapshots and running ---------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under `root`: its kind, size and modification time, the SHA-256 of small files, a link's target."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mtime_ns)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size <= SMALL_FILE else None
                out[rel] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


def _outside(changes: tuple[str, ...], rel: str) -> bool:
    return not any(Path(rel).match(g) or rel.startswith(g.rstrip("*")) for g in changes if g)


def cli(main: Callable[[list[str]], Any], *args: str | Path) -> Any:
    """Run a command line in-process; returns its exit code (`SystemExit`'s, or what `main` returns)."""
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


# ---- small inputs ------------------------------------------------------------------------------------------------


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


ML_LATEST = "userId,movieId,rating,timestamp\n1,10,4.0,964982703\n2,20,3.5,964982224\n3,30,5.0,964983815\n"
CRITEO_ROW = "\t".join(["1", *["3"] * 13, *["68fd1e64"] * 26])
AVAZU_HEADER = ",".join(ingest.AVAZU_COLUMNS)
AVAZU_ROW = "1000009418151094273,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79"  # noqa: E501


def _ml_latest(tmp: Path, text: str = ML_LATEST) -> dict[str, Path]:
    return {"src": _write(tmp / "src" / "ratings.csv", text).parent, "out": tmp / "out"}


def _edit_line(text: str, line: int, old: str, new: str) -> str:
    """`text` with `old` replaced by `new` on its 1-based `line`."""
    lines = text.splitlines()
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    return "\n".join(lines) + "\n"


def _ingest(fmt: str, *extra: str) -> Callable[[dict[str, Path]], Any]:
    return lambda p: cli(ingest.main, "--format", fmt, "--src", p["src"], "--out", p["out"], *extra)


def _fake_run(directory: Path) -> Path:
    """A directory that looks like a training run (config.yaml, checkpoints/, metrics.jsonl)."""
    _write(directory / "config.yaml", "train:\n  name: r\n")
    _write(directory / "metrics.jsonl", '{"day": "2024-03-01"}\n')
    (directory / "checkpoints" / "day-0001").mkdir(parents=True)
    return directory


def _dataset(tmp: Path, rows_per_day: tuple[int, ...] = (101, 77, 50)) -> Path:
    return write_tiny(tmp / "data", rows_per_day)


def _part(ds: Path, day: str) -> Path:
    return ds / f"day={day}" / "part-00000.parquet"


def _rewrite(part: Path, change: Callable[[pl.DataFrame], pl.DataFrame]) -> None:
    change(pl.read_parquet(part)).write_parquet(part)


def _dataset_with(change: Callable[[Path], object]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        ds = _dataset(tmp)
        change(ds)
        return ds

    return make


def _corrupt_pages(part: Path) -> None:
    """Flip every byte between the magic number and the footer: the footer still reads, the data pages do not."""
    data = part.read_bytes()
    footer = struct.unpack("<I", data[-8:-4])[0]
    end = len(data) - 8 - footer
    part.write_bytes(data[:4] + bytes(b ^ 0x5A for b in data[4:end]) + data[end:])


def _open_and_check(ds: Path) -> None:
    """What the training job does before its first day: open the dataset, then check every file's values."""
    Dataset(ds).check_values()


def _plan(tmp: Path) -> Path:
    """A saved plan with a field-level feature and a row-level one (so it has a row file)."""
    features = (
        FeaturePlan("user", 10, 6, dim=6),
        FeaturePlan("item", 6, 8, row_dims=np.array([3, 8, 3, 5, 8, 3]), raw_ids=np.array([-1, 10, 20, 30, 40, 50])),
    )
    return DimensionPlan(features).save(tmp / "plan")


def _plan_with(change: Callable[[Path], object]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        d = _plan(tmp)
        change(d)
        return d

    return make


def _edit_plan_json(d: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    body = json.loads((d / PLAN_FILE).read_text())
    edit(body)
    (d / PLAN_FILE).write_text(json.dumps(body))


# ---- a tiny trained run and its bundle, built once -----------------------------------------------------------------


@dataclass(frozen=True)
class Artifacts:
    data: Path
    run: Path
    bundle: Path


_ROOT: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _artifacts_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    _ROOT["root"] = tmp_path_factory.mktemp("artifacts")


@cache
def _artifacts() -> Artifacts:
    """Data, a run of the demo config trained for no steps (a real DCP checkpoint), and its bundle for 2 CPUs."""
    from jobs.config import load_config
    from jobs.train import build_recommender, table_capacities
    from pipeline.vocab import VocabularySet
    from sharding.checkpoint import save_checkpoint
    from sharding.plan import uniform_plan

    root = _ROOT["root"]
    data = write_tiny(root / "data")
    ds = Dataset(data)
    run = root / "runs" / "r"
    overrides = [f"data.path={data}", "data.batch_size=100", "sharding.planner_batch_size=100"]
    cfg = load_config(REPO / "jobs/configs/demo.yaml", [*overrides, f"train.out_dir={run.parent}", "train.name=r"])
    plan = uniform_plan(ds.spec.feature_names, table_capacities(ds, None), 8)
    model = build_recommender(cfg, ds.spec, plan, "cpu")
    vocab = VocabularySet(ds.spec.feature_names)
    first = ds.read_day(ds.days[0])
    for f in ds.spec.sparse:
        col = first.get_column(f.column)
        vocab[f.name].update((col.explode() if f.multi_hot else col).drop_nulls().to_numpy())

    def extra(tmp: Path) -> None:
        plan.save(tmp / "plan")
        vocab.save(tmp / "vocab")
        progress = {"position": [0, 0, 1], "days": [{"day": ds.days[0].name}], "epochs": []}
        (tmp / "progress.json").write_text(json.dumps(progress))

    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    save_checkpoint(run / "checkpoints" / "day-0001", {"model": model.state_dict()}, extra)
    (run / "metrics.jsonl").write_text(json.dumps({"day": ds.days[0].name}) + "\n")
    bundle = export_job.export(run, CPU2, root / "bundle")
    return Artifacts(data, run, bundle)


def _copy_run(tmp: Path) -> Artifacts:
    """The shared run, its data and its bundle copied under `tmp`; the copy's config points at the copied data."""
    a = _artifacts()
    data = Path(shutil.copytree(a.data, tmp / "data"))
    run = Path(shutil.copytree(a.run, tmp / "runs" / "r"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["path"] = str(data)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return Artifacts(data, run, Path(shutil.copytree(a.bundle, tmp / "bundle")))


def _bundle_with(change: Callable[[Path], object]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        bundle = Path(shutil.copytree(_artifacts().bundle, tmp / "bundle"))
        change(bundle)
        return bundle

    return make


def _export(out: Callable[[Artifacts], Path], *extra: str) -> Callable[[Artifacts], Any]:
    return lambda a: cli(export_job.main, "--run", a.run, "--topology", CPU2, "--out", out(a), *extra)


def _evaluate(*args: Callable[[Artifacts], str | Path]) -> Callable[[Artifacts], Any]:
    return lambda a: cli(evaluate_job.main, *(f(a) for f in args))


def _const(value: str) -> Callable[[Artifacts], str]:
    return lambda _a: value


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ---- the cases ---------------------------------------------------------------------------------------------------

INGEST_CASES = [
    Case(
        "ingest-missing-file",
        lambda t: {"src": t / "nope" / "ratings.csv", "out": t / "out"},
        _ingest("ml-latest"),
        ("nope/ratings.csv", "no such file; expected MovieLens ratings.csv", "Fix: point --src at"),
    ),
    Case(
        "ingest-missing-column",
        lambda t: _ml_latest(t, ML_LATEST.replace(",timestamp", ",time")),
        _ingest("ml-latest"),
        ("ratings.csv, line 1, column 'timestamp'", "the header has no column 'timestamp'", "Fix: add the column"),
    ),
    Case(
        "ingest-wrong-type",
        lambda t: _ml_latest(t, _edit_line(ML_LATEST, 3, "2,", "two,")),
        _ingest("ml-latest"),
        ("ratings.csv, line 3, column 'user'", "'two' is not a decimal integer", "Fix: write the ids as"),
    ),
    Case(
        "ingest-nan-label",
        lambda t: _ml_latest(t, _edit_line(ML_LATEST, 4, "5.0", "nan")),
        _ingest("ml-latest"),
        ("ratings.csv, line 4, column 'rating'", "'nan' is not finite", "Fix: repair the value"),
    ),
    Case(
        "ingest-negative-id",
        lambda t: _ml_latest(t, _edit_line(ML_LATEST, 2, "1,10", "1,-10")),
        _ingest("ml-latest"),
        ("line 2, column 'item'", "the id -10 is negative; ids must be >= 0", "Fix: "),
    ),
    Case(
        "ingest-empty-file",
        lambda t: _ml_latest(t, ""),
        _ingest("ml-latest"),
        ("ratings.csv", "is empty", "Fix: expected MovieLens ratings.csv"),
    ),
    Case(
        "ingest-not-utf8",
        lambda t: {"src": _write(t / "src" / "ratings.csv", ML_LATEST.encode() + b"4,40,\xff\n"), "out": t / "out"},
        _ingest("ml-latest"),
        ("ratings.csv, line 5", "is not valid utf-8 text", "Fix: re-save it as UTF-8"),
    ),
    Case(
        "ingest-option-of-another-format",
        lambda t: _ml_latest(t),
        _ingest("ml-latest", "--days", "3"),
        ("option(s) --days do not apply to format ml-latest", "Fix: drop them; ml-latest takes"),
    ),
    Case(
        "ingest-criteo-malformed-line",
        lambda t: {"src": _write(t / "c.tsv", f"{CRITEO_ROW}\n{CRITEO_ROW}\t7\n"), "out": t / "out"},
        _ingest("criteo"),
        ("c.tsv, line 2", "has 41 fields separated by '\\t', expected 40", "Fix: repair or remove that line"),
    ),
    Case(
        "ingest-criteo-overflowing-id",
        lambda t: {"src": _write(t / "c.tsv", CRITEO_ROW.replace("68fd1e64", "f" * 17, 1) + "\n"), "out": t / "out"},
        _ingest("criteo", "--id-mode", "parse"),
        ("c.tsv, line 1, column 'C1'", "does not fit in int64", "Fix: use --id-mode hash"),
    ),
    Case(
        "ingest-criteo-non-binary-label",
        lambda t: {"src": _write(t / "c.tsv", "2" + CRITEO_ROW[1:] + "\n"), "out": t / "out"},
        _ingest("criteo"),
        ("c.tsv, line 1, column 'label'", "the click label is '2.0', expected 0 or 1", "Fix: "),
    ),
    Case(
        "ingest-avazu-bad-hour",
        lambda t: {
            "src": _write(t / "a.csv", f"{AVAZU_HEADER}\n{AVAZU_ROW.replace(',14102100,', ',141021,')}\n"),
            "out": t / "out",
        },
        _ingest("avazu"),
        ("a.csv, line 2, column 'hour'", "hour '141021' is not YYMMDDHH", "Fix: repair or remove that line"),
    ),
    Case(
        "ingest-avazu-negative-id",
        lambda t: {"src": _write(t / "a.csv", f"{AVAZU_HEADER}\n{AVAZU_ROW}\n"), "out": t / "out"},
        _ingest("avazu", "--id-mode", "parse"),
        ("a.csv, line 2, column 'C20'", "the id -1 is negative", "Fix: use --id-mode hash"),
    ),
    Case(
        "ingest-lightgcn-bad-token",
        lambda t: {
            "src": _write(t / "lg" / "train.txt", "0 1 2\n1 2 x3\n").parent,
            "out": t / "out",
            "test": _write(t / "lg" / "test.txt", "0 3\n"),
        },
        _ingest("lightgcn"),
        ("train.txt, line 2, column 'item'", "'x3' is not a decimal integer", "Fix: "),
    ),
    Case(
        "ingest-ml-1m-missing-side-file",
        lambda t: {"src": _write(t / "ml" / "ratings.dat", "1::1::5::978300760\n").parent, "out": t / "out"},
        _ingest("ml-1m"),
        ("ml/users.dat", "no such file; expected ML-1M users.dat", "Fix: point --src at"),
    ),
    Case(
        "ingest-out-is-src",
        lambda t: {**_ml_latest(t), "out": t / "src"},
        lambda p: cli(ingest.main, "--format", "ml-latest", "--src", p["src"], "--out", p["src"], "--overwrite"),
        ("src: is --src", "itself; writing the dataset here would replace that input", "Fix: choose an --out outside"),
    ),
    Case(
        "ingest-out-contains-src",
        lambda t: {"src": _write(t / "raw" / "ml" / "ratings.csv", ML_LATEST).parent, "out": t / "raw"},
        _ingest("ml-latest", "--overwrite"),
        ("raw: contains --src", "replacing it with the dataset would delete that input", "Fix: choose an --out"),
    ),
    Case(
        "ingest-out-inside-src",
        lambda t: {**_ml_latest(t), "out": t / "src" / "dataset"},
        _ingest("ml-latest"),
        ("src/dataset: lies inside --src", "the dataset would be written into that input", "Fix: choose an --out"),
    ),
    Case(
        "ingest-out-link-to-src",
        lambda t: {**_ml_latest(t), "out": _link(t / "link", t / "src")},
        _ingest("ml-latest", "--overwrite"),
        ("link: is --src", "itself", "Fix: choose an --out outside --src"),
    ),
    Case(
        "ingest-out-onto-run",
        lambda t: {**_ml_latest(t), "out": _fake_run(t / "runs" / "demo")},
        _ingest("ml-latest", "--overwrite"),
        ("runs/demo: exists and is not a dataset directory: it holds a training run", "Fix: choose another --out"),
    ),
    Case(
        "ingest-out-onto-other-files",
        lambda t: {**_ml_latest(t), "out": _write(t / "home" / "notes.txt", "mine").parent},
        _ingest("ml-latest", "--overwrite"),
        (
            "home: exists and is not a dataset directory",
            "a dataset directory holds dataset.yaml and only",
            "notes.txt",
            "Fix: ",
        ),
    ),
    Case(
        "ingest-out-exists",
        lambda t: {**_ml_latest(t), "out": write_tiny(t / "out")},
        _ingest("ml-latest"),
        ("out: already exists (an earlier dataset)", "Fix: choose another --out or pass --overwrite"),
    ),
    Case(
        "synthetic-out-onto-other-files",
        lambda t: _write(t / "work" / "train.py", "print('mine')\n").parent,
        lambda out: cli(synthetic.main, "--out", out, "--overwrite", "--days", "1", "--rows-per-day", "10"),
        ("work: exists and is not a dataset directory", "train.py", "Fix: choose another --out"),
    ),
]


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target, target_is_directory=True)
    return link


DATASET_CASES = [
    Case(
        "dataset-missing-spec",
        _dataset_with(lambda ds: (ds / SPEC_FILE).unlink()),
        Dataset,
        ("data/dataset.yaml", "no dataset spec here", "Fix: ingest the data with `python -m pipeline.ingest`"),
    ),
    Case(
        "dataset-bad-yaml",
        _dataset_with(lambda ds: (ds / SPEC_FILE).write_text("name: [tiny\n")),
        Dataset,
        ("data/dataset.yaml", "is not valid YAML", "Fix: fix the YAML syntax"),
    ),
    Case(
        "dataset-unknown-key",
        _dataset_with(lambda ds: (ds / SPEC_FILE).write_text((ds / SPEC_FILE).read_text() + "lable: y\n")),
        Dataset,
        ("dataset.yaml", "unknown keys ['lable']", "Fix: use only"),
    ),
    Case(
        "dataset-unknown-role-column",
        _dataset_with(lambda ds: (ds / SPEC_FILE).write_text((ds / SPEC_FILE).read_text().replace("- x1", "- price"))),
        Dataset,
        ("part-00000.parquet, column 'price'", "the spec names column 'price' but the file has no such column", "Fix:"),
    ),
    Case(
        "dataset-misnamed-day",
        _dataset_with(lambda ds: (ds / "day=2024-03-02").rename(ds / "day=2024-13-02")),
        Dataset,
        ("day=2024-13-02", "day directory '2024-13-02' is not a date", "Fix: rename it to day=YYYY-MM-DD"),
    ),
    Case(
        "dataset-day-not-iso",
        _dataset_with(lambda ds: (ds / "day=2024-03-02").rename(ds / "day=20240302")),
        Dataset,
        ("day=20240302", "is not written as YYYY-MM-DD", "Fix: rename it to 2024-03-02"),
    ),
    Case(
        "dataset-empty-day",
        _dataset_with(lambda ds: _rewrite(_part(ds, "2024-03-03"), lambda df: df.head(0))),
        Dataset,
        ("day=2024-03-03", "is an empty day (no Parquet rows)", "Fix: remove the empty partition"),
    ),
    Case(
        "dataset-no-days",
        lambda t: _write(t / "data" / SPEC_FILE, (_dataset(t / "x") / SPEC_FILE).read_text()).parent,
        Dataset,
        ("data: holds no day partitions", "Fix: ingest or generate the data first"),
    ),
    Case(
        "dataset-stray-file",
        _dataset_with(lambda ds: _write(ds / "README.txt", "notes")),
        Dataset,
        ("README.txt", "is not a 'day=YYYY-MM-DD' partition", "Fix: remove it from the dataset directory"),
    ),
    Case(
        "dataset-stray-file-in-day",
        _dataset_with(lambda ds: _write(ds / "day=2024-03-02" / "part-00000.csv", "a,b\n")),
        Dataset,
        ("day=2024-03-02/part-00000.csv", "is not a Parquet file; a day partition holds only", "Fix: move it out"),
    ),
    Case(
        "dataset-truncated-parquet",
        _dataset_with(lambda ds: _truncate(_part(ds, "2024-03-02"))),
        Dataset,
        ("day=2024-03-02/part-00000.parquet", "cannot be read as Parquet", "Fix: restore the file"),
    ),
    Case(
        "dataset-garbage-parquet",
        _dataset_with(lambda ds: _part(ds, "2024-03-03").write_bytes(b"this is not parquet\n" * 20)),
        Dataset,
        ("day=2024-03-03/part-00000.parquet", "cannot be read as Parquet", "re-run `python -m pipeline.ingest`"),
    ),
    Case(
        "dataset-damaged-data-pages",
        _dataset_with(lambda ds: _corrupt_pages(_part(ds, "2024-03-02"))),
        _open_and_check,
        ("day=2024-03-02/part-00000.parquet", "cannot be read as Parquet", "Fix: restore the file"),
    ),
    Case(
        "dataset-wrong-type",
        _dataset_with(
            lambda ds: _rewrite(_part(ds, "2024-03-02"), lambda df: df.with_columns(pl.col("user").cast(str)))
        ),
        Dataset,
        ("day=2024-03-02/part-00000.parquet, column 'user'", "has type String, expected int64 ids", "Fix: cast"),
    ),
    Case(
        "dataset-types-differ-between-days",
        _dataset_with(
            lambda ds: _rewrite(_part(ds, "2024-03-03"), lambda df: df.with_columns(pl.col("label").cast(pl.Float64)))
        ),
        Dataset,
        ("day=2024-03-03/part-00000.parquet, column 'label'", "has type Float64, but", "must have the same", "Fix:"),
    ),
    Case(
        "dataset-nan-label-last-day",
        _dataset_with(
            lambda ds: _rewrite(
                _part(ds, "2024-03-03"),
                lambda df: df.with_columns(
                    pl.when(pl.int_range(pl.len()) == 17).then(float("nan")).otherwise(pl.col("label")).alias("label")
                ),
            )
        ),
        _open_and_check,
        ("day=2024-03-03/part-00000.parquet, column 'label'", "label is nan in row 17", "must be finite", "Fix:"),
    ),
    Case(
        "dataset-non-binary-label",
        _dataset_with(
            lambda ds: _rewrite(_part(ds, "2024-03-01"), lambda df: df.with_columns(label=pl.lit(2.0, pl.Float32)))
        ),
        _open_and_check,
        ("day=2024-03-01/part-00000.parquet, column 'label'", "expected 0 or 1 for task binary", "Fix: binarise"),
    ),
    Case(
        "dataset-negative-id",
        _dataset_with(
            lambda ds: _rewrite(_part(ds, "2024-03-02"), lambda df: df.with_columns(pl.col("user").neg().alias("user")))
        ),
        _open_and_check,
        ("day=2024-03-02/part-00000.parquet, column 'user'", "has negative id", "ids must be >= 0", "Fix: map raw"),
    ),
    Case(
        "dataset-missing-multi-hot-id",
        _dataset_with(
            lambda ds: _rewrite(
                _part(ds, "2024-03-02"),
                lambda df: df.with_columns(
                    pl.when(pl.int_range(pl.len()) == 5).then(None).otherwise(pl.col("tags")).alias("tags")
                ),
            )
        ),
        _open_and_check,
        ("day=2024-03-02/part-00000.parquet, column 'tags'", "id is missing in row 5", "Fix: fill missing ids"),
    ),
    Case(
        "dataset-infinite-dense",
        _dataset_with(
            lambda ds: _rewrite(
                _part(ds, "2024-03-01"), lambda df: df.with_columns(x1=pl.lit(float("inf"), pl.Float32))
            )
        ),
        _open_and_check,
        ("day=2024-03-01/part-00000.parquet, column 'x1'", "non-finite dense value inf in row 0", "Fix: impute"),
    ),
]

PLAN_CASES = [
    Case(
        "plan-missing",
        lambda t: t / "nowhere",
        DimensionPlan.load,
        ("nowhere/plan.json", "no plan here", "Point at a directory written by DimensionPlan.save"),
    ),
    Case(
        "plan-tampered",
        _plan_with(lambda d: _edit_plan_json(d, lambda b: b["features"][0].update(dim=4))),
        DimensionPlan.load,
        ("plan/plan.json", "checksum mismatch: the plan was edited or damaged after it was saved", "Export it again"),
    ),
    Case(
        "plan-truncated",
        _plan_with(lambda d: (d / PLAN_FILE).write_text((d / PLAN_FILE).read_text()[:-40])),
        DimensionPlan.load,
        ("plan/plan.json", "not valid JSON", "export the plan again"),
    ),
    Case(
        "plan-wrong-version",
        _plan_with(lambda d: _edit_plan_json(d, lambda b: b.update(version=PLAN_VERSION + 1))),
        DimensionPlan.load,
        ("plan.json", f"plan version {PLAN_VERSION + 1} is not supported", "reads version", "Export the plan again"),
    ),
    Case(
        "plan-wrong-format",
        _plan_with(lambda d: _edit_plan_json(d, lambda b: b.update(format="other"))),
        DimensionPlan.load,
        ("plan.json", "format is 'other', expected 'dimsearch-plan'", "Point at a plan"),
    ),
    Case(
        "plan-missing-row-file",
        _plan_with(lambda d: (d / "rows" / "item.parquet").unlink()),
        DimensionPlan.load,
        ("plan/rows/item.parquet", "row file listed in the plan is missing", "Restore it, or export the plan again"),
    ),
    Case(
        "plan-row-file-edited",
        _plan_with(lambda d: _rewrite(d / "rows" / "item.parquet", lambda df: df.with_columns(dim=pl.lit(8)))),
        DimensionPlan.load,
        ("rows/item.parquet", "checksum mismatch: the row file was changed", "Restore it"),
    ),
]

BUNDLE_CASES = [
    Case(
        "bundle-tampered-file",
        _bundle_with(lambda b: (b / "config.yaml").write_text((b / "config.yaml").read_text() + "# edited\n")),
        lambda b: cli(export_job.main, "--verify", b),
        ("bundle/config.yaml", "checksum mismatch: the file was changed after export", "Re-export the bundle"),
    ),
    Case(
        "bundle-truncated-weights",
        _bundle_with(lambda b: _truncate(b / "weights" / "t_user.pt")),
        lambda b: cli(export_job.main, "--verify", b),
        ("bundle/weights/t_user.pt", "checksum mismatch", "Re-export the bundle or restore the file"),
    ),
    Case(
        "bundle-missing-file",
        _bundle_with(lambda b: (b / "dense.pt").unlink()),
        lambda b: cli(export_job.main, "--verify", b),
        ("bundle/dense.pt", "missing (listed in bundle.json)", "Re-export the bundle or restore the file"),
    ),
    Case(
        "bundle-missing-manifest",
        _bundle_with(lambda b: (b / export_job.MANIFEST).unlink()),
        lambda b: cli(export_job.main, "--verify", b),
        ("bundle/bundle.json", "no bundle manifest here", "Point at a directory written by `python -m jobs.export`"),
    ),
    Case(
        "bundle-truncated-manifest",
        _bundle_with(lambda b: _truncate(b / export_job.MANIFEST)),
        lambda b: cli(export_job.main, "--verify", b),
        ("bundle/bundle.json", "not valid JSON", "re-export the bundle"),
    ),
    Case(
        "export-out-is-run",
        _copy_run,
        _export(lambda a: a.run, "--overwrite"),
        ("runs/r: is --run", "itself; writing the bundle here would replace that input", "Fix: choose an --out"),
    ),
    Case(
        "export-out-inside-run",
        _copy_run,
        _export(lambda a: a.run / "export"),
        ("runs/r/export: lies inside --run", "the bundle would be written into that input", "Fix: choose an --out"),
    ),
    Case(
        "export-out-contains-run",
        _copy_run,
        _export(lambda a: a.run.parent, "--overwrite"),
        ("runs: contains --run", "would delete that input", "Fix: choose an --out outside --run"),
    ),
    Case(
        "export-out-is-the-data",
        _copy_run,
        _export(lambda a: a.data, "--overwrite"),
        ("data: is --run's data.path", "itself", "Fix: choose an --out outside"),
    ),
    Case(
        "export-out-onto-dataset",
        lambda t: {"a": _copy_run(t), "other": write_tiny(t / "other-data")},
        lambda p: _export(lambda _a: p["other"], "--overwrite")(p["a"]),
        ("other-data: exists and is not a bundle directory: it holds a dataset", "Fix: choose another --out"),
    ),
    Case(
        "export-out-onto-other-files",
        lambda t: {"a": _copy_run(t), "out": _write(t / "plans" / "notes.md", "mine").parent},
        lambda p: _export(lambda _a: p["out"], "--overwrite")(p["a"]),
        ("plans: exists and is not a bundle directory", "a bundle directory holds bundle.json and only", "notes.md"),
    ),
]

EVALUATE_CASES = [
    Case(
        "evaluate-out-is-run",
        _copy_run,
        _evaluate(_const("--run"), lambda a: a.run, _const("--out"), lambda a: a.run),
        ("runs/r: is --run", "itself; writing the report here would replace that input", "Fix: choose an --out"),
    ),
    Case(
        "evaluate-out-onto-another-run",
        lambda t: {"a": _copy_run(t), "other": _fake_run(t / "runs" / "other")},
        lambda p: cli(evaluate_job.main, "--run", p["a"].run, "--out", p["other"]),
        ("runs/other: exists and is not a report directory: it holds a training run", "Fix: choose another --out"),
    ),
    Case(
        "evaluate-out-inside-data",
        _copy_run,
        _evaluate(_const("--run"), lambda a: a.run, _const("--out"), lambda a: a.data / "report"),
        ("data/report: lies inside --run's data.path", "Fix: choose an --out outside --run's data.path"),
    ),
    Case(
        "evaluate-out-onto-bundle",
        _copy_run,
        _evaluate(_const("--run"), lambda a: a.run, _const("--out"), lambda a: a.bundle),
        ("bundle: exists and is not a report directory", "a report directory holds report.md and only", "Fix: "),
    ),
    Case(
        "evaluate-missing-run",
        lambda t: t,
        lambda t: cli(evaluate_job.main, "--run", t / "runs" / "nope", "--out", t / "report"),
        ("runs/nope: no such run directory", "Fix: pass a run directory written by jobs.train"),
    ),
    Case(
        "evaluate-run-without-checkpoint",
        lambda t: _write(t / "runs" / "r" / "config.yaml", "train:\n  name: r\n").parent,
        lambda run: cli(evaluate_job.main, "--run", run, "--out", run.parent / "report"),
        ("runs/r: the run has no complete checkpoint", "Fix: train with train.checkpoint=true"),
    ),
]


def _compress(
    *extra: str, out: Callable[[Artifacts], Path] = lambda a: a.run.parent / "c"
) -> Callable[[Artifacts], Any]:
    return lambda a: cli(compress_job.main, "--run", a.run, "--out", out(a), *extra)


COMPRESS_CASES = [
    Case(
        "compress-bad-budget",
        _copy_run,
        _compress("--budget", "a sixteenth", "--verify-days", "1"),
        ("--budget is 'a sixteenth'", "expected a number", "'1/16 of fixed-16 fp32'", "Fix: "),
    ),
    Case(
        "compress-verify-on-test",
        _copy_run,
        _compress("--budget", "1/4 of fixed-8", "--verify-split", "test"),
        ("--verify-split test: the test split is what the delivered plan is reported on", "Fix: --verify-split valid"),
    ),
    Case(
        "compress-budget-too-small",
        _copy_run,
        _compress("--budget", "10", "--verify-days", "1"),
        ("no candidate fits the budget of 10 serving bytes", "Fix: raise --budget"),
    ),
    Case(
        "compress-out-is-run",
        _copy_run,
        _compress("--budget", "1/4 of fixed-8", "--verify-days", "1", "--overwrite", out=lambda a: a.run),
        ("runs/r: is --run", "itself; writing the bundle here would replace that input", "Fix: choose an --out"),
    ),
]

CASES: list[Case] = [*INGEST_CASES, *DATASET_CASES, *PLAN_CASES, *BUNDLE_CASES, *EVALUATE_CASES, *COMPRESS_CASES]


# ---- the training job: configs, checkpoints, resumes ------------------------------------------------------------
# Cases of `jobs.train` (its config, checkpoint and resume inputs) go here, in the same form, single-process only
# (no torchrun launches): append to JOB_CASES, and add one line per case to docs/bad-inputs.md under "Training job".
def _launch(*job_args: str | Path) -> Any:
    from jobs import launch

    return cli(launch.main, "--standalone", "--nproc-per-node=2", "--", *job_args)


def _job(*extra: str | Callable[[Artifacts], str]) -> Callable[[Artifacts], Any]:
    """`python -m jobs.launch --standalone --nproc-per-node=2 -- ARGS` in-process, on the copied run's own config
    (so a resume is refused only for what `extra` changes): the launcher's checks run before any worker would."""

    def run(a: Artifacts) -> Any:
        args = [
            "--config", REPO / "jobs/configs/demo.yaml", f"data.path={a.data}", "data.batch_size=100",
            "sharding.planner_batch_size=100", f"train.out_dir={a.run.parent}", "train.name=r",
            *(e(a) if callable(e) else e for e in extra),
        ]  # fmt: skip
        return _launch(*args)

    return run


def _with_nan_label_last_day(tmp: Path) -> Artifacts:
    a = _copy_run(tmp)
    last = sorted(a.data.glob("day=*"))[-1] / "part-00000.parquet"
    df = pl.read_parquet(last)
    df = df.with_columns(
        pl.when(pl.int_range(pl.len()) == 3).then(float("nan")).otherwise(pl.col("label")).alias("label")
    )
    df.write_parquet(last)
    return a


def _locked(tmp: Path) -> Artifacts:
    from jobs.rundir import RunLock

    a = _copy_run(tmp)
    _LOCKS.append(RunLock(a.run).acquire())  # another job writing the run (released by the case's run)
    return a


_LOCKS: list[Any] = []


def _unlocking(run: Callable[[Artifacts], Any]) -> Callable[[Artifacts], Any]:
    def wrapped(a: Artifacts) -> Any:
        try:
            return run(a)
        finally:
            while _LOCKS:
                _LOCKS.pop().release()

    return wrapped


def _foreign_run_dir(tmp: Path) -> Artifacts:
    a = _copy_run(tmp)
    _write(a.run.parent / "notes" / "todo.txt", "mine\n")
    return a


def _plan_of_other_features(tmp: Path) -> Artifacts:
    a = _copy_run(tmp)
    DimensionPlan.field_level({"user": 8, "genre": 8}, {"user": 100, "genre": 20}).save(tmp / "other-plan")
    return a


def _without_user_and_item(tmp: Path) -> Artifacts:
    a = _copy_run(tmp)
    spec = yaml.safe_load((a.data / SPEC_FILE).read_text())
    spec.pop("user_field", None)
    spec.pop("item_field", None)
    (a.data / SPEC_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    return a


def _damaged_checkpoint(rel: str) -> Callable[[Path], Artifacts]:
    def make(tmp: Path) -> Artifacts:
        a = _copy_run(tmp)
        _truncate(a.run / "checkpoints" / "day-0001" / rel)
        return a

    return make


JOB_CASES: list[Case] = [
    Case(
        "export-run-vocab-truncated",
        _damaged_checkpoint("vocab/000.parquet"),
        _export(lambda a: a.run.parent.parent / "new-bundle"),
        ("no complete, intact checkpoint", "vocab/000.parquet", "the manifest says", "Fix: train with"),
    ),
    Case(
        "evaluate-run-progress-truncated",
        _damaged_checkpoint("progress.json"),
        _evaluate(_const("--run"), lambda a: a.run, _const("--out"), lambda a: a.run.parent.parent / "report"),
        ("no complete checkpoint", "Fix: "),
    ),
    Case(
        "job-config-missing-file",
        _copy_run,
        lambda a: _launch("--config", a.run / "nope.yaml"),
        ("nope.yaml does not exist", "Fix: pass an existing --config"),
    ),
    Case(
        "job-config-not-a-mapping",
        lambda t: {"a": _copy_run(t), "cfg": _write(t / "bad.yaml", "- data\n- model\n")},
        lambda p: _launch("--config", p["cfg"]),
        ("bad.yaml: expected a mapping of sections", "Fix: start from a shipped config"),
    ),
    Case(
        "job-config-unknown-key",
        _copy_run,
        _job("data.batch_sise=10"),
        ("unknown key 'data.batch_sise'", "valid keys", "Fix: correct these"),
    ),
    Case(
        "job-config-wrong-type",
        _copy_run,
        _job("train.seed=x", "search.budget=[1]"),
        ("'train.seed' is 'x' (str), expected <class 'int'>", "'search.budget' is [1]", "2 problem(s)"),
    ),
    Case("job-config-bad-value", _copy_run, _job("search.dim=0"), ("search.dim must be > 0, got 0", "Fix: correct")),
    Case(
        "job-config-unknown-method",
        _copy_run,
        _job("search.method=pep"),
        ("unknown search.method 'pep'; the registered methods are ['autodim', 'ciess', 'esapn'", "Fix: correct"),
    ),
    Case(
        "job-config-setting-of-another-method",
        _copy_run,
        _job("--replace", "search.method=scall", "search.budget=100000", "search.scall.arch_lr=0.1"),
        ("'search.scall.arch_lr' is a setting of method 'autodim', not of 'scall'", "search.autodim.arch_lr"),
    ),
    Case(
        "job-method-on-a-static-split",
        _copy_run,
        _job("--replace", "search.method=esapn", "data.protocol=random"),
        ("search.method=esapn is a streaming search: set data.protocol to prequential", "Fix: correct"),
    ),
    Case(
        "job-row-level-method-without-users-and-items",
        _without_user_and_item,
        _job("--replace", "search.method=scall", "search.budget=100000"),
        ("search.method=scall sizes user and item rows", "names no user_field or item_field", "Fix: set both"),
    ),
    Case(
        "job-config-not-an-override",
        _copy_run,
        _job("batch_size=10"),
        ("override 'batch_size=10' is not of the form section.key=value", "Fix: correct"),
    ),
    Case(
        "job-data-missing",
        _copy_run,
        _job(lambda a: f"data.path={a.data.parent / 'no-data'}"),
        ("no-data: no such dataset directory", "Fix: ingest or generate the data first"),
    ),
    Case(
        "job-data-nan-label-last-day",
        _with_nan_label_last_day,
        _job("--replace"),
        ("day=2024-03-03/part-00000.parquet", "column 'label'", "row 3", "Fix: "),
    ),
    Case(
        "job-run-exists",
        _copy_run,
        _job(),
        ("runs/r: the run 'r' already exists", "Fix: pass --resume (or train.resume=auto)", "--replace"),
    ),
    Case(
        "job-resume-config-differs",
        _copy_run,
        _job("--resume", "search.dim=8", "model.dense_lr=0.1"),
        (
            "config.yaml: resuming with a config that differs from the run's in 2 key(s)",
            "search.dim: 16 (run) -> 8 (now)",
            "model.dense_lr: 0.05 (run) -> 0.1 (now)",
            "Fix: resume with the run's own values",
        ),
    ),
    Case(
        "job-resume-auto-config-differs",
        _copy_run,
        _job("train.resume=auto", "search.method=uniform-budget", "search.budget=5000"),
        ("differs from the run's in 2 key(s)", "search.method: 'fixed' (run) -> 'uniform-budget' (now)", "Fix: "),
    ),
    Case(
        "job-resume-and-replace",
        _copy_run,
        _job("--resume", "--replace"),
        ("--resume and --replace contradict each other", "Fix: pass one of them"),
    ),
    Case(
        "job-resume-config-unreadable",
        lambda t: (a := _copy_run(t), _write(a.run / "config.yaml", "data: [unclosed\n"))[0],
        _job("--resume"),
        ("runs/r/config.yaml: unreadable", "Fix: restore it, or --replace the run"),
    ),
    Case(
        "job-run-locked",
        _locked,
        _unlocking(_job("--resume")),
        ("runs/r: another job (pid", "is writing this run", "Fix: wait for it to finish"),
        changes=(".r.lock",),
    ),
    Case(
        "job-run-dir-holds-other-files",
        _foreign_run_dir,
        _job("train.name=notes"),
        ("runs/notes: exists and holds files that are not a training run's (['todo.txt'])", "Fix: choose another"),
    ),
    Case(
        "job-run-dir-is-the-data",
        _copy_run,
        _job(lambda a: f"train.out_dir={a.data.parent}", "train.name=data"),
        ("the run directory is the dataset data.path=", "Fix: choose a train.out_dir / train.name outside"),
    ),
    Case(
        "job-run-dir-inside-the-data",
        _copy_run,
        _job(lambda a: f"train.out_dir={a.data}", "train.name=run"),
        ("the run directory lies inside the dataset", "Fix: choose a train.out_dir"),
    ),
    Case(
        "job-plan-of-other-features",
        _plan_of_other_features,
        _job("--replace", lambda a: f"search.plan={a.run.parent.parent / 'other-plan'}"),
        ("other-plan: the plan's features do not match the dataset's", "search again"),
    ),
    Case(
        "job-budget-too-small",
        _copy_run,
        _job("--replace", "sharding.budget_bytes=4096"),
        ("do not fit the budget of 4,096 bytes over 2 ranks", "Possible solutions: raise sharding.budget_bytes"),
    ),
    Case(
        "job-serving-dtype-unknown",
        _copy_run,
        _job("search.dtype=int3"),
        ("search.dtype is 'int3', expected one of ['fp32', 'fp16', 'int8', 'int4', 'int2']", "Fix: correct"),
    ),
    Case(
        "job-joint-budget-impossible",
        _copy_run,
        _job("--replace", "search.method=joint", "search.joint.budget_fraction=0.05"),
        (
            "search.joint: no plan fits a budget of",
            "rows are padded to 16 bytes",
            "Possible solutions: raise the budget",
        ),
    ),
    Case(
        "job-plan-missing",
        _copy_run,
        _job("--replace", lambda a: f"search.plan={a.run.parent / 'no-plan'}"),
        ("no-plan/plan.json: no plan here", "Point at a directory written by DimensionPlan.save"),
    ),
]

ALL_CASES = [*CASES, *JOB_CASES]


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in ALL_CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


def test_catalogue_is_documented() -> None:
    doc = (REPO / "docs" / "bad-inputs.md").read_text()
    missing = [c.id for c in ALL_CASES if f"`{c.id}`" not in doc]
    assert not missing, f"docs/bad-inputs.md lacks a line for {missing}"


@pytest.fixture(autouse=True)
def _keep_logging() -> Any:
    """The commands' `setup_logging` points the root logger at this test's captured stderr; put it back after, so
    that later tests do not log into a closed stream."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_bad_input(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a default output (e.g. reports/<run>) would land here, and be seen
    made = case.make(tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    message = ""
    try:
        code = case.run(made)
    except TYPED_ERRORS as e:
        code, message = "raised", str(e)
    out = capsys.readouterr()
    text = message or out.err
    assert code not in (0, None), f"the bad input was accepted (exit {code}); stdout: {out.out[-2000:]}"
    assert TRACEBACK not in out.err + out.out + message, out.err[-3000:]
    if not message:
        assert text.startswith("error: ") or "\nerror: " in text, text[-2000:]
    for part in case.expect:
        assert part in text, f"{part!r} not in the message:\n{text[-2000:]}"
    assert FIX.search(text), f"no fix in the message:\n{text[-2000:]}"
    after = snapshot(tmp_path)
    changed = sorted(
        rel for rel in set(before) | set(after) if before.get(rel) != after.get(rel) and _outside(case.changes, rel)
    )
    assert not changed, f"the refused command changed {changed}"
