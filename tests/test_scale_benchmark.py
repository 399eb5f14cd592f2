"""benchmarks.scale's parts that need no run: each method's overrides, the day-line parser, the --methods check."""

from __future__ import annotations

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
