"""Launch `jobs.train` under torchrun after checking everything once, in this process, before any worker starts.

    python -m jobs.launch --standalone --nproc-per-node=2 -- --config jobs/configs/demo.yaml train.name=run1
    python -m jobs.launch --standalone --nproc-per-node=2 --max-restarts=3 -- --config ... train.resume=auto
    python -m jobs.launch --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        --rdzv-id=run1 --max-restarts=3 -- --config ... train.resume=auto          # on every node

Everything before `--` is torchrun's (`torchrun --help`); everything after it is the job's (`--config`, `--resume`,
`--replace`, `section.key=value`). The config, the dataset (layout, every file's schema and every value of the days
the run trains on), the starting plan and the run directory (exists without `--resume`, a different config on
resume, another job writing it) are checked here first: bad input prints one message, naming the file, column or
key and the fix, and exits 2 — no worker starts, no traceback, no torchrun failure banner. A worker that fails
later is reported in one line with its rank and exit code (its own output is above it).

Plain `torchrun ... -m jobs.train ...` runs the same job and the same checks (in the workers, printed by rank 0
only), but torchrun itself then ends a failed run with its `ChildFailedError` banner; with `--max-restarts` set
`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` as this launcher does (a restarted gloo group can otherwise read a dead
worker's address from the shared rendezvous store and fail to connect).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jobs.config import load_config
from jobs.logs import setup_logging


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's arguments, the job's arguments), split at the first `--`."""
    if "--" not in argv:
        raise SystemExit(
            "usage: python -m jobs.launch [torchrun options] -- [--config FILE] [--resume|--replace] "
            "[section.key=value ...]\n"
            "error: put `--` between torchrun's options and the job's (e.g. `--standalone --nproc-per-node=2 -- "
            "--config jobs/configs/demo.yaml`)"
        )
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def _world_size(run_args: argparse.Namespace) -> int | None:
    """The fewest ranks torchrun may run the job on (the smallest `--nnodes` times `--nproc-per-node`: the most bytes
    per rank), or None where that is only known at run time (`--nproc-per-node=gpu|auto`)."""
    nodes = str(run_args.nnodes).split(":")[0]
    per_node = str(run_args.nproc_per_node)
    if run_args.standalone:
        nodes = "1"
    return int(nodes) * int(per_node) if nodes.isdigit() and per_node.isdigit() else None


def main(argv: list[str] | None = None) -> int:
    torch_args, job_args = split_argv(sys.argv[1:] if argv is None else argv)
    setup_logging()
    # Imported after the split so that a usage error is instant; the checks need torch (the plan, its sharding).
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from jobs.rundir import RunLock
    from jobs.train import BAD_INPUT, CAPACITIES_ENV, job_parser, preflight

    run_args = get_args_parser().parse_args([*torch_args, "--module", "jobs.train", *job_args])
    args = job_parser().parse_intermixed_args(job_args)
    # The run id a multi-node job's agents share; --standalone makes a new one per launch.
    run_id = None if run_args.standalone else run_args.rdzv_id
    try:
        cfg = load_config(args.config, args.overrides)
        ready = preflight(
            cfg, resume=args.resume, replace=args.replace, world_size=_world_size(run_args), run_id=run_id
        )
        # On one node nobody else may hold the run now. On several, an agent that joins (or rejoins) a running job
        # finds the job's own rank 0 holding it, so only the workers' rank 0 takes the lock there.
        if run_args.standalone or str(run_args.nnodes) in ("1", "1:1"):
            RunLock(cfg.run_dir).check_free()
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    os.environ["DIMSEARCH_PREFLIGHT"] = "done"  # the workers skip the value pass this process made
    os.environ[CAPACITIES_ENV] = json.dumps(ready.counted())  # and its count of every field's ids
    # A fresh TCPStore per rendezvous round: with the agent's shared store, a restarted group's gloo mesh can read a
    # dead worker's address from the previous round (connectFullMesh: "Connection refused") and fail again.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        run(run_args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(
            f"error: the job failed: worker rank {rank} exited with code {failure.exitcode} (pid {failure.pid}); its "
            "output is above. Fix what it names and run again (add --resume, or train.resume=auto, to continue "
            "after the last checkpoint)",
            file=sys.stderr,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
