"""Faults survived with nothing lost: SIGKILL one rank of a tiny 2-rank run at each dangerous point, let torchrun
restart the group (`--max-restarts=1`, `train.resume=auto`), and compare with the uninterrupted run: one record
per day, the same metrics and the same plan digest. Also: a kill while a checkpoint is being replaced keeps the
old one loadable, a damaged newest checkpoint is skipped by name, workers exit when their agent dies, two agents
on loopback (`--nnodes=2`, c10d) equal one agent's two ranks, and run directories are never trained over.

Each job is bounded in time and started in its own process group; every test checks that none of its processes
is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.train import plan_digest
from sharding.plan import DimensionPlan
from tests.helpers import REPO, finish, launch_job, tiny_job_args
from tests.multiprocess import free_port

pytestmark = pytest.mark.multirank
TIMING = ("examples_per_s", "peak_rss_mb", "reconfigure_seconds")  # differ between any two runs


def _scall_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    """SCALL re-sizes user and item rows every day, so every day reconfigures the tables."""
    from jobs.train import table_capacities
    from pipeline.dataset import Dataset

    capacity = table_capacities(Dataset(data), None)
    budget = (
        sum(n for f, n in capacity.items() if f not in ("user", "item")) * 16
        + (capacity["user"] + capacity["item"]) * 8
    )
    return tiny_job_args(
        data, out, name, "search.method=scall", "search.dim=16", f"search.budget={budget}", "train.resume=auto",
        "search.scall.action=[0.5,0.1,0.1]", *extra,
    )  # fmt: skip


def _records(run: Path) -> list[dict[str, object]]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def _assert_no_stray(marker: Path) -> None:
    """No process whose command line names `marker` (the test's own tmp dir) is alive."""
    deadline = time.monotonic() + 15
    while True:
        left = subprocess.run(["pgrep", "-f", str(marker)], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"stray processes {left}"


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run = finish(launch_job(_scall_args(data, out, "ref")))
    assert run.returncode == 0, run.stderr[-3000:]
    return out / "ref"


def _assert_equal_runs(run: Path, reference: Path) -> None:
    got, want = _records(run), _records(reference)
    assert [r["day"] for r in got] == [r["day"] for r in want] == ["2024-01-01", "2024-01-02", "2024-01-03"]
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float | dict):
                assert a[key] == pytest.approx(b[key], rel=1e-6), key
            else:
                assert a[key] == b[key], key
    assert plan_digest(DimensionPlan.load(run / "plan")) == plan_digest(DimensionPlan.load(reference / "plan"))


@pytest.mark.parametrize(
    "fault",
    [
        "point=mid-day,rank=1,day=1,step=2",
        "point=checkpoint,rank=0,day=1",  # the shards written, the done marker not
        "point=reconfigure,rank=1,day=1",  # the old tables saved, the new ones not built
    ],
    ids=["mid-day", "checkpoint-write", "reconfigure"],
)
def test_a_killed_rank_is_restarted_and_loses_nothing(data: Path, reference: Path, tmp_path: Path, fault: str) -> None:
    once = tmp_path / "fired"
    proc = launch_job(
        _scall_args(data, tmp_path, "run"),
        ["--standalone", "--nproc-per-node=2", "--max-restarts=1"],
        env={"DIMSEARCH_FAULT": f"{fault},once={once}"},
    )
    run = finish(proc)
    assert run.returncode == 0, run.stderr[-3000:]
    assert once.exists(), "the drill did not fire"
    assert "resumed from" in run.stderr  # the restarted group continued from a checkpoint, not from day 1
    _assert_equal_runs(tmp_path / "run", reference)
    _assert_no_stray(tmp_path)


def test_a_kill_while_replacing_a_checkpoint_keeps_the_old_one_loadable(tmp_path: Path) -> None:
    script = f"""
import sys, torch
from jobs import faults
from sharding.checkpoint import save_checkpoint
fault = faults.from_env()
path = {str(tmp_path / "ckpts" / "day-0000")!r}
state = {{"w": torch.full((4,), float(sys.argv[1]))}}
save_checkpoint(path, state, stage=lambda s: s == "replacing" and fault.hit("checkpoint-replace"))
"""
    env = {**os.environ, "DIMSEARCH_FAULT": "point=checkpoint-replace"}
    first = subprocess.run([sys.executable, "-c", script, "1"], cwd=REPO, capture_output=True, timeout=120)
    assert first.returncode == 0, first.stderr  # nothing to replace: the stage is not reached
    killed = subprocess.run([sys.executable, "-c", script, "2"], cwd=REPO, env=env, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    import torch

    from sharding.checkpoint import latest_checkpoint, load_checkpoint

    found = latest_checkpoint(tmp_path / "ckpts")
    assert found is not None and found.name == ".day-0000.old"  # the old copy, moved aside, stands in
    state = {"w": torch.zeros(4)}
    load_checkpoint(found, state)
    assert state["w"].tolist() == [1.0] * 4
    # Saving again puts the new checkpoint in place and drops the old copy.
    again = subprocess.run([sys.executable, "-c", script, "3"], cwd=REPO, capture_output=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["day-0000"]
    load_checkpoint(tmp_path / "ckpts" / "day-0000", state)
    assert state["w"].tolist() == [3.0] * 4


def _damage(kind: str, ckpt: Path) -> None:
    if kind == "truncated-shard":
        shard = next(ckpt.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    elif kind == "deleted-shard":
        next(ckpt.glob("*.distcp")).unlink()
    elif kind == "truncated-progress":
        p = ckpt / "progress.json"
        p.write_text(p.read_text()[:50])
    else:
        (ckpt / "COMPLETE").unlink()


@pytest.mark.parametrize("kind", ["truncated-shard", "deleted-shard", "truncated-progress", "no-marker"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path: Path, kind: str) -> None:
    import torch

    from sharding.checkpoint import damaged_checkpoints, latest_checkpoint, save_checkpoint

    root = tmp_path / "ckpts"
    for day in range(2):

        def extra(tmp: Path, day: int = day) -> None:
            (tmp / "progress.json").write_text(json.dumps({"position": [0, 0, day + 1], "pad": "x" * 200}))

        save_checkpoint(root / f"day-{day:04d}", {"w": torch.full((64,), float(day))}, extra)
    _damage(kind, root / "day-0001")
    assert latest_checkpoint(root) == root / "day-0000"
    damaged = damaged_checkpoints(root)
    assert [p.name for p, _ in damaged] == ["day-0001"]
    assert "day-0001" in damaged[0][1]


def test_a_damaged_newest_checkpoint_is_skipped_on_resume(data: Path, reference: Path, tmp_path: Path) -> None:
    first = finish(launch_job(_scall_args(data, tmp_path, "run", "data.days=2")))
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    for day in ("day-0000", "day-0001"):
        shard = next((ckpts / day).glob("*.distcp"))
        shard.with_suffix(".good").write_bytes(shard.read_bytes())
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    # No intact checkpoint: refused with each one named, never started over on top of them.
    none_intact = finish(launch_job(_scall_args(data, tmp_path, "run")))
    assert none_intact.returncode != 0
    assert "no checkpoint is intact" in none_intact.stderr and "day-0000" in none_intact.stderr
    assert "day-0001" in none_intact.stderr and "--replace" in none_intact.stderr
    shard = next((ckpts / "day-0000").glob("*.distcp"))
    shard.with_suffix(".good").rename(shard)  # the older one restored
    resumed = finish(launch_job(_scall_args(data, tmp_path, "run")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping damaged checkpoint" in resumed.stderr and "day-0001" in resumed.stderr
    assert "resumed from" in resumed.stderr and "day-0000" in resumed.stderr
    _assert_equal_runs(tmp_path / "run", reference)


def test_workers_exit_when_their_agent_dies(data: Path, tmp_path: Path) -> None:
    # Batches of 20 make a day long enough to kill the agent in the middle of one.
    proc = launch_job(tiny_job_args(data, tmp_path, "orphan", "data.batch_size=20"))
    metrics = tmp_path / "orphan" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before the agent could be killed"
    workers = [
        int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)  # the launcher is the torchrun agent
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()]
    assert not alive, f"workers {alive} trained on without their agent"
    _assert_no_stray(tmp_path)


def _two_agents(args: list[str], env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    port = free_port()
    rdzv = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    procs = [launch_job(args, [*rdzv, f"--rdzv-id=test-{port}", "--max-restarts=1"], env) for _ in range(2)]
    return [finish(p) for p in procs]


def test_two_agents_on_loopback_equal_one_agent_and_survive_a_killed_worker(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    for run in _two_agents(_scall_args(data, tmp_path, "two")):
        assert run.returncode == 0, run.stderr[-3000:]
    _assert_equal_runs(tmp_path / "two", reference)

    once = tmp_path / "fired"
    env = {"DIMSEARCH_FAULT": f"point=mid-day,rank=1,day=1,once={once}"}
    for run in _two_agents(_scall_args(data, tmp_path, "two-killed"), env):
        assert run.returncode == 0, run.stderr[-3000:]
    assert once.exists()
    _assert_equal_runs(tmp_path / "two-killed", reference)
    _assert_no_stray(tmp_path)


def test_a_run_is_never_trained_over_and_has_one_writer(data: Path, tmp_path: Path) -> None:
    from jobs.config import load_config
    from jobs.rundir import RunError, RunLock, decide

    args = tiny_job_args(data, tmp_path, "mine", "data.days=1")
    done = finish(launch_job(args))
    assert done.returncode == 0, done.stderr[-3000:]
    # The launcher counted the ids; its workers took its count (rank 0 logs at INFO, a mismatch warns on any rank).
    assert done.stderr.count("counted the distinct ids of") == 1
    assert "counting its ids again" not in done.stderr
    before = (tmp_path / "mine" / "metrics.jsonl").read_text()

    again = finish(launch_job(args))  # the same name without --resume
    assert again.returncode == 2
    assert "the run 'mine' already exists" in again.stderr and "--resume" in again.stderr
    assert "Traceback" not in again.stderr and "ChildFailedError" not in again.stderr

    changed = finish(launch_job([*args, "--resume", "search.dim=8", "model.dense_lr=0.1"]))
    assert changed.returncode == 2
    assert "differs from the run's in 2 key(s)" in changed.stderr
    assert "search.dim: 16 (run) -> 8 (now)" in changed.stderr and "model.dense_lr" in changed.stderr
    assert (tmp_path / "mine" / "metrics.jsonl").read_text() == before  # nothing changed on disk

    cfg = load_config(REPO / "jobs/configs/demo.yaml", args[2:])
    lock = RunLock(cfg.run_dir).acquire()  # another job writing the run
    try:
        with pytest.raises(RunError, match=rf"another job \(pid {os.getpid()}\) is writing this run"):
            RunLock(cfg.run_dir).acquire()
        locked = finish(launch_job([*args, "--resume"]))
        assert locked.returncode == 2 and "is writing this run" in locked.stderr
    finally:
        lock.release()
    assert decide(cfg, resume=True, replace=False).start == "resume"

    replaced = finish(launch_job([*args, "--replace", "data.days=2"]))
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert [r["day"] for r in _records(tmp_path / "mine")] == ["2024-01-01", "2024-01-02"]
    _assert_no_stray(tmp_path)


def test_a_killed_export_leaves_nothing_and_its_rerun_equals_the_uninterrupted_one(
    reference: Path, tmp_path: Path
) -> None:
    topology = REPO / "jobs/configs/topology/cpu2.yaml"

    def export(out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "jobs.export", "--run", str(reference), "--topology", str(topology)]
        return subprocess.run(
            [*cmd, "--out", str(out)], cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip

    whole = export(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = export(tmp_path / "bundle", {"DIMSEARCH_FAULT": "point=export"})
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "bundle").exists()  # never a half-written bundle under its name
    again = export(tmp_path / "bundle")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "whole"]  # the killed write's temp is gone
    assert (tmp_path / "bundle" / "bundle.json").read_bytes() == (tmp_path / "whole" / "bundle.json").read_bytes()
    verify = subprocess.run(
        [sys.executable, "-m", "jobs.export", "--verify", str(tmp_path / "bundle")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stderr[-3000:]


def test_a_rank_killed_in_a_static_search_loses_nothing(data: Path, tmp_path: Path) -> None:
    # AutoDim on a static split: search → derive → retrain, a checkpoint after every day of every epoch. Rank 1 dies
    # in the middle of the search phase's second day (the searcher's own step runs there); the restarted group
    # resumes inside the search, derives the same plan and retrains it.
    autodim = (
        "data.protocol=random", "search.method=autodim", "search.autodim.candidate_dims=[4,8,16]",
        "search.autodim.arch_every=2", "search.autodim.arch_lr=0.05", "search.autodim.temperature_decay=0.01",
        "train.resume=auto",
    )  # fmt: skip
    whole = finish(launch_job(tiny_job_args(data, tmp_path, "whole", *autodim)))
    assert whole.returncode == 0, whole.stderr[-3000:]
    once = tmp_path / "fired"
    killed = finish(
        launch_job(
            tiny_job_args(data, tmp_path, "killed", *autodim),
            ["--standalone", "--nproc-per-node=2", "--max-restarts=1"],
            env={"DIMSEARCH_FAULT": f"point=mid-day,rank=1,day=1,step=2,once={once}"},
        )
    )
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert once.exists() and "resumed from" in killed.stderr
    got, want = _records(tmp_path / "killed"), _records(tmp_path / "whole")
    assert [(r["phase"], r.get("epoch")) for r in got] == [("search", 0), ("train", 0), ("final", None)]
    assert [(r["phase"], r.get("epoch")) for r in want] == [("search", 0), ("train", 0), ("final", None)]
    for a, b in zip(got, want, strict=True):
        # The kill lands in the search phase's second day. Its validation record may move by ~2e-5: the search
        # head's batch-norm running statistics are per rank between DDP's buffer broadcasts, and a checkpoint keeps
        # rank 0's. The derived plan, the retrain and the test metrics are exact.
        assert a["eval"] == pytest.approx(b["eval"], rel=1e-4 if a["phase"] == "search" else 1e-6)
        if "train_loss" in b:  # every record but the final test one
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["embedding_parameters"] == b["embedding_parameters"]
    digest = plan_digest(DimensionPlan.load(tmp_path / "killed" / "plan"))
    assert digest == plan_digest(DimensionPlan.load(tmp_path / "whole" / "plan"))
    _assert_no_stray(tmp_path)
