"""A run's work is never silently changed or lost: the best evaluation's weights kept and exported, early
stopping, and a full volume during a checkpoint and during the export. Two CPU workers through the real
DeepSpeed launcher; the full volume is a real 12 MB tmpfs (mounted as root, skipped otherwise)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ftjob_command, jsonl, run_ftjob, wait_until, weights, write_spec
from job import errors

pytestmark = pytest.mark.slow


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


@contextlib.contextmanager
def tmpfs(mount: Path, size: str):
    """A real volume of `size` that fills up (as root; skipped otherwise), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_volume(tmp_path):
    with tmpfs(tmp_path / "volume", "12M") as mount:
        yield mount


def fill(volume: Path) -> Path:
    """Take every free page of the volume (64 KiB writes, then 4 KiB ones for what they left)."""
    filler = volume / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    return filler


def partial_files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name or ".old-" in p.name)


def run_until_the_volume_fills(spec: Path, run: Path, volume: Path, stage: str, fault: str, procs: str):
    """Start `ftjob run`, fill the volume while it is in `stage` (slowed down by `fault`), return its exit
    code, stderr and the filler file."""
    proc = subprocess.Popen(ftjob_command() + ["run", str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, FTJOB_FAULTS=fault, NPROC_PER_NODE=procs))

    def in_stage():
        try:
            return json.loads((run / "state.json").read_text()).get("stage") == stage
        except (OSError, ValueError):
            return False

    wait_until(in_stage, 240, f"the {stage}")
    filler = fill(volume)
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err, filler


def assert_one_volume_line(code: int, err: str, *words: str) -> str:
    assert code == errors.VOLUME, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    (message,) = [line for line in lines if line.startswith("ftjob: error:")]
    assert lines[-1] == message
    for w in words:
        assert w in message, message
    return message


def test_a_volume_that_fills_during_a_checkpoint_and_during_the_export(demo_spec, tmp_path, small_volume):
    """Attempt 1 (two ranks, both write their part): the volume fills while checkpoint step 4 is written.
    Attempt 2, with room again, starts over (no checkpoint had completed) and the volume fills while the
    final model is exported. Attempt 3 resumes from the step-8 checkpoint and finishes. Each failure: exit
    74, one line, no partial files."""
    spec = write_spec(tmp_path / "spec.yaml", demo_spec, output_dir=str(small_volume), train__max_steps=8,
                      train__checkpoint_every=4, train__keep_checkpoints=1, train__eval_every=0, train__sample_every=0,
                      train__log_every=1, generation__max_length=12)
    run = small_volume / "demo"
    common = (f"volume {small_volume}", "MB free", "partial files removed", "last complete checkpoint")

    code, err, filler = run_until_the_volume_fills(spec, run, small_volume, "checkpoint", "delay_save=3", "2")
    assert_one_volume_line(code, err, *common, "could not hold checkpoint step-00000004",
                           "last complete checkpoint: none yet")
    assert partial_files(run) == [], partial_files(run)
    filler.unlink()  # room again, as after growing the volume

    code, err, filler = run_until_the_volume_fills(spec, run, small_volume, "export", "delay_export=3", "1")
    assert "resumed from" not in err  # no checkpoint had completed: it started over
    assert_one_volume_line(code, err, *common, "could not hold the final model",
                           "last complete checkpoint: step-00000008")
    assert partial_files(run) == [] and not (run / "final").exists()
    filler.unlink()

    proc = run_ftjob("run", spec, env={"NPROC_PER_NODE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-00000008'}" in proc.stderr
    assert [m["step"] for m in jsonl(run / "metrics.jsonl")][-1] == 8
    assert (run / "final" / "config.json").exists() and partial_files(run) == []
    shutil.rmtree(run)


def test_a_volume_too_small_for_the_run_is_refused_before_training(demo_spec, tmp_path):
    """The plan made before training: data + (keep_checkpoints + 1 + the best) checkpoints + the exports do
    not fit on a 4 MB volume: exit 2 with the figures, before any worker starts."""
    with tmpfs(tmp_path / "tiny", "4M") as volume:
        spec = write_spec(tmp_path / "spec.yaml", demo_spec, output_dir=str(volume))
        proc = run_ftjob("run", spec)
        assert proc.returncode == errors.BAD_INPUT, proc.stderr[-3000:]
        line = proc.stderr.splitlines()[-1]
        for words in ("ftjob: error: output_dir:", f"volume {volume}", "NOT ENOUGH SPACE", "4 checkpoints",
                      "x 2.4 MB", "short by", "keep_checkpoints"):
            assert words in line, line
        assert "launching" not in proc.stderr and not (volume / "demo" / "checkpoints").exists()
