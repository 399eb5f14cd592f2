"""The streaming training job.

    torchrun --standalone --nproc_per_node=2 -m jobs.train --config jobs/configs/demo.yaml [section.key=value ...]
    torchrun --standalone --nproc_per_node=2 -m jobs.train --config jobs/configs/demo.yaml --resume

Per day (DESIGN.md decision 12): evaluate on the day before training on it (prequential), train on it with
`TrainPipelineSparseDist`, let the searcher look at the day's statistics, reconfigure the tables if it proposes a
new plan, and checkpoint (DCP, atomic). Everything lands in `<train.out_dir>/<train.name>/`: the resolved
`config.yaml`, `metrics.jsonl` (one record per day: loss, AUC/accuracy/MSE, examples/s, embedding bytes per rank,
peak RSS), `plan/` (the current dimension plan) and `checkpoints/day-NNNN/`. `--resume` continues after the last
complete checkpoint; the metrics then match an uninterrupted run's.

Runs on gloo/CPU here and NCCL/GPU where present (`train.device=auto`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import logging
import os
import resource
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch
import torch.distributed as dist
import yaml
from torch.distributed.elastic.multiprocessing.errors import record
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer
from tqdm import tqdm

from jobs.config import JobConfig, load_config
from models import metrics
from models.factory import build_model
from models.recommender import Recommender
from pipeline.dataset import Dataset, Day
from pipeline.stream import DayStream, StreamConfig
from pipeline.vocab import VocabularySet
from search.base import DayStats, FixedSearcher, Searcher
from sharding.checkpoint import (
    full_tensors,
    latest_checkpoint,
    load_checkpoint,
    load_full_weights,
    migrate_weights,
    save_checkpoint,
)
from sharding.distributed import (
    MemoryReport,
    attach_fused_optimizer,
    combined_optimizer,
    plan_sharding,
    shard_model,
)
from sharding.embedding import PlannedEmbedding, RowRemap
from sharding.plan import Budget, DimensionPlan, PlanError

logger = logging.getLogger(__name__)


@dataclass
class DayResult:
    """One day's record in `metrics.jsonl`."""

    day: str
    day_index: int
    eval: dict[str, float]
    train_loss: float
    train_examples: int
    examples_per_s: float
    embedding_bytes_per_rank: list[int]
    embedding_parameters: int
    peak_rss_mb: float
    reconfigured: bool = False


@dataclass
class TrainResult:
    run_dir: Path
    days: list[DayResult] = field(default_factory=list)
    plan: DimensionPlan | None = None


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def build_searcher(cfg: JobConfig) -> Searcher:
    budget = Budget(cfg.search.budget) if cfg.search.budget else None
    return FixedSearcher(cfg.search.dim, budget)


def initial_plan(cfg: JobConfig, searcher: Searcher, features: list[str], capacity: dict[str, int]) -> DimensionPlan:
    """The searcher's starting plan, or the saved plan `search.plan`, checked against the dataset.

    Raises:
        PlanError: the saved plan fails validation, or its features or table sizes do not match the dataset.
    """
    if cfg.search.plan is None:
        return searcher.initial_plan(features, capacity)
    plan = DimensionPlan.load(cfg.search.plan)
    missing, extra = (
        sorted(set(features) - set(plan.feature_names)),
        sorted(set(plan.feature_names) - set(features)),
    )
    if missing or extra:
        raise PlanError(
            f"{cfg.search.plan}: the plan's features do not match the dataset's: the dataset has {missing or 'no'} "
            f"features the plan does not size, and the plan sizes {extra or 'no'} features the dataset lacks. "
            "Use a plan made for this dataset (same feature names), or search again"
        )
    plan.check_vocabulary(capacity)
    return DimensionPlan(tuple(plan[f] for f in features), plan.budget, plan.dtype, plan.provenance)


def table_capacities(dataset: Dataset, capacity: int | None) -> dict[str, int]:
    """Rows per feature table: `capacity`, or the distinct ids in the dataset + 1 (the fallback row).

    Counting over every day (not only the days a run uses) keeps table sizes — and so initialisation — the same
    for a run cut short and the run that resumes it.
    """
    spec = dataset.spec
    if capacity is not None:
        return {f.name: capacity for f in spec.sparse}
    exprs = [
        (pl.col(f.column).explode(empty_as_null=False) if f.multi_hot else pl.col(f.column))
        .drop_nulls()
        .n_unique()
        .alias(f.name)
        for f in spec.sparse
    ]
    counts = dataset.scan().select(exprs).collect().row(0, named=True)
    return {name: int(n) + 1 for name, n in counts.items()}


class Trainer:
    """One run: setup, then per day evaluate → train → search → reconfigure → checkpoint."""

    def __init__(
        self,
        cfg: JobConfig,
        dataset: Dataset,
        days: list[Day],
        device: torch.device,
        searcher: Searcher,
        plan: DimensionPlan,
    ) -> None:
        self.cfg = cfg
        self.dataset, self.days, self.device = dataset, days, device
        assert dist.group.WORLD is not None  # noqa: S101 - the process group is initialised by train()
        self.pg: dist.ProcessGroup = dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.run_dir = cfg.run_dir
        self.features = dataset.spec.feature_names
        self.searcher, self.plan = searcher, plan
        self.vocab = VocabularySet(self.features, capacity={f.feature: f.num_embeddings for f in plan.features})
        self.result = TrainResult(self.run_dir)
        self.next_day = 0

    # ---- setup ---------------------------------------------------------------------------------------------
    def _model(self, plan: DimensionPlan, device: torch.device | str) -> Recommender:
        spec = self.dataset.spec
        torch.manual_seed(self.cfg.train.seed)
        embedding = PlannedEmbedding(plan, device)
        dense = build_model(
            self.cfg.model.name,
            embedding.feature_dims,
            len(spec.dense),
            spec.task,
            spec.num_classes,
            **self.cfg.model.options,
        )
        return Recommender(embedding, dense, spec.task)

    def build(self, plan: DimensionPlan) -> MemoryReport:
        """Build the model for `plan` on meta, plan its sharding under the budget, and wrap it in DMP."""
        meta = self._model(plan, "meta")
        attach_fused_optimizer(meta, self.cfg.sharding)
        sharding_plan, report = plan_sharding(
            meta, self.cfg.sharding, world_size=self.world_size, compute_device=self.device.type, pg=self.pg
        )
        torch.manual_seed(self.cfg.train.seed + self.rank)
        self.dmp: DistributedModelParallel = shard_model(meta, sharding_plan, self.pg, self.device)
        self.optimizer: CombinedOptimizer = combined_optimizer(self.dmp, self.cfg.model.dense_lr)
        self.plan, self.memory = plan, report
        self.remap = RowRemap(plan)
        self.stream = DayStream(
            self.dataset,
            self.vocab,
            StreamConfig(batch_size=self.cfg.data.batch_size, prefetch=self.cfg.data.prefetch),
            rank=self.rank,
            world_size=self.world_size,
        )
        return report

    def setup(self, resume: bool) -> None:
        ckpt = latest_checkpoint(self.run_dir / "checkpoints") if resume else None
        if resume and ckpt is None:
            logger.warning("--resume: no complete checkpoint in %s; starting from the first day", self.run_dir)
        if ckpt is not None:
            progress = json.loads((ckpt / "progress.json").read_text())
            self.vocab = VocabularySet.load(ckpt / "vocab")
            self.searcher.load_state_dict(progress["searcher"])
            self.next_day = progress["next_day"]
            self.result.days = [DayResult(**d) for d in progress["days"]]
            self.build(DimensionPlan.load(ckpt / "plan"))
            state = self._state()
            load_checkpoint(ckpt, state, self.pg)
            self.dmp.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optim"])
            if _rank0():
                logger.info("resumed from %s at day %d", ckpt, self.next_day)
        else:
            self.build(self.plan)
        if _rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            logger.info("dimension plan:\n%s", self.plan.summary())
            logger.info("%s", self.memory.summary())

    def _state(self) -> dict[str, Any]:
        return {"model": self.dmp.state_dict(), "optim": self.optimizer.state_dict()}

    # ---- one day -------------------------------------------------------------------------------------------
    def _batches(self, day: Day, grow: bool) -> Iterator[Batch]:
        for batch in self.stream.batches(day, grow=grow):
            if not self.remap.identity:
                batch.sparse_features = self.remap(batch.sparse_features)
            yield batch

    def evaluate(self, day: Day) -> dict[str, float]:
        """Prequential evaluation: the day's ids are looked up without growing the vocabularies."""
        self.dmp.eval()
        logits, labels, losses = [], [], []
        with torch.no_grad():
            for batch in self._batches(day, grow=False):
                loss, (_, out, y) = self.dmp(batch.to(self.device))
                logits.append(out.cpu())
                labels.append(y.cpu())
                losses.append(float(loss) * y.numel())
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (torch.cat(logits), torch.cat(labels), sum(losses)))
        all_logits = torch.cat([g[0] for g in gathered])
        all_labels = torch.cat([g[1] for g in gathered])
        result = {
            "loss": sum(g[2] for g in gathered) / max(all_labels.numel(), 1),
            "examples": all_labels.numel(),
        }
        task = self.dataset.spec.task
        if task == "binary":
            result["auc"] = float(metrics.auc(all_logits, all_labels))
            result["log_loss"] = float(metrics.log_loss(all_logits, all_labels))
            result["accuracy"] = float(metrics.accuracy(all_logits, all_labels))
        elif task == "regression":
            result["mse"] = float(metrics.mse(all_logits, all_labels))
        else:
            result["accuracy"] = float(metrics.accuracy(all_logits, all_labels.long()))
        return result

    def train_day(self, day: Day) -> tuple[float, int, float]:
        """Train on `day`; returns (mean loss, examples over all ranks, examples/s over all ranks)."""
        self.dmp.train()
        steps = self.stream.num_batches(day)
        if self.cfg.train.max_steps_per_day is not None:
            steps = min(steps, self.cfg.train.max_steps_per_day)
        batches = (b.to(self.device) for b in itertools.islice(self._batches(day, grow=True), steps))
        pipeline = TrainPipelineSparseDist(self.dmp, self.optimizer, self.device, execute_all_batches=True)
        total_loss, examples = torch.zeros(2, dtype=torch.float64), 0
        bar = tqdm(total=steps, desc=f"train {day.name}", disable=not _rank0(), leave=False)
        start = time.perf_counter()
        while True:
            try:
                loss, _, labels = pipeline.progress(batches)
            except StopIteration:
                break
            total_loss[0] += float(loss) * labels.numel()
            total_loss[1] += labels.numel()
            examples += labels.numel()
            bar.update(1)
            if bar.n % self.cfg.train.log_every == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
        elapsed = time.perf_counter() - start
        bar.close()
        pipeline.detach()
        dist.all_reduce(total_loss, group=self.pg)
        timing = torch.tensor([elapsed], dtype=torch.float64)
        dist.all_reduce(timing, op=dist.ReduceOp.MAX, group=self.pg)
        n = int(total_loss[1])
        return float(total_loss[0] / max(n, 1)), n, n / float(timing[0])

    def reconfigure(self, new_plan: DimensionPlan) -> None:
        """Move to `new_plan`: DCP save → whole tensors → migrate rows → re-plan under the budget → new DMP."""
        old_plan = self.plan
        scratch = self.run_dir / "reconfigure"
        save_checkpoint(scratch, {"model": self.dmp.state_dict()}, pg=self.pg)
        old_state = full_tensors(scratch)
        fresh = self._model(new_plan, "cpu").state_dict()
        migrated = migrate_weights(old_plan, new_plan, old_state, fresh)
        self.build(new_plan)
        load_full_weights(self.dmp, migrated)
        dist.barrier(group=self.pg)
        if _rank0():
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
            logger.info("reconfigured to the new plan:\n%s\n%s", new_plan.summary(), self.memory.summary())

    def checkpoint(self, day_index: int) -> None:
        def extra(tmp: Path) -> None:
            self.plan.save(tmp / "plan")
            self.vocab.save(tmp / "vocab")
            progress = {
                "next_day": day_index + 1,
                "searcher": self.searcher.state_dict(),
                "days": [asdict(d) for d in self.result.days],
            }
            (tmp / "progress.json").write_text(json.dumps(progress))

        save_checkpoint(self.run_dir / "checkpoints" / f"day-{day_index:04d}", self._state(), extra, self.pg)

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        for index in range(self.next_day, len(self.days)):
            day = self.days[index]
            evaluation = self.evaluate(day)
            loss, examples, speed = self.train_day(day)
            self.searcher.observe(
                DayStats(
                    day.name,
                    index,
                    {f: self.vocab[f].num_rows for f in self.features},
                    {f: self.vocab[f].counts for f in self.features},
                    evaluation,
                )
            )
            proposal = self.searcher.propose()
            reconfigured = proposal is not None and proposal.to_json()["features"] != self.plan.to_json()["features"]
            if reconfigured and proposal is not None:
                self.reconfigure(proposal)
            rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
            dist.all_reduce(rss, op=dist.ReduceOp.MAX, group=self.pg)
            record_ = DayResult(
                day=day.name,
                day_index=index,
                eval=evaluation,
                train_loss=loss,
                train_examples=examples,
                examples_per_s=speed,
                embedding_bytes_per_rank=self.memory.per_rank_bytes,
                embedding_parameters=self.plan.parameters,
                peak_rss_mb=float(rss[0]),
                reconfigured=reconfigured,
            )
            self.result.days.append(record_)
            if _rank0():
                with (self.run_dir / "metrics.jsonl").open("a") as fh:
                    fh.write(json.dumps(asdict(record_)) + "\n")
                self.plan.save(self.run_dir / "plan")
                logger.info(
                    "day %s: eval %s | train loss %.4f | %.0f examples/s",
                    day.name,
                    {k: round(v, 4) for k, v in evaluation.items()},
                    loss,
                    speed,
                )
            if self.cfg.train.checkpoint:
                self.checkpoint(index)
        self.result.plan = self.plan
        return self.result


def print_summary(result: TrainResult, budget_bytes: int | None) -> None:
    """The per-day table `make demo` shows."""
    header = f"{'day':<12}{'eval AUC':>9}{'eval loss':>10}{'train loss':>11}{'examples/s':>12}{'emb MiB/rank':>22}"
    print(header)
    print("-" * len(header))
    for d in result.days:
        per_rank = "/".join(f"{b / 2**20:.2f}" for b in d.embedding_bytes_per_rank)
        auc = d.eval.get("auc", float("nan"))
        print(
            f"{d.day:<12}{auc:>9.4f}{d.eval['loss']:>10.4f}{d.train_loss:>11.4f}{d.examples_per_s:>12,.0f}{per_rank:>22}"
        )
    if budget_bytes:
        used = sum(result.days[-1].embedding_bytes_per_rank) if result.days else 0
        print(f"embedding memory {used / 2**20:.2f} MiB of a {budget_bytes / 2**20:.2f} MiB budget")
    print(f"run: {result.run_dir}  (metrics.jsonl, config.yaml, plan/, checkpoints/)")


def _init_process_group(device_type: str) -> None:
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = dt.timedelta(seconds=120)
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group(backend, timeout=timeout)
    else:  # a plain `python -m jobs.train`: one rank
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout)


def train(cfg: JobConfig, resume: bool = False) -> TrainResult:
    """Run the job. Data, config and plan are validated before any process group starts."""
    dataset = Dataset(cfg.data.path)
    days = dataset.days[: cfg.data.days] if cfg.data.days else dataset.days
    searcher = build_searcher(cfg)
    plan = initial_plan(cfg, searcher, dataset.spec.feature_names, table_capacities(dataset, cfg.data.capacity))
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no GPU is visible; use train.device=cpu or auto")
    _init_process_group("cuda" if use_cuda else "cpu")
    try:
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        trainer = Trainer(cfg, dataset, days, device, searcher, plan)
        trainer.setup(resume)
        result = trainer.run()
        if _rank0():
            print_summary(result, cfg.sharding.budget_bytes)
        return result
    finally:
        dist.destroy_process_group()


@record
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="torchrun ... -m jobs.train", description="dimsearch streaming training")
    parser.add_argument("--config", type=Path, default=None, help="YAML config (see jobs/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue after the last complete checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    for noisy in ("torchrec", "torch.distributed", "fbgemm_gpu"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume)
    except (ValueError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
