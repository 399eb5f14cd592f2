"""Opening a finished (or checkpointed) run: its resolved config, dataset, plan, vocabularies and weights.

`load_run("runs/<name>")` reads `config.yaml` and the newest complete checkpoint (`checkpoints/*/`: DCP shards,
`plan/`, `vocab/`, `progress.json`) and rebuilds the trained model unsharded on CPU, with the checkpoint's whole
tensors (DCP re-shards on load, so a run trained on any number of ranks opens in one process). This is what
offline evaluation and export start from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from jobs.config import JobConfig, load_config
from models.recommender import Recommender
from pipeline.dataset import Dataset
from pipeline.errors import DatasetError
from pipeline.vocab import VocabularySet
from sharding.checkpoint import damaged_checkpoints, full_tensors, latest_checkpoint
from sharding.plan import DimensionPlan


@dataclass
class LoadedRun:
    """A run opened for evaluation or export.

    Args:
        run_dir: the run directory.
        checkpoint: the checkpoint directory the weights come from.
        cfg: the run's resolved config.
        dataset: the run's dataset (`data.path`).
        plan: the dimension plan the weights were trained under.
        vocab: the id vocabularies at the checkpoint.
        model: the trained model, unsharded, on CPU, in eval mode.
        progress: the checkpoint's `progress.json` (position, per-day/epoch records).
        served: the model as served, when the run was opened from an export bundle (`Bundle.as_run`): its tables
            hold the bundle's serving bytes.
    """

    run_dir: Path
    checkpoint: Path
    cfg: JobConfig
    dataset: Dataset
    plan: DimensionPlan
    vocab: VocabularySet
    model: Recommender
    progress: dict[str, Any]
    served: nn.Module | None = None


def load_run(run_dir: str | Path, data_path: str | Path | None = None) -> LoadedRun:
    """Open `run_dir` at its newest complete checkpoint.

    Args:
        run_dir: `<train.out_dir>/<train.name>`.
        data_path: read another dataset with the same spec instead of the run's `data.path`.

    Raises:
        DatasetError: the run directory, its config or its checkpoint is missing or incomplete.
    """
    # Imported here: jobs.train imports this package's config too, and only the model builder is needed.
    from jobs.train import build_recommender

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise DatasetError(config, "no run config here", "point at a run directory written by jobs.train")
    cfg = load_config(config)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        damaged = "".join(f"; {why}" for _, why in damaged_checkpoints(run_dir / "checkpoints"))
        raise DatasetError(
            run_dir / "checkpoints",
            f"no complete, intact checkpoint{damaged}",
            "train with train.checkpoint=true (the default) and let at least one day finish, or resume the run "
            "(--resume) so that it writes an intact one",
        )
    plan = DimensionPlan.load(ckpt / "plan")
    progress = json.loads((ckpt / "progress.json").read_text())
    if progress.get("in_search", False):
        raise DatasetError(
            ckpt,
            f"the newest checkpoint is inside {cfg.search.method}'s search phase (a supernet, not a servable model)",
            "resume the run until the search has derived its plan (train with --resume)",
        )
    dataset = Dataset(data_path or cfg.data.path)
    model = build_recommender(cfg, dataset.spec, plan, "cpu")
    weights = full_tensors(ckpt)
    missing, _unexpected = model.load_state_dict(weights, strict=False)
    if missing:
        raise DatasetError(ckpt, f"the checkpoint lacks tensors {missing[:5]}", "use the checkpoint of this run's plan")
    model.eval()
    return LoadedRun(run_dir, ckpt, cfg, dataset, plan, VocabularySet.load(ckpt / "vocab"), model, progress)
