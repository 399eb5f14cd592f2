"""AutoDim against the fixed baselines, on real data, through the real job (2 ranks under torchrun).

Run (figures go to BENCHMARKS.md)::

    python -m benchmarks.autodim            # ML-1M with side features, Criteo and Avazu samples
    python -m benchmarks.autodim --quick    # ML-1M only, one epoch

Protocol (methods.md §2): ML-1M with its side features (user, movie, gender, age, occupation, zip, genres,
year), label rating ≥ 4, a random 80/10/10 split; the Criteo and Avazu samples with their own train/dev/test
files. A DeepFM (the paper's main base model) trained `EPOCHS` epochs. Rows per dataset: FIXED-16, FIXED-32
(every field the same dim; FDE), uniform-budget (the largest equal dim within AutoDim's budget) and AutoDim
(candidates {4, 8, 16, 24, 32}; search, derive, retrain), each with test AUC, log loss and embedding parameters.
On ML-1M AutoDim is given the budget of the target — 43% of FIXED-16's parameters — so the derived plan shrinks
its least certain fields until it fits. Targets: AutoDim's AUC ≥ FIXED-16's with ≤ 43% of its parameters on
ML-1M (the paper: 0.8077 → 0.8113 with 57% fewer), and the search phase's wall time ≤ 3× one FIXED epoch.

The last line is `RESULT autodim: key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.ingest import ingest
from sharding.plan import DimensionPlan

REPO = Path(__file__).resolve().parents[1]
PARAM_TARGET = 0.43
OVERHEAD_TARGET = 3.0
EPOCHS = 2


@dataclass
class Row:
    dataset: str
    method: str
    auc: float
    log_loss: float
    parameters: int
    dims: str
    seconds: float
    search_seconds: float = 0.0
    epoch_seconds: float = 0.0


def datasets_root() -> Path:
    return Path(os.environ.get("DIMSEARCH_DATASETS", REPO.parent / "shared" / "datasets"))


def run_job(name: str, out: Path, overrides: list[str]) -> tuple[list[dict[str, Any]], DimensionPlan, float]:
    """One run of the real job on 2 ranks; its metrics records, final plan and wall time."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "jobs.train",
        "--config", str(REPO / "jobs/configs/autodim.yaml"), f"train.out_dir={out}", f"train.name={name}",
        "train.checkpoint=false", *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return records, DimensionPlan.load(out / name / "plan"), elapsed


def _row(dataset: str, method: str, records: list[dict[str, Any]], plan: DimensionPlan, seconds: float) -> Row:
    test = records[-1]["eval"]
    epochs = [r for r in records if r["phase"] == "train"]
    search = [r for r in records if r["phase"] == "search"]
    dims = " ".join(f"{f.feature}={f.dim}" for f in plan.features)
    return Row(
        dataset,
        method,
        test["auc"],
        test["log_loss"],
        plan.parameters,
        dims,
        seconds,
        search_seconds=sum(r["seconds"] for r in search),
        epoch_seconds=sum(r["seconds"] for r in epochs) / max(len(epochs), 1),
    )


def bench_dataset(name: str, data: Path, work: Path, epochs: int, budget_share: float | None) -> list[Row]:
    protocol = "random" if name == "ml-1m" else "given"
    base = [f"data.path={data}", f"data.protocol={protocol}", f"train.epochs={epochs}"]
    rows: list[Row] = []
    fixed: dict[int, Row] = {}
    for dim in (16, 32):
        records, plan, secs = run_job(f"{name}-fixed{dim}", work, [*base, "search.method=fixed", f"search.dim={dim}"])
        fixed[dim] = _row(name, f"FIXED-{dim}", records, plan, secs)
        rows.append(fixed[dim])
    autodim_over = [*base, "search.method=autodim"]
    if budget_share is not None:
        autodim_over.append(f"search.budget={int(budget_share * fixed[16].parameters)}")
    records, plan, secs = run_job(f"{name}-autodim", work, autodim_over)
    autodim = _row(name, "AutoDim", records, plan, secs)
    records, plan, secs = run_job(
        f"{name}-uniform", work, [*base, "search.method=uniform-budget", f"search.budget={autodim.parameters}"]
    )
    rows += [_row(name, "uniform-budget", records, plan, secs), autodim]
    return rows


def print_table(rows: list[Row]) -> None:
    print(f"{'dataset':<10}{'method':<16}{'test AUC':>9}{'log loss':>9}{'emb params':>12}{'wall s':>8}  dims")
    for r in rows:
        print(
            f"{r.dataset:<10}{r.method:<16}{r.auc:>9.4f}{r.log_loss:>9.4f}{r.parameters:>12,}{r.seconds:>8.0f}"
            f"  {r.dims}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.autodim", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="ML-1M only, one epoch")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    root = datasets_root()
    sources = [("ml-1m", "ml-1m", root / "ml-1m")]
    if not args.quick:
        sources += [("criteo", "criteo", root / "criteo-sample"), ("avazu", "avazu", root / "avazu-sample")]
    epochs = 1 if args.quick else EPOCHS
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-autodim-") as tmp:
        work = Path(tmp)
        for name, fmt, src in sources:
            if not src.is_dir():
                print(f"skip {name}: {src} not found (licensed data is read from ../shared/datasets)")
                continue
            data = ingest(fmt, src, work / f"data-{name}")
            rows += bench_dataset(name, data, work, epochs, PARAM_TARGET if name == "ml-1m" else None)
    if args.quick:
        print("(--quick: ML-1M only, 1 epoch; the recorded figures come from the full run)")
    print_table(rows)
    parts: list[str] = []
    for name in dict.fromkeys(r.dataset for r in rows):
        by = {r.method: r for r in rows if r.dataset == name}
        ad, f16 = by["AutoDim"], by["FIXED-16"]
        share = ad.parameters / f16.parameters
        overhead = ad.search_seconds / max(f16.epoch_seconds, 1e-9)
        parts += [
            f"{name}_autodim_auc={ad.auc:.4f}",
            f"{name}_fixed16_auc={f16.auc:.4f}",
            f"{name}_fixed32_auc={by['FIXED-32'].auc:.4f}",
            f"{name}_uniform_auc={by['uniform-budget'].auc:.4f}",
            f"{name}_param_share={share:.3f}",
            f"{name}_search_overhead={overhead:.2f}x",
        ]
        if name == "ml-1m":
            met = ad.auc >= f16.auc and share <= PARAM_TARGET
            parts.append(f"ml1m_target_auc_ge_fixed16_at_43pct={'met' if met else 'missed'}")
        parts.append(f"{name}_target_overhead_3x={'met' if overhead <= OVERHEAD_TARGET else 'missed'}")
    print("RESULT autodim: " + " ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
