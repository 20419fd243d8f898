"""The job spec: typed sections, loaded from YAML with `--set key.path=value` overrides.

Validation is strict (unknown keys are errors, with a "did you mean") because a misspelt key that is
silently ignored costs a whole cluster run. Every error names the dotted key and, when the key came from
the file, the file's line.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import SpecError


def _check(**rules):
    """Field metadata: positive=True, min=..., max=..., nonempty=True."""
    return rules


@dataclass
class DataSpec:
    database: str = ""  # path to the SQLite file
    table: Optional[str] = None  # read `text_column` from this table ...
    text_column: str = "text"
    query: Optional[str] = None  # ... or from one read-only SELECT returning the text as its first column
    limit: Optional[int] = field(default=None, metadata=_check(positive=True))  # first N rows (rowid order)
    valid_fraction: float = field(default=0.2, metadata=_check(min=0.0, max=0.9))
    split_seed: int = 0  # sklearn train_test_split random_state; 0 reproduces the original run
    shards: int = field(default=4, metadata=_check(positive=True))
    block_size: int = field(default=64, metadata=_check(positive=True))
    join: Literal["newline", "eos"] = "newline"  # what separates documents in the token stream
    chunk_rows: int = field(default=2000, metadata=_check(positive=True))  # rows per SQLite fetch
    workers: int = field(default=0, metadata=_check(min=0))  # tokenizer processes; 0 = one per core


@dataclass
class ModelSpec:
    path: str = ""  # local directory or Hugging Face id (resolved offline from the local cache)
    tokenizer: Optional[str] = None  # defaults to `path`
    # A fresh, randomly initialised GPT-2 from these GPT2Config fields (smoke runs, training from
    # scratch); the tokenizer still comes from `tokenizer` or `path`.
    from_config: Optional[dict] = None


@dataclass
class TrainSpec:
    epochs: Optional[float] = field(default=1, metadata=_check(positive=True))
    max_steps: Optional[int] = field(default=None, metadata=_check(positive=True))  # wins over epochs
    micro_batch: int = field(default=8, metadata=_check(positive=True))  # sequences per device per micro-step
    grad_accum: int = field(default=1, metadata=_check(positive=True))
    lr: float = field(default=2e-4, metadata=_check(positive=True))
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    weight_decay: float = field(default=0.0, metadata=_check(min=0.0))
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = field(default=0, metadata=_check(min=0))
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    zero_stage: int = field(default=1, metadata=_check(min=0, max=3))
    grad_clip: float = field(default=1.0, metadata=_check(min=0.0))  # 0 disables clipping
    seed: int = 42
    checkpoint_every: int = field(default=1000, metadata=_check(positive=True))  # optimizer steps
    keep_checkpoints: int = field(default=2, metadata=_check(positive=True))
    eval_every: int = field(default=500, metadata=_check(min=0))  # 0: only before and after training
    sample_every: int = field(default=0, metadata=_check(min=0))  # 0: samples only before and after
    log_every: int = field(default=10, metadata=_check(positive=True))  # steps between metrics lines
    # fp16 guard: stop after this many consecutive steps with a non-finite loss or a skipped update
    max_bad_steps: int = field(default=50, metadata=_check(positive=True))
    # On divergence: stop (exit 4), or reload the last good checkpoint with a lower learning rate.
    on_divergence: Literal["stop", "rollback"] = "stop"
    rollback_lr_factor: float = field(default=0.5, metadata=_check(positive=True, max=1.0))
    max_rollbacks: int = field(default=3, metadata=_check(min=0))
    compile: bool = False  # torch.compile the model inside the engine (GPU)
    dropout: Optional[float] = field(default=None, metadata=_check(min=0.0, max=1.0))  # None: model's own


@dataclass
class GenerationSpec:
    prompts: list[str] = field(default_factory=lambda: ["Once upon a time"], metadata=_check(nonempty=True))
    do_sample: bool = True
    num_beams: int = field(default=2, metadata=_check(positive=True))
    temperature: float = field(default=1.5, metadata=_check(positive=True))
    top_p: float = field(default=0.9, metadata=_check(positive=True, max=1.0))
    max_length: int = field(default=30, metadata=_check(positive=True))
    num_return_sequences: int = field(default=1, metadata=_check(positive=True))
    seed: int = 42


@dataclass
class ResourcesSpec:
    accelerator: Literal["auto", "cuda", "cpu"] = "auto"
    procs_per_node: int = field(default=0, metadata=_check(min=0))  # 0: every GPU, or 2 processes on CPU
    nnodes: int = field(default=1, metadata=_check(positive=True))  # overridden by Slurm/Kubernetes env


@dataclass
class ReportSpec:
    tensorboard: bool = False
    log_interval_s: float = field(default=30.0, metadata=_check(positive=True))  # batch-log line period


@dataclass
class JobSpec:
    name: str = field(default="", metadata=_check(nonempty=True))
    output_dir: str = field(default="", metadata=_check(nonempty=True))  # the mounted volume
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    report: ReportSpec = field(default_factory=ReportSpec)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


REQUIRED = {"name", "output_dir", "data.database", "model.path"}


# ---------------------------------------------------------------- loading


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read, override and validate a spec file. Raises SpecError with the key and line."""
    path = Path(path)
    src = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("", f"spec file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError("", f"cannot read spec file {path}: {e}") from None
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
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
    spec = _build(JobSpec, raw, "", lines, source)
    _check_required(raw, lines, source)
    _check_cross_fields(spec, lines, source)
    return spec


def dump(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True)


def _resolve(base: Path, value: str) -> str:
    if not value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _key_lines(node, prefix: str = "") -> dict[str, int]:
    """Map every dotted key in the YAML document to its 1-based line."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, key + "."))
    return out


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise SpecError("", f"--set {item!r}: expected key.path=value, e.g. --set train.epochs=1")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(key, f"--set: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


_SENTINEL = object()


def _build(cls, raw: Any, prefix: str, lines: dict, source: str | None):
    if not isinstance(raw, dict):
        raise SpecError(prefix.rstrip("."), f"must be a section (mapping), got {_typename(raw)}",
                        lines.get(prefix.rstrip(".")), source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(fields)}"
            raise SpecError(f"{prefix}{key}", f"unknown key{hint}", lines.get(f"{prefix}{key}"), source)
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            continue
        value = raw[name]
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value if value is not None else {}, key + ".", lines, source)
        else:
            values[name] = _coerce(value, hint, key, lines.get(key), source)
            _check_rules(values[name], f.metadata, key, lines.get(key), source)
    return cls(**values)


def _coerce(value, hint, key, line, source):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, key, line, source)
    if origin is Literal:
        if value not in args:
            raise SpecError(key, f"must be one of {', '.join(map(str, args))}; got {value!r}", line, source)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(key, f"must be a list, got {_typename(value)}", line, source)
        return [_coerce(v, args[0], f"{key}[{i}]", line, source) for i, v in enumerate(value)]
    if hint is dict:
        if not isinstance(value, dict):
            raise SpecError(key, f"must be a mapping, got {_typename(value)}", line, source)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(key, f"must be true or false, got {value!r}", line, source)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(key, f"must be an integer, got {value!r}", line, source)
        return value
    if hint is float:
        # YAML reads 2e-4 as a string (it wants 2.0e-4); accept what a person means.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(key, f"must be a number, got {value!r}", line, source)
        if value != value or value in (float("inf"), float("-inf")):
            raise SpecError(key, f"must be a finite number, got {value!r}", line, source)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SpecError(key, f"must be a string, got {_typename(value)} {value!r}", line, source)
        return value
    raise TypeError(f"unsupported spec type {hint} for {key}")  # a bug in this file, not user input


def _check_rules(value, rules, key, line, source):
    if value is None or not rules:
        return
    if rules.get("nonempty") and (len(value) == 0 or (isinstance(value, list) and not all(
            str(v).strip() for v in value)) or (isinstance(value, str) and not value.strip())):
        raise SpecError(key, "must not be empty", line, source)
    if isinstance(value, (int, float)):
        if rules.get("positive") and value <= 0:
            raise SpecError(key, f"must be greater than 0, got {value}", line, source)
        if "min" in rules and value < rules["min"]:
            raise SpecError(key, f"must be at least {rules['min']}, got {value}", line, source)
        if "max" in rules and value > rules["max"]:
            raise SpecError(key, f"must be at most {rules['max']}, got {value}", line, source)


def _check_required(raw: dict, lines, source):
    for key in sorted(REQUIRED):
        node: Any = raw
        for part in key.split("."):
            node = node.get(part, _SENTINEL) if isinstance(node, dict) else _SENTINEL
        if node is _SENTINEL or node in (None, ""):
            raise SpecError(key, "is required", lines.get(key), source)


def _check_cross_fields(spec: JobSpec, lines, source):
    d = spec.data
    if d.query and d.table:
        raise SpecError("data.query", "give either data.table (with data.text_column) or data.query, not both",
                        lines.get("data.query"), source)
    if not d.query and not d.table:
        raise SpecError("data.table", "is required (or give data.query)", lines.get("data"), source)
    if spec.train.max_steps is None and spec.train.epochs is None:
        raise SpecError("train.epochs", "give train.epochs or train.max_steps", lines.get("train"), source)
    if len(spec.train.adam_betas) != 2 or not all(0 <= b < 1 for b in spec.train.adam_betas):
        raise SpecError("train.adam_betas", "must be two numbers in [0, 1), e.g. [0.9, 0.999]",
                        lines.get("train.adam_betas"), source)
    if "/" in spec.name or spec.name in (".", ".."):
        raise SpecError("name", f"must be a plain directory name, got {spec.name!r}", lines.get("name"), source)
    g = spec.generation
    if g.do_sample is False and g.num_return_sequences > g.num_beams:
        raise SpecError("generation.num_return_sequences", "greedy/beam search cannot return more sequences "
                        "than generation.num_beams", lines.get("generation.num_return_sequences"), source)


def _typename(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "a boolean", type(None): "nothing (null)"}.get(type(value), type(value).__name__)
