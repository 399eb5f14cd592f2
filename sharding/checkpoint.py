"""Checkpoints (DCP, atomic) and reconfiguration to a new `DimensionPlan` (DESIGN.md decisions 8 and 15).

- `save_checkpoint` writes `torch.distributed.checkpoint` shards of the model and optimizer, plus rank 0's extra
  files (plan, vocabulary, searcher state, progress), into a temporary directory that rank 0 renames into place
  after a barrier: a checkpoint directory either is complete or does not exist. Its done marker is a manifest of
  every file's size (and the SHA-256 of every file under 64 MiB), so a checkpoint damaged later (a truncated or
  deleted shard, a truncated `progress.json`) is recognised and skipped, not loaded. Replacing an existing
  checkpoint of the same name renames the old one aside first, so a kill at any point leaves one complete copy.
- `latest_checkpoint` is the newest checkpoint that passes `verify_checkpoint`; each damaged newer one is logged by
  name and skipped (`damaged_checkpoints` lists them with the reason).
- `load_checkpoint` loads into the current sharded model; DCP re-shards on load, so a checkpoint written by two
  ranks loads into one (or into another placement).
- `full_tensors` loads a checkpoint's tensors whole on every rank (`no_dist`-style planning, no collectives), which
  is how dims change: DMP.reshard only moves shards, it cannot change a table's width.
- `migrate_weights` maps the old plan's tables onto the new plan's, row by row but vectorised per bucket: a row
  whose logical dim did not change keeps its vector bit for bit; a changed row gets the prefix of its old vector
  (shrink) or the old vector padded with zeros (grow), or whatever a supplied transform returns (ESAPN's learned
  transforms); rows new to the plan keep the new table's initialisation. Dense parameters of unchanged shape are
  copied; one whose shape changed keeps its fresh initialisation (its inputs mean something else now: a
  concatenation of differently sized fields, say).
- `load_full_weights` copies whole tensors into a sharded model: each rank copies its own shards' slices.
- `tensor_metadata` / `read_tensors` list a checkpoint's tensors and read chosen ones whole (`sharding.live` reads
  only the tables a reconfiguration changes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from sharding.plan import DimensionPlan, FeaturePlan, sha256_file

logger = logging.getLogger(__name__)

CHECKPOINT_DONE = "COMPLETE"
RowTransform = Callable[[torch.Tensor, int, int], torch.Tensor]  # (old vectors [n, d_old], d_old, d_new) -> [n, d_new]


def _rank(pg: dist.ProcessGroup | None) -> int:
    return dist.get_rank(pg) if dist.is_initialized() else 0


def _barrier(pg: dist.ProcessGroup | None) -> None:
    if dist.is_initialized():
        dist.barrier(group=pg)


class CheckpointError(ValueError):
    """A checkpoint directory that is incomplete or damaged (named, with what is wrong)."""


_HASH_LIMIT = 64 << 20  # files up to this size are hashed too; larger shards are checked by size


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != CHECKPOINT_DONE:
            size = p.stat().st_size
            entry: dict[str, Any] = {"bytes": size}
            if size <= _HASH_LIMIT:
                entry["sha256"] = sha256_file(p)
            files[p.relative_to(directory).as_posix()] = entry
    return files


def verify_checkpoint(directory: str | Path) -> None:
    """Check a checkpoint against its done marker's manifest.

    Raises:
        CheckpointError: the marker is missing or unreadable, or a file is missing, of another size or content.
    """
    directory = Path(directory)
    marker = directory / CHECKPOINT_DONE
    if not marker.is_file():
        raise CheckpointError(f"{directory}: no {CHECKPOINT_DONE} marker (the write did not finish)")
    text = marker.read_text()
    if text == "ok\n":  # written before checkpoints carried a manifest: complete, but nothing to verify against
        return
    try:
        manifest = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker}: unreadable manifest ({e})") from None
    for rel, want in manifest.items():
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the manifest lists it)")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{path}: {size:,} bytes, the manifest says {want['bytes']:,} (truncated?)")
        if "sha256" in want and sha256_file(path) != want["sha256"]:
            raise CheckpointError(f"{path}: its contents differ from the manifest's checksum")


def save_checkpoint(
    directory: str | Path,
    state: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
    pg: dist.ProcessGroup | None = None,
    stage: Callable[[str], None] | None = None,
) -> Path:
    """Write a DCP checkpoint of `state` (e.g. `{"model": dmp.state_dict(), "optim": opt.state_dict()}`) atomically.

    Args:
        directory: the final checkpoint directory (must not exist yet, or is replaced).
        state: the stateful dict DCP saves; ShardedTensors are written by their owning ranks.
        extra: called on rank 0 with the temporary directory to write plain files (plan, vocabulary, progress).
        pg: the process group.
        stage: called with `"written"` once the shards are on disk (before the done marker), and on rank 0 with
            `"replacing"` between moving an old checkpoint of the same name aside and renaming the new one in
            (progress reporting and fault drills).
    """
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    if _rank(pg) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(pg)
    dcp.save(state, checkpoint_id=tmp, process_group=pg)
    if stage is not None:
        stage("written")
    if _rank(pg) == 0:
        if extra is not None:
            extra(tmp)
        write_text_atomic(tmp / CHECKPOINT_DONE, json.dumps({"files": _manifest(tmp)}, indent=1))
        old = _aside(directory)
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)  # never rmtree before the rename: a kill here keeps the old copy, aside
        if stage is not None:
            stage("replacing")
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    _barrier(pg)
    return directory


def _aside(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` through a temporary sibling renamed over it (fsynced first): readers see old or new, never half."""
    part = path.with_name(f".{path.name}.part")
    with part.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    part.replace(path)


def damaged_checkpoints(root: str | Path) -> list[tuple[Path, str]]:
    """Checkpoints under `root` that are not complete and intact, each with the reason (newest first)."""
    return [(p, why) for p, why in _candidates(Path(root)) if why]


def _candidates(root: Path) -> Iterator[tuple[Path, str]]:
    """Every checkpoint under `root`, newest first, with '' or why it cannot be loaded, verified one at a time as
    the caller asks (a resume reads back only to the newest intact one). A checkpoint moved aside while being
    replaced (`.<name>.old`) stands in for `<name>` when a kill left no `<name>`."""
    if not root.is_dir():
        return
    named = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    for p in root.glob(".*.old"):
        name = p.name[1 : -len(".old")]
        if p.is_dir() and name not in named:
            named[name] = p
    for name in sorted(named, reverse=True):
        try:
            verify_checkpoint(named[name])
            yield named[name], ""
        except CheckpointError as e:
            yield named[name], str(e)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete, intact checkpoint under `root` (names sort by day); damaged newer ones are logged by name
    and skipped, temporary ones ignored."""
    for path, why in _candidates(Path(root)):
        if not why:
            return path
        logger.warning("skipping damaged checkpoint %s: %s", path, why)
    return None


def load_checkpoint(directory: str | Path, state: dict[str, Any], pg: dist.ProcessGroup | None = None) -> None:
    """Load a DCP checkpoint into `state` in place (DCP re-shards to the current plan and world size)."""
    dcp.load(state, checkpoint_id=Path(directory), process_group=pg)


def tensor_metadata(directory: str | Path) -> dict[str, TensorStorageMetadata]:
    """The global size and dtype of every tensor in a DCP checkpoint, by flattened key (`model.<name>`,
    `optim.state.<param>.<state>` for the `{"model": ..., "optim": ...}` state this project saves); reads only the
    metadata file."""
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    return {k: m for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}


def read_tensors(directory: str | Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a DCP checkpoint (flattened keys), each loaded whole on this rank only (no collectives).

    Args:
        directory: the checkpoint.
        keys: flattened keys, as `tensor_metadata` lists them.

    Raises:
        CheckpointError: a key is not a tensor of the checkpoint.
    """
    reader = dcp.FileSystemReader(str(directory))
    metadata = reader.read_metadata().state_dict_metadata
    wanted: dict[str, torch.Tensor] = {}
    for k in keys:
        m = metadata.get(k)
        if not isinstance(m, TensorStorageMetadata):
            raise CheckpointError(f"{directory}: no tensor '{k}' in the checkpoint (it has {len(metadata)} entries)")
        wanted[k] = torch.zeros(m.size, dtype=m.properties.dtype)
    if wanted:
        dcp.load(wanted, storage_reader=reader, no_dist=True)
    return wanted


def full_tensors(directory: str | Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every tensor under `prefix` in a DCP checkpoint, loaded whole (on this rank only, no collectives)."""
    keys = [k for k in tensor_metadata(directory) if k.startswith(prefix)]
    return {k[len(prefix) :]: v for k, v in read_tensors(directory, keys).items()}


def load_full_weights(module: nn.Module, full: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy whole tensors into `module`'s (possibly sharded) state in place; returns the keys it did not find."""
    missing: list[str] = []
    with torch.no_grad():
        for key, target in module.state_dict().items():
            if key not in full:
                missing.append(key)
                continue
            src = full[key]
            if isinstance(target, ShardedTensor):
                for shard in target.local_shards():
                    rows = tuple(
                        slice(o, o + s)
                        for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes, strict=True)
                    )
                    shard.tensor.copy_(src[rows])
            else:
                target.copy_(src)
    return missing


def _per_row(feature: FeaturePlan, tables: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
    """A feature's rows as one `[rows, max logical dim]` matrix (zeros past each row's dim), and each row's dim."""
    bucket, local = feature.remap
    specs = feature.tables()
    width = max(t.logical_dim for t in specs)
    out = torch.zeros(feature.num_embeddings, width)
    dims = np.zeros(feature.num_embeddings, dtype=np.int64)
    for b, t in enumerate(specs):
        rows = np.flatnonzero(bucket == b)
        out[rows, : t.logical_dim] = tables[t.name][local[rows], : t.logical_dim]
        dims[rows] = t.logical_dim
    return out, dims


def migrate_weights(
    old: DimensionPlan,
    new: DimensionPlan,
    old_state: Mapping[str, torch.Tensor],
    new_state: Mapping[str, torch.Tensor],
    *,
    table_prefix: str = "embedding.ebc.embedding_bags.",
    transform: RowTransform | None = None,
) -> dict[str, torch.Tensor]:
    """The new model's full state, filled from the old one's.

    Args:
        old: the plan the old state was trained under.
        new: the plan to move to.
        old_state: the old model's whole tensors (e.g. from `full_tensors`).
        new_state: the new model's freshly initialised whole tensors (their values are kept where nothing maps).
        table_prefix: where the tables' weights sit in the state dict (`<prefix><table>.weight`).
        transform: maps changed rows' old vectors to their new dim; default prefix slice / zero pad.

    Returns:
        The new full state.
    """
    out = {k: v.detach().clone() for k, v in new_state.items()}
    old_tables = {k[len(table_prefix) : -len(".weight")]: v for k, v in old_state.items() if k.startswith(table_prefix)}
    for nf in new.features:
        if nf.feature not in old.feature_names:
            continue
        vectors, old_dims = _per_row(old[nf.feature], old_tables)
        n_old = min(old[nf.feature].num_embeddings, nf.num_embeddings)
        bucket, local = nf.remap
        for b, t in enumerate(nf.tables()):
            rows = np.flatnonzero(bucket[:n_old] == b)
            if rows.size == 0:
                continue
            target = out[f"{table_prefix}{t.name}.weight"]
            d = t.logical_dim
            same = old_dims[rows] == d
            keep = rows[same]
            # Unchanged rows: their logical columns are copied bit for bit.
            if keep.size:
                target[local[keep], :d] = vectors[keep, :d]
            changed = rows[~same]
            if changed.size:
                if transform is not None:
                    for d_old in np.unique(old_dims[changed]):
                        group = changed[old_dims[changed] == d_old]
                        target[local[group], :d] = transform(vectors[group, :d_old], int(d_old), d)
                else:
                    src = vectors[changed, : min(d, vectors.shape[1])]
                    target[local[changed], :d] = torch.nn.functional.pad(src, (0, d - src.shape[1]))
    for key, value in old_state.items():
        if not key.startswith(table_prefix) and key in out and out[key].shape == value.shape:
            out[key].copy_(value)
    return out
