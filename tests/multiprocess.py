"""Run a function on N gloo ranks in fresh processes (after torchrec's MultiProcessTestBase, STYLE.md).

Each rank gets MASTER_ADDR=127.0.0.1, a free port, GLOO_SOCKET_IFNAME=lo, OMP_NUM_THREADS=1, the same
PYTHONHASHSEED, a process-group timeout and a faulthandler dump if it hangs. The parent asserts every exit code is 0.
"""

from __future__ import annotations

import datetime as dt
import faulthandler
import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(TIMEOUT_S - 10, exit=True)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=dt.timedelta(seconds=45))
    try:
        fn(rank, world_size, *args)
        # Every rank reaches the end before any tears gloo down: a rank that destroys its process group while its
        # peer still talks to it can abort the peer at exit (SIGABRT, "terminate called without an active
        # exception"), which failed a passing test once in CI.
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # The work is done and checked: leave without the interpreter's teardown, where a library thread still joinable
    # at static destruction aborted a passing rank about once in ten runs (at fdf4df8 too), barrier or not.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[..., None], world_size: int = 2, *args: Any) -> None:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; fail if any rank fails or hangs."""
    os.environ.setdefault("PYTHONHASHSEED", "0")  # DMP.reshard's P2P tags hash strings (gloo needs them equal)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * world_size, f"rank exit codes {codes} (None = hung past {TIMEOUT_S}s)"
