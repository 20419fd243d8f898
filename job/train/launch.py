"""Build and run the deepspeed launcher command for this node, and pass preemption signals on to it.

One `ftjob` per node starts one launcher per node with `--no_ssh --node_rank`: no hostfile ssh, no
passwordless ssh between pods or Slurm nodes. Where this node sits comes from the environment
(Slurm, a Kubernetes Indexed Job, or plain variables); see node_info().
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..paths import RunPaths
from ..spec import JobSpec

log = logging.getLogger("ftjob")


@dataclass(frozen=True)
class NodeInfo:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    procs_per_node: int
    accelerator: str  # "cuda" or "cpu"


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise BadInput(f"environment variable {name}={value!r} must be an integer") from None
    return default


def detect_accelerator(spec: JobSpec) -> str:
    if spec.resources.accelerator != "auto":
        return spec.resources.accelerator
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_info(spec: JobSpec) -> NodeInfo:
    """NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT / NPROC_PER_NODE win; then Kubernetes
    (JOB_COMPLETION_INDEX) and Slurm (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID) variables; then the spec."""
    accelerator = detect_accelerator(spec)
    nnodes = _env_int(("NNODES", "SLURM_NNODES"), spec.resources.nnodes)
    node_rank = _env_int(("NODE_RANK", "JOB_COMPLETION_INDEX", "SLURM_NODEID"), 0)
    if not 0 <= node_rank < nnodes:
        raise BadInput(f"NODE_RANK {node_rank} is outside 0..{nnodes - 1} (NNODES={nnodes})")
    slurm_job = _env_int(("SLURM_JOB_ID",), -1)
    default_port = 20000 + slurm_job % 20000 if slurm_job >= 0 else (29500 if nnodes > 1 else _free_port())
    port = _env_int(("MASTER_PORT",), default_port)
    addr = os.environ.get("MASTER_ADDR") or "127.0.0.1"
    if nnodes > 1 and addr == "127.0.0.1" and not os.environ.get("MASTER_ADDR"):
        raise BadInput("NNODES > 1 needs MASTER_ADDR (the host name of node rank 0)")
    procs = _env_int(("NPROC_PER_NODE",), spec.resources.procs_per_node)
    if procs == 0:
        if accelerator == "cuda":
            import torch

            procs = torch.cuda.device_count()
        else:
            procs = 2
    return NodeInfo(nnodes, node_rank, addr, port, procs, accelerator)


def launcher_command(paths: RunPaths, node: NodeInfo) -> list[str]:
    """The real deepspeed launcher (deepspeed.launcher.runner), one node's worth of workers."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    # The launcher learns the world's shape from a hostfile. With --no_ssh the names are only labels:
    # nothing connects to them; rank 0's address is MASTER_ADDR.
    hostfile = paths.logs / f"hostfile.node{node.node_rank}"
    hostfile.write_text("".join(f"node-{i} slots={node.procs_per_node}\n" for i in range(node.nnodes)))
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
           f"--node_rank={node.node_rank}", f"--master_addr={node.master_addr}",
           f"--master_port={node.master_port}"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if node.accelerator == "cuda" and visible:
        # The launcher would renumber devices from 0; keep the ones the scheduler gave this job.
        ids = ",".join(visible.split(",")[: node.procs_per_node])
        cmd.append("--include=" + "@".join(f"node-{i}:{ids}" for i in range(node.nnodes)))
    return cmd + ["--module", "job.train.worker", "--run-dir", str(paths.root)]


def worker_env(node: NodeInfo) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Workers import `job` from wherever this process did, installed or from a checkout.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if node.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // node.procs_per_node)))
        env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def shm_buffers(node: NodeInfo) -> list[Path]:
    """DeepSpeed's CPU backend maps two all-reduce buffers per rank in /dev/shm, named after the
    rendezvous address and port, and never unlinks them: about 140 MB per CPU run, until /dev/shm (RAM)
    is full and new runs hang. They are this launch's alone (its own port), so remove them after it."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{node.master_addr}_{node.master_port}_*"))


class Launch:
    """Runs the launcher; SIGTERM/SIGUSR1/SIGINT to this process become SIGTERM to the launcher's
    per-node process (deepspeed.launcher.launch), which forwards it to every worker. SIGUSR1 matters:
    Slurm's --signal=B:USR1 reaches only the batch shell, and the launcher does not forward USR1."""

    def __init__(self, cmd: list[str], env: dict, node: NodeInfo):
        self.cmd, self.env, self.node, self.signalled = cmd, env, node, 0
        self.proc: subprocess.Popen | None = None

    def _forward(self, signum, frame):
        first = not self.signalled
        self.signalled = signum
        if first:
            log.info("received %s: asking the workers to checkpoint and stop", signal.Signals(signum).name)
        if self.proc is None:
            return
        import psutil

        try:
            targets = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in targets:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass

    def run(self) -> int:
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        try:
            log.info("launching: %s", " ".join(self.cmd))
            self.proc = subprocess.Popen(self.cmd, env=self.env)
            if self.signalled:  # a signal that came while starting
                self._forward(self.signalled, None)
            while True:
                try:
                    return self.proc.wait()
                except InterruptedError:
                    continue
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            for buffer in shm_buffers(self.node):
                buffer.unlink(missing_ok=True)
