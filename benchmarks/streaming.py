"""Row-level sizing on a day-partitioned stream, prequential, through the real job (2 ranks under torchrun).

Run (figures go to BENCHMARKS.md)::

    python -m benchmarks.streaming

Streams: MovieLens latest-small (`../shared/datasets/ml-latest-small`, label rating ≥ 4, MF), re-cut into
`SEGMENTS` segments of equal row counts in time order (each written as one day; the raw stream has a day per
calendar date, thousands of them), and the built-in synthetic stream (DeepFM, 4 days with new ids every day).
Methods at the same budget (FIXED-16's parameters): FIXED-16 (every row 16 dims); SCALL (each day, every user and
item row sized in multiples of 4 up to d_max by that day's frequency rank with SCALL's budget-guaranteed sampler,
`search.method=scall` with the fixed action (0.5, 0.1, 0.1) of `streaming.yaml`); ESAPN (`search.method=esapn`:
every row starts at 4 and, each day it is seen, keeps or doubles its size by its policy, rewarded by its loss drop
the next day; rows stop growing once the budget is spent); MD (`search.method=md`: mixed-dimension embeddings, block
dims by a power law of popularity with learned projections, within the budget); SCALL-learned (the same, with the
SAC policy learned in the job: each day it takes `search.scall.env_steps` steps on the day's last
`search.scall.env_batches` batches, held out from training); CIESS (`search.method=ciess` on the stream: each day
`search.ciess.day_iterations` TD3 iterations scored on the day's held-out batches, then the best plan so far, exactly
the budget). The methods that hold batches out train on fewer rows: the table says how many.
d_max is 64 on ml-latest and 32 on the synthetic stream, whose other fields stay at 16.

Per day: the prequential AUC (evaluated before training on the day), embedding parameters (logical and as
stored), whether the budget held, and the lookups of ids unseen before the day (served by each feature's
fallback row, whose size SCALL also assigns). The last line is `RESULT streaming: key=value ...`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from jobs.train import table_capacities
from pipeline.dataset import Dataset, write_dataset
from pipeline.ingest import read
from pipeline.synthetic import SyntheticConfig, write_synthetic

REPO = Path(__file__).resolve().parents[1]
SEGMENTS = 8


def datasets_root() -> Path:
    return Path(os.environ.get("DIMSEARCH_DATASETS", REPO.parent / "shared" / "datasets"))


def segmented_ml_latest(out: Path) -> Path:
    """ml-latest-small in SEGMENTS equal-count time segments, each one day (2000-01-01, -02, ...)."""
    frame, spec = read("ml-latest", datasets_root() / "ml-latest-small")
    frame = frame.sort("ts" if "ts" in frame.columns else spec.timestamp or "day", maintain_order=True)
    segment = (np.arange(frame.height) * SEGMENTS // frame.height).astype(np.int64)
    days = [dt.date(2000, 1, 1) + dt.timedelta(days=int(s)) for s in segment]
    return write_dataset(frame.with_columns(pl.Series("day", days, dtype=pl.Date)), spec, out)


def unseen_lookups(data: Path, features: list[str]) -> list[int]:
    """Per day, the lookups of ids no earlier day had (what the fallback rows serve in the prequential eval)."""
    dataset = Dataset(data)
    seen = {f: np.empty(0, dtype=np.int64) for f in features}  # sorted distinct ids of the earlier days
    out = []
    for day in dataset.days:
        frame = dataset.scan([day]).collect()
        count = 0
        for f in features:
            ids = frame.get_column(dataset.spec.field(f).column).to_numpy()
            count += int((~np.isin(ids, seen[f], assume_unique=False)).sum())
            seen[f] = np.union1d(seen[f], ids)
        out.append(count)
    return out


def job_command(config: str, name: str, out: Path, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a 2-rank `jobs.train` run under torchrun (no checkpoints), in `out/name`."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "jobs.train",
        "--config", str(REPO / config), f"train.out_dir={out}", f"train.name={name}", "train.checkpoint=false",
        *overrides,
    ]  # fmt: skip
    return cmd, env


def run_job(config: str, name: str, out: Path, overrides: list[str]) -> tuple[list[dict[str, Any]], float]:
    cmd, env = job_command(config, name, out, overrides)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return records, time.perf_counter() - start


def bench_stream(
    label: str, data: Path, config: str, d_fixed: int, d_max: int, base: list[str], work: Path
) -> list[dict[str, Any]]:
    capacity = table_capacities(Dataset(data), None)
    budget = sum(capacity.values()) * d_fixed  # FIXED's logical parameters: the shared budget
    unseen = unseen_lookups(data, ["user", "item"])
    rows = []
    searched = [f"search.dim={d_max}", f"search.budget={budget}"]
    for method, overrides in (
        (f"FIXED-{d_fixed}", ["search.method=fixed", f"search.dim={d_fixed}", "search.budget="]),
        ("SCALL", ["search.method=scall", *searched]),
        ("SCALL-learned", ["search.method=scall", "search.scall.action=", *searched]),
        ("CIESS", ["search.method=ciess", *searched]),
        ("ESAPN", ["search.method=esapn", *searched]),
        ("MD", ["search.method=md", *searched]),
    ):
        records, seconds = run_job(config, f"{label}-{method}", work, [f"data.path={data}", *base, *overrides])
        for r, u in zip(records, unseen, strict=True):
            rows.append(
                {
                    "stream": label,
                    "method": method,
                    "day": r["day"],
                    "auc": r["eval"].get("auc", float("nan")),
                    "logical": r["embedding_logical_parameters"],
                    "stored": r["embedding_parameters"],
                    "trained": r["train_examples"],
                    "budget": budget,
                    "unseen": u,
                    "seconds": seconds,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__.split("\n")[0])
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp:
        work = Path(tmp)
        if (datasets_root() / "ml-latest-small").is_dir():
            data = segmented_ml_latest(work / "ml-latest")
            rows += bench_stream("ml-latest", data, "jobs/configs/streaming.yaml", 16, 64, [], work)
        else:
            print(f"skip ml-latest: {datasets_root() / 'ml-latest-small'} not found")
        synthetic = write_synthetic(
            SyntheticConfig(days=4, rows_per_day=50_000, users=5_000, items=3_000), work / "synthetic"
        )
        # DeepFM projects every field to its FM width, so user/item rows of up to 32 dims sit beside 16-dim fields.
        base = ["model.name=deepfm", "model.options={embedding_dim: 16}", "search.other_dim=16"]
        base += ["data.batch_size=1000", "sharding.planner_batch_size=1000"]
        rows += bench_stream("synthetic", synthetic, "jobs/configs/streaming.yaml", 16, 32, base, work)
    header = f"{'stream':<10}{'method':<14}{'day':<12}{'AUC':>8}{'logical':>11}{'stored':>11}{'budget':>11}"
    print(header + f"{'unseen':>8}{'trained':>9}")
    for r in rows:
        print(
            f"{r['stream']:<10}{r['method']:<14}{r['day']:<12}{r['auc']:>8.4f}{r['logical']:>11,}{r['stored']:>11,}"
            f"{r['budget']:>11,}{r['unseen']:>8,}{r['trained']:>9,}"
        )
    print(f"\n{'stream':<10}{'method':<14}{'mean AUC':>9}{'days over':>10}{'rows trained':>13}{'seconds':>9}")
    for stream in dict.fromkeys(r["stream"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["stream"] == stream):
            sel = [r for r in rows if r["stream"] == stream and r["method"] == method]
            print(
                f"{stream:<10}{method:<14}{np.nanmean([r['auc'] for r in sel]):>9.4f}"
                f"{sum(r['stored'] > r['budget'] for r in sel):>10}{sum(r['trained'] for r in sel):>13,}"
                f"{sel[0]['seconds']:>9.0f}"
            )
    parts = []
    for stream in dict.fromkeys(r["stream"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["stream"] == stream):
            sel = [r for r in rows if r["stream"] == stream and r["method"] == method]
            key = f"{stream}_{'fixed' if method.startswith('FIXED') else method.lower().replace('-', '_')}"
            parts.append(f"{key}_mean_auc={np.nanmean([r['auc'] for r in sel]):.4f}")
            if not method.startswith("FIXED"):
                parts.append(f"{key}_days_over_budget={sum(r['stored'] > r['budget'] for r in sel)}")
            parts.append(f"{key}_rows_trained={sum(r['trained'] for r in sel)}")
            if method.startswith("SCALL"):
                parts.append(f"{key}_exact_every_day={all(r['logical'] == r['budget'] for r in sel)}")
            if method == "ESAPN":
                parts.append(f"{key}_final_budget_share={sel[-1]['logical'] / sel[-1]['budget']:.3f}")
    print("RESULT streaming: " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
