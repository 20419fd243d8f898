"""Where a run stands, from the files in its run directory alone.

`ftjob status RUN_DIR` runs on a login node while the job runs on some other node: it reads state.json,
the JSON-lines logs, the checkpoint markers and the lock file, and never imports DeepSpeed or loads a model.
Whether a job is alive is answered by the flock on .lock (released by the kernel when the job dies), not by
state.json, which a killed job leaves saying "train".
"""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from .errors import BadInput
from .lock import holder_info, is_held
from .paths import RunPaths
from .runstate import read_jsonl, read_state
from .train.checkpoint import complete_checkpoints, read_marker

FINISHED = {"trained", "generate", "done"}  # training is over in these stages
STOPPED = {"preempted", "diverged", "failed"}  # the job ended before finishing


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


def ago(value, now: float | None = None) -> str:
    """`value` (a timestamp) as written plus its age: "2024-05-01T12:00:00+0200 (12s ago)"."""
    t = parse_time(value)
    if t is None:
        return "unknown" if value is None else str(value)
    shown = value if isinstance(value, str) else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
    return f"{shown} ({format_age((now or time.time()) - t)} ago)"


def run_paths(run_dir: Path | str) -> RunPaths:
    """RunPaths for an existing run directory, or BadInput that says what is wrong with the path."""
    paths = RunPaths(Path(run_dir))
    root = paths.root
    if not root.is_dir():
        raise BadInput(f"run directory {root} does not exist (it is <output_dir>/<name> from the spec)")
    markers = (paths.spec, paths.state, paths.manifest, paths.metrics, paths.lock)
    if not any(p.exists() for p in markers):
        runs = sorted(p.name for p in root.iterdir() if (p / "spec.yaml").exists() or (p / "state.json").exists())
        hint = f"; run directories inside it: {', '.join(runs)}" if runs else ""
        raise BadInput(f"{root} is not an ftjob run directory (no spec.yaml, state.json or data/){hint}")
    return paths


def newest_checkpoint(paths: RunPaths) -> dict | None:
    """Name, path and marker fields of the newest checkpoint with a completion marker."""
    for step, path in complete_checkpoints(paths.checkpoints):
        try:
            marker = read_marker(path)
        except (OSError, ValueError):
            continue  # marker being replaced or damaged; an older one still counts
        return {"name": path.name, "path": path, **marker, "step": step}
    return None


def collect_status(run_dir: Path | str) -> dict:
    """Everything `status_text` shows, as plain values (for `ftjob status --json` or a dashboard)."""
    paths = run_paths(run_dir)
    metrics, evals = read_jsonl(paths.metrics), read_jsonl(paths.evals)
    held = is_held(paths)
    ckpt = newest_checkpoint(paths)
    if ckpt:
        ckpt = {k: v for k, v in ckpt.items() if k != "files"} | {"path": str(ckpt["path"])}
    return {"run_dir": str(paths.root), "state": read_state(paths), "last_metrics": metrics[-1] if metrics else None,
            "last_eval": evals[-1] if evals else None, "checkpoint": ckpt, "held": held,
            "holder": holder_info(paths) if held else None, "final": (paths.final / "config.json").exists()}


def status_text(run_dir: Path | str, now: float | None = None) -> str:
    """A readable, aligned `key: value` summary of the run in `run_dir`."""
    s = collect_status(run_dir)
    now = now or time.time()
    state = s["state"]
    rows = [("run", s["run_dir"]),
            ("stage", _stage(state, s["held"])),
            ("step", _progress(state)),
            ("epoch", _num(state.get("epoch"), ".2f")),
            ("train loss", _train(s["last_metrics"])),
            ("valid loss", _valid(s["last_eval"])),
            ("checkpoint", _checkpoint(s["checkpoint"], now)),
            ("job", _holder(s["holder"], now) if s["held"] else "no live job holds the run directory"),
            ("updated", ago(state.get("updated"), now) if state.get("updated") else "never (no state.json yet)"),
            ("final model", "present (final/)" if s["final"] else "not yet")]
    for extra in ("reason", "signal"):  # why a run stopped (diverged / preempted)
        if state.get(extra):
            rows.insert(2, (extra, str(state[extra])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in rows)


def _stage(state: dict, held: bool) -> str:
    stage = state.get("stage")
    if stage is None:
        return "not started (no state.json yet)"
    if not held and stage not in FINISHED | STOPPED:
        return f"{stage} (but no live job holds the run directory: the job was killed or its node was lost; " \
               "run it again to resume from the newest checkpoint)"
    if stage == "preempted":
        return "preempted (a complete checkpoint was written; run the same command again to resume)"
    return stage


def _progress(state: dict) -> str:
    step, total = state.get("step"), state.get("total_steps")
    if step is None:
        return "-"
    if not total:
        return f"{step}"
    return f"{step} / {total} ({100 * step / total:.1f}%)"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _train(m: dict | None) -> str:
    if not m:
        return "- (no training step logged yet)"
    tok_s = m.get("tokens_per_s")
    return f"{_num(m.get('loss'), '.4f')} at step {m.get('step')}" + (f", {tok_s:,.0f} tokens/s" if tok_s else "")


def _valid(e: dict | None) -> str:
    if not e:
        return "- (no evaluation yet)"
    return f"{_num(e.get('loss'), '.4f')} (perplexity {_num(e.get('perplexity'), '.2f')}) at step {e.get('step')}"


def _checkpoint(c: dict | None, now: float) -> str:
    if not c:
        return "none complete yet"
    t = parse_time(c.get("time"))
    age = f", {format_age(now - t)} ago" if t is not None else ""
    return f"{c['name']} (step {c['step']}{age})"


def _holder(h: dict | None, now: float) -> str:
    if not h:
        return "running (holder unknown)"
    since = f" since {ago(h['since'], now)}" if h.get("since") else ""
    return f"running: pid {h.get('pid')} on {h.get('host')}{since}"
