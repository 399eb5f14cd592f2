"""Live reconfiguration: move a trained sharded model and its optimizer onto a new `DimensionPlan` (DESIGN.md 8).

`DMP.reshard` only moves TW/CW shards; a dim change needs new tables. The new model is built (meta → plan →
`DistributedModelParallel`, fresh initialisation of every table) and then filled from the old one, here:

1. `Reconfiguration.save` DCP-saves the old model and its optimizer (`{"model": dmp.state_dict(), "optim":
   optimizer.state_dict()}`, the job's checkpoint layout) to a scratch directory; each rank writes its own shards.
   The old model can be released after this (before the new one is built).
2. `Reconfiguration.load` fills the new model and optimizer:

   - **kept tables** — a table of the new plan with the same name, rows, stored width and logical dim as in the old
     plan, and (row-level buckets) the same member rows in the same order: its weight, and every fused optimizer
     state whose key and global size are unchanged, are DCP-loaded into the new model's / optimizer's own
     `state_dict()` tensors in place. Each rank reads only the pieces of its own shards (DCP re-shards when the
     planner placed the table elsewhere), and the values are bit-identical. This is the common case: field-level
     features untouched, row-level buckets whose membership did not change.
   - **dense parameters** (the dense model, learned projections) whose name and shape are unchanged are DCP-loaded
     the same way, and so is their dense optimizer state (torch Adagrad's `sum` and `step`) when its key and shape
     are unchanged. A dense parameter whose shape changed keeps the new model's initialisation and fresh state (its
     inputs mean something else now), as `migrate_weights` does.
   - **changed tables** (new, resized, or with other member rows) are filled row by row from the old tables their
     rows come from, with `migrate_weights`' rule: a row keeps its old logical columns, cut to the new dim or padded
     with zeros (or what a supplied transform returns, ESAPN's learned maps); rows new to the plan, and the columns
     past each row's logical dim, keep the new model's initialisation. Only the old tables that feed this rank's
     shards of changed tables are read whole (`read_tensors`), never the whole model, and each rank writes only
     its own shards; no full CPU copy of the model is built.

   **Optimizer state of migrated rows** moves with the row, by kind of state tensor (classified by its shape against
   the table's): *row-wise* (RowWiseAdagrad's `momentum1`, one value per row; a column-wise-sharded table holds one
   copy per column shard, which are averaged when read and repeated when written; a data-parallel table's
   RowWiseAdagrad `sum` is the same values as a column) is carried as it is; *per
   element* (Adagrad's `momentum1`, torch Adagrad's `sum` for a data-parallel table) is cut or zero-padded like the
   weight, or — under a learned transform, for rows whose dim changed — replaced by the row's old mean broadcast
   over its new logical columns; a per-element source feeding a row-wise target gives the mean over the row's old
   logical columns, and a row-wise source feeding a per-element target is broadcast over the new logical columns
   (so placement changes between fused and data-parallel keep the accumulators' scale). *Scalars* (torch Adagrad's
   `step`) take the largest of the source tables' values. States are matched by name (`momentum1`, `sum`, `step`),
   or, when a table has one non-scalar state on each side, to each other. New rows, tail columns and states with no
   source keep the new optimizer's fresh (zero) state. A kept table whose optimizer state changed form (a move
   between a fused and a data-parallel placement, or a new number of column shards) keeps its weights bit for bit
   and has its state converted by the same rules with every row mapping to itself.

`PlannedModel` is the live model the job trains (plan, DMP, combined optimizer, remap, memory report), and its
`reconfigure` is these two steps around a rebuild. `reconfigure_live` does both steps for a caller that holds both
models at once. The diff between two plans
(`Reconfiguration.moves`) is plain data and needs no process group.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from sharding.checkpoint import RowTransform, read_tensors, save_checkpoint, tensor_metadata
from sharding.distributed import ShardingConfig, attach_fused_optimizer, combined_optimizer, plan_sharding, shard_model
from sharding.embedding import RowRemap
from sharding.plan import DimensionPlan, FeaturePlan, TableSpec

logger = logging.getLogger(__name__)

TABLE_PREFIX = "embedding.ebc.embedding_bags."


def _libc_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_memory() -> None:
    """Collect Python's cycles, then hand the C heap's free pages back to the OS (glibc `malloc_trim(0)`; a no-op
    where the C library has none).

    glibc keeps what is freed below its mmap threshold (raised up to 32 MiB as large blocks are freed) in its arenas,
    and returns only the free tail of the main heap. The job frees large structures every day (a day's batches, the
    vocabulary's grown hash tables, the old model of a reconfiguration), so a rank's resident memory grew with the
    days although its live data did not: at 100M rows, ESAPN's rank 1 held 5.64 GB of which `malloc_trim(0)` gave
    back 1.32 GB.
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


StateKind = Literal["element", "row", "scalar"]


class ReconfigurationError(ValueError):
    """A reconfiguration that cannot be carried out as asked (named, with what to do)."""


@dataclass(frozen=True)
class TableMove:
    """How one table of the new plan is filled.

    Args:
        table: the new table's name.
        kept: True when the table is unchanged (moved shard-locally, bit for bit); False when it is migrated.
        sources: the old tables its rows come from (empty for a kept table, or a table of all-new rows).
        reason: why a migrated table changed (e.g. "dim 6 -> 7", "member rows changed", "new table").
    """

    table: str
    kept: bool
    sources: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class ReconfigurationReport:
    """What `Reconfiguration.load` did. The table lists are the plans' (the same on every rank); the rest is this
    rank's (an optimizer holds only the state of its own shards).

    Args:
        kept_tables: tables moved shard-locally (weights bit-identical), in the new plan's order.
        migrated_tables: tables filled row by row from the old tables, in the new plan's order.
        kept_dense: dense state keys (model) restored bit for bit.
        fresh_dense: dense state keys left at the new model's initialisation (new, or of another shape).
        kept_states: optimizer state keys (`<param>/<state>`) restored bit for bit.
        migrated_states: optimizer state keys filled by the row rule.
        fresh_states: optimizer state keys left fresh (nothing to carry).
        tables_read: old tables this rank read whole (weights or optimizer state).
    """

    kept_tables: tuple[str, ...]
    migrated_tables: tuple[str, ...]
    kept_dense: tuple[str, ...]
    fresh_dense: tuple[str, ...]
    kept_states: tuple[str, ...]
    migrated_states: tuple[str, ...]
    fresh_states: tuple[str, ...]
    tables_read: tuple[str, ...]

    def summary(self) -> str:
        return (
            f"{len(self.kept_tables)} tables kept shard-locally, {len(self.migrated_tables)} migrated "
            f"({len(self.tables_read)} old tables read whole on this rank); dense: {len(self.kept_dense)} kept, "
            f"{len(self.fresh_dense)} fresh; optimizer state: {len(self.kept_states)} kept, "
            f"{len(self.migrated_states)} migrated, {len(self.fresh_states)} fresh"
        )


@dataclass(frozen=True)
class _Block:
    """A piece of a tensor this rank holds: the tensor (a view into the live storage) and where it sits."""

    tensor: torch.Tensor
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def _blocks(t: Any, where: str) -> list[_Block]:
    if isinstance(t, ShardedTensor):
        return [
            _Block(s.tensor, tuple(s.metadata.shard_offsets), tuple(s.metadata.shard_sizes)) for s in t.local_shards()
        ]
    if isinstance(t, DTensor):
        raise ReconfigurationError(
            f"{where} is a DTensor; only ShardedTensor and plain tensors are supported. Build the model without "
            "DTensor output (TorchRec's default)"
        )
    if isinstance(t, torch.Tensor):
        return [_Block(t, (0,) * t.dim(), tuple(t.shape))]
    raise ReconfigurationError(f"{where} is a {type(t).__name__}, expected a tensor")


def _global_size(t: Any) -> tuple[int, ...]:
    # ShardedTensor.size() warns that ShardedTensor is deprecated; its metadata says the same without the warning.
    return tuple(t.metadata().size) if isinstance(t, ShardedTensor) else tuple(t.size())


def _kind(size: tuple[int, ...], rows: int) -> StateKind | None:
    """A state tensor's kind from its global size against its table's rows (None: a layout not understood)."""
    if len(size) == 0 or (len(size) == 1 and size[0] == 1 and rows != 1):
        return "scalar"
    if len(size) == 2 and size[0] == rows:
        # RowWiseAdagrad keeps a data-parallel table's per-row accumulator as a column.
        return "row" if size[1] == 1 else "element"
    if len(size) == 1 and rows > 0 and size[0] % rows == 0:
        return "row"
    return None


def _state_name(state_key: str, table: str) -> str:
    """`t_x.momentum1` → `momentum1` (fused states carry the table's name); `sum` stays `sum`."""
    return state_key[len(table) + 1 :] if state_key.startswith(f"{table}.") else state_key


def _members(feature: FeaturePlan, bucket: int) -> np.ndarray:
    """The feature rows of one bucket's table, in local-row order."""
    return np.flatnonzero(feature.remap[0] == bucket)


def _table_moves(old: DimensionPlan, new: DimensionPlan) -> dict[str, TableMove]:
    moves: dict[str, TableMove] = {}
    old_features = set(old.feature_names)
    for nf in new.features:
        of = old[nf.feature] if nf.feature in old_features else None
        old_specs = {t.name: (i, t) for i, t in enumerate(of.tables())} if of is not None else {}
        for b, t in enumerate(nf.tables()):
            if of is None:
                moves[t.name] = TableMove(t.name, False, (), "new feature")
                continue
            members = _members(nf, b)
            mapped = members[members < of.num_embeddings]
            sources = tuple(sorted({of.tables()[i].name for i in np.unique(of.remap[0][mapped])}))
            if t.name not in old_specs:
                moves[t.name] = TableMove(t.name, False, sources, "new table")
                continue
            ob, ot = old_specs[t.name]
            if (ot.num_embeddings, ot.embedding_dim) != (t.num_embeddings, t.embedding_dim):
                reason = f"shape {ot.num_embeddings}x{ot.embedding_dim} -> {t.num_embeddings}x{t.embedding_dim}"
            elif ot.logical_dim != t.logical_dim:
                reason = f"dim {ot.logical_dim} -> {t.logical_dim}"
            elif not np.array_equal(_members(of, ob), members):
                reason = "member rows changed"
            else:
                moves[t.name] = TableMove(t.name, True)
                continue
            moves[t.name] = TableMove(t.name, False, sources, reason)
    return moves


class Reconfiguration:
    """The move from one `DimensionPlan` to another for a live sharded model (see the module docstring).

    Args:
        old: the plan the old model was trained under.
        new: the plan to move to.
        transform: maps changed rows' old vectors to their new dim (ESAPN's learned transforms); default prefix
            slice / zero pad, as `migrate_weights`.
        table_prefix: where the tables' weights sit in the model's state dict (`<prefix><table>.weight`).

    Raises:
        ReconfigurationError: the two plans store tables at different dtypes.
    """

    def __init__(
        self,
        old: DimensionPlan,
        new: DimensionPlan,
        *,
        transform: RowTransform | None = None,
        table_prefix: str = TABLE_PREFIX,
    ) -> None:
        if old.dtype != new.dtype:
            raise ReconfigurationError(
                f"the old plan stores tables as {old.dtype} and the new one as {new.dtype}; a live reconfiguration "
                "keeps the training dtype. Give both plans the same dtype (quantise at export)"
            )
        changed_shared = [
            f.feature
            for f in new.features
            if f.feature in old.feature_names
            and (f.shared_rows or old[f.feature].shared_rows)
            and [t.name for t in f.tables()] != [t.name for t in old[f.feature].tables()]
        ]
        if changed_shared:
            raise ReconfigurationError(
                f"features {changed_shared} move rows into or out of a shared (dim-0) table: many ids share one of "
                "its rows, so no row can be migrated with its optimizer state. Reconfigure from scratch, or compress "
                "after training (`python -m jobs.compress`)"
            )
        self.old, self.new = old, new
        self.transform = transform
        self.table_prefix = table_prefix
        self.moves = _table_moves(old, new)
        self._old_specs = {t.name: t for t in old.tables()}
        self._new_specs = {t.name: t for t in new.tables()}
        self._sources: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._states: dict[str, dict[str, str]] = {}  # per old table, its saved states (set per `load`)

    @property
    def kept_tables(self) -> list[str]:
        return [name for name, m in self.moves.items() if m.kept]

    @property
    def changed_tables(self) -> list[str]:
        return [name for name, m in self.moves.items() if not m.kept]

    def _weight_key(self, table: str) -> str:
        return f"{self.table_prefix}{table}.weight"

    # ---- step 1 ---------------------------------------------------------------------------------------------
    def save(
        self, scratch: str | Path, dmp: nn.Module, optimizer: KeyedOptimizer, pg: dist.ProcessGroup | None = None
    ) -> Path:
        """DCP-save the old model and its optimizer to `scratch` (atomically; each rank writes its own shards).

        Args:
            scratch: a directory for this reconfiguration only (replaced if it exists).
            dmp: the old sharded model.
            optimizer: its optimizer (the `CombinedOptimizer` of the fused and the dense optimizers).
            pg: the process group.

        Returns:
            The scratch directory.
        """
        return save_checkpoint(scratch, {"model": dmp.state_dict(), "optim": optimizer.state_dict()}, pg=pg)

    # ---- step 2 ---------------------------------------------------------------------------------------------
    def load(
        self,
        scratch: str | Path,
        dmp: nn.Module,
        optimizer: KeyedOptimizer,
        pg: dist.ProcessGroup | None = None,
    ) -> ReconfigurationReport:
        """Fill the new, freshly built model and optimizer in place from the old ones saved in `scratch`.

        Collective: every rank of `pg` must call it.

        Args:
            scratch: the directory `save` wrote.
            dmp: the new sharded model, built for the new plan.
            optimizer: its new optimizer (fresh state).
            pg: the process group.

        Returns:
            What was kept, migrated and left fresh on this rank.

        Raises:
            ReconfigurationError: the new model lacks a table of the new plan, or a state tensor has a layout this
                module does not understand.
        """
        scratch = Path(scratch)
        saved = tensor_metadata(scratch)
        self._states = {}
        model_state = dmp.state_dict()
        optim_state: Mapping[str, Mapping[str, Any]] = optimizer.state_dict()["state"]
        table_of = {self._weight_key(t): t for t in self._new_specs}
        if missing := sorted(k for k in table_of if k not in model_state):
            raise ReconfigurationError(
                f"the new model has no state for {missing[:5]}{'...' if len(missing) > 5 else ''}: it was not built "
                f"for the new plan, or its tables are not under '{self.table_prefix}' (pass table_prefix)"
            )

        def unchanged(flat_key: str, target: Any) -> bool:
            m = saved.get(flat_key)
            return m is not None and tuple(m.size) == _global_size(target) and m.properties.dtype == target.dtype

        # Fast path: what is unchanged goes through one collective DCP load, straight into the live tensors.
        fast_model: dict[str, Any] = {}
        kept_dense, fresh_dense = [], []
        for key, target in model_state.items():
            table = table_of.get(key)
            if table is not None:
                if self.moves[table].kept:
                    if not unchanged(f"model.{key}", target):
                        raise ReconfigurationError(
                            f"{scratch}: table '{table}' is unchanged between the plans but the checkpoint's "
                            f"'{key}' is {saved.get(f'model.{key}')}; was it saved under the old plan?"
                        )
                    fast_model[key] = target
            elif unchanged(f"model.{key}", target):
                fast_model[key] = target
                kept_dense.append(key)
            else:
                fresh_dense.append(key)
        fast_optim: dict[str, dict[str, Any]] = defaultdict(dict)
        slow_states: list[tuple[str, str, str, Any]] = []  # (param key, state key, table, target)
        kept_states, fresh_states = [], []
        for param_key, states in optim_state.items():
            table = table_of.get(param_key)
            # A dense parameter's state moves with the parameter: a reshaped one starts fresh (its `step` too).
            carried = self.moves[table].kept if table is not None else param_key not in fresh_dense
            for state_key, target in states.items():
                name = f"{param_key}/{state_key}"
                if not isinstance(target, torch.Tensor):  # a non-tensor state entry: nothing DCP can move
                    fresh_states.append(name)
                elif carried and unchanged(f"optim.state.{param_key}.{state_key}", target):
                    fast_optim[param_key][state_key] = target
                    kept_states.append(name)
                elif table is not None:
                    slow_states.append((param_key, state_key, table, target))
                else:
                    fresh_states.append(name)
        dcp.load({"model": fast_model, "optim": {"state": dict(fast_optim)}}, checkpoint_id=scratch, process_group=pg)

        # Slow path: changed tables' weights, and state that changed form, row by row from whole old tables.
        weight_blocks = {t: _blocks(model_state[self._weight_key(t)], t) for t in self.changed_tables}
        wanted = self._wanted(weight_blocks, slow_states, saved)
        old = read_tensors(scratch, wanted)
        migrated_states = []
        with torch.no_grad():
            for table, blocks in weight_blocks.items():
                self._migrate_weight(table, blocks, old)
            for param_key, state_key, table, target in slow_states:
                name = f"{param_key}/{state_key}"
                if self._migrate_state(table, state_key, target, old, saved):
                    migrated_states.append(name)
                else:
                    fresh_states.append(name)
        report = ReconfigurationReport(
            kept_tables=tuple(self.kept_tables),
            migrated_tables=tuple(self.changed_tables),
            kept_dense=tuple(kept_dense),
            fresh_dense=tuple(fresh_dense),
            kept_states=tuple(kept_states),
            migrated_states=tuple(migrated_states),
            fresh_states=tuple(fresh_states),
            tables_read=tuple(sorted({t for t in self._old_specs for k in wanted if self._belongs(k, t)})),
        )
        if not dist.is_initialized() or dist.get_rank(pg) == 0:
            logger.info("reconfiguration: %s", report.summary())
        return report

    # ---- row mapping ----------------------------------------------------------------------------------------
    def _row_sources(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        """Per local row of a new table: the index of the old table it comes from in the old feature's
        `tables()` (-1: a new row) and its local row there."""
        if table not in self._sources:
            spec = self._new_specs[table]
            nf = self.new[spec.feature]
            bucket = next(b for b, t in enumerate(nf.tables()) if t.name == table)
            members = _members(nf, bucket)
            src_bucket = np.full(members.size, -1, dtype=np.int64)
            src_local = np.zeros(members.size, dtype=np.int64)
            if spec.feature in self.old.feature_names:
                of = self.old[spec.feature]
                mapped = members < of.num_embeddings
                src_bucket[mapped] = of.remap[0][members[mapped]]
                src_local[mapped] = of.remap[1][members[mapped]]
            self._sources[table] = (src_bucket, src_local)
        return self._sources[table]

    def _groups(self, table: str, rows: np.ndarray) -> list[tuple[TableSpec, np.ndarray, np.ndarray]]:
        """For local rows `rows` of a new table, grouped by old table: (old spec, positions in `rows`, old rows)."""
        src_bucket, src_local = self._row_sources(table)
        feature = self._new_specs[table].feature
        if feature not in self.old.feature_names:
            return []
        old_tables = self.old[feature].tables()
        b = src_bucket[rows]
        out = []
        for ob in np.unique(b[b >= 0]):  # a loop over the few old buckets, not over rows
            at = np.flatnonzero(b == ob)
            out.append((old_tables[int(ob)], at, src_local[rows[at]]))
        return out

    def _belongs(self, flat_key: str, table: str) -> bool:
        weight = self._weight_key(table)
        return flat_key == f"model.{weight}" or flat_key.startswith(f"optim.state.{weight}.")

    def _source_states(self, old_table: str, saved: Mapping[str, TensorStorageMetadata]) -> dict[str, str]:
        """The old table's optimizer states in the checkpoint: state name → flattened key."""
        if old_table not in self._states:
            prefix = f"optim.state.{self._weight_key(old_table)}."
            self._states[old_table] = {
                _state_name(k[len(prefix) :], old_table): k for k in saved if k.startswith(prefix)
            }
        return self._states[old_table]

    def _match(
        self, table: str, state_key: str, old_table: str, saved: Mapping[str, TensorStorageMetadata], kind: StateKind
    ) -> str | None:
        """The flattened key of the old table's state that feeds `state_key` of the new table, if any."""
        candidates = self._source_states(old_table, saved)
        name = _state_name(state_key, table)
        if name in candidates:
            return candidates[name]
        if kind == "scalar":
            return None
        rows = self._old_specs[old_table].num_embeddings
        tensors = [k for k in candidates.values() if _kind(tuple(saved[k].size), rows) in ("element", "row")]
        return tensors[0] if len(tensors) == 1 else None

    def _local_rows(self, table: str, blocks: list[_Block], kind: StateKind) -> np.ndarray:
        rows = self._new_specs[table].num_embeddings
        parts = [np.arange(b.offsets[0], b.offsets[0] + b.sizes[0]) for b in blocks if b.sizes and b.sizes[0]]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        local = np.unique(np.concatenate(parts))
        return np.unique(local % rows) if kind == "row" else local

    def _scalar_sources(self, table: str) -> tuple[str, ...]:
        move = self.moves[table]
        return (table,) if move.kept else move.sources

    def _wanted(
        self,
        weight_blocks: Mapping[str, list[_Block]],
        slow_states: list[tuple[str, str, str, Any]],
        saved: Mapping[str, TensorStorageMetadata],
    ) -> list[str]:
        """The flattened keys of the old tensors this rank must read whole: the sources of its own rows."""
        wanted: set[str] = set()
        for table, blocks in weight_blocks.items():
            for spec, _, _ in self._groups(table, self._local_rows(table, blocks, "element")):
                wanted.add(f"model.{self._weight_key(spec.name)}")
        for _, state_key, table, target in slow_states:
            kind = self._target_kind(table, target)
            if kind == "scalar":
                sources = [self._old_specs[t] for t in self._scalar_sources(table)]
            else:
                rows = self._local_rows(table, _blocks(target, state_key), kind)
                sources = [spec for spec, _, _ in self._groups(table, rows)]
            for spec in sources:
                key = self._match(table, state_key, spec.name, saved, kind)
                if key is not None:
                    wanted.add(key)
        return sorted(wanted)

    def _target_kind(self, table: str, target: Any) -> StateKind:
        kind = _kind(_global_size(target), self._new_specs[table].num_embeddings)
        if kind is None:
            raise ReconfigurationError(
                f"table '{table}': an optimizer state of size {_global_size(target)} fits neither one value per "
                f"element ({self._new_specs[table].num_embeddings} x width), per row, nor a scalar. Use sgd, adagrad "
                "or rowwise_adagrad"
            )
        return kind

    # ---- writers --------------------------------------------------------------------------------------------
    def _migrate_weight(self, table: str, blocks: list[_Block], old: Mapping[str, torch.Tensor]) -> None:
        d = self._new_specs[table].logical_dim
        for block in blocks:
            r0, c0 = block.offsets
            nr, nc = block.sizes
            hi = min(c0 + nc, d)
            if hi <= c0 or nr == 0:
                continue
            rows = np.arange(r0, r0 + nr)
            for spec, at, src_rows in self._groups(table, rows):
                src = old[f"model.{self._weight_key(spec.name)}"][torch.from_numpy(src_rows)]
                d_old = spec.logical_dim
                if self.transform is not None and d_old != d:
                    values = self.transform(src[:, :d_old], d_old, d)
                else:
                    values = torch.nn.functional.pad(src[:, : min(d, d_old)], (0, max(d - d_old, 0)))
                block.tensor[torch.from_numpy(rows[at] - r0), : hi - c0] = values[:, c0:hi].to(block.tensor.dtype)

    def _per_row(self, key: str, spec: TableSpec, src_rows: np.ndarray, saved_size: tuple[int, ...], old: Any) -> Any:
        """An old state's value per row (row-wise: averaged over column-shard copies; element-wise: its logical
        columns), for the rows `src_rows` of old table `spec`."""
        full = old[key]
        idx = torch.from_numpy(src_rows)
        if len(saved_size) == 1:
            return full.view(-1, spec.num_embeddings).mean(0)[idx]
        if saved_size[1] == 1:  # per row, as a column
            return full[idx, 0]
        return full[idx, : spec.logical_dim]

    def _migrate_state(
        self,
        table: str,
        state_key: str,
        target: Any,
        old: Mapping[str, torch.Tensor],
        saved: Mapping[str, TensorStorageMetadata],
    ) -> bool:
        """Fill one optimizer state of a new table from its rows' old tables; False when nothing feeds it."""
        kind = self._target_kind(table, target)
        spec = self._new_specs[table]
        rows_new, d = spec.num_embeddings, spec.logical_dim
        blocks = _blocks(target, state_key)
        if kind == "scalar":
            values = []
            for source in self._scalar_sources(table):
                key = self._match(table, state_key, source, saved, kind)
                if key is not None:
                    values.append(old[key].reshape(-1).max())
            if not values:
                return False
            top = torch.stack(values).max()
            for block in blocks:
                block.tensor.fill_(top.to(block.tensor.dtype))
            return True
        fed = False
        for block in blocks:
            if kind == "row":
                o, n = block.offsets[0], block.sizes[0]
                flat = np.arange(o, o + n)
                rows = flat % rows_new
            else:
                (r0, c0), (nr, nc) = block.offsets, block.sizes
                rows = np.arange(r0, r0 + nr)
                hi = min(c0 + nc, d)
                if hi <= c0:
                    continue
            for old_spec, at, src_rows in self._groups(table, rows):
                key = self._match(table, state_key, old_spec.name, saved, kind)
                if key is None:
                    continue
                fed = True
                saved_size = tuple(saved[key].size)
                per_row = self._per_row(key, old_spec, src_rows, saved_size, old)
                source_is_row = len(saved_size) == 1 or saved_size[1] == 1
                at_t = torch.from_numpy(at)
                if kind == "row":
                    value = per_row if source_is_row else per_row.mean(1)
                    block.tensor[at_t] = value.to(block.tensor.dtype).reshape(block.tensor[at_t].shape)
                    continue
                d_old = old_spec.logical_dim
                if source_is_row:
                    value = per_row[:, None].expand(-1, d)
                elif self.transform is not None and d_old != d:
                    value = per_row.mean(1, keepdim=True).expand(-1, d)
                else:
                    value = torch.nn.functional.pad(per_row[:, : min(d, d_old)], (0, max(d - d_old, 0)))
                r_at = torch.from_numpy(rows[at] - r0)
                block.tensor[r_at, : hi - c0] = value[:, c0:hi].to(block.tensor.dtype)
        return fed


def reconfigure_live(
    old_dmp: nn.Module,
    old_optimizer: KeyedOptimizer,
    old_plan: DimensionPlan,
    new_dmp: nn.Module,
    new_optimizer: KeyedOptimizer,
    new_plan: DimensionPlan,
    scratch: str | Path,
    *,
    pg: dist.ProcessGroup | None = None,
    transform: RowTransform | None = None,
    table_prefix: str = TABLE_PREFIX,
) -> ReconfigurationReport:
    """Move a live model and optimizer onto a new plan's freshly built ones (save to `scratch`, then load).

    Unchanged tables and dense parameters move shard-locally and bit for bit, with their optimizer state; changed
    tables are migrated row by row (prefix slice / zero pad, or `transform`) with their rows' optimizer state; see
    the module docstring for the rules. Collective over `pg`.

    Args:
        old_dmp: the trained sharded model (old plan).
        old_optimizer: its optimizer.
        old_plan: the plan `old_dmp` was built for.
        new_dmp: the sharded model built for `new_plan` (fresh initialisation, filled in place).
        new_optimizer: its fresh optimizer (filled in place).
        new_plan: the plan to move to.
        scratch: a directory for the old state (replaced if it exists; the caller removes it afterwards).
        pg: the process group.
        transform: maps changed rows' old vectors to their new dim; default prefix slice / zero pad.
        table_prefix: where the tables' weights sit in the state dict.

    Returns:
        What was kept, migrated and left fresh on this rank.

    Raises:
        ReconfigurationError: the plans' dtypes differ, the new model was not built for `new_plan`, or an optimizer
            state has a layout that cannot be migrated.
    """
    move = Reconfiguration(old_plan, new_plan, transform=transform, table_prefix=table_prefix)
    move.save(scratch, old_dmp, old_optimizer, pg)
    return move.load(scratch, new_dmp, new_optimizer, pg)


class PlannedModel:
    """The live sharded model of one `DimensionPlan`, as the job trains it: the plan, its
    `DistributedModelParallel` (tables placed by TorchRec's planner under `sharding.budget_bytes`), the
    `CombinedOptimizer` (the fused table optimizer plus Adagrad over the dense parameters), the vocabulary-to-table
    `RowRemap` and the planner's `MemoryReport`. `reconfigure` moves it to another plan in place.

    Args:
        plan: the plan to build.
        make_model: the unsharded model of a plan, built on `meta` (the fused optimizer is attached here).
        sharding: the planner's and the fused optimizer's settings.
        dense_lr: the dense Adagrad's learning rate.
        device: this rank's compute device.
        pg: the process group the tables are sharded over.
        seed: this rank's initialisation seed: every build of a plan initialises its tables the same way, so a
            rebuild from scratch is what a fresh run of that plan starts from.
        exclude: given the sharded model, the names of the dense parameters the combined optimizer leaves out (a
            searcher's own step trains them).
    """

    def __init__(
        self,
        plan: DimensionPlan,
        make_model: Callable[[DimensionPlan], nn.Module],
        sharding: ShardingConfig,
        dense_lr: float,
        device: torch.device,
        pg: dist.ProcessGroup,
        seed: int,
        exclude: Callable[[DistributedModelParallel], set[str]] | None = None,
    ) -> None:
        self.make_model, self.sharding, self.dense_lr = make_model, sharding, dense_lr
        self.device, self.pg, self.seed, self.exclude = device, pg, seed, exclude
        self._build(plan)

    def _build(self, plan: DimensionPlan) -> None:
        meta = self.make_model(plan)
        attach_fused_optimizer(meta, self.sharding)
        sharding_plan, self.memory = plan_sharding(
            meta, self.sharding, world_size=dist.get_world_size(self.pg), compute_device=self.device.type, pg=self.pg
        )
        torch.manual_seed(self.seed)
        self.dmp: DistributedModelParallel = shard_model(meta, sharding_plan, self.pg, self.device)
        excluded = self.exclude(self.dmp) if self.exclude is not None else set()
        self.optimizer: CombinedOptimizer = combined_optimizer(
            self.dmp,
            self.dense_lr,
            exclude=excluded.__contains__,
            sharding=self.sharding,
            world_size=dist.get_world_size(self.pg),
        )
        self.plan, self.remap = plan, RowRemap(plan)

    def reconfigure(
        self,
        new_plan: DimensionPlan,
        scratch: Path,
        from_scratch: bool = False,
        saved: Callable[[], None] | None = None,
    ) -> ReconfigurationReport | None:
        """Move to `new_plan` (`Reconfiguration`): DCP-save this model and optimizer to `scratch` (each rank its own
        shards), release them, build and shard the new plan's, then load shard by shard: unchanged tables and their
        fused optimizer row state bit for bit, changed tables' rows migrated with their state (module docstring).
        Collective over the process group; the caller removes `scratch` afterwards.

        Args:
            new_plan: the plan to move to.
            scratch: a directory for the old state.
            from_scratch: migrate nothing: the new tables and dense model keep exactly the initialisation a fresh
                run of `new_plan` gets (a retrain at the new dims).
            saved: called once the old state is on disk, before anything is rebuilt (the job's fault drills).

        The old model is released before the new one is built; a caller holding references to its modules drops
        them first, so that they can be freed.

        Returns:
            What was kept, migrated and left fresh on this rank (None from scratch).
        """
        if from_scratch:
            del self.dmp, self.optimizer
            release_free_memory()
            self._build(new_plan)
            return None
        move = Reconfiguration(self.plan, new_plan)
        move.save(scratch, self.dmp, self.optimizer, pg=self.pg)
        if saved is not None:
            saved()
        # The old model goes before the new one is built (its modules hold reference cycles: collect them now, so
        # that a rank never holds both models' tables at once).
        del self.dmp, self.optimizer
        release_free_memory()
        self._build(new_plan)
        return move.load(scratch, self.dmp, self.optimizer, pg=self.pg)
