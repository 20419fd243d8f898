"""Test hooks, inert unless FTJOB_DEBUG is set. They let tests land a signal or a kill -9 at a chosen
moment (during evaluation, inside the first step, in the middle of a checkpoint write) instead of
racing the clock. Example: FTJOB_DEBUG="delay_eval=3,kill_in_save=20".
"""
from __future__ import annotations

import os
import signal
import time


def _settings() -> dict[str, float]:
    out = {}
    for item in os.environ.get("FTJOB_DEBUG", "").split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = float(v)
    return out


def delay(point: str) -> None:
    seconds = _settings().get(f"delay_{point}")
    if seconds:
        time.sleep(seconds)


def maybe_kill_in_save(step: int, rank: int) -> None:
    """SIGKILL rank 0 after DeepSpeed wrote its files but before the completion marker."""
    if rank == 0 and _settings().get("kill_in_save") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def trace_blocks(rank: int, step: int, indices) -> None:
    """Append the block indices this rank trained on, one line per micro-batch (FTJOB_TRACE_BLOCKS=dir)."""
    directory = os.environ.get("FTJOB_TRACE_BLOCKS")
    if directory:
        with open(os.path.join(directory, f"blocks-rank{rank}.txt"), "a") as f:
            f.write(f"{step} " + " ".join(map(str, indices)) + "\n")


_poisoned = False


def maybe_poison(loss, step: int):
    """NaN loss once, at optimizer step `nan_at_step` (0-based), in this process: a transient blow-up."""
    global _poisoned
    if not _poisoned and _settings().get("nan_at_step") == step:
        _poisoned = True
        return loss * float("nan")
    return loss
