"""Test-only fault injection and tracing, inert unless FTJOB_FAULTS or FTJOB_TRACE_BLOCKS is set.

Tests land a signal or a kill -9 at a chosen moment (during evaluation, inside the first step, in the
middle of a checkpoint write) instead of racing the clock. The settings are read once, at import; the
training loop checks `faults.ACTIVE` before calling anything here. Example:
FTJOB_FAULTS="delay_eval=3,kill_in_save=20,delay_save=45".
"""
from __future__ import annotations

import os
import signal
import time


def _parse(text: str) -> dict[str, float]:
    out = {}
    for item in text.split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = float(v)
    return out


SETTINGS = _parse(os.environ.get("FTJOB_FAULTS", ""))
TRACE_DIR = os.environ.get("FTJOB_TRACE_BLOCKS") or None
ACTIVE = bool(SETTINGS or TRACE_DIR)
_poisoned: set[str] = set()


def delay(point: str) -> None:
    """Sleep `delay_<point>` seconds: "step" (each micro-step), "eval", "save", "export", "samples" (before
    the worker writes samples)."""
    seconds = SETTINGS.get(f"delay_{point}")
    if seconds:
        time.sleep(seconds)


def escapes_its_job() -> bool:
    """`orphan=1`: the worker neither dies with its job nor checks that it is alive, as a process the kernel
    cannot end at once would (stuck in I/O on a network volume); it still holds the writers lock."""
    return bool(SETTINGS.get("orphan"))


def kill_in_save(step: int, rank: int) -> None:
    """SIGKILL rank 0 after DeepSpeed wrote its files but before the completion marker."""
    if rank == 0 and SETTINGS.get("kill_in_save") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def stop_at(step: int, rank: int) -> None:
    """SIGTERM to rank 0 right after optimizer step `stop_at_step`, as a scheduler's preemption would:
    the run must checkpoint that step and exit 75."""
    if rank == 0 and SETTINGS.get("stop_at_step") == step:
        os.kill(os.getpid(), signal.SIGTERM)


def resume_seed_offset() -> int:
    """`reseed_on_resume=N`: a resumed run draws its data order and dropout from seed + N, a broken resume
    that `ftjob smoke` and the tests must catch."""
    return int(SETTINGS.get("reseed_on_resume", 0))


def trace_blocks(rank: int, step: int, indices) -> None:
    """Append the block indices this rank trained on, one line per micro-batch."""
    if TRACE_DIR:
        with open(os.path.join(TRACE_DIR, f"blocks-rank{rank}.txt"), "a") as f:
            f.write(f"{step} " + " ".join(map(str, indices)) + "\n")


def trace_eval(rank: int, step: int, indices, full: bool = False) -> None:
    """Append the validation block indices this rank evaluates, one line per micro-batch."""
    if TRACE_DIR and len(indices):
        with open(os.path.join(TRACE_DIR, f"eval{'-full' if full else ''}-rank{rank}.txt"), "a") as f:
            f.write(f"{step} " + " ".join(map(str, indices)) + "\n")


def poison(loss, step: int):
    """NaN loss at optimizer step `nan_at_step` (0-based), and again at `nan_again_at_step`, each once in
    this process: transient blow-ups."""
    for key in ("nan_at_step", "nan_again_at_step"):
        if key not in _poisoned and SETTINGS.get(key) == step:
            _poisoned.add(key)
            return loss * float("nan")
    return loss
