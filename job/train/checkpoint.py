"""Checkpoints that count only when complete.

DeepSpeed writes its `latest` pointer with a plain write, so a kill during a save can leave it naming a
torn checkpoint. Here a checkpoint is written under `.tmp-step-N`, its completion marker COMPLETE.json
(step, tokens seen, size and sha256 of every file) is written last, and only then is the folder renamed
to `step-N` and the `latest` pointer replaced with os.replace. Resume trusts the marker, never the pointer.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .. import debug
from ..fileutil import sha256_file

log = logging.getLogger("ftjob")

MARKER = "COMPLETE.json"
DS_TAG = "ds"  # DeepSpeed's own files live in <checkpoint>/ds/
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of checkpoints that carry a completion marker, newest first."""
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / MARKER).exists():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def newest_complete(root: Path, verify: bool = True) -> Path | None:
    for step, path in complete_checkpoints(root):
        problem = verify_checkpoint(path) if verify else None
        if problem is None:
            return path
        log.warning("checkpoint %s is damaged (%s); trying an older one", path, problem)
    return None


def verify_checkpoint(path: Path) -> str | None:
    """None if every file the marker lists is there with its size and sha256, else what is wrong."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable marker: {e}"
    for rel, info in marker["files"].items():
        f = path / rel
        if not f.exists():
            return f"missing {rel}"
        if f.stat().st_size != info["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, expected {info['bytes']}"
        if sha256_file(f) != info["sha256"]:
            return f"{rel} checksum mismatch"
    return None


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, root: Path, step: int, trainer_state: dict, keep: int, rank: int, barrier) -> Path:
    """Collective: every rank calls it. Returns the final path of the complete checkpoint."""
    t0 = time.perf_counter()
    tmp = root / f".tmp-{checkpoint_name(step)}"
    final = root / checkpoint_name(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a torn attempt at this same step
        tmp.mkdir()
    barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    torch.save(rng_state(), tmp / f"rng-rank{rank:05d}.pt")
    barrier()
    debug.maybe_kill_in_save(step, rank)
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                files[str(f.relative_to(tmp))] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        marker = {"step": step, "tokens": trainer_state["tokens"], "epoch": trainer_state["epoch"],
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
        _write_atomic(tmp / MARKER, json.dumps(marker, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # same step saved before (e.g. final save after a periodic one)
            shutil.rmtree(final)
        tmp.rename(final)
        _write_atomic(root / "latest", final.name + "\n")
        _fsync_dir(root)
        _prune(root, keep)
        log.info("checkpoint %s complete (%.1f MB, %.1fs)", final,
                 sum(v["bytes"] for v in files.values()) / 1e6, time.perf_counter() - t0)
    barrier()
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep`, and torn temporary ones, only after a newer
    complete one exists (this runs right after a save completed)."""
    for _, path in complete_checkpoints(root)[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def load(engine, path: Path, rank: int) -> dict:
    """Restore engine (model, optimizer, scheduler, loss scaler) and this rank's RNG; returns trainer state."""
    t0 = time.perf_counter()
    load_path, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {path}")
    rng_file = path / f"rng-rank{rank:05d}.pt"
    if rng_file.exists():
        # weights_only=False: RNG states hold numpy objects; the file is the job's own (run directory only)
        set_rng_state(torch.load(rng_file, weights_only=False))
    state = json.loads((path / "trainer_state.json").read_text())
    if rank == 0:
        log.info("resumed from %s (step %d, %.1fs)", path, state["step"], time.perf_counter() - t0)
    return state
