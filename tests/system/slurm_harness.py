"""A real one-node Slurm cluster (slurmctld + slurmd + a private munged), started and stopped by the tests.

Why a real Slurm and not a mock: what the sbatch scripts rely on (signals reaching the batch shell,
`scontrol requeue` of a running job, `--open-mode=append`, `%j` in log names, SLURM_* variables inside
`srun`) is Slurm behaviour, and only Slurm itself can tell us we got it right.

Everything lives in temporary folders: slurm.conf, state, spool and logs in the one given; munge's key,
socket, pid and seed in one of its own. Clients and daemons find the config through the SLURM_CONF
environment variable (honoured by Slurm 22.05, checked), and Slurm finds our munged through
`AuthInfo=socket=...`, so nothing under /etc/slurm, /etc/munge or /run/munge is touched and a system
Slurm on the same host, if any, is left alone (we also take free ports rather than 6817/6818).

Needs root (SlurmUser=root, jobs run as root, munged must be started as user `munge`) and the Debian
packages `slurmctld slurmd slurm-client munge` (.ci/install-slurm.sh). `unavailable_reason()` says why
not, for pytest.skip.

Usage:

    with LocalSlurm(tmp_dir) as slurm:
        job = slurm.sbatch("script.sbatch", "arg", sbatch_args=["--chdir", "/x"])
        assert slurm.wait_job(job, timeout=60) == "COMPLETED"
        slurm.job_field(job, "Restarts")
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# States after which a job record no longer changes (see `squeue --help` / JOB STATE CODES in squeue(1)).
# PENDING after a requeue is deliberately not here: a requeued job comes back.
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)

REQUIRED_PROGRAMS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged", "munge", "unmunge")

# A requeued job may not start again until its old credential has expired (slurm.conf(5), AuthInfo:
# "cred_expire ... also controls how long a requeued job must wait before starting again. The default
# value is 120 seconds."). Seen here: Reason=BeginTime for 2 minutes after `scontrol requeue`. Tests
# want that short; a real cluster keeps its default.
CRED_EXPIRE_S = 10


def find_program(name: str) -> str | None:
    """PATH first, then the sbin folders a non-login PATH may lack (the daemons live in /usr/sbin)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def unavailable_reason() -> str | None:
    """Why a local Slurm cannot be started here, or None when it can."""
    missing = [p for p in REQUIRED_PROGRAMS if find_program(p) is None]
    if missing:
        return (
            f"Slurm/munge not installed (missing {', '.join(missing)}); "
            "run .ci/install-slurm.sh (Debian: slurmctld slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        return "the local Slurm harness needs root (SlurmUser=root, munged started as user munge)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "user 'munge' does not exist (the munge package creates it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mib() -> int:
    """A bit under the machine's memory: slurmd drains a node that reports less than RealMemory."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.9)
    raise RuntimeError("no MemTotal in /proc/meminfo")


def parse_scontrol_record(line: str) -> dict[str, str]:
    """`scontrol show job -o` prints one line of Key=Value pairs separated by spaces.

    Values can themselves hold spaces (Command=script arg1 arg2), so split at each ` Key=` rather than at
    every space. Keys start with a capital and may contain ':' and '/' (AllocNode:Sid, CPUs/Task); the
    capital keeps an argument such as `name=x` in Command= from passing for a key.
    """
    keys = list(re.finditer(r"(?:^|\s)([A-Z][A-Za-z0-9_:/]*)=", line))
    record = {}
    for this, after in zip(keys, keys[1:] + [None]):
        end = after.start() if after else len(line)
        record[this.group(1)] = line[this.end() : end].strip()
    return record


class SlurmError(RuntimeError):
    pass


class LocalSlurm:
    """Start munged, slurmctld and slurmd in `workdir`; stop exactly those processes on exit."""

    def __init__(self, workdir: str | os.PathLike, partition: str = "debug"):
        self.dir = Path(workdir).resolve()
        self.partition = partition
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        # munged runs as user munge, which cannot enter pytest's 0700 temp folders: it gets its own
        # folder directly under the system temp dir (made in start(), removed in stop()).
        self.munge_dir: Path | None = None
        self.munge_socket: Path | None = None
        self.log_dir = self.dir / "log"
        self.cpus = os.cpu_count() or 1
        self._procs: dict[str, subprocess.Popen] = {}
        # Environment for every Slurm client we run, and the one sbatch jobs inherit (--export=ALL):
        # SLURM_CONF is how `scontrol` inside a job finds this cluster.
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> "LocalSlurm":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        reason = unavailable_reason()
        if reason:
            raise SlurmError(reason)
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir(exist_ok=True)
        try:
            self._start_munged()
            self._write_conf()
            # -D: stay in the foreground, so the Popen pid is the daemon's pid and we stop exactly it.
            self._spawn("slurmctld", [find_program("slurmctld"), "-D", "-f", str(self.conf)])
            self._spawn("slurmd", [find_program("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
            self._wait_node_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30) -> None:
        """Cancel our jobs, then stop the daemons we started (by pid), newest first.

        Jobs first: slurmd's job processes (slurmstepd and the job's children) are not slurmd's
        children once started, so stopping slurmd alone would leave them running.
        """
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--partition", self.partition, check=False)
            self.run("scancel", "--partition", self.partition, check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                out = self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip()
                if not out:
                    break
                time.sleep(0.5)
        for name in reversed(list(self._procs)):
            proc = self._procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.munge_dir is not None and "munged" not in self._procs:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None

    def _spawn(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        out = open(self.log_dir / f"{name}.stdout", "ab")
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, **kwargs
        )
        out.close()
        self._procs[name] = proc
        return proc

    def _start_munged(self) -> None:
        """A private munged: own key, socket, pid and seed files, all in a folder of its own."""
        self.munge_dir = Path(tempfile.mkdtemp(prefix="ftjob-munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        # munged refuses a key others can read and a folder others can write or that it does not own,
        # and wants everyone to be able to reach its socket ("execute permissions for all required").
        key.chmod(0o400)
        self.munge_dir.chmod(0o711)
        for path in (self.munge_dir, key):
            shutil.chown(path, "munge", "munge")
        self._spawn(
            "munged",
            [
                find_program("munged"),
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.munge_dir / 'munged.pid'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
                f"--log-file={self.munge_dir / 'munged.log'}",
            ],
            user="munge",
            group="munge",
            extra_groups=[],
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._procs["munged"].poll() is not None:
                raise SlurmError(f"munged exited early; see {self.log_dir / 'munged.stdout'}")
            check = subprocess.run(
                f"munge -n -S {self.munge_socket} | unmunge -S {self.munge_socket}",
                shell=True,
                capture_output=True,
                text=True,
            )
            if check.returncode == 0 and "Success" in check.stdout:
                return
            time.sleep(0.2)
        raise SlurmError(f"munged did not answer on {self.munge_socket}")

    def _write_conf(self) -> None:
        d = self.dir
        lines = [
            "ClusterName=ftjobtest",
            # Name(address): slurmd and clients need not resolve the host name through DNS.
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            # No cgroups in CI containers: track processes through /proc and bind nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "MailProg=/bin/true",  # the default /usr/bin/mail is usually absent (slurmctld logs an error)
            "JobRequeue=1",
            # Keep finished jobs visible to `scontrol show job` (there is no slurmdbd, so no sacct).
            "MinJobAge=86400",
            # Schedule a pending (e.g. requeued) job within seconds rather than the 60 s default.
            "SchedulerParameters=sched_interval=2",
            # Time between SIGTERM and SIGKILL when Slurm ends a job (default 30 s).
            "KillWait=30",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={_real_memory_mib()} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _wait_node_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode}; see {self.log_dir}")
            res = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            state = res.stdout.strip()
            if res.returncode == 0 and state == "idle":
                return
            time.sleep(0.5)
        raise SlurmError(f"node not idle after {timeout}s (sinfo says {state!r}); see {self.log_dir}")

    # -- clients -----------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run(argv, capture_output=True, text=True, env=env or self.env)
        if check and res.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def sbatch(
        self,
        script: str | os.PathLike | None,
        *args: str,
        sbatch_args: list[str] | tuple[str, ...] = (),
        env: dict | None = None,
    ) -> int:
        """Submit `script args...` (or `sbatch_args` alone, e.g. ["--wrap", "cmd"]); return the job id.

        `env` is added to this cluster's environment; sbatch exports all of it to the job (--export=ALL
        is sbatch's default, spelled out here because the scripts depend on it).
        """
        job_env = dict(self.env, **(env or {}))
        argv = ["sbatch", "--parsable", "--export=ALL", *sbatch_args]
        if script is not None:
            argv += [str(script), *args]
        out = self.run(*argv, env=job_env).stdout.strip()
        return int(out.split(";")[0])  # --parsable prints "jobid[;cluster]"

    def job_info(self, jobid: int) -> dict[str, str]:
        res = self.run("scontrol", "show", "job", "-o", str(jobid))
        return parse_scontrol_record(res.stdout.strip())

    def job_field(self, jobid: int, name: str) -> str:
        return self.job_info(jobid)[name]

    def job_state(self, jobid: int) -> str:
        # JobState can carry flags in other versions ("COMPLETING" etc. are separate states here).
        return self.job_field(jobid, "JobState").split("+")[0]

    def wait_job(self, jobid: int, timeout: float) -> str:
        """Wait until the job reaches a final state (a requeued job's PENDING is not one); return it."""
        return self.wait_state(jobid, FINAL_STATES, timeout)

    def wait_state(self, jobid: int, states: set[str] | frozenset[str], timeout: float) -> str:
        """Wait until the job is in one of `states` (e.g. {"RUNNING"})."""
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.job_state(jobid)
            if state in states:
                return state
            if state in FINAL_STATES:
                raise SlurmError(f"job {jobid} ended {state} while waiting for {sorted(states)}")
            time.sleep(0.5)
        raise TimeoutError(f"job {jobid} still {state} after {timeout}s, wanted {sorted(states)}")

    def signal_batch(self, jobid: int, sig: str = "USR1") -> None:
        """Signal the batch shell only, as `#SBATCH --signal=B:SIG@T` does near the time limit."""
        self.run("scancel", f"--signal={sig}", "--batch", str(jobid))

    def logs(self) -> str:
        """The daemons' logs, for assertion messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            parts.append(f"==> {path} <==\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)
