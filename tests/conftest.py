"""Shared fixtures: where the licensed real datasets live (read from ../shared, never copied into the repo)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

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
