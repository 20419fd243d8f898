"""Where this node sits in a multi-node job, and whether the other nodes are still alive.

Each node runs one `ftjob` process (one Slurm task, one Kubernetes pod). Its place comes from the
environment (node_info). While the job runs, every node's `ftjob` writes a heartbeat file on the shared
run directory and watches the others' (NodeHeartbeat, PeerWatch): a node whose workers crashed says so in
its file, a node that vanished stops beating, and the survivors stop within `resources.node_timeout_s`
instead of waiting in a collective for the process-group timeout. The heartbeat is the `ftjob` process's,
not the workers', so a slow first step or a long compile never looks like a dead node.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import BadInput
from .rundir import RunPaths, atomic_write, hostname

if TYPE_CHECKING:
    from .spec import JobSpec


FREE_PORT = "a free port ftjob chose"


@dataclass(frozen=True)
class NodeInfo:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    procs_per_node: int
    accelerator: str  # "cuda" or "cpu"
    port_source: str = FREE_PORT  # where master_port came from, as a user would look it up

    @property
    def world_size(self) -> int:
        return self.nnodes * self.procs_per_node

    @property
    def port_is_ours(self) -> bool:
        """ftjob may pick another port: one node (no other node must agree on it), and no MASTER_PORT given."""
        return self.nnodes == 1 and self.port_source != "MASTER_PORT"


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise BadInput(f"environment variable {name}={value!r} must be an integer") from None
    return default


# Device nodes a GPU runtime exposes: NVIDIA (bare metal and containers), AMD ROCm, WSL2.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def detect_accelerator(spec: JobSpec) -> str:
    if spec.resources.accelerator != "auto":
        return spec.resources.accelerator
    if not any(os.path.exists(node) for node in GPU_DEVICE_NODES):
        return "cpu"  # no GPU device at all: say so without importing torch (about 2 s)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def free_port() -> int:
    """A port free now; another process can still take it before the workers bind it (train_stage retries)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_info(spec: JobSpec, gpu_count=None) -> NodeInfo:
    """NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT / NPROC_PER_NODE win; then Kubernetes
    (JOB_COMPLETION_INDEX) and Slurm (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID) variables; then the spec.
    `gpu_count` (for tests) replaces asking torch how many GPUs this node has."""
    accelerator = detect_accelerator(spec)
    nnodes = _env_int(("NNODES", "SLURM_NNODES"), spec.resources.nnodes)
    node_rank = _env_int(("NODE_RANK", "JOB_COMPLETION_INDEX", "SLURM_NODEID"), 0)
    if not 0 <= node_rank < nnodes:
        raise BadInput(f"NODE_RANK {node_rank} is outside 0..{nnodes - 1} (NNODES={nnodes})")
    slurm_job = _env_int(("SLURM_JOB_ID",), -1)
    if os.environ.get("MASTER_PORT"):
        port, port_source = _env_int(("MASTER_PORT",), 0), "MASTER_PORT"
    elif slurm_job >= 0:
        port, port_source = 20000 + slurm_job % 20000, "20000 + SLURM_JOB_ID % 20000"
    elif nnodes > 1:
        port, port_source = 29500, "the multi-node default"
    else:
        port, port_source = free_port(), FREE_PORT
    addr = os.environ.get("MASTER_ADDR") or "127.0.0.1"
    if nnodes > 1 and not os.environ.get("MASTER_ADDR"):
        raise BadInput("NNODES > 1 needs MASTER_ADDR (the host name of node rank 0)")
    procs = _env_int(("NPROC_PER_NODE",), spec.resources.procs_per_node)
    if procs == 0:
        if accelerator == "cuda":
            if gpu_count is None:
                import torch

                gpu_count = torch.cuda.device_count()
            procs = gpu_count
        else:
            procs = 2
    return NodeInfo(nnodes, node_rank, addr, port, procs, accelerator, port_source)


# ---------------------------------------------------------------- heartbeats


def heartbeat_file(paths: RunPaths, node_rank: int):
    return paths.nodes / f"node-{node_rank}.json"


class NodeHeartbeat:
    """This node's file, bumped every `interval_s` from a thread; says "exited" with the code at the end."""

    def __init__(self, paths: RunPaths, node: NodeInfo, interval_s: float):
        self.path, self.interval_s = heartbeat_file(paths, node.node_rank), interval_s
        self.record = {"node": node.node_rank, "host": hostname(), "pid": os.getpid(), "beat": 0,
                       "status": "running", "exit_code": None}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftjob-node-heartbeat", daemon=True)

    def start(self) -> "NodeHeartbeat":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread.start()
        return self

    def _write(self) -> None:
        self.record.update(beat=self.record["beat"] + 1, time=time.time())
        try:
            atomic_write(self.path, json.dumps(self.record))
        except OSError:
            pass  # a full volume must not end the node; the watchers see the beat stop only if it lasts

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()

    def stop(self, exit_code: int) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.record.update(status="exited", exit_code=exit_code)
        self._write()


class PeerWatch:
    """The other nodes' heartbeat files. A peer counts once its beat has moved since watching began (a
    file from an earlier attempt never moves); it is lost when it says it exited with a failure, or when
    its beat stands still for `timeout_s` by this node's clock (clock skew does not matter)."""

    def __init__(self, paths: RunPaths, node: NodeInfo, timeout_s: float):
        self.paths, self.timeout_s = paths, timeout_s
        self.peers = [r for r in range(node.nnodes) if r != node.node_rank]
        self.first = {r: self._read(r) for r in self.peers}
        self.seen: dict[int, tuple[int, float]] = {}  # peer -> (beat, when it last moved)

    def _read(self, rank: int) -> dict | None:
        try:
            return json.loads(heartbeat_file(self.paths, rank).read_text())
        except (OSError, ValueError):
            return None

    def alive(self, rank: int) -> dict | None:
        """The peer's heartbeat record if it has beaten since watching began (this attempt), else None."""
        rec = self._read(rank)
        if rec is None or rec == self.first[rank] or rec.get("status") != "running":
            return None
        return rec

    def finished(self, rank: int) -> bool:
        """The peer ended this attempt with success (e.g. node 0 found the run already trained)."""
        rec = self._read(rank)
        return rec is not None and rec != self.first[rank] and rec.get("status") == "exited" and rec["exit_code"] == 0

    def problem(self) -> str | None:
        """None while every peer seen so far is alive, else one sentence naming the lost node."""
        now = time.monotonic()
        for r in self.peers:
            rec = self._read(r)
            if rec is None or rec == self.first[r]:
                continue
            beat, moved = self.seen.get(r, (None, now))
            if rec["beat"] != beat:
                self.seen[r] = (rec["beat"], now)
                moved = now
            who = f"node {r} ({rec.get('host')}, pid {rec.get('pid')})"
            if rec.get("status") == "exited" and rec.get("exit_code") not in (0, 75):
                return f"{who} failed with exit code {rec['exit_code']}"
            if rec.get("status") != "exited" and now - moved > self.timeout_s:
                return f"{who} stopped responding: no heartbeat for {now - moved:.0f}s (resources.node_timeout_s)"
        return None
