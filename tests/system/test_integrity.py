"""A run's work is never silently changed or lost: the best evaluation's weights kept and exported, early
stopping, and a full volume during a checkpoint and during the export. Two CPU workers through the real
DeepSpeed launcher; the full volume is a real 12 MB tmpfs (mounted as root, skipped otherwise)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import ftjob_command, run_ftjob, write_spec
from job import errors

pytestmark = pytest.mark.slow


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_best_model_is_kept_and_early_stopping_stops_at_the_expected_evaluation(demo_spec, tmp_path):
    """The learning rate ramps up to 0.3 (warm-up over the whole run, no clipping), so validation loss
    falls first and then rises: the best evaluation comes early, and patience 2 ends the run two
    evaluations after it. ZeRO-3, so best/ comes from a partitioned checkpoint."""
    spec = write_spec(tmp_path / "spec.yaml", demo_spec, output_dir=str(tmp_path / "runs"), data__limit=120,
                      train__zero_stage=3,
                      train__lr=0.3, train__scheduler="constant", train__warmup_steps=30, train__grad_clip=0.0,
                      train__micro_batch=4, train__grad_accum=1, train__max_steps=30, train__eval_every=2,
                      train__checkpoint_every=2, train__keep_checkpoints=1, train__log_every=2,
                      train__early_stopping_patience=2, train__sample_every=0, generation__max_length=12)
    proc = run_ftjob("run", spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "demo"

    # The rule, applied by hand to what the run measured: best = lowest loss after step 0; stop at the
    # second evaluation after it that is not better.
    evals = [e for e in jsonl(run / "eval.jsonl") if e["step"] > 0]
    best, since, stop = None, 0, None
    for e in evals:
        if best is None or e["loss"] < best["loss"]:
            best, since = e, 0
        else:
            since += 1
        if since == 2:
            stop = e["step"]
            break
    assert stop is not None and stop < 30, f"validation loss never rose twice in a row: {evals}"
    assert evals[-1]["step"] == stop  # no evaluation after the stop
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == stop and "did not improve" in state["stopped_early"]
    assert f"early stopping at step {stop}" in proc.stderr

    pointer = json.loads((run / "checkpoints" / "best.json").read_text())
    assert (pointer["step"], pointer["loss"]) == (best["step"], best["loss"])
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert kept == [f"step-{best['step']:08d}", f"step-{stop:08d}"]  # keep_checkpoints 1 + the best, never pruned

    # best/ holds the best checkpoint's weights (exported again here with `ftjob export`), final/ the last.
    out = tmp_path / "best-again"
    assert run_ftjob("export", spec, "--checkpoint", run / "checkpoints" / pointer["checkpoint"], "--out", out).returncode == 0
    best_w, again, final = weights(run / "best"), weights(out), weights(run / "final")
    assert all(torch.equal(best_w[k], again[k]) for k in best_w)
    assert any(not torch.equal(best_w[k], final[k]) for k in best_w)
    from transformers import AutoModelForCausalLM

    assert next(AutoModelForCausalLM.from_pretrained(run / "best").parameters()).dtype == torch.float32

    report = (run / "report.md").read_text()
    assert f"best: validation loss {best['loss']:.4f} at step {best['step']}" in report
    assert "stopped early" in report


# ------------------------------------------------------------------ a full volume


@pytest.fixture
def small_volume(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "volume"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12M", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(volume: Path) -> Path:
    """Take every free byte of the volume."""
    filler = volume / "filler.bin"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def partial_files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("moment, fault, where", [
    ("checkpoint", "delay_save=3", "could not hold checkpoint step-00000004"),
    ("export", "delay_export=3", "could not hold the final model"),
])
def test_a_volume_that_fills_up_stops_cleanly_and_the_run_resumes(demo_spec, tmp_path, small_volume, moment,
                                                                   fault, where):
    spec = write_spec(tmp_path / "spec.yaml", demo_spec, output_dir=str(small_volume), train__max_steps=8,
                      train__checkpoint_every=4, train__keep_checkpoints=1, train__eval_every=0, train__sample_every=0,
                      train__log_every=1, generation__max_length=12)
    run = small_volume / "demo"
    stage = "checkpoint" if moment == "checkpoint" else "export"
    # Both ranks write their part of a checkpoint; the export is rank 0's alone, so one worker will do.
    procs = "2" if moment == "checkpoint" else "1"
    proc = subprocess.Popen(ftjob_command() + ["run", str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, FTJOB_FAULTS=fault, NPROC_PER_NODE=procs))

    def at_moment():
        try:
            return json.loads((run / "state.json").read_text()).get("stage") == stage
        except (OSError, ValueError):
            return False

    wait_for(at_moment, 240, f"the {moment}")
    filler = fill(small_volume)  # the volume fills up while the save or export is under way
    _, err = proc.communicate(timeout=240)

    assert proc.returncode == errors.VOLUME, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    (message,) = [line for line in lines if line.startswith("ftjob: error:")]
    assert lines[-1] == message
    for words in (f"volume {small_volume}", "MB free", where, "partial files removed", "last complete checkpoint"):
        assert words in message, message
    assert partial_files(run) == [], partial_files(run)
    if moment == "export":
        assert "last complete checkpoint: step-00000008" in message and not (run / "final").exists()

    filler.unlink()  # room again (as after growing the volume): the same command resumes and finishes
    proc = run_ftjob("run", spec, env={"NPROC_PER_NODE": procs})
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = "step-00000004" if moment == "checkpoint" else "step-00000008"
    if moment == "checkpoint":
        assert "resumed from" not in proc.stderr  # no checkpoint had completed: it starts over
    else:
        assert f"resumed from {run / 'checkpoints' / resumed}" in proc.stderr
    assert [m["step"] for m in jsonl(run / "metrics.jsonl")][-1] == 8
    assert (run / "final" / "config.json").exists() and partial_files(run) == []
    shutil.rmtree(run)
