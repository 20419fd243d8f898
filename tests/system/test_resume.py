"""Exact resume, for real: SIGTERM to `ftjob run` mid-epoch, then the same command again; a run whose
database changes between attempts while a checkpoint save takes 45 s; six kill -9s of `ftjob`'s process
group, then a full volume twice. Two CPU workers through DeepSpeed's launcher, compared with one
uninterrupted run, whose first launch finds its port taken. (Other ways a run stops: test_stops.py.)"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ftjob_command, jsonl, run_ftjob, run_state, start_ftjob, wait_until, weights, write_spec
from job import errors
from test_integrity import assert_one_volume_line, fill, tmpfs

pytestmark = pytest.mark.slow


def resume_spec(tmp: Path, demo_spec: dict, name: str, **extra) -> Path:
    # fp32 and the model's own dropout (0.1): exactness needs the RNG states restored, not just weights.
    settings = dict(output_dir=str(tmp / "runs"), name=name, train__precision="fp32", train__max_steps=40,
                    train__log_every=1, train__eval_every=0, train__sample_every=0, train__checkpoint_every=1000,
                    generation__max_length=12)
    settings.update(extra)
    return write_spec(tmp / f"{name}.yaml", demo_spec, **settings)


# `ftjob run` whose first free port is one another process already holds: free_port() answers with a port
# that is free when it looks, and someone binds it before the workers do. Only that answer is staged.
FIRST_PORT_TAKEN = """
import sys
import job.cluster as cluster
real, first = cluster.free_port, [int(sys.argv.pop(1))]
cluster.free_port = lambda: first.pop() if first else real()
from job.cli import main
main()
"""


@pytest.fixture(scope="module")
def reference(demo_assets, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with. The port ftjob picks first is taken by
    this process before the workers can bind it (test_a_port_taken_before_the_workers_bind_it_is_retried)."""
    import yaml

    tmp = tmp_path_factory.mktemp("reference")
    spec = resume_spec(tmp, yaml.safe_load(demo_assets.spec.read_text()), "ref")
    trace = tmp / "trace"
    trace.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-c", FIRST_PORT_TAKEN, str(port), "run", str(spec)], text=True,
                              capture_output=True, timeout=600, env=dict(os.environ, FTJOB_TRACE_BLOCKS=str(trace)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp / "runs" / "ref"
    return {"metrics": jsonl(run / "metrics.jsonl"), "weights": weights(run / "final"),
            "trace": {f.name: f.read_text() for f in trace.iterdir()}, "stderr": proc.stderr, "taken_port": port}


def test_a_port_taken_before_the_workers_bind_it_is_retried(reference):
    """Rank 0 cannot bind the rendezvous port (EADDRINUSE): ftjob chose it, one node, so it launches again on
    another port, says so in one line, and the run trains (it is the reference run)."""
    err = reference["stderr"]
    ports = re.findall(r"--master_port=(\d+)", err)
    assert len(ports) == 2 and ports[0] == str(reference["taken_port"]) != ports[1], err[-3000:]
    assert (f"port {ports[0]} was taken by another process before the workers could bind it; launching again on "
            f"port {ports[1]}") in err
    assert "Traceback" not in err and "ftjob: error" not in err
    assert [m["step"] for m in reference["metrics"]] == list(range(1, 41))


def test_preempted_twice_while_the_database_changes_resumes_exactly(reference, demo_spec, tmp_path):
    """SIGTERM mid-epoch with a checkpoint save slowed to 45 s (DeepSpeed's launch process would have killed
    the workers 30 s after a SIGTERM of its own: only the workers get it); 100 rows appended to the database
    before the resume; SIGTERM again in the second epoch; the database only touched; the same command
    again. Each resume starts from its checkpoint by itself; the run keeps its split and prepared data, and
    ends with the uninterrupted run's blocks at every step, per-step losses and weights. A changed data
    setting is refused."""
    import shutil
    import sqlite3

    db = tmp_path / "wikibooks.sqlite"
    shutil.copy(demo_spec["data"]["database"], db)
    spec = resume_spec(tmp_path, demo_spec, "changing", data__database=str(db))
    run = tmp_path / "runs" / "changing"

    trace = tmp_path / "trace"
    trace.mkdir()
    traced = {"FTJOB_TRACE_BLOCKS": str(trace)}
    proc = start_ftjob("run", spec, env={"FTJOB_FAULTS": "delay_step=0.05,delay_save=45", **traced})
    wait_until(lambda: any(m["step"] >= 7 for m in jsonl(run / "metrics.jsonl")), what="step 7")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    took = time.monotonic() - signalled
    assert proc.returncode == errors.PREEMPTED, err[-3000:]
    first_stop = run_state(run)["step"]
    assert 7 <= first_stop < 16, "the signal should land inside the first epoch (16 steps)"
    ckpt = run / "checkpoints" / f"step-{first_stop:08d}"
    marker = json.loads((ckpt / "COMPLETE.json").read_text())
    assert took >= 45 and marker["step"] == first_stop and marker["tokens"] > 0
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert f"checkpoint step-{first_stop:08d} is complete" in err
    manifest = json.loads((run / "data" / "manifest.json").read_text())

    with sqlite3.connect(db) as conn:  # 100 more rows, as a live database grows
        rows = conn.execute("SELECT * FROM en LIMIT 100").fetchall()
        conn.executemany("INSERT INTO en VALUES (?, ?, ?, ?, ?)", rows)
    conn.close()
    proc = start_ftjob("run", spec, env={"FTJOB_FAULTS": "delay_step=0.05", **traced})
    wait_until(lambda: any(m["step"] >= 20 for m in jsonl(run / "metrics.jsonl")), what="step 20")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == errors.PREEMPTED, err[-3000:]
    assert f"resumed from {ckpt}" in err  # no flag: it resumes by itself
    assert "changed since this run's data was prepared" in err and "keeps its own prepared data" in err

    os.utime(db)  # only the modification time changes
    proc = run_ftjob("run", spec, env=traced)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "changed since this run's data was prepared" in proc.stderr
    # Same per-step losses, same blocks at every step, as if never interrupted.
    ref_losses = [(m["step"], m["loss"]) for m in reference["metrics"]]
    got_losses = [(m["step"], m["loss"]) for m in jsonl(run / "metrics.jsonl")]
    assert [s for s, _ in got_losses] == [s for s, _ in ref_losses]
    for (s, a), (_, b) in zip(got_losses, ref_losses):
        assert abs(a - b) <= 1e-6, f"step {s}: {a} vs {b}"
    assert {f.name: f.read_text() for f in trace.iterdir()} == reference["trace"]
    after = json.loads((run / "data" / "manifest.json").read_text())
    assert after == manifest  # same split, same shards, same hashes: the run's own snapshot
    assert (after["splits"]["train"]["documents"], after["splits"]["valid"]["documents"]) == (451, 113)
    got = weights(run / "final")
    worst = max((got[k] - reference["weights"][k]).abs().max().item() for k in got)
    assert worst <= 1e-6, f"final weights differ from the uninterrupted run by {worst}"

    proc = run_ftjob("run", spec, "--set", "data.block_size=32")
    assert proc.returncode == errors.BAD_INPUT, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1].startswith("ftjob: error: data.block_size: changed since this run's data")


# ------------------------------------------------------------------ the job killed, the volume full


def run_processes(run: Path) -> list:
    """The launcher and workers of this run (their command lines name its directory); not zombies."""
    return [p for p in psutil.process_iter(["cmdline"], ad_value=None) if str(run) in (p.info["cmdline"] or [])]


def gone_within(run: Path, seconds: float) -> float:
    """Seconds until no launcher or worker of this run is left; fails after `seconds`."""
    t0 = time.monotonic()
    while alive := run_processes(run):
        assert time.monotonic() - t0 < seconds, f"still alive {seconds:.0f}s after: {[p.info['cmdline'] for p in alive]}"
        time.sleep(0.05)
    return time.monotonic() - t0


def traced_step(trace: Path, rank: int = 0) -> int:
    """The step `rank` trains in this attempt (FTJOB_TRACE_BLOCKS writes a line as each micro-batch starts),
    -1 before its first; only whole lines count."""
    try:
        text = (trace / f"blocks-rank{rank}.txt").read_text()
    except FileNotFoundError:
        return -1
    lines = text[:text.rfind("\n") + 1].splitlines()
    return int(lines[-1].split()[0]) if lines else -1


def newest_checkpoint_step(run: Path) -> int:
    return max((int(p.name[5:]) for p in (run / "checkpoints").glob("step-*") if (p / "COMPLETE.json").exists()),
               default=0)


def files_of(run: Path) -> dict:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


class Attempts:
    """`ftjob run` of one spec, attempt after attempt, each in its own process group and session (as a
    shell or a scheduler starts it), each with its own block trace and console file."""

    def __init__(self, spec: Path, tmp: Path):
        self.spec, self.tmp, self.n = spec, tmp, 0

    def start(self, faults: str) -> tuple[subprocess.Popen, Path]:
        self.n += 1
        trace = self.tmp / f"trace-{self.n}"
        trace.mkdir()
        self.console = open(self.tmp / f"attempt-{self.n}.err", "w+")
        env = dict(os.environ, FTJOB_FAULTS=faults, FTJOB_TRACE_BLOCKS=str(trace))
        proc = subprocess.Popen(ftjob_command() + ["run", str(self.spec)], env=env, stdout=subprocess.DEVNULL,
                                stderr=self.console, text=True, start_new_session=True)
        return proc, trace

    def kill_9(self, proc: subprocess.Popen) -> None:
        """kill -9 of ftjob's whole process group: the launcher, in a session of its own, is not in it."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def finish(self, proc: subprocess.Popen) -> tuple[int, str]:
        code = proc.wait(timeout=600)
        self.console.seek(0)
        return code, self.console.read()


@pytest.fixture
def volume(tmp_path):
    with tmpfs(tmp_path / "volume", "40M") as mount:
        yield mount


def test_six_kill_9s_of_the_job_then_a_full_volume_twice_and_the_run_ends_as_if_never_interrupted(
        reference, demo_spec, tmp_path, volume):
    """Six kill -9s of `ftjob`'s process group at seeded random moments: mid-training, mid-checkpoint (a save
    slowed to 3 s), while the workers start, and once with the workers kept alive artificially (they
    neither die with their job nor check it). Each time, within 10 s no launcher or worker of the run is
    left (but the kept ones), and the rerun resumes; a rerun beside the kept workers waits, then exits 3
    naming them, and writes nothing. Then the volume (a 40 MB tmpfs) fills between two checkpoints, and,
    after freeing it, while the final samples are written: each time exit 74, one line, no traceback. The
    last rerun finishes with the uninterrupted run's per-step losses and final weights."""
    spec = resume_spec(tmp_path, demo_spec, "killed", output_dir=str(volume), train__checkpoint_every=4)
    run = volume / "killed"
    attempts = Attempts(spec, tmp_path)
    rng = random.Random(20)  # seeded: the same moments on every run of the test
    took = []
    for kind in ("training", "checkpoint", "starting", "kept alive", "training", "starting"):
        start = newest_checkpoint_step(run)
        if kind == "training":  # after the next checkpoint, at a random step and moment in the step
            proc, trace = attempts.start("delay_step=0.05")
            target = start + rng.randint(5, 8)
            wait_until(lambda: traced_step(trace) >= target, 300, f"step {target}")
            time.sleep(rng.uniform(0, 0.6))
        elif kind == "checkpoint":  # at a random moment inside the next save
            proc, trace = attempts.start("delay_step=0.05,delay_save=3")
            target = start + 4
            wait_until(lambda: traced_step(trace) >= target - 1, 300, f"step {target}")
            wait_until(lambda: (run_state(run).get("stage"), run_state(run).get("step")) == ("checkpoint", target),
                       60, f"checkpoint {target}")
            time.sleep(rng.uniform(0.2, 2))
        elif kind == "starting":  # while the workers import, load and resume
            proc, trace = attempts.start("")
            wait_until(lambda: any("job.train.worker" in p.info["cmdline"] for p in run_processes(run)), 300,
                       "the workers")
            time.sleep(rng.uniform(0, 5))
        else:  # both workers inside their first step, where they stay
            proc, trace = attempts.start("orphan=1,delay_step=600")
            wait_until(lambda: traced_step(trace, 0) >= start and traced_step(trace, 1) >= start, 300, "the first step")
            time.sleep(rng.uniform(0, 1))
        attempts.kill_9(proc)
        if kind != "kept alive":
            took.append(gone_within(run, 10))
            if kind == "checkpoint":
                assert (run / "checkpoints" / f".tmp-step-{target:08d}").is_dir()
                assert newest_checkpoint_step(run) == start  # the torn save does not count
            continue
        wait_until(lambda: len(run_processes(run)) == 2, 10, "the launcher's end")
        kept = run_processes(run)
        assert all("job.train.worker" in p.info["cmdline"] for p in kept)
        before = files_of(run)
        proc = run_ftjob("run", spec, "--set", "resources.lock_heartbeat_s=1")
        assert proc.returncode == errors.LOCKED, proc.stderr[-3000:]
        line = proc.stderr.splitlines()[-1]
        assert line.startswith(f"ftjob: error: run directory {run} is still in use by an earlier attempt's")
        assert all(f"pid {p.pid} (" in line for p in kept) and "after waiting 3s" in line, line
        assert "waiting up to 3s" in proc.stderr and "Traceback" not in proc.stderr
        assert files_of(run) == before  # it never wrote, let alone trained
        for p in kept:
            p.kill()
        took.append(gone_within(run, 10))
    print(f"launcher and workers gone {max(took):.2f}s at most after a kill -9 of the job")

    # The volume fills while step start+2 trains (steps slowed to 1 s), two steps before the next checkpoint.
    start = newest_checkpoint_step(run)
    assert start >= 8  # each "training" kill came after a complete checkpoint
    proc, trace = attempts.start("delay_step=0.5")
    wait_until(lambda: traced_step(trace) >= start + 1, 300, f"step {start + 2}")
    filler = fill(volume)
    code, err = attempts.finish(proc)
    message = assert_one_volume_line(code, err, f"volume {volume}", f"last complete checkpoint: step-{start:08d}")
    assert "could not hold checkpoint" not in message and re.search(r"hold (state\.json|metrics\.jsonl) ", message), message
    filler.unlink()

    # It resumes and trains to the end; the volume fills while the final samples are being written.
    proc, _ = attempts.start("delay_samples=3")
    wait_until(lambda: run_state(run).get("stage") == "trained", 300, "the end of training")
    filler = fill(volume)
    code, err = attempts.finish(proc)
    assert f"resumed from {run / 'checkpoints' / f'step-{start:08d}'}" in err
    assert_one_volume_line(code, err, f"volume {volume}", "could not hold after.jsonl")
    filler.unlink()

    proc = run_ftjob("run", spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "samples" / "after.md").exists() and (run / "best" / "ftjob-best.json").exists()
    ref_losses = [(m["step"], m["loss"]) for m in reference["metrics"]]
    got_losses = [(m["step"], m["loss"]) for m in jsonl(run / "metrics.jsonl")]
    assert [s for s, _ in got_losses] == [s for s, _ in ref_losses]
    worst_loss = max(abs(a - b) for (_, a), (_, b) in zip(got_losses, ref_losses))
    got = weights(run / "final")
    worst = max((got[k] - reference["weights"][k]).abs().max().item() for k in got)
    assert worst <= 1e-6 and worst_loss <= 1e-6, f"max |dW| {worst}, max |d loss| {worst_loss}"
