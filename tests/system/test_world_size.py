"""Resume on another number of processes: 2 -> 1 -> 2 with ZeRO-1 and 1 -> 2 -> 1 with ZeRO-2, through the
real launcher, each leg stopped by SIGTERM. The global batch stays 32 sequences (gradient accumulation
changes), every training block is used exactly once per epoch across the legs (traced), and per-step
losses stay within 1e-4 of an uninterrupted two-process run (fp32, dropout off: the ranks' own RNG
streams differ with the world size, the arithmetic does not)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import ftjob_command, jsonl, run_ftjob, write_spec
from job import errors
from job.data.schedule import EpochSchedule

pytestmark = pytest.mark.slow

STEPS = 24  # 1.5 epochs of the demo's 503 blocks at 32 per step


def spec_for(tmp: Path, demo_spec: dict, name: str, zero: int) -> Path:
    return write_spec(tmp / f"{name}.yaml", demo_spec, name=name, output_dir=str(tmp / "runs"), train__precision="fp32",
                      train__dropout=0.0, train__zero_stage=zero, train__max_steps=STEPS, train__log_every=1,
                      train__eval_every=0, train__sample_every=0, train__checkpoint_every=1000,
                      generation__max_length=12, train__micro_batch=8, train__global_batch=32)


@pytest.fixture(scope="module")
def uninterrupted(demo_assets, tmp_path_factory):
    import yaml

    tmp = tmp_path_factory.mktemp("world-reference")
    proc = run_ftjob("run", spec_for(tmp, yaml.safe_load(demo_assets.spec.read_text()), "ref", 1),
                     env={"NPROC_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {m["step"]: m["loss"] for m in jsonl(tmp / "runs" / "ref" / "metrics.jsonl")}


def leg(spec: Path, run: Path, procs: int, trace: Path, stop_after: int | None) -> str:
    """One attempt on `procs` processes; SIGTERM once metrics pass `stop_after` (None: run to the end)."""
    env = dict(os.environ, NPROC_PER_NODE=str(procs), FTJOB_TRACE_BLOCKS=str(trace), FTJOB_FAULTS="delay_step=0.05")
    proc = subprocess.Popen(ftjob_command() + ["run", str(spec)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if stop_after is not None:
        import time

        deadline = time.monotonic() + 300
        while not any(m["step"] > stop_after for m in jsonl(run / "metrics.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == (errors.OK if stop_after is None else errors.PREEMPTED), err[-3000:]
    return err


@pytest.mark.parametrize("zero, world", [(1, (2, 1, 2)), (2, (1, 2, 1))], ids=["zero1-2-1-2", "zero2-1-2-1"])
def test_resume_on_another_number_of_processes(demo_spec, tmp_path, uninterrupted, zero, world):
    spec, run = spec_for(tmp_path, demo_spec, "chain", zero), tmp_path / "runs" / "chain"
    trace = tmp_path / "trace"
    trace.mkdir()
    logs = [leg(spec, run, world[0], trace, stop_after=4), leg(spec, run, world[1], trace, stop_after=12),
            leg(spec, run, world[2], trace, stop_after=None)]
    accum = {2: 2, 1: 4}
    for before, after, log in zip(world, world[1:], logs[1:]):
        assert "the number of processes changed since step-" in log and f"{before} -> {after}" in log
        assert f"gradient accumulation {accum[before]} -> {accum[after]} keeps 32 sequences per step" in log
    state = json.loads((run / "state.json").read_text())
    assert (state["global_batch"], state["world_size"], state["grad_accum"]) == (32, world[2], accum[world[2]])

    losses = {m["step"]: m["loss"] for m in jsonl(run / "metrics.jsonl")}
    assert sorted(losses) == list(range(1, STEPS + 1))
    worst = max(abs(losses[s] - uninterrupted[s]) for s in losses)
    assert worst <= 1e-4, f"per-step losses differ from the uninterrupted run by up to {worst}"

    # Every block exactly once per epoch, whichever ranks and legs trained it.
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    n_blocks = manifest["splits"]["train"]["blocks"]
    per_step = EpochSchedule(n_blocks, 1, 32, 1, 42).steps_per_epoch
    per_epoch = defaultdict(list)
    for f in trace.glob("blocks-rank*.txt"):
        for line in f.read_text().splitlines():
            step, *idx = map(int, line.split())
            per_epoch[step // per_step].extend(idx)
    assert sorted(per_epoch[0]) == list(range(n_blocks))
    assert len(per_epoch[1]) == len(set(per_epoch[1])) == (STEPS - per_step) * 32
