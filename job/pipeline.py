"""The one orchestrator: one function per `ftjob` subcommand, built from the stages in order
validate -> prepare -> train -> export best -> generate -> report.

Each stage reads what the one before wrote to the run directory, so each can run alone (`ftjob prepare`,
`ftjob train`, ...) and `ftjob run` is the stages in order. Node 0 of a job owns the run directory (its
lock, spec.yaml, data/); the other nodes wait for node 0's data and only train.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from typing import TYPE_CHECKING

from . import cluster, errors, logs, pretrained
from .cluster import NodeHeartbeat, NodeInfo, PeerWatch, node_info
from .errors import BadInput, JobError
from .rundir import (FINISHED, VOLUME_ERRNOS, RunLock, RunPaths, Stage, atomic_dir, atomic_write,
                     complete_checkpoints, describe_volume, newest_complete, read_best, read_manifest, read_state,
                     remove_partial_files, verify_checkpoint, volume_error_of, write_state, writing)

if TYPE_CHECKING:
    from .spec import JobSpec

log = logging.getLogger("ftjob")

ONE_NODE = NodeInfo(nnodes=1, node_rank=0, master_addr="127.0.0.1", master_port=0, procs_per_node=1, accelerator="cpu")


# ================================================================== subcommands


def validate(spec_file: str, overrides: list[str], print_spec: bool = False) -> int:
    spec = _load(spec_file, overrides)
    facts = preflight(spec)
    if print_spec:
        from .spec import dump

        print(dump(spec))
    print(f"ok: {spec_file} is valid (run directory {spec.run_dir}, tokenizer vocabulary "
          f"{facts['tokenizer_vocab']}, {facts['positions']} positions)")
    return errors.OK


def prepare(spec_file: str, overrides: list[str], force: bool = False) -> int:
    spec = _load(spec_file, overrides)
    preflight(spec)
    paths = RunPaths(spec.run_dir)
    with _owner(spec, paths, restart=False):
        prepare_stage(spec, paths, force=force)
    return errors.OK


def train(spec_file: str, overrides: list[str], verbose: bool = False) -> int:
    spec = _load(spec_file, overrides)
    node = node_info(spec)
    preflight(spec, node)
    paths = RunPaths(spec.run_dir)
    if node.node_rank != 0:
        with _peer_session(spec, paths, node) as watch:
            if wait_for_manifest(paths, watch) is None:
                return errors.OK
            return train_stage(spec, paths, node, verbose, watch)
    with _owner(spec, paths, restart=False, node=node) as watch:
        manifest = read_manifest(paths)
        if manifest is None:
            raise BadInput(f"no prepared data in {paths.data}; run `ftjob prepare` first (or `ftjob run`)")
        check_pinned_data(spec, paths, manifest)
        plan_stage(spec, paths, node)
        write_state(paths, data_ready_for=data_ready_mark())
        return train_stage(spec, paths, node, verbose, watch)


def run(spec_file: str, overrides: list[str], restart: bool = False, wait_for_inputs_s: float = 0,
        verbose: bool = False) -> int:
    """All stages; resumes by itself from the newest complete checkpoint in the run directory."""
    spec = _load(spec_file, overrides)
    paths = RunPaths(spec.run_dir)
    node = node_info(spec)
    if wait_for_inputs_s:
        wait_for_inputs(spec, wait_for_inputs_s)
    preflight(spec, node)
    try:
        with _signals_interrupt_stages():
            if node.node_rank != 0:
                with _peer_session(spec, paths, node) as watch:
                    if wait_for_manifest(paths, watch) is None:
                        return errors.OK
                    return train_stage(spec, paths, node, verbose, watch)
            with _owner(spec, paths, restart, node) as watch:
                return _all_stages(spec, paths, node, restart, verbose, watch)
    except _Interrupted as e:
        log.info("received %s between stages; exiting %d, run again to resume", e, errors.PREEMPTED)
        if paths.spec.exists() and node.node_rank == 0:
            write_state(paths, stage=Stage.PREEMPTED)
        return errors.PREEMPTED
    except JobError as e:
        # Other nodes poll the state: tell them to stop waiting for this node's data.
        if node.node_rank == 0 and e.exit_code != errors.LOCKED and paths.spec.exists():
            with contextlib.suppress(OSError):
                write_state(paths, stage=Stage.FAILED, exit_code=e.exit_code, error=str(e))
        raise


def _all_stages(spec: JobSpec, paths: RunPaths, node: NodeInfo, restart: bool, verbose: bool, watch) -> int:
    trained = not restart and already_trained(paths, spec)
    write_state(paths, started=read_state(paths).get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    prepare_stage(spec, paths)
    if trained:
        log.info("already trained (%s); use --restart to train again", paths.final)
    else:
        plan_stage(spec, paths, node)
        write_state(paths, data_ready_for=data_ready_mark())
        code = train_stage(spec, paths, node, verbose, watch)
        if code != errors.OK:
            report_stage(paths)
            return code
        export_best_stage(spec, paths)
    if trained and not (paths.best / "ftjob-best.json").exists():  # an attempt that stopped after training
        export_best_stage(spec, paths)
    if not (paths.samples / "after.jsonl").exists():  # the workers write them as they export final/
        generate_stage(spec, paths)
    write_state(paths, stage=Stage.DONE)
    report_stage(paths)
    log.info("done: %s", paths.root)
    return errors.OK


def plan(spec_file: str, overrides: list[str], gpus: int | None = None, gpu_memory_gib: float = 80.0,
         tokens_per_s: float | None = None, as_json: bool = False) -> int:
    """What the run will need, before it is submitted; writes nothing. Exit 2 when something will not fit."""
    spec = _load(spec_file, overrides)
    preflight(spec, weights=False)
    estimate = make_plan(spec, gpus=gpus, gpu_memory_gib=gpu_memory_gib, tokens_per_s=tokens_per_s)
    print(estimate.to_json() if as_json else estimate.to_text(), end="")
    problems = [f for f in estimate.findings if f.severity == "error"]
    if problems:
        raise BadInput(f"plan: {problems[0].message}" + (f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""))
    return errors.OK


def make_plan(spec: JobSpec, manifest: dict | None = None, node: NodeInfo | None = None, **figures):
    """The plan for this spec: from the run's data manifest when there is one, else from a sample of rows.
    The model is described from its config alone (built on the meta device: no weights are read)."""
    from . import architecture
    from . import plan as plan_lib
    from .data.prepare import resolve_join, tokenizer_for

    paths = RunPaths(spec.run_dir)
    manifest = manifest or read_manifest(paths)
    name, tok = tokenizer_for(spec)
    data = None if manifest else plan_lib.estimate_data_from_sample(spec.data, tok, resolve_join(spec, tok))
    tokenizer_bytes = sum(f.stat().st_size for f in pretrained.resolve_model_dir(name).glob("*")
                          if f.is_file() and ("token" in f.name or f.name in ("vocab.json", "merges.txt")))
    if node is not None:
        figures.update(world=node.world_size, accelerator=node.accelerator)
    # The model as the workers build it, described from its config on the meta device; only computed (and
    # transformers imported) when the cache has no description of this very config, tokenizer and dropout.
    key = {**pretrained.config_identity(spec.model), "tokenizer": tok.facts["fingerprint"], "vocab": len(tok),
           "dropout": spec.train.dropout, "attention": spec.model.attn_implementation}

    def config():
        built = pretrained.training_config(spec.model, tok, spec.train.dropout)
        logs.route_library_loggers()  # transformers is imported now: its notices go to the log, not the console
        return built

    def activations(precision: str, device: str) -> dict:
        return architecture.trace_cached(key, config, spec.train.micro_batch, spec.data.block_size, precision,
                                         device, spec.model.attn_implementation)

    figures.setdefault("free_bytes", plan_lib.free_bytes_at(spec.output_dir))  # None: the volume is elsewhere
    figures.setdefault("present_bytes", plan_lib.dir_bytes(paths.root))
    return plan_lib.make_plan(architecture.describe_cached(key, config), spec, manifest, activations=activations, data=data,
                              tokenizer_bytes=tokenizer_bytes, tokenizer_vocab=len(tok), **figures)


def plan_stage(spec: JobSpec, paths: RunPaths, node: NodeInfo) -> None:
    """Before training: the plan on record (plan.json, for the report's plan-vs-measured table), and a run
    the output volume clearly cannot hold stopped now, not hours later at its third checkpoint."""
    manifest = read_manifest(paths)
    _check_one_batch(spec, node, manifest["splits"]["train"]["blocks"])
    estimate = make_plan(spec, manifest, node)
    chosen = estimate.chosen_memory
    summary = {"basis": f"{estimate.device} x {estimate.world}, {estimate.precision}, ZeRO-{estimate.zero_stage}",
               "estimates": {"tokens_per_s": estimate.time.tokens_per_s if estimate.time else None,
                             "checkpoint_bytes": estimate.checkpoint.total,
                             "state_bytes": sum(estimate.to_dict()["state_bytes"].values()),
                             "total_steps": estimate.steps.total_steps if estimate.steps else None,
                             "peak_gpu_gib": chosen.peak_bytes / 2**30 if estimate.device == "cuda" else None,
                             "peak_rss_mib": chosen.peak_bytes / 2**20 if estimate.device == "cpu" else None},
               "plan": estimate.to_dict()}
    atomic_write(paths.plan, json.dumps(summary, indent=1))
    for finding in estimate.findings:
        if finding.code == "fp16_overflow":
            log.warning("%s", finding.message)
    volume = estimate.volume
    if volume.ok is False:
        raise BadInput(f"output_dir: {describe_volume(paths.root)}: {volume.message}")
    if volume.free_bytes is not None and volume.free_bytes - volume.to_write_bytes < 0.1 * volume.need_bytes:
        log.warning("output volume is tight: %s", volume.message)


def generate(spec_file: str, overrides: list[str], model_dir: Path | None = None, name: str = "after") -> int:
    spec = _load(spec_file, overrides)
    generate_stage(spec, RunPaths(spec.run_dir), model_dir, name)
    return errors.OK


def export(spec_file: str, overrides: list[str], checkpoint: Path | None = None, out: Path | None = None) -> int:
    from .train.export import export_checkpoint

    spec = _load(spec_file, overrides)
    paths = RunPaths(spec.run_dir)
    ckpt = checkpoint or newest_complete(paths.checkpoints)
    if ckpt is None:
        raise BadInput(f"no complete checkpoint to export in {paths.checkpoints}")
    step = json.loads((ckpt / "COMPLETE.json").read_text())["step"] if (ckpt / "COMPLETE.json").exists() else 0
    print(export_checkpoint(ckpt, out or paths.root / f"export-step-{step:08d}", spec))
    return errors.OK


def status(run_dir: Path, as_json: bool = False) -> int:
    from .status import collect_status, status_text

    print(json.dumps(collect_status(run_dir), indent=1, default=str) if as_json else status_text(run_dir))
    return errors.OK


def report(run_dir: Path) -> int:
    from .report import write_report
    from .status import run_paths

    print(write_report(run_paths(run_dir)))
    return errors.OK


def demo_assets(directory: Path, rows: int) -> int:
    from .demo import write_demo_assets

    out = write_demo_assets(directory, rows)
    print(f"database: {out['database']}\nmodel:    {out['model']}")
    return errors.OK


def _load(spec_file, overrides: list[str]) -> JobSpec:
    # Imported here, not at the top: pydantic's model building costs 0.2 s that `ftjob status` skips.
    from .spec import load

    return load(spec_file, overrides)


# ================================================================== validate


def preflight(spec: JobSpec, node: NodeInfo | None = None, weights: bool = True) -> dict:
    """Every check that can fail before anything is written; returns a few facts for the summary.
    weights=False (`ftjob plan`): the config and tokenizer are enough, the weights need not be there."""
    from .data.prepare import document_boundaries, resolve_join, text_source
    from .data.sqlite_source import check_rows, check_source

    _check_output_dir(Path(spec.output_dir))
    check_source(text_source(spec))
    check_rows(text_source(spec))
    tok = pretrained.load_tokenizer(spec.model.tokenizer or spec.model.path,
                                    "model.tokenizer" if spec.model.tokenizer else "model.path")
    model = pretrained.model_facts(spec.model)
    if weights:
        pretrained.check_weights(spec.model)
    positions = model["positions"]
    if positions and spec.data.block_size > positions:
        raise errors.SpecError("data.block_size", f"{spec.data.block_size} is larger than the model's "
                               f"{positions} positions; use at most {positions}")
    if spec.model.from_config is None and len(tok) > model["vocab_size"]:
        raise BadInput(f"model.tokenizer: the tokenizer has {len(tok)} tokens but the model's vocabulary has "
                       f"{model['vocab_size']}; use the model's own tokenizer")
    document_boundaries(tok, resolve_join(spec, tok))  # a join the tokenizer has no token for
    if spec.generation.max_length > (positions or spec.generation.max_length):
        raise errors.SpecError("generation.max_length", f"is larger than the model's {positions} positions")
    if spec.model.attn_implementation == "flash_attention_2" and not _importable("flash_attn"):
        raise BadInput("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                       "(pip install flash-attn) and a GPU; use sdpa")
    if node is not None:
        _check_node(spec, node)
    return {"tokenizer_vocab": len(tok), "positions": positions, "model_type": model["model_type"]}


def _check_node(spec: JobSpec, node: NodeInfo) -> None:
    from .train.optim import grad_accum_for, resolve_precision

    if node.accelerator == "cuda":
        import torch

        visible = torch.cuda.device_count()
        if visible == 0 or visible < node.procs_per_node:
            raise BadInput(f"resources.accelerator: cuda with {node.procs_per_node} processes per node, but "
                           f"{'no GPU is' if not visible else f'only {visible} GPUs are'} visible here "
                           "(CUDA_VISIBLE_DEVICES, the driver, the container's --gpus); use cpu or auto, or fewer "
                           "processes")
    resolve_precision(spec, node.accelerator == "cuda")
    if spec.train.global_batch:
        grad_accum_for(spec.train.global_batch, node.world_size, spec.train.micro_batch)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _check_output_dir(out: Path) -> None:
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise BadInput(f"output_dir: {existing} is a file, so {out} cannot be created; give a directory on "
                       "the mounted volume")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"output_dir: {existing} is not writable by this user (uid {os.getuid()}, gid "
                       f"{os.getgid()}); mount the volume read-write for them, or pick another output_dir")


def wait_for_inputs(spec: JobSpec, timeout_s: float, poll_s: float = 2.0, note_every_s: float = 30.0) -> None:
    """Wait (bounded) for the database file and the model directory to appear: on Kubernetes the Job can
    start before anyone has copied the inputs onto their volume. Exits 2 naming what is still missing."""
    start = time.monotonic()
    last_note = -note_every_s
    while missing := _missing_inputs(spec):
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise BadInput(f"{missing[0]}: still missing after waiting {waited:.0f}s (--wait-for-inputs "
                           f"{timeout_s:g}); copy it onto the inputs volume, then run again")
        if waited - last_note >= note_every_s:
            log.info("waiting for inputs (%s), up to %.0fs more", "; ".join(missing), timeout_s - waited)
            last_note = waited
        time.sleep(poll_s)


def _missing_inputs(spec: JobSpec) -> list[str]:
    missing = [] if Path(spec.data.database).is_file() else [f"data.database {spec.data.database}"]
    for key, value in (("model.path", spec.model.path), ("model.tokenizer", spec.model.tokenizer)):
        if value and value.startswith("/") and not (Path(value) / "config.json").exists() and not any(
                (Path(value) / f).exists() for f in pretrained.TOKENIZER_FILES):
            missing.append(f"{key} {value}")
    return missing


# ================================================================== the run directory


@contextlib.contextmanager
def _owner(spec: JobSpec, paths: RunPaths, restart: bool, node: NodeInfo | None = None):
    """Node 0's hold on the run directory: the lock (with its heartbeat), leftovers of a killed attempt
    removed, the resolved spec recorded, the run's log file attached; in a multi-node job, this node's
    heartbeat and the watch on the others. Yields the PeerWatch (None on one node)."""
    with RunLock(paths, spec.resources.lock_heartbeat_s):
        removed = remove_partial_files(paths)
        if removed:
            log.info("removed %d partial file(s) a stopped attempt left: %s", len(removed),
                     ", ".join(p.name for p in removed[:5]))
        start_run_dir(spec, paths, restart)
        try:
            with _node_files(spec, paths, node or ONE_NODE) as watch:
                yield watch
        except errors.VolumeError:
            remove_partial_files(paths)  # what the workers could not clean up: nothing half-written stays
            raise
        except OSError as e:  # any other write of this process (state, plan, ...): the same one line
            if e.errno not in VOLUME_ERRNOS:
                raise
            remove_partial_files(paths)
            raise volume_error_of(e, paths) from None


@contextlib.contextmanager
def _peer_session(spec: JobSpec, paths: RunPaths, node: NodeInfo):
    paths.root.mkdir(parents=True, exist_ok=True)
    with _node_files(spec, paths, node) as watch:
        yield watch


@contextlib.contextmanager
def _node_files(spec: JobSpec, paths: RunPaths, node: NodeInfo):
    handler = logs.add_file(paths.log_file(node.node_rank))
    log.info("ftjob attempt on %s (node %d of %d), spec %s", os.uname().nodename, node.node_rank, node.nnodes,
             paths.spec)
    heartbeat, watch = None, None
    if node.nnodes > 1:
        timeout = spec.resources.node_timeout_s
        heartbeat = NodeHeartbeat(paths, node, interval_s=min(10.0, timeout / 6)).start()
        watch = PeerWatch(paths, node, timeout)
    code = errors.FAILED
    try:
        yield watch
        code = errors.OK
    except JobError as e:
        code = e.exit_code
        raise
    finally:
        if heartbeat:
            heartbeat.stop(code)
        logs.remove_handler(handler)


def start_run_dir(spec: JobSpec, paths: RunPaths, restart: bool) -> None:
    """Under the lock: move an old run aside on --restart (nothing is deleted), record the resolved spec."""
    if restart and paths.root.exists():
        aside = paths.root.with_name(f"{paths.root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        aside.mkdir()
        for p in paths.root.iterdir():
            if p.name not in (".lock", ".writers"):  # the locks we hold stay
                p.rename(aside / p.name)
        log.info("--restart: the previous run was moved to %s", aside)
    from .spec import dump

    paths.root.mkdir(parents=True, exist_ok=True)
    new = dump(spec)
    with writing(paths.spec, "the resolved spec", paths):
        if paths.spec.exists() and paths.spec.read_text(encoding="utf-8") != new:
            keep = paths.root / f"spec.{time.strftime('%Y%m%d-%H%M%S')}.yaml"
            shutil.copy2(paths.spec, keep)
            log.info("the spec changed since the last attempt; the previous one is kept as %s", keep.name)
        atomic_write(paths.spec, new)


class _Interrupted(Exception):
    pass


@contextlib.contextmanager
def _signals_interrupt_stages():
    """Outside the launcher, a preemption signal stops the stage in hand: every stage either finished its
    files or leaves them to be redone, so "resume me" (75) is the right answer."""
    def interrupted(signum, frame):
        raise _Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ================================================================== prepare


def prepare_stage(spec: JobSpec, paths: RunPaths, force: bool = False) -> dict:
    from .data.prepare import prepare as build

    manifest = read_manifest(paths)
    if manifest and complete_checkpoints(paths.checkpoints):
        if force:
            raise BadInput(f"prepare --force: {paths.root} has checkpoints, so its data is pinned to the run; "
                           "use `ftjob run --restart` to start over on newly prepared data")
        check_pinned_data(spec, paths, manifest)
        log.info("prepare: the run has checkpoints, so it keeps the data prepared %s; nothing to do",
                 manifest.get("created"))
        return manifest
    write_state(paths, stage=Stage.PREPARE)
    with writing(paths.data, "the prepared data", paths):
        return build(spec, paths, force=force, interval_s=spec.report.log_interval_s)


def check_pinned_data(spec: JobSpec, paths: RunPaths, manifest: dict) -> None:
    """A run with checkpoints trains on the data it started with: a changed data setting would change
    which blocks the resumed steps see (exit 2, name the key); a changed database is only noted (the run
    keeps its snapshot in data/)."""
    from .data.prepare import changed_settings, data_settings, source_identity, tokenizer_for

    if not complete_checkpoints(paths.checkpoints):
        return
    _, tok = tokenizer_for(spec)
    settings = data_settings(spec, tok)
    changed = changed_settings(manifest, settings)
    if changed:
        key = changed[0]
        name = {"tokenizer": "model.tokenizer", "format": "the data format (a newer ftjob)"}.get(key, f"data.{key}")
        was = manifest.get("settings", {}).get(key)
        raise BadInput(f"{name}: changed since this run's data was prepared ({was!r} -> {settings[key]!r}) and "
                       "the run has checkpoints; resuming on other data would be another run: put the setting "
                       "back, or start over with --restart")
    if manifest.get("source_identity") != source_identity(spec):
        log.warning("data.database %s changed since this run's data was prepared (%s); the run keeps its own "
                    "prepared data in %s (use --restart to prepare it again)", spec.data.database,
                    manifest.get("created"), paths.data)


def data_ready_mark() -> str:
    """Who said the data is ready: node 0's `ftjob` process of this attempt (its heartbeat names it too)."""
    from .rundir import hostname

    return f"{hostname()}:{os.getpid()}"


def wait_for_manifest(paths: RunPaths, watch: PeerWatch, timeout_s: float = 4 * 3600,
                      poll_s: float = 1.0) -> dict | None:
    """Nodes other than rank 0 wait for rank 0's data (shared volume) instead of preparing it again: until
    node 0 of this attempt (alive in its heartbeat) has marked the data ready. State left by an earlier
    attempt (a "failed", an old manifest) is not taken for this one's."""
    start = time.monotonic()
    last_note = 0.0
    while True:
        problem = watch.problem()
        if problem:
            raise JobError(f"{problem} while this node waited for its data; stopping")
        node0, manifest = watch.alive(0), read_manifest(paths)
        if node0 and manifest and read_state(paths).get("data_ready_for") == f"{node0['host']}:{node0['pid']}":
            return manifest
        if watch.finished(0):
            log.info("node 0 finished this attempt without training (already trained?); nothing to do here")
            return None
        if time.monotonic() - start > timeout_s:
            raise JobError(f"waited {timeout_s:.0f}s for node 0 to write {paths.manifest}; is node 0 running and "
                           "is the output directory a shared volume?")
        if time.monotonic() - last_note > 60:
            log.info("waiting for node 0 to prepare the data (%s)", paths.manifest)
            last_note = time.monotonic()
        time.sleep(poll_s)


# ================================================================== train


def train_stage(spec: JobSpec, paths: RunPaths, node: NodeInfo, verbose: bool = False,
                watch: PeerWatch | None = None) -> int:
    from .progress import mode as progress_mode
    from .train.launch import Launch, launcher_command, worker_env

    if node.node_rank == 0:
        _prepare_resume(spec, paths, node)
        write_state(paths, stage=Stage.TRAIN, nnodes=node.nnodes, procs_per_node=node.procs_per_node,
                    accelerator=node.accelerator)
    bar = progress_mode() == "bar"
    for tries in range(1, PORT_TRIES + 1):
        launch = Launch(launcher_command(paths, node, verbose), worker_env(node, progress_events=bar), node,
                        paths.log_file(node.node_rank), verbose, watch,
                        on_tick=_report_when_evaluated(paths) if node.node_rank == 0 else None, bar=bar)
        code = launch.run()
        if not _port_taken(launch) or launch.signalled or not node.port_is_ours or tries == PORT_TRIES:
            break
        # free_port() only found a port free at that moment: another process bound it before rank 0 did.
        port = cluster.free_port()
        log.warning("port %d was taken by another process before the workers could bind it; launching again on "
                    "port %d", node.master_port, port)
        node = dataclasses.replace(node, master_port=port)
    return _training_outcome(paths, node, launch, code, watch)


PORT_TRIES = 3  # launches on a port ftjob chose, each taken by someone else before the workers bound it


def _port_taken(launch) -> bool:
    return bool(launch.worker_error) and launch.worker_error["code"] == errors.PORT_TAKEN


def _training_outcome(paths: RunPaths, node: NodeInfo, launch, code: int, watch: PeerWatch | None) -> int:
    if code == errors.PEER_LOST and watch and not launch.peer_problem:
        # Our workers stopped because another node's did: name that node, whose `ftjob` writes its exit
        # status into its heartbeat file as it ends (or whose heartbeat stops).
        deadline = time.monotonic() + watch.timeout_s
        while launch.peer_problem is None and time.monotonic() < deadline:
            time.sleep(0.5)
            launch.peer_problem = watch.problem()
    if launch.peer_problem:
        last = newest_complete(paths.checkpoints, verify=False)
        raise JobError(f"{launch.peer_problem}; this node stopped too. Run the job again: it resumes from "
                       f"{last.name if last else 'the start'}")
    if code == errors.OK:
        return errors.OK
    if _port_taken(launch):
        why = (f"the {PORT_TRIES}th free port ftjob chose that another process took before the workers bound it"
               if node.port_is_ours else f"the port came from {node.port_source}")
        raise JobError(f"{launch.worker_error['message']} ({why}); set MASTER_PORT to a free port, or free this "
                       "one, then run again")
    if launch.worker_error:  # one worker's JobError: its own line, its own exit code
        raise errors.from_code(launch.worker_error["code"], launch.worker_error["message"])
    state = read_state(paths)
    if launch.signalled or state.get("stage") == Stage.PREEMPTED or code == errors.PREEMPTED:
        # The launcher exits 1 when it is signalled, whatever the workers did: the state file says
        # whether they got to write their checkpoint.
        _say_where_it_resumes(paths, state)
        return errors.PREEMPTED
    if code in (errors.DIVERGED, errors.LOCKED):
        return code
    if code == errors.PEER_LOST:
        if node.nnodes > 1:
            raise JobError("another rank stopped and this node's workers with it; see the other nodes' logs")
        raise JobError(f"a worker ended without an error of its own (killed? out of memory?) and the others "
                       f"stopped with it; see {paths.log_file(node.node_rank)}")
    if node.node_rank == 0:
        write_state(paths, stage=Stage.FAILED, exit_code=code)
    raise JobError(f"training failed (the launcher exited {code}); the workers' error is above and in "
                   f"{paths.log_file(node.node_rank)}")


def _say_where_it_resumes(paths: RunPaths, state: dict) -> None:
    last = newest_complete(paths.checkpoints, verify=False)
    step = state.get("step")
    if last is not None and last.name == state.get("checkpoint") and last.name.endswith(f"{step or 0:08d}"):
        log.info("preempted at step %s: checkpoint %s is complete; run the same command again to resume from it",
                 step, last.name)
    else:
        log.warning("preempted at step %s before a checkpoint at that step was complete; the run will resume "
                    "from %s", step, last.name if last else "the start (no checkpoint yet)")


def _report_when_evaluated(paths: RunPaths):
    """A callback for the launch loop: rewrite report.md and loss.png whenever eval.jsonl grew, here in
    the `ftjob` process, so the workers spend no training time on plotting."""
    seen = [paths.evals.stat().st_size if paths.evals.exists() else 0]

    def tick():
        size = paths.evals.stat().st_size if paths.evals.exists() else 0
        if size != seen[0]:
            seen[0] = size
            with contextlib.suppress(Exception):  # a report is a convenience; never the reason a run fails
                report_stage(paths, quiet=True)
    return tick


def _check_one_batch(spec: JobSpec, node: NodeInfo, blocks: int) -> None:
    """The workers' own check, made before starting them: one error line instead of one per rank."""
    world, mb = node.world_size, spec.train.micro_batch
    if blocks < world * mb:
        raise BadInput(f"data: {blocks} training blocks are fewer than one batch across ranks ({world} ranks x "
                       f"train.micro_batch {mb}); add rows, or lower train.micro_batch, data.block_size or the "
                       "number of processes")


def _prepare_resume(spec: JobSpec, paths: RunPaths, node: NodeInfo) -> None:
    """A checkpoint written by another number of processes: check that the run's global batch still
    divides (the workers keep it by changing gradient accumulation), convert it to DeepSpeed's universal
    form once, and say what changed."""
    from .train.optim import grad_accum_for

    last = newest_complete(paths.checkpoints, verify=False)
    if last is None:
        return
    state = json.loads((last / "trainer_state.json").read_text())
    if state.get("world_size", node.world_size) == node.world_size:
        return
    problem = verify_checkpoint(last)
    if problem:
        raise BadInput(f"checkpoint {last.name} is damaged ({problem}); remove it to resume from an older one")
    accum = grad_accum_for(state["global_batch"], node.world_size, spec.train.micro_batch)
    log.info("the number of processes changed since %s: %d -> %d; gradient accumulation %d -> %d keeps %d "
             "sequences per step", last.name, state["world_size"], node.world_size, state.get("grad_accum", 0),
             accum, state["global_batch"])
    from .train.checkpoint import to_universal

    with writing(last, f"the universal form of {last.name}", paths):
        to_universal(last, spec.train.optimizer, spec.train.zero_stage)


def already_trained(paths: RunPaths, spec: JobSpec) -> bool:
    if not (paths.final / "config.json").exists() or read_state(paths).get("stage") not in FINISHED:
        return False
    try:
        previous = _load(paths.spec, [])
    except JobError:
        return False
    return previous.train == spec.train and previous.data == spec.data and previous.model == spec.model


# ================================================================== export best, generate, report


def export_best_stage(spec: JobSpec, paths: RunPaths) -> None:
    """best/: the weights of the lowest validation loss. The same files as final/ (hard links) when the
    best evaluation was the last one; otherwise exported from the best checkpoint."""
    from .train.export import export_checkpoint

    best = read_best(paths)
    if best is None:
        return
    ckpt = paths.checkpoints / best["checkpoint"]
    final_step = read_state(paths).get("step")
    with writing(paths.best, "the best model", paths):
        if best["step"] == final_step and (paths.final / "config.json").exists():
            with atomic_dir(paths.best) as tmp:
                for f in paths.final.iterdir():
                    try:
                        os.link(f, tmp / f.name)
                    except OSError:
                        shutil.copy2(f, tmp / f.name)
        else:
            export_checkpoint(ckpt, paths.best, spec, replace=True)
    atomic_write(paths.best / "ftjob-best.json", json.dumps(best))
    log.info("best model: step %d, validation loss %.4f -> %s", best["step"], best["loss"], paths.best)


def generate_stage(spec: JobSpec, paths: RunPaths, model_dir: Path | None = None, name: str = "after") -> Path:
    from .generate import log_samples, samples_from_directory, write_samples

    model_dir = model_dir or paths.final
    if not (model_dir / "config.json").exists():
        raise BadInput(f"no model in {model_dir}; train first (`ftjob train` or `ftjob run`)")
    write_state(paths, stage=Stage.GENERATE)
    records = samples_from_directory(model_dir, spec.generation)
    with writing(paths.samples, f"samples/{name}", paths):
        path = write_samples(records, paths.samples, name, weights=str(model_dir))
    log_samples(records, name)
    return path


def report_stage(paths: RunPaths, quiet: bool = False) -> Path:
    from .report import write_report

    with writing(paths.report, "the report", paths):
        path = write_report(paths)
    if not quiet:
        log.info("report: %s", path)
    return path
