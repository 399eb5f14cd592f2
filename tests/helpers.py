"""Small datasets built in a test's tmp_path (no files from ../shared)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.dataset import write_dataset
from pipeline.spec import DatasetSpec, SparseField

SPEC = DatasetSpec(
    name="tiny",
    task="binary",
    label="label",
    sparse=(
        SparseField("rid", "rid"),
        SparseField("user", "user"),
        SparseField("item", "item"),
        SparseField("tags", "tags", multi_hot=True),
    ),
    dense=("x0", "x1"),
    timestamp="ts",
    user_field="user",
    item_field="item",
)


def tiny_frame(rows_per_day: tuple[int, ...] = (101, 77, 50), seed: int = 0) -> pl.DataFrame:
    """A frame with a unique row id `rid` (large, non-contiguous raw ids), users, items and multi-hot tags."""
    rng = np.random.default_rng(seed)
    n = sum(rows_per_day)
    days = np.repeat(np.arange(len(rows_per_day)), rows_per_day)
    lengths = rng.integers(0, 4, n)
    tag_values = rng.integers(0, 20, lengths.sum()) * 7 + 3
    tags = np.split(tag_values, np.cumsum(lengths)[:-1])
    start = dt.date(2024, 3, 1)
    return pl.DataFrame(
        {
            "label": rng.integers(0, 2, n).astype(np.float32),
            "rid": np.arange(n, dtype=np.int64) * 1_000_003 + 10**15,
            "user": rng.integers(0, 30, n) * 11,
            "item": rng.zipf(1.5, n) % 1000 + 5 * days,  # later days bring new items
            "tags": [t.tolist() for t in tags],
            "x0": rng.normal(size=n).astype(np.float32),
            "x1": rng.normal(size=n).astype(np.float32),
            "ts": (1_709_251_200 + days * 86400 + rng.integers(0, 86400, n)).astype(np.int64),
            "day": [start + dt.timedelta(days=int(d)) for d in days],
        },
        schema_overrides={"tags": pl.List(pl.Int64)},
    )


def write_tiny(out: Path, rows_per_day: tuple[int, ...] = (101, 77, 50), seed: int = 0) -> Path:
    return write_dataset(tiny_frame(rows_per_day, seed), SPEC, out)


REPO = Path(__file__).resolve().parents[1]


def tiny_job_args(data: Path, out: Path, name: str, *overrides: str) -> list[str]:
    """`jobs.train` arguments for a tiny run of the demo config on `data`: batches of 500, output in `out/name`."""
    return [
        "--config",
        str(REPO / "jobs/configs/demo.yaml"),
        f"data.path={data}",
        "data.batch_size=500",
        f"train.out_dir={out}",
        f"train.name={name}",
        "sharding.planner_batch_size=500",
        *overrides,
    ]


def launch_train_job(args: list[str], nproc: int = 2) -> subprocess.Popen[str]:
    """Start `torchrun --standalone --nproc_per_node=nproc -m jobs.train ARGS` on gloo (output captured)."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen(
        [*cmd, "-m", "jobs.train", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_train_job(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the training job to the end (see `launch_train_job`)."""
    proc = launch_train_job(args, nproc)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def launch_job(
    job_args: list[str], torchrun_args: list[str] | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start `python -m jobs.launch TORCHRUN_ARGS -- JOB_ARGS` (default: standalone, 2 ranks) on gloo, in its own
    process group (so a test can kill everything it started), output captured."""
    full_env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **(env or {})}
    cmd = [sys.executable, "-m", "jobs.launch", *(torchrun_args or ["--standalone", "--nproc-per-node=2"]), "--"]
    return subprocess.Popen(
        [*cmd, *job_args],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Wait for `proc`; past `timeout` kill its whole process group and fail."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{proc.args} ran past {timeout}s:\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def metrics_records(run: Path) -> list[dict[str, Any]]:
    """A job run's `metrics.jsonl`, one record per line."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
