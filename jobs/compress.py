"""Compress trained runs into the best plan for a serving-byte budget, verified on held-out rows, and export it.

    python -m jobs.compress --run runs/fixed8 --run runs/fixed16 --budget "1/16 of fixed-16 fp32" \\
        --verify-split valid --out plans/compressed-16
    python -m jobs.compress --run runs/stream16 --budget 1500000 --verify-days 7 --out plans/stream-1.5mb

Each run (a field-level plan: `fixed`, `uniform-budget`, `autodim`, `joint`) is compressed after training by every
recipe of `search.compress` (uniform dtypes, admission, hashing, CAFE-style splits, two-tier row-level dtypes) to
fit the budget; each candidate is scored as it would be served (its rows dequantised, its unstored rows read from
their shared rows) on the verification rows; the best (`search.verify`) is exported as a bundle (`jobs.export`)
that `jobs.evaluate` scores as served. The candidate set holds every uniform FIXED-d × dtype plan of the runs that
fits, so on the verification rows the delivered plan is never worse than the best of them.

The budget (`--budget`) is serving bytes: a number, or a fraction of a uniform reference plan over the runs'
tables (`1/16 of fixed-16 fp32`; `sharding.budget.BUDGET_SYNTAX`); the resolved figure is logged and saved in the
bundle's plan provenance under `compress`, with every candidate's score.

Verification rows must be held out from what the plan is finally reported on: `--verify-split valid` for a run
trained on a static split (the test split is refused), or `--verify-days` naming days other than the scored ones
on a stream. `--verify-rows` caps the rows scored (the fidelity).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from jobs.config import ConfigError
from jobs.evaluate import EvaluationError, select_data
from jobs.export import BUNDLE_OUTPUT, EBC_PREFIX, REPO, BundleError, ExportError, export, run_inputs
from jobs.logs import setup_logging
from jobs.runs import LoadedRun, load_run
from models.scoring import Scorer, score
from pipeline.dataset import check_output_dir
from pipeline.errors import DatasetError
from pipeline.stream import DayStream, StreamConfig
from search.compress import Candidate, Recipe, compress, rank_rows, recipes
from search.verify import Scored, VerificationError, verify
from sharding.budget import BudgetRequest, parse_budget
from sharding.plan import ROW_ALIGNMENTS, Budget, DimensionPlan, PlanError

logger = logging.getLogger(__name__)

GPU16_TOPOLOGY = REPO / "jobs/configs/topology/gpu16x80.yaml"


class CompressError(ValueError):
    """Runs that cannot be compressed together, or a verification selection that is not held out."""


@dataclass
class Option:
    """One candidate: a run and a recipe that fits the budget, with what it costs and scores (its tables are
    rebuilt for the one delivered: keeping every candidate's would hold a copy of the tables per recipe)."""

    run: int  # index into the runs
    recipe: Recipe
    serving_bytes: int
    stored_share: float
    metrics: dict[str, float]


@dataclass
class Scoring:
    """Every candidate of one budget, scored on the verification rows (`score_candidates`).

    Args:
        request: the budget as given.
        budget: the resolved budget in serving bytes.
        options: the candidates that fit, scored (the runs' order, then the recipes').
        runs: the run directories, by `Option.run`.
        verification: what the candidates were scored on.
        row_alignment: the bytes every served row is padded to.
    """

    request: BudgetRequest
    budget: int
    options: list[Option]
    runs: list[Path]
    verification: dict[str, Any]
    row_alignment: int

    @property
    def metric(self) -> str:
        return str(self.verification["metric"])

    def best(self, among: Callable[[Recipe], bool] | None = None) -> tuple[Scored[Option], list[Scored[Option]]]:
        """The verified best (`search.verify`) of all candidates, or of those whose recipe `among` accepts."""
        options = [o for o in self.options if among is None or among(o.recipe)]
        return verify(
            options, lambda o: o.metrics, lambda o: o.serving_bytes, self.metric,
            f"the budget of {self.budget:,} serving bytes ({self.request.text!r})",
        )  # fmt: skip


@dataclass
class CompressResult:
    """What `compress_runs` delivered.

    Args:
        out: the bundle written.
        budget: the resolved budget in serving bytes.
        best: the delivered candidate, scored.
        scored: every candidate, scored (the runs' order, then the recipes').
        candidate: the delivered candidate's plan and tables.
        runs: the run directories, by `Option.run`.
    """

    out: Path
    budget: int
    best: Scored[Option]
    scored: list[Scored[Option]]
    candidate: Candidate
    runs: list[Path] = field(default_factory=list)


def _batches(run: LoadedRun, days: str | None, split: str | None, max_rows: int) -> list[Batch]:
    selection = select_data(run, days, split)
    stream = DayStream(
        selection.dataset, run.vocab, StreamConfig(batch_size=8192, chunk_rows=run.cfg.data.chunk_rows),
        row_filter=selection.row_filter,
    )  # fmt: skip
    out: list[Batch] = []
    rows = 0
    for day in selection.days:
        for _, batch in stream.batches_with_rows(day, grow=False):
            out.append(batch)
            rows += int(batch.labels.numel())
            if rows >= max_rows:
                return out
    return out


def _score(run: LoadedRun, batches: Sequence[Batch], candidate: Candidate) -> dict[str, float]:
    """`candidate` scored in the run's fp32 model, every row replaced by the vector it is served as."""
    state = run.model.state_dict()
    for f, rows in candidate.served_rows.items():
        w = state[f"{EBC_PREFIX}t_{f}.weight"]
        w.zero_()
        w[:, : rows.shape[1]] = rows

    def pairs() -> Iterator[tuple[KeyedJaggedTensor | None, Batch]]:
        for b in batches:
            yield None, b

    return score(run.model, pairs(), Scorer(run.dataset.spec.task, keep_scores=True)).exact_metrics()


def _field_weights(run: LoadedRun) -> dict[str, torch.Tensor]:
    if row_level := [f.feature for f in run.plan.features if f.row_level]:
        raise CompressError(
            f"{run.run_dir}: features {row_level} have row-level plans; compression starts from a field-level run "
            "(search.method fixed, uniform-budget, autodim or joint). Fix: compress a field-level run"
        )
    state = run.model.state_dict()
    return {
        f.feature: state[f"{EBC_PREFIX}t_{f.feature}.weight"][:, : f.dim].detach().clone() for f in run.plan.features
    }


def _protected(run_dirs: Sequence[str | Path]) -> dict[str, Path]:
    """The runs and their data, which `--out` may not touch."""
    out: dict[str, Path] = {}
    for i, p in enumerate(run_dirs):
        out.update(run_inputs(p, "--run" if len(run_dirs) == 1 else f"--run #{i + 1}"))
    return out


def _check_request(verify_split: str | None, verify_rows: int, row_alignment: int) -> None:
    if verify_split == "test":
        raise CompressError(
            "--verify-split test: the test split is what the delivered plan is reported on, so choosing on it would "
            "report a selected score. Fix: --verify-split valid"
        )
    if verify_rows < 1:
        raise CompressError(f"--verify-rows is {verify_rows}; it must be >= 1")
    if row_alignment not in ROW_ALIGNMENTS:
        raise CompressError(f"--row-alignment is {row_alignment}, expected one of {list(ROW_ALIGNMENTS)}")


def score_candidates(
    run_dirs: Sequence[str | Path],
    budgets: Sequence[str | int],
    *,
    verify_days: str | None = None,
    verify_split: str | None = None,
    verify_rows: int = 200_000,
    row_alignment: int = 16,
    candidates: Sequence[Recipe] | None = None,
) -> list[Scoring]:
    """Compress each run by every recipe within each budget and score every candidate that fits on the
    verification rows. Each run is loaded, ranked and read once for all budgets.

    Raises:
        CompressError: no run, runs of other features or tables, a row-level run, or the test split as
            verification rows.
        PlanError: a bad budget.
        DatasetError, EvaluationError: as `jobs.evaluate` raises them for the runs or the verification rows.
    """
    paths = [Path(p) for p in dict.fromkeys(str(p) for p in run_dirs)]
    if not paths:
        raise CompressError("no run to compress. Fix: pass --run runs/<name> (several: --run a --run b)")
    _check_request(verify_split, verify_rows, row_alignment)
    requests = [parse_budget(b, "--budget") for b in budgets]
    rows: dict[str, int] = {}
    values: list[int] = []
    options: list[list[Option]] = [[] for _ in requests]
    metric = "auc"
    for i, path in enumerate(paths):  # one run in memory at a time
        run = load_run(path)
        here = {f.feature: f.num_embeddings for f in run.plan.features}
        if not rows:
            rows = here
            values = [r.resolve(rows, "serving_bytes", row_alignment) for r in requests]
            for r, v in zip(requests, values, strict=True):
                logger.info("budget %s (row alignment %d)", r.describe(v, "serving bytes"), row_alignment)
            metric = "auc" if run.dataset.spec.task == "binary" else "mse"
        elif here != rows:
            raise CompressError(
                f"{path}: its tables ({here}) are not {paths[0]}'s ({rows}). Fix: compress runs of one dataset and "
                "capacity together"
            )
        weights = _field_weights(run)
        counts = {f: run.vocab[f].counts for f in rows}
        ranking = rank_rows(weights, counts)
        batches: list[Batch] | None = None
        start = time.perf_counter()
        for k, value in enumerate(values):
            for recipe in candidates or recipes():
                cand = compress(weights, counts, value, recipe, row_alignment, ranking)
                if cand is None:
                    continue
                if batches is None:
                    batches = _batches(run, verify_days, verify_split, verify_rows)
                metrics = _score(run, batches, cand)
                options[k].append(Option(i, recipe, cand.serving_bytes, cand.stored_share, metrics))
                logger.info("%s %s at %s: %s", path.name, recipe.label, requests[k].text,
                            {m: round(v, 4) for m, v in metrics.items()})  # fmt: skip
        logger.info("%s: candidates scored in %.1f s", path.name, time.perf_counter() - start)
        del run
    verification = {"days": verify_days, "split": verify_split, "rows": verify_rows, "metric": metric}
    return [
        Scoring(r, v, o, paths, verification, row_alignment) for r, v, o in zip(requests, values, options, strict=True)
    ]


def deliver(
    scoring: Scoring,
    best: Scored[Option],
    scored: Sequence[Scored[Option]],
    out: str | Path,
    *,
    topology: str | Path = GPU16_TOPOLOGY,
    overwrite: bool = False,
) -> Candidate:
    """Rebuild the candidate `best` of `scoring` and export it as a bundle to `out`, every candidate's score in its
    plan's provenance (under `compress`).

    Raises:
        DatasetError, ExportError: as `jobs.export` raises them.
    """
    check_output_dir(out, kind=BUNDLE_OUTPUT, protected=_protected(scoring.runs), overwrite=overwrite)
    path = scoring.runs[best.candidate.run]
    chosen = load_run(path)
    weights = _field_weights(chosen)
    cand = compress(weights, {f: chosen.vocab[f].counts for f in weights}, scoring.budget, best.candidate.recipe,
                    scoring.row_alignment)  # fmt: skip
    if cand is None:  # it fitted when it was scored, from the same inputs
        raise CompressError(f"{path}: {best.candidate.recipe.label} no longer fits: was the run changed meanwhile?")
    provenance: dict[str, Any] = {
        **chosen.plan.provenance,
        "compress": {
            "budget": {
                "text": scoring.request.text, "serving_bytes": scoring.budget, "row_alignment": scoring.row_alignment,
            },
            "verification": scoring.verification,
            "delivered": {"run": str(path), "recipe": cand.recipe.label, **best.metrics},
            "candidates": [
                {
                    "run": str(scoring.runs[s.candidate.run]),
                    "recipe": s.candidate.recipe.label,
                    "serving_bytes": s.serving_bytes,
                    "stored_share": round(s.candidate.stored_share, 6),
                    **{k: float(v) for k, v in s.metrics.items()},
                }
                for s in scored
            ],
        },
    }  # fmt: skip
    plan = DimensionPlan(
        tuple(cand.features[f] for f in weights), Budget(scoring.budget, "serving_bytes"), chosen.plan.dtype, provenance
    )
    plan.check_budget()
    export(path, topology, out, overwrite=overwrite, compressed=(plan, cand.tables))
    return cand


def compress_runs(
    run_dirs: Sequence[str | Path],
    budget: str | int,
    out: str | Path,
    *,
    verify_days: str | None = None,
    verify_split: str | None = None,
    verify_rows: int = 200_000,
    topology: str | Path = GPU16_TOPOLOGY,
    row_alignment: int = 16,
    candidates: Sequence[Recipe] | None = None,
    overwrite: bool = False,
) -> CompressResult:
    """Compress each run by every recipe within `budget`, verify, and export the best to `out`.

    Raises:
        CompressError: runs of other features or tables, a row-level run, or a verification selection of the test
            split.
        PlanError: a bad budget.
        VerificationError: no candidate fits the budget.
        DatasetError, EvaluationError, ExportError: as `jobs.export` and `jobs.evaluate` raise them.
    """
    _check_request(verify_split, verify_rows, row_alignment)
    parse_budget(budget, "--budget")
    check_output_dir(out, kind=BUNDLE_OUTPUT, protected=_protected(run_dirs), overwrite=overwrite)  # before any work
    (scoring,) = score_candidates(
        run_dirs, [budget], verify_days=verify_days, verify_split=verify_split, verify_rows=verify_rows,
        row_alignment=row_alignment, candidates=candidates,
    )  # fmt: skip
    best, scored = scoring.best()
    cand = deliver(scoring, best, scored, out, topology=topology, overwrite=overwrite)
    return CompressResult(Path(out), scoring.budget, best, scored, cand, scoring.runs)


def format_candidates(result: CompressResult) -> str:
    """The candidates as a table, best first by the verification metric, the delivered one marked."""
    metric = "auc" if "auc" in result.best.metrics else "mse"
    sign = -1 if metric == "auc" else 1
    rows = sorted(result.scored, key=lambda s: sign * s.metrics[metric])
    lines = [f"{'':2}{'run':<16}{'candidate':<34}{'bytes':>13}{'stored':>8}{metric:>9}{'log loss':>10}"]
    for s in rows:
        mark = "*" if s is result.best else ""
        lines.append(
            f"{mark:2}{result.runs[s.candidate.run].name:<16}{s.candidate.recipe.label:<34}"
            f"{s.serving_bytes:>13,}{s.candidate.stored_share:>8.3f}{s.metrics[metric]:>9.4f}"
            f"{s.metrics.get('log_loss', float('nan')):>10.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.compress", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, action="append", required=True, help="a trained field-level run")
    parser.add_argument("--budget", required=True, help="serving bytes, or e.g. '1/16 of fixed-16 fp32'")
    parser.add_argument("--out", type=Path, required=True, help="the bundle directory to write")
    parser.add_argument("--verify-split", default=None, help="valid (runs on a static split)")
    parser.add_argument("--verify-days", default=None, help="days to verify on (not the days you report)")
    parser.add_argument("--verify-rows", type=int, default=200_000, help="the most rows scored per candidate")
    parser.add_argument("--topology", type=Path, default=GPU16_TOPOLOGY, help="topology YAML for the bundle")
    parser.add_argument("--row-alignment", type=int, default=16, choices=ROW_ALIGNMENTS)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out bundle")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        result = compress_runs(
            args.run,
            args.budget,
            args.out,
            verify_days=args.verify_days,
            verify_split=args.verify_split,
            verify_rows=args.verify_rows,
            topology=args.topology,
            row_alignment=args.row_alignment,
            overwrite=args.overwrite,
        )
    except (
        CompressError, PlanError, VerificationError, DatasetError, EvaluationError, ExportError, BundleError,
        ConfigError,
    ) as e:  # fmt: skip
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_candidates(result))
    print(f"budget {result.budget:,} serving bytes; delivered {result.best.candidate.recipe.label} of "
          f"{result.runs[result.best.candidate.run]} ({result.best.serving_bytes:,} bytes)")  # fmt: skip
    print(f"bundle: {result.out}")


if __name__ == "__main__":
    main()
