"""Logging for the jobs: one format, our INFO on rank 0, and the libraries' noise kept out."""

from __future__ import annotations

import logging
import os
import warnings


def _quiet(record: logging.LogRecord) -> bool:
    """Drop the libraries' below-ERROR records on the root logger (TorchRec and FBGEMM log every table and TBE
    they build there)."""
    noisy_source = "/torchrec/" in record.pathname or "/fbgemm_gpu/" in record.pathname
    return record.levelno >= logging.ERROR or not noisy_source


def setup_logging() -> None:
    """INFO on rank 0 (WARNING elsewhere); TorchRec, FBGEMM and torch.distributed only from ERROR up."""
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    # force: an imported library may already have configured the root logger.
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    for noisy in ("torchrec", "torch.distributed", "fbgemm_gpu", "torch.fx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet)
    # DCP's note when it loads in one process without a process group: evaluation and export mean to.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
    # FBGEMM's dense (data-parallel) kernel has no registered autograd kernel; TorchRec wraps it in its own
    # autograd function, so the fallback warning does not apply (the 2-rank DP test checks the gradients' effect).
    warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered.*")
