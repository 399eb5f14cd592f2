"""The streaming training job.

    torchrun --standalone --nproc_per_node=2 -m jobs.train --config jobs/configs/demo.yaml [section.key=value ...]
    torchrun --standalone --nproc_per_node=2 -m jobs.train --config jobs/configs/demo.yaml --resume

`Trainer.run` reads top to bottom (DESIGN.md decisions 12 and 16): for each phase, for each epoch, for each day:
evaluate (prequential: the day before training on it) → train (`TrainPipelineSparseDist` on CUDA, plain DMP steps
on CPU or with the searcher's own step between them; a stream searcher's environment batches held out) → searcher step
(`observe`/`propose`, scoring plans on the held-out batches) → reconfigure if the plan changed (the live model is
`sharding.live.PlannedModel`) → train on the held-out batches → checkpoint (DCP, atomic); a phase's end may bring
the searcher's derived plan. The job knows searchers only
through the protocol of `search/base.py`, found by `search.method` in `search.registry`.

Everything lands in `<train.out_dir>/<train.name>/`: the resolved
`config.yaml`, `metrics.jsonl` (one record per day: loss, AUC/accuracy/MSE, examples/s, embedding bytes per rank,
peak RSS), `plan/` (the current dimension plan) and `checkpoints/day-NNNN/`. `--resume` (or `train.resume=auto`)
continues after the last intact checkpoint, and `metrics.jsonl` is rewritten from it, so it holds exactly one record
per day after any kill, restart or resume; the metrics then match an uninterrupted run's. An existing run is never
trained over without `--resume` or `--replace`, and a resumed run's config must equal its own (`jobs/rundir.py`).
Under `torchrun --max-restarts=K` a restarted worker group resumes by itself; a worker whose agent dies exits.
`python -m jobs.launch` runs the same checks once before any worker starts (`jobs/launch.py`).

Runs on gloo/CPU here and NCCL/GPU where present (`train.device=auto`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import resource
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.elastic.multiprocessing.errors import record
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from jobs import faults
from jobs.config import ConfigError, JobConfig, load_config
from jobs.environment import ModelEnvironment
from jobs.logs import setup_logging
from jobs.rundir import RunDecision, RunError, RunLock, clear_run, decide, mark_job
from models.errors import ModelConfigError
from models.factory import build_model
from models.recommender import Recommender
from models.scoring import Scorer, score
from pipeline.dataset import Dataset, Day
from pipeline.errors import DatasetError
from pipeline.spec import DatasetSpec
from pipeline.splits import SplitAssignment, assign_splits
from pipeline.stream import DayStream, StreamConfig
from pipeline.vocab import VocabularySet
from search import registry
from search.base import DayStats, Phase, SearchConfigError, Searcher, SearchStep
from sharding.checkpoint import (
    CheckpointError,
    damaged_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from sharding.distributed import (
    BudgetError,
    attach_fused_optimizer,
    plan_sharding,
)
from sharding.embedding import PlannedEmbedding
from sharding.live import PlannedModel, release_free_memory
from sharding.plan import DimensionPlan, PlanError

logger = logging.getLogger(__name__)

SEARCHER_FILE = "searcher.pt"  # a checkpoint's searcher state (and its search step's), identical on every rank


@dataclass
class DayResult:
    """One day's record in `metrics.jsonl` (prequential protocol)."""

    day: str
    day_index: int
    eval: dict[str, float]
    train_loss: float
    train_examples: int
    examples_per_s: float
    embedding_bytes_per_rank: list[int]
    embedding_parameters: int
    embedding_logical_parameters: int
    peak_rss_mb: float
    reconfigured: bool = False
    reconfigure_seconds: float = 0.0  # wall time of the day's move to a new plan (save, rebuild, load), rank 0


@dataclass
class TrainResult:
    """What a run produced: per-day records (prequential) or per-epoch records and test metrics (static)."""

    run_dir: Path
    days: list[DayResult] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    plan: DimensionPlan | None = None


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def build_searcher(cfg: JobConfig, spec: DatasetSpec, capacities: Mapping[str, int] | None = None) -> Searcher:
    """The searcher `search.method` names (`search.registry`), built from its own config section and checked
    against what the dataset and protocol can serve it; a fractional `search.budget` is resolved against the
    tables' rows (`capacities`) and logged."""
    if isinstance(cfg.search.budget, str) and capacities is not None and _rank0():
        logger.info(
            "search.budget %r = %s parameters", cfg.search.budget, f"{cfg.search.resolved_budget(capacities):,}"
        )
    context = cfg.search.context(
        num_embeddings=capacities,
        dataset=spec.name,
        features=tuple(spec.feature_names),
        user_field=spec.user_field,
        item_field=spec.item_field,
        protocol=cfg.data.protocol,
        model=cfg.model.name,
        seed=cfg.train.seed,
    )
    return registry.build_searcher(cfg.search.method, cfg.search.settings, context)


def initial_plan(cfg: JobConfig, searcher: Searcher, features: list[str], capacity: dict[str, int]) -> DimensionPlan:
    """The searcher's starting plan, or the saved plan `search.plan`, checked against the dataset.

    Raises:
        PlanError: the saved plan fails validation, or its features or table sizes do not match the dataset.
    """
    if cfg.search.plan is None:
        return served(cfg, searcher.initial_plan(features, capacity))
    plan = DimensionPlan.load(cfg.search.plan)
    missing, extra = (
        sorted(set(features) - set(plan.feature_names)),
        sorted(set(plan.feature_names) - set(features)),
    )
    if missing or extra:
        raise PlanError(
            f"{cfg.search.plan}: the plan's features do not match the dataset's: the dataset has {missing or 'no'} "
            f"features the plan does not size, and the plan sizes {extra or 'no'} features the dataset lacks. "
            "Fix: use a plan made for this dataset (same feature names), or search again"
        )
    plan.check_vocabulary(capacity)
    return served(cfg, DimensionPlan(tuple(plan[f] for f in features), plan.budget, plan.dtype, plan.provenance))


def served(cfg: JobConfig, plan: DimensionPlan) -> DimensionPlan:
    """`plan` with rows served aligned to `search.row_alignment`, every table in `search.dtype` unless that is fp32
    (then the plan's own dtypes stand)."""
    return plan.with_dtypes(None if cfg.search.dtype == "fp32" else cfg.search.dtype, cfg.search.row_alignment)


def table_capacities(
    dataset: Dataset, capacity: int | None, counted: Mapping[str, Any] | None = None
) -> dict[str, int]:
    """Rows per feature table: `capacity`, or the distinct ids in the dataset + 1 (the fallback row).

    Counting over every day (not only the days a run uses) keeps table sizes — and so initialisation — the same
    for a run cut short and the run that resumes it. Counting reads every id (84 s and 1.9 GB at 100M rows), so
    `counted`, an earlier count of the same files (`{"data": Dataset.fingerprint(), "capacities": {...}}`, what
    `jobs.launch` passes its workers in `DIMSEARCH_CAPACITIES`), is used instead when its fingerprint is this
    dataset's and it names every field; otherwise the ids are counted again.
    """
    if capacity is not None:
        return {f.name: capacity for f in dataset.spec.sparse}
    if counted is not None:
        known = counted.get("capacities")
        names = [f.name for f in dataset.spec.sparse]
        if (
            counted.get("data") == dataset.fingerprint()
            and isinstance(known, Mapping)
            and sorted(known) == sorted(names)
            and all(isinstance(known[n], int) and known[n] >= 1 for n in names)
        ):
            return {n: known[n] for n in names}
        logger.warning("the table capacities passed in do not match %s's files; counting its ids again", dataset.root)
    start = time.perf_counter()
    distinct = dataset.distinct_ids()
    logger.info("counted the distinct ids of %s in %.1f s", dataset.root, time.perf_counter() - start)
    return {name: n + 1 for name, n in distinct.items()}


def build_recommender(
    cfg: JobConfig,
    spec: DatasetSpec,
    plan: DimensionPlan,
    device: torch.device | str,
    head: torch.nn.Module | None = None,
    head_width: int | None = None,
) -> Recommender:
    """The job's model for `plan`: the planned embedding layer (on `device`; `meta` to plan sharding), the dense
    model `model.name` seeded with `train.seed`, and the task loss. A searcher's model hook, if given, sits in
    between and the dense model then sees every field at `head_width`."""
    torch.manual_seed(cfg.train.seed)
    embedding = PlannedEmbedding(plan, device)
    dims = embedding.feature_dims
    if head is not None and head_width is not None:
        dims = {f: head_width for f in dims}
    dense = build_model(cfg.model.name, dims, len(spec.dense), spec.task, spec.num_classes, **cfg.model.options)
    return Recommender(embedding, dense, spec.task, head)


def plan_digest(plan: DimensionPlan) -> str:
    """A digest of what a plan sizes: every feature's tables and every row's dim (provenance left out)."""
    h = hashlib.sha256(json.dumps(plan.to_json()["features"], sort_keys=True).encode())
    for f in plan.features:
        if f.row_dims is not None:
            h.update(np.ascontiguousarray(f.row_dims, dtype=np.int64).tobytes())
    return h.hexdigest()


def all_reduce(t: torch.Tensor, pg: dist.ProcessGroup, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
    """`t` reduced over `pg`, on `t`'s device: NCCL reduces only CUDA tensors, so a CPU tensor makes the round trip
    through the current CUDA device there (gloo takes it as it is)."""
    if dist.get_backend(pg) == "nccl" and t.device.type != "cuda":
        on_device = t.cuda()
        dist.all_reduce(on_device, op=op, group=pg)
        return on_device.to(t.device)
    dist.all_reduce(t, op=op, group=pg)
    return t


def _peak_rss_mb(pg: dist.ProcessGroup) -> float:
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    return float(all_reduce(rss, pg, dist.ReduceOp.MAX)[0])


@dataclass(frozen=True)
class Unit:
    """One unit of work: a day of one epoch of one phase. `position` orders units; `grow` admits new ids."""

    position: tuple[int, int, int]
    phase: Phase
    epoch: int
    day: Day
    grow: bool
    last_of_epoch: bool
    number: int  # 1-based count of units in the run


class Trainer:
    """One run (a torchtune-style recipe): `setup`, then `run`, which reads top to bottom:

        for each phase, for each epoch, for each day:
            evaluate (prequential) → train → searcher step → reconfigure → train held-out → checkpoint

    The prequential protocol is one phase of one epoch over the stream, each day evaluated before it is trained on.
    A static protocol has the searcher's phases (e.g. search → train) of epochs over the train split, validation
    after each epoch and test at the end; a phase's end may hand a new plan (a search's derived dims).
    """

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
        assert dist.group.WORLD is not None
        self.pg: dist.ProcessGroup = dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.run_dir = cfg.run_dir
        self.features = dataset.spec.feature_names
        self.searcher, self.initial_plan = searcher, plan
        self.capacity = {f.feature: f.num_embeddings for f in plan.features}
        self.vocab = VocabularySet(self.features, capacity=self.capacity)
        self.result = TrainResult(self.run_dir)
        self.static = cfg.data.protocol != "prequential"
        self.split: SplitAssignment | None = None
        if self.static:
            fractions = tuple(cfg.data.fractions) if cfg.data.fractions else None
            self.split = assign_splits(dataset, cfg.data.protocol, fractions=fractions, seed=cfg.data.split_seed)  # type: ignore[arg-type]
        self.phases = searcher.phases(cfg.train.epochs) if self.static else [Phase("stream", 1)]
        self.train_split = "train" if self.static else "all"
        # Position of the next unit of work: (phase, epoch, day).
        self.position: tuple[int, ...] = (0, 0, 0)
        self.fault = faults.from_env()
        self.epoch_acc = {"loss": 0.0, "examples": 0, "seconds": 0.0}
        self.search_step: SearchStep | None = None
        self.held_out: list[tuple[KeyedJaggedTensor, Batch]] = []
        self.reconfigure_seconds = 0.0  # since the last day record

    # ---- setup ---------------------------------------------------------------------------------------------
    def _in_search(self) -> bool:
        return self.position[0] < len(self.phases) and self.phases[self.position[0]].search

    def _model(self, plan: DimensionPlan, device: torch.device | str, search: bool) -> Recommender:
        hook = self.searcher.model_hook(self.rank) if search else None
        return build_recommender(self.cfg, self.dataset.spec, plan, device, hook, self.searcher.hook_width)

    def build(self, plan: DimensionPlan) -> None:
        """Build, plan under the budget and shard the model of `plan` (`sharding.live.PlannedModel`), with the
        searcher's hook and step where the run is in a search phase, and the streams keyed by its tables."""
        self.live = PlannedModel(
            plan,
            lambda p: self._model(p, "meta", self._in_search()),
            self.cfg.sharding,
            self.cfg.model.dense_lr,
            self.device,
            self.pg,
            seed=self.cfg.train.seed + self.rank,
            exclude=self._attach_search_step,
        )
        self._attach_streams()

    def _attach_search_step(self, dmp: DistributedModelParallel) -> set[str]:
        """On a newly sharded model: its recommender, the searcher's own step over its hook (if any), and the names
        of the parameters that step trains (the combined optimizer leaves them out)."""
        self.recommender = next(m for m in dmp.modules() if isinstance(m, Recommender))
        hook = self.recommender.head
        self.search_step = self.searcher.search_step(hook) if hook is not None else None
        owned = {id(p) for p in self.search_step.parameters()} if self.search_step is not None else set()
        return {name for name, p in dmp.named_parameters() if id(p) in owned}

    def _attach_streams(self) -> None:
        """The day streams, keyed by the live plan's tables."""
        remap = self.live.remap
        data = self.cfg.data
        stream_cfg = StreamConfig(batch_size=data.batch_size, prefetch=data.prefetch, chunk_rows=data.chunk_rows)
        names = ("train", "valid", "test") if self.static else ("all",)
        self.streams = {
            name: DayStream(
                self.dataset,
                self.vocab,
                stream_cfg,
                rank=self.rank,
                world_size=self.world_size,
                row_filter=self.split.row_filter(name) if self.split is not None else None,
                keying=None if remap.identity else remap,
                gather=self._all_gather,
            )
            for name in names
        }

    def _all_gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order: the streams' exchange per feature and training day (the ids and counts
        that keep every rank's vocabulary equal while each reads only its own rows)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def setup(self, resume: bool) -> None:
        # Rank 0 picks the checkpoint (skipping damaged ones, by name) and every rank loads that one.
        choice: list[str | None] = [None, None]
        if resume and self.rank == 0:
            found = latest_checkpoint(self.run_dir / "checkpoints")
            choice[0] = str(found) if found is not None else None
            damaged = damaged_checkpoints(self.run_dir / "checkpoints") if found is None else []
            if damaged:  # never start over on top of checkpoints that might be repaired
                choice[1] = (
                    f"{self.run_dir / 'checkpoints'}: no checkpoint is intact: "
                    + "; ".join(why for _, why in damaged)
                    + ". Fix: restore them, or --replace the run to start it over"
                )
        dist.broadcast_object_list(choice, src=0, group=self.pg)
        if choice[1] is not None:
            raise RunError(choice[1])
        ckpt = Path(choice[0]) if choice[0] is not None else None
        if resume and ckpt is None and _rank0():
            logger.warning("resume: no complete checkpoint in %s; starting from the beginning", self.run_dir)
        if ckpt is not None:
            progress = json.loads((ckpt / "progress.json").read_text())
            search_state = torch.load(ckpt / SEARCHER_FILE, weights_only=False)
            self.vocab = VocabularySet.load(ckpt / "vocab")
            self.searcher.load_state_dict(search_state["searcher"])
            self.position = tuple(progress["position"])
            self.epoch_acc = progress["epoch_acc"]
            self.result.days = [DayResult(**d) for d in progress["days"]]
            self.result.epochs = progress["epochs"]
            self.result.phase_seconds = progress["phase_seconds"]
            self.build(DimensionPlan.load(ckpt / "plan"))
            state = self._state()
            load_checkpoint(ckpt, state, self.pg)
            self.live.dmp.load_state_dict(state["model"])
            self.live.optimizer.load_state_dict(state["optim"])
            if self.search_step is not None and search_state.get("search_step") is not None:
                self.search_step.load_state_dict(search_state["search_step"])
            if _rank0():
                logger.info("resumed from %s at %s", ckpt, self.position)
        else:
            self.build(self.initial_plan)
        if _rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            # The metrics are the checkpoint's records, no more: a record appended after the checkpoint a resume
            # starts from (or of a day a kill cut short) is dropped here and written again when its work is redone.
            records = [asdict(d) for d in self.result.days] + list(self.result.epochs)
            write_text_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            # The checkpoint's plan: a kill after a day's checkpoint but before its record left plan/ a day behind.
            self.live.plan.save(self.run_dir / "plan")
            logger.info("dimension plan:\n%s", self.live.plan.summary())
            logger.info("%s", self.live.memory.summary())

    def _state(self) -> dict[str, Any]:
        return {"model": self.live.dmp.state_dict(), "optim": self.live.optimizer.state_dict()}

    # ---- data ----------------------------------------------------------------------------------------------
    def _batches(self, split: str, days: list[Day], grow: bool) -> Iterator[Batch]:
        for _, batch in self._batches_with_rows(split, days, grow):
            yield batch

    def _batches_with_rows(self, split: str, days: list[Day], grow: bool) -> Iterator[tuple[KeyedJaggedTensor, Batch]]:
        """Each batch with its sparse features as vocabulary rows (before the plan's remap to bucket keys)."""
        stream = self.streams[split]
        for day in days:
            for rows, batch in stream.batches_with_rows(day, grow=grow):  # keyed for the plan by the stream
                yield rows, batch.to(self.device)

    def _steps(self, split: str, day: Day) -> int:
        steps = self.streams[split].num_batches(day)
        if self.cfg.train.max_steps_per_day is not None:
            steps = min(steps, self.cfg.train.max_steps_per_day)
        return steps

    # ---- the loop ------------------------------------------------------------------------------------------
    def units(self) -> Iterator[Unit]:
        """Every unit of work of the run, in order."""
        number = 0
        for p, phase in enumerate(self.phases):
            for epoch in range(phase.epochs):
                for d, day in enumerate(self.days):
                    number += 1
                    # Ids are admitted during the first pass over the training data.
                    grow = p == 0 and epoch == 0
                    yield Unit((p, epoch, d), phase, epoch, day, grow, d + 1 == len(self.days), number)

    def run(self) -> TrainResult:
        for unit in self.units():
            if unit.position < self.position:
                continue
            if self.cfg.train.max_units is not None and unit.number > self.cfg.train.max_units:
                logger.info("stopping before unit %d (train.max_units); --resume continues", unit.number)
                self.result.plan = self.live.plan
                return self.result
            evaluation, row_losses = self.evaluate_day(unit)
            loss, examples, speed = self.train_day(unit)
            reconfigured = self.search(unit, evaluation, row_losses)
            loss, examples, speed = self.train_held_out(unit, loss, examples, speed)
            self.position = self._next(unit)
            if unit.last_of_epoch and self.static:
                self.end_epoch(unit, loss, examples, speed)
            else:
                self._accumulate(loss, examples, speed)
            if unit.last_of_epoch and unit.epoch + 1 == unit.phase.epochs:
                reconfigured = self.end_phase(unit) or reconfigured
            record_ = None if self.static else self.day_record(unit, evaluation, loss, examples, speed, reconfigured)
            if self.cfg.train.checkpoint:
                name = f"unit-{unit.number:06d}" if self.static else f"day-{unit.position[2]:04d}"
                self.checkpoint(name)
            if record_ is not None:
                self._log(record_)  # after its checkpoint: the metrics never name a day a resume would redo
            release_free_memory()  # what the unit freed goes back to the OS, not into the next unit's high water
        if self.static:
            self.test()
        self.result.plan = self.live.plan
        return self.result

    def _next(self, unit: Unit) -> tuple[int, int, int]:
        p, epoch, d = unit.position
        if not unit.last_of_epoch or not self.static:  # a stream may go on with more days (`data.days`)
            return (p, epoch, d + 1)
        return (p, epoch + 1, 0) if epoch + 1 < unit.phase.epochs else (p + 1, 0, 0)

    # ---- evaluation ----------------------------------------------------------------------------------------
    def evaluate_day(self, unit: Unit) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """The prequential evaluation of the day before training on it (nothing under a static protocol)."""
        row_losses: dict[str, np.ndarray] = {}
        if self.static:
            return {}, row_losses
        return self.evaluate(self.train_split, [unit.day], row_losses), row_losses

    def evaluate(
        self, split: str, days: list[Day], row_losses: dict[str, np.ndarray] | None = None
    ) -> dict[str, float]:
        """Metrics over `days` of `split`; ids are looked up without growing the vocabularies.

        `row_losses`, if given, receives for each of the searcher's `row_loss_features` every row's mean example loss
        over all ranks (nan for rows with no example), for searchers rewarded per row.
        """
        wanted = self.searcher.row_loss_features if row_losses is not None else ()
        scorer = Scorer(self.dataset.spec.task, {f: self.live.plan[f].num_embeddings for f in wanted})
        score(self.live.dmp, self._batches_with_rows(split, days, grow=False), scorer)
        # Sums and score histograms are all-reduced; no logit leaves its rank (DESIGN.md decision 13).
        scorer.reduce(lambda t: all_reduce(t, self.pg))
        if row_losses is not None:
            row_losses.update(scorer.row_mean_losses())
        return scorer.metrics()

    def test(self) -> None:
        test = self.evaluate("test", self.days)
        self.result.test = test
        self._log({"phase": "final", "split": "test", "eval": test, "embedding_parameters": self.live.plan.parameters})
        if _rank0():
            logger.info("test: %s", {k: round(v, 4) for k, v in test.items()})

    # ---- training ------------------------------------------------------------------------------------------
    def _finish(self, loss_sum: torch.Tensor, examples: int, elapsed: float) -> tuple[float, int, float]:
        """(mean loss, examples, examples/s) over all ranks; the one host sync of a day's training."""
        total = all_reduce(
            torch.cat([loss_sum.reshape(1).cpu(), torch.tensor([float(examples)], dtype=torch.float64)]), self.pg
        )
        timing = all_reduce(torch.tensor([elapsed], dtype=torch.float64), self.pg, dist.ReduceOp.MAX)
        n = int(total[1])
        return float(total[0] / max(n, 1)), n, n / max(float(timing[0]), 1e-9)

    def train_day(self, unit: Unit) -> tuple[float, int, float]:
        """Train on one day: (mean loss, examples, examples/s) over all ranks. A searcher's own step, where it has
        one, runs between model-weight steps; otherwise the steps are `_pipelined`'s. On a stream, a searcher's
        environment batches (the day's last `env_batches` per rank) are held out here and trained on after the
        searcher's step (`train_held_out`)."""
        steps = self._steps(self.train_split, unit.day)
        held = 0 if self.static else min(self.searcher.env_batches, max(steps - 1, 0))
        stream = self._batches_with_rows(self.train_split, [unit.day], unit.grow)
        batches = (batch for _, batch in itertools.islice(stream, steps - held))
        result = self._train(batches, unit, steps - held, f"{unit.phase.name} {unit.day.name}")
        self.held_out = list(itertools.islice(stream, held))
        return result

    def train_held_out(self, unit: Unit, loss: float, examples: int, speed: float) -> tuple[float, int, float]:
        """Train on the day's held-out environment batches, once the searcher has scored plans on them, keyed by the
        tables of the plan now live (the searcher may have moved to a new one): every row of the stream is trained
        on, as under FIXED. The day's (mean loss, examples, examples/s), these batches included."""
        if not self.held_out:
            return loss, examples, speed
        remap = self.live.remap
        for rows, batch in self.held_out:
            batch.sparse_features = rows if remap.identity else remap(rows)
        batches, self.held_out = [batch for _, batch in self.held_out], []
        more_loss, more, more_speed = self._train(iter(batches), unit, len(batches), "held out", faults=False)
        total = examples + more
        seconds = examples / max(speed, 1e-9) + more / max(more_speed, 1e-9)
        return (loss * examples + more_loss * more) / max(total, 1), total, total / max(seconds, 1e-9)

    def _train(
        self, batches: Iterator[Batch], unit: Unit, steps: int, desc: str, faults: bool = True
    ) -> tuple[float, int, float]:
        self.live.dmp.train()
        bar = tqdm(total=steps, desc=desc, disable=not _rank0(), leave=False)
        # Summed on the device: the loss is read on the host only at log intervals, not at every step.
        loss_sum, examples = torch.zeros((), dtype=torch.float64, device=self.device), 0
        start = time.perf_counter()
        step_fn = self._pipelined(batches) if self.search_step is None else self._with_search_step(batches, unit)
        for step, (loss, labels) in enumerate(step_fn, 1):
            loss_sum += loss.detach().double() * labels.numel()
            examples += labels.numel()
            bar.update(1)
            if faults:
                self.fault.hit("mid-day", self.rank, self.position[2], step)
            if step % self.cfg.train.log_every == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
        elapsed = time.perf_counter() - start
        bar.close()
        return self._finish(loss_sum, examples, elapsed)

    def _pipelined(self, batches: Iterator[Batch]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The day's training steps: `TrainPipelineSparseDist` on CUDA, plain DMP steps on CPU.

        The pipeline overlaps a batch's copy to the device and its input distribution with the previous step on
        CUDA streams. On CPU there is no stream to overlap on, and what it costs stays: its fx rewrite of the model,
        done again every day because evaluation needs the model detached (~0.1 s a day), and its per-batch
        bookkeeping. Plain steps compute the same losses bit for bit and are faster (1-rank steps 8.5 -> 5.6 ms in a
        profile, with the session's other changes; BENCHMARKS.md, "speed near the limits").
        """
        if self.device.type == "cpu":
            yield from self._plain_steps(batches)
            return
        pipeline = TrainPipelineSparseDist(self.live.dmp, self.live.optimizer, self.device, execute_all_batches=True)
        try:
            while True:
                try:
                    loss, _, labels = pipeline.progress(batches)
                except StopIteration:
                    return
                yield loss, labels
        finally:
            pipeline.detach()

    def _plain_steps(self, batches: Iterator[Batch]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dmp, optimizer = self.live.dmp, self.live.optimizer
        for batch in batches:
            optimizer.zero_grad()
            loss, (_, _, labels) = dmp(batch)
            loss.backward()
            optimizer.step()
            yield loss, labels

    def _with_search_step(self, batches: Iterator[Batch], unit: Unit) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Model-weight steps, each followed by the searcher's own step when it is due (on the same day's
        validation batches)."""
        step = self.search_step
        assert step is not None
        validation = list(self._batches("valid", [unit.day], grow=False)) if self.static else []

        def freeze(on: bool) -> None:
            self.recommender.frozen_embeddings = on

        for batch in batches:
            step.before_step()
            self.live.optimizer.zero_grad()
            loss, (_, _, labels) = self.live.dmp(batch)
            loss.backward()
            self.live.optimizer.step()
            yield loss, labels
            if step.after_step(self.live.dmp, freeze, validation):
                self.live.optimizer.zero_grad()
        step.end_pass()

    def _accumulate(self, loss: float, examples: int, speed: float) -> None:
        self.epoch_acc["loss"] += loss * examples
        self.epoch_acc["examples"] += examples
        self.epoch_acc["seconds"] += examples / max(speed, 1e-9)

    # ---- the searcher --------------------------------------------------------------------------------------
    def search(self, unit: Unit, evaluation: dict[str, float], row_losses: dict[str, np.ndarray]) -> bool:
        """Show the searcher the day, and move to the plan it proposes, if any: whether the tables changed."""
        self.searcher.observe(
            DayStats(
                unit.day.name,
                unit.position[2],
                {f: self.vocab[f].num_rows for f in self.features},
                {f: self.vocab[f].counts for f in self.features},
                evaluation,
                row_losses,
                self._environment(),
            )
        )
        proposal = self.searcher.propose()
        if proposal is None:
            return False
        proposal = served(self.cfg, proposal)
        self._check_same_plan(proposal)
        if plan_digest(proposal) == plan_digest(self.live.plan):
            return False
        self.reconfigure(proposal)
        return True

    def _environment(self, batches: list[tuple[KeyedJaggedTensor, Batch]] | None = None) -> ModelEnvironment | None:
        """The model as trained so far, scored on held-out batches (for searchers that probe it): the day's
        held-out batches on a stream, the given ones otherwise."""
        if not self.searcher.env_batches or (self.static and batches is None):
            return None
        return ModelEnvironment(
            self.live.dmp,
            self.recommender,
            self.dataset.spec.task,
            self.held_out if batches is None else batches,
            lambda t: all_reduce(t, self.pg),
        )

    def end_phase(self, unit: Unit) -> bool:
        """The searcher's plan at the end of a phase (e.g. derived dims), retrained from scratch if it says so."""
        info: dict[str, Any] = {"search_seconds": self.result.phase_seconds.get("search", 0.0)}
        if unit.phase.search and self.searcher.env_batches:  # the validation split's first batches
            valid = self._batches_with_rows("valid", self.days, grow=False)
            info["env"] = self._environment(list(itertools.islice(valid, self.searcher.env_batches)))
        end = self.searcher.end_phase(unit.phase, self.recommender.head, info)
        if end is None:
            return False
        plan = served(self.cfg, end.plan)
        self._check_same_plan(plan)
        self.reconfigure(plan, from_scratch=end.from_scratch)
        return True

    def _check_same_plan(self, plan: DimensionPlan) -> None:
        """Every rank must propose the same plan (searches decide from identical statistics; DESIGN.md 11)."""
        digests: list[str | None] = [None] * dist.get_world_size(self.pg)
        dist.all_gather_object(digests, plan_digest(plan), group=self.pg)
        if len(set(digests)) != 1:
            raise RuntimeError(
                f"the ranks proposed different plans (digests {digests}): the searcher '{self.searcher.name}' is not "
                "deterministic across ranks. Decide from all-reduced statistics, or on rank 0 and broadcast"
            )

    def reconfigure(self, new_plan: DimensionPlan, from_scratch: bool = False) -> None:
        """Move the live model to `new_plan` (`PlannedModel.reconfigure`): unchanged tables and their fused optimizer
        state bit for bit, only the changed tables' rows migrated (prefix slice or pad, their row state carried);
        `from_scratch` migrates nothing (a retrain at the new dims). Then the streams follow the new tables."""
        start = time.perf_counter()
        scratch = self.run_dir / "reconfigure"
        del self.recommender, self.search_step  # the old model's modules, freed before the new model is built
        self.live.reconfigure(
            new_plan,
            scratch,
            from_scratch=from_scratch,
            saved=lambda: self.fault.hit("reconfigure", self.rank, self.position[2]),
        )
        self._attach_streams()
        dist.barrier(group=self.pg)
        self.reconfigure_seconds += time.perf_counter() - start
        if _rank0():
            shutil.rmtree(scratch, ignore_errors=True)
            logger.info("reconfigured to the new plan:\n%s\n%s", new_plan.summary(), self.live.memory.summary())

    # ---- records and checkpoints ---------------------------------------------------------------------------
    def day_record(
        self,
        unit: Unit,
        evaluation: dict[str, float],
        loss: float,
        examples: int,
        speed: float,
        reconfigured: bool,
    ) -> dict[str, Any]:
        day_result = DayResult(
            day=unit.day.name,
            day_index=unit.position[2],
            eval=evaluation,
            train_loss=loss,
            train_examples=examples,
            examples_per_s=speed,
            embedding_bytes_per_rank=self.live.memory.per_rank_bytes,
            embedding_parameters=self.live.plan.parameters,
            embedding_logical_parameters=self.live.plan.logical_parameters,
            peak_rss_mb=_peak_rss_mb(self.pg),
            reconfigured=reconfigured,
            reconfigure_seconds=self.reconfigure_seconds,
        )
        self.reconfigure_seconds = 0.0
        self.result.days.append(day_result)
        if _rank0():
            logger.info(
                "day %s: eval %s | train loss %.4f | %.0f examples/s",
                unit.day.name,
                {k: round(v, 4) for k, v in evaluation.items()},
                loss,
                speed,
            )
        return asdict(day_result)

    def end_epoch(self, unit: Unit, loss: float, examples: int, speed: float) -> None:
        self._accumulate(loss, examples, speed)
        acc, phase = self.epoch_acc, unit.phase.name
        self.result.phase_seconds[phase] = self.result.phase_seconds.get(phase, 0.0) + acc["seconds"]
        valid = self.evaluate("valid", self.days)
        record_ = {
            "phase": phase,
            "epoch": unit.epoch,
            "split": "valid",
            "eval": valid,
            "train_loss": acc["loss"] / max(acc["examples"], 1),
            "train_examples": acc["examples"],
            "seconds": acc["seconds"],
            "examples_per_s": acc["examples"] / max(acc["seconds"], 1e-9),
            "embedding_parameters": self.live.plan.parameters,
            "embedding_bytes_per_rank": self.live.memory.per_rank_bytes,
            "peak_rss_mb": _peak_rss_mb(self.pg),
            **self.searcher.epoch_record(self.recommender.head),
        }
        self.result.epochs.append(record_)
        self._log(record_)
        self.epoch_acc = {"loss": 0.0, "examples": 0, "seconds": 0.0}
        if _rank0():
            logger.info("%s epoch %d: valid %s", phase, unit.epoch, {k: round(v, 4) for k, v in valid.items()})

    def checkpoint(self, name: str) -> None:
        def extra(tmp: Path) -> None:
            self.live.plan.save(tmp / "plan")
            self.vocab.save(tmp / "vocab")
            step_state = self.search_step.state_dict() if self.search_step is not None else None
            torch.save({"searcher": self.searcher.state_dict(), "search_step": step_state}, tmp / SEARCHER_FILE)
            progress = {
                "position": list(self.position),
                "in_search": self._in_search(),
                "epoch_acc": self.epoch_acc,
                "days": [asdict(d) for d in self.result.days],
                "epochs": self.result.epochs,
                "phase_seconds": self.result.phase_seconds,
            }
            (tmp / "progress.json").write_text(json.dumps(progress))

        day = self.position[2] - 1

        def stage(name: str) -> None:
            self.fault.hit("checkpoint" if name == "written" else "checkpoint-replace", self.rank, day)

        save_checkpoint(self.run_dir / "checkpoints" / name, self._state(), extra, self.pg, stage)

    def _log(self, record_: dict[str, Any]) -> None:
        if _rank0():
            with (self.run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(record_) + "\n")
            self.live.plan.save(self.run_dir / "plan")


def print_summary(result: TrainResult, budget_bytes: int | None) -> None:
    """The table a run ends with: per day (prequential) or per epoch and test (static)."""
    if result.days:
        header = f"{'day':<12}{'eval AUC':>9}{'eval loss':>10}{'train loss':>11}{'examples/s':>12}{'emb MiB/rank':>22}"
        print(header)
        print("-" * len(header))
        for d in result.days:
            per_rank = "/".join(f"{b / 2**20:.2f}" for b in d.embedding_bytes_per_rank)
            auc = d.eval.get("auc", float("nan"))
            print(
                f"{d.day:<12}{auc:>9.4f}{d.eval['loss']:>10.4f}{d.train_loss:>11.4f}{d.examples_per_s:>12,.0f}"
                f"{per_rank:>22}"
            )
        used = sum(result.days[-1].embedding_bytes_per_rank)
    else:
        header = (
            f"{'phase':<8}{'epoch':>6}{'valid AUC':>10}{'valid loss':>11}{'train loss':>11}{'examples/s':>12}"
            f"{'params':>12}"
        )
        print(header)
        print("-" * len(header))
        for e in result.epochs:
            print(
                f"{e['phase']:<8}{e['epoch']:>6}{e['eval'].get('auc', float('nan')):>10.4f}{e['eval']['loss']:>11.4f}"
                f"{e['train_loss']:>11.4f}{e['examples_per_s']:>12,.0f}{e['embedding_parameters']:>12,}"
            )
        print(f"test: {', '.join(f'{k} {v:.4f}' for k, v in result.test.items() if k != 'examples')}")
        used = sum(result.epochs[-1]["embedding_bytes_per_rank"]) if result.epochs else 0
    if result.plan is not None:
        print(result.plan.summary())
    if budget_bytes:
        print(f"embedding memory {used / 2**20:.2f} MiB of a {budget_bytes / 2**20:.2f} MiB budget")
    print(f"run: {result.run_dir}  (metrics.jsonl, config.yaml, plan/, checkpoints/)")


def _share_cpus() -> None:
    """On CPU, give each of a node's ranks its own share of the cores: `LOCAL_RANK` is pinned to every
    `LOCAL_WORLD_SIZE`-th allowed CPU from its own, and torch's intra-op threads are as many as it has.

    Unpinned, a node's ranks, their prefetch threads and torch's OpenMP pools (one thread per core each, unless
    OMP_NUM_THREADS says otherwise) all compete for every core. Pinned, a rank's step, its prefetch thread and its
    collectives' threads share its own cores (measured on 2 cores and 2 ranks: no effect either way, 259k against
    263k examples/s). A node with fewer allowed CPUs than ranks is left as it is. `DIMSEARCH_PIN_CPUS=0` turns this
    off.
    """
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    allowed = sorted(os.sched_getaffinity(0))
    if os.environ.get("DIMSEARCH_PIN_CPUS", "1") == "0" or len(allowed) < local_world:
        return
    mine = allowed[int(os.environ.get("LOCAL_RANK", "0")) :: local_world]
    if local_world > 1:
        os.sched_setaffinity(0, mine)
    torch.set_num_threads(min(len(mine), int(os.environ.get("OMP_NUM_THREADS", len(mine)))))


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


@dataclass
class Preflight:
    """Everything checked before a process group starts: the data, its days, the searcher, the starting plan and
    how the run directory is used."""

    dataset: Dataset
    days: list[Day]
    searcher: Searcher
    plan: DimensionPlan
    decision: RunDecision
    capacities: dict[str, int]  # rows per feature table (`table_capacities`)

    def counted(self) -> dict[str, Any]:
        """The table capacities with the dataset's fingerprint: what `table_capacities` takes as `counted`."""
        return {"data": self.dataset.fingerprint(), "capacities": self.capacities}


def preflight(
    cfg: JobConfig,
    *,
    resume: bool = False,
    replace: bool = False,
    check_values: bool = True,
    world_size: int | None = None,
    run_id: str | None = None,
    counted: Mapping[str, Any] | None = None,
) -> Preflight:
    """Check the config against the data and the run directory, reading only: nothing on disk changes.

    The dataset's layout and every file's schema are checked on open, and (with `check_values`) every value of the
    days the run trains on (labels, ids, dense values) in one vectorised pass, so bad data is refused before any
    day trains rather than when its day is reached. With `world_size`, the starting plan's sharding is planned on
    `meta` for that many ranks, so a plan over `sharding.budget_bytes` is refused here too. `counted` is an earlier
    count of the tables' rows (see `table_capacities`).

    Raises:
        ConfigError, DatasetError, PlanError, RunError: what is wrong, naming the key, file or column, and the fix.
    """
    faults.from_env()  # a malformed drill is a config error too
    dataset = Dataset(cfg.data.path)
    days = dataset.days[: cfg.data.days] if cfg.data.days else dataset.days
    if check_values:
        # Before anything collects a scan: sizing the tables reads every day's ids, so then every day is checked.
        dataset.check_values(days if cfg.data.capacity is not None else dataset.days)
    capacities = table_capacities(dataset, cfg.data.capacity, counted)
    searcher = build_searcher(cfg, dataset.spec, capacities)
    plan = initial_plan(cfg, searcher, dataset.spec.feature_names, capacities)
    decision = decide(cfg, resume=resume or cfg.train.resume == "auto", replace=replace, run_id=run_id)
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no GPU is visible; use train.device=cpu or auto")
    if world_size is not None:
        meta = build_recommender(cfg, dataset.spec, plan, "meta")
        attach_fused_optimizer(meta, cfg.sharding)
        device = (
            "cuda"
            if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
            else "cpu"
        )
        plan_sharding(meta, cfg.sharding, world_size=world_size, compute_device=device)
    return Preflight(dataset, days, searcher, plan, decision, capacities)


def _watch_parent() -> None:
    """Under torchrun, die with the agent: a watchdog thread polls the parent pid and ends this worker once the agent
    is gone (reparented). Not `PR_SET_PDEATHSIG`: it fires when the agent's *thread* that spawned the worker ends,
    which kills restarted workers of a live agent."""
    parent = os.getppid()
    if parent == 1:  # the agent died before this worker got here
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        logger.error("the torchrun agent (pid %d) is gone; stopping this worker", parent)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


CAPACITIES_ENV = "DIMSEARCH_CAPACITIES"  # the launcher's count of the tables' rows (`Preflight.counted`), as JSON


def _counted_from_env() -> dict[str, Any] | None:
    text = os.environ.get(CAPACITIES_ENV)
    if not text:
        return None
    try:
        counted = json.loads(text)
    except json.JSONDecodeError:
        counted = None
    if not isinstance(counted, dict):
        logger.warning("%s is not a JSON object; the table capacities are counted again", CAPACITIES_ENV)
        return None
    return counted


def train(cfg: JobConfig, resume: bool = False, replace: bool = False) -> TrainResult:
    """Run the job. Data, config, plan and the run directory are checked before any process group starts.

    Args:
        cfg: the job's config.
        resume: continue the run after its last intact checkpoint (`train.resume=auto` does the same).
        replace: start an existing run over, deleting its checkpoints and metrics.
    """
    rank = int(os.environ.get("RANK", "0"))
    # Under `jobs.launch` the launcher has checked every value already; under plain torchrun rank 0 does.
    checked = os.environ.get("DIMSEARCH_PREFLIGHT") == "done"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    ready = preflight(
        cfg,
        resume=resume,
        replace=replace,
        check_values=rank == 0 and not checked,
        run_id=run_id,
        counted=_counted_from_env(),
    )
    lock = RunLock(cfg.run_dir).acquire() if rank == 0 else None
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        _share_cpus()
    _init_process_group("cuda" if use_cuda else "cpu")
    try:
        # Every rank decided from the same untouched directory before rank 0 changes anything in it.
        dist.barrier()
        if rank == 0:
            if ready.decision.clear:
                clear_run(cfg.run_dir)
                logger.info("--replace: started %s over", cfg.run_dir)
            mark_job(cfg.run_dir, run_id)  # a restart of this job resumes, whatever its flags
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        trainer = Trainer(cfg, ready.dataset, ready.days, device, ready.searcher, ready.plan)
        trainer.setup(ready.decision.start == "resume")
        result = trainer.run()
        if _rank0():
            print_summary(result, cfg.sharding.budget_bytes)
        # Every rank reaches the end before any tears its process group down: a rank that destroys gloo while
        # its peer is still talking to it can abort at exit ("terminate called without an active exception").
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()
        if lock is not None:
            lock.release()


def job_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrun ... -m jobs.train", description="dimsearch streaming training")
    parser.add_argument("--config", type=Path, default=None, help="YAML config (see jobs/configs/)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run after its last intact checkpoint (= train.resume=auto)"
    )
    parser.add_argument(
        "--replace", action="store_true", help="start an existing run over (its checkpoints and metrics are deleted)"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser


# What bad input raises; any other exception is a bug and keeps its traceback.
BAD_INPUT = (
    ConfigError,
    DatasetError,
    PlanError,
    RunError,
    BudgetError,
    CheckpointError,
    ModelConfigError,
    SearchConfigError,
)


@record
def main(argv: list[str] | None = None) -> None:
    args = job_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _watch_parent()
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume, replace=args.replace)
    except BAD_INPUT as e:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # once per node, not once per rank
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
