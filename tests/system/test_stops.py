"""Other ways a run stops, through the real `ftjob run` and DeepSpeed's launcher (one CPU worker: what is
tested here does not depend on the number of ranks): a signal during the first step and during an
evaluation, a kill -9 inside a checkpoint write, a second job on a live run directory, --restart, and a
divergence rolled back once and then stopped."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import torch

import pytest

from job import errors
from conftest import jsonl, run_ftjob, run_state, start_ftjob, wait_until, weights, write_spec

pytestmark = pytest.mark.slow
ONE = {"NPROC_PER_NODE": "1"}


def spec_for(tmp, demo_spec, name, **extra):
    settings = dict(output_dir=str(tmp / "runs"), name=name, train__precision="fp32", train__log_every=1,
                    train__eval_every=0, train__sample_every=0, train__checkpoint_every=1000, generation__max_length=12)
    settings.update(extra)
    return write_spec(tmp / f"{name}.yaml", demo_spec, **settings)


def test_signals_in_the_first_step_and_in_an_evaluation_and_a_kill_9_inside_a_save(demo_spec, tmp_path):
    spec = spec_for(tmp_path, demo_spec, "stops", train__max_steps=9, train__eval_every=3, train__checkpoint_every=3)
    run = tmp_path / "runs" / "stops"
    # Attempt 1: the signal lands inside step 1 (each micro-step is slowed down), stops after it.
    # Attempt 2: it lands during the evaluation at step 3, which finishes; the checkpoint is step 3.
    for faults, where, expected in [("delay_step=1.5", ("train", 0), 1), ("delay_eval=2", ("eval", 3), 3)]:
        proc = start_ftjob("run", spec, env={"FTJOB_FAULTS": faults, **ONE})
        wait_until(lambda: (run_state(run).get("stage"), run_state(run).get("step")) == where, what=str(where))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == errors.PREEMPTED, err[-3000:]
        assert (run / "checkpoints" / f"step-{expected:08d}" / "COMPLETE.json").exists()
    # Attempt 3: kill -9 after DeepSpeed wrote step 6's files, before the completion marker.
    proc = run_ftjob("run", spec, env={"FTJOB_FAULTS": "kill_in_save=6", **ONE})
    assert proc.returncode not in (0, errors.PREEMPTED)
    ckpts = run / "checkpoints"
    assert (ckpts / ".tmp-step-00000006").exists() and not (ckpts / ".tmp-step-00000006" / "COMPLETE.json").exists()
    assert not (ckpts / "step-00000006").exists() and (ckpts / "latest").read_text().strip() == "step-00000003"
    # Attempt 4: resumes from step 3 (the torn save does not count), finishes; the torn folder is gone.
    proc = run_ftjob("run", spec, env=ONE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {ckpts / 'step-00000003'}" in proc.stderr
    assert [m["step"] for m in jsonl(run / "metrics.jsonl")] == list(range(1, 10))
    assert [e["step"] for e in jsonl(run / "eval.jsonl")] == [0, 3, 6, 9]
    assert not (ckpts / ".tmp-step-00000006").exists()


def test_one_writer_per_run_directory_restart_and_the_memory_settings(demo_spec, tmp_path):
    """Also the run that trains here: ZeRO-0, a fresh GPT-2 with ruGPT3small's 2048 positions (narrow, so
    it is quick) trained on blocks of all 2048 tokens, gradient checkpointing, eager attention, TensorBoard."""
    spec = spec_for(tmp_path, demo_spec, "locked", train__max_steps=4, train__zero_stage=0, data__block_size=2048,
                    model__from_config={"n_positions": 2048, "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 512},
                    train__micro_batch=1, train__grad_accum=1, train__gradient_checkpointing=True,
                    model__attn_implementation="eager", report__tensorboard=True, data__valid_fraction=0.1,
                    data__shards=1)
    run = tmp_path / "runs" / "locked"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from job.rundir import RunLock, RunPaths\n"
        f"RunLock(RunPaths(Path({str(run)!r}))).acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    proc = run_ftjob("run", spec, env=ONE)
    assert proc.returncode == errors.LOCKED
    assert f"pid {holder.pid}" in proc.stderr and "Traceback" not in proc.stderr
    holder.kill()  # a dead holder does not keep the lock
    holder.wait()
    proc = run_ftjob("run", spec, env=ONE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # what the worker's model really is, as it reports it (HF's own attributes, not the spec)
    assert "eager attention, gradient checkpointing on; fp32, ZeRO-0" in proc.stderr
    assert json.loads((run / "data" / "manifest.json").read_text())["block_size"] == 2048
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "eval/loss"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]

    old_weights = weights(run / "final")
    proc = run_ftjob("run", spec, "--restart", "--set", "train.max_steps=2", env=ONE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    aside = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("locked.old-")]
    assert len(aside) == 1
    kept = weights(aside[0] / "final")
    assert all(torch.equal(kept[k], old_weights[k]) for k in kept)
    assert [e["step"] for e in jsonl(run / "eval.jsonl")] == [0, 2]


def test_divergence_rolls_back_once_then_stops_with_a_clear_message(demo_spec, tmp_path):
    spec = spec_for(tmp_path, demo_spec, "diverge", train__max_steps=12, train__checkpoint_every=4,
                    train__on_divergence="rollback", train__max_rollbacks=1, train__scheduler="constant",
                    train__warmup_steps=0)
    run = tmp_path / "runs" / "diverge"
    # NaN losses in steps 7 and 10: the first rolls back to step 4 with half the learning rate, the second
    # finds no rollback left.
    proc = run_ftjob("run", spec, env={"FTJOB_FAULTS": "nan_at_step=6,nan_again_at_step=9", **ONE})
    assert proc.returncode == errors.DIVERGED, proc.stderr[-3000:]
    assert "rolled back to step-00000004 (rollback 1 of 1)" in proc.stderr
    assert "training diverged" in proc.stderr and f"Last good checkpoint: {run / 'checkpoints' / 'step-00000008'}" in proc.stderr
    metrics = jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 11))
    lr = demo_spec["train"]["lr"]
    assert all(m["lr"] == lr for m in metrics[:4]) and all(abs(m["lr"] - lr / 2) < 1e-12 for m in metrics[4:])
    assert all(math.isfinite(m["loss"]) for m in metrics[:-1]) and not math.isfinite(metrics[-1]["loss"])
    assert run_state(run)["stage"] == "diverged"
    assert (run / "report.md").read_text().startswith("# diverge: diverged at step 10 of 12")
