"""Checkpoints that count only when complete, and the Checkpointer that decides when one is due.

DeepSpeed writes its `latest` pointer with a plain write, so a kill during a save can leave it naming a
torn checkpoint. Here a checkpoint is written under `.tmp-step-N`, its completion marker COMPLETE.json
(step, tokens, world size, the data's fingerprint, size and sha256 of every file) is written last, and only
then is the folder renamed to `step-N` and `latest` replaced. Resume trusts the marker, never the pointer.

A checkpoint written by another number of processes is loaded from DeepSpeed's universal form
(`ds_to_universal`, made once beside it by `to_universal`), so a run can resume on fewer or more GPUs.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .. import faults
from ..errors import BadInput, VolumeError
from ..rundir import (DS_TAG, UNIVERSAL_TAG, RunPaths, apply_umask, atomic_write, checkpoint_bytes, checkpoint_name,
                      describe_volume, looks_like_volume_failure, newest_complete, point_latest, prune_checkpoints,
                      read_best, read_marker, replace_dir, write_marker)

log = logging.getLogger("ftjob")



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


def trainer_state_of(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def to_universal(path: Path, optimizer: str, zero_stage: int) -> None:
    """Write <checkpoint>/ds_universal (per-parameter weights and optimizer states), once, so processes of
    another world size can load it. DeepSpeed's converter knows Adam's states only."""
    out = path / UNIVERSAL_TAG
    if (out / "zero").is_dir() or zero_stage == 0:
        return  # done before; or ZeRO 0, whose optimizer state is whole on every rank already
    if optimizer != "adamw":
        raise BadInput(f"train.optimizer: resuming a {optimizer} ZeRO-{zero_stage} checkpoint ({path.name}) on "
                       "another number of processes is not supported (DeepSpeed's universal checkpoint holds "
                       "Adam's states only); resume with the same number of processes, or use --restart")
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = path / f".{UNIVERSAL_TAG}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    # inject_missing_state: a data-parallel model has no tensor-parallel layout to record, which the
    # converter otherwise insists on finding in the checkpoint.
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress
        ds_to_universal(Namespace(input_folder=str(path / DS_TAG), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    (path / "latest_universal").unlink(missing_ok=True)
    apply_umask(tmp)
    replace_dir(tmp, out)
    log.info("converted %s to a universal checkpoint for the new number of processes (%.1fs)", path.name,
             time.perf_counter() - t0)


class Checkpointer:
    """Writes and reads this run's checkpoints. Collective: every rank calls save() and load()."""

    def __init__(self, engine, paths: RunPaths, every: int, keep: int, rank: int, world: int, barrier,
                 data_fingerprint: str):
        self.engine, self.paths, self.every, self.keep = engine, paths, every, keep
        self.rank, self.world, self.barrier, self.data_fingerprint = rank, world, barrier, data_fingerprint
        self.last: Path | None = newest_complete(paths.checkpoints, verify=False)

    def is_due(self, step: int, last_step: bool) -> bool:
        return step % self.every == 0 and not last_step

    def saved_at(self, step: int) -> bool:
        return self.last is not None and self.last.name == checkpoint_name(step)

    def save(self, step: int, trainer_state: dict) -> Path:
        root = self.paths.checkpoints
        tmp, final = root / f".tmp-{checkpoint_name(step)}", root / checkpoint_name(step)
        t0 = time.perf_counter()
        try:
            if self.rank == 0:
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # a torn attempt at this same step
                tmp.mkdir()
            self.barrier()
            if faults.ACTIVE:
                faults.delay("save")
            self.engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
            torch.save(rng_state(), tmp / f"rng-rank{self.rank:05d}.pt")
            self.barrier()
            if faults.ACTIVE:
                faults.kill_in_save(step, self.rank)
            if self.rank == 0:
                self._complete(tmp, final, step, trainer_state, t0)
            self.barrier()
        except Exception as e:
            if not looks_like_volume_failure(e, root):
                raise
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            last = self.last.name if self.last else "none yet"
            raise VolumeError(f"{describe_volume(root)} could not hold checkpoint {final.name} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); partial "
                              f"files removed; last complete checkpoint: {last}; free space or move output_dir, "
                              "then run again") from None
        self.last = final
        return final

    def _complete(self, tmp: Path, final: Path, step: int, trainer_state: dict, t0: float) -> None:
        atomic_write(tmp / "trainer_state.json", json.dumps(trainer_state, indent=1))
        apply_umask(tmp)  # every rank's files: DeepSpeed's own, torch.save's
        marker = write_marker(tmp, step=step, tokens=trainer_state["tokens"], epoch=trainer_state["epoch"],
                              world_size=self.world, data=self.data_fingerprint)
        if final.exists():  # same step saved before (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        tmp.rename(final)
        point_latest(self.paths.checkpoints, final)
        best = read_best(self.paths)
        prune_checkpoints(self.paths.checkpoints, self.keep, protect={best["checkpoint"]} if best else set())
        log.info("checkpoint %s complete (%.1f MB, %.1fs)", final, checkpoint_bytes(marker) / 1e6,
                 time.perf_counter() - t0)

    def load(self, path: Path) -> dict:
        """Restore engine (model, optimizer, scheduler, loss scaler) and this rank's RNG; returns the
        trainer state. Refuses a checkpoint of other data: resuming on it would be a different run."""
        t0 = time.perf_counter()
        marker = read_marker(path)
        if marker.get("data", self.data_fingerprint) != self.data_fingerprint:
            raise BadInput(f"checkpoint {path.name} was trained on other data (fingerprint {marker['data']}, the "
                           f"run's data/ is {self.data_fingerprint}); use --restart to start over on this data")
        universal = marker.get("world_size", self.world) != self.world
        self.engine._config.load_universal_checkpoint = universal  # read by load_checkpoint only
        load_path, _ = self.engine.load_checkpoint(str(path), tag=UNIVERSAL_TAG if universal else DS_TAG,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        self.engine._config.load_universal_checkpoint = False
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {path}")
        rng_file = path / f"rng-rank{self.rank:05d}.pt"
        if not universal and rng_file.exists():
            # weights_only=False: RNG states hold numpy objects; the file is the job's own (run directory only)
            set_rng_state(torch.load(rng_file, weights_only=False))
        self.last = path
        state = trainer_state_of(path)
        if self.rank == 0:
            log.info("resumed from %s (step %d, %.1fs)", path, state["step"], time.perf_counter() - t0)
        return state
