"""Row-level searches on MovieLens-1M under the CIESS protocol (methods.md §5.4–5.5): FULL, ES, MR, ESAPN, SCALL, CIESS.

Run (figures go to BENCHMARKS.md)::

    python -m benchmarks.ciess_ml1m                   # all methods, sparsity 80/90/95%
    python -m benchmarks.ciess_ml1m --quick           # 90% only, short training and searches (< 10 min)
    python -m benchmarks.ciess_ml1m --methods full,es,mr --cache /tmp/ciess.json   # a subset; rows are cached

Protocol: ML-1M (`../shared/datasets/ml-1m`, every rating an implicit positive), per-user stratified 50/25/25
split (seed 0), LightGCN (3 layers, BPR, decay 1e-4), d_max 128, kept parameters ≤ (1 − c)·128·(|U| + |V|).
Searches see only the validation mode (train → valid): CIESS 10 episodes × 10 iterations and SCALL up to 40 steps on
a supernet pretrained for 600 batches (`search.rowlevel.SupernetEnv`), ESAPN one streaming pass of 500 batches
(its controller re-predicts through the whole graph, so each batch costs several LightGCN steps). Every final plan
is materialised as bucket tables (a TorchRec `EmbeddingBagCollection`) and retrained from scratch in test mode
(train ∪ valid → test) with CIESS's official recipe (2,000 BPR batches of 10,000 triples, Adam 0.03 ×0.9 every
200 batches), then ranked over all items with training items masked: Recall@5/20, NDCG@5/20. Rows list kept
(logical) and physical parameters and the search and retrain wall times.

Targets: ES within ±5% of the paper's ES row (Recall@20 0.2248 / 0.2105 / 0.1752: the check that model, split and
metric are right); CIESS and SCALL at or above the paper's CIESS row (Recall@20 0.2436 / 0.2248 / 0.2009, NDCG@20
0.4257 / 0.4023 / 0.3664) at the same budgets. The last line is `RESULT ciess_ml1m: key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.lightgcn import BPRRecipe, GraphTask, train_bpr
from pipeline.dataset import Dataset
from pipeline.ingest import ingest
from pipeline.interactions import Interactions, interactions
from pipeline.splits import per_user_split
from search.rowlevel import BucketedTables, MaskedTable, SupernetEnv, kept_budget, random_sizes, row_plan, uniform_sizes
from sharding.plan import DimensionPlan

REPO = Path(__file__).resolve().parents[1]
D_MAX = 128
SPARSITIES = (0.8, 0.9, 0.95)
METHODS = ("full", "es", "mr", "esapn", "scall", "ciess")
PAPER_ES_R20 = {0.8: 0.2248, 0.9: 0.2105, 0.95: 0.1752}
PAPER_CIESS = {0.8: (0.2436, 0.4257), 0.9: (0.2248, 0.4023), 0.95: (0.2009, 0.3664)}
ES_TOLERANCE = 0.05


@dataclass
class Row:
    method: str
    sparsity: float | None  # the budget's target; None for FULL and for ESAPN (which cannot target one)
    recall5: float
    recall20: float
    ndcg5: float
    ndcg20: float
    kept: int  # logical parameters (Σ row dims, + learned projections)
    physical: int  # parameters as stored (bucket tables of ceil4(dim) columns, + projections)
    reached: float  # 1 − kept / (128·(U + I))
    search_seconds: float
    retrain_seconds: float
    note: str = ""


@dataclass(frozen=True)
class Settings:
    sparsities: tuple[float, ...]
    retrain: BPRRecipe
    supernet: BPRRecipe
    ciess_episodes: int
    ciess_iterations: int
    scall_steps: int
    esapn_steps: int


FULL_SETTINGS = Settings(SPARSITIES, BPRRecipe(), BPRRecipe(steps=600, decay_every=60), 10, 10, 40, 500)
QUICK_SETTINGS = Settings(
    (0.9,), BPRRecipe(steps=200, decay_every=20), BPRRecipe(steps=150, decay_every=15), 2, 4, 6, 40
)


def datasets_root() -> Path:
    return Path(os.environ.get("DIMSEARCH_DATASETS", REPO.parent / "shared" / "datasets"))


def load_ml1m(work: Path) -> Interactions:
    data = ingest("ml-1m", datasets_root() / "ml-1m", work / "ml-1m")
    dataset = Dataset(data)
    return interactions(dataset, per_user_split(dataset, (0.5, 0.25, 0.25), seed=0))


def retrain(plan: DimensionPlan, task: GraphTask, recipe: BPRRecipe, seed: int) -> tuple[dict[str, float], float]:
    """Train a fresh LightGCN on the plan's bucket tables (init N(0, 0.1) through a masked table of the same sizes)
    and evaluate it; returns the mean metrics and the wall time."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    tables = BucketedTables(plan)
    init = MaskedTable(task.num_users, task.num_items, D_MAX, generator)
    sizes = [np.minimum(np.asarray(plan[f].row_dims), D_MAX) for f in ("user", "item")]
    init.set_sizes(*sizes)
    tables.load_from_masked(init)
    padded = all(f.projection == "pad" for f in plan.features)
    width = tables.width if padded else None

    def progress(step: int) -> None:
        if (step + 1) % 500 == 0:
            print(f"    retrain {step + 1}/{recipe.steps} batches, {time.perf_counter() - start:.0f}s", flush=True)

    train_bpr(task, tables, tables.parameters(), recipe, generator, width, progress)
    with torch.no_grad():
        metrics = task.evaluate(tables(), (5, 20), width)
    return {k: float(v.nanmean()) for k, v in metrics.items()}, time.perf_counter() - start


def make_row(
    method: str,
    sparsity: float | None,
    plan: DimensionPlan,
    test: GraphTask,
    recipe: BPRRecipe,
    search_seconds: float,
    note: str = "",
) -> Row:
    metrics, seconds = retrain(plan, test, recipe, seed=1)
    total = D_MAX * test.num_nodes
    row = Row(
        method,
        sparsity,
        metrics["recall@5"],
        metrics["recall@20"],
        metrics["ndcg@5"],
        metrics["ndcg@20"],
        plan.logical_parameters,
        plan.parameters,
        1.0 - plan.logical_parameters / total,
        search_seconds,
        seconds,
        note,
    )
    print(
        f"  {method:<6} c={sparsity}  R@20 {row.recall20:.4f}  N@20 {row.ndcg20:.4f}  reached {row.reached:.3f}  "
        f"search {search_seconds:.0f}s retrain {seconds:.0f}s",
        flush=True,
    )
    return row


class Bench:
    """Runs each (method, sparsity) once, caching rows in a JSON file so a long run can be split."""

    def __init__(self, inter: Interactions, settings: Settings, cache: Path | None) -> None:
        self.inter, self.settings, self.cache = inter, settings, cache
        self.valid = GraphTask(inter.splits["train"], inter.splits["valid"], inter.num_users, inter.num_items)
        self.test = GraphTask(inter.merged("train", "valid"), inter.splits["test"], inter.num_users, inter.num_items)
        self.freq = inter.frequencies("train")
        self.rows: dict[str, Row] = {}
        if cache is not None and cache.is_file():
            self.rows = {k: Row(**v) for k, v in json.loads(cache.read_text()).items()}
        self._env: SupernetEnv | None = None
        self.env_seconds = 0.0

    @property
    def num_rows(self) -> int:
        return self.inter.num_users + self.inter.num_items

    def env(self) -> SupernetEnv:
        """The searches' environment; its supernet is saved beside the cache and reused by later runs."""
        if self._env is None:
            start = time.perf_counter()
            saved = None if self.cache is None else self.cache.with_suffix(".supernet.pt")
            if saved is not None and saved.is_file():
                state = torch.load(saved)
                self._env = SupernetEnv(self.valid, D_MAX, self.settings.supernet, seed=0, weights=state["weights"])
                self.env_seconds = float(state["seconds"])
                print(f"  supernet loaded from {saved} (pretrained in {self.env_seconds:.0f}s)", flush=True)
            else:
                self._env = SupernetEnv(self.valid, D_MAX, self.settings.supernet, seed=0)
                self.env_seconds = time.perf_counter() - start
                print(f"  supernet pretrained in {self.env_seconds:.0f}s", flush=True)
                if saved is not None:
                    torch.save({"weights": self._env.supernet, "seconds": self.env_seconds}, saved)
        return self._env

    def budget(self, sparsity: float) -> int:
        return kept_budget(sparsity, self.num_rows, D_MAX)

    def split(self, sizes: np.ndarray) -> dict[str, np.ndarray]:
        return {"user": sizes[: self.inter.num_users], "item": sizes[self.inter.num_users :]}

    def run(self, method: str, sparsity: float | None, build: Callable[[], tuple[DimensionPlan, float, str]]) -> Row:
        key = f"{method}@{sparsity}"
        if key not in self.rows:
            plan, search_seconds, note = build()
            self.rows[key] = make_row(method, sparsity, plan, self.test, self.settings.retrain, search_seconds, note)
            if self.cache is not None:
                self.cache.write_text(json.dumps({k: asdict(v) for k, v in self.rows.items()}, indent=1))
        return self.rows[key]

    def full(self) -> Row:
        sizes = np.full(self.num_rows, D_MAX)
        return self.run("FULL", None, lambda: (row_plan(self.split(sizes), D_MAX, None), 0.0, ""))

    def es(self, c: float) -> Row:
        sizes = uniform_sizes(self.num_rows, self.budget(c), D_MAX)
        return self.run("ES", c, lambda: (row_plan(self.split(sizes), D_MAX, self.budget(c)), 0.0, f"d={sizes[0]}"))

    def mr(self, c: float) -> Row:
        sizes = random_sizes(self.num_rows, self.budget(c), D_MAX, np.random.default_rng(0))
        return self.run("MR", c, lambda: (row_plan(self.split(sizes), D_MAX, self.budget(c)), 0.0, ""))

    def ciess(self, c: float) -> Row:
        from search.ciess import CiessConfig, ciess_search

        def build() -> tuple[DimensionPlan, float, str]:
            env = self.env()
            config = CiessConfig(
                d_max=D_MAX, episodes=self.settings.ciess_episodes, iterations=self.settings.ciess_iterations
            )
            result = ciess_search(env, *self.freq, self.budget(c), config, seed=0)
            plan = row_plan({"user": result.users, "item": result.items}, D_MAX, self.budget(c), {"method": "ciess"})
            note = f"{result.evaluations} plans evaluated; best valid quality {result.quality:.4f}"
            return plan, result.seconds + self.env_seconds, note

        return self.run("CIESS", c, build)

    def scall(self, c: float) -> Row:
        from search.scall import ScallConfig, scall_search

        def build() -> tuple[DimensionPlan, float, str]:
            env = self.env()
            config = ScallConfig(d_max=D_MAX, max_steps=self.settings.scall_steps)
            result = scall_search(env, *self.freq, self.budget(c), config, seed=0)
            users, items = result.best_user_sizes, result.best_item_sizes
            plan = row_plan({"user": users, "item": items}, D_MAX, self.budget(c), {"method": "scall"})
            note = f"{len(result.history)} env steps; best valid fitness {result.best_fitness:.4f}"
            return plan, result.seconds + self.env_seconds, note

        return self.run("SCALL", c, build)

    def esapn(self) -> Row:
        from search.esapn import EsapnConfig, esapn_plan, esapn_search

        def build() -> tuple[DimensionPlan, float, str]:
            recipe = BPRRecipe(**{**asdict(self.settings.retrain), "steps": self.settings.esapn_steps})
            result = esapn_search(self.valid, EsapnConfig(), recipe, seed=0)
            return (
                esapn_plan(result),
                result.seconds,
                f"kept {result.kept:.3f} of FULL after {self.settings.esapn_steps} batches",
            )

        return self.run("ESAPN", None, build)


def print_table(rows: list[Row]) -> None:
    print(
        f"{'c':>5} {'method':<7}{'R@5':>8}{'R@20':>8}{'N@5':>8}{'N@20':>8}{'kept':>11}{'physical':>11}{'reached':>8}"
        f"{'search s':>9}{'retrain s':>10}  note"
    )
    for r in rows:
        c = "-" if r.sparsity is None else f"{r.sparsity:.0%}"
        print(
            f"{c:>5} {r.method:<7}{r.recall5:>8.4f}{r.recall20:>8.4f}{r.ndcg5:>8.4f}{r.ndcg20:>8.4f}{r.kept:>11,}"
            f"{r.physical:>11,}{r.reached:>8.1%}{r.search_seconds:>9.0f}{r.retrain_seconds:>10.0f}  {r.note}"
        )


def result_line(rows: list[Row], quick: bool) -> str:
    parts = [f"mode={'quick' if quick else 'full'}"]
    by = {(r.method, r.sparsity): r for r in rows}
    for c in SPARSITIES:
        pct = round(c * 100)
        if (es := by.get(("ES", c))) is not None:
            off = es.recall20 / PAPER_ES_R20[c] - 1
            parts += [f"es{pct}_r20={es.recall20:.4f}", f"es{pct}_vs_paper={off:+.1%}"]
            if not quick:
                parts.append(f"es{pct}_target={'met' if abs(off) <= ES_TOLERANCE else 'missed'}")
        for method in ("CIESS", "SCALL"):
            if (r := by.get((method, c))) is not None:
                r20, n20 = PAPER_CIESS[c]
                met = r.recall20 >= r20 and r.ndcg20 >= n20
                parts += [f"{method.lower()}{pct}_r20={r.recall20:.4f}", f"{method.lower()}{pct}_n20={r.ndcg20:.4f}"]
                if not quick:
                    parts.append(f"{method.lower()}{pct}_target={'met' if met else 'missed'}")
    if (esapn := by.get(("ESAPN", None))) is not None:
        parts.append(f"esapn_reached={esapn.reached:.3f}")
    return "RESULT ciess_ml1m: " + " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ciess_ml1m", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="90%% only, short training and searches (< 10 min)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--cache", type=Path, help="JSON file caching finished rows (resume a split run)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad := sorted(set(methods) - set(METHODS)):
        parser.error(f"unknown methods {bad}; choose from {METHODS}")
    if not (datasets_root() / "ml-1m").is_dir():
        print(f"skip: {datasets_root() / 'ml-1m'} not found (licensed data is read from ../shared/datasets)")
        return 0
    if "OMP_NUM_THREADS" not in os.environ:  # set it to split the cores between runs
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    settings = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    if args.quick:
        full = FULL_SETTINGS
        print(
            f"QUICK MODE: sparsity 90% only, retrain {settings.retrain.steps} batches (full: {full.retrain.steps}), "
            f"supernet {settings.supernet.steps} (full: {full.supernet.steps}), CIESS "
            f"{settings.ciess_episodes}×{settings.ciess_iterations} iterations (full: {full.ciess_episodes}×"
            f"{full.ciess_iterations}), SCALL {settings.scall_steps} steps (full: {full.scall_steps}), ESAPN "
            f"{settings.esapn_steps} batches (full: {full.esapn_steps}) — figures are not comparable with the paper's"
        )
    # force: importing torchrec has already given the root logger a handler, and basicConfig would do nothing.
    logging.basicConfig(level=logging.INFO, format="  %(message)s", force=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ciess-") as tmp:
        bench = Bench(load_ml1m(Path(tmp)), settings, args.cache)
    print(f"ML-1M: {bench.inter.num_users} users, {bench.inter.num_items} items, splits "
          f"{ {k: v[0].size for k, v in bench.inter.splits.items()} }", flush=True)  # fmt: skip
    # Priority order (each row is cached as it finishes, so a run cut short keeps what it measured): the baselines,
    # then the searches at 90%, then the other budgets.
    jobs: list[tuple[str, float | None]] = [("full", None)]
    jobs += [(m, c) for m in ("es", "mr") for c in settings.sparsities]
    middle = [c for c in settings.sparsities if c == 0.9] or list(settings.sparsities[:1])
    jobs += [(m, c) for c in middle for m in ("ciess", "scall")]
    jobs += [("ciess", c) for c in settings.sparsities if c not in middle] + [("esapn", None)]
    jobs += [("scall", c) for c in settings.sparsities if c not in middle]
    rows: list[Row] = []
    for method, c in jobs:
        if method in methods:
            rows.append(getattr(bench, method)() if c is None else getattr(bench, method)(c))
    order = {m.upper(): i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r.sparsity or 0.0, order[r.method.upper()]))
    print_table(rows)
    print(f"total wall time {time.perf_counter() - start:.0f}s on {os.cpu_count()} cores")
    print(result_line(rows, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
