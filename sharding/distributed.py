"""Sharding a model's embedding tables under a memory budget (DESIGN.md decisions 7, 10, 11).

The recipe is TorchRec's own (as in `torchrec_dlrm`): build the model on `meta`, attach the fused embedding
optimizer with `apply_optimizer_in_backward` *before* planning (so the planner counts optimizer state), plan with
`EmbeddingShardingPlanner.collective_plan` for the topology (rank 0 plans and broadcasts), and wrap the model in
`DistributedModelParallel`, which materialises the shards on each rank.

The budget is the total embedding memory as the planner estimates it (weights, optimizer state, IO buffers),
spread evenly as each rank's capacity, with no extra reservation: a plan that does not fit fails with the
planner's own breakdown and the smallest budget that would fit (found by bisection on the planner). The same
function plans for a topology that is not present (e.g. 16 GPUs × 80 GB) when given no process group.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, PlannerError, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

logger = logging.getLogger(__name__)

FusedOptimizer = Literal["sgd", "adagrad", "rowwise_adagrad"]
SHARDING_TYPES = (
    "table_wise",
    "column_wise",
    "table_column_wise",
    "data_parallel",
    "row_wise",
    "table_row_wise",
)
GPU_ONLY_SHARDING_TYPES = ("row_wise", "table_row_wise")
_UNLIMITED = 1 << 50


class BudgetError(ValueError):
    """The embedding tables do not fit the memory budget; carries the planner's breakdown and the smallest budget."""

    def __init__(self, message: str, smallest_budget: int | None) -> None:
        super().__init__(message)
        self.smallest_budget = smallest_budget


@dataclass(frozen=True)
class ShardingConfig:
    """How embedding tables are optimised and placed.

    Args:
        optimizer: the fused embedding optimizer (on CPU FBGEMM supports only these three).
        learning_rate: its learning rate.
        sharding_types: sharding types the planner may use; empty lets it choose among all the device allows.
        budget_bytes: total embedding memory budget across ranks (planner estimate, optimizer state
            included), or None for the device's capacity.
        planner_batch_size: the per-rank batch size the planner assumes for its IO estimates.
        data_parallel_max_bytes: on CPU, the smallest tables are placed data-parallel (replicated, their gradients
            all-reduced with the dense part's, no all-to-all) while their fp32 weights total at most this many bytes,
            when `sharding_types` is empty and the budget allows it; the other tables are placed as the planner
            chooses. On gloo the all-to-alls of sharded tables cost a third of a 2-rank step (BENCHMARKS.md, "speed
            near the limits"); a replicated table's whole gradient is all-reduced and its whole optimizer state
            stepped every step, so the total is capped. 0 leaves every placement to the planner, as on CUDA. With
            every table of `benchmarks.train_throughput` (1.4 MB) replicated, 2 ranks train 1.4-1.55x faster at the
            same day-2 AUC (8 seeds on 1 rank: 0.8607 against 0.8608 as the planner places the tables); at 4 MiB,
            `benchmarks.peers`' Fixed-222 also replicated its 3.3 MB item table and trained 23% slower (80k against
            105k rows/s), so the default is 2 MiB.
    """

    optimizer: FusedOptimizer = "rowwise_adagrad"
    learning_rate: float = 0.05
    sharding_types: tuple[str, ...] = ()
    budget_bytes: int | None = None
    planner_batch_size: int = 8192
    data_parallel_max_bytes: int = 2 << 20

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adagrad", "rowwise_adagrad"):
            raise ValueError(
                f"optimizer is '{self.optimizer}'; the fused CPU kernels support sgd, adagrad and rowwise_adagrad"
            )
        if bad := [s for s in self.sharding_types if s not in SHARDING_TYPES]:
            raise ValueError(f"unknown sharding types {bad}; expected some of {list(SHARDING_TYPES)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be > 0, got {self.budget_bytes}")
        if self.data_parallel_max_bytes < 0:
            raise ValueError(
                f"data_parallel_max_bytes must be >= 0 (0 turns it off), got {self.data_parallel_max_bytes}"
            )


@dataclass(frozen=True)
class MemoryReport:
    """Embedding memory of a sharding plan as the planner estimates it.

    Args:
        per_rank_bytes: bytes on each rank (weights, optimizer state, IO), rank order.
        per_table: per table, its sharding type and the bytes it places on each rank.
    """

    per_rank_bytes: list[int]
    per_table: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.per_rank_bytes)

    def summary(self) -> str:
        ranks = ", ".join(f"rank {r}: {b / 2**20:.2f} MiB" for r, b in enumerate(self.per_rank_bytes))
        return f"embedding memory {self.total_bytes / 2**20:.2f} MiB ({ranks})"


def embedding_collections(module: nn.Module) -> Iterator[tuple[str, EmbeddingBagCollection]]:
    for name, m in module.named_modules():
        if isinstance(m, EmbeddingBagCollection):
            yield name, m


def attach_fused_optimizer(module: nn.Module, cfg: ShardingConfig) -> None:
    """Fuse the embedding optimizer into the backward pass (FBGEMM TBE); do it before planning."""
    optim: type[torch.optim.Optimizer] = {
        "sgd": torch.optim.SGD,
        "adagrad": torch.optim.Adagrad,
        "rowwise_adagrad": RowWiseAdagrad,
    }[cfg.optimizer]
    for _, ebc in embedding_collections(module):
        apply_optimizer_in_backward(optim, ebc.parameters(), {"lr": cfg.learning_rate})


def sharders() -> list[ModuleSharder[nn.Module]]:
    return [cast(ModuleSharder[nn.Module], EmbeddingBagCollectionSharder())]


def _planner(
    module: nn.Module,
    world_size: int,
    compute_device: str,
    per_rank_cap: int,
    cfg: ShardingConfig,
    local_world_size: int | None,
) -> EmbeddingShardingPlanner:
    topology = TopologyFactory.create_topology(
        TrainerConfig(
            world_size=world_size,
            local_world_size=local_world_size or world_size,
            hbm_cap_bytes=per_rank_cap if compute_device == "cuda" else None,
            ddr_cap_bytes=per_rank_cap,
        ),
        kernel_config=KernelConfig(compute_device=compute_device),
    )
    constraints = None
    if cfg.sharding_types:
        allowed = [s for s in cfg.sharding_types if compute_device == "cuda" or s not in GPU_ONLY_SHARDING_TYPES]
        if not allowed:
            raise ValueError(
                f"sharding types {list(cfg.sharding_types)} are GPU-only; on {compute_device} use table_wise, "
                "column_wise, table_column_wise or data_parallel"
            )
        constraints = {
            t: ParameterConstraints(sharding_types=allowed)
            for _, ebc in embedding_collections(module)
            for t in ebc.embedding_bag_configs()
            for t in [t.name]
        }
    elif _prefers_data_parallel(cfg, compute_device):
        sizes = sorted(
            (t.num_embeddings * t.embedding_dim * 4, t.name)
            for _, ebc in embedding_collections(module)
            for t in ebc.embedding_bag_configs()
        )
        replicated, total = [], 0
        for size, name in sizes:  # smallest first, while the total fits
            if total + size > cfg.data_parallel_max_bytes:
                break
            replicated.append(name)
            total += size
        constraints = {name: ParameterConstraints(sharding_types=["data_parallel"]) for name in replicated} or None
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=cfg.planner_batch_size,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(0.0),
        debug=False,
    )


def _prefers_data_parallel(cfg: ShardingConfig, compute_device: str) -> bool:
    return compute_device == "cpu" and not cfg.sharding_types and cfg.data_parallel_max_bytes > 0


def _report(planner: EmbeddingShardingPlanner, world_size: int) -> MemoryReport:
    best = planner._best_plan
    per_rank = [0] * world_size
    per_table: dict[str, dict[str, Any]] = {}
    for option in best or []:
        placed: dict[int, int] = defaultdict(int)
        for shard in option.shards:
            assert shard.storage is not None and shard.rank is not None
            placed[shard.rank] += shard.storage.hbm + shard.storage.ddr
            per_rank[shard.rank] += shard.storage.hbm + shard.storage.ddr
        per_table[option.name] = {"sharding_type": option.sharding_type, "bytes_per_rank": dict(placed)}
    return MemoryReport(per_rank, per_table)


def _smallest_budget(
    module: nn.Module, world_size: int, compute_device: str, cfg: ShardingConfig, local_world_size: int | None
) -> int | None:
    """The smallest total budget the planner can fit, by bisection on the per-rank capacity."""

    def fits(cap: int) -> bool:
        try:
            _planner(module, world_size, compute_device, cap, cfg, local_world_size).plan(module, sharders())
            return True
        except PlannerError:
            return False

    hi = _UNLIMITED
    if not fits(hi):
        return None
    planner = _planner(module, world_size, compute_device, hi, cfg, local_world_size)
    planner.plan(module, sharders())
    report = _report(planner, world_size)
    lo, hi = max(report.total_bytes // world_size - 1, 0), max(report.per_rank_bytes)
    while hi - lo > max(hi // 200, 1024):  # 0.5% precision
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi * world_size


def plan_sharding(
    module: nn.Module,
    cfg: ShardingConfig,
    *,
    world_size: int,
    compute_device: str = "cpu",
    pg: dist.ProcessGroup | None = None,
    local_world_size: int | None = None,
) -> tuple[ShardingPlan, MemoryReport]:
    """Plan the embedding tables of `module` (on `meta`, fused optimizer attached) under `cfg.budget_bytes`.

    With `pg`, rank 0 plans and broadcasts (`collective_plan`), and the memory report is broadcast too. Without
    it the plan is for a topology that need not be present (export).

    Raises:
        BudgetError: no placement fits; the message carries the planner's breakdown and the smallest budget.
    """
    per_rank_cap = _UNLIMITED if cfg.budget_bytes is None else cfg.budget_bytes // world_size

    def plan_here() -> tuple[ShardingPlan | None, MemoryReport | None, str | None]:
        nonlocal cfg
        planner = _planner(module, world_size, compute_device, per_rank_cap, cfg, local_world_size)
        try:
            return planner.plan(module, sharders()), _report(planner, world_size), None
        except PlannerError as e:
            if not _prefers_data_parallel(cfg, compute_device):
                return None, None, str(e)
        # Replicating the small tables did not fit the budget: plan them as the planner would.
        cfg = replace(cfg, data_parallel_max_bytes=0)
        return plan_here()

    # What collective_plan does — rank 0 plans, the result is broadcast — but carrying a planner error to every
    # rank (collective_plan raises on rank 0 only and leaves the others waiting).
    plan, report, error = invoke_on_rank_and_broadcast_result(pg, 0, plan_here) if pg is not None else plan_here()
    cfg = replace(cfg, data_parallel_max_bytes=0)  # the smallest budget, if asked for, is without replication
    if error is not None or plan is None or report is None:
        smallest = _smallest_budget(module, world_size, compute_device, cfg, local_world_size)
        hint = (
            f"the smallest budget that fits is {smallest:,} bytes ({smallest / 2**20:.2f} MiB) on {world_size} ranks"
            if smallest
            else "no budget fits: a single table is larger than any rank can hold"
        )
        budget = "no budget" if cfg.budget_bytes is None else f"the budget of {cfg.budget_bytes:,} bytes"
        raise BudgetError(
            f"the embedding tables do not fit {budget} over {world_size} ranks; {hint}.\n"
            "Possible solutions: raise sharding.budget_bytes, use smaller dims, or add ranks.\n"
            f"TorchRec planner: {error}",
            smallest,
        )
    logger.info("sharding plan: %s", report.summary())
    return plan, report


def shard_model(
    module: nn.Module, plan: ShardingPlan, pg: dist.ProcessGroup, device: torch.device
) -> DistributedModelParallel:
    """Wrap `module` in `DistributedModelParallel` with `plan` (the dense part goes to DDP)."""
    return DistributedModelParallel(
        module=module, env=ShardingEnv.from_process_group(pg), device=device, plan=plan, sharders=sharders()
    )


# FBGEMM's TBE optimizers use this epsilon; the replicated tables' optimizers match it.
FBGEMM_EPS = 1e-8


def _is_replicated_table(name: str) -> bool:
    """Whether a parameter the fused optimizer does not own is an EBC table: a data-parallel one, which DMP
    replicates as a plain parameter (its DDP all-reduces the gradient) without the in-backward optimizer."""
    return ".embedding_bags." in name and name.endswith(".weight")


def replicated_table_optimizer(
    cfg: ShardingConfig, world_size: int
) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    """The optimizer of data-parallel tables: `cfg.optimizer` at `cfg.learning_rate`, as the fused kernel of a
    sharded table would apply it.

    A sharded table's gradient sums the examples of every rank's batch (each rank's mean loss), where DDP averages a
    replicated table's over the ranks: SGD's learning rate is scaled by the world size to take the same step. The
    Adagrads divide by the root of their own accumulated squares, so the scale cancels (up to epsilon).
    """
    lr = cfg.learning_rate
    if cfg.optimizer == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr * world_size)
    if cfg.optimizer == "adagrad":
        return lambda params: torch.optim.Adagrad(params, lr=lr, eps=FBGEMM_EPS)
    return lambda params: RowWiseAdagrad(params, lr=lr, eps=FBGEMM_EPS)


def combined_optimizer(
    dmp: DistributedModelParallel,
    dense_lr: float,
    exclude: Callable[[str], bool] | None = None,
    sharding: ShardingConfig | None = None,
    world_size: int = 1,
) -> CombinedOptimizer:
    """The fused embedding optimizer plus Adagrad over the dense parameters (the in-backward ones filtered out).

    Tables the planner made data-parallel are not fused (DMP replicates them as plain parameters): they get the
    embedding optimizer of `sharding` (`replicated_table_optimizer`), not the dense one.

    Args:
        dmp: the sharded model.
        dense_lr: Adagrad's learning rate.
        exclude: dense parameter names another optimizer owns (e.g. a search's architecture weights).
        sharding: the embedding optimizer's settings (default `ShardingConfig()`).
        world_size: the ranks the model is sharded over.
    """
    rest = {
        name: p
        for name, p in in_backward_optimizer_filter(dmp.named_parameters())
        if exclude is None or not exclude(name)
    }
    tables = {name: p for name, p in rest.items() if _is_replicated_table(name)}
    dense = {name: p for name, p in rest.items() if name not in tables}
    optimizers: list[Any] = [dmp.fused_optimizer]
    if tables:
        make = replicated_table_optimizer(sharding or ShardingConfig(), world_size)
        optimizers.append(KeyedOptimizerWrapper(tables, make))
    if dense:
        optimizers.append(KeyedOptimizerWrapper(dense, lambda params: torch.optim.Adagrad(params, lr=dense_lr)))
    return CombinedOptimizer(optimizers)
