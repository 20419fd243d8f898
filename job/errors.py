"""Exit codes and the errors that map to them.

The codes are part of the job's interface: Slurm scripts requeue on PREEMPTED and Kubernetes
podFailurePolicy fails fast on BAD_INPUT, so they never change meaning.
"""
import os
import stat
from pathlib import Path

OK = 0
FAILED = 1  # unexpected failure (a bug, a crashed worker); the traceback is in the log
BAD_INPUT = 2  # the spec, the data, the model path or the output directory is wrong; fix and resubmit
LOCKED = 3  # another live job holds the run directory
DIVERGED = 4  # loss went NaN/inf or the fp16 loss scale collapsed; the last good checkpoint is named
VOLUME = 74  # EX_IOERR: the output volume is full, read-only or failing; fix it, then rerun (it resumes)
PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after writing a complete checkpoint; run again to resume

# Internal, between a worker and its `ftjob` process, never a job's exit code: the worker stopped because
# another rank's collective broke (that rank's node says why); `ftjob` exits FAILED naming that node.
PEER_LOST = 86
# Internal too: rank 0 could not bind the rendezvous port (MASTER_PORT); `ftjob` launches again on another
# port where it chose the port itself, else exits FAILED naming it.
PORT_TAKEN = 87

# A worker's JobError travels to the `ftjob` process as one line of its output: this prefix, then JSON
# {"code", "message", "rank"}; `ftjob` reports it as its own one-line error with that exit code.
WORKER_ERROR_PREFIX = "FTJOB-ERROR "

EXIT_CODES = {
    OK: "success",
    FAILED: "unexpected failure (see the log)",
    BAD_INPUT: "bad input: spec, data, model or output directory (the message names it)",
    LOCKED: "the run directory is held by another live job",
    DIVERGED: "training diverged (NaN/inf loss or fp16 loss scale at its minimum)",
    VOLUME: "the output volume is full, read-only or failing; fix it, then run again (it resumes)",
    PREEMPTED: "preempted: a complete checkpoint was written; run the same command again to resume",
}


class JobError(Exception):
    """An error the user can act on: printed as one line, never as a traceback."""

    exit_code = FAILED


class BadInput(JobError):
    exit_code = BAD_INPUT


class SpecError(BadInput):
    """A problem in the spec; `key` is the dotted path, `line` the spec file's line when known."""

    def __init__(self, key: str, message: str, line: int | None = None, source: str | None = None):
        self.key, self.line, self.source = key, line, source
        where = f"{source}:{line}: " if source and line else (f"{source}: " if source else "")
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")


class DataError(BadInput):
    """A problem with the database, table, column, query or the rows themselves."""


class RunLocked(JobError):
    exit_code = LOCKED


class Stopped(JobError):
    """Stopped by a preemption signal before anything needed saving: resumable as is."""

    exit_code = PREEMPTED


class PortTaken(JobError):
    exit_code = PORT_TAKEN


class VolumeError(JobError):
    """The output volume is full, read-only or failing: nothing the spec can fix, nor a retry as is."""

    exit_code = VOLUME


def permission_denied(key: str, path, action: str = "read") -> BadInput:
    """EACCES on `path`: one line that names the file (or the directory on its way that may not be
    entered), its owner and mode, the uid and gid the job runs as, and the fix. A container's user (uid
    1000 in the image) is often not the owner of what a teammate or a root process put on a volume."""
    path = Path(path)
    uid, gid = os.geteuid(), os.getegid()
    effective = os.access in os.supports_effective_ids
    blocked = next((d for d in reversed(path.parents)
                    if d.is_dir() and not os.access(d, os.X_OK, effective_ids=effective)), path)
    try:
        st = blocked.stat()
        owner = f"owner uid {st.st_uid}, gid {st.st_gid}, mode {stat.S_IMODE(st.st_mode):04o}"
        as_owner = f"uid {st.st_uid}"
        is_dir = stat.S_ISDIR(st.st_mode)
    except OSError:
        owner, as_owner, is_dir = "owner unknown", "its owner", False
    if blocked != path:
        what, fix = f"cannot enter directory {blocked}", f"chmod a+x {blocked} (or chgrp {gid} and chmod g+x)"
    elif action == "read":
        what = f"cannot read {path}"
        fix = (f"chmod -R a+rX {path} (or chgrp -R {gid} and chmod -R g+rX)" if is_dir else
               f"chmod a+r {path} (or chgrp {gid} and chmod g+r)")
    else:
        what, fix = f"cannot {action} {path}", f"give uid {uid} access to it (chown or chmod)"
    if as_owner != f"uid {uid}":
        fix += f", or run the job as {as_owner}"
    return BadInput(f"{key + ': ' if key else ''}permission denied: {what} ({owner}) as uid {uid} (gid {gid}); {fix}")


def from_code(code: int, message: str) -> JobError:
    """The JobError a worker reported (by exit code), raised again in the `ftjob` process."""
    kinds = {BAD_INPUT: BadInput, LOCKED: RunLocked, VOLUME: VolumeError}
    error = kinds.get(code, JobError)(message)
    error.exit_code = code
    return error
