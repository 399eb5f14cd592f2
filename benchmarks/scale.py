"""The job at scale: a Criteo-like stream with million-id fields through `jobs.train` on 2 ranks.

    python -m benchmarks.scale --rows 2000000            # CI-sized: 10 days x 200,000 rows
    python -m benchmarks.scale --rows 20000000 --days 10 # larger
    python -m benchmarks.scale --rows 100000000 --days 30 --keep   # the issue's full size (hours here)

It writes `pipeline.criteo_synthetic` (26 sparse fields up to `--max-cardinality` ids, Zipf 1.1, daily drift, 3
multi-hot fields, 13 dense fields, a planted signal; zstd, one chunk at a time) into a temporary directory, runs
the streaming job (`python -m jobs.launch`, 2 ranks, DLRM, every field at 16 dims, prequential) on it, and prints
per day: rows, rows/s (training, all ranks), peak RSS per rank and embedding bytes against the budget (FIXED never
reconfigures, so there are no reconfiguration seconds to show yet). The same config then runs on a 1M-row stream
(`--reference-rows`) for the speed ratio, and the final plan is sharded for 64 × 80 GB GPUs by TorchRec's planner
(`jobs/configs/topology/gpu64x80.yaml`, planned on `meta`), printed with its bytes per rank: the plan production
would run.
The data is deleted afterwards unless `--keep`.

Targets (issue "Industrial scale"): 0 days over budget; peak RSS per rank <= 8 GB; seconds per million rows of the
last third of the days within +-20% of the first third's (linear time); examples/s at scale >= 0.8 of the 1M-row
run's. Only FIXED runs here: the row-level searches size user and item rows, and this stream names none yet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def generate(out: Path, rows: int, days: int, max_cardinality: int) -> float:
    from pipeline.criteo_synthetic import CriteoSyntheticConfig, write_criteo_synthetic

    cfg = CriteoSyntheticConfig(
        days=days, rows_per_day=rows // days, chunk_rows=min(1_000_000, rows // days), max_cardinality=max_cardinality
    )
    start = time.perf_counter()
    write_criteo_synthetic(cfg, out)
    return time.perf_counter() - start


def run_job(data: Path, runs: Path, name: str, budget_bytes: int, batch: int) -> tuple[list[dict[str, Any]], float]:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "jobs.launch", "--standalone", "--nproc-per-node=2", "--",
        "--config", str(REPO / "jobs/configs/demo.yaml"), f"data.path={data}", f"data.batch_size={batch}",
        f"sharding.planner_batch_size={batch}", f"sharding.budget_bytes={budget_bytes}", "search.method=fixed",
        "search.dim=16", f"train.out_dir={runs}", f"train.name={name}", "train.checkpoint=false",
        "train.log_every=1000",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    return records, time.perf_counter() - start


def plan_production(data: Path, run: Path) -> dict[str, Any]:
    """The run's final plan sharded by TorchRec's planner for 64 × 80 GB GPUs (`gpu64x80.yaml`, not present)."""
    from jobs.config import load_config
    from jobs.export import load_topology, plan_for_topology
    from pipeline.dataset import Dataset
    from sharding.plan import DimensionPlan

    topology = REPO / "jobs/configs/topology/gpu64x80.yaml"
    cfg = load_config(run / "config.yaml")
    return plan_for_topology(
        cfg, Dataset(data).spec, DimensionPlan.load(run / "plan"), load_topology(topology), topology
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows over all days")
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--max-cardinality", type=int, default=10_000_000)
    parser.add_argument("--reference-rows", type=int, default=1_000_000, help="rows of the speed reference run")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--budget-gib", type=float, default=8.0, help="sharding.budget_bytes, in GiB over both ranks")
    parser.add_argument("--work", type=Path, default=None, help="where the data and runs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and runs")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="dimsearch-scale-"))
    budget = int(args.budget_gib * 2**30)
    try:
        gen_s = generate(work / "data", args.rows, args.days, args.max_cardinality)
        disk = sum(p.stat().st_size for p in (work / "data").rglob("*.parquet"))
        records, job_s = run_job(work / "data", work / "runs", "scale", budget, args.batch_size)
        production = plan_production(work / "data", work / "runs" / "scale")
        ref_days = max(1, min(args.days, args.reference_rows // max(args.rows // args.days, 1)))
        generate(work / "ref", ref_days * (args.reference_rows // ref_days), ref_days, args.max_cardinality)
        ref, _ = run_job(work / "ref", work / "runs", "reference", budget, args.batch_size)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    header = (
        f"{'day':<12}{'rows':>10}{'rows/s':>10}{'s/M rows':>10}{'RSS MiB/rank (max)':>20}{'emb MiB':>10}"
        f"{'budget MiB':>12}"
    )
    print(header)
    print("-" * len(header))
    sec_per_m = []
    for r in records:
        rows = r["train_examples"]
        speed = r["examples_per_s"]
        sec_per_m.append(1e6 / max(speed, 1e-9))
        emb = sum(r["embedding_bytes_per_rank"])
        print(
            f"{r['day']:<12}{rows:>10,}{speed:>10,.0f}{sec_per_m[-1]:>10.2f}{r['peak_rss_mb']:>20,.0f}"
            f"{emb / 2**20:>10.1f}{budget / 2**20:>12,.0f}"
        )
    per_rank = production["per_rank_bytes"]
    kinds = sorted({t["sharding_type"] for t in production["tables"].values()})
    print(
        f"production plan (TorchRec planner, 64 x 80 GB GPUs, gpu64x80.yaml): {production['total_bytes'] / 2**30:.2f} "
        f"GiB over {len(per_rank)} ranks; per rank min {min(per_rank) / 2**20:,.1f} / max {max(per_rank) / 2**20:,.1f} "
        f"MiB; sharding types {kinds}"
    )
    third = max(1, len(records) // 3)
    first, last = sum(sec_per_m[:third]) / third, sum(sec_per_m[-third:]) / third
    linear = last / first
    speed = sum(r["train_examples"] for r in records) / sum(r["train_examples"] / r["examples_per_s"] for r in records)
    ref_speed = sum(r["train_examples"] for r in ref) / sum(r["train_examples"] / r["examples_per_s"] for r in ref)
    over = sum(sum(r["embedding_bytes_per_rank"]) > budget for r in records)
    peak = max(r["peak_rss_mb"] for r in records)
    auc = records[-1]["eval"].get("auc", float("nan"))
    print(
        f"generate {gen_s:.1f} s ({args.rows / gen_s:,.0f} rows/s, {disk / 2**30:.2f} GiB zstd); job {job_s:.1f} s; "
        f"last-day AUC {auc:.4f}; reference ({sum(r['train_examples'] for r in ref):,} rows) {ref_speed:,.0f} ex/s"
    )
    met = {
        "budget": over == 0,
        "rss": peak <= 8192,
        "linear": abs(linear - 1) <= 0.2,
        "speed": speed >= 0.8 * ref_speed,
    }
    print(
        f"RESULT scale: rows={args.rows} days={args.days} max_cardinality={args.max_cardinality} "
        f"ex_s={speed:.0f} ref_ex_s={ref_speed:.0f} speed_ratio={speed / ref_speed:.2f} "
        f"speed_target={'met' if met['speed'] else 'missed'} days_over_budget={over} "
        f"budget_target={'met' if met['budget'] else 'missed'} peak_rss_mb={peak:.0f} "
        f"rss_target={'met' if met['rss'] else 'missed'} last_vs_first_s_per_m={linear:.2f} "
        f"linear_target={'met' if met['linear'] else 'missed'} last_day_auc={auc:.4f} "
        f"gen_rows_s={args.rows / gen_s:.0f} "
        f"gpu64_total_gib={production['total_bytes'] / 2**30:.2f} gpu64_max_rank_mib={max(per_rank) / 2**20:.1f} "
        f"methods=FIXED-16"
    )


if __name__ == "__main__":
    main()
