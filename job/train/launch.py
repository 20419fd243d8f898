"""Run DeepSpeed's launcher for this node: its command, its environment, its output, its signals.

One `ftjob` per node starts DeepSpeed's per-node launcher (`deepspeed.launcher.launch`, what the
`deepspeed --no_ssh --node_rank N` command runs on each node) with the world's layout: no hostfile, no ssh
between pods or Slurm nodes. The launcher and its workers write into a pipe that this process reads line
by line: every line goes to the run's log file, ftjob's own lines (and errors) to the console, progress
events to the terminal's bar, a worker's one-line error to the caller.
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ..cluster import NodeInfo, PeerWatch
from ..logs import WorkerOutputFilter
from ..progress import EVENT_PREFIX, EventBar
from ..rundir import RunPaths
from ..errors import WORKER_ERROR_PREFIX
from .lifeline import JOB_PID_ENV, launcher_preexec

log = logging.getLogger("ftjob")

WORKER_MODULE = "job.train.worker"


def world_info(node: NodeInfo, visible_devices: str = "") -> dict[str, list[int]]:
    """The world's layout as DeepSpeed's launcher takes it: node name -> local device ids. The names are
    only labels (nothing connects to them; rank 0's address is MASTER_ADDR). On GPUs the ids are the ones
    the scheduler made visible, so the launcher does not renumber them from 0."""
    ids = list(range(node.procs_per_node))
    if node.accelerator == "cuda" and visible_devices:
        ids = [int(d) for d in visible_devices.split(",")[: node.procs_per_node]]
    return {f"node-{i}": ids for i in range(node.nnodes)}


def launcher_command(paths: RunPaths, node: NodeInfo, verbose: bool = False) -> list[str]:
    layout = world_info(node, os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    encoded = base64.urlsafe_b64encode(json.dumps(layout).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={encoded}",
            f"--node_rank={node.node_rank}", f"--master_addr={node.master_addr}", f"--master_port={node.master_port}",
            f"--log_level={'info' if verbose else 'warning'}", "--module", WORKER_MODULE, "--run-dir", str(paths.root)]


def worker_env(node: NodeInfo, progress_events: bool) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["FTJOB_PROGRESS"] = "events" if progress_events else "log"
    env[JOB_PID_ENV] = str(os.getpid())  # the workers die with this process (lifeline.py)
    # Workers import `job` from wherever this process did, installed or from a checkout.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if node.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // node.procs_per_node)))
        env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def worker_processes(root_pid: int) -> list:
    """The training workers below the launcher (not the launcher's own per-node `launch` process)."""
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in children if is_worker(p)]


def is_worker(process) -> bool:
    """`python -u -m job.train.worker ...`; the launch process names the module too, as an argument."""
    try:
        cmdline = process.cmdline()
    except Exception:  # psutil.Error: gone or not ours
        return False
    return "-m" in cmdline and cmdline[cmdline.index("-m") + 1:cmdline.index("-m") + 2] == [WORKER_MODULE]


class Launch:
    """Runs the launcher. SIGTERM/SIGUSR1/SIGINT to this process become SIGTERM to the workers only:
    DeepSpeed's per-node launch process SIGKILLs its workers 30 s after it gets a SIGTERM itself, which
    would cap a checkpoint at 30 s whatever grace period the scheduler gives; it runs in a session of its
    own so that a terminal's Ctrl-C does not reach it either. SIGUSR1 matters: Slurm's --signal=B:USR1
    reaches only the batch shell, and the launcher does not forward USR1. Being in a session of its own, the
    launcher (and its workers) would outlive a kill -9 of this process: the parent-death signal ends them
    with it instead (lifeline.py)."""

    def __init__(self, cmd: list[str], env: dict, node: NodeInfo, log_file: Path | None, verbose: bool = False,
                 watch: PeerWatch | None = None, on_tick=None, bar: bool = False):
        self.cmd, self.env, self.node, self.log_file = cmd, env, node, log_file
        self.watch, self.on_tick = watch, on_tick
        self.filter = WorkerOutputFilter(verbose)
        self.bar = EventBar() if bar else None
        self.signalled = 0
        self.worker_error: dict | None = None  # the first worker's one-line error (a JobError)
        self.peer_problem: str | None = None
        self.proc: subprocess.Popen | None = None

    def _forward(self, signum, frame):
        first = not self.signalled
        self.signalled = signum
        if first:
            log.info("received %s: asking the workers to checkpoint and stop", signal.Signals(signum).name)
        if self.proc is not None:
            for p in worker_processes(self.proc.pid):
                try:
                    p.send_signal(signal.SIGTERM)
                except Exception:
                    pass

    def _kill_all(self) -> None:
        import psutil

        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True) + [psutil.Process(self.proc.pid)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass

    def _pump(self) -> None:
        """Every line to the log file while it can be written, the console's lines to the console always:
        a full volume ends the log file, never the pump (the workers would block on a full pipe)."""
        log_f = None
        if self.log_file:
            try:
                log_f = open(self.log_file, "a", encoding="utf-8", errors="replace")
            except OSError as e:
                self._log_lost(e)
        try:
            for line in self.proc.stdout:
                log_f = self._line(line, log_f)
        finally:
            self._close(log_f)
            if self.bar:
                self.bar.close()

    def _line(self, line: str, log_f):
        """Handles one line; returns the log file, or None once it can no longer be written."""
        if line.startswith(EVENT_PREFIX):
            if self.bar:
                self.bar.handle(line)
            return log_f
        if line.startswith(WORKER_ERROR_PREFIX):
            event = json.loads(line[len(WORKER_ERROR_PREFIX):])
            self.worker_error = self.worker_error or event
            line = f"[rank {event.get('rank')}] error: {event['message']}\n"
        elif self.filter.console_wants(line):
            with contextlib.suppress(OSError):  # a batch log on the same full volume: keep reading
                sys.stderr.write(line)
                sys.stderr.flush()
        if log_f is None:
            return None
        try:
            log_f.write(line)
            log_f.flush()
            return log_f
        except OSError as e:  # the volume is full or failing: the console still gets what matters
            self._close(log_f)
            self._log_lost(e)
            return None

    def _log_lost(self, e: OSError) -> None:
        log.warning("cannot write %s (%s); the workers' lines go on to the console only", self.log_file,
                    e.strerror or e)

    @staticmethod
    def _close(log_f) -> None:
        if log_f is not None:
            with contextlib.suppress(OSError):  # closing flushes what could not be written: drop it
                log_f.close()

    def run(self) -> int:
        handled = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
        previous = {s: signal.signal(s, self._forward) for s in handled}
        pump = None
        try:
            log.info("launching: %s", " ".join(self.cmd))
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True,
                                         errors="replace", preexec_fn=launcher_preexec(os.getpid()))
            pump = threading.Thread(target=self._pump, name="ftjob-launcher-output", daemon=True)
            pump.start()
            if self.signalled:  # a signal that came while starting
                self._forward(self.signalled, None)
            while True:
                try:
                    return self.proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    self._tick()
                except InterruptedError:
                    continue
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if pump is not None:
                pump.join(timeout=10)

    def _tick(self) -> None:
        if self.on_tick:
            self.on_tick()
        if self.watch and self.peer_problem is None:
            self.peer_problem = self.watch.problem()
            if self.peer_problem:
                # The workers wait inside a collective for the lost node: nothing to save, end them now.
                log.error("%s; stopping this node's workers", self.peer_problem)
                self._kill_all()
