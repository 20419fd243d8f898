"""The launcher and the workers live only as long as the `ftjob` process that started them.

`ftjob` starts DeepSpeed's per-node launch process in a session of its own (launch.py says why), so what
ends `ftjob` by its process group or session (kill -9 of the group, Slurm's proctrack/pgid) does not reach
them, nor does the OOM killer picking `ftjob` alone. The parent-death signal ties them to it instead, link
by link: the launch process gets SIGKILL when `ftjob` dies (set between its fork and exec), and each
worker gets SIGKILL when the launch process dies (set by the worker as it starts, since DeepSpeed's launch
process spawns it). SIGKILL, not a checkpoint: once `ftjob` is gone a rerun may own the run directory, so
a worker must stop writing at once; the last complete checkpoint stays the one to resume from.

A link set too late (its parent already gone) would never fire, so each side checks, after setting it,
that its job is still its ancestor. From then on a worker lives no longer than its job; it then takes the
run directory's writers lock (rundir.hold_writers), which a rerun waits for.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

from .. import errors, faults

JOB_PID_ENV = "FTJOB_PARENT_PID"  # the `ftjob` process whose workers these are
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> bool:
    """SIGKILL this process when its parent (the thread that forked it) ends. False where unsupported."""
    prctl = getattr(_libc, "prctl", None)
    return prctl is not None and prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0


def launcher_preexec(job_pid: int):
    """preexec_fn for DeepSpeed's launch process: dies with `job_pid`; ignores SIGUSR1 (Slurm can signal
    every process of a step, and SIGUSR1 kills a process without a handler; the workers set their own)."""

    def preexec() -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        die_with_parent()
        if os.getppid() != job_pid:  # ftjob died between the fork and now: the signal will never come
            os._exit(errors.FAILED)

    return preexec


def die_with_job() -> None:
    """In a worker, first thing (before its imports, which take seconds): SIGKILL when the launch process
    dies, and exit here, before writing anything, if the `ftjob` process that started it is already gone."""
    job_pid = int(os.environ.get(JOB_PID_ENV) or 0)
    if not job_pid or (faults.ACTIVE and faults.escapes_its_job()):
        return  # not started by ftjob (a test, a benchmark), or a test's stand-in for a worker that escaped
    die_with_parent()
    if not _is_ancestor(job_pid):
        sys.stderr.write(f"stopping before writing anything: the ftjob process that started this worker (pid "
                         f"{job_pid}) is gone\n")
        os._exit(errors.FAILED)


def _is_ancestor(pid: int) -> bool:
    import psutil

    try:
        return pid in {p.pid for p in psutil.Process().parents()}
    except psutil.Error:
        return False
