"""Fault drills: SIGKILL this process at a named point of a job, once, to prove that a kill there loses nothing.

Set `DIMSEARCH_FAULT` to comma-separated `key=value` pairs:

    DIMSEARCH_FAULT="point=checkpoint,rank=0,day=1,once=/tmp/drill.done"

- `point`: where to die: `mid-day` (after `step` training steps of a day), `checkpoint` (the shards of a day's
  checkpoint written, its done marker not yet), `checkpoint-replace` (an older copy of the checkpoint moved aside,
  the new one not yet renamed in), `reconfigure` (the old tables saved, the new ones not yet built), `export`
  (the bundle's weights written, its manifest not yet).
- `rank`: the global rank that dies (default 0); `day`: the day index (default: the first day that reaches the
  point); `step`: for `mid-day`, the step after which it dies (default 2).
- `once`: a file created just before the kill; while it exists the drill does nothing, so the restarted or resumed
  job runs through. Without it the drill fires only in torchrun's first attempt (`TORCHELASTIC_RESTART_COUNT` 0).

Unset, every call is a no-op. Only `jobs/` reads the environment; library code receives `fault.hit` as a callback.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from jobs.config import ConfigError

POINTS = ("mid-day", "checkpoint", "checkpoint-replace", "reconfigure", "export")
ENV = "DIMSEARCH_FAULT"


@dataclass(frozen=True)
class Fault:
    point: str
    rank: int = 0
    day: int | None = None
    step: int = 2
    once: Path | None = None

    def hit(self, point: str, rank: int = 0, day: int | None = None, step: int | None = None) -> None:
        """Die here if this is the drill's point (and rank, day and step), and it has not fired yet."""
        if point != self.point or rank != self.rank:
            return
        if self.day is not None and day is not None and day != self.day:
            return
        if point == "mid-day" and step != self.step:
            return
        if self.once is not None:
            if self.once.exists():
                return
            self.once.write_text(f"{point} rank={rank} day={day} step={step}\n")
        elif int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            return
        os.kill(os.getpid(), signal.SIGKILL)


class NoFault(Fault):
    def hit(self, point: str, rank: int = 0, day: int | None = None, step: int | None = None) -> None:
        return


def from_env() -> Fault:
    """The drill `DIMSEARCH_FAULT` describes, or a no-op.

    Raises:
        ConfigError: the variable is malformed (it names the bad part and the valid points).
    """
    text = os.environ.get(ENV, "").strip()
    if not text:
        return NoFault("")
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("point", "rank", "day", "step", "once"):
            raise ConfigError(f"{ENV}: '{part}' is not one of point=, rank=, day=, step=, once= (got {text!r})")
        fields[key.strip()] = value.strip()
    point = fields.get("point", "")
    if point not in POINTS:
        raise ConfigError(f"{ENV}: point '{point}' is not one of {list(POINTS)}")
    try:
        return Fault(
            point,
            rank=int(fields.get("rank", "0")),
            day=int(fields["day"]) if "day" in fields else None,
            step=int(fields.get("step", "2")),
            once=Path(fields["once"]) if "once" in fields else None,
        )
    except ValueError:
        raise ConfigError(f"{ENV}: rank, day and step must be integers (got {text!r})") from None
