"""The job at scale: a Criteo-like stream with million-id fields through `jobs.train` on 2 ranks.

    python -m benchmarks.scale --rows 2000000            # CI-sized: 10 days x 200,000 rows
    python -m benchmarks.scale --rows 20000000 --days 10 # larger
    python -m benchmarks.scale --rows 100000000 --days 30 --keep   # the issue's full size (hours here)

It writes `pipeline.criteo_synthetic` (26 sparse fields up to `--max-cardinality` ids, Zipf 1.1, daily drift, 3
multi-hot fields, 13 dense fields, a planted signal; zstd, one chunk at a time) into a temporary directory, runs
the streaming job (`python -m jobs.launch`, 2 ranks, DLRM, prequential) on it once per method (`--methods`, default
all four), and prints per method and day: rows, rows/s (training, all ranks), peak RSS per rank, embedding
parameters against the budget, embedding bytes against `sharding.budget_bytes`, whether the day reconfigured, and the
day's seconds: the wall time between the job's consecutive day records (its log lines), of which "other s" is what
is not training (prequential evaluation, the search step and any reconfiguration), and "reconf s" the move to the
day's new plan (save, rebuild, load), as the job records it (`reconfigure_seconds`).

Methods, at one budget: FIXED-16's embedding parameters (every table's capacity × 16, `search.budget`):

* FIXED-16: every field at 16 dims (`search.method=fixed search.dim=16`).
* SCALL: each day every user and item row sized in multiples of 4 up to 32 by its frequency rank with SCALL's
  budget-guaranteed sampler, the fixed action (0.5, 0.1, 0.1) as `benchmarks.streaming` runs it.
* ESAPN: every user and item row starts at 4 and, each day it is seen, keeps or doubles its size by its policy.
* MD: mixed-dimension blocks by a power law of popularity, learned projections, within the budget.

The row-level methods size the spec's `user_field` and `item_field` (`c3` and `c12`, the two largest fields, see
`pipeline.criteo_synthetic`) with `search.dim=32` (d_max) and `search.other_dim=16`: the other 24 fields stay at 16
as in FIXED. FIXED-16 then also runs on a 1M-row stream (`--reference-rows`) for the speed ratio, and its final plan
is sharded for 64 × 80 GB GPUs by TorchRec's planner (`jobs/configs/topology/gpu64x80.yaml`, planned on `meta`),
printed with its bytes per rank: the plan production would run.
What it writes (the data, the runs, `generate.json`) is deleted afterwards unless `--keep`; nothing that was in
`--work` before is. `--reuse` runs on the stream an earlier `--keep` run left in `--work`.

Targets (issue "Industrial scale"): 0 days over budget; peak RSS per rank <= 8 GB; seconds per million rows of the
last third of the days within +-20% of the first third's (linear time); examples/s at scale >= 0.8 of the 1M-row
run's; for each search, 0 days over the budget, and its AUC, memory and speed beside FIXED's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# A day record's log line (rank 0, `jobs.logs` format): "2026-12-02 17:44:58,123 jobs.train INFO day 2024-01-01: ..."
_DAY_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ INFO day (\d{4}-\d\d-\d\d): eval")
METHODS = ("fixed", "scall", "esapn", "md")
LABELS = {"fixed": "FIXED-16", "scall": "SCALL", "esapn": "ESAPN", "md": "MD"}


def method_overrides(method: str, budget: int) -> list[str]:
    """The job's `search.*` overrides for `method` at `budget` embedding parameters (FIXED-16's)."""
    if method == "fixed":
        return ["search.method=fixed", "search.dim=16"]
    searched = [f"search.method={method}", "search.dim=32", "search.other_dim=16", f"search.budget={budget}"]
    return searched + (["search.scall.action=[0.5,0.1,0.1]"] if method == "scall" else [])


def generate(out: Path, rows: int, days: int, max_cardinality: int) -> float:
    from pipeline.criteo_synthetic import CriteoSyntheticConfig, write_criteo_synthetic

    cfg = CriteoSyntheticConfig(
        days=days, rows_per_day=rows // days, chunk_rows=min(1_000_000, rows // days), max_cardinality=max_cardinality
    )
    start = time.perf_counter()
    write_criteo_synthetic(cfg, out)
    return time.perf_counter() - start


def _stream_args(args: argparse.Namespace) -> dict[str, int]:
    return {"rows": args.rows, "days": args.days, "max_cardinality": args.max_cardinality}


def _generated(work: Path, args: argparse.Namespace) -> float:
    """The seconds it took to generate the stream kept in `work`, once it is checked to be this run's."""
    record = work / "generate.json"
    if not record.is_file() or not (work / "data").is_dir():
        raise SystemExit(f"--reuse: {work} holds no kept stream (run once with --work {work} --keep)")
    saved = json.loads(record.read_text())
    if {k: saved.get(k) for k in _stream_args(args)} != _stream_args(args):
        raise SystemExit(f"--reuse: the stream in {work} was generated with {saved}, not {_stream_args(args)}")
    return float(saved["seconds"])


def run_job(
    data: Path, runs: Path, name: str, budget_bytes: int, batch: int, search: list[str] | None = None
) -> tuple[list[dict[str, Any]], float]:
    """Run the job: its day records, each with `day_seconds` from the log (None on day 1), and its wall time."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "jobs.launch", "--standalone", "--nproc-per-node=2", "--",
        "--config", str(REPO / "jobs/configs/demo.yaml"), f"data.path={data}", f"data.batch_size={batch}",
        f"sharding.planner_batch_size={batch}", f"sharding.budget_bytes={budget_bytes}",
        *(search or method_overrides("fixed", 0)), f"train.out_dir={runs}", f"train.name={name}",
        "train.checkpoint=false", "train.log_every=1000",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    stamps = {m[2]: dt.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f") for m in _DAY_LINE.finditer(proc.stderr)}
    previous = None
    for r in records:
        now = stamps.get(r["day"])
        r["day_seconds"] = (now - previous).total_seconds() if now and previous else None
        previous = now
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


def _speed(records: list[dict[str, Any]]) -> float:
    """Training examples per second over the run (all ranks)."""
    return sum(r["train_examples"] for r in records) / sum(r["train_examples"] / r["examples_per_s"] for r in records)


def _over(r: dict[str, Any], budget: int, budget_bytes: int) -> bool:
    """Over the parameter budget (FIXED-16's) or over `sharding.budget_bytes`."""
    return r["embedding_parameters"] > budget or sum(r["embedding_bytes_per_rank"]) > budget_bytes


def print_method(label: str, records: list[dict[str, Any]], budget: int, budget_bytes: int) -> None:
    header = (
        f"{'day':<12}{'rows':>10}{'rows/s':>10}{'s/M rows':>10}{'RSS MiB/rank (max)':>20}{'emb MiB':>10}"
        f"{'budget MiB':>12}{'emb params':>13}{'budget':>13}{'reconf':>8}{'day s':>8}{'other s':>9}"
        f"{'reconf s':>10}{'AUC':>8}"
    )
    print(f"\n{label}")
    print(header)
    print("-" * len(header))
    for r in records:
        rows, speed = r["train_examples"], r["examples_per_s"]
        day_s = r.get("day_seconds")
        other = "-" if day_s is None else f"{day_s - rows / max(speed, 1e-9):.1f}"
        print(
            f"{r['day']:<12}{rows:>10,}{speed:>10,.0f}{1e6 / max(speed, 1e-9):>10.2f}{r['peak_rss_mb']:>20,.0f}"
            f"{sum(r['embedding_bytes_per_rank']) / 2**20:>10.1f}{budget_bytes / 2**20:>12,.0f}"
            f"{r['embedding_parameters']:>13,}{budget:>13,}{'yes' if r.get('reconfigured') else 'no':>8}"
            f"{'-' if day_s is None else f'{day_s:.1f}':>8}{other:>9}{r.get('reconfigure_seconds', 0.0):>10.2f}"
            f"{r['eval'].get('auc', float('nan')):>8.4f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows over all days")
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--max-cardinality", type=int, default=10_000_000)
    parser.add_argument("--reference-rows", type=int, default=1_000_000, help="rows of the speed reference run")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--budget-gib", type=float, default=8.0, help="sharding.budget_bytes, in GiB over both ranks")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, among {','.join(METHODS)} (default all); the reference and production plan need fixed",
    )
    parser.add_argument("--work", type=Path, default=None, help="where the data and runs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and runs")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="use the stream an earlier run with the same --rows/--days/--max-cardinality left in --work (--keep)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        parser.error(f"--methods {args.methods!r}: unknown {bad}, expected a comma-separated list among {METHODS}")
    work = args.work or Path(tempfile.mkdtemp(prefix="dimsearch-scale-"))
    before = set(work.iterdir()) if work.is_dir() else set()  # never deleted: only what this run writes is
    budget_bytes = int(args.budget_gib * 2**30)
    runs: dict[str, tuple[list[dict[str, Any]], float]] = {}
    failed: dict[str, str] = {}
    production: dict[str, Any] | None = None
    ref: list[dict[str, Any]] = []
    try:
        from jobs.train import table_capacities
        from pipeline.dataset import Dataset

        gen_s = (
            _generated(work, args)
            if args.reuse
            else generate(work / "data", args.rows, args.days, args.max_cardinality)
        )
        (work / "generate.json").write_text(json.dumps({"seconds": gen_s, **_stream_args(args)}))
        disk = sum(p.stat().st_size for p in (work / "data").rglob("*.parquet"))
        capacity = table_capacities(Dataset(work / "data"), None)
        budget = sum(capacity.values()) * 16  # FIXED-16's embedding parameters: every search's budget
        for m in methods:
            overrides = method_overrides(m, budget)
            try:
                runs[m] = run_job(work / "data", work / "runs", f"scale-{m}", budget_bytes, args.batch_size, overrides)
            except RuntimeError as e:  # record the methods that ran; report this one
                failed[m] = str(e)[-2000:]
                print(f"{LABELS[m]} failed:\n{failed[m]}", file=sys.stderr)
        if "fixed" in runs:
            production = plan_production(work / "data", work / "runs" / "scale-fixed")
            ref_days = max(1, min(args.days, args.reference_rows // max(args.rows // args.days, 1)))
            generate(work / "ref", ref_days * (args.reference_rows // ref_days), ref_days, args.max_cardinality)
            ref, _ = run_job(work / "ref", work / "runs", "reference", budget_bytes, args.batch_size)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            for made in set(work.iterdir()) - before if work.is_dir() else ():
                if made.is_dir():
                    shutil.rmtree(made)
                else:
                    made.unlink()

    print(
        f"budget: {budget:,} embedding parameters (FIXED-16's: {sum(capacity.values()):,} rows x 16); user "
        f"c3 {capacity['c3']:,} rows, item c12 {capacity['c12']:,} rows; sharding.budget_bytes "
        f"{budget_bytes / 2**20:,.0f} MiB"
    )
    for m, (records, _) in runs.items():
        print_method(LABELS[m], records, budget, budget_bytes)
    print(
        f"\n{'method':<10}{'days over':>10}{'peak RSS MiB':>13}{'ex/s':>9}{'last AUC':>10}{'mean AUC':>10}{'job s':>8}"
    )
    for m, (records, job_s) in runs.items():
        aucs = [r["eval"].get("auc", float("nan")) for r in records]
        print(
            f"{LABELS[m]:<10}{sum(_over(r, budget, budget_bytes) for r in records):>10}"
            f"{max(r['peak_rss_mb'] for r in records):>13,.0f}{_speed(records):>9,.0f}{aucs[-1]:>10.4f}"
            f"{sum(aucs) / len(aucs):>10.4f}{job_s:>8.0f}"
        )
    for m in failed:
        print(f"{LABELS[m]:<10} FAILED (see above)")
    parts = [f"rows={args.rows} days={args.days} max_cardinality={args.max_cardinality} budget={budget}"]
    if "fixed" in runs and production is not None:
        records, job_s = runs["fixed"]
        per_rank = production["per_rank_bytes"]
        kinds = sorted({t["sharding_type"] for t in production["tables"].values()})
        print(
            f"production plan (TorchRec planner, 64 x 80 GB GPUs, gpu64x80.yaml): "
            f"{production['total_bytes'] / 2**30:.2f} GiB over {len(per_rank)} ranks; per rank min "
            f"{min(per_rank) / 2**20:,.1f} / max {max(per_rank) / 2**20:,.1f} MiB; sharding types {kinds}"
        )
        sec_per_m = [1e6 / max(r["examples_per_s"], 1e-9) for r in records]
        third = max(1, len(records) // 3)
        linear = (sum(sec_per_m[-third:]) / third) / (sum(sec_per_m[:third]) / third)
        speed, ref_speed = _speed(records), _speed(ref)
        over = sum(sum(r["embedding_bytes_per_rank"]) > budget_bytes for r in records)
        peak = max(r["peak_rss_mb"] for r in records)
        auc = records[-1]["eval"].get("auc", float("nan"))
        print(
            f"generate {gen_s:.1f} s ({args.rows / gen_s:,.0f} rows/s, {disk / 2**30:.2f} GiB zstd); FIXED job "
            f"{job_s:.1f} s; last-day AUC {auc:.4f}; reference ({sum(r['train_examples'] for r in ref):,} rows) "
            f"{ref_speed:,.0f} ex/s"
        )
        met = {
            "budget": over == 0,
            "rss": peak <= 8192,
            "linear": abs(linear - 1) <= 0.2,
            "speed": speed >= 0.8 * ref_speed,
        }
        parts.append(
            f"ex_s={speed:.0f} ref_ex_s={ref_speed:.0f} speed_ratio={speed / ref_speed:.2f} "
            f"speed_target={'met' if met['speed'] else 'missed'} days_over_budget={over} "
            f"budget_target={'met' if met['budget'] else 'missed'} peak_rss_mb={peak:.0f} "
            f"rss_target={'met' if met['rss'] else 'missed'} last_vs_first_s_per_m={linear:.2f} "
            f"linear_target={'met' if met['linear'] else 'missed'} last_day_auc={auc:.4f} "
            f"gen_rows_s={args.rows / gen_s:.0f} "
            f"gpu64_total_gib={production['total_bytes'] / 2**30:.2f} gpu64_max_rank_mib={max(per_rank) / 2**20:.1f}"
        )
    for m, (records, job_s) in runs.items():
        if m == "fixed":
            continue
        parts.append(
            f"{m}_days_over_budget={sum(_over(r, budget, budget_bytes) for r in records)} "
            f"{m}_peak_rss_mb={max(r['peak_rss_mb'] for r in records):.0f} {m}_ex_s={_speed(records):.0f} "
            f"{m}_last_day_auc={records[-1]['eval'].get('auc', float('nan')):.4f} "
            f"{m}_reconfigured_days={sum(bool(r.get('reconfigured')) for r in records)} "
            f"{m}_max_reconfigure_s={max(r.get('reconfigure_seconds', 0.0) for r in records):.2f} {m}_job_s={job_s:.0f}"
        )
    parts.append(f"methods={','.join(LABELS[m] for m in runs)}")
    if failed:
        parts.append(f"failed={','.join(LABELS[m] for m in failed)}")
    print("RESULT scale: " + " ".join(parts))


if __name__ == "__main__":
    main()
