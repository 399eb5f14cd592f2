"""A run directory's life: whether a job may start, resume or replace it, and one writer at a time.

- A run that exists (it has a `config.yaml`, `metrics.jsonl`, `plan/` or `checkpoints/`) is never trained over by
  accident: without `--resume` / `train.resume=auto` the job refuses, and `--replace` must say to start it over.
- Resuming checks the run's saved config against the new one: anything but the keys in `HARMLESS` (and, on a
  stream, `data.days`) differing is refused with every differing key listed (a changed `search.dim` would otherwise
  train on at the old value).
- The job that starts a run (fresh, replaced or resumed) writes its torchrun run id (`TORCHELASTIC_RUN_ID`, the
  rendezvous id) to `<run>/.job`. A worker group that finds its own id there is that job restarted (after a killed
  worker, or a membership change) and always resumes: it never refuses the run, and never `--replace`s it again.
- `RunLock` holds an exclusive `flock` on `<out_dir>/.<name>.lock` while a job writes the run, so two jobs with one
  name cannot run at once; the kernel drops it when its holder dies, so a killed job never leaves it stale.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from jobs.config import JobConfig

# Keys that may differ between a run and its resumption: logging and data-loading knobs, how many days or units to
# run now, where the run directory lives, and how it resumes.
HARMLESS = frozenset(
    {"train.log_every", "train.resume", "train.max_units", "train.out_dir", "data.prefetch", "data.chunk_rows"}
)
# More days of a stream is more of the same run; under a static protocol they change what every epoch holds.
HARMLESS_PREQUENTIAL = HARMLESS | {"data.days"}
JOB_FILE = ".job"
RUN_FILES = ("config.yaml", "metrics.jsonl", "plan", "checkpoints")

Start = Literal["fresh", "resume"]


class RunError(ValueError):
    """A run directory the job may not use as asked (exists without --resume, another config, locked)."""


def is_run(path: Path) -> bool:
    """Whether `path` holds anything a training job writes."""
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and prefix == "":
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v
    return out


def harmless_keys(cfg: JobConfig) -> frozenset[str]:
    return HARMLESS_PREQUENTIAL if cfg.data.protocol == "prequential" else HARMLESS


def config_differences(saved: dict[str, Any], now: dict[str, Any], harmless: frozenset[str] = HARMLESS) -> list[str]:
    """`section.key: saved → now` for each key that differs (harmless keys left out), sorted."""
    a, b = _flat(saved), _flat(now)
    return [
        f"{k}: {a.get(k, '<unset>')!r} (run) -> {b.get(k, '<unset>')!r} (now)"
        for k in sorted(set(a) | set(b))
        if k not in harmless and a.get(k) != b.get(k)
    ]


def job_token(run: Path) -> str | None:
    """The run id of the job that last started `run` (see `mark_job`), or None."""
    path = run / JOB_FILE
    return path.read_text().strip() or None if path.is_file() else None


def mark_job(run: Path, run_id: str | None) -> None:
    """Record that the job `run_id` is the one writing `run` (rank 0, once the run directory is its own)."""
    if run_id and run_id != "none":
        run.mkdir(parents=True, exist_ok=True)
        (run / JOB_FILE).write_text(run_id + "\n")


@dataclass(frozen=True)
class RunDecision:
    """How the job starts in its run directory: `fresh` (clearing what is there if `clear`) or `resume`."""

    start: Start
    clear: bool = False


def decide(cfg: JobConfig, *, resume: bool, replace: bool, run_id: str | None = None) -> RunDecision:
    """Whether the job starts fresh or resumes in `cfg.run_dir` (read-only: nothing on disk changes).

    Args:
        cfg: the job's config.
        resume: `--resume` or `train.resume=auto`: continue the run if it exists.
        replace: `--replace`: start the run over, deleting what it holds.
        run_id: this job's torchrun run id; a run that this job started (`<run>/.job`) is always resumed.

    Raises:
        RunError: the run exists and neither resume nor replace was asked, or its config differs from `cfg`.
    """
    run = cfg.run_dir
    real, data = Path(os.path.realpath(run)), Path(os.path.realpath(cfg.data.path))
    if real == data or real in data.parents or data in real.parents:
        where = "is" if real == data else "contains" if real in data.parents else "lies inside"
        raise RunError(
            f"{run}: the run directory {where} the dataset data.path={cfg.data.path}; the job would write into (or "
            "--replace would delete) the data. Fix: choose a train.out_dir / train.name outside the dataset"
        )
    run_id = None if run_id in (None, "", "none") else run_id  # torchrun's default id names no job
    restarted = run_id is not None and is_run(run) and job_token(run) == run_id
    if resume and replace and not restarted:
        raise RunError(f"{run}: --resume and --replace contradict each other. Fix: pass one of them")
    if not is_run(run):
        if run.exists() and not run.is_dir():
            raise RunError(f"{run}: exists and is not a directory. Fix: choose another train.name or train.out_dir")
        found = sorted(p.name for p in run.iterdir() if p.name != JOB_FILE)[:5] if run.is_dir() else []
        if found:
            raise RunError(
                f"{run}: exists and holds files that are not a training run's ({found}). "
                "Fix: choose another train.name or train.out_dir; the job never writes into a directory it did not make"
            )
        return RunDecision("fresh")
    if replace and not restarted:
        plan = Path(os.path.realpath(cfg.search.plan)) if cfg.search.plan else None
        if plan is not None and (plan == real or real in plan.parents):
            raise RunError(
                f"{run}: --replace would delete search.plan={cfg.search.plan}, which lies inside the run. Fix: copy "
                "the plan out of the run first (or export it), or start a run with another train.name"
            )
        return RunDecision("fresh", clear=True)
    if not (resume or restarted):
        raise RunError(
            f"{run}: the run '{cfg.train.name}' already exists. Fix: pass --resume (or train.resume=auto) to continue "
            "it, --replace to start it over (its checkpoints and metrics are deleted), or choose another train.name"
        )
    saved_file = run / "config.yaml"
    if saved_file.is_file():
        try:
            saved = yaml.safe_load(saved_file.read_text()) or {}
        except yaml.YAMLError as e:
            raise RunError(
                f"{saved_file}: unreadable ({e}). Fix: restore it, or --replace the run to start it over"
            ) from None
        if not isinstance(saved, dict):
            raise RunError(f"{saved_file}: not a mapping of sections. Fix: restore it, or --replace the run")
        harmless = harmless_keys(cfg)
        diffs = config_differences(saved, cfg.to_dict(), harmless)
        if diffs:
            raise RunError(
                f"{saved_file}: resuming with a config that differs from the run's in {len(diffs)} key(s):\n  - "
                + "\n  - ".join(diffs)
                + "\n  Fix: resume with the run's own values (or drop these overrides), or start a new run (another "
                "train.name, or --replace). Only these keys may change on resume: " + ", ".join(sorted(harmless))
            )
    return RunDecision("resume")


def clear_run(run: Path) -> None:
    """Empty a run directory for a fresh start: move it aside, then delete the old copy (never half-deleted)."""
    if not run.exists():
        return
    aside = run.with_name(f".{run.name}.replaced-{os.getpid()}")
    run.rename(aside)
    run.mkdir()
    shutil.rmtree(aside)


class RunLock:
    """An exclusive lock on a run while one job writes it (`flock` on `<out_dir>/.<name>.lock`).

    Raises:
        RunError: on `acquire`, when another live process holds it (its pid is named).
    """

    def __init__(self, run: Path) -> None:
        self.path = run.with_name(f".{run.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunError(
                f"{self.path.with_name(self.path.name[1:-5])}: another job (pid {holder}) is writing this run. Fix: "
                "wait for it to finish, stop it, or choose another train.name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def check_free(self) -> None:
        """Raise `RunError` if another process holds the lock now (acquire and release at once)."""
        if self.path.exists():
            self.acquire().release()
