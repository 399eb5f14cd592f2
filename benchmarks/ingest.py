"""Criteo ingest in bounded memory: a 2 GB Criteo-format TSV through `python -m pipeline.ingest`.

Run (figures go to BENCHMARKS.md)::

    python -m benchmarks.ingest              # a 0.25 GiB and a 2 GiB file (~3 min on 2 cores, 2.3 GiB of disk)
    python -m benchmarks.ingest --gib 0.5    # a smaller largest file

The files are Kaggle-Criteo-format lines (label, I1..I13, C1..C26, tab-separated, no header): integer dense
values and 8-hex-digit categoricals, about a fifth of the dense and a seventh of the categorical fields empty,
each categorical drawn (Zipf 1.1) from its own set of 10 to 1M distinct strings. They are written chunk by chunk
with polars, so generating them holds one chunk too.

Each file is ingested by the command line (`--days 4`, hashed ids) in its own process, whose peak RSS
(`ru_maxrss` of that child, from `os.wait4`) is the figure. The streamed ingest holds one chunk of text
(`pipeline.ingest.CHUNK_BYTES`) and its parsed rows at a time, so its peak must not grow with the file: the target
is a peak at the largest file within 1.5x of the smallest file's and at most 2 GiB. For scale, the smallest file is
also read whole (`pipeline.ingest.read_criteo`, which holds every row), in its own process.

The data is deleted afterwards. The last line is `RESULT ingest: key=value ...`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.ingest import CRITEO_COLUMNS, CRITEO_DENSE, CRITEO_SPARSE

REPO = Path(__file__).resolve().parents[1]
SMALL_GIB = 0.25
MAX_GROWTH = 1.5
MAX_PEAK_MIB = 2048
CHUNK_ROWS = 250_000
# Read whole in a child process, printing its peak RSS: the reference for what streaming saves.
_WHOLE_READ = (
    "import resource, sys; from pipeline.ingest import read_criteo; df, _ = read_criteo(sys.argv[1], days=4); "
    "print(df.height, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


def write_criteo_tsv(path: Path, gib: float, seed: int = 0) -> int:
    """Write Criteo-format lines to `path` until it holds about `gib` GiB; the number of lines."""
    rng = np.random.default_rng(seed)
    cardinality = np.round(np.logspace(1, 6, len(CRITEO_SPARSE))).astype(np.int64)
    pools = [
        pl.Series(np.char.mod("%08x", rng.integers(0, 2**32, c, dtype=np.uint64)).astype(str)) for c in cardinality
    ]
    target, rows = int(gib * 2**30), 0
    with path.open("wb") as f:
        while f.tell() < target:
            n = CHUNK_ROWS
            columns: dict[str, pl.Series] = {"label": pl.Series(rng.integers(0, 2, n))}
            for c in CRITEO_DENSE:
                values = rng.geometric(0.01, n) - 1
                columns[c] = pl.Series(values).set(pl.Series(rng.random(n) < 0.2), None)
            for c, pool in zip(CRITEO_SPARSE, pools, strict=True):
                index = np.minimum(rng.zipf(1.1, n) - 1, pool.len() - 1)
                columns[c] = pool.gather(index).set(pl.Series(rng.random(n) < 0.14), None)
            pl.DataFrame(columns).select(CRITEO_COLUMNS).write_csv(f, separator="\t", include_header=False)
            rows += n
    return rows


def _child_peak_mib(cmd: list[str], log: Path) -> tuple[float, float, str]:
    """Run `cmd` from the repository; its wall seconds, its own peak RSS in MiB (`os.wait4`) and its stdout."""
    start = time.perf_counter()
    with log.open("w+") as out, log.with_suffix(".err").open("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
        out.seek(0)
        return seconds, usage.ru_maxrss / 1024, out.read()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="the largest file's size in GiB")
    parser.add_argument("--work", type=Path, default=None, help="parent of the temporary directory")
    args = parser.parse_args(argv)
    if args.gib <= SMALL_GIB:
        parser.error(f"--gib {args.gib}: expected more than the small file's {SMALL_GIB} GiB")
    work = Path(tempfile.mkdtemp(prefix="dimsearch-ingest-", dir=args.work))  # all of it removed afterwards
    rows_out: list[tuple[str, int, float, float, float, float]] = []
    try:
        sizes = {"small": SMALL_GIB, "large": args.gib}
        files: dict[str, tuple[Path, int, float]] = {}
        for name, gib in sizes.items():
            start = time.perf_counter()
            path = work / f"criteo-{name}.tsv"
            rows = write_criteo_tsv(path, gib)
            files[name] = (path, rows, time.perf_counter() - start)
        path, rows, _ = files["small"]
        seconds, whole_peak, out = _child_peak_mib([sys.executable, "-c", _WHOLE_READ, str(path)], work / "whole.log")
        assert int(out.split()[0]) == rows, out
        rows_out.append(("read whole (read_criteo)", rows, path.stat().st_size, seconds, whole_peak, 0.0))
        for name in sizes:
            path, rows, gen_s = files[name]
            out_dir = work / f"out-{name}"
            cmd = [sys.executable, "-m", "pipeline.ingest", "--format", "criteo", "--src", str(path)]
            seconds, peak, out = _child_peak_mib([*cmd, "--out", str(out_dir), "--days", "4"], work / f"{name}.log")
            assert f"criteo: {rows:,} rows, 4 days" in out, out
            rows_out.append((f"streamed ingest ({name})", rows, path.stat().st_size, seconds, peak, gen_s))
            shutil.rmtree(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'what':<28}{'rows':>12}{'GiB':>7}{'s':>8}{'rows/s':>11}{'MB/s':>7}{'peak MiB':>10}{'gen s':>7}")
    for what, rows, size, seconds, peak, gen_s in rows_out:
        print(
            f"{what:<28}{rows:>12,}{size / 2**30:>7.2f}{seconds:>8.1f}{rows / seconds:>11,.0f}"
            f"{size / 1e6 / seconds:>7.0f}{peak:>10,.0f}{gen_s:>7.1f}"
        )
    whole, small, large = rows_out
    growth = large[4] / small[4]
    met = growth <= MAX_GROWTH and large[4] <= MAX_PEAK_MIB
    print(
        f"RESULT ingest: large_gib={large[2] / 2**30:.2f} large_rows={large[1]} large_rows_s={large[1] / large[3]:.0f} "
        f"small_peak_mib={small[4]:.0f} large_peak_mib={large[4]:.0f} whole_read_small_peak_mib={whole[4]:.0f} "
        f"peak_growth={growth:.2f} bounded_target={'met' if met else 'missed'}"
    )


if __name__ == "__main__":
    main()
