"""One writer, whatever dies, through the real `ftjob run` and DeepSpeed's launcher: six kill -9s of `ftjob`'s
process group, one of them with its worker kept alive and a rerun beside it; then a full volume, between two
checkpoints and while the final samples are written; and a launch whose port is taken before the workers
bind it. One CPU worker per attempt, as in test_stops.py: the parent-death chain and the writers lock are
per worker (tests/unit/test_lifeline.py has the chain alone), and each of the ten launches here then costs
one worker's start-up. The killed run ends compared with one uninterrupted run."""
from __future__ import annotations

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

from conftest import ftjob_command, jsonl, run_ftjob, run_state, wait_until, weights, write_spec
from job import errors
from test_integrity import assert_one_volume_line, fill, tmpfs

pytestmark = pytest.mark.slow


def spec_for(tmp: Path, demo_spec: dict, name: str, **extra) -> Path:
    # fp32 and the model's own dropout (0.1): exactness needs the RNG states restored, not just weights.
    settings = dict(output_dir=str(tmp / "runs"), name=name, train__precision="fp32", train__max_steps=40,
                    train__log_every=1, train__eval_every=0, train__sample_every=0, train__checkpoint_every=4,
                    generation__max_length=12, resources__procs_per_node=1)
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
    """The uninterrupted run the killed one is compared with. The port ftjob picks first is taken by this
    process before the worker can bind it (test_a_port_taken_before_the_workers_bind_it_is_retried)."""
    import yaml

    tmp = tmp_path_factory.mktemp("reference")
    spec = spec_for(tmp, yaml.safe_load(demo_assets.spec.read_text()), "ref")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-c", FIRST_PORT_TAKEN, str(port), "run", str(spec)], text=True,
                              capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp / "runs" / "ref"
    return {"metrics": jsonl(run / "metrics.jsonl"), "weights": weights(run / "final"), "stderr": proc.stderr,
            "taken_port": port}


def test_a_port_taken_before_the_workers_bind_it_is_retried(reference):
    """Rank 0 cannot bind the rendezvous port (EADDRINUSE): ftjob chose it, on one node, so it launches again
    on another port, says so in one line, and the run trains (it is the reference run)."""
    err = reference["stderr"]
    ports = re.findall(r"--master_port=(\d+)", err)
    assert len(ports) == 2 and ports[0] == str(reference["taken_port"]) != ports[1], err[-3000:]
    assert (f"port {ports[0]} was taken by another process before the workers could bind it; launching again on "
            f"port {ports[1]}") in err
    assert "Traceback" not in err and "ftjob: error" not in err
    assert [m["step"] for m in reference["metrics"]] == list(range(1, 41))


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


def traced_step(trace: Path) -> int:
    """The step the worker trains in this attempt (FTJOB_TRACE_BLOCKS writes a line as each micro-batch
    starts), -1 before its first; only whole lines count."""
    try:
        text = (trace / "blocks-rank0.txt").read_text()
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
    slowed to 3 s), while the worker starts, and once with the worker kept alive artificially (it neither
    dies with its job nor checks it). Each time, within 10 s no launcher or worker of the run is left (but
    the kept one), and the rerun resumes; a rerun beside the kept worker waits, then exits 3 naming it, and
    writes nothing. Then the volume (a 40 MB tmpfs) fills between two checkpoints, and, after freeing it,
    while the final samples are written: each time exit 74, one line, no traceback. The last rerun finishes
    with the uninterrupted run's per-step losses and final weights."""
    spec = spec_for(tmp_path, demo_spec, "killed", output_dir=str(volume))
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
        elif kind == "starting":  # while the worker imports, loads and resumes
            proc, trace = attempts.start("")
            wait_until(lambda: any("job.train.worker" in p.info["cmdline"] for p in run_processes(run)), 300,
                       "the worker")
            time.sleep(rng.uniform(0, 5))
        else:  # the worker inside its first step, where it stays
            proc, trace = attempts.start("orphan=1,delay_step=600")
            wait_until(lambda: traced_step(trace) >= start, 300, "the first step")
            time.sleep(rng.uniform(0, 1))
        at_kill = traced_step(trace)
        attempts.kill_9(proc)
        if kind != "kept alive":
            took.append(gone_within(run, 10))
            assert traced_step(trace) <= at_kill + 1, "the worker went on training after its job was killed"
            if kind == "checkpoint":
                assert (run / "checkpoints" / f".tmp-step-{target:08d}").is_dir()
                assert newest_checkpoint_step(run) == start  # the torn save does not count
            continue
        wait_until(lambda: len(run_processes(run)) == 1, 10, "the launcher's end")
        kept = run_processes(run)
        assert "job.train.worker" in kept[0].info["cmdline"]
        before = files_of(run)
        proc = run_ftjob("run", spec, "--set", "resources.lock_heartbeat_s=1")
        assert proc.returncode == errors.LOCKED, proc.stderr[-3000:]
        line = proc.stderr.splitlines()[-1]
        assert line.startswith(f"ftjob: error: run directory {run} is still in use by an earlier attempt's")
        assert f"process pid {kept[0].pid} (" in line and "after waiting 3s" in line, line
        assert "waiting up to 3s" in proc.stderr and "Traceback" not in proc.stderr
        assert files_of(run) == before  # it never wrote, let alone trained
        kept[0].kill()
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
    assert re.search(r"could not hold (state\.json|metrics\.jsonl) ", message), message
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
