"""The launcher and its workers die with the `ftjob` process that started them (job/train/lifeline.py), with
real processes standing in for the three levels: "ftjob" starts a "launch process" in a session of its own
with launcher_preexec, which starts a "worker" the way DeepSpeed's launch process does (a plain Popen,
which closes every inherited fd); the worker starts as job/train/worker.py does. No torch: a second each."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from job.rundir import RunPaths, lock_holders

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

WORKER = """
import sys, time
from pathlib import Path
from job.train.lifeline import die_with_job
die_with_job()  # as job/train/worker.py starts
from job.rundir import RunPaths, hold_writers
hold_writers(RunPaths(Path(sys.argv[1])))
Path(sys.argv[1], "written-by-worker").write_text("x")  # what a worker writes once it may
time.sleep(600)
"""

LAUNCH_PROCESS = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])  # as DeepSpeed's launch.py: close_fds
time.sleep(600)
"""

JOB = """
import os, subprocess, sys, time
from job.train.lifeline import JOB_PID_ENV, launcher_preexec
env = dict(os.environ, **{JOB_PID_ENV: str(os.getpid())})
launch = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], env=env,
                          start_new_session=True, preexec_fn=launcher_preexec(os.getpid()))
print(launch.pid, flush=True)
time.sleep(600)
"""


def start_job(run: Path) -> tuple[subprocess.Popen, psutil.Process]:
    job = subprocess.Popen([sys.executable, "-c", JOB, LAUNCH_PROCESS, WORKER, str(run)], stdout=subprocess.PIPE,
                           text=True)
    launch = psutil.Process(int(job.stdout.readline()))
    deadline = time.monotonic() + 60
    while not (run / "written-by-worker").exists():
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.05)
    return job, launch


def test_a_kill_9_of_the_job_ends_its_launch_process_and_worker_through_their_own_session(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    job, launch = start_job(run)
    (worker,) = launch.children()
    try:
        assert os.getsid(launch.pid) != os.getsid(job.pid)  # out of the job's session: a killpg would miss it
        assert lock_holders(RunPaths(run).writers) == [worker.pid]  # the worker holds the writers lock

        job.send_signal(signal.SIGKILL)
        job.wait()
        gone, alive = psutil.wait_procs([launch, worker], timeout=5)
        assert not alive, f"still alive 5 s after the job's kill -9: {alive}"
        assert lock_holders(RunPaths(run).writers) == []
    finally:
        for p in (job, launch, worker):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                p.kill()


def test_a_worker_whose_job_is_already_gone_stops_before_writing(tmp_path):
    """Started with a job pid that is not its ancestor (as after the job died and its pid was reused): the
    worker exits at once and writes nothing."""
    run = tmp_path / "run"
    run.mkdir()
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        proc = subprocess.run([sys.executable, "-c", WORKER, str(run)], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, FTJOB_PARENT_PID=str(stranger.pid)))
    finally:
        stranger.kill()
        stranger.wait()
    assert proc.returncode == 1, proc.stderr
    assert f"the ftjob process that started this worker (pid {stranger.pid}) is gone" in proc.stderr
    assert not (run / "written-by-worker").exists()
