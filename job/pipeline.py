"""The stages in order: validate -> prepare -> train -> generate -> report. One function per stage.

Each stage reads what the one before wrote to the run directory, so each can run alone
(`ftjob prepare`, `ftjob train`, ...) and `ftjob run` is the stages in order.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path

from . import errors
from . import model as model_lib
from . import spec as spec_lib
from .data.prepare import prepare, read_manifest, text_source
from .data.sqlite_source import check_rows, check_source
from .generate import samples_from_directory, write_samples
from .lock import RunLock
from .paths import RunPaths
from .runstate import read_state, write_state
from .spec import JobSpec
from .train.launch import Launch, NodeInfo, launcher_command, node_info, worker_env
from .train.setup import resolve_precision

log = logging.getLogger("ftjob")


# ------------------------------------------------------------------ validate


def preflight(spec: JobSpec, accelerator: str | None = None) -> dict:
    """Every check that can fail before anything is written; returns a few facts for the summary."""
    _check_output_dir(Path(spec.output_dir))
    check_source(text_source(spec))
    check_rows(text_source(spec))
    tok = model_lib.load_tokenizer(spec.model.tokenizer or spec.model.path,
                                   "model.tokenizer" if spec.model.tokenizer else "model.path")
    config = model_lib.model_config(spec.model)
    positions = model_lib.max_positions(config)
    if positions and spec.data.block_size > positions:
        raise errors.SpecError("data.block_size", f"{spec.data.block_size} is larger than the model's "
                               f"{positions} positions; use at most {positions}")
    if spec.model.from_config is None and len(tok) > config.vocab_size:
        raise errors.BadInput(f"model.tokenizer: the tokenizer has {len(tok)} tokens but the model's "
                              f"vocabulary has {config.vocab_size}; use the model's own tokenizer")
    if spec.generation.max_length > (positions or spec.generation.max_length):
        raise errors.SpecError("generation.max_length", f"is larger than the model's {positions} positions")
    if accelerator is not None:
        resolve_precision(spec, accelerator == "cuda")
    return {"tokenizer_vocab": len(tok), "positions": positions, "model_type": config.model_type}


def wait_for_inputs(spec: JobSpec, timeout_s: float, poll_s: float = 2.0, note_every_s: float = 30.0) -> None:
    """Wait (bounded) for the database file and the model directory to appear: on Kubernetes the Job can
    start before anyone has copied the inputs onto their volume. Exits 2 naming what is still missing."""
    start = time.monotonic()
    last_note = -note_every_s
    while True:
        missing = _missing_inputs(spec)
        if not missing:
            return
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise errors.BadInput(f"{missing[0]}: still missing after waiting {waited:.0f}s (--wait-for-inputs "
                                  f"{timeout_s:g}); copy it onto the inputs volume, then run again")
        if waited - last_note >= note_every_s:
            log.info("waiting for inputs (%s), up to %.0fs more", "; ".join(missing), timeout_s - waited)
            last_note = waited
        time.sleep(poll_s)


def _missing_inputs(spec: JobSpec) -> list[str]:
    missing = []
    if not Path(spec.data.database).is_file():
        missing.append(f"data.database {spec.data.database}")
    for key, value in (("model.path", spec.model.path), ("model.tokenizer", spec.model.tokenizer)):
        if value and value.startswith("/") and not (Path(value) / "config.json").exists() and not any(
                (Path(value) / f).exists() for f in model_lib.TOKENIZER_FILES):
            missing.append(f"{key} {value}")
    return missing


def _check_output_dir(out: Path) -> None:
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise errors.BadInput(f"output_dir: {existing} is a file, so {out} cannot be created; "
                              "give a directory on the mounted volume")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise errors.BadInput(f"output_dir: {existing} is not writable by this user (uid {os.getuid()}); "
                              "mount the volume read-write or pick another output_dir")


# ------------------------------------------------------------------ prepare


def prepare_stage(spec: JobSpec, paths: RunPaths, force: bool = False) -> dict:
    write_state(paths, stage="prepare")
    return prepare(spec, paths, force=force, interval_s=spec.report.log_interval_s)


def wait_for_manifest(paths: RunPaths, timeout_s: float = 4 * 3600, poll_s: float = 2.0) -> dict:
    """Nodes other than rank 0 wait for rank 0's data (shared volume) instead of preparing it again."""
    start = time.monotonic()
    last_note = 0.0
    while True:
        manifest = read_manifest(paths)
        state = read_state(paths)
        if state.get("stage") == "failed":
            raise errors.JobError(f"node 0 failed ({state.get('error', 'see its log')}); not starting this node")
        if manifest and state.get("stage") != "prepare":
            return manifest
        if time.monotonic() - start > timeout_s:
            raise errors.JobError(f"waited {timeout_s:.0f}s for node 0 to write {paths.manifest}; is node 0 running "
                                  "and is the output directory a shared volume?")
        if time.monotonic() - last_note > 60:
            log.info("waiting for node 0 to prepare the data (%s)", paths.manifest)
            last_note = time.monotonic()
        time.sleep(poll_s)


# ------------------------------------------------------------------ train


def train_stage(spec: JobSpec, paths: RunPaths, node: NodeInfo) -> int:
    manifest = read_manifest(paths)
    if manifest is None:
        raise errors.BadInput(f"no prepared data in {paths.data}; run `ftjob prepare` first (or `ftjob run`)")
    _check_one_batch(spec, paths, node, manifest["splits"]["train"]["blocks"])
    if node.node_rank == 0:
        write_state(paths, stage="train", nnodes=node.nnodes, procs_per_node=node.procs_per_node,
                    accelerator=node.accelerator)
    launch = Launch(launcher_command(paths, node), worker_env(node), node)
    code = launch.run()
    if code == 0:
        return errors.OK
    state = read_state(paths)
    if launch.signalled or state.get("stage") == "preempted":
        # The launcher exits 1 when it is signalled, whatever the workers did: the state file says
        # whether they got to write their checkpoint.
        return errors.PREEMPTED
    if code == errors.BAD_INPUT:  # a worker found it; its own line is in the log above
        raise errors.BadInput("training stopped on bad input: the workers' error is in the log above")
    if code in (errors.DIVERGED, errors.PREEMPTED, errors.LOCKED):
        return code
    write_state(paths, stage="failed", exit_code=code)
    return errors.FAILED


def _check_one_batch(spec: JobSpec, paths: RunPaths, node: NodeInfo, blocks: int) -> None:
    """The workers' own check, made before starting them: one error line instead of one per rank."""
    world, mb = node.nnodes * node.procs_per_node, spec.train.micro_batch
    if blocks < world * mb:
        if node.node_rank == 0:  # other nodes wait for the stage to leave "prepare"
            write_state(paths, stage="failed", exit_code=errors.BAD_INPUT)
        raise errors.BadInput(
            f"data: {blocks} training blocks are fewer than one batch across ranks ({world} ranks x "
            f"train.micro_batch {mb}); add rows, or lower train.micro_batch, data.block_size or the number "
            "of processes")


def already_trained(paths: RunPaths, spec: JobSpec) -> bool:
    if not (paths.final / "config.json").exists() or read_state(paths).get("stage") not in ("trained", "generate", "done"):
        return False
    try:
        previous = spec_lib.load(paths.spec)
    except errors.JobError:
        return False
    return previous.train == spec.train and previous.data == spec.data and previous.model == spec.model


# ------------------------------------------------------------------ generate / report


def generate_stage(spec: JobSpec, paths: RunPaths, model_dir: Path | None = None, name: str = "after") -> Path:
    model_dir = model_dir or paths.final
    if not (model_dir / "config.json").exists():
        raise errors.BadInput(f"no model in {model_dir}; train first (`ftjob train` or `ftjob run`)")
    write_state(paths, stage="generate")
    records = samples_from_directory(model_dir, spec.generation)
    path = write_samples(records, paths.samples, name, weights=str(model_dir))
    for r in records:
        log.info("sample (%s) %r -> %r", name, r["prompt"], r["samples"][0])
    return path


def report_stage(paths: RunPaths) -> Path:
    from .report import write_report

    path = write_report(paths)
    log.info("report: %s", path)
    return path


# ------------------------------------------------------------------ run


def start_run_dir(spec: JobSpec, paths: RunPaths, restart: bool) -> None:
    """Node 0 only, under the lock: move an old run aside on --restart, record the resolved spec."""
    if restart and paths.root.exists():
        aside = paths.root.with_name(f"{paths.root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        # Move everything but the lock we hold; nothing is deleted.
        aside.mkdir()
        for p in paths.root.iterdir():
            if p.name != ".lock":
                p.rename(aside / p.name)
        log.info("--restart: the previous run was moved to %s", aside)
    paths.root.mkdir(parents=True, exist_ok=True)
    new = spec_lib.dump(spec)
    if paths.spec.exists() and paths.spec.read_text(encoding="utf-8") != new:
        keep = paths.root / f"spec.{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        shutil.copy2(paths.spec, keep)
        log.info("the spec changed since the last attempt; the previous one is kept as %s", keep.name)
    tmp = paths.spec.with_name("spec.yaml.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(paths.spec)


class _Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)


def run(spec: JobSpec, restart: bool = False, wait_for_inputs_s: float = 0) -> int:
    """All stages; resumes automatically from the newest complete checkpoint in the run directory."""
    paths = RunPaths(spec.run_dir)
    node = node_info(spec)
    if wait_for_inputs_s:
        wait_for_inputs(spec, wait_for_inputs_s)
    preflight(spec, node.accelerator)
    # Outside the launcher, a preemption signal just stops the stage in hand: every stage either
    # finished its files or leaves them to be redone, so "resume me" is the right answer.
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, _raise_interrupted)
    try:
        if node.node_rank != 0:
            wait_for_manifest(paths)
            return train_stage(spec, paths, node)
        with RunLock(paths):
            trained = not restart and already_trained(paths, spec)
            start_run_dir(spec, paths, restart)
            write_state(paths, started=read_state(paths).get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            prepare_stage(spec, paths)
            if trained:
                log.info("already trained (%s); use --restart to train again", paths.final)
            else:
                code = train_stage(spec, paths, node)
                if code != errors.OK:
                    report_stage(paths)
                    return code
            generate_stage(spec, paths)
            write_state(paths, stage="done")
            report_stage(paths)
            log.info("done: %s", paths.root)
            return errors.OK
    except _Interrupted as e:
        log.info("received %s between stages; exiting %d, run again to resume", e, errors.PREEMPTED)
        if paths.root.exists():
            write_state(paths, stage="preempted")
        return errors.PREEMPTED
    except errors.JobError as e:
        # Other nodes poll the state: tell them to stop waiting for this node's data.
        if node.node_rank == 0 and paths.spec.exists() and read_state(paths).get("stage") not in ("failed",):
            write_state(paths, stage="failed", exit_code=e.exit_code, error=str(e))
        raise
