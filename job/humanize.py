"""Times and durations as a person reads them: 1:02:03, 5m 03s ago, and the timestamps the run's files hold."""
from __future__ import annotations

import time
from datetime import datetime


def format_duration(seconds: float) -> str:
    """0:42, 12:05, 1:02:03."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_age(seconds: float) -> str:
    """12s, 5m 03s, 2h 05m, 3d 04h."""
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def parse_time(value) -> float | None:
    """Unix seconds from a unix number or a timestamp string such as "2024-05-01T12:00:00+0200"."""
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def ago(value, now: float | None = None) -> str:
    """`value` (a timestamp) as written plus its age: "2024-05-01T12:00:00+0200 (12s ago)"."""
    t = parse_time(value)
    if t is None:
        return "unknown" if value is None else str(value)
    shown = value if isinstance(value, str) else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
    return f"{shown} ({format_age((now or time.time()) - t)} ago)"


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"
