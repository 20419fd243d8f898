"""Two "nodes" on one machine: two `ftjob run` processes, each starting its own deepspeed launcher with
--no_ssh and its node rank (as on Slurm or a Kubernetes Indexed Job), one CPU worker each. They must
train together and give exactly what one node with two workers gives; data is prepared once."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from conftest import ftjob_command, run_ftjob, write_spec

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_like_one_node_with_two_workers(demo_spec, tmp_path):
    from safetensors.torch import load_file

    settings = dict(train__max_steps=6, train__eval_every=0, train__sample_every=0, train__log_every=1,
                    generation__max_length=12)
    one = write_spec(tmp_path / "one.yaml", demo_spec, output_dir=str(tmp_path / "one"), **settings)
    two = write_spec(tmp_path / "two.yaml", demo_spec, output_dir=str(tmp_path / "two"), **settings)

    # One thread per worker in both layouts: the same kernels, so the same floating-point sums.
    proc = run_ftjob("run", one, env={"NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    port = str(free_port())
    nodes = []
    for rank in (1, 0):  # node 1 first: it must wait for node 0's data, not prepare its own
        env = dict(os.environ, NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   NPROC_PER_NODE="1", OMP_NUM_THREADS="1")
        nodes.append(subprocess.Popen(ftjob_command() + ["run", str(two)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [(p.communicate(timeout=300), p.returncode) for p in nodes]
    for (out, err), code in results:
        assert code == 0, err[-3000:]
    node1_log, node0_log = results[0][0][1], results[1][0][1]
    assert "prepare:" in node0_log and "prepare:" not in node1_log  # prepared once, by node 0
    assert "--node_rank=1" in node1_log and "--node_rank=0" in node0_log

    a = load_file(tmp_path / "one" / "demo" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "demo" / "final" / "model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0.0, f"two nodes differ from one node by {worst}"


def test_a_crashed_node_ends_the_job_promptly_and_the_rerun_finishes(demo_spec, tmp_path):
    """kill -9 of node 1's worker: node 1's launcher and `ftjob` exit, and node 0, whose worker now waits in
    a collective for a peer that is gone, stops on its own within seconds (its heartbeat watch), with one
    line naming node 1. Both exit 1 (not 75: nothing was checkpointed at the stop). Rerun both: the run
    resumes from its last checkpoint and finishes."""
    spec = write_spec(tmp_path / "spec.yaml", demo_spec, output_dir=str(tmp_path / "runs"), train__max_steps=40,
                      train__eval_every=0, train__sample_every=0, train__log_every=1, train__checkpoint_every=5,
                      generation__max_length=12, resources__node_timeout_s=30)
    run = tmp_path / "runs" / "demo"

    def start_nodes(faults: str = ""):
        port = str(free_port())
        nodes = {}
        for rank in (0, 1):
            env = dict(os.environ, NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       NPROC_PER_NODE="1", OMP_NUM_THREADS="1", FTJOB_FAULTS=faults)
            nodes[rank] = subprocess.Popen(ftjob_command() + ["run", str(spec)], env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
        return nodes

    nodes = start_nodes("delay_step=0.1")
    deadline = time.monotonic() + 300
    def steps():
        path = run / "metrics.jsonl"
        return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []

    while not any(s >= 7 for s in steps()):
        assert time.monotonic() < deadline and all(p.poll() is None for p in nodes.values())
        time.sleep(0.1)
    from job.train.launch import worker_processes

    workers = worker_processes(nodes[1].pid)
    assert len(workers) == 1
    workers[0].kill()
    killed = time.monotonic()
    results = {rank: p.communicate(timeout=120) for rank, p in nodes.items()}
    took = time.monotonic() - killed
    assert took < 30, f"the survivors took {took:.0f}s to stop"
    for rank, p in nodes.items():
        assert p.returncode == 1, (rank, results[rank][1][-3000:])
    node0 = results[0][1]
    assert "Traceback" not in node0
    (line,) = [x for x in node0.splitlines() if x.startswith("ftjob: error:")]
    assert "node 1" in line and "failed with exit code" in line and "resumes from step-00000005" in line, line

    nodes = start_nodes()
    for rank, p in nodes.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (rank, err[-3000:])
        if rank == 0:
            assert f"resumed from {run / 'checkpoints'}" in err
    assert steps() == list(range(1, 41)) and (run / "final" / "config.json").exists()
