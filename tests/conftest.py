"""Shared fixtures: where the licensed real datasets live (read from ../shared, never copied into the repo), and the
tiny synthetic stream the 2-rank job tests train on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.synthetic import SyntheticConfig, write_synthetic

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("DIMSEARCH_DATASETS", REPO.parent / "shared" / "datasets"))


def shared_dataset(name: str) -> Path:
    """The folder `../shared/datasets/<name>`, or skip the test with the reason when it is absent."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"real dataset '{name}' not found at {path} (its licence forbids shipping it in the repo)")
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is faster and does not fight other jobs for the 2 CPU cores (two threads
    on a shared 2-core machine made small networks ~15× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_STREAM = SyntheticConfig(days=3, rows_per_day=4000, users=400, items=300, fields=4, field_cardinality=60, dense=2)


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic stream (3 days of 4,000 rows, users and items, 4 fields, 2 dense), written once per session
    and only read; a module that needs another stream overrides this fixture."""
    return write_synthetic(TINY_STREAM, tmp_path_factory.mktemp("synthetic") / "data")
