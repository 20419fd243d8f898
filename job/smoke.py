"""`ftjob smoke SPEC`: the user's own production spec, proven end to end at toy size on a CPU runner before
any GPU hour is spent. The spec needs no edits; the run directories are a scratch directory's, never the
spec's output volume.

The stages, in order, each timed and each a row of the verdict (and of `smoke.json`):

  spec     the spec and its --set overrides, read and checked as `ftjob run` reads them
  model    the spec's model family and tokenizer, shrunk: its config.json only (never the weights) at toy size
           (pretrained.toy_config: 2 layers, width 64), trained from fresh weights as model.from_config does
  data     the spec's database (or --database, a small fixture of the same schema), table or query, read-only,
           the first --rows rows, prepared with the spec's join, block size, split and shards
  train    the spec's optimizer, scheduler, ZeRO stage, offload, dropout, gradient checkpointing and global-
           batch logic; 2 CPU processes (gloo) in fp32 instead of fp16/bf16; SMOKE_STEPS steps with a
           checkpoint, an evaluation and samples on the way
  stop     the same run in a second directory, a SIGTERM at step STOP_AT (the worker signals itself at that
           step, as a scheduler's preemption would): exit 75 and a complete checkpoint of that step
  resume   the same command again: its per-step losses from the stop on must equal the uninterrupted run's
  export   final/ loaded back with plain transformers (AutoModelForCausalLM, AutoTokenizer) and sampled
  plan     `ftjob plan` for the real spec at its real size, printed beside the verdict

Exit 0 when every stage passed; else the failing stage's own exit code (2 for bad input, 74 for the volume,
1 for a resume whose losses differ, ...), named in the last line.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import errors, logs, pipeline, pretrained
from .errors import BadInput, JobError
from .rundir import RunPaths, atomic_write, newest_complete, read_jsonl, read_state

log = logging.getLogger("ftjob")

SMOKE_STEPS = 6
STOP_AT = 3
CHECKPOINT_EVERY = 2
EVAL_EVERY = 3
LOSS_TOLERANCE = 1e-6  # relative: the resumed run must reproduce the uninterrupted one's losses
MARKER = "smoke.json"


@dataclass
class Stage:
    name: str
    result: str = "not run"
    seconds: float = 0.0
    detail: str = ""
    exit_code: int = errors.OK


@dataclass
class Smoke:
    spec_file: str
    root: Path
    stages: list[Stage] = field(default_factory=list)
    plan_text: str = ""
    toy: dict = field(default_factory=dict)  # model.from_config of the shrunk model
    tokenizer: str = ""
    specs: dict = field(default_factory=dict)  # run name -> its scratch spec file

    def record(self) -> dict:
        failed = next((s for s in self.stages if s.result == "FAILED"), None)
        return {"spec": self.spec_file, "scratch": str(self.root), "ok": failed is None,
                "exit_code": failed.exit_code if failed else errors.OK,
                "stages": [asdict(s) for s in self.stages], "plan": self.plan_text}


def smoke(spec_file: str, overrides: list[str], rows: int = 2000, database: Path | None = None,
          out: Path = Path("ftjob-smoke"), gpus: int | None = None) -> int:
    from .spec import load

    real = load(spec_file, overrides)
    root = _scratch(Path(out).resolve() / real.name)
    run = Smoke(spec_file, root)
    steps = [("spec", lambda: f"{spec_file}: {real.name}; scratch {root} (the spec's output_dir is not touched)"),
             ("model", lambda: _model(run, real)),
             ("data", lambda: _data(run, real, rows, database)),
             ("train", lambda: _train(run, real)),
             ("stop", lambda: _stop(run)),
             ("resume", lambda: _resume(run)),
             ("export", lambda: _export(run)),
             ("plan", lambda: _plan(run, real, database, gpus))]
    for name, step in steps:
        stage = Stage(name)
        run.stages.append(stage)
        t0 = time.perf_counter()
        log.info("smoke: %s ...", name)
        try:
            with logs.console_level(logging.WARNING):  # the inner runs' lines are in their logs/ftjob.log
                stage.detail = step()
            stage.result = "ok"
        except JobError as e:
            stage.result, stage.detail, stage.exit_code = "FAILED", str(e), e.exit_code
        stage.seconds = round(time.perf_counter() - t0, 1)
        if stage.result == "FAILED":
            break
    record = run.record()
    atomic_write(root / MARKER, json.dumps(record, indent=1, ensure_ascii=False))
    print(verdict_text(record))
    if not record["ok"]:
        failed = next(s for s in run.stages if s.result == "FAILED")
        raise errors.from_code(failed.exit_code, f"smoke: stage {failed.name} failed: {failed.detail}")
    return errors.OK


def verdict_text(record: dict) -> str:
    rows = [(s["name"], s["result"], f"{s['seconds']:.1f}", s["detail"]) for s in record["stages"]]
    width = [max(len(r[i]) for r in rows + [("stage", "result", "seconds", "")]) for i in range(3)]
    lines = [record["plan"].rstrip("\n"), ""] if record["plan"] else []
    lines.append(f"{'stage':<{width[0]}}  {'result':<{width[1]}}  {'seconds':>{width[2]}}  detail")
    lines += [f"{a:<{width[0]}}  {b:<{width[1]}}  {c:>{width[2]}}  {d}" for a, b, c, d in rows]
    total = sum(s["seconds"] for s in record["stages"])
    lines.append(f"smoke {'passed' if record['ok'] else 'FAILED'} in {total:.0f}s; {record['scratch']}/{MARKER}")
    return "\n".join(lines)


# ------------------------------------------------------------------ stages


def _scratch(root: Path) -> Path:
    """A fresh scratch directory: an earlier smoke's is replaced, anything else is refused."""
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).exists() and not (root / "uninterrupted.yaml").exists():
            raise BadInput(f"smoke --out: {root} exists and is not an ftjob smoke directory; choose another --out")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _model(run: Smoke, real) -> str:
    config = pretrained.model_config(real.model)  # config.json (or from_config): no weights are read
    tokenizer = pretrained.load_tokenizer(real.model.tokenizer or real.model.path,
                                          "model.tokenizer" if real.model.tokenizer else "model.path")
    run.toy = {"model_type": config.model_type, **pretrained.toy_config(config)}
    run.tokenizer = real.model.tokenizer or real.model.path
    return (f"{config.model_type} at toy size from its config ({len(tokenizer):,}-token tokenizer, vocabulary "
            f"{config.vocab_size:,}, {pretrained.max_positions(config):,} positions kept; 2 layers x 64)")


def _data(run: Smoke, real, rows: int, database: Path | None) -> str:
    spec = _toy_spec(real, run, rows, database)
    run.specs = {name: _write_spec(run.root, spec, name) for name in ("uninterrupted", "resumed")}
    pipeline.prepare(str(run.specs["uninterrupted"]), [])
    prepared = run.root / "uninterrupted" / "data"
    shutil.copytree(prepared, run.root / "resumed" / "data")  # the same blocks for both runs
    manifest = json.loads((prepared / "manifest.json").read_text())
    s = manifest["splits"]
    return (f"{manifest['rows_read']:,} rows of {manifest['source']}; {s['train']['blocks']:,} / "
            f"{s['valid']['blocks']:,} blocks of {manifest['block_size']} (join {manifest['join']})")


def _train(run: Smoke, real) -> str:
    _expect(pipeline.run(str(run.specs["uninterrupted"]), []), errors.OK, "the uninterrupted run")
    state = read_state(RunPaths(run.root / "uninterrupted"))
    t = real.train
    return (f"{SMOKE_STEPS} steps, {state.get('world_size')} CPU processes, fp32 (the spec: {t.precision} on GPUs), "
            f"ZeRO-{t.zero_stage}, {t.optimizer}, {t.scheduler}" + (f", offload {t.offload}" if t.offload != "none" else ""))


def _stop(run: Smoke) -> str:
    faults = ",".join(x for x in (os.environ.get("FTJOB_FAULTS"), f"stop_at_step={STOP_AT}") if x)
    with _env(FTJOB_FAULTS=faults):
        code = pipeline.run(str(run.specs["resumed"]), [])
    _expect(code, errors.PREEMPTED, "the run stopped by SIGTERM")
    paths = RunPaths(run.root / "resumed")
    last = newest_complete(paths.checkpoints)
    if last is None or last.name != f"step-{STOP_AT:08d}":
        raise JobError(f"after the stop the newest complete checkpoint is {last.name if last else 'none'}, "
                       f"not step-{STOP_AT:08d}")
    return f"SIGTERM at step {STOP_AT}: exit 75, checkpoint {last.name} complete"


def _resume(run: Smoke) -> str:
    _expect(pipeline.run(str(run.specs["resumed"]), []), errors.OK, "the resumed run")
    want = {m["step"]: m["loss"] for m in read_jsonl(run.root / "uninterrupted" / "metrics.jsonl")}
    got = {m["step"]: m["loss"] for m in read_jsonl(run.root / "resumed" / "metrics.jsonl")}
    after = [s for s in sorted(want) if s > STOP_AT]
    if not after or [s for s in sorted(got) if s > STOP_AT] != after:
        raise JobError(f"the resumed run logged steps {sorted(got)}, the uninterrupted one {sorted(want)}")
    for step in after:
        if not math.isclose(got[step], want[step], rel_tol=LOSS_TOLERANCE, abs_tol=LOSS_TOLERANCE):
            raise JobError(f"resume is not exact: at step {step} the resumed run's loss is {got[step]:.7f}, the "
                           f"uninterrupted run's {want[step]:.7f}")
    return f"losses of steps {after[0]}-{after[-1]} equal the uninterrupted run's (tolerance {LOSS_TOLERANCE:g})"


def _export(run: Smoke) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run.root / "resumed" / "final"
    try:
        model = AutoModelForCausalLM.from_pretrained(final)
        tok = AutoTokenizer.from_pretrained(final)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the export is not loadable
        raise JobError(f"{final} does not load with plain transformers: {type(e).__name__}: {e}") from None
    enc = tok("Once", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if model.config.model_type != run.toy["model_type"] or out.shape[1] <= enc["input_ids"].shape[1]:
        raise JobError(f"{final} loaded as {model.config.model_type} and generated nothing")
    return f"{final} loads as {model.config.model_type} with AutoModelForCausalLM and generates"


def _plan(run: Smoke, real, database: Path | None, gpus: int | None) -> str:
    spec = real.model_copy(deep=True)
    if database is not None:
        spec.data.database = str(database)
    estimate = pipeline.make_plan(spec, gpus=gpus, free_bytes=None)  # the real volume is not on this runner
    run.plan_text = estimate.to_text()
    problems = [f.message for f in estimate.findings if f.severity == "error"]
    data = " (data figures from the fixture)" if database is not None else ""
    if problems:
        return f"printed above{data}; it names {len(problems)} problem(s) to fix before submitting: {problems[0]}"
    return f"printed above{data}: {estimate.chosen_memory.verdict} per {'GPU' if estimate.device != 'cpu' else 'process'}"


# ------------------------------------------------------------------ helpers


def _toy_spec(real, run: Smoke, rows: int, database: Path | None) -> dict:
    spec = real.to_dict()
    d, t = spec["data"], spec["train"]
    if database is not None:
        if not Path(database).is_file():
            raise BadInput(f"smoke --database: {database} is not a file")
        d["database"] = str(Path(database).resolve())
    d["limit"] = min(d["limit"] or rows, rows)
    spec["model"].update(path=run.tokenizer, tokenizer=run.tokenizer, from_config=run.toy)
    micro = min(t["micro_batch"], 2)
    t.update(precision="fp32", max_steps=SMOKE_STEPS, epochs=None, micro_batch=micro, checkpoint_every=CHECKPOINT_EVERY,
             eval_every=EVAL_EVERY, sample_every=EVAL_EVERY, log_every=1, early_stopping_patience=0, compile=False)
    if t["global_batch"]:  # the spec's global-batch logic, at 2 processes x micro x 2 accumulation
        t["global_batch"] = 2 * micro * 2
    else:
        t["grad_accum"] = min(t["grad_accum"], 2)
    spec["generation"]["max_length"] = min(spec["generation"]["max_length"], 16)
    spec["resources"].update(accelerator="cpu", procs_per_node=2, nnodes=1)
    spec["output_dir"] = str(run.root)
    return spec


def _write_spec(root: Path, spec: dict, name: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**spec, "name": name}, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _expect(code: int, want: int, what: str) -> None:
    if code != want:
        raise errors.from_code(code if code != errors.OK else errors.FAILED,
                               f"{what} exited {code}, not {want}; its log: the scratch run's logs/ftjob.log")


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
