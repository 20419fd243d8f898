"""Progress a person can see: a bar on a terminal, a readable line every N seconds in a batch log.

Under Slurm or Kubernetes stderr is a file; bar redraws there are noise, so without a TTY we print one
plain line per interval instead. Training runs in worker processes whose output goes through a pipe to
the `ftjob` process; there rank 0 sends progress events (one JSON line each, a few per second at most)
and `ftjob` draws the bar (EventBar). Only rank 0 of a distributed run reports progress.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from .humanize import format_duration

log = logging.getLogger("ftjob")

EVENT_PREFIX = "FTJOB-PROGRESS "
EVENT_INTERVAL_S = 0.25


def mode() -> str:
    """"bar" on a terminal, "events" in a worker whose parent draws the bar, else "log"."""
    forced = os.environ.get("FTJOB_PROGRESS", "")
    if forced in ("log", "events", "bar"):
        return forced
    return "bar" if sys.stderr.isatty() else "log"


class Progress:
    """`with Progress(total, "tokenising", "shards") as p: p.update(1, loss=...)`."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", interval_s: float = 30.0,
                 enabled: bool = True, initial: int = 0):
        self.total, self.desc, self.unit, self.interval_s = total, desc, unit, interval_s
        self.enabled, self.n, self.start = enabled, initial, time.monotonic()
        self._initial, self._last_line, self._bar, self._fields = initial, self.start, None, {}
        self.mode = mode() if enabled else "off"
        self._last_event = 0.0
        if self.mode == "bar":
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                             file=sys.stderr)
        elif self.mode == "events":
            self._event(force=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1, **fields) -> None:
        self.n += n
        self._fields.update(fields)
        if self.mode == "bar":
            self._bar.update(n)
            if fields:
                self._bar.set_postfix({k: _fmt(v) for k, v in self._fields.items()}, refresh=False)
        elif self.mode == "events":
            self._event()
        elif self.mode == "log":
            now = time.monotonic()
            if now - self._last_line >= self.interval_s:
                self._last_line = now
                log.info(self.line(now))

    def _event(self, force: bool = False, done: bool = False) -> None:
        now = time.monotonic()
        if force or done or now - self._last_event >= EVENT_INTERVAL_S:
            self._last_event = now
            event = {"desc": self.desc, "unit": self.unit, "n": self.n, "total": self.total,
                     "initial": self._initial, "fields": {k: _fmt(v) for k, v in self._fields.items()}, "done": done}
            sys.stderr.write(EVENT_PREFIX + json.dumps(event) + "\n")
            sys.stderr.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.monotonic()) - self.start
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total and rate > 0:
            parts.append(f"{100 * self.n / self.total:.0f}%")
            parts.append(f"eta {format_duration((self.total - self.n) / rate)}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        parts += [f"{k} {_fmt(v)}" for k, v in self._fields.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self.mode == "bar" and self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "events":
            self._event(done=True)
        elif self.mode == "log" and self.n > self._initial:
            log.info(self.line() + " (done)")
        self.mode = "off"


class EventBar:
    """Draws, on this process's terminal, the bar a worker describes with progress events."""

    def __init__(self):
        self._bar = None

    def handle(self, line: str) -> None:
        event = json.loads(line[len(EVENT_PREFIX):])
        from tqdm import tqdm

        if self._bar is None or self._bar.desc != event["desc"]:
            self.close()
            self._bar = tqdm(total=event["total"], desc=event["desc"], unit=event["unit"], initial=event["initial"],
                             dynamic_ncols=True, file=sys.stderr)
        self._bar.update(event["n"] - self._bar.n)
        if event["fields"]:
            self._bar.set_postfix(event["fields"], refresh=False)
        if event["done"]:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
