"""Export a trained run as a self-contained, versioned bundle for a target topology, and load it back.

    python -m jobs.export --run runs/demo --topology jobs/configs/topology/gpu16x80.yaml --out plans/demo [--dtype int8]
    python -m jobs.export --verify plans/demo [--dtype int8]

A bundle is a directory written atomically (temp dir + rename: it is either complete or absent). `--out` may not
be, contain or lie inside the run, its data or the topology file, and `--overwrite` replaces only an earlier bundle
(`pipeline.dataset.check_output_dir`, checked before any work):

    bundle.json          format `dimsearch-bundle`, version 2, the tables, and the sha256 of every other file
    config.yaml          the run's resolved job config (rebuilds the model: `model.name`, `model.options`)
    dataset.yaml         the dataset spec (features, dense columns, task)
    plan/                the `DimensionPlan` (with `rows/<feature>.parquet` for row-level features), its provenance
                         extended under `export`: run config, data days, metrics at the checkpoint, code version
    sharding_plan.json   the TorchRec sharding plan for the topology: per table its sharding type, compute kernel,
                         ranks, shards and planner-estimated bytes per rank (optimizer state included)
    weights/<table>.pt   one tensor per table (field tables and row-level buckets): `[num_embeddings, logical_dim]`,
                         only the columns the model reads (the physical tail columns, FBGEMM padding, are dropped)
    serving/<table>.pt   the table as serving stores it, in its plan dtype (`FeaturePlan.dtype`): TorchRec's
                         quantised inference rows (uint8, `[num_embeddings, row_bytes]`: int8/int4 rows carry their
                         fp16 scale and bias, every row padded to 16 bytes); their bytes sum to the plan's
                         `serving_bytes` less the projections (which are fp32, in dense.pt)
    dense.pt             every other tensor of the model: the dense model and the row-level projections
    vocab/               the run's `VocabularySet` (raw id → row)

The same run exported twice gives byte-identical bundles: JSON with sorted keys and no clock time, `torch.save`
of freshly cloned contiguous tensors (its archive names and record order are fixed), Parquet without timestamps.

`load_bundle(path)` verifies the manifest (format, version, its own checksum) and every file's checksum, then the
plan, spec, config and vocabulary; `Bundle.inference_model()` rebuilds the unsharded fp32 model (what
`jobs.train.build_recommender` builds, weights from the bundle, logical columns padded back to the physical width
with zeros); `Bundle.served_model()` is the model serving runs: TorchRec's quantised inference tables in the plan's
dtypes holding the bundle's `serving/` bytes; `Bundle.quantized_model(dtypes)` quantises the fp32 weights to other
dtypes (what-if serving).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import pickle
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn

from jobs import faults
from jobs.config import ConfigError, JobConfig, _build, load_config
from jobs.logs import setup_logging
from jobs.runs import LoadedRun, load_run
from jobs.train import build_recommender
from models.recommender import Recommender
from pipeline.dataset import OutputKind, atomic_directory, check_output_dir
from pipeline.errors import DatasetError
from pipeline.spec import DatasetSpec, load_spec
from pipeline.vocab import VocabularySet
from sharding.distributed import SHARDING_TYPES, BudgetError, ShardingConfig, attach_fused_optimizer, plan_sharding
from sharding.embedding import RowRemap
from sharding.plan import ROW_ALIGNMENTS, DimensionPlan, PlanError, TableSpec, row_bytes, sha256_file

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "dimsearch-bundle"
BUNDLE_VERSION = 2  # 2: serving/ holds every table in its plan dtype
MANIFEST = "bundle.json"
REPO = Path(__file__).resolve().parents[1]
# What a bundle directory holds: `--overwrite` replaces a directory only if it holds exactly this.
BUNDLE_OUTPUT = OutputKind(
    "bundle",
    MANIFEST,
    (MANIFEST, "config.yaml", "dataset.yaml", "plan", "sharding_plan.json", "weights", "serving", "dense.pt", "vocab"),
)
EBC_PREFIX = "embedding.ebc.embedding_bags."

ServingDtype = Literal["fp32", "fp16", "int8", "int4", "int2"]
SERVING_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "int8": torch.qint8,
    "int4": torch.quint4x2,
    "int2": torch.quint2x4,
}


class BundleError(ValueError):
    """A bundle that is missing, incomplete, tampered with, of an unknown format or version, or inconsistent."""


class ExportError(ValueError):
    """A run that cannot be exported as asked (e.g. it does not fit the target topology)."""


# ---- topology --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopologyConfig:
    """The cluster a bundle's sharding plan is made for (it need not be present).

    Args:
        world_size: ranks (devices).
        hbm_cap_bytes: memory per device the embedding tables may use: HBM on `cuda`, host memory on `cpu`.
        local_world_size: ranks per host (None: all on one host).
        compute_device: `cuda` or `cpu` (the planner offers row-wise sharding only on `cuda`).
        budget_bytes: total embedding budget over all ranks (None: `hbm_cap_bytes * world_size`); it must not
            exceed that product.
        sharding_types: the sharding types the planner may use (None: the run's `sharding.sharding_types`).
        planner_batch_size: per-rank batch size for the planner's IO estimates (None: the run's).
    """

    world_size: int
    hbm_cap_bytes: int
    local_world_size: int | None = None
    compute_device: Literal["cuda", "cpu"] = "cuda"
    budget_bytes: int | None = None
    sharding_types: tuple[str, ...] | None = None
    planner_batch_size: int | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.world_size < 1:
            problems.append(f"world_size must be >= 1, got {self.world_size}")
        if self.hbm_cap_bytes < 1:
            problems.append(f"hbm_cap_bytes must be > 0, got {self.hbm_cap_bytes}")
        if self.local_world_size is not None and (self.local_world_size < 1 or self.world_size % self.local_world_size):
            problems.append(
                f"local_world_size {self.local_world_size} must be >= 1 and divide world_size {self.world_size}"
            )
        if self.compute_device not in ("cuda", "cpu"):
            problems.append(f"compute_device is '{self.compute_device}', expected 'cuda' or 'cpu'")
        if self.budget_bytes is not None and not 0 < self.budget_bytes <= self.hbm_cap_bytes * self.world_size:
            problems.append(
                f"budget_bytes {self.budget_bytes:,} must be > 0 and at most hbm_cap_bytes × world_size "
                f"({self.hbm_cap_bytes * self.world_size:,}); lower it or drop it to use all device memory"
            )
        if bad := [s for s in self.sharding_types or () if s not in SHARDING_TYPES]:
            problems.append(f"unknown sharding types {bad}; expected some of {list(SHARDING_TYPES)}")
        if self.planner_batch_size is not None and self.planner_batch_size < 1:
            problems.append(f"planner_batch_size must be >= 1, got {self.planner_batch_size}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def total_budget(self) -> int:
        """The budget over all ranks the planner gets (its per-rank cap is this / world_size)."""
        return self.budget_bytes if self.budget_bytes is not None else self.hbm_cap_bytes * self.world_size


def load_topology(path: str | Path) -> TopologyConfig:
    """Read a topology YAML (one `topology:` section); every problem is reported at once.

    Raises:
        ConfigError: the file is missing or not a mapping, or has unknown keys, missing keys or bad values.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"topology file {path} does not exist (shipped topologies are in jobs/configs/topology/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}); fix the syntax") from e
    if not isinstance(raw, dict) or set(raw) != {"topology"} or not isinstance(raw["topology"], dict):
        raise ConfigError(f"{path}: expected exactly one mapping section 'topology:' (see jobs/configs/topology/)")
    values: dict[str, Any] = raw["topology"]
    fields = {f.name: f for f in dataclasses.fields(TopologyConfig)}
    errors = [f"missing key 'topology.{k}'" for k, f in fields.items() if f.default is MISSING and k not in values]
    if errors:  # the dataclass cannot be built; report the unknown keys too
        errors += [f"unknown key 'topology.{k}' (valid keys: {sorted(fields)})" for k in values if k not in fields]
    topology = None if errors else _build(TopologyConfig, values, "topology", errors)
    if errors or topology is None:
        raise ConfigError(f"{len(errors)} problem(s) in the topology {path}:\n  - " + "\n  - ".join(errors))
    assert isinstance(topology, TopologyConfig)
    return topology


def plan_for_topology(
    job: JobConfig, spec: DatasetSpec, dims: DimensionPlan, topology: TopologyConfig, source: str | Path
) -> dict[str, Any]:
    """The model of `job` and `dims` sharded for `topology` (planned on `meta`, fused optimizer attached), as JSON.

    Raises:
        ExportError: the tables do not fit; names `source` and the smallest budget that would fit.
    """
    meta = build_recommender(job, spec, dims, "meta")
    attach_fused_optimizer(meta, job.sharding)
    cfg = ShardingConfig(
        optimizer=job.sharding.optimizer,
        learning_rate=job.sharding.learning_rate,
        sharding_types=job.sharding.sharding_types if topology.sharding_types is None else topology.sharding_types,
        budget_bytes=topology.total_budget,
        planner_batch_size=topology.planner_batch_size or job.sharding.planner_batch_size,
    )
    try:
        plan, report = plan_sharding(
            meta,
            cfg,
            world_size=topology.world_size,
            compute_device=topology.compute_device,
            local_world_size=topology.local_world_size,
        )
    except BudgetError as e:
        needed = (
            f"the smallest budget that fits is {e.smallest_budget:,} bytes "
            f"({math.ceil(e.smallest_budget / topology.world_size):,} per device)"
            if e.smallest_budget
            else "no budget fits (a single table is larger than any device)"
        )
        raise ExportError(
            f"{source}: the run does not fit this topology ({topology.world_size} × "
            f"{topology.hbm_cap_bytes:,} bytes, budget {topology.total_budget:,} bytes); {needed}.\n"
            "  Fix: raise hbm_cap_bytes / budget_bytes or world_size in the topology file, or export a smaller "
            f"plan.\n  Planner: {e}"
        ) from e
    tables: dict[str, Any] = {}
    for module, module_plan in sorted(plan.plan.items()):
        for table, ps in sorted(module_plan.items()):
            spec = ps.sharding_spec
            shards = [
                {
                    "offsets": list(s.shard_offsets),
                    "sizes": list(s.shard_sizes),
                    "placement": str(s.placement),
                }
                for s in (getattr(spec, "shards", None) or [])
            ]
            placed = report.per_table.get(table, {}).get("bytes_per_rank", {})
            tables[table] = {
                "module": module,
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks or []),
                "shards": shards,
                "bytes_per_rank": {str(r): int(b) for r, b in sorted(placed.items())},
            }
    return {
        "topology": {**dataclasses.asdict(topology), "file": Path(source).name, "total_budget": topology.total_budget},
        "sharding_config": dataclasses.asdict(cfg),
        "per_rank_bytes": [int(b) for b in report.per_rank_bytes],
        "total_bytes": int(report.total_bytes),
        "tables": tables,
    }


# ---- export ----------------------------------------------------------------------------------------------------
def code_version() -> str:
    """`git rev-parse HEAD` of this checkout, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _metrics(progress: Mapping[str, Any]) -> dict[str, Any]:
    """The run's metrics at the checkpoint: its position and its newest day and epoch records."""
    days, epochs = progress.get("days") or [], progress.get("epochs") or []
    return {
        "position": progress.get("position", progress.get("next_day")),
        "days_recorded": len(days),
        "last_day": days[-1] if days else None,
        "epochs_recorded": len(epochs),
        "last_epoch": epochs[-1] if epochs else None,
    }


def _provenance(run: LoadedRun) -> dict[str, Any]:
    used = run.dataset.days[: run.cfg.data.days] if run.cfg.data.days else run.dataset.days
    return {
        **run.plan.provenance,
        "export": {
            "run": run.run_dir.name,
            "checkpoint": run.checkpoint.name,
            "config": run.cfg.to_dict(),
            "data": {
                "path": run.cfg.data.path,
                "protocol": run.cfg.data.protocol,
                "days": [d.name for d in used],
                "days_trained": [d["day"] for d in run.progress.get("days") or [] if "day" in d],
            },
            "metrics": _metrics(run.progress),
            "code_version": code_version(),
        },
    }


def _save_tensor(obj: torch.Tensor | dict[str, torch.Tensor], path: Path) -> None:
    # Fresh contiguous copies: torch.save writes a tensor's whole storage, and a column slice's storage is the
    # whole table.
    if isinstance(obj, torch.Tensor):
        torch.save(obj.detach().clone(memory_format=torch.contiguous_format), path)
    else:
        torch.save({k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in obj.items()}, path)


def _canonical(body: Mapping[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, indent=1) + "\n"


def _table_json(t: TableSpec) -> dict[str, Any]:
    return {
        **dataclasses.asdict(t),
        "file": f"weights/{t.name}.pt",
        "serving_file": f"serving/{t.name}.pt",
        "serving_bytes": t.serving_bytes,
    }


def served_model(model: Recommender, plan: DimensionPlan) -> nn.Module:
    """`model` (unsharded, fp32, eval) with its tables as serving stores them: TorchRec's quantised inference tables
    in each table's plan dtype, rows aligned to the plan's `row_alignment` (`quantize_inference_model`, modifying
    `model` in place); `model` itself when every table is fp32."""
    dtypes = plan.dtypes
    if all(d == "fp32" for d in dtypes.values()):
        return model
    from torchrec import EmbeddingBagCollection
    from torchrec.inference.modules import quantize_inference_model
    from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

    quant_prep_customize_row_alignment(model, [EmbeddingBagCollection], plan.row_alignment)
    return quantize_inference_model(model, per_table_weight_dtype={n: SERVING_DTYPES[d] for n, d in dtypes.items()})


def serving_tensors(served: nn.Module, plan: DimensionPlan) -> dict[str, torch.Tensor]:
    """Per table, its stored rows in `served` (a `served_model`), uint8 `[rows, row_bytes]`: views of the lookup
    kernel's own storage (FBGEMM's `split_embedding_weights`, scale and bias in the row) for a quantised model —
    the EBC's `weight` buffer of an int4 table is not that storage — or the fp32 weight viewed as bytes."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    out: dict[str, torch.Tensor] = {}
    for module in served.modules():
        if isinstance(module, IntNBitTableBatchedEmbeddingBagsCodegen):
            splits = module.split_embedding_weights(split_scale_shifts=False)
            for spec, (rows, _) in zip(module.embedding_specs, splits, strict=True):
                out[spec[0]] = rows
    for t in plan.tables():
        if t.name not in out:  # an fp32 model: the table is a parameter
            out[t.name] = served.get_parameter(f"{EBC_PREFIX}{t.name}.weight").detach().contiguous().view(torch.uint8)
    return {t.name: out[t.name] for t in plan.tables()}


def run_inputs(run_dir: str | Path, flag: str = "--run") -> dict[str, Path]:
    """What reading a run reads, for `check_output_dir`: the run directory and its `data.path` (if its config says),
    keyed `flag` and `"{flag}'s data.path"`.

    A missing or unreadable config is left to `load_run` to report.
    """
    inputs = {flag: Path(run_dir)}
    try:
        raw = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        data = raw["data"]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return inputs
    if isinstance(data, str) and data:
        inputs[f"{flag}'s data.path"] = Path(data)
    return inputs


def _with_tables(run: LoadedRun, plan: DimensionPlan, tables: Mapping[str, torch.Tensor]) -> Recommender:
    """The unsharded fp32 model of `plan` (eval): the run's dense model, and `tables`' logical columns padded to
    each table's physical width.

    Raises:
        ExportError: a table of the plan is missing from `tables` or has another shape.
    """
    model = build_recommender(run.cfg, run.dataset.spec, plan, "cpu")
    state = {k: v for k, v in run.model.state_dict().items() if not k.startswith(EBC_PREFIX)}
    for t in plan.tables():
        w = tables.get(t.name)
        if w is None or tuple(w.shape) != (t.num_embeddings, t.logical_dim):
            got = None if w is None else tuple(w.shape)
            raise ExportError(f"table '{t.name}' needs weights ({t.num_embeddings}, {t.logical_dim}), got {got}")
        full = torch.zeros(t.num_embeddings, t.embedding_dim)
        full[:, : t.logical_dim] = w
        state[f"{EBC_PREFIX}{t.name}.weight"] = full
    model.load_state_dict(state, strict=True)
    return model.eval()


def export(
    run_dir: str | Path,
    topology_path: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    dtype: ServingDtype | None = None,
    row_alignment: int | None = None,
    compressed: tuple[DimensionPlan, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the bundle of `run_dir` (newest checkpoint) for the topology in `topology_path` to `out`, atomically.

    Args:
        run_dir: a run directory written by `jobs.train`.
        topology_path: a topology YAML (see `jobs/configs/topology/`).
        out: the bundle directory to create.
        overwrite: replace an existing `out`.
        dtype: serve every table in this dtype instead of the run plan's (post-training quantisation of a trained
            run; a plan with a serving-bytes budget must still meet it).
        row_alignment: pad every served row to this many bytes instead of the plan's (1, 2, 4, 8 or 16; GPU
            serving needs 16).
        compressed: a plan of the same features made from the run's trained weights after training, and its
            tables' fp32 weights (`[rows, logical_dim]`; `search.compress`): exported instead of the run's plan and
            tables, with the run's dense model (`jobs.compress`).

    Returns:
        `out`.

    Raises:
        ConfigError: the topology file is invalid.
        DatasetError: the run is unusable, or `out` is: it exists without `overwrite`, is not a bundle, or is, contains
            or lies inside the run, its data or the topology file (checked before any work; see `check_output_dir`).
        ExportError: the model does not fit the topology, or `dtype` puts the plan over its budget; nothing is
            written.
    """
    # Before any work: the bundle may not land in (or replace) the run, its data or the topology file, and
    # --overwrite replaces only an earlier bundle.
    protected = {**run_inputs(run_dir), "--topology": topology_path}
    out = check_output_dir(out, kind=BUNDLE_OUTPUT, protected=protected, overwrite=overwrite)
    topology = load_topology(topology_path)
    run = load_run(run_dir)
    model, trained = run.model, run.plan
    if compressed is not None:
        trained, tables = compressed
        model = _with_tables(run, trained, tables)
    sharding = plan_for_topology(run.cfg, run.dataset.spec, trained, topology, topology_path)
    state = model.state_dict()
    plan = DimensionPlan(trained.features, trained.budget, trained.dtype, {**_provenance(run), **trained.provenance})
    if dtype is not None or row_alignment is not None:
        try:
            plan = plan.with_dtypes(dtype, row_alignment)
            plan.check_budget()
        except PlanError as e:
            raise ExportError(f"{run_dir}: served in {dtype or 'its plan dtypes'}, {e}") from e
    with atomic_directory(out, overwrite=overwrite) as tmp:
        plan.save(tmp / "plan")
        run.vocab.save(tmp / "vocab")
        run.dataset.spec.save(tmp)
        (tmp / "config.yaml").write_text(yaml.safe_dump(run.cfg.to_dict(), sort_keys=True))
        (tmp / "sharding_plan.json").write_text(_canonical(sharding))
        (tmp / "weights").mkdir()
        for t in plan.tables():
            _save_tensor(state[f"{EBC_PREFIX}{t.name}.weight"][:, : t.logical_dim], tmp / "weights" / f"{t.name}.pt")
        (tmp / "serving").mkdir()
        for name, stored in serving_tensors(served_model(model, plan), plan).items():
            _save_tensor(stored, tmp / "serving" / f"{name}.pt")
        _save_tensor({k: v for k, v in state.items() if not k.startswith(EBC_PREFIX)}, tmp / "dense.pt")
        faults.from_env().hit("export")  # a fault drill: weights written, manifest not (see jobs/faults.py)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        body: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "run": {"name": run.run_dir.name, "checkpoint": run.checkpoint.name},
            "code_version": plan.provenance["export"]["code_version"],
            "topology": sharding["topology"],
            "tables": [_table_json(t) for t in plan.tables()],
            "files": {rel: {"sha256": sha256_file(tmp / rel), "bytes": (tmp / rel).stat().st_size} for rel in files},
        }
        body["checksum"] = hashlib.sha256(_canonical(body).encode()).hexdigest()
        (tmp / MANIFEST).write_text(_canonical(body))
    logger.info("exported %s (%s) to %s", run.run_dir, run.checkpoint.name, out)
    return out


# ---- loading ---------------------------------------------------------------------------------------------------
@dataclass
class Bundle:
    """A verified bundle.

    Args:
        path: the bundle directory.
        manifest: `bundle.json`.
        plan: the dimension plan (with its export provenance).
        cfg: the run's job config.
        spec: the dataset spec.
        vocab: the vocabularies (raw id → row).
        sharding: `sharding_plan.json`.
    """

    path: Path
    manifest: dict[str, Any]
    plan: DimensionPlan
    cfg: JobConfig
    spec: DatasetSpec
    vocab: VocabularySet
    sharding: dict[str, Any]

    @cached_property
    def remap(self) -> RowRemap:
        """Rewrites a KJT of vocabulary rows into the plan's table keys (row-level features); apply it to batches."""
        return RowRemap(self.plan)

    def _load(self, rel: str) -> Any:
        try:
            return torch.load(self.path / rel, map_location="cpu", weights_only=True)
        except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as e:  # a damaged archive
            raise BundleError(f"{self.path / rel}: cannot be read ({e}). Re-export the bundle") from e

    def weights(self, table: str) -> torch.Tensor:
        """The table's logical columns, `[num_embeddings, logical_dim]`.

        Raises:
            BundleError: no such table, or the file's shape is not the plan's.
        """
        t = next((t for t in self.plan.tables() if t.name == table), None)
        if t is None:
            raise BundleError(f"{self.path}: no table '{table}' (tables: {[t.name for t in self.plan.tables()]})")
        w = self._load(f"weights/{table}.pt")
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (t.num_embeddings, t.logical_dim):
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise BundleError(
                f"{self.path}/weights/{table}.pt: holds {got}, the plan needs ({t.num_embeddings}, {t.logical_dim}). "
                "Re-export the bundle"
            )
        return w

    def inference_model(self) -> Recommender:
        """The unsharded fp32 model in eval mode, on CPU: `build_recommender`'s structure, the bundle's weights.

        Raises:
            BundleError: a weights file does not fit the model.
        """
        model = build_recommender(self.cfg, self.spec, self.plan, "cpu")
        state: dict[str, torch.Tensor] = dict(self._load("dense.pt"))
        for t in self.plan.tables():
            full = torch.zeros(t.num_embeddings, t.embedding_dim)
            full[:, : t.logical_dim] = self.weights(t.name)
            state[f"{EBC_PREFIX}{t.name}.weight"] = full
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BundleError(f"{self.path}/dense.pt: does not fit the model of the plan ({e}). Re-export") from e
        return model.eval()

    def _dtypes(
        self, dtypes: Mapping[str, ServingDtype] | None, default: ServingDtype | None
    ) -> dict[str, ServingDtype]:
        names = [t.name for t in self.plan.tables()]
        if unknown := sorted(set(dtypes or {}) - set(names)):
            raise ValueError(f"dtypes name tables {unknown} that the bundle lacks; its tables are {names}")
        planned = self.plan.dtypes
        chosen: dict[str, Any] = {n: (dtypes or {}).get(n, planned[n] if default is None else default) for n in names}
        if bad := sorted({d for d in chosen.values() if d not in SERVING_DTYPES}):
            raise ValueError(f"serving dtypes {bad} are not supported; use {sorted(SERVING_DTYPES)}")
        return chosen

    def quantized_model(
        self, dtypes: Mapping[str, ServingDtype] | None = None, default: ServingDtype | None = None
    ) -> nn.Module:
        """The inference model with its fp32 weights quantised to TorchRec's inference tables (the dense model stays
        fp32): what serving would run in other dtypes.

        Args:
            dtypes: per-table serving dtype (`fp32`, `fp16`, `int8`, `int4`); tables not named get `default`.
            default: the dtype of the other tables (None: each table's plan dtype).
        """
        from torchrec.inference.modules import quantize_inference_model

        chosen = self._dtypes(dtypes, default)
        return quantize_inference_model(
            self.inference_model(), per_table_weight_dtype={n: SERVING_DTYPES[d] for n, d in chosen.items()}
        )

    def served_model(self) -> nn.Module:
        """The model serving runs: the plan's dtypes, each table holding exactly the bundle's `serving/` bytes.

        Raises:
            BundleError: a serving file does not fit its table.
        """
        model = served_model(self.inference_model(), self.plan)
        for name, stored in serving_tensors(model, self.plan).items():
            saved = self._load(f"serving/{name}.pt")
            if not isinstance(saved, torch.Tensor) or saved.dtype != torch.uint8 or saved.shape != stored.shape:
                got = (saved.dtype, tuple(saved.shape)) if isinstance(saved, torch.Tensor) else type(saved).__name__
                raise BundleError(
                    f"{self.path}/serving/{name}.pt: holds {got}, table '{name}' stores uint8 {tuple(stored.shape)} "
                    f"in {self.plan.dtypes[name]}. Re-export the bundle"
                )
            stored.copy_(saved)  # the lookup kernel's own storage (a view of the TBE weights)
        return model

    def as_run(self, data_path: str | Path | None = None) -> LoadedRun:
        """The bundle opened as a run for `jobs.evaluate`: its config, plan, vocabulary and fp32 model, and the
        served model (`served_model`) that scores it; the days it was trained on from its export provenance.

        Args:
            data_path: the dataset to score (same spec); None: the run's `data.path`.
        """
        from pipeline.dataset import Dataset

        export_prov = self.plan.provenance.get("export", {})
        metrics = export_prov.get("metrics", {})
        progress: dict[str, Any] = {
            "days": [{"day": d} for d in export_prov.get("data", {}).get("days_trained", [])],
            "epochs": [{}] * int(metrics.get("epochs_recorded") or 0),
            "position": metrics.get("position") or [0, 0, 0],
        }
        dataset = Dataset(data_path or self.cfg.data.path)
        model = self.inference_model()
        return LoadedRun(
            self.path, self.path, self.cfg, dataset, self.plan, self.vocab, model, progress, self.served_model()
        )

    def serving_bytes(
        self, dtypes: Mapping[str, ServingDtype] | None = None, default: ServingDtype | None = None
    ) -> dict[str, int]:
        """Per table, the bytes of its quantised serving copy (physical width, rows aligned to 16 bytes)."""
        chosen = self._dtypes(dtypes, default)
        return {
            t.name: t.num_embeddings * row_bytes(t.embedding_dim, chosen[t.name], t.row_alignment)
            for t in self.plan.tables()
        }

    def summary(self, dtypes: Mapping[str, ServingDtype] | None = None, default: ServingDtype | None = None) -> str:
        """Per table: dims, rows, fp32 bytes (physical width) and serving bytes, like the planner's report."""
        chosen = self._dtypes(dtypes, default)
        serving = self.serving_bytes(dtypes, default)
        lines = [f"{'table':<20}{'dims':>10}{'rows':>11}{'fp32 bytes':>14}{'serving':>8}{'serving bytes':>15}"]
        fp32_total = 0
        for t in self.plan.tables():
            fp32 = t.num_embeddings * t.embedding_dim * 4
            fp32_total += fp32
            lines.append(
                f"{t.name:<20}{f'{t.logical_dim}/{t.embedding_dim}':>10}{t.num_embeddings:>11,}{fp32:>14,}"
                f"{chosen[t.name]:>8}{serving[t.name]:>15,}"
            )
        lines.append(
            f"{'total':<20}{'':>10}{sum(t.num_embeddings for t in self.plan.tables()):>11,}{fp32_total:>14,}"
            f"{'':>8}{sum(serving.values()):>15,}"
        )
        return "\n".join(lines)


def load_bundle(path: str | Path) -> Bundle:
    """Open and verify a bundle: manifest format, version and checksum, every file's checksum, then its parts.

    Raises:
        BundleError: naming the file at fault and the fix.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(
            f"{manifest_path}: no bundle manifest here. Point at a directory written by `python -m jobs.export`"
        )
    try:
        body = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{manifest_path}: not valid JSON ({e}). The file is damaged: re-export the bundle") from e
    if not isinstance(body, dict) or body.get("format") != BUNDLE_FORMAT:
        got = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise BundleError(f"{manifest_path}: format is {got!r}, expected {BUNDLE_FORMAT!r}. Not a dimsearch bundle")
    if body.get("version") != BUNDLE_VERSION:
        raise BundleError(
            f"{manifest_path}: bundle version {body.get('version')!r} is not supported (this dimsearch reads version "
            f"{BUNDLE_VERSION}). Re-export the run with this dimsearch, or load it with the version that wrote it"
        )
    checksum = body.pop("checksum", None)
    if checksum != hashlib.sha256(_canonical(body).encode()).hexdigest():
        raise BundleError(
            f"{manifest_path}: checksum mismatch: the manifest was edited or damaged after export. Re-export the bundle"
        )
    files: dict[str, Any] = body.get("files", {})
    for rel, meta in sorted(files.items()):
        if not (path / rel).is_file():
            raise BundleError(f"{path / rel}: missing (listed in {MANIFEST}). Re-export the bundle or restore the file")
        if sha256_file(path / rel) != meta["sha256"]:
            raise BundleError(
                f"{path / rel}: checksum mismatch: the file was changed after export. Re-export the bundle or "
                "restore the file"
            )
    needed = ["config.yaml", "dataset.yaml", "dense.pt", "plan/plan.json", "sharding_plan.json", "vocab/vocab.json"]
    needed += [t[k] for t in body.get("tables", []) for k in ("file", "serving_file")]
    if missing := [rel for rel in needed if rel not in files]:
        raise BundleError(f"{manifest_path}: does not list {missing}. The bundle is incomplete: re-export it")
    try:
        plan = DimensionPlan.load(path / "plan")
        spec = load_spec(path)
        vocab = VocabularySet.load(path / "vocab")
        cfg = load_config(path / "config.yaml")
    except (PlanError, DatasetError, ConfigError) as e:
        raise BundleError(f"{path}: {e}\n  Fix: re-export the bundle") from e
    listed = [t["name"] for t in body.get("tables", [])]
    if listed != [t.name for t in plan.tables()]:
        raise BundleError(
            f"{manifest_path}: lists tables {listed} but plan/plan.json has {[t.name for t in plan.tables()]}. "
            "Re-export the bundle"
        )
    sharding = json.loads((path / "sharding_plan.json").read_text())
    return Bundle(path, {**body, "checksum": checksum}, plan, cfg, spec, vocab, sharding)


# ---- command line ----------------------------------------------------------------------------------------------
def verify(
    path: str | Path, dtypes: Mapping[str, ServingDtype] | None = None, default: ServingDtype | None = None
) -> str:
    """Load and verify the bundle, rebuild its fp32 and served models (and a quantised one if `dtypes` or `default`
    ask for other dtypes), and return its per-table report.

    Raises:
        BundleError: the bundle is bad.
    """
    bundle = load_bundle(path)
    bundle.inference_model()
    bundle.served_model()
    if dtypes or default is not None:
        bundle.quantized_model(dtypes, default)
    topo = bundle.sharding["topology"]
    head = (
        f"bundle {bundle.path}: run {bundle.manifest['run']['name']} ({bundle.manifest['run']['checkpoint']}), "
        f"code {bundle.manifest['code_version']}, topology {topo['file']} ({topo['world_size']} × "
        f"{topo['compute_device']}), planned embedding memory {bundle.sharding['total_bytes']:,} bytes"
    )
    return f"{head}\n{bundle.summary(dtypes, default)}\nOK"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description="export or verify a serving bundle")
    parser.add_argument("--run", type=Path, help="run directory (<train.out_dir>/<train.name>)")
    parser.add_argument("--topology", type=Path, help="topology YAML (jobs/configs/topology/)")
    parser.add_argument("--out", type=Path, help="bundle directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--verify", type=Path, metavar="BUNDLE", help="verify a bundle and print its tables")
    parser.add_argument(
        "--dtype",
        choices=sorted(SERVING_DTYPES),
        default=None,
        help="serve every table in this dtype instead of the run plan's (export), or report them in it (--verify)",
    )
    parser.add_argument(
        "--row-alignment",
        type=int,
        choices=ROW_ALIGNMENTS,
        default=None,
        help="export: pad every served row to this many bytes instead of the plan's (GPU serving needs 16)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if args.verify is None and None in (args.run, args.topology, args.out):
        parser.error("give --run, --topology and --out to export, or --verify BUNDLE")
    try:
        if args.verify is not None:
            print(verify(args.verify, default=args.dtype))
        else:
            out = export(
                args.run,
                args.topology,
                args.out,
                overwrite=args.overwrite,
                dtype=args.dtype,
                row_alignment=args.row_alignment,
            )
            print(f"bundle: {out}")
            print(verify(out))
    except (BundleError, ExportError, ConfigError, DatasetError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
