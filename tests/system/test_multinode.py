"""Two "nodes" on one machine: two `ftjob run` processes, each starting its own deepspeed launcher with
--no_ssh and its node rank (as on Slurm or a Kubernetes Indexed Job), one CPU worker each. They must
train together and give exactly what one node with two workers gives; data is prepared once."""
from __future__ import annotations

import os
import socket
import subprocess

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
