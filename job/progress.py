"""Progress a person can see: a bar on a terminal, a readable line every N seconds in a batch log.

Under Slurm or Kubernetes stderr is a file; bar redraws there are noise, so without a TTY we print one
plain line per interval instead. Only rank 0 of a distributed run reports progress.
"""
from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("ftjob")


def setup_logging(rank: int | None = None) -> None:
    prefix = f"[rank {rank}] " if rank is not None and rank > 0 else ""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format=f"%(asctime)s ftjob {prefix}%(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def is_tty() -> bool:
    return sys.stderr.isatty() and os.environ.get("FTJOB_PROGRESS", "") != "log"


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`with Progress(total, "tokenising", "shards") as p: p.update(1, loss=...)`."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", interval_s: float = 30.0,
                 enabled: bool = True, initial: int = 0):
        self.total, self.desc, self.unit, self.interval_s = total, desc, unit, interval_s
        self.enabled, self.n, self.start = enabled, initial, time.monotonic()
        self._initial, self._last_line, self._bar, self._fields = initial, self.start, None, {}
        if enabled and is_tty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                             file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1, **fields) -> None:
        self.n += n
        self._fields.update(fields)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if fields:
                self._bar.set_postfix({k: _fmt(v) for k, v in self._fields.items()}, refresh=False)
        else:
            now = time.monotonic()
            if now - self._last_line >= self.interval_s:
                self._last_line = now
                log.info(self.line(now))

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
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n > self._initial:
            log.info(self.line() + " (done)")
        self.enabled = False


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
