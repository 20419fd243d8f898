"""Where a node sits (node_info's precedence), how its launcher is started (command, world layout,
environment), the DeepSpeed config and batch arithmetic, and the peer watch that ends a job whose node
died. In-process, hand-computed expectations."""
from __future__ import annotations

import base64
import json
import os
import sys
import threading
from pathlib import Path

import pytest

from job import spec as spec_lib
from job.cluster import NodeHeartbeat, NodeInfo, PeerWatch, heartbeat_file, node_info
from job.errors import WORKER_ERROR_PREFIX, BadInput
from job.rundir import RunPaths
from job.train.launch import Launch, launcher_command, worker_env, world_info
from job.train.optim import deepspeed_config, grad_accum_for, resolve_precision

RANK_ENV = ("NNODES", "SLURM_NNODES", "NODE_RANK", "JOB_COMPLETION_INDEX", "SLURM_NODEID", "SLURM_JOB_ID",
            "MASTER_PORT", "MASTER_ADDR", "NPROC_PER_NODE", "CUDA_VISIBLE_DEVICES")


def make_spec(**resources) -> spec_lib.JobSpec:
    return spec_lib.from_dict({"name": "n", "output_dir": "/tmp/o", "data": {"database": "/d.sqlite", "table": "t"},
                               "model": {"path": "/m"}, "resources": {"accelerator": "cpu", **resources},
                               "train": {"micro_batch": 4, "grad_accum": 2}})


@pytest.fixture
def env(monkeypatch):
    for name in RANK_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_node_info_defaults_from_the_spec(env):
    node = node_info(make_spec(procs_per_node=3))
    assert (node.nnodes, node.node_rank, node.procs_per_node, node.master_addr) == (1, 0, 3, "127.0.0.1")
    assert node_info(make_spec()).procs_per_node == 2  # CPU: two processes by default
    assert node_info(make_spec(accelerator="cuda"), gpu_count=8).procs_per_node == 8  # one per GPU


def test_node_info_precedence_plain_over_kubernetes_over_slurm(env):
    env.setenv("SLURM_NNODES", "4")
    env.setenv("SLURM_NODEID", "3")
    env.setenv("SLURM_JOB_ID", "123456")
    env.setenv("MASTER_ADDR", "head")
    node = node_info(make_spec())
    assert (node.nnodes, node.node_rank, node.master_port) == (4, 3, 20000 + 123456 % 20000)
    env.setenv("JOB_COMPLETION_INDEX", "2")
    assert node_info(make_spec()).node_rank == 2
    env.setenv("NODE_RANK", "1")
    env.setenv("NNODES", "2")
    env.setenv("MASTER_PORT", "29999")
    node = node_info(make_spec())
    assert (node.nnodes, node.node_rank, node.master_port, node.master_addr) == (2, 1, 29999, "head")


def test_ftjob_picks_another_port_only_where_no_one_else_needs_to_know_it(env):
    """One node without MASTER_PORT: a free port, replaced on a retry if someone takes it first. A port the
    scheduler gave (MASTER_PORT), or one every node derives, stays, and an error names where it came from."""
    alone = node_info(make_spec())
    assert alone.port_is_ours and alone.port_source == "a free port ftjob chose" and alone.master_port > 0
    env.setenv("SLURM_JOB_ID", "123456")
    assert node_info(make_spec()).port_is_ours  # derived from the job id, but no other node uses it
    env.setenv("MASTER_ADDR", "head")
    env.setenv("NNODES", "2")
    two = node_info(make_spec())
    assert not two.port_is_ours and two.port_source == "20000 + SLURM_JOB_ID % 20000"
    env.setenv("NNODES", "1")
    env.setenv("MASTER_PORT", "29999")
    given = node_info(make_spec())
    assert (given.master_port, given.port_source, given.port_is_ours) == (29999, "MASTER_PORT", False)


@pytest.mark.parametrize("variables, message", [
    ({"NNODES": "2"}, "NNODES > 1 needs MASTER_ADDR"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK 2 is outside 0..1"),
    ({"NPROC_PER_NODE": "x"}, "NPROC_PER_NODE='x' must be an integer"),
])
def test_node_info_errors_name_the_variable(env, variables, message):
    for k, v in variables.items():
        env.setenv(k, v)
    with pytest.raises(BadInput, match=message):
        node_info(make_spec())


def test_launcher_command_is_deepspeeds_per_node_launcher_with_the_worlds_layout(tmp_path):
    node = NodeInfo(nnodes=2, node_rank=1, master_addr="head", master_port=29500, procs_per_node=2, accelerator="cpu")
    cmd = launcher_command(RunPaths(tmp_path), node)
    assert cmd[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
    layout = json.loads(base64.urlsafe_b64decode(cmd[4].removeprefix("--world_info=")))
    assert layout == {"node-0": [0, 1], "node-1": [0, 1]}
    assert cmd[5:9] == ["--node_rank=1", "--master_addr=head", "--master_port=29500", "--log_level=warning"]
    assert cmd[9:] == ["--module", "job.train.worker", "--run-dir", str(tmp_path)]
    assert "--log_level=info" in launcher_command(RunPaths(tmp_path), node, verbose=True)


def test_world_info_keeps_the_gpus_the_scheduler_gave():
    gpu = NodeInfo(1, 0, "127.0.0.1", 1, 2, "cuda")
    assert world_info(gpu, "4,5,6") == {"node-0": [4, 5]}
    assert world_info(gpu, "") == {"node-0": [0, 1]}
    assert world_info(NodeInfo(1, 0, "127.0.0.1", 1, 2, "cpu"), "4,5") == {"node-0": [0, 1]}


def test_worker_env(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = worker_env(NodeInfo(1, 0, "127.0.0.1", 1, 2, "cpu"), progress_events=True)
    assert cpu["DS_ACCELERATOR"] == "cpu" and "CUDA_VISIBLE_DEVICES" not in cpu and cpu["FTJOB_PROGRESS"] == "events"
    assert cpu["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert cpu["PYTHONPATH"].split(os.pathsep)[0] == os.path.dirname(os.path.dirname(spec_lib.__file__))
    gpu = worker_env(NodeInfo(1, 0, "127.0.0.1", 1, 2, "cuda"), progress_events=False)
    assert "DS_ACCELERATOR" not in gpu and gpu["CUDA_VISIBLE_DEVICES"] == "0" and gpu["FTJOB_PROGRESS"] == "log"
    assert cpu["FTJOB_PARENT_PID"] == str(os.getpid())  # the workers die with this process


def test_the_output_pump_outlives_a_log_file_it_cannot_write(capfd, caplog, monkeypatch):
    """The log file is /dev/full, where every write fails with ENOSPC as on a full volume: the launcher's
    lines still reach the console, a worker's error line is still read, and the launch ends normally."""
    crashed = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    lines = ["2024-01-01 00:00:00 ftjob [rank 1] first line", WORKER_ERROR_PREFIX + json.dumps(
        {"code": 74, "message": "volume full", "rank": 0}), "2024-01-01 00:00:01 ftjob [rank 1] last line"]
    script = f"for line in {lines!r}: print(line, flush=True)"
    launch = Launch([sys.executable, "-c", script], dict(os.environ), NodeInfo(1, 0, "127.0.0.1", 1, 1, "cpu"),
                    Path("/dev/full"))
    caplog.set_level("WARNING", logger="ftjob")
    assert launch.run() == 0
    assert crashed == []
    err = capfd.readouterr().err
    assert "ftjob [rank 1] first line" in err and "ftjob [rank 1] last line" in err
    assert launch.worker_error == {"code": 74, "message": "volume full", "rank": 0}
    assert "cannot write /dev/full (No space left on device)" in caplog.text


def test_deepspeed_config_follows_the_spec():
    spec = make_spec()
    spec.train.zero_stage, spec.train.grad_clip = 2, 0.5
    fp16 = deepspeed_config(spec, "fp16", grad_accum=3)
    assert (fp16["train_micro_batch_size_per_gpu"], fp16["gradient_accumulation_steps"]) == (4, 3)
    assert fp16["fp16"]["enabled"] and not fp16["bf16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0
    assert fp16["zero_optimization"]["stage"] == 2 and fp16["gradient_clipping"] == 0.5
    assert fp16["checkpoint"] == {"load_universal": False}
    bf16 = deepspeed_config(spec, "bf16", grad_accum=1, load_universal=True)
    assert bf16["bf16"]["enabled"] and not bf16["fp16"]["enabled"] and bf16["checkpoint"]["load_universal"]


def test_global_batch_arithmetic():
    assert grad_accum_for(32, world=2, micro_batch=8) == 2
    assert grad_accum_for(32, world=1, micro_batch=8) == 4
    with pytest.raises(BadInput, match="30 sequences per step cannot be split evenly over 2 processes"):
        grad_accum_for(30, world=2, micro_batch=8)
    with pytest.raises(BadInput, match="divisible by 32"):
        grad_accum_for(16, world=4, micro_batch=8)


def test_precision():
    spec = make_spec()
    assert resolve_precision(spec, cuda=True) == "fp16" and resolve_precision(spec, cuda=False) == "fp32"
    spec.train.precision = "fp16"
    with pytest.raises(BadInput, match="fp16 needs a GPU"):
        resolve_precision(spec, cuda=False)


def test_peer_watch_sees_a_failed_node_and_a_silent_one(tmp_path, monkeypatch):
    paths = RunPaths(tmp_path)
    node = lambda r: NodeInfo(3, r, "h", 1, 1, "cpu")  # noqa: E731
    stale = heartbeat_file(paths, 1)
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"beat": 9, "status": "exited", "exit_code": 1, "host": "old"}))  # earlier attempt
    clock = [1000.0]
    monkeypatch.setattr("job.cluster.time.monotonic", lambda: clock[0])
    watch = PeerWatch(paths, node(0), timeout_s=60)
    assert watch.problem() is None  # a file from an earlier attempt does not count

    beats = {r: NodeHeartbeat(paths, node(r), interval_s=3600) for r in (1, 2)}
    for hb in beats.values():
        hb._write()
    assert watch.problem() is None  # both alive
    clock[0] += 50
    beats[1]._write()
    assert watch.problem() is None  # node 2 silent for 50 s < 60 s
    clock[0] += 20
    beats[1]._write()
    assert "node 2" in watch.problem() and "no heartbeat for 70s" in watch.problem()

    watch = PeerWatch(paths, node(0), timeout_s=60)
    beats[1]._write()
    beats[1].record.update(status="exited", exit_code=1)
    beats[1]._write()
    assert "node 1" in watch.problem() and "failed with exit code 1" in watch.problem()
    beats[1].record.update(exit_code=75)
    beats[1]._write()
    assert watch.problem() is None or "node 1" not in watch.problem()  # preempted, not failed


def test_the_error_line_names_the_taken_port_and_other_nodes_only_when_there_are_some(tmp_path):
    """What `ftjob` says when its launch ends badly (pipeline._training_outcome): a taken port with where it
    came from; a worker lost on a one-node run without pointing at nodes that do not exist."""
    from types import SimpleNamespace

    from job.errors import PEER_LOST, PORT_TAKEN, JobError
    from job.pipeline import _training_outcome

    paths = RunPaths(tmp_path)
    taken = SimpleNamespace(worker_error={"code": PORT_TAKEN, "rank": 0, "message": "port 29500 on head is in use "
                                          "by another process"}, peer_problem=None, signalled=0)
    given = NodeInfo(2, 0, "head", 29500, 2, "cpu", "MASTER_PORT")
    with pytest.raises(JobError, match=r"^port 29500 on head is in use by another process \(the port came from "
                                       r"MASTER_PORT\); set MASTER_PORT to a free port") as e:
        _training_outcome(paths, given, taken, PORT_TAKEN, None)
    assert e.value.exit_code == 1

    lost = SimpleNamespace(worker_error=None, peer_problem=None, signalled=0)
    with pytest.raises(JobError) as e:
        _training_outcome(paths, NodeInfo(1, 0, "127.0.0.1", 1, 2, "cpu"), lost, PEER_LOST, None)
    assert "nodes" not in str(e.value).replace(str(tmp_path), "") and str(paths.log_file(0)) in str(e.value)
    with pytest.raises(JobError, match="see the other nodes' logs"):
        _training_outcome(paths, NodeInfo(2, 1, "head", 1, 2, "cpu"), lost, PEER_LOST, None)
