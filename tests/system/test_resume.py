"""Preemption and resume, for real: SIGTERM to `ftjob run` (as Kubernetes or the launcher sends it),
a kill -9 in the middle of a checkpoint write, a signal during the first step and during evaluation,
and a second job on a live run directory. Two CPU workers through the real deepspeed launcher."""
from __future__ import annotations

import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ftjob_command, run_ftjob, write_spec
from job import errors

pytestmark = pytest.mark.slow


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def state(run: Path) -> dict:
    try:
        return json.loads((run / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def start(spec: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(ftjob_command() + ["run", str(spec)], env=dict(os.environ, **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(predicate, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def resume_spec(tmp: Path, demo_spec: dict, name: str, **extra) -> Path:
    # fp32 and the model's own dropout (0.1): exactness needs the RNG states restored, not just weights.
    settings = dict(output_dir=str(tmp / "runs"), name=name, train__precision="fp32", train__max_steps=40,
                    train__log_every=1, train__eval_every=0, train__sample_every=0, train__checkpoint_every=1000,
                    generation__max_length=12)
    settings.update(extra)
    return write_spec(tmp / f"{name}.yaml", demo_spec, **settings)


@pytest.fixture(scope="module")
def reference(demo_assets, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    import yaml

    tmp = tmp_path_factory.mktemp("reference")
    spec = resume_spec(tmp, yaml.safe_load(demo_assets.spec.read_text()), "ref")
    trace = tmp / "trace"
    trace.mkdir()
    proc = run_ftjob("run", spec, env={"FTJOB_TRACE_BLOCKS": str(trace)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp / "runs" / "ref"
    return {"metrics": jsonl(run / "metrics.jsonl"), "weights": final_weights(run),
            "trace": {f.name: f.read_text() for f in trace.iterdir()}}


def test_sigterm_mid_epoch_then_resume_matches_the_uninterrupted_run(reference, demo_spec, tmp_path):
    spec = resume_spec(tmp_path, demo_spec, "interrupted")
    run = tmp_path / "runs" / "interrupted"
    trace = tmp_path / "trace"
    trace.mkdir()
    env = {"FTJOB_TRACE_BLOCKS": str(trace), "FTJOB_FAULTS": "delay_step=0.05"}
    proc = start(spec, env)
    wait_until(lambda: any(m["step"] >= 7 for m in jsonl(run / "metrics.jsonl")), what="step 7")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == errors.PREEMPTED, err[-3000:]
    stopped = state(run)["step"]
    assert 7 <= stopped < 16, "the signal should land inside the first epoch (16 steps)"
    ckpt = run / "checkpoints" / f"step-{stopped:08d}"
    marker = json.loads((ckpt / "COMPLETE.json").read_text())
    assert marker["step"] == stopped and marker["tokens"] > 0
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.name

    proc = run_ftjob("run", spec, env={"FTJOB_TRACE_BLOCKS": str(trace)})  # no flag: resumes by itself
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {ckpt}" in proc.stderr

    # Same per-step losses, same blocks at every step, same final weights.
    ref_losses = [(m["step"], m["loss"]) for m in reference["metrics"]]
    got_losses = [(m["step"], m["loss"]) for m in jsonl(run / "metrics.jsonl")]
    assert [s for s, _ in got_losses] == [s for s, _ in ref_losses]
    for (s, a), (_, b) in zip(got_losses, ref_losses):
        assert abs(a - b) <= 1e-6, f"step {s}: {a} vs {b}"
    assert {f.name: f.read_text() for f in trace.iterdir()} == reference["trace"]
    got = final_weights(run)
    worst = max((got[k] - reference["weights"][k]).abs().max().item() for k in got)
    assert worst <= 1e-6, f"final weights differ by {worst}"


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_usable(demo_spec, tmp_path):
    spec = resume_spec(tmp_path, demo_spec, "killed", train__max_steps=12, train__checkpoint_every=4)
    run = tmp_path / "runs" / "killed"
    proc = run_ftjob("run", spec, env={"FTJOB_FAULTS": "kill_in_save=8"})
    assert proc.returncode not in (0, errors.PREEMPTED)
    port = re.search(r"--master_port=(\d+)", proc.stderr).group(1)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # cleaned after a crash too
    ckpts = run / "checkpoints"
    assert (ckpts / ".tmp-step-00000008").exists() and not (ckpts / ".tmp-step-00000008" / "COMPLETE.json").exists()
    assert not (ckpts / "step-00000008").exists()
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    from job.rundir import newest_complete

    assert newest_complete(ckpts).name == "step-00000004"

    proc = run_ftjob("run", spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step-00000004" in proc.stderr
    assert [m["step"] for m in jsonl(run / "metrics.jsonl")] == list(range(1, 13))
    assert not (ckpts / ".tmp-step-00000008").exists()  # torn attempt cleaned once a newer one completed


def test_sigterm_during_the_first_step_and_during_evaluation(demo_spec, tmp_path):
    spec = resume_spec(tmp_path, demo_spec, "signals", train__max_steps=6, train__eval_every=3)
    run = tmp_path / "runs" / "signals"
    # Attempt 1: the signal lands inside step 1 (each micro-step is slowed down), stops after it.
    # Attempt 2: it lands during the evaluation at step 3, which finishes; the checkpoint is step 3.
    for debug, where, expected in [("delay_step=1.5", ("train", 0), 1), ("delay_eval=2", ("eval", 3), 3)]:
        proc = start(spec, {"FTJOB_FAULTS": debug})
        wait_until(lambda: (state(run).get("stage"), state(run).get("step")) == where, what=str(where))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == errors.PREEMPTED, err[-3000:]
        assert (run / "checkpoints" / f"step-{expected:08d}" / "COMPLETE.json").exists()
    proc = run_ftjob("run", spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in jsonl(run / "eval.jsonl")] == [0, 3, 6]


def test_one_writer_per_run_directory_and_restart_moves_the_old_run_aside(demo_spec, tmp_path):
    spec = resume_spec(tmp_path, demo_spec, "locked", train__max_steps=2)
    run = tmp_path / "runs" / "locked"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from job.rundir import RunLock, RunPaths\n"
        f"RunLock(RunPaths(Path({str(run)!r}))).acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    proc = run_ftjob("run", spec)
    assert proc.returncode == errors.LOCKED
    assert f"pid {holder.pid}" in proc.stderr and "Traceback" not in proc.stderr
    holder.kill()  # a dead holder does not keep the lock
    holder.wait()
    proc = run_ftjob("run", spec)
    assert proc.returncode == 0, proc.stderr[-3000:]

    old_weights = final_weights(run)
    proc = run_ftjob("run", spec, "--restart")
    assert proc.returncode == 0, proc.stderr[-3000:]
    aside = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("locked.old-")]
    assert len(aside) == 1
    kept = final_weights(aside[0])
    assert all(torch.equal(kept[k], old_weights[k]) for k in kept)
    assert jsonl(run / "eval.jsonl")[0]["step"] == 0


def test_divergence_stops_with_a_clear_message(demo_spec, tmp_path):
    spec = resume_spec(tmp_path, demo_spec, "diverge", train__max_steps=30, train__lr=1.0e6, train__grad_clip=0.0,
                       train__checkpoint_every=2, train__warmup_steps=0)
    proc = run_ftjob("run", spec)
    assert proc.returncode == errors.DIVERGED, proc.stderr[-3000:]
    assert "training diverged" in proc.stderr and "Last good checkpoint" in proc.stderr


def test_divergence_can_roll_back_to_the_last_good_checkpoint_with_a_lower_lr(demo_spec, tmp_path):
    spec = resume_spec(tmp_path, demo_spec, "rollback", train__max_steps=12, train__checkpoint_every=4,
                       train__on_divergence="rollback", train__scheduler="constant", train__warmup_steps=0)
    run = tmp_path / "runs" / "rollback"
    proc = run_ftjob("run", spec, env={"FTJOB_FAULTS": "nan_at_step=6"})  # a NaN loss in step 7, once
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rolled back to step-00000004" in proc.stderr
    metrics = jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 13))
    lr = demo_spec["train"]["lr"]
    assert all(m["lr"] == lr for m in metrics[:4]) and all(abs(m["lr"] - lr / 2) < 1e-12 for m in metrics[4:])
    assert all(math.isfinite(m["loss"]) for m in metrics)


def test_a_run_keeps_its_data_when_the_database_changes_and_a_slow_save_completes(reference, demo_spec, tmp_path):
    """Preempted with a checkpoint save slowed to 45 s (DeepSpeed's launch process would have killed the
    workers 30 s after a SIGTERM of its own: only the workers get it); 100 rows appended to the database
    before the resume, then preempted again and the database only touched. The run keeps its split and its
    prepared data, and ends with the uninterrupted run's weights. A changed data setting is refused."""
    import shutil
    import sqlite3

    db = tmp_path / "wikibooks.sqlite"
    shutil.copy(demo_spec["data"]["database"], db)
    spec = resume_spec(tmp_path, demo_spec, "changing", data__database=str(db))
    run = tmp_path / "runs" / "changing"

    proc = start(spec, {"FTJOB_FAULTS": "delay_step=0.05,delay_save=45"})
    wait_until(lambda: any(m["step"] >= 5 for m in jsonl(run / "metrics.jsonl")), what="step 5")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    took = time.monotonic() - signalled
    assert proc.returncode == errors.PREEMPTED, err[-3000:]
    first_stop = state(run)["step"]
    assert took >= 45 and (run / "checkpoints" / f"step-{first_stop:08d}" / "COMPLETE.json").exists()
    assert f"checkpoint step-{first_stop:08d} is complete" in err
    manifest = json.loads((run / "data" / "manifest.json").read_text())

    with sqlite3.connect(db) as conn:  # 100 more rows, as a live database grows
        rows = conn.execute("SELECT * FROM en LIMIT 100").fetchall()
        conn.executemany("INSERT INTO en VALUES (?, ?, ?, ?, ?)", rows)
    conn.close()
    proc = start(spec, {"FTJOB_FAULTS": "delay_step=0.05"})
    wait_until(lambda: any(m["step"] >= first_stop + 8 for m in jsonl(run / "metrics.jsonl")), what="more steps")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == errors.PREEMPTED, err[-3000:]
    assert "changed since this run's data was prepared" in err and "keeps its own prepared data" in err

    os.utime(db)  # only the modification time changes
    proc = run_ftjob("run", spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "changed since this run's data was prepared" in proc.stderr
    after = json.loads((run / "data" / "manifest.json").read_text())
    assert after == manifest  # same split, same shards, same hashes: the run's own snapshot
    assert (after["splits"]["train"]["documents"], after["splits"]["valid"]["documents"]) == (451, 113)
    got = final_weights(run)
    worst = max((got[k] - reference["weights"][k]).abs().max().item() for k in got)
    assert worst <= 1e-6, f"final weights differ from the uninterrupted run by {worst}"

    proc = run_ftjob("run", spec, "--set", "data.block_size=32")
    assert proc.returncode == errors.BAD_INPUT, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1].startswith("ftjob: error: data.block_size: changed since this run's data")
