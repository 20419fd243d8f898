"""Where a run stands, from the files in its run directory alone.

`ftjob status RUN_DIR` runs on a login node while the job runs on some other node: it reads state.json,
the JSON-lines logs, the checkpoint markers, the plan and the lock file, and imports no torch. Whether a
job is alive is answered by the flock on .lock (released by the kernel when the job dies) and its
heartbeat, not by state.json, which a killed job leaves saying "train".
"""
from __future__ import annotations

import time
from pathlib import Path

from .errors import BadInput
from .humanize import ago, format_age, megabytes, parse_time
from .rundir import (FINISHED, STOPPED, RunPaths, holder_info, is_held, measured_figures, newest_checkpoint_info,
                     read_best, read_json, read_jsonl, read_state)


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


def collect_status(run_dir: Path | str) -> dict:
    """Everything `status_text` shows, as plain values (for `ftjob status --json` or a dashboard)."""
    paths = run_paths(run_dir)
    metrics, evals = read_jsonl(paths.metrics), read_jsonl(paths.evals)
    held = is_held(paths)
    return {"run_dir": str(paths.root), "state": read_state(paths), "last_metrics": metrics[-1] if metrics else None,
            "last_eval": evals[-1] if evals else None, "checkpoint": newest_checkpoint_info(paths), "held": held,
            "holder": holder_info(paths) if held else None, "final": (paths.final / "config.json").exists(),
            "best": read_best(paths), "plan": read_json(paths.plan), "measured": measured_figures(paths, metrics)}


def status_text(run_dir: Path | str, now: float | None = None) -> str:
    """A readable, aligned `key: value` summary of the run in `run_dir`."""
    s = collect_status(run_dir)
    now = now or time.time()
    state = s["state"]
    model = ((s["plan"] or {}).get("plan") or {}).get("model", {}).get("describe")
    rows = [("run", s["run_dir"]),
            ("model", model or "not planned yet (plan.json is written before training)"),
            ("stage", _stage(state, s["held"])),
            ("step", _progress(state)),
            ("epoch", _num(state.get("epoch"), ".2f")),
            ("train loss", _train(s["last_metrics"])),
            ("valid loss", _valid(s["last_eval"])),
            ("best", _best(s["best"])),
            ("checkpoint", _checkpoint(s["checkpoint"], now)),
            ("job", _holder(s["holder"], now) if s["held"] else "no live job holds the run directory"),
            ("updated", ago(state.get("updated"), now) if state.get("updated") else "never (no state.json yet)"),
            ("final model", "present (final/)" if s["final"] else "not yet")]
    if s["plan"]:
        rows += _plan_rows(s["plan"], s["measured"])
    for extra in ("reason", "signal", "stopped_early"):  # why a run stopped (diverged / preempted / early)
        if state.get(extra):
            rows.insert(2, (extra.replace("_", " "), str(state[extra])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in rows)


def _plan_rows(plan: dict, got: dict) -> list[tuple[str, str]]:
    """Plan beside measurement, so the estimate's error is visible on every run."""
    def pair(estimate, actual, fmt):
        shown = fmt(estimate) if estimate is not None else "-"
        if actual is None:
            return f"plan {shown}, measured: not yet"
        error = f" ({100 * (estimate - actual) / actual:+.0f}%)" if estimate and actual else ""
        return f"plan {shown}, measured {fmt(actual)}{error}"

    est = plan.get("estimates", plan)
    rows = [("tokens/s", pair(est.get("tokens_per_s"), got["tokens_per_s"], lambda v: f"{v:,.0f}")),
            ("checkpoint size", pair(est.get("checkpoint_bytes"), got["checkpoint_bytes"], megabytes))]
    if est.get("state_bytes") is not None:
        rows.append(("model state per process", pair(est.get("state_bytes"), got["state_bytes"], megabytes)))
    if est.get("peak_gpu_gib") is not None or got["peak_gpu_gib"] is not None:
        rows.append(("peak GPU memory", pair(est.get("peak_gpu_gib"), got["peak_gpu_gib"], lambda v: f"{v:.2f} GiB")))
    if est.get("peak_rss_mib") is not None:
        rows.append(("peak worker RSS", pair(est.get("peak_rss_mib"), got["peak_rss_mib"], lambda v: f"{v:,.0f} MiB")))
    return rows


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


def _best(b: dict | None) -> str:
    if not b:
        return "- (no evaluation after training started yet)"
    return f"validation loss {b['loss']:.4f} at step {b['step']} ({b['checkpoint']}; exported to best/ at the end)"


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
    beat = f", heartbeat {format_age(now - h['time'])} ago" if isinstance(h.get("time"), (int, float)) else ""
    return f"running: pid {h.get('pid')} on {h.get('host')}{since}{beat}"
