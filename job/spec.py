"""The job spec: pydantic models, one per section, loaded from YAML with `--set key.path=value` overrides.

Validation is strict (unknown keys are errors, with a "did you mean"; no silent type coercion) because a
misspelt key that is silently ignored costs a whole cluster run. Every error is one line that names the
dotted key and, when the key came from the file, the file's line: `spec.yaml:14: data.shard: unknown key;
did you mean 'shards'?`. Every field's description is the reference documentation of that key.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from .errors import SpecError, permission_denied


def _number(value):
    """YAML 1.1 reads `2e-4` as a string (it wants 2.0e-4); accept what a person means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


Number = Annotated[float, BeforeValidator(_number)]


# train.eval_blocks: auto: all evaluations together cover this share of the blocks the run trains ...
EVAL_AUTO_SHARE = 0.5
EVAL_MIN_BLOCKS = 256  # ... and each at least this many (a mean loss within about 1% at block 64)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class DataSpec(Section):
    database: str = Field(min_length=1, description="path to the SQLite file")
    table: Optional[str] = Field(None, description="read `text_column` from this table ...")
    text_column: str = Field("text", description="the column that holds the documents' text")
    query: Optional[str] = Field(None, description="... or one read-only SELECT whose first column is the text")
    limit: Optional[int] = Field(None, gt=0, description="only the first N rows (in the table's order)")
    valid_fraction: Number = Field(0.2, ge=0.0, le=0.9, description="share of documents held out for validation")
    split_seed: int = Field(0, description="sklearn train_test_split random_state; 0 reproduces the original run")
    shards: int = Field(4, gt=0, description="text/token shards per split (files only: tokenising runs on "
                        "data.workers processes whatever the number)")
    block_size: int = Field(64, gt=0, description="tokens per training sequence")
    join: Literal["auto", "newline", "eos", "bos_eos"] = Field(
        "auto", description="how each document starts and ends in the token stream: newline (after it), eos "
        "(EOS after it), bos_eos (BOS before, EOS after); auto: the model family's default (see Model families)")
    chunk_rows: int = Field(2000, gt=0, description="rows per SQLite fetch")
    workers: int = Field(0, ge=0, description="tokenising processes; 0: one per core (or none beside the job's "
                         "own for under 16 MB of text)")


class ModelSpec(Section):
    path: str = Field(min_length=1, description="local directory or Hugging Face id already in the local cache")
    tokenizer: Optional[str] = Field(None, description="tokenizer directory or id; defaults to `path`")
    from_config: Optional[dict] = Field(None, description="a config instead of weights: `model_type` (any "
                                        "family transformers knows; gpt2 without one) and that family's "
                                        "fields; trains a fresh, randomly initialised model (smoke runs, "
                                        "training from scratch); the tokenizer still comes from `tokenizer` or "
                                        "`path`")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="attention kernel; auto: the family's own choice in transformers (sdpa, or eager "
        "where the family needs it); flash_attention_2 needs the flash-attn package and a GPU")


class TrainSpec(Section):
    epochs: Optional[Number] = Field(1, gt=0, description="passes over the training blocks")
    max_steps: Optional[int] = Field(None, gt=0, description="optimizer steps; wins over epochs")
    micro_batch: int = Field(8, gt=0, description="sequences per process per micro-step")
    grad_accum: int = Field(1, gt=0, description="micro-steps per optimizer step")
    global_batch: Optional[int] = Field(None, gt=0, description="sequences per optimizer step; when set, "
                                        "grad_accum is derived from it and the number of processes, so the "
                                        "batch stays the same on any number of GPUs")
    lr: Number = Field(2e-4, gt=0, description="peak learning rate")
    optimizer: Literal["adamw", "adafactor"] = Field("adamw", description="torch AdamW (fused on GPU), or "
                                                     "Adafactor as HF Trainer's optim='adafactor' builds it")
    weight_decay: Number = Field(0.0, ge=0.0, description="decoupled weight decay")
    adam_betas: list[Number] = Field(default_factory=lambda: [0.9, 0.999], description="AdamW's (beta1, beta2)")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field("auto", description="auto: fp16 on GPU (the "
                                                                "original run; the plan and the run warn where "
                                                                "the model needs bf16), fp32 on CPU")
    zero_stage: int = Field(1, ge=0, le=3, description="DeepSpeed ZeRO stage")
    offload: Literal["none", "optimizer", "all"] = Field(
        "none", description="DeepSpeed ZeRO-Offload: optimizer keeps the fp32 master weights and optimizer "
        "states in host memory and steps there (ZeRO 1-3); all moves the parameters there too (ZeRO 3)")
    grad_clip: Number = Field(1.0, ge=0.0, description="max gradient norm; 0 disables clipping")
    seed: int = Field(42, description="model init, dropout and data order (each rank adds its rank)")
    checkpoint_every: int = Field(1000, gt=0, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, gt=0, description="newest complete checkpoints kept (the best is kept too)")
    eval_every: int = Field(500, ge=0, description="steps between validation passes; 0: only before and after")
    eval_blocks: Union[int, str] = Field("auto", description="validation blocks each evaluation covers: a fixed, "
                                         "seeded subset, the same every time and across resumes; auto: half as "
                                         f"many as the run trains, spread over its evaluations (at least "
                                         f"{EVAL_MIN_BLOCKS}), so evaluating costs about a sixth of training; "
                                         "0: all")
    final_eval: Literal["subset", "full"] = Field("subset", description="full: after the last evaluation, one "
                                                  "more pass over every validation block (its own record in "
                                                  "eval.jsonl)")
    sample_every: int = Field(0, ge=0, description="steps between sample generations; 0: only before and after")
    log_every: int = Field(10, gt=0, description="steps between metrics records")
    early_stopping_patience: int = Field(0, ge=0, description="stop after this many evaluations without an "
                                         "improvement of early_stopping_min_delta; 0: never stop early")
    early_stopping_min_delta: Number = Field(0.0, ge=0.0, description="validation loss drop that counts as better")
    max_bad_steps: int = Field(50, gt=0, description="fp16 guard: stop after this many consecutive skipped "
                               "(overflowed) updates")
    on_divergence: Literal["stop", "rollback"] = Field("stop", description="NaN/inf loss: stop (exit 4), or "
                                                       "reload the last good checkpoint with a lower lr")
    rollback_lr_factor: Number = Field(0.5, gt=0, le=1.0, description="lr multiplier per rollback")
    max_rollbacks: int = Field(3, ge=0, description="rollbacks before a divergence stops the run")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, "
                                         "about a third more compute")
    compile: bool = Field(False, description="torch.compile the model inside the engine (GPU)")
    dropout: Optional[Number] = Field(None, ge=0.0, le=1.0, description="override the model's dropout")

    @field_validator("eval_blocks")
    @classmethod
    def _blocks_or_auto(cls, value):
        if value == "auto" or (isinstance(value, int) and value >= 0):
            return value
        raise ValueError(f"must be a number of blocks, 0 (all) or auto; got {value!r}")

    def eval_blocks_for(self, valid_blocks: int, trained_blocks: int, evaluations: int) -> int:
        """How many validation blocks each evaluation covers (the worker and `ftjob plan` both ask here).
        auto: all evaluations together cover half the blocks the run trains; a forward pass costs a third
        of a training step per block, so evaluating costs about a sixth of training."""
        if self.eval_blocks == "auto":
            want = max(EVAL_MIN_BLOCKS, math.ceil(EVAL_AUTO_SHARE * trained_blocks / max(1, evaluations)))
        else:
            want = self.eval_blocks or valid_blocks
        return min(valid_blocks, want)


class GenerationSpec(Section):
    prompts: list[str] = Field(default_factory=lambda: ["Once upon a time"], min_length=1,
                               description="texts the samples start from (before, during and after training)")
    do_sample: bool = Field(True, description="sample; false: greedy or beam search")
    num_beams: int = Field(2, gt=0, description="beams (1: no beam search)")
    temperature: Number = Field(1.5, gt=0, description="sampling temperature")
    top_p: Number = Field(0.9, gt=0, le=1.0, description="nucleus sampling mass")
    max_length: int = Field(30, gt=0, description="tokens, the prompt included (as in the original run)")
    num_return_sequences: int = Field(1, gt=0, description="samples per prompt")
    seed: int = Field(42, description="sampling seed (each prompt adds its index)")

    @field_validator("prompts")
    @classmethod
    def _no_empty_prompt(cls, prompts: list[str]) -> list[str]:
        if not all(p.strip() for p in prompts):
            raise ValueError("must not be empty")
        return prompts


class ResourcesSpec(Section):
    accelerator: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: cuda where a GPU is visible")
    procs_per_node: int = Field(0, ge=0, description="processes per node; 0: one per GPU, or 2 on CPU")
    nnodes: int = Field(1, gt=0, description="nodes; NNODES / Slurm / Kubernetes variables win")
    node_timeout_s: Number = Field(120.0, gt=0, description="a node whose heartbeat stops this long is "
                                   "taken for dead and the other nodes stop")
    collective_timeout_s: Number = Field(1800.0, gt=0, description="longest wait inside one collective")
    lock_heartbeat_s: Number = Field(30.0, gt=0, description="run-directory lock heartbeat; a lock from "
                                     "another host silent for 3 of these is taken over; a new job waits up to 3 "
                                     "of these for an earlier attempt's workers to exit")


class ReportSpec(Section):
    tensorboard: bool = Field(False, description="event files under tensorboard/")
    log_interval_s: Number = Field(30.0, gt=0, description="period of progress lines in batch logs")


def _section(value):
    return {} if value is None else value  # `train:` with nothing under it means the defaults


Sect = lambda cls: Annotated[cls, BeforeValidator(_section)]  # noqa: E731


class JobSpec(Section):
    name: str = Field(min_length=1, description="the run directory is output_dir/name")
    output_dir: str = Field(min_length=1, description="the mounted volume")
    data: Sect(DataSpec)
    model: Sect(ModelSpec)
    train: Sect(TrainSpec) = Field(default_factory=TrainSpec)
    generation: Sect(GenerationSpec) = Field(default_factory=GenerationSpec)
    resources: Sect(ResourcesSpec) = Field(default_factory=ResourcesSpec)
    report: Sect(ReportSpec) = Field(default_factory=ReportSpec)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if "/" in name or name in (".", ".."):
            raise ValueError(f"must be a plain directory name, got {name!r}")
        return name

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        return self.model_dump()


# ---------------------------------------------------------------- loading


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read, override and validate a spec file. Raises SpecError with the key and line."""
    path = Path(path)
    src = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("", f"spec file not found: {path}") from None
    except PermissionError:
        raise permission_denied("spec file", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError("", f"cannot read spec file {path}: {e}") from None
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text), src)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError("", f"not valid YAML: {problem}", mark.line + 1 if mark else None, src) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError("", "the spec must be a YAML mapping (key: value lines)", 1, src)
    for item in overrides:
        _apply_override(raw, item)
    spec = from_dict(raw, lines, src)
    # Relative paths in a spec are relative to the spec file, so a spec works from any directory.
    base = path.resolve().parent
    spec.data.database = _resolve(base, spec.data.database)
    spec.output_dir = _resolve(base, spec.output_dir)
    for attr in ("path", "tokenizer"):
        value = getattr(spec.model, attr)
        if value and (value.startswith((".", "/", "~")) or (base / value).exists()):
            setattr(spec.model, attr, _resolve(base, value))
    return spec


def from_dict(raw: dict, lines: dict[str, int] | None = None, source: str | None = None) -> JobSpec:
    lines = lines or {}
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise _spec_error(e.errors()[0], lines, source) from None
    _check_cross_fields(spec, lines, source)
    return spec


def dump(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True)


def reference_rows(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[str]:
    """README's spec reference: one markdown row per key (key, default, description)."""
    out = []
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, Section):
            out += reference_rows(f.annotation, f"{prefix}{name}.")
            continue
        default = f.get_default(call_default_factory=True)
        shown = "required" if f.is_required() else "—" if default is None else f"`{default}`"
        out.append(f"| `{prefix}{name}` | {shown} | {f.description or ''} |")
    return out


def field_docs(model: type[BaseModel] = JobSpec, prefix: str = "") -> dict[str, str]:
    """Every key's dotted name -> its description, for the README's spec reference."""
    out = {}
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, Section):
            out.update(field_docs(f.annotation, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = f.description or ""
    return out


# ---------------------------------------------------------------- errors as one line


def _spec_error(err: dict, lines: dict, source: str | None) -> SpecError:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(p for p in loc if not p.isdigit())
    value = err.get("input")
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        message = f"unknown key; did you mean '{close[0]}'?" if close else f"unknown key; allowed: {', '.join(allowed)}"
    elif kind == "missing":
        message = "is required"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        message = f"must be an integer, got {value!r}"
    elif kind in ("float_type", "float_parsing"):
        message = f"must be a number, got {value!r}"
    elif kind == "finite_number":
        message = f"must be a finite number, got {value!r}"
    elif kind == "bool_type":
        message = f"must be true or false, got {value!r}"
    elif kind == "string_type":
        message = f"must be a string, got {_typename(value)} {value!r}"
    elif kind == "list_type":
        message = f"must be a list, got {_typename(value)}"
    elif kind in ("model_type", "dict_type"):
        message = f"must be a {'section (mapping)' if kind == 'model_type' else 'mapping'}, got {_typename(value)}"
    elif kind == "literal_error":
        choices = ", ".join(a.strip("'") for a in ctx.get("expected", "").replace(" or ", ", ").split(", "))
        message = f"must be one of {choices}; got {value!r}"
    elif kind == "greater_than":
        message = f"must be greater than {ctx['gt']}, got {value}"
    elif kind == "greater_than_equal":
        message = f"must be at least {ctx['ge']}, got {value}"
    elif kind in ("less_than_equal", "less_than"):
        message = f"must be at most {ctx.get('le', ctx.get('lt'))}, got {value}"
    elif kind in ("too_short", "string_too_short"):
        message = "must not be empty"
    elif kind == "value_error":
        message = str(ctx.get("error", err["msg"]))
    else:
        message = err["msg"]
    if len(loc) > 1 and loc[-1].isdigit():
        key = f"{key}[{loc[-1]}]"
    line = lines.get(key.split("[")[0]) or lines.get(".".join(key.split(".")[:-1]))
    return SpecError(key, message, line, source)


def _fields_at(loc: list[str]) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in loc:
        model = model.model_fields[part].annotation
    return list(model.model_fields)


def _check_cross_fields(spec: JobSpec, lines, source):
    d, t, g = spec.data, spec.train, spec.generation
    if d.query and d.table:
        raise SpecError("data.query", "give either data.table (with data.text_column) or data.query, not both",
                        lines.get("data.query"), source)
    if not d.query and not d.table:
        raise SpecError("data.table", "is required (or give data.query)", lines.get("data"), source)
    if t.max_steps is None and t.epochs is None:
        raise SpecError("train.epochs", "give train.epochs or train.max_steps", lines.get("train"), source)
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise SpecError("train.adam_betas", "must be two numbers in [0, 1), e.g. [0.9, 0.999]",
                        lines.get("train.adam_betas"), source)
    if t.offload == "all" and t.zero_stage != 3:
        raise SpecError("train.offload", f"all (parameters too) needs train.zero_stage: 3, not {t.zero_stage}; "
                        "use train.offload: optimizer", lines.get("train.offload"), source)
    if t.offload != "none" and t.zero_stage == 0:
        raise SpecError("train.offload", "needs train.zero_stage 1, 2 or 3 (ZeRO-Offload partitions the "
                        "optimizer)", lines.get("train.offload"), source)
    if g.do_sample is False and g.num_return_sequences > g.num_beams:
        raise SpecError("generation.num_return_sequences", "greedy/beam search cannot return more sequences "
                        "than generation.num_beams", lines.get("generation.num_return_sequences"), source)


def _resolve(base: Path, value: str) -> str:
    if not value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _key_lines(node, source: str, prefix: str = "") -> dict[str, int]:
    """Map every dotted key in the YAML document to its 1-based line. A key given twice is an error:
    YAML would keep the last one silently."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
            if key in out:
                raise SpecError(key, f"given twice (lines {out[key]} and {line}); keep one", line, source)
            out[key] = line
            out.update(_key_lines(value_node, source, key + "."))
    return out


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise SpecError("", f"--set {item!r}: expected key.path=value, e.g. --set train.epochs=1")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(key, f"--set: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def _typename(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "a boolean", type(None): "nothing (null)"}.get(type(value), type(value).__name__)
