"""Training throughput of the sharded core (the real job under torchrun) against a plain-PyTorch baseline.

Run (figures go to BENCHMARKS.md)::

    python -m benchmarks.train_throughput           # full: 2 days × 200k synthetic rows, 3 rounds; < 5 min
    python -m benchmarks.train_throughput --quick   # 2 days × 50k rows, 1 round; < 90 s
    python -m benchmarks.train_throughput --work /tmp/bench   # parent of the temporary directory

Both sides train the same model on the same batches: DLRM from `models.factory.build_model` with every
feature at dim 16, on the built-in synthetic stream (users, items, 6 fields, multi-hot tags, 4 dense
columns), batch 2048 per rank, the learning rates of `jobs/configs/demo.yaml`, days in order, prequential
evaluation.

(a) The job: `torchrun --standalone --nproc_per_node=N -m jobs.train` for N = 1 and 2 (env
    `PYTHONHASHSEED=0`, `OMP_NUM_THREADS=1`, `train.checkpoint=false`). Its TorchRec
    `EmbeddingBagCollection` is sharded by DMP and trained with FBGEMM's fused row-wise Adagrad in the
    backward pass, under `TrainPipelineSparseDist`. Throughput and quality come from its `metrics.jsonl`.
(b) The baseline, in this process, `torch.set_num_threads(1)`: one `nn.EmbeddingBag(rows, 16, mode="sum",
    sparse=True)` per feature (the job's table sizes, TorchRec's default init U(±sqrt(1/rows))), the same
    DLRM, loss and `DayStream` batches (same prefetch), `torch.optim.Adagrad` on the sparse tables (the
    job's `sharding.learning_rate`) and on the dense parameters (`model.dense_lr`), a plain step loop.

Measured: examples/s of the training loops over both days (all ranks together; evaluation excluded), and
the quality "after one day of data": the AUC on day 2 evaluated before training on day 2. Each setup runs
`--repeats` times, interleaved (baseline, 1 rank, 2 ranks per round) so background load hits all alike; the
best throughput is reported with that run's AUC. Target: the job ≥ 2× the baseline's examples/s at equal
quality (|ΔAUC| ≤ 0.01), judged separately for 1 and 2 ranks. For information, the dense part alone (the
lookups precomputed) bounds what any embedding layer can gain. The last line is
`RESULT train_throughput: key=value ...`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from jobs.config import JobConfig, load_config
from jobs.train import build_searcher, initial_plan, table_capacities
from models import metrics
from models.factory import build_model
from models.recommender import Recommender
from pipeline.dataset import Dataset
from pipeline.stream import DayStream, StreamConfig
from pipeline.synthetic import SyntheticConfig, write_synthetic
from pipeline.vocab import VocabularySet
from sharding.plan import DimensionPlan

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "demo.yaml"
TORCHRUN = Path(sys.executable).with_name("torchrun")
DIM = 16
BATCH_SIZE = 2048
SPEEDUP_TARGET = 2.0
AUC_TOLERANCE = 0.01
JOB_TIMEOUT_S = 300


@dataclass(frozen=True)
class BenchConfig:
    """The size of a run.

    Args:
        rows_per_day: synthetic rows per day (2 days).
        repeats: rounds; each runs the baseline, the 1-rank job and the 2-rank job once.
    """

    rows_per_day: int
    repeats: int

    def data(self) -> SyntheticConfig:
        """The synthetic stream: 2 days, 10k users, 5k items, 6 fields (other settings at their defaults)."""
        return SyntheticConfig(days=2, rows_per_day=self.rows_per_day, users=10_000, items=5_000, fields=6)


FULL = BenchConfig(rows_per_day=200_000, repeats=3)
QUICK = BenchConfig(rows_per_day=50_000, repeats=1)


@dataclass(frozen=True)
class RunResult:
    """One training run over both days.

    Args:
        setup: what ran.
        ranks: processes (1 for the baseline).
        examples: training examples over all days and ranks.
        train_seconds: wall time of the training loops (the slowest rank's, per day), evaluation excluded.
        day2_auc: AUC on day 2, evaluated before training on it (after one day of training data).
    """

    setup: str
    ranks: int
    examples: int
    train_seconds: float
    day2_auc: float

    @property
    def examples_per_s(self) -> float:
        return self.examples / max(self.train_seconds, 1e-12)


def job_overrides(data: Path, out_dir: Path, name: str) -> list[str]:
    """The `section.key=value` overrides of the job (the baseline reads the same resolved config)."""
    return [
        f"data.path={data}",
        f"data.batch_size={BATCH_SIZE}",
        "data.days=2",
        "data.protocol=prequential",
        "model.name=dlrm",
        "search.method=fixed",
        f"search.dim={DIM}",
        f"train.out_dir={out_dir}",
        f"train.name={name}",
        "train.checkpoint=false",
        "train.device=cpu",
    ]


# ---- (a) the job -------------------------------------------------------------------------------------------
def run_job(ranks: int, data: Path, out_dir: Path, name: str) -> RunResult:
    """Run `jobs.train` under torchrun on `ranks` processes and read its `metrics.jsonl`.

    Raises:
        RuntimeError: the job failed or timed out; the message carries the tail of its output.
    """
    cmd = [
        str(TORCHRUN),
        "--standalone",
        f"--nproc_per_node={ranks}",
        "-m",
        "jobs.train",
        "--config",
        str(CONFIG),
        *job_overrides(data, out_dir, name),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(cmd)} did not finish within {JOB_TIMEOUT_S} s") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    days = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    if len(days) != 2:
        raise RuntimeError(f"{out_dir / name / 'metrics.jsonl'}: expected 2 days, found {len(days)}")
    return RunResult(
        setup=f"sharded fused EBC (jobs.train, torchrun x{ranks})",
        ranks=ranks,
        examples=sum(int(d["train_examples"]) for d in days),
        train_seconds=sum(d["train_examples"] / d["examples_per_s"] for d in days),
        day2_auc=float(days[1]["eval"]["auc"]),
    )


# ---- (b) the plain-PyTorch baseline ------------------------------------------------------------------------
class PlainEmbedding(nn.Module):
    """One `nn.EmbeddingBag(rows, dim, mode="sum", sparse=True)` per feature: a KJT in, `{feature: [B, dim]}`
    out.

    Initialised as TorchRec initialises its tables (uniform in ±sqrt(1/rows)), so both sides start alike.

    Args:
        plan: the job's dimension plan (field-level features only): table sizes and dims.
    """

    def __init__(self, plan: DimensionPlan) -> None:
        super().__init__()
        if any(f.row_level for f in plan.features):
            raise ValueError("PlainEmbedding supports field-level plans only (one table per feature)")
        self.features = plan.feature_names
        self.tables = nn.ModuleDict()
        for f in plan.features:
            bag = nn.EmbeddingBag(
                f.num_embeddings,
                f.output_dim,
                mode="sum",
                sparse=True,
                include_last_offset=True,
            )
            bound = (1.0 / f.num_embeddings) ** 0.5
            nn.init.uniform_(bag.weight, -bound, bound)
            self.tables[f.feature] = bag

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        index = {k: i for i, k in enumerate(kjt.keys())}
        batch = kjt.stride()
        values, lengths = kjt.values(), kjt.lengths()
        value_offsets = kjt.offset_per_key()
        out: dict[str, torch.Tensor] = {}
        for feature in self.features:
            i = index[feature]
            rows = values[value_offsets[i] : value_offsets[i + 1]]
            offsets = F.pad(torch.cumsum(lengths[i * batch : (i + 1) * batch], 0), (1, 0)).to(rows.dtype)
            out[feature] = self.tables[feature](rows, offsets)
        return out


def _plan_and_vocab(cfg: JobConfig, dataset: Dataset) -> tuple[DimensionPlan, VocabularySet]:
    """The job's dimension plan (its table sizes) and a fresh vocabulary capped at those sizes."""
    capacities = table_capacities(dataset, cfg.data.capacity)
    plan = initial_plan(cfg, build_searcher(cfg, dataset.spec), dataset.spec.feature_names, capacities)
    capacity = {f.feature: f.num_embeddings for f in plan.features}
    return plan, VocabularySet(dataset.spec.feature_names, capacity=capacity)


def _baseline_model(cfg: JobConfig, dataset: Dataset, plan: DimensionPlan) -> Recommender:
    torch.manual_seed(cfg.train.seed)
    embedding = PlainEmbedding(plan)
    dense = build_model(
        "dlrm",
        {f.feature: f.output_dim for f in plan.features},
        len(dataset.spec.dense),
        dataset.spec.task,
        dataset.spec.num_classes,
        **cfg.model.options,
    )
    return Recommender(embedding, dense, dataset.spec.task)


def _evaluate_auc(model: Recommender, batches: Iterator[Batch]) -> float:
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in batches:
            _, (_, out, y) = model(batch)
            logits.append(out)
            labels.append(y)
    model.train()
    return float(metrics.auc(torch.cat(logits), torch.cat(labels)))


def run_baseline(cfg: JobConfig) -> RunResult:
    """Train the plain-PyTorch model on the job's data and batches, single process, one torch thread."""
    torch.set_num_threads(1)
    torch.sparse.check_sparse_tensor_invariants.disable()  # the default; said explicitly to silence a warning
    dataset = Dataset(cfg.data.path)
    days = dataset.days[: cfg.data.days] if cfg.data.days else dataset.days
    plan, vocab = _plan_and_vocab(cfg, dataset)
    stream = DayStream(
        dataset,
        vocab,
        StreamConfig(batch_size=cfg.data.batch_size, prefetch=cfg.data.prefetch),
        rank=0,
        world_size=1,
    )
    model = _baseline_model(cfg, dataset, plan)
    sparse = list(model.embedding.parameters())
    dense = list(model.dense_model.parameters())
    optimizers = [
        torch.optim.Adagrad(sparse, lr=cfg.sharding.learning_rate),
        torch.optim.Adagrad(dense, lr=cfg.model.dense_lr),
    ]
    examples, seconds, day2_auc = 0, 0.0, float("nan")
    for index, day in enumerate(days):
        if index == 1:
            day2_auc = _evaluate_auc(model, stream.batches(day, grow=False))
        total_loss = 0.0
        start = time.perf_counter()
        for batch in stream.batches(day, grow=True):
            loss, (detached, _, labels) = model(batch)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            total_loss += float(detached) * labels.numel()  # the job reads the loss every step too
            examples += labels.numel()
        seconds += time.perf_counter() - start
    return RunResult("plain PyTorch (nn.EmbeddingBag sparse + Adagrad)", 1, examples, seconds, day2_auc)


def dense_only_examples_per_s(cfg: JobConfig, steps: int = 60, warmup: int = 5) -> float:
    """Examples/s of the dense part alone (DLRM forward, loss, backward into the pooled embeddings, Adagrad),
    the lookups precomputed outside the timer: what any embedding layer, however fast, is bounded by.

    The ratio of this to the baseline's examples/s is the largest speedup a faster embedding layer can give at
    one core (Amdahl); it is printed for information.
    """
    torch.set_num_threads(1)
    dataset = Dataset(cfg.data.path)
    plan, vocab = _plan_and_vocab(cfg, dataset)
    stream = DayStream(dataset, vocab, StreamConfig(batch_size=cfg.data.batch_size, prefetch=0))
    model = _baseline_model(cfg, dataset, plan)
    optimizer = torch.optim.Adagrad(model.dense_model.parameters(), lr=cfg.model.dense_lr)
    inputs = []
    with torch.no_grad():
        for batch in itertools.islice(stream.batches(dataset.days[0], grow=True), warmup + steps):
            inputs.append((model.embedding(batch.sparse_features), batch.dense_features, batch.labels))
    examples, start = 0, 0.0
    for i, (pooled, dense, labels) in enumerate(inputs):
        if i == warmup:
            examples, start = 0, time.perf_counter()
        embeddings = {k: v.detach().requires_grad_() for k, v in pooled.items()}
        loss = model.loss_fn(model.dense_model(embeddings, dense), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        examples += labels.numel()
    return examples / (time.perf_counter() - start)


# ---- report ------------------------------------------------------------------------------------------------
def verdict(job: RunResult, baseline: RunResult) -> tuple[float, float, bool]:
    """(speedup, ΔAUC, target met) of `job` against `baseline`."""
    speedup = job.examples_per_s / baseline.examples_per_s
    delta = job.day2_auc - baseline.day2_auc
    return speedup, delta, speedup >= SPEEDUP_TARGET and abs(delta) <= AUC_TOLERANCE


def _spread(runs: list[RunResult]) -> str:
    rates = [r.examples_per_s for r in runs]
    return f"{min(rates) / 1e3:.0f}k-{max(rates) / 1e3:.0f}k"


def print_table(runs: dict[int, list[RunResult]], dense_only: float) -> None:
    """The best run of each setup (key 0: the baseline, else the ranks), with the range over rounds, and the
    dense-only ceiling (information)."""
    best = {k: max(v, key=lambda r: r.examples_per_s) for k, v in runs.items()}
    baseline = best[0]
    header = ("setup", "ranks", "examples/s", "range", "day-2 AUC", "speedup vs baseline", "target")
    base = (
        baseline.setup,
        "1",
        f"{baseline.examples_per_s:,.0f}",
        _spread(runs[0]),
        f"{baseline.day2_auc:.4f}",
        "1.00x",
        "-",
    )
    rows = [header, base]
    for ranks in (1, 2):
        job = best[ranks]
        speedup, delta, met = verdict(job, baseline)
        rows.append(
            (
                job.setup,
                str(job.ranks),
                f"{job.examples_per_s:,.0f}",
                _spread(runs[ranks]),
                f"{job.day2_auc:.4f}",
                f"{speedup:.2f}x",
                f"{'met' if met else 'MISSED'} (dAUC {delta:+.4f})",
            )
        )
    ceiling = dense_only / baseline.examples_per_s
    rows.append(
        (
            "dense part only (lookups precomputed)",
            "1",
            f"{dense_only:,.0f}",
            "-",
            "-",
            f"{ceiling:.2f}x (ceiling)",
            "info",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {1, 2, 3, 4, 5}
    for n, r in enumerate(rows):
        pairs = enumerate(zip(r, widths, strict=True))
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs]
        print(" | ".join(cells).rstrip())
        if n == 0:
            print("-+-".join("-" * w for w in widths))


def result_line(baseline: RunResult, jobs: list[RunResult], dense_only: float) -> str:
    """The `RESULT train_throughput: ...` line: headline figures, verdicts and the target."""
    parts = [f"baseline_ex_s={baseline.examples_per_s:.0f}", f"baseline_auc={baseline.day2_auc:.4f}"]
    for job in jobs:
        speedup, delta, met = verdict(job, baseline)
        r = f"r{job.ranks}"
        parts += [
            f"{r}_ex_s={job.examples_per_s:.0f}",
            f"{r}_auc={job.day2_auc:.4f}",
            f"{r}_speedup={speedup:.2f}x",
            f"{r}_dauc={delta:+.4f}",
            f"{r}_target={'met' if met else 'missed'}",
        ]
    parts.append(f"dense_only_ceiling={dense_only / baseline.examples_per_s:.2f}x")
    parts.append(f"target=>={SPEEDUP_TARGET:g}x_at_|dAUC|<={AUC_TOLERANCE:g}")
    return "RESULT train_throughput: " + " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    description = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=description)
    parser.add_argument("--quick", action="store_true", help="2 days x 50k rows, one round (a smoke run)")
    parser.add_argument("--work", type=Path, default=None, help="parent of the temporary directory")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default: 3, or 1 with --quick)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    bench = QUICK if args.quick else FULL
    repeats = args.repeats or bench.repeats
    if not TORCHRUN.exists():
        raise SystemExit(f"torchrun not found next to {sys.executable}; run with the project's venv")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="train_throughput-", dir=args.work))
    try:
        data = write_synthetic(bench.data(), work / "data")
        print(
            f"data: 2 days x {bench.rows_per_day:,} rows, batch {BATCH_SIZE}/rank, dim {DIM}, "
            f"{repeats} round(s); torch {torch.__version__}, Python {platform.python_version()}",
            flush=True,
        )
        cfg = load_config(CONFIG, job_overrides(data, work / "runs", "baseline"))
        runs: dict[int, list[RunResult]] = {0: [], 1: [], 2: []}
        dense_only = 0.0
        for round_ in range(repeats):
            runs[0].append(run_baseline(cfg))
            dense_only = max(dense_only, dense_only_examples_per_s(cfg))
            for ranks in (1, 2):
                runs[ranks].append(run_job(ranks, data, work / "runs", f"r{ranks}-{round_}"))
            for results in runs.values():
                r = results[-1]
                print(
                    f"  round {round_ + 1}: {r.setup}: {r.examples_per_s:,.0f} ex/s, AUC {r.day2_auc:.4f}",
                    flush=True,
                )
        best = {k: max(v, key=lambda r: r.examples_per_s) for k, v in runs.items()}
        print()
        print_table(runs, dense_only)
        print(f"(wall {time.perf_counter() - started:.0f} s)")
        print(result_line(best[0], [best[1], best[2]], dense_only))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
