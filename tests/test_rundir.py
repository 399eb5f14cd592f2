"""Run directories: when a job may start, resume or replace a run (jobs/rundir.py), without launching one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.config import load_config
from jobs.rundir import RunDecision, RunError, clear_run, decide, job_token, mark_job
from tests.helpers import REPO


def _cfg(tmp: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        REPO / "jobs/configs/demo.yaml", [f"data.path={tmp / 'data'}", f"train.out_dir={tmp / 'runs'}", *extra]
    )


def _make_run(tmp: Path, *extra: str) -> Path:
    cfg = _cfg(tmp, *extra)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (cfg.run_dir / "metrics.jsonl").write_text("{}\n")
    return cfg.run_dir


def test_a_new_run_starts_and_an_existing_one_needs_resume_or_replace(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert decide(cfg, resume=False, replace=False).start == "fresh"
    _make_run(tmp_path)
    with pytest.raises(RunError, match="already exists"):
        decide(cfg, resume=False, replace=False)
    assert decide(cfg, resume=True, replace=False).start == "resume"
    assert decide(cfg, resume=False, replace=True) == RunDecision("fresh", clear=True)
    with pytest.raises(RunError, match="contradict"):
        decide(cfg, resume=True, replace=True)


def test_a_restart_of_the_same_job_always_resumes_and_never_replaces(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    mark_job(run, "job-1")
    assert job_token(run) == "job-1"
    cfg = _cfg(tmp_path)
    # The same job (its torchrun run id in the run), whatever the flags it was started with: resume.
    for resume, replace in [(False, False), (False, True), (True, True)]:
        assert decide(cfg, resume=resume, replace=replace, run_id="job-1").start == "resume"
    # Another job is not a restart, and torchrun's default id 'none' names no job.
    with pytest.raises(RunError, match="already exists"):
        decide(cfg, resume=False, replace=False, run_id="job-2")
    mark_job(run, "none")
    assert job_token(run) == "job-1"
    with pytest.raises(RunError, match="already exists"):
        decide(cfg, resume=False, replace=False, run_id="none")
    # A run dir holding only the job marker (killed before anything else was written) starts fresh.
    clear_run(run)
    mark_job(run, "job-3")
    assert decide(cfg, resume=False, replace=False, run_id="job-3").start == "fresh"


def test_data_days_may_change_on_resume_only_for_a_stream(tmp_path: Path) -> None:
    _make_run(tmp_path, "data.days=2")
    assert decide(_cfg(tmp_path, "data.days=3"), resume=True, replace=False).start == "resume"
    static = tmp_path / "static"
    _make_run(static, "data.days=2", "data.protocol=random")
    with pytest.raises(RunError, match=r"data.days: 2 \(run\) -> 3 \(now\)"):
        decide(_cfg(static, "data.days=3", "data.protocol=random"), resume=True, replace=False)


def test_replace_never_deletes_the_plan_the_job_starts_from(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    (run / "plan").mkdir()
    with pytest.raises(RunError, match=r"--replace would delete search\.plan="):
        decide(_cfg(tmp_path, f"search.plan={run / 'plan'}"), resume=False, replace=True)
