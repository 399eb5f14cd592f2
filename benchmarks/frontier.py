"""The memory–quality frontier: every method against FIXED-d × dtype and MD, at equal serving bytes.

    python -m benchmarks.frontier            # ML-1M, ml-latest-small and the Criteo-like stream (--rows)
    python -m benchmarks.frontier --quick    # a 120,000-row Criteo-like stream only, one seed (5.6 min here)

Every point is a real `jobs.train` run on 2 gloo ranks (`jobs.launch`), exported by `jobs.export` (serving rows
padded to `ALIGNMENT` byte, the layout FBGEMM's CPU inference kernels read; TorchRec's default of 16 bytes makes
every row at least 1/4 of a 16-dim fp32 row, so no method could go below 1/4) and scored *as served* by
`jobs.evaluate` on the bundle (TorchRec's quantised inference tables holding the bundle's bytes):

* ML-1M with its side features, random 80/10/10 split, DeepFM, 2 epochs, scored on the test split;
* ml-latest-small as a stream of 8 equal-count segments (`benchmarks.streaming`), MF, trained on the first 7
  prequentially, scored on the 8th (never trained on);
* the Criteo-like stream (`pipeline.criteo_synthetic`: 26 fields up to `--max-cardinality` ids, 3 multi-hot), DLRM,
  trained on all days but the last, scored on the last.

Methods, at serving-byte budgets of 1/2 … 1/32 of FIXED-16 fp32's (`BUDGETS`):

* FIXED-d × dtype: every field at d ∈ {4, 8, 16, 32} trained in fp32, exported in fp32, fp16, int8 and int4
  (post-training quantisation; one training per d). uniform-budget at fraction f is FIXED-(16 f) fp32 (the
  largest equal dim within the bytes), so it is not run again.
* MD (streams): user and item rows in equal-mass blocks sized by the power rule (α 0.3, 4 blocks, learned
  projections), every other field at the uniform dim of the budget, in fp32 (parameters = bytes / 4) and, served
  in int8 (`search.dtype=int8`), with the parameter budget that leaves room for the rows' scale and bias.
* AutoDim (ML-1M, the static field-level search): its parameter budget at fraction f (fp32).
* joint: `search.method=joint` (dims × dtype per table by measured loss and a knapsack) at each budget (in bytes:
  the fraction of FIXED-16 fp32's), trained first at `--joint-dim` (32: candidates 4…32, so a table may be served
  wider than 16 in fewer bytes, as FIXED-32 int4 is); on ML-1M
  searched after one epoch and retrained from scratch for two (as AutoDim is), on streams decided after day 1.

Three seeds (`train.seed`) for the runs that decide the headline (FIXED-16 fp32 and joint at `HEADLINE`), one
elsewhere. Per dataset it prints method, dtype, bytes as a fraction of FIXED-16 fp32, AUC (± the spread over seeds)
and log loss, Δ AUC against FIXED-16 fp32, writes `frontier-<dataset>.png` (AUC against serving bytes, log x, one
line per method) and the `jobs.evaluate` report of the seed-0 points (its Frontier section marks the Pareto set)
under `--out`, and ends with the headline per method: the smallest byte fraction at which its AUC is within
0.001 of FIXED-16 fp32's. Infeasible budgets (no plan of the method fits) are listed with the method's reason.

Targets (issue "memory–quality frontier"): on the Criteo-like stream and ML-1M the best method is within 0.001 AUC
of FIXED-16 fp32 at ≤ 1/8 of its bytes; at every budget joint's AUC ≥ every baseline's (FIXED-d × dtype, MD) that
fits it; every plan within its byte budget.

The last line is `RESULT frontier: key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GPU16 = REPO / "jobs/configs/topology/gpu16x80.yaml"
ALIGNMENT = 1
BUDGETS = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64)
METHODS = ("fixed", "compress", "joint", "md", "autodim")
# The compressed baselines (`search.compress` recipe families), each tuned on the verification rows like any method.
FAMILIES = {"admission": ("admission",), "hashing": ("hashing",), "CAFE": ("cafe",)}
# Issue 26's "within" targets: (dataset, budget) -> the most AUC the delivered plan may lose to FIXED-16 fp32.
WITHIN_TARGETS = {
    ("criteo-synthetic", 1 / 16): 0.002,
    ("criteo-synthetic", 1 / 32): 0.005,
    ("ml-latest", 1 / 16): 0.003,
    ("ml-1m", 1 / 16): 0.005,
}
VERIFY_ROWS = 200_000
HEADLINE = 1 / 8
DTYPES = ("fp32", "fp16", "int8", "int4")
WITHIN = 0.001
SEEDS = (0, 1, 2)
JOINT_DIMS = (4, 8, 12, 16, 24, 32)

BASE: dict[
    str, dict[str, dict[str, Any]]
] = {  # the job config of each dataset (fixed, fp32); methods override `search`
    "ml-1m": {
        "data": {"protocol": "random", "batch_size": 1000},
        "model": {"name": "deepfm", "dense_lr": 0.02, "options": {"embedding_dim": 32}},
        "sharding": {"optimizer": "rowwise_adagrad", "learning_rate": 0.05, "planner_batch_size": 1000},
        "train": {"epochs": 2, "log_every": 1000},
    },
    "ml-latest": {
        "data": {"protocol": "prequential", "batch_size": 1000, "days": 7},
        "model": {"name": "mf", "dense_lr": 0.01},
        "sharding": {"optimizer": "rowwise_adagrad", "learning_rate": 0.05, "planner_batch_size": 1000},
        "train": {"log_every": 1000},
    },
    "criteo-synthetic": {
        "data": {"protocol": "prequential", "batch_size": 2048},
        "model": {"name": "dlrm", "dense_lr": 0.05},
        "sharding": {"optimizer": "rowwise_adagrad", "learning_rate": 0.05, "planner_batch_size": 2048},
        "train": {"log_every": 1000},
    },
}


@dataclass
class Point:
    """One method at one budget on one dataset, as served."""

    dataset: str
    method: str
    dtype: str
    budget: float | None  # the nominal fraction it was given (None: a FIXED point)
    fraction: float = float("nan")  # serving bytes / FIXED-16 fp32's
    auc: list[float] = field(default_factory=list)  # one per seed
    log_loss: list[float] = field(default_factory=list)
    within_budget: bool = True
    note: str = ""  # why it has no AUC (infeasible)
    bundle: Path | None = None
    detail: str = ""  # what a compressed plan is: its source run and recipe
    validation: dict[str, float] = field(default_factory=dict)  # delivered: its and the best uniform's held-out metric

    @property
    def mean_auc(self) -> float:
        return float(np.mean(self.auc)) if self.auc else float("nan")


def datasets_root() -> Path:
    return Path(os.environ.get("DIMSEARCH_DATASETS", REPO.parent / "shared" / "datasets"))


class Bench:
    """Runs, exports and scores the points of one dataset in `work`."""

    def __init__(
        self, name: str, data: Path, work: Path, quick: bool, joint_dim: int = 32, methods: tuple[str, ...] = METHODS
    ) -> None:
        self.name, self.data, self.work, self.quick, self.joint_dim = name, data, work, quick, joint_dim
        self.methods = methods
        self.verify_rows = VERIFY_ROWS
        self.later: list[tuple[Point, Path]] = []  # seeds 1 and 2 of a point: (point, bundle), scored at the end
        self.static = BASE[name]["data"]["protocol"] != "prequential"
        base = json.loads(json.dumps(BASE[name]))
        base["data"]["path"] = str(data)
        base["search"] = {"method": "fixed", "dim": 16, "row_alignment": ALIGNMENT}
        base["train"].update(out_dir=str(work / "runs"), checkpoint=True)
        if not self.static:
            from pipeline.dataset import Dataset

            days = len(Dataset(data).days)
            base["data"]["days"] = days - 1  # the last day is scored, never trained on
            self.score_days = str(days)
            # Compressed plans are chosen on the last day trained on: the only day that is neither the scored one
            # nor unseen by the model (so the choice is made in-sample; BENCHMARKS.md says what that costs).
            self.verify_days = str(days - 1)
        work.mkdir(parents=True, exist_ok=True)
        self.config = work / f"{name}.yaml"
        self.config.write_text(json.dumps(base))  # JSON is YAML
        self.points: list[Point] = []
        self.seconds = 0.0

    def train(self, run: str, search: list[str], seed: int = 0) -> tuple[Path | None, str]:
        """One run of the job; (its directory, "") or (None, why it could not start: its first error line)."""
        env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        cmd = [
            sys.executable, "-m", "jobs.launch", "--standalone", "--nproc-per-node=2", "--",
            "--config", str(self.config), f"train.name={run}", f"train.seed={seed}", *search,
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        self.seconds += time.perf_counter() - start
        if proc.returncode == 0:
            return self.work / "runs" / run, ""
        reason = re.search(r"(PlanError|SearchConfigError|ConfigError|error): (.*)", proc.stderr)
        if reason and ("fits" in reason.group(2) or "budget" in reason.group(2)):
            return None, reason.group(2).strip()[:200]
        log = self.work / f"{run}.failed.log"
        log.write_text(proc.stderr)
        print(f"run {run} FAILED (exit {proc.returncode}); its log: {log}\n{proc.stderr[-1500:]}", file=sys.stderr)
        return None, f"FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1][:160]}"

    def export(self, run: Path, tag: str, dtype: str | None = None) -> Path:
        from jobs.export import export

        start = time.perf_counter()
        out = export(run, GPU16, self.work / "bundles" / tag, dtype=dtype, row_alignment=ALIGNMENT)  # type: ignore[arg-type]
        self.seconds += time.perf_counter() - start
        return out

    def add(self, method: str, dtype: str, budget: float | None, run: Path | None, note: str = "") -> Point:
        point = Point(self.name, method, dtype, budget, note=note)
        if run is not None:
            point.bundle = self.export(
                run, f"{method}-{dtype}-{budget}-{run.name}", None if dtype == "mixed" else dtype
            )
        self.points.append(point)
        return point

    def seeded(self, point: Point, run: str, search: list[str], dtype: str | None) -> None:
        """Runs seeds 1 and 2 of `point` and scores them into it."""
        for seed in SEEDS[1:]:
            path, note = self.train(f"{run}-s{seed}", search, seed)
            if path is None:
                print(f"seed {seed} of {run}: {note}", file=sys.stderr)
                continue
            bundle = self.export(path, f"{run}-s{seed}", dtype)
            auc, loss, _ = self.score([bundle], f"seed{seed}-{run}")[0]
            point.auc.append(auc)
            point.log_loss.append(loss)

    def score(self, bundles: list[Path], tag: str) -> list[tuple[float, float, int]]:
        """(AUC, log loss, serving bytes) of each bundle as served, on the held-out rows; the report goes to
        `<work>/reports/<dataset>-<tag>` (the seed-0 one is copied to --out)."""
        from jobs.evaluate import evaluate
        from jobs.export import load_bundle

        start = time.perf_counter()
        selection = {"split": "test"} if self.static else {"days": self.score_days}
        report = evaluate(bundles, out=self.work / "reports" / f"{self.name}-{tag}", **selection)  # type: ignore[arg-type]
        self.seconds += time.perf_counter() - start
        self.report = report.out
        return [
            (r.overall.metrics["auc"], r.overall.metrics["log_loss"], load_bundle(b).plan.serving_bytes)
            for r, b in zip(report.runs, bundles, strict=True)
        ]

    def run(self) -> None:
        fixed_dims = (8, 16) if self.quick else (4, 8, 16, 32)
        budgets = (1 / 4, 1 / 8, 1 / 16) if self.quick else BUDGETS
        seeds = not self.quick
        fixed: dict[int, list[Path]] = {}  # seed -> its FIXED-d runs (what the compressed plans start from)
        uniform: dict[tuple[int, str], Point] = {}
        for seed in SEEDS if seeds and "compress" in self.methods else (0,):
            for d in fixed_dims:
                tag = f"fixed{d}" + (f"-s{seed}" if seed else "")
                path, note = self.train(tag, ["search.method=fixed", f"search.dim={d}"], seed)
                if path is not None:
                    fixed.setdefault(seed, []).append(path)
                for q in DTYPES:
                    if seed == 0:
                        uniform[d, q] = self.add(f"FIXED-{d}", q, None, path, note)
                    elif path is not None and uniform[d, q].bundle is not None:
                        # Every baseline at the delivered plan's seeds: means are compared with means.
                        self.later.append((uniform[d, q], self.export(path, f"{tag}-{q}", q)))
        reference = uniform[16, "fp32"]
        if seeds and "compress" not in self.methods:
            self.seeded(reference, "fixed16", ["search.method=fixed", "search.dim=16"], "fp32")
        if "compress" in self.methods:
            self.compressed(fixed, budgets)
        for b in budgets if "joint" in self.methods else ():
            dims = ",".join(str(d) for d in JOINT_DIMS if d <= self.joint_dim)
            search = ["search.method=joint", f"search.dim={self.joint_dim}", f"search.joint.dims=[{dims}]"]
            search += [
                f"search.joint.budget_bytes={int(b * self.fixed16_serving_bytes())}",
                "search.joint.env_batches=8",
            ]
            if self.static:  # searched after 1 epoch, then retrained from scratch for FIXED's 2 (as AutoDim is)
                search += ["search.joint.from_scratch=true", "search.joint.finetune_epochs=2"]
            path, note = self.train(f"joint-{b:.4f}", search)
            p = self.add("joint", "mixed", b, path, note)
            if seeds and b == HEADLINE and path is not None:
                self.seeded(p, f"joint-{b:.4f}", search, None)
        if not self.static and "md" in self.methods:
            for b, dtype in [(1 / 2, "fp32"), (1 / 2, "int8"), (1 / 4, "int8"), (1 / 8, "int8")]:
                if self.quick and dtype == "fp32":
                    continue
                path, note = self.train(f"md-{dtype}-{b:.4f}", self.md_search(b, dtype))
                self.add("MD", dtype, b, path, note)
        elif not self.quick and "autodim" in self.methods:
            for b in (1 / 2, 1 / 4):
                search = ["search.method=autodim", f"search.budget={int(b * self.fixed16_parameters())}"]
                path, note = self.train(f"autodim-{b:.4f}", search)
                self.add("AutoDim", "fp32", b, path, note)
        scored = [p for p in self.points if p.bundle is not None]
        results = self.score([p.bundle for p in scored if p.bundle is not None], "seed0")
        full = reference_bytes(reference, results, scored)
        for p, (auc, loss, nbytes) in zip(scored, results, strict=True):
            p.auc.insert(0, auc)
            p.log_loss.insert(0, loss)
            p.fraction = nbytes / full
            p.within_budget = p.budget is None or p.fraction <= p.budget + 1e-12
        if self.later:  # the other seeds' bundles, scored on the same rows
            results = self.score([b for _, b in self.later], "seeds")
            for (p, _), (auc, loss, nbytes) in zip(self.later, results, strict=True):
                p.auc.append(auc)
                p.log_loss.append(loss)
                p.within_budget = p.within_budget and (p.budget is None or nbytes / full <= p.budget + 1e-12)

    def compressed(self, fixed: dict[int, list[Path]], budgets: tuple[float, ...]) -> None:
        """The delivered plan at every budget and seed (`jobs.compress` over that seed's FIXED-d runs, verified on
        held-out rows), and each compressed baseline family tuned on the same rows, at the same seeds."""
        from jobs.compress import deliver, score_candidates
        from search.compress import fraction_label

        texts = [f"{fraction_label(b)} of fixed-16 fp32" for b in budgets]
        selection = {"verify_split": "valid"} if self.static else {"verify_days": self.verify_days}
        points: dict[tuple[str, float], Point] = {}
        for seed, runs in sorted(fixed.items()):
            start = time.perf_counter()
            scorings = score_candidates(
                runs,
                texts,
                verify_rows=VERIFY_ROWS,
                row_alignment=ALIGNMENT,
                **selection,  # type: ignore[arg-type]
            )
            self.seconds += time.perf_counter() - start
            for b, scoring in zip(budgets, scorings, strict=True):
                for family, names in {"delivered": None, **FAMILIES}.items():
                    among = None if names is None else (lambda r, names=names: r.name in names)
                    if not [o for o in scoring.options if among is None or among(o.recipe)]:
                        if seed == 0:
                            self.points.append(Point(self.name, family, "-", b, note="no candidate fits"))
                        continue
                    best, scored = scoring.best(among)
                    tag = f"{family}-{b:.5f}-s{seed}"
                    start = time.perf_counter()
                    bundle = self.work / "bundles" / tag
                    deliver(scoring, best, scored, bundle, overwrite=True)
                    self.seconds += time.perf_counter() - start
                    if seed:
                        if (family, b) in points:
                            self.later.append((points[family, b], bundle))
                        continue
                    label = best.candidate.recipe.label
                    p = Point(self.name, family, "mixed", b, bundle=bundle)
                    p.detail = f"{scoring.runs[best.candidate.run].name} {label}"
                    if family == "delivered":
                        uniform = [o.metrics[scoring.metric] for o in scoring.options if o.recipe.name == "uniform"]
                        p.validation = {
                            "delivered": best.metrics[scoring.metric],
                            "best_uniform": max(uniform) if uniform else float("nan"),
                        }
                    points[family, b] = p
                    self.points.append(p)

    def fixed16_serving_bytes(self) -> int:
        from sharding.plan import DimensionPlan

        return DimensionPlan.load(self.work / "runs" / "fixed16" / "plan").serving_bytes

    def fixed16_parameters(self) -> int:
        from sharding.plan import DimensionPlan

        return DimensionPlan.load(self.work / "runs" / "fixed16" / "plan").parameters

    def md_search(self, fraction: float, dtype: str) -> list[str]:
        """MD at `fraction` of FIXED-16 fp32's serving bytes: the other fields at the budget's uniform dim, the
        parameter budget that serves within the bytes (fp32: bytes / 4; int8: the rows' scale and bias and the
        fp32 projections off first)."""
        from jobs.train import table_capacities
        from pipeline.dataset import Dataset

        capacity = table_capacities(Dataset(self.data), None)
        rows = sum(capacity.values())
        nbytes = int(fraction * rows * 64)
        per_dim = 4 if dtype == "fp32" else 1
        other = max(4, min(16, int((fraction * 64 - (0 if dtype == "fp32" else 4)) / per_dim) // 4 * 4))
        projections = 2 * 16 * (4 + 8 + 12 + 16)  # the most 4 blocks per feature can project (d x 16 each)
        parameters = nbytes // 4 if dtype == "fp32" else nbytes - 4 * rows - 3 * projections
        search = ["search.method=md", "search.dim=16", f"search.other_dim={other}", f"search.budget={parameters}"]
        return search + ([f"search.dtype={dtype}"] if dtype != "fp32" else [])


def reference_bytes(reference: Point, results: list[tuple[float, float, int]], scored: list[Point]) -> int:
    return next(r[2] for p, r in zip(scored, results, strict=True) if p is reference)


def _label(p: Point) -> str:
    return f"FIXED {p.dtype}" if p.method.startswith("FIXED") else p.method


BASELINES = ("MD", *FAMILIES)  # with every FIXED-d × dtype: what the delivered plan must match or beat


def print_dataset(points: list[Point], reference: Point) -> None:
    ref = reference.mean_auc
    print(f"\n{points[0].dataset}: AUC on the held-out rows as served (FIXED-16 fp32 {ref:.4f})")
    print(f"{'method':<12}{'dtype':<7}{'budget':>8}{'bytes':>8}{'AUC':>9}{'± seeds':>9}{'log loss':>10}{'Δ AUC':>9}")
    for p in sorted(points, key=lambda p: (np.nan_to_num(p.fraction, nan=9), p.method)):
        budget = "-" if p.budget is None else f"1/{round(1 / p.budget)}"
        if not p.auc:
            print(f"{p.method:<12}{p.dtype:<7}{budget:>8}{'-':>8}  infeasible: {p.note}")
            continue
        spread = f"{np.std(p.auc):.4f}" if len(p.auc) > 1 else ""
        flag = "" if p.within_budget else "  OVER BUDGET"
        print(
            f"{p.method:<12}{p.dtype:<7}{budget:>8}{p.fraction:>8.4f}{p.mean_auc:>9.4f}{spread:>9}"
            f"{np.mean(p.log_loss):>10.4f}{p.mean_auc - ref:>+9.4f}{flag}  {p.detail}"
        )


def plot(points: list[Point], reference: Point, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label in dict.fromkeys(_label(p) for p in points):
        line = sorted((p.fraction, p.mean_auc) for p in points if _label(p) == label and p.auc)
        if line:
            bold = label == "delivered"
            ax.plot(
                *zip(*line, strict=True), marker="o", label=label, linewidth=2.5 if bold else 1, zorder=3 if bold else 2
            )
    ax.axhline(reference.mean_auc - WITHIN, color="grey", linestyle=":", label="FIXED-16 fp32 − 0.001")
    ax.set_xscale("log")
    ax.set_xlabel("serving bytes / FIXED-16 fp32's")
    ax.set_ylabel("AUC (held out, as served)")
    ax.set_title(f"{points[0].dataset}: the memory–quality frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def headline(points: list[Point], reference: Point) -> dict[str, float]:
    """Per method (line), the smallest byte fraction whose AUC is within 0.001 of FIXED-16 fp32's (nan: none)."""
    out: dict[str, float] = {}
    for label in dict.fromkeys(_label(p) for p in points):
        good = [
            p.fraction for p in points if _label(p) == label and p.auc and p.mean_auc >= reference.mean_auc - WITHIN
        ]
        out[label] = min(good) if good else float("nan")
    return out


def dominance(points: list[Point]) -> list[tuple[float, float, float]]:
    """Per budget joint ran at: (budget, joint's AUC, the best baseline's AUC within that budget)."""
    rows = []
    for j in (p for p in points if p.method == "joint" and p.auc and p.budget is not None):
        assert j.budget is not None
        base = [
            p.mean_auc
            for p in points
            if (p.method.startswith("FIXED") or p.method == "MD") and p.auc and p.fraction <= j.budget + 1e-12
        ]
        rows.append((j.budget, j.mean_auc, max(base) if base else float("nan")))
    return rows


def best_baseline(points: list[Point], budget: float) -> Point | None:
    """The baseline (FIXED-d × dtype, MD, a compressed family) with the best mean AUC within `budget`."""
    fits = [
        p
        for p in points
        if (p.method.startswith("FIXED") or p.method in BASELINES) and p.auc and p.fraction <= budget + 1e-12
    ]
    return max(fits, key=lambda p: p.mean_auc, default=None)


def delivered_targets(name: str, points: list[Point], reference: Point) -> tuple[list[str], list[str]]:
    """Issue 26's targets for the delivered plans: (printed lines, RESULT parts)."""
    tol = float(np.std(reference.auc)) if len(reference.auc) > 1 else 0.0
    lines, parts = [], []
    key = name.replace("-", "_")
    beaten = checked = 0
    test_vs_uniform = []
    for p in sorted(
        (p for p in points if p.method == "delivered" and p.budget is not None), key=lambda p: -(p.budget or 0)
    ):
        assert p.budget is not None
        label = f"1/{round(1 / p.budget)}"
        if not p.auc:
            lines.append(f"  {label}: no delivered plan ({p.note})")
            continue
        base = best_baseline(points, p.budget)
        spread = f" ± {np.std(p.auc):.4f}" if len(p.auc) > 1 else ""
        line = f"  {label}: delivered {p.mean_auc:.4f}{spread} ({p.detail})"
        if base is None:
            line += "; no baseline fits"
        else:
            checked += 1
            ok = p.mean_auc >= base.mean_auc - tol
            beaten += ok
            line += (
                f"; best baseline {base.method} {base.dtype} {base.detail} {base.mean_auc:.4f} "
                f"({p.mean_auc - base.mean_auc:+.4f}, {'met' if ok else 'MISSED'})"
            )
        uniform = [q for q in points if q.method.startswith("FIXED") and q.auc and q.fraction <= p.budget + 1e-12]
        if uniform and p.validation:
            u = max(uniform, key=lambda q: q.mean_auc)
            test_vs_uniform.append(p.auc[0] >= u.auc[0])
            line += (
                f"; validation {p.validation['delivered']:.4f} vs best uniform {p.validation['best_uniform']:.4f}, "
                f"test (seed 0) {p.auc[0]:.4f} vs {u.method} {u.dtype} {u.auc[0]:.4f}"
            )
        target = WITHIN_TARGETS.get((name, p.budget))
        if target is not None:
            gap = reference.mean_auc - p.mean_auc
            ok = gap <= target
            line += f"; within {target} of FIXED-16 fp32: {'met' if ok else 'MISSED'} (gap {gap:+.4f})"
            parts.append(f"{key}_target_within_{target}_at_{label}={'met' if ok else 'missed'}")
        lines.append(line)
    parts.append(f"{key}_delivered_at_or_above_best_baseline={beaten}/{checked}")
    parts.append(f"{key}_delivered_test_at_or_above_best_uniform={sum(test_vs_uniform)}/{len(test_vs_uniform)}")
    parts.append(f"{key}_fixed16_std={tol:.4f}")
    return lines, parts


def prepare(name: str, work: Path, rows: int, days: int, max_cardinality: int) -> Path | None:
    root = datasets_root()
    if name == "criteo-synthetic":
        from pipeline.criteo_synthetic import CriteoSyntheticConfig, write_criteo_synthetic

        cfg = CriteoSyntheticConfig(
            days=days,
            rows_per_day=rows // days,
            chunk_rows=min(1_000_000, rows // days),
            max_cardinality=max_cardinality,
        )
        return write_criteo_synthetic(cfg, work / "data-criteo")
    src = root / ("ml-1m" if name == "ml-1m" else "ml-latest-small")
    if not src.is_dir():
        print(f"skip {name}: {src} not found (licensed data is read from ../shared/datasets)")
        return None
    if name == "ml-1m":
        from pipeline.ingest import ingest

        return ingest("ml-1m", src, work / "data-ml-1m")
    from benchmarks.streaming import segmented_ml_latest

    return segmented_ml_latest(work / "data-ml-latest")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontier", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small Criteo-like stream only, one seed")
    parser.add_argument("--rows", type=int, default=None, help="rows of the Criteo-like stream (full: 6,000,000)")
    parser.add_argument("--days", type=int, default=None, help="its days (the last is scored; full: 4)")
    parser.add_argument("--max-cardinality", type=int, default=1_000_000, help="ids of its largest field")
    parser.add_argument("--datasets", default=None, help="comma-separated subset of ml-1m,ml-latest,criteo-synthetic")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "frontier")
    parser.add_argument("--work", type=Path, default=None, help="parent of the temporary work directory")
    parser.add_argument(
        "--joint-dim", type=int, default=32, help="joint's search.dim: trained first, its widest candidate (16 or 32)"
    )
    parser.add_argument(
        "--verify-rows", type=int, default=VERIFY_ROWS, help="rows each compressed candidate is scored on"
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (fixed always runs)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    if unknown := sorted(set(methods) - set(METHODS)):
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    rows = args.rows or (120_000 if args.quick else 6_000_000)
    days = args.days or (3 if args.quick else 4)
    names = (args.datasets or ("criteo-synthetic" if args.quick else "ml-1m,ml-latest,criteo-synthetic")).split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    parts: list[str] = []
    all_points: dict[str, tuple[list[Point], Point]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-frontier-", dir=args.work) as tmp:
        for name in names:
            data = prepare(name, Path(tmp), rows, days, args.max_cardinality)
            if data is None:
                continue
            bench = Bench(name, data, Path(tmp) / name, args.quick, args.joint_dim, methods)
            bench.verify_rows = args.verify_rows
            bench.run()
            reference = next(p for p in bench.points if p.method == "FIXED-16" and p.dtype == "fp32")
            all_points[name] = (bench.points, reference)
            print_dataset(bench.points, reference)
            plot(bench.points, reference, args.out / f"frontier-{name}.png")
            shutil.copytree(bench.report, args.out / f"report-{name}", dirs_exist_ok=True)
            print(f"({name}: {bench.seconds:.0f} s; plot and report in {args.out})")
            head = headline(bench.points, reference)
            print("smallest byte fraction within 0.001 AUC of FIXED-16 fp32: " + ", ".join(
                f"{k} {v:.4f}" for k, v in head.items()))  # fmt: skip
            if "compress" in methods:
                print("the delivered plan (jobs.compress over the FIXED-d runs, verified on held-out rows):")
                lines, more = delivered_targets(name, bench.points, reference)
                print("\n".join(lines))
                parts += more
            dom = dominance(bench.points)
            for b, j, base in dom:
                print(
                    f"  budget 1/{round(1 / b)}: joint {j:.4f} vs best baseline within it {base:.4f} ({j - base:+.4f})"
                )
            key = name.replace("-", "_")
            best = min(head.values(), default=float("nan"))
            parts += [
                f"{key}_fixed16_auc={reference.mean_auc:.4f}",
                f"{key}_joint_smallest_within={head.get('joint', float('nan')):.4f}",
            ]
            parts.append(f"{key}_best_smallest_within={best:.4f}")
            if name in ("ml-1m", "criteo-synthetic") and "compress" not in methods:
                parts.append(f"{key}_target_within_0.001_at_1/8={'met' if best <= HEADLINE + 1e-12 else 'missed'}")
            if "joint" in methods:
                dominated = all(j >= base - 1e-12 for _, j, base in dom if not np.isnan(base))
                parts.append(f"{key}_target_joint_at_or_above_baselines={'met' if dominated else 'missed'}")
            over = sum(not p.within_budget for p in bench.points if p.auc)
            parts.append(f"{key}_over_budget={over}")
    print(f"(total {time.perf_counter() - start:.0f} s; Criteo-like stream {rows:,} rows over {days} days)")
    print("RESULT frontier: " + " ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
