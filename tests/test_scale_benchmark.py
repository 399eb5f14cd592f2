"""benchmarks.scale's parts that need no run: each method's overrides, the day-line parser, the --methods and
--reuse checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.scale import _DAY_LINE, METHODS, main, method_overrides


def test_method_overrides() -> None:
    assert METHODS == ("fixed", "scall", "esapn", "md")
    assert method_overrides("fixed", 123) == ["search.method=fixed", "search.dim=16"]
    searched = ["search.dim=32", "search.other_dim=16", "search.budget=123"]
    assert method_overrides("scall", 123) == ["search.method=scall", *searched, "search.scall.action=[0.5,0.1,0.1]"]
    assert method_overrides("esapn", 123) == ["search.method=esapn", *searched]
    assert method_overrides("md", 123) == ["search.method=md", *searched]


def test_day_line() -> None:
    line = "[rank0]:2026-12-02 17:44:58,123 jobs.train INFO day 2024-01-03: eval {'auc': 0.79} | train loss 0.5"
    match = _DAY_LINE.search(line)
    assert match is not None and match.groups() == ("2026-12-02 17:44:58,123", "2024-01-03")
    assert _DAY_LINE.search("2026-12-02 17:44:58,123 jobs.train INFO reconfigured to the new plan:") is None


def test_unknown_method(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--methods", "fixed,ciess"])
    assert "unknown ['ciess']" in capsys.readouterr().err


def test_reuse_needs_the_same_kept_stream(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="holds no kept stream"):
        main(["--reuse", "--work", str(tmp_path), "--rows", "1000"])
    (tmp_path / "data").mkdir()
    (tmp_path / "generate.json").write_text(json.dumps({"seconds": 1.0, "rows": 1000, "days": 10}))
    with pytest.raises(
        SystemExit,
        match=r"generated with \{'seconds': 1.0, 'rows': 1000, 'days': 10\}, not \{'rows': 1000, 'days': 10, "
        r"'max_cardinality': 10000000\}",
    ):
        main(["--reuse", "--work", str(tmp_path), "--rows", "1000"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "generate.json"]  # nothing deleted


def test_a_failed_run_deletes_only_what_it_wrote(tmp_path: Path) -> None:
    """Without --keep the benchmark removes what it wrote into --work, never what was there before."""
    (tmp_path / "mine.txt").write_text("a user's file")
    (tmp_path / "data").mkdir()  # in the way of the generator, which refuses to replace it
    (tmp_path / "data" / "notes.md").write_text("not a dataset")
    with pytest.raises(Exception, match="data"):
        main(["--work", str(tmp_path), "--rows", "1000", "--days", "2", "--methods", "fixed"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "mine.txt", "notes.md"]
