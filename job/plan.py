"""`ftjob plan`: what a run will need before it is submitted: steps, memory per device, volume, time.

Everything here is arithmetic on plain values (a model config, the spec, the data manifest, the world size,
device memory, tokens/s, free bytes), so it runs on a login node in milliseconds and imports neither torch
nor DeepSpeed. Each figure says whether it is exact or an estimate:

- exact: steps (the worker's schedule), sequences and tokens per step, and the per-rank bytes of
  parameters, fp32 master weights, gradients held after backward and optimizer state tensors. These follow
  what DeepSpeed 0.19 builds for the job's optimizers (read in deepspeed/runtime/engine.py
  `_do_optimizer_sanity_check` / `_configure_*_optimizer`, fp16/unfused_optimizer.py,
  zero/stage_1_and_2.py, zero/stage3.py) and are checked against counted tensors in tests/unit/test_plan.py.
- traced: activations, the tensors autograd saves in one forward of the model itself, run on the meta
  device at the run's micro-batch, block and precision (job/architecture.py trace_activations: equal to
  the real CPU graph for most families, within a hidden-size tensor per layer for the rest, checked in
  tests/unit/test_families.py; on a GPU, attention as the fused kernels save it).
- estimates: the logits and communication buffers, the CUDA context, offloaded host memory, checkpoint and
  export sizes (within a few percent of real ones), and every time figure.

The model comes in as a job.architecture.Architecture (plain values: its parameters' shapes from the model
built on the meta device), so nothing here depends on a model family.

What DeepSpeed gives the optimizer to work on (this decides the optimizer state, Adafactor's most of all):

| ZeRO | precision | DeepSpeed wrapper | the optimizer updates | fp32 master |
|---|---|---|---|---|
| 0 | fp32 | none (the client optimizer as is) | the model's own tensors | none |
| 0 | fp16/bf16 | FP16_UnfusedOptimizer (torch AdamW is no FusedAdam) | fp32 copies, same shapes | 4 B/param |
| 1, 2 | any | DeepSpeedZeroOptimizer | one flat fp32 partition per rank | 4 B/param/world (also in fp32) |
| 3 | any | DeepSpeedZeroOptimizer_Stage3 | one flat fp32 partition per rank | 4 B/param/world (also in fp32*) |

*stage3.py means to reuse fp32 weights as their own master, but its test compares a torch.device with a
str (`tensor.device == self.device`), which is never true, so a copy is made in 0.19.8 (counted on 2 ranks
in tests/system/test_plan_real.py).

So Adafactor factors its second moment (a row and a column vector per 2-D tensor) only under ZeRO 0; under
ZeRO 1-3 the partition is 1-D and its second moment is as large as AdamW's.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

if TYPE_CHECKING:
    from .architecture import Architecture

GiB = 2**30
MiB = 2**20

# ------------------------------------------------------------------ reference figures and assumptions

RUGPT3SMALL = dict(model_type="gpt2", vocab_size=50264, n_positions=2048, n_embd=768, n_layer=12, n_head=12)
# Reference throughputs: measured on one H100 80GB with a random-init ruGPT3small shape (125M parameters),
# block 64, synthetic tokens. They are NOT ftjob measurements; a plan scales them by FLOPs per token.
REFERENCE_BLOCK = 64
REFERENCE_TOKENS_PER_S = {"deepspeed_zero1_fp16": 156_000.0, "hf_trainer_original": 65_000.0}
# Training FLOPs per token of that reference shape at its block (Architecture.flops_per_token): 6 x its
# 123,658,752 parameters in matrix products (125,231,616 less the 2,048 x 768 learned positions) + 12 x 12
# layers x 768 x 64.
REFERENCE_FLOPS_PER_TOKEN = 6 * (125_231_616 - 2048 * 768) + 12 * 12 * 768 * REFERENCE_BLOCK
REFERENCE_LABEL = ("reference, not an ftjob measurement: DeepSpeed ZeRO-1 fp16 on one H100 80GB, "
                   "125M GPT-2 shape, block 64: 156K tokens/s (HF Trainer, the original settings: 65K)")
# One complete checkpoint of the 125M shape (ZeRO-1, AdamW, 2.0 GB) written with its sha256 and fsync in
# 7.2 s on the project's 2-core CPU machine (`ftjob bench --only checkpoint`): write, hash, fsync included.
CHECKPOINT_WRITE_BYTES_PER_S = 2.0e9 / 7.2
# `ftjob prepare` runs at the tokenizer's speed on every core: a 32K byte-level BPE tokenises 2-3 MB of text
# per second per core, prepare kept 0.98 of it (BENCHMARKS.md, 2026-12-06: 2.4 MB/s per core on 2 shared
# cores); 1.5 leaves room for slower tokenizers. Its one reading process reads and decodes 100-300 MB/s,
# the cap on machines of very many cores.
PREPARE_BYTES_PER_S_PER_CORE = 1.5e6
PREPARE_READ_BYTES_PER_S = 300e6
EVAL_SPEEDUP = 2.0  # forward-only tokens/s vs training: 3x by FLOPs, 2x allowing for per-batch overhead
STARTUP_S = 120.0  # launcher, imports, model load, DeepSpeed init (the first CPU run also builds a ~1 min op)
SAMPLE_ROUND_S = 10.0  # one round of generation.prompts (before, every sample_every, after)
TIME_MARGIN = 1.25  # scheduler limit = estimate x 1.25 + 10 min, rounded up to whole minutes
TIME_MARGIN_S = 600.0
DEFAULT_GRACE_S = 120  # what the shipped Slurm scripts and Kubernetes manifests set

# DeepSpeed 0.19 defaults the job does not change (job/train/setup.py deepspeed_config)
DS_REDUCE_BUCKET_ELEMENTS = 500_000_000  # zero_optimization.reduce_bucket_size (contiguous_gradients=True)
DS_NCCL_ALIGNMENT = 2  # stage_1_and_2.nccl_start_alignment_factor: flat buffer padded to 2 * world elements
DS_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: smaller params stay whole
DS_SUB_GROUP_SIZE = 1_000_000_000  # zero_optimization.sub_group_size (ZeRO-3 flat fp32 sub-groups)

# Fixed per-process memory. GPU: CUDA context + cuBLAS/NCCL workspaces (an estimate: the context alone is
# 0.5-1 GiB on an H100 with lazy module loading), plus allocator fragmentation on the part that comes and
# goes every step. CPU: measured RSS of a process that imported torch 2.13, transformers 5.24 and
# DeepSpeed 0.19.8, joined a gloo group and took one step of a tiny ZeRO-1 engine (493 MiB).
GPU_CONTEXT_BYTES = int(1.5 * GiB)
ALLOCATOR_FRAGMENTATION = 0.10
CPU_PROCESS_BASELINE_BYTES = 493 * MiB

# Checkpoint file overheads (pickle records, ds_config, param shapes), fitted on DeepSpeed 0.19.8 files of
# GPT-2 shapes from 1,230 to 125M parameters, ZeRO 0-3, 1 and 2 ranks: within 2 KiB per file of real ones.
# The job adds an RNG file per rank and two small JSON files.
CKPT_FILE_BASE = 2048
CKPT_MODULE_RECORD = 240  # per state_dict entry (and its param_shapes entry under ZeRO)
CKPT_STATE_RECORD = 300  # per optimizer state tensor, and per fp32 copy under ZeRO 0 fp16/bf16
CKPT_ZERO_OPTIM_BASE = 3000  # ds_config, loss scaler, paddings ...
CKPT_ZERO_OPTIM_PER_TENSOR = 100  # param_slice_mappings
CKPT_RNG_FILE_BYTES = 14_500  # torch.save of Python, NumPy and torch (+CUDA) RNG states, per rank
CKPT_JSON_BYTES = 512  # trainer_state.json + COMPLETE.json (130 B per file listed, added below)
DS_RECOVERY_SCRIPTS_BYTES = 38_580 + 2_490  # zero_to_fp32.py + zero_to_torch.py, copied into ZeRO checkpoints
TOKENIZER_BYTES_PER_TOKEN = 60  # tokenizer.json + vocab.json + merges.txt of a byte-level BPE, about
OTHER_RUN_FILES_BYTES = 2 * MiB  # report, loss.png, state, samples, logs (metrics lines added below)

def _bytes_of(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------ steps (the worker's schedule)


def schedule_steps(train_blocks: int, world: int, micro_batch: int, grad_accum: int,
                   epochs: float | None, max_steps: int | None) -> tuple[int, int]:
    """(steps_per_epoch, total_steps), as job/train/worker.py computes them:
    steps_per_epoch = ceil(train_blocks / (world * micro_batch * grad_accum)),
    total = max_steps or ceil(epochs * steps_per_epoch)."""
    per_step = world * micro_batch * grad_accum
    steps_per_epoch = _ceil_div(int(train_blocks), per_step)
    if max_steps:
        return steps_per_epoch, int(max_steps)
    return steps_per_epoch, math.ceil((epochs or 0) * steps_per_epoch)


def blocks_trained(train_blocks: int, blocks_per_step: int, steps_per_epoch: int, total_steps: int) -> int:
    """Blocks the run trains on: whole epochs, then the first steps of the next (an epoch's last step is short)."""
    if steps_per_epoch == 0:
        return 0
    full, rest = divmod(total_steps, steps_per_epoch)
    return full * train_blocks + min(rest * blocks_per_step, train_blocks)


@dataclass
class StepsPlan:
    world: int
    micro_batch: int
    grad_accum: int
    block_size: int
    sequences_per_step: int  # world x micro_batch x grad_accum (the last step of an epoch may take fewer)
    tokens_per_step: int
    steps_per_epoch: int
    total_steps: int
    epochs: float  # total_steps / steps_per_epoch
    tokens_trained: int  # sum over steps of the blocks each takes, x block_size
    evaluations: int  # before, every eval_every steps, after (0 without validation blocks)
    checkpoints: int  # every checkpoint_every steps (not at the last) + the final one
    sample_rounds: int

    def describe(self) -> str:
        return (f"{_n(self.world, 'rank')} x {self.micro_batch} micro-batch x {self.grad_accum} accumulation = "
                f"{self.sequences_per_step:,} sequences ({self.tokens_per_step:,} tokens) per step; "
                f"{self.steps_per_epoch:,} steps per epoch; {self.total_steps:,} steps ({self.epochs:.3g} epochs, "
                f"{self.tokens_trained:,} tokens)")


def steps_plan(train_blocks: int, valid_blocks: int, world: int, block_size: int, train,
               grad_accum: int | None = None) -> StepsPlan:
    """`train` is spec.train (epochs, max_steps, micro_batch, grad_accum, eval_every, checkpoint_every,
    sample_every) or anything with those attributes (a dict too); `grad_accum` overrides train.grad_accum
    (see resolve_grad_accum: train.global_batch derives it)."""
    block = int(block_size)
    train = _Attrs(train) if isinstance(train, dict) else train
    mb, ga = int(train.micro_batch), int(grad_accum or train.grad_accum)
    spe, total = schedule_steps(train_blocks, world, mb, ga, train.epochs, train.max_steps)
    per_step = world * mb * ga
    eval_every = int(_get(train, "eval_every", 0) or 0)
    evaluations = 0 if valid_blocks == 0 else 2 + ((total - 1) // eval_every if eval_every and total else 0)
    ce = int(_get(train, "checkpoint_every", 0) or 0)
    checkpoints = ((total - 1) // ce if ce and total else 0) + (1 if total else 0)
    se = int(_get(train, "sample_every", 0) or 0)
    samples = 2 + ((total - 1) // se if se and total else 0)
    return StepsPlan(world, mb, ga, block, per_step, per_step * block, spe, total,
                     total / spe if spe else 0.0, blocks_trained(train_blocks, per_step, spe, total) * block,
                     evaluations, checkpoints, samples)


def _get(obj, name, default=None):
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def resolve_grad_accum(train, world: int) -> tuple[int, Optional[str]]:
    """(grad_accum, problem): with train.global_batch, the worker derives grad_accum = global_batch /
    (world x micro_batch) and refuses a remainder (job/train/optim.py grad_accum_for); else train.grad_accum."""
    gb = _get(train, "global_batch")
    if not gb:
        return int(train.grad_accum), None
    accum, rest = divmod(int(gb), world * int(train.micro_batch))
    if rest or accum == 0:
        return max(1, accum), (f"train.global_batch {gb} cannot be split evenly over {world} processes x "
                               f"train.micro_batch {train.micro_batch}; the job refuses to start")
    return accum, None


class _Attrs:
    """A dict read as attributes (missing keys are None)."""

    def __init__(self, d: dict):
        self._d = d

    def __getattr__(self, name):
        return self._d.get(name)


# ------------------------------------------------------------------ data figures


@dataclass
class DataFigures:
    source: str  # "manifest" or "estimate from N sampled rows"
    block_size: int
    rows_read: Optional[int]
    documents: dict[str, int]
    tokens: dict[str, int]
    blocks: dict[str, int]
    text_bytes: int
    token_bytes: int  # token shards on disk (headers included)
    error: Optional[str] = None  # for an estimate: what the figures may be off by
    relative_error: float = 0.0  # 2 standard errors, as a fraction, on tokens and blocks

    @property
    def data_bytes(self) -> int:
        """data/ on the volume: text shards + token shards + manifest."""
        return self.text_bytes + self.token_bytes + 4096

    @property
    def prepare_peak_bytes(self) -> int:
        """What `ftjob prepare` holds at its peak: every document's text and tokens in reading order beside
        the shards it copies them into (job/data/prepare.py), before it deletes the former."""
        return 2 * self.data_bytes

    def describe(self) -> str:
        d, t, b = self.documents, self.tokens, self.blocks
        rows = f"{self.rows_read:,} rows read; " if self.rows_read is not None else ""
        err = f" ({self.error})" if self.error else ""
        return (f"{rows}documents {d['train']:,} train / {d['valid']:,} valid; tokens {t['train']:,} / "
                f"{t['valid']:,}; blocks of {self.block_size} {b['train']:,} / {b['valid']:,}{err}")


def data_from_manifest(manifest: dict) -> DataFigures:
    """The figures of a data/manifest.json as job/data/prepare.py writes it (exact)."""
    splits = manifest["splits"]
    text = sum(s.get("text_bytes", 0) for sp in splits.values() for s in sp.get("shards", []))
    tokens = sum(s.get("tokens_bytes", 0) for sp in splits.values() for s in sp.get("shards", []))
    if not text:
        text = sum(sp.get("text_bytes", 0) for sp in splits.values())
    return DataFigures("manifest", int(manifest.get("block_size", 0)), manifest.get("rows_read"),
                       {k: int(splits[k].get("documents", 0)) for k in ("train", "valid")},
                       {k: int(splits[k].get("tokens", 0)) for k in ("train", "valid")},
                       {k: int(splits[k].get("blocks", 0)) for k in ("train", "valid")}, text, tokens)


def estimate_data_from_sample(data_spec, tokenizer, join: str = "newline", sample_rows: int = 2000,
                              seed: int = 0) -> DataFigures:
    """Figures for a spec whose data is not prepared yet, from a random sample of its SQLite rows.

    `data_spec` is spec.data (database, table, text_column or query, limit, valid_fraction, block_size,
    shards); `join` data.join resolved (auto is the family's: job.data.prepare.resolve_join); `tokenizer` a
    Hugging Face fast tokenizer. Rows are counted exactly; documents, tokens and
    blocks are sample means times that count. A table is sampled by random rowids within the rows a run
    reads; a query by its first `sample_rows` rows (biased if its order matters; said in `error`).
    The error is 2 standard errors of the token total (usable-row fraction and tokens per document)."""
    import sqlite3

    d = data_spec
    conn = sqlite3.connect(f"file:{Path(d.database).resolve()}?mode=ro", uri=True)
    try:
        q = lambda name: '"' + str(name).replace('"', '""') + '"'  # noqa: E731
        limit = f" LIMIT {int(d.limit)}" if d.limit else ""
        if d.query:
            inner = d.query.strip().rstrip(";")
            rows = conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM ({inner}){limit})").fetchone()[0]
            texts = [r[0] for r in conn.execute(f"SELECT * FROM ({inner}){limit}").fetchmany(sample_rows)]
            how = f"the first {len(texts):,} rows of the query"
        else:
            table, col = q(d.table), q(d.text_column)
            rows = conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM {table}{limit})").fetchone()[0]
            texts = _sample_rowids(conn, table, col, limit, rows, sample_rows, seed)
            if texts is None:  # a view, or a table without rowids: its first rows
                texts = [r[0] for r in conn.execute(f"SELECT {col} FROM {table}{limit}").fetchmany(sample_rows)]
            how = f"{len(texts):,} of {rows:,} rows sampled"
    finally:
        conn.close()
    texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in texts]
    usable = [t for t in texts if isinstance(t, str) and t.strip()]
    n = len(texts)
    if not usable:
        return DataFigures(f"estimate from {n} sampled rows", d.block_size, rows, {"train": 0, "valid": 0},
                           {"train": 0, "valid": 0}, {"train": 0, "valid": 0}, 0, 0,
                           f"no usable text in {how}", 1.0)
    sep = {"eos": 1, "bos_eos": 2}.get(join) or len(tokenizer("\n", add_special_tokens=False)["input_ids"])
    lengths = [len(ids) + sep for ids in tokenizer(usable, add_special_tokens=False)["input_ids"]]
    text_lines = [len(json.dumps({"text": t}, ensure_ascii=False).encode()) + 1 for t in usable]
    p = len(usable) / n
    m = sum(lengths) / len(lengths)
    var = sum((x - m) ** 2 for x in lengths) / max(1, len(lengths) - 1)
    fpc = max(0.0, 1 - n / rows) if rows else 0.0  # finite-population correction: a full read is exact
    rel = 2 * math.sqrt(fpc * ((var / (m * m * len(lengths))) + ((1 - p) / (p * n))))
    docs = round(rows * p)
    valid_docs = math.ceil(docs * d.valid_fraction) if d.valid_fraction else 0
    split_docs = {"train": docs - valid_docs, "valid": valid_docs}
    tokens = {k: round(v * m) for k, v in split_docs.items()}
    shards = {k: min(d.shards, max(1, v)) for k, v in split_docs.items()}
    # each shard drops its tail shorter than a block: half a block per shard on average
    blocks = {k: max(0, round((tokens[k] - shards[k] * (d.block_size - 1) / 2) / d.block_size)) for k in tokens}
    width = 2 if len(tokenizer) <= 2**16 else 4
    text_bytes = round(docs * sum(text_lines) / len(text_lines))
    token_bytes = sum(64 * shards[k] + blocks[k] * d.block_size * width for k in blocks)
    return DataFigures(f"estimate from {n:,} sampled rows", d.block_size, rows, split_docs, tokens, blocks,
                       text_bytes, token_bytes, f"estimate, {how}: tokens and blocks within ±{100 * rel:.1f}% "
                       "(2 standard errors)", rel)


def _sample_rowids(conn, table: str, col: str, limit: str, rows: int, sample_rows: int, seed: int):
    """Up to sample_rows texts at random rowids among the rows a run reads; None without rowids."""
    import random
    import sqlite3

    try:
        if rows <= sample_rows:
            return [r[0] for r in conn.execute(f"SELECT {col} FROM {table}{limit}")]
        hi = conn.execute(f"SELECT max(rowid) FROM (SELECT rowid FROM {table}{limit})").fetchone()[0] or 0
        lo = conn.execute(f"SELECT min(rowid) FROM {table}").fetchone()[0] or 0
        rng, texts, tried = random.Random(seed), [], set()
        while len(texts) < sample_rows and len(tried) < hi - lo + 1:
            ids = {rng.randint(lo, hi) for _ in range(2 * (sample_rows - len(texts)))} - tried
            tried |= ids
            got = conn.execute(f"SELECT {col} FROM {table} WHERE rowid IN ({','.join(map(str, sorted(ids)))})")
            texts += [r[0] for r in got][: sample_rows - len(texts)]
        return texts
    except sqlite3.OperationalError:
        return None


# ------------------------------------------------------------------ per-rank model state (exact)


@dataclass
class StateBytes:
    """Bytes per rank of what lives for the whole run, exact (counted in the tests), except ZeRO 3's
    parameters: its partition plus the small tensors it keeps whole (stage3_param_persistence_threshold)."""

    zero_stage: int
    precision: str
    optimizer: str
    world: int
    parameters: int  # model weights resident on a rank (in the training precision)
    master: int  # fp32 master copy (0 where the optimizer updates the weights themselves)
    gradients: int  # gradients held after backward at the accumulation boundary
    optimizer_states: int  # the optimizer's state tensors (moments; step / RMS scalars)
    optimizer_sees: str
    adafactor_factored: Optional[bool]
    parameters_exact: bool
    partition: int  # elements of this rank's flat fp32 partition (ZeRO 1-3), else 0
    seen_shapes: list = field(default_factory=list, repr=False)

    @property
    def total(self) -> int:
        return self.parameters + self.master + self.gradients + self.optimizer_states


def optimizer_state_bytes(optimizer: str, shapes: Iterable[tuple[int, ...]]) -> int:
    """Bytes of the state tensors torch.optim.AdamW / transformers' Adafactor keep for fp32 tensors of `shapes`.

    AdamW: exp_avg and exp_avg_sq (4 B each per element) and a 0-d fp32 `step` tensor per tensor.
    Adafactor (beta1=None, so no first moment): a 2-D-or-more tensor keeps exp_avg_sq_row (shape[:-1]) and
    exp_avg_sq_col (shape[:-2] + shape[-1:]); a 1-D one a full exp_avg_sq; each keeps a 0-d `RMS` tensor
    (its `step` is a Python int)."""
    total = 0
    for s in shapes:
        if optimizer == "adafactor":
            if len(s) >= 2:
                total += 4 * (math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1])
            else:
                total += 4 * math.prod(s)
            total += 4
        else:
            total += 8 * math.prod(s) + 4
    return total


def zero_partition(n_elements: int, world: int) -> int:
    """Elements of one rank's partition under ZeRO 1/2: the flat buffer is padded to a multiple of
    2 x world (stage_1_and_2: nccl_start_alignment_factor x world) and split evenly."""
    align = DS_NCCL_ALIGNMENT * world
    return _ceil_div(n_elements, align) * align // world


def state_bytes(arch: Architecture, precision: str, zero_stage: int, optimizer: str, world: int) -> StateBytes:
    e = _bytes_of(precision)
    numels = arch.numels()
    n = sum(numels)
    if zero_stage == 0:
        seen = [s for _, s in arch.parameters]
        return StateBytes(0, precision, optimizer, world, e * n, 0 if e == 4 else 4 * n, e * n,
                          optimizer_state_bytes(optimizer, seen),
                          "the model's own tensors" if e == 4 else "an fp32 copy of each tensor (same shapes)",
                          True if optimizer == "adafactor" else None, True, 0, seen)
    if zero_stage in (1, 2):
        part = zero_partition(n, world)
        return StateBytes(zero_stage, precision, optimizer, world, e * part * world, 4 * part, e * part,
                          optimizer_state_bytes(optimizer, [(part,)]),
                          f"one flat fp32 partition of {part:,} elements", False if optimizer == "adafactor" else None,
                          True, part, [(part,)])
    # ZeRO 3: every tensor partitioned on its own (ceil(numel / world) per rank); the optimizer sees flat
    # fp32 sub-groups of up to sub_group_size elements.
    part = sum(_ceil_div(x, world) for x in numels)
    groups = [(min(DS_SUB_GROUP_SIZE, part - i),) for i in range(0, part, DS_SUB_GROUP_SIZE)] or [(0,)]
    persistent = sum(x for x in numels if x <= DS_PERSISTENCE_THRESHOLD) if world > 1 else 0
    return StateBytes(3, precision, optimizer, world, e * (part + persistent), 4 * part, e * part,
                      optimizer_state_bytes(optimizer, groups), f"flat fp32 partitions, {part:,} elements in all",
                      False if optimizer == "adafactor" else None, False, part, groups)


# ------------------------------------------------------------------ activations and logits (per micro-batch)


def activation_bytes(activations: dict, gradient_checkpointing: bool = False) -> Optional[int]:
    """From job.architecture.trace_activations' figures for the run's micro-batch, block and precision:
    what autograd saves in one forward (the loss's vocabulary-sized tensors aside), or with gradient
    checkpointing each layer's input plus one layer rebuilt in backward. None when it could not be traced."""
    return activations.get("checkpointed" if gradient_checkpointing else "bytes")


def logits_bytes(arch: Architecture, micro_batch: int, block_size: int, precision: str) -> dict[str, int]:
    """The vocabulary-sized buffers of one micro-batch (t = micro_batch x block tokens, V = vocab):
    forward: logits in the model dtype (e V t), HF's fp32 upcast for the loss (4 V t; the same tensor in
    fp32) and the log-softmax cross_entropy saves (4 V t); backward: nll_loss's gradient (4 V t), the saved
    log-softmax and log_softmax's input gradient (4 V t) at once: 12 V t, the peak."""
    t, v, e = micro_batch * block_size, arch.vocab_size, _bytes_of(precision)
    forward = t * v * (e + (4 if e < 4 else 0) + 4)
    return {"saved": 4 * t * v, "forward_peak": forward, "peak": max(forward, 12 * t * v)}


# ------------------------------------------------------------------ memory per device


OFFLOADS = ("none", "optimizer", "all")  # train.offload: what DeepSpeed keeps in host memory


@dataclass
class MemoryItem:
    name: str
    bytes: int
    exact: bool
    note: str = ""


@dataclass
class MemoryPlan:
    device: str
    precision: str
    zero_stage: int
    optimizer: str
    world: int
    micro_batch: int
    block_size: int
    gradient_checkpointing: bool
    items: list[MemoryItem]
    peak_bytes: int
    limit_bytes: Optional[int]
    state: StateBytes = field(repr=False)
    offload: str = "none"
    host_bytes: int = 0  # per process, in host memory (offloaded optimizer, master, parameters)

    @property
    def fits(self) -> Optional[bool]:
        return None if not self.limit_bytes else self.peak_bytes <= self.limit_bytes

    def item(self, name: str) -> int:
        return next((x.bytes for x in self.items if x.name == name), 0)

    @property
    def label(self) -> str:
        return f"{self.zero_stage}" + ({"none": "", "optimizer": " +offload opt", "all": " +offload all"}[self.offload])

    @property
    def verdict(self) -> str:
        if self.fits is None:
            return "no limit given"
        pct = 100 * self.peak_bytes / self.limit_bytes
        return f"fits ({pct:.0f}% of {_gib(self.limit_bytes)})" if self.fits else \
            f"DOES NOT FIT ({_gib(self.peak_bytes)} > {_gib(self.limit_bytes)})"


def memory_plan(arch: Architecture, activations: dict, *, precision: str, zero_stage: int, optimizer: str,
                world: int, micro_batch: int, block_size: int, grad_accum: int = 1, device: str = "cuda",
                limit_bytes: int | None = 80 * GiB, gradient_checkpointing: bool = False,
                offload: str = "none") -> MemoryPlan:
    """Peak bytes per device (per process on CPU) of one training process:
    parameters + master + gradients + optimizer states (held all run, less what is offloaded)
      + the larger of the backward phase (activations + logits + gradient buffers) and the optimizer-step
        phase (fp32 gradient copies, optimizer temporaries)
      + overhead (GPU: CUDA context and workspaces + 10% fragmentation on what comes and goes; CPU: the
        measured process baseline).
    offload (DeepSpeed ZeRO-Offload, ZeRO 1-3): "optimizer" keeps the fp32 master, the optimizer states and
    an fp32 gradient partition in host memory and steps there; "all" (ZeRO 3) the 16-bit parameter
    partition too. On a CPU run host and device are the same memory: the peak includes them."""
    st = state_bytes(arch, precision, zero_stage, optimizer, world)
    e = _bytes_of(precision)
    n = arch.n_params
    cuda = device != "cpu"
    host = 0
    host_why = []
    if offload != "none":
        host += st.master + st.optimizer_states + 4 * st.partition
        host_why.append("fp32 master, optimizer states, fp32 gradient partition")
    if offload == "all":
        host += st.parameters
        host_why.append(f"{e} B parameter partition")
    on_device = {"parameters": 0 if offload == "all" else st.parameters,
                 "master weights": 0 if offload != "none" else st.master,
                 "optimizer states": 0 if offload != "none" else st.optimizer_states}
    items = [MemoryItem("parameters", on_device["parameters"], st.parameters_exact,
                        f"{e} B x " + ("partition + small tensors kept whole" if zero_stage == 3 else "all")),
             MemoryItem("master weights", on_device["master weights"], True, "fp32" if st.master else "none"),
             MemoryItem("gradients", st.gradients, True, "held after backward"),
             MemoryItem("optimizer states", on_device["optimizer states"], True,
                        f"{optimizer}; updates {st.optimizer_sees}")]
    act = activation_bytes(activations, gradient_checkpointing)
    logit = logits_bytes(arch, micro_batch, block_size, precision)["peak"]
    # gradient buffers that exist only during backward
    grad_buf, why = 0, []
    if zero_stage == 1:
        grad_buf += e * n
        why.append("ZeRO-1 keeps whole gradients until the boundary")
    if zero_stage >= 1:
        bucket = DS_REDUCE_BUCKET_ELEMENTS if cuda else min(DS_REDUCE_BUCKET_ELEMENTS, st.partition * world)
        grad_buf += e * bucket
        why.append(f"reduce bucket {bucket:,} elements" + ("" if cuda else " (CPU: only the written pages)"))
    if zero_stage == 3 and (world > 1 or offload == "all"):
        # the largest module's gathered parameters during forward/backward: the embedding or a whole layer
        grad_buf += e * max(arch.vocab_size * arch.hidden, arch.largest_layer_parameters)
        why.append("ZeRO-3 gathered parameters")
    # the optimizer step (on the host when offloaded)
    step, step_why = 0, []
    if offload == "none":
        if e < 4:
            step += 4 * (n if zero_stage == 0 else st.partition)
            step_why.append("fp32 copy of the gradients")
        largest = max(math.prod(s) for s in st.seen_shapes)
        if optimizer == "adafactor":
            step += 8 * largest
            step_why.append("Adafactor temporaries (2 x the largest tensor it updates)")
        elif not cuda:  # the job's AdamW is fused on GPU (no temporaries), single-tensor on CPU
            step += 4 * largest
            step_why.append("AdamW temporary (the largest tensor it updates)")
    dynamic = max((act or 0) + logit + grad_buf, step)
    if cuda:
        overhead = GPU_CONTEXT_BYTES + int(ALLOCATOR_FRAGMENTATION * dynamic)
        o_note = "CUDA context + workspaces (1.5 GiB, estimate) + 10% fragmentation"
    else:
        overhead = CPU_PROCESS_BASELINE_BYTES
        o_note = "process baseline RSS, measured (torch + transformers + DeepSpeed)"
    ckpt = " with gradient checkpointing" if gradient_checkpointing else ""
    items += [MemoryItem("activations", act or 0, False,
                         f"{micro_batch} x {block_size} tokens{ckpt}; {activations.get('method', '')}"),
              MemoryItem("logits", logit, False, "12 B x tokens x vocab at the loss backward"),
              MemoryItem("gradient buffers", grad_buf, False, "; ".join(why) or "none"),
              MemoryItem("optimizer step", step, False,
                         "; ".join(step_why) or ("on the host" if offload != "none" else "none (fused AdamW)")),
              MemoryItem("overhead", overhead, False, o_note)]
    if host:
        items.append(MemoryItem("offloaded to host", host, False, "; ".join(host_why)))
    peak = sum(on_device.values()) + st.gradients + dynamic + overhead + (0 if cuda else host)
    return MemoryPlan(device, precision, zero_stage, optimizer, world, micro_batch, block_size,
                      gradient_checkpointing, items, peak, limit_bytes, st, offload, host)


# ------------------------------------------------------------------ checkpoints, exports, volume


@dataclass
class CheckpointSize:
    files: dict[str, int]  # DeepSpeed file name pattern -> bytes (all ranks)
    total: int
    note: str


def checkpoint_bytes(arch: Architecture, precision: str, zero_stage: int, optimizer: str, world: int) -> CheckpointSize:
    """One complete checkpoint directory as job/train/checkpoint.py writes it (engine.save_checkpoint + RNG
    files + markers). DeepSpeed 0.19 writes:
      ZeRO 0: mp_rank_00_model_states.pt (rank 0): module in the model dtype + the optimizer's state_dict
              (the fp32 copies too under fp16/bf16);
      ZeRO 1/2: mp_rank_00_model_states.pt (module, rank 0) + one zero_pp_rank_R_mp_rank_00_optim_states.pt
              per rank (fp32 partition + its optimizer state) + zero_to_fp32.py / zero_to_torch.py;
      ZeRO 3: per rank a small zero_pp_rank_R model_states.pt (no weights) and an optim_states.pt (fp32
              partition + state), + the two scripts.
    An estimate: tensor bytes exact, pickle overheads fitted (a few KiB per file)."""
    st = state_bytes(arch, precision, zero_stage, optimizer, world)
    e = _bytes_of(precision)
    n_tensors = len(arch.parameters)
    module_records = arch.state_dict_entries
    state_records = len(st.seen_shapes) * (3 if optimizer == "adamw" else 2)
    files: dict[str, int] = {}
    prefix = "bf16_" if precision == "bf16" else ""
    if zero_stage == 0:
        master_records = n_tensors if st.master else 0
        files["ds/mp_rank_00_model_states.pt"] = (e * arch.n_params + st.master + st.optimizer_states
                                                  + CKPT_FILE_BASE + CKPT_MODULE_RECORD * module_records
                                                  + CKPT_STATE_RECORD * (state_records + master_records))
    else:
        per_rank_optim = (4 * st.partition + st.optimizer_states + CKPT_ZERO_OPTIM_BASE
                          + CKPT_STATE_RECORD * state_records + CKPT_ZERO_OPTIM_PER_TENSOR * n_tensors)
        module = CKPT_FILE_BASE + CKPT_MODULE_RECORD * 2 * module_records
        if zero_stage < 3:  # the 16-bit (or fp32) weights: the whole flat buffer, once
            files["ds/mp_rank_00_model_states.pt"] = st.parameters + module
        else:  # no weights: the fp32 partitions in optim_states hold them
            files["ds/zero_pp_rank_R_mp_rank_00_model_states.pt"] = world * module
        files[f"ds/{prefix}zero_pp_rank_R_mp_rank_00_optim_states.pt"] = world * per_rank_optim
        files["zero_to_fp32.py, zero_to_torch.py"] = _recovery_scripts_bytes()
    files["rng-rankR.pt"] = world * CKPT_RNG_FILE_BYTES
    files["trainer_state.json, COMPLETE.json"] = CKPT_JSON_BYTES + 130 * (len(files) + 2 * world)
    return CheckpointSize(files, sum(files.values()), "estimate: tensor bytes exact, file overheads fitted")


def _recovery_scripts_bytes() -> int:
    """The two scripts DeepSpeed copies into ZeRO checkpoints, from the installed package if there is one
    (found without importing it)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("deepspeed")
        if found and found.submodule_search_locations:
            base = Path(list(found.submodule_search_locations)[0]) / "utils"
            return sum((base / f).stat().st_size for f in ("zero_to_fp32.py", "zero_to_torch.py"))
    except (OSError, ValueError, ImportError):
        pass
    return DS_RECOVERY_SCRIPTS_BYTES


def export_bytes(arch: Architecture, tokenizer_bytes: int | None = None) -> int:
    """final/ (or best/): model.safetensors in fp32 (tied lm_head stored once; a JSON header of about 100 B
    per tensor), config.json and generation_config.json, and the tokenizer files (given, or about 60 B per
    vocabulary entry for a byte-level BPE)."""
    n_tensors = len(arch.parameters)
    tok = tokenizer_bytes if tokenizer_bytes is not None else TOKENIZER_BYTES_PER_TOKEN * arch.vocab_size
    return 4 * arch.n_params + 100 * n_tensors + 8 + 2048 + int(tok)


@dataclass
class VolumePlan:
    data_bytes: int
    checkpoint_bytes: int
    checkpoints: int  # keep_checkpoints + 1 (a new one is complete before the oldest goes) [+ 1, the best]
    export_bytes: int
    exports: int  # final/ and best/
    other_bytes: int
    need_bytes: int
    present_bytes: int  # already on the volume (counts towards need, not towards what is still to write)
    free_bytes: Optional[int]
    ok: Optional[bool]
    message: str

    @property
    def to_write_bytes(self) -> int:
        return max(0, self.need_bytes - self.present_bytes)


def volume_plan(data_bytes: int, checkpoint: int, keep_checkpoints: int, export: int, free_bytes: int | None,
                present_bytes: int = 0, other_bytes: int = OTHER_RUN_FILES_BYTES, exports: int = 2,
                best_checkpoint: bool = False, prepare_peak_bytes: int = 0) -> VolumePlan:
    """Need = data + (keep_checkpoints + 1) checkpoints (+ 1 when the best one is kept apart from the newest)
    + `exports` exports (final/ and best/) + other run files, or what prepare holds at its peak when that is
    more; refused (ok False) when the free bytes are fewer than what is still to be written (need - present)."""
    n_ckpt = keep_checkpoints + 1 + (1 if best_checkpoint else 0)
    need = data_bytes + n_ckpt * checkpoint + exports * export + other_bytes
    why = f"{keep_checkpoints} kept + 1 being written" + (" + the best" if best_checkpoint else "")
    parts = (f"data {_gb(data_bytes)} + {n_ckpt} checkpoints ({why}) x {_gb(checkpoint)} + {exports} exports x "
             f"{_gb(export)} + other {_gb(other_bytes)} = {_gb(need)}")
    if prepare_peak_bytes > need:  # a big corpus and a small model: prepare's peak decides
        parts += f"; preparing the data needs {_gb(prepare_peak_bytes)} for a while"
        need = prepare_peak_bytes
    to_write = max(0, need - present_bytes)
    if present_bytes:
        parts += f", {_gb(present_bytes)} of it already on the volume"
    if free_bytes is None:
        return VolumePlan(data_bytes, checkpoint, n_ckpt, export, exports, other_bytes, need, present_bytes, None,
                          None, f"needs {parts}; free space unknown")
    ok = free_bytes >= to_write
    if ok:
        msg = f"fits: needs {parts}; {_gb(free_bytes)} free ({_gb(free_bytes - to_write)} to spare)"
    else:
        msg = (f"NOT ENOUGH SPACE: needs {_gb(to_write)} more ({parts}) but only {_gb(free_bytes)} is free; "
               f"short by {_gb(to_write - free_bytes)}. Free space, lower train.keep_checkpoints, or use a "
               "larger volume")
    return VolumePlan(data_bytes, checkpoint, n_ckpt, export, exports, other_bytes, need, present_bytes, free_bytes,
                      ok, msg)


def require_space(plan: VolumePlan) -> None:
    """Raise the job's VolumeError (exit 74) when the volume plan refuses."""
    if plan.ok is False:
        from .errors import VolumeError

        raise VolumeError(f"output volume: {plan.message}")


def free_bytes_at(path: str | Path) -> int:
    """Free bytes on the volume that holds `path` (or its nearest existing parent)."""
    p = Path(path).expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def dir_bytes(path: str | Path) -> int:
    """Bytes of the files under `path` (0 when absent): what a run already has on the volume."""
    p = Path(path)
    if not p.exists():
        return 0
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


# ------------------------------------------------------------------ time


@dataclass
class TimePlan:
    tokens_per_s: Optional[float]  # all ranks together
    source: str
    step_s: Optional[float]
    train_s: Optional[float]
    eval_s: Optional[float]  # all evaluations
    one_eval_s: Optional[float]
    checkpoint_s: float  # all checkpoints
    one_checkpoint_s: float
    startup_s: float
    other_s: float  # samples, export
    prepare_s: float
    total_s: Optional[float]
    slurm_time: Optional[str]  # for #SBATCH --time
    active_deadline_s: Optional[int]  # for a Kubernetes Job's activeDeadlineSeconds
    grace_s: int  # Slurm --signal=B:USR1@<grace_s>, Kubernetes terminationGracePeriodSeconds
    stop_s: Optional[float]  # from a signal to a complete checkpoint: a step, an evaluation, a save
    write_bytes_per_s: float
    eval_blocks: int = 0  # validation blocks each evaluation covers (train.eval_blocks)
    full_eval_blocks: int = 0  # a final pass over every validation block (train.final_eval: full), or 0

    @property
    def eval_share(self) -> Optional[float]:
        """Evaluations' share of the run's estimated time."""
        return self.eval_s / self.total_s if self.total_s else None


def reference_tokens_per_s(arch: Architecture, block_size: int) -> float:
    """Per GPU: the DeepSpeed ZeRO-1 fp16 reference (156K tokens/s for the 125M shape at block 64) scaled by
    training FLOPs per token (Architecture.flops_per_token)."""
    return REFERENCE_TOKENS_PER_S["deepspeed_zero1_fp16"] * REFERENCE_FLOPS_PER_TOKEN / arch.flops_per_token(block_size)


def slurm_time(seconds: float) -> str:
    """`#SBATCH --time` value: [D-]HH:MM:SS, rounded up to whole minutes."""
    minutes = max(1, math.ceil(seconds / 60))
    d, rem = divmod(minutes, 24 * 60)
    hh, mm = divmod(rem, 60)
    return f"{d}-{hh:02d}:{mm:02d}:00" if d else f"{hh:02d}:{mm:02d}:00"


def time_plan(arch: Architecture, steps: StepsPlan, valid_blocks: int, checkpoint: int, export: int, *,
              device: str, world: int, tokens_per_s: float | None = None, eval_every: int = 0,
              write_bytes_per_s: float = CHECKPOINT_WRITE_BYTES_PER_S, prepare_text_bytes: int = 0,
              prepare_cores: int | None = None, full_eval_blocks: int = 0) -> TimePlan:
    """Training, evaluation and checkpoint time; `tokens_per_s` is for all ranks together (measured, e.g. a
    run's metrics.jsonl or `ftjob bench`). Without it, on GPUs: the reference per GPU x world (linear
    data-parallel scaling assumed); on CPU: unknown.

    train = steps x tokens per step / tokens/s; an evaluation = `valid_blocks`, the blocks it covers (padded
    to whole micro-batches on every rank), at EVAL_SPEEDUP x tokens/s, plus one pass over full_eval_blocks;
    a checkpoint = its bytes / write speed (default: 2.0 GB in 7.2 s with sha256 and fsync, measured on
    CPU); + STARTUP_S, sample rounds, the export; + prepare, for text not prepared yet.
    Scheduler limit: total x 1.25 + 10 min, in whole minutes. Grace period: a stop waits for the step in
    flight, an evaluation in progress and a checkpoint; twice that (a slower volume) + 30 s, at least the
    shipped 120 s."""
    if tokens_per_s:
        tps, source = float(tokens_per_s), "given"
    elif device != "cpu":
        tps = reference_tokens_per_s(arch, steps.block_size) * world
        source = (f"{REFERENCE_LABEL}; scaled by FLOPs/token to {tps / world:,.0f} per GPU x {world} "
                  "(linear scaling assumed)")
    else:
        tps, source = None, "unknown on CPU: pass tokens/s (a run's metrics.jsonl, or `ftjob bench`)"
    one_ckpt = checkpoint / write_bytes_per_s
    ckpt_s = steps.checkpoints * one_ckpt
    other = steps.sample_rounds * SAMPLE_ROUND_S + export / write_bytes_per_s
    cores = prepare_cores or os.cpu_count() or 1
    rate = min(PREPARE_BYTES_PER_S_PER_CORE * cores, PREPARE_READ_BYTES_PER_S)
    prep = prepare_text_bytes / rate if prepare_text_bytes else 0.0
    if tps:
        step_s = steps.tokens_per_step / tps
        train_s = steps.total_steps * step_s
        mb = steps.micro_batch

        def seconds(blocks):
            return math.ceil(math.ceil(blocks / world) / mb) * mb * world * steps.block_size / (EVAL_SPEEDUP * tps)

        one_eval = seconds(valid_blocks)
        eval_s = steps.evaluations * one_eval + seconds(full_eval_blocks)
        total = STARTUP_S + prep + train_s + eval_s + ckpt_s + other
        limit = total * TIME_MARGIN + TIME_MARGIN_S
        stop = step_s + (one_eval if eval_every else 0.0) + one_ckpt
        grace = max(DEFAULT_GRACE_S, 10 * math.ceil((2 * stop + 30) / 10))
        return TimePlan(tps, source, step_s, train_s, eval_s, one_eval, ckpt_s, one_ckpt, STARTUP_S, other, prep,
                        total, slurm_time(limit), int(60 * math.ceil(limit / 60)), grace, stop, write_bytes_per_s,
                        valid_blocks, full_eval_blocks)
    grace = max(DEFAULT_GRACE_S, 10 * math.ceil((2 * one_ckpt + 30) / 10))
    return TimePlan(None, source, None, None, None, None, ckpt_s, one_ckpt, STARTUP_S, other, prep, None, None, None,
                    grace, None, write_bytes_per_s, valid_blocks, full_eval_blocks)


# ------------------------------------------------------------------ warnings


@dataclass
class Finding:
    code: str
    severity: str  # "error" (the job would refuse or fail), "warning", "note"
    message: str


def findings(arch: Architecture, spec, steps: StepsPlan | None, data: DataFigures | None, *, precision: str,
             device: str, world: int, procs_per_node: int, nnodes: int, memory: MemoryPlan | None = None,
             volume: VolumePlan | None = None, time: TimePlan | None = None,
             tokenizer_vocab: int | None = None) -> list[Finding]:
    out: list[Finding] = []
    t, d = spec.train, spec.data
    block = d.block_size
    if arch.positions and block > arch.positions:
        out.append(Finding("block_over_positions", "error",
                           f"data.block_size {block} is more than the model's {arch.positions} positions "
                           "(max_position_embeddings): it was never trained on later tokens"))
    if tokenizer_vocab and tokenizer_vocab > arch.vocab_size:
        out.append(Finding("vocab_over_model", "error",
                           f"the tokenizer has {tokenizer_vocab:,} tokens but the model's embedding only "
                           f"{arch.vocab_size:,} rows"))
    if data is not None and steps is not None:
        train_blocks = data.blocks["train"]
        if train_blocks < world * t.micro_batch:  # job/pipeline.py refuses this before launching
            out.append(Finding("fewer_blocks_than_batch", "error",
                               f"{train_blocks:,} training blocks are fewer than one micro-batch across ranks "
                               f"({world} x {t.micro_batch}); the job refuses to start"))
        elif train_blocks < steps.sequences_per_step:
            out.append(Finding("fewer_blocks_than_global_batch", "warning",
                               f"{train_blocks:,} training blocks are fewer than one global batch "
                               f"({steps.sequences_per_step:,}): every step is the epoch's short last step"))
        if data.blocks["valid"] == 0 and d.valid_fraction > 0:
            out.append(Finding("no_validation", "warning",
                               "no validation blocks: the run reports no validation loss"))
        if data.error and data.relative_error > 0.1:
            out.append(Finding("data_estimate", "note", f"data figures are an estimate: {data.error}"))
    if procs_per_node == 0 and device != "cpu" and not _get(t, "global_batch"):
        per_gpu = t.micro_batch * t.grad_accum
        out.append(Finding("batch_depends_on_world", "warning",
                           f"the global batch is processes x {t.micro_batch} x {t.grad_accum} = {per_gpu} x "
                           f"processes: {per_gpu * world:,} sequences here, {per_gpu * 2 * world:,} with twice "
                           "as many GPUs; the step count and the best learning rate change with it. Set "
                           "train.global_batch (or resources.procs_per_node) to fix it"))
    if precision == "fp16" and arch.fp16_problem:
        out.append(Finding("fp16_overflow", "warning", fp16_warning(arch.fp16_problem, t.precision)))
    if precision == "fp16" and device == "cpu":
        out.append(Finding("fp16_on_cpu", "error", "train.precision: fp16 needs a GPU; on CPU use bf16 or fp32"))
    if precision == "fp32" and device != "cpu":
        out.append(Finding("fp32_on_gpu", "note", "fp32 on a GPU: the time reference is fp16, so expect slower"))
    if memory is not None and memory.fits is False:
        out.append(Finding("memory", "error", f"ZeRO-{memory.label} {memory.precision}: {memory.verdict}; "
                           "lower train.micro_batch (with more grad_accum for the same batch), turn on "
                           "train.gradient_checkpointing, raise train.zero_stage, set train.offload, or use a "
                           "larger device"))
    if volume is not None and volume.ok is False:
        out.append(Finding("volume", "error", volume.message))
    if time is not None and time.grace_s > DEFAULT_GRACE_S:
        out.append(Finding("grace_period", "warning",
                           f"stopping on a signal takes about {time.stop_s or time.one_checkpoint_s:.0f} s (a step, "
                           f"an evaluation, a checkpoint); the shipped Slurm scripts and manifests allow "
                           f"{DEFAULT_GRACE_S} s: set #SBATCH --signal=B:USR1@{time.grace_s} and "
                           f"terminationGracePeriodSeconds: {time.grace_s}"))
    if nnodes > 1 and time is not None and time.source != "given":
        out.append(Finding("multi_node", "note", "multi-node data-parallel efficiency is not modelled (linear "
                           "scaling assumed); BENCHMARKS.md estimates 64-88% for 2 x 8 H100 at 125M"))
    return out


def fp16_warning(problem: str, asked: str) -> str:
    """One line for the plan and the run: why fp16 is risky for this model and the setting to change."""
    how = "train.precision: auto trains in fp16 on GPUs" if asked == "auto" else "train.precision is fp16"
    return (f"{how}, and fp16 may overflow for this model ({problem}); set train.precision: bf16 "
            "(GPUs from A100 / H100 on)")


# ------------------------------------------------------------------ the whole plan

# The memory table's rows: every ZeRO stage, then the offloads that make a big model fit.
MEMORY_VARIANTS = [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (2, "optimizer"), (3, "optimizer"), (3, "all")]


@dataclass
class Plan:
    name: str
    model: Architecture
    device: str
    precision: str
    optimizer: str
    zero_stage: int
    world: int
    data: Optional[DataFigures]
    steps: Optional[StepsPlan]
    memory: list[MemoryPlan]  # MEMORY_VARIANTS (and the spec's own), without gradient checkpointing
    memory_checkpointing: list[MemoryPlan]  # the same with train.gradient_checkpointing
    checkpoint: CheckpointSize
    export_bytes: int
    volume: VolumePlan
    time: Optional[TimePlan]
    findings: list[Finding]
    gradient_checkpointing: bool = False  # train.gradient_checkpointing
    grad_accum: int = 1  # as the worker will run it (train.global_batch derives it)
    attention: str = "auto"
    offload: str = "none"  # train.offload
    activation_method: str = ""  # how the activations were counted (job.architecture.trace_activations)

    @property
    def chosen_memory(self) -> MemoryPlan:
        """The spec's ZeRO stage and offload with the spec's gradient checkpointing setting."""
        rows = self.memory_checkpointing if self.gradient_checkpointing else self.memory
        return next(m for m in rows if (m.zero_stage, m.offload) == (self.zero_stage, self.offload))

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def to_dict(self) -> dict:
        def mem(m: MemoryPlan) -> dict:
            return {"zero_stage": m.zero_stage, "offload": m.offload, "gradient_checkpointing": m.gradient_checkpointing,
                    "peak_bytes": m.peak_bytes, "host_bytes": m.host_bytes, "limit_bytes": m.limit_bytes,
                    "fits": m.fits, "items": {i.name: {"bytes": i.bytes, "exact": i.exact, "note": i.note} for i in m.items},
                    "optimizer_sees": m.state.optimizer_sees, "adafactor_factored": m.state.adafactor_factored}

        return {
            "name": self.name, "ok": self.ok,
            "model": {**self.model.to_dict(), "describe": self.model.describe()},
            "run": {"device": self.device, "precision": self.precision, "optimizer": self.optimizer,
                    "zero_stage": self.zero_stage, "offload": self.offload, "world": self.world,
                    "grad_accum": self.grad_accum, "gradient_checkpointing": self.gradient_checkpointing,
                    "attention": self.attention, "peak_bytes": self.chosen_memory.peak_bytes,
                    "host_bytes": self.chosen_memory.host_bytes, "fits": self.chosen_memory.fits},
            "state_bytes": {"parameters": self.chosen_memory.state.parameters,
                            "master": self.chosen_memory.state.master,
                            "gradients": self.chosen_memory.state.gradients,
                            "optimizer_states": self.chosen_memory.state.optimizer_states},
            "data": None if self.data is None else {**asdict(self.data), "data_bytes": self.data.data_bytes},
            "steps": None if self.steps is None else asdict(self.steps),
            "memory": [mem(m) for m in self.memory],
            "memory_gradient_checkpointing": [mem(m) for m in self.memory_checkpointing],
            "checkpoint": asdict(self.checkpoint), "export_bytes": self.export_bytes,
            "volume": {**asdict(self.volume), "to_write_bytes": self.volume.to_write_bytes},
            "time": None if self.time is None else {**asdict(self.time), "eval_share": self.time.eval_share},
            "findings": [asdict(f) for f in self.findings],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False)

    def to_text(self) -> str:
        lines = [f"ftjob plan: {self.name}", "",
                 f"model    {self.model.describe()}",
                 f"run      {self.device} x {_n(self.world, 'rank')}, {self.precision}, ZeRO-{self.zero_stage}, "
                 f"{self.optimizer}, {self.attention} attention"
                 + (", gradient checkpointing" if self.gradient_checkpointing else "")
                 + (f", offload {self.offload}" if self.offload != "none" else "")]
        if self.data is not None:
            lines.append(f"data     ({self.data.source}) {self.data.describe()}")
        else:
            lines.append("data     not prepared and not estimated: steps and data size unknown")
        if self.steps is not None:
            lines.append(f"steps    {self.steps.describe()}; {_n(self.steps.evaluations, 'evaluation')}, "
                         f"{_n(self.steps.checkpoints, 'checkpoint')}")
        limit = self.chosen_memory.limit_bytes
        unit = "GPU" if self.device != "cpu" else "process"
        lines += ["", f"memory per {unit}" + (f" (limit {_gib(limit)})" if limit else "") +
                  "; exact: parameters, master, gradients, optimizer states; activations "
                  f"{self.activation_method or 'not traced'}", ""]
        head = ["ZeRO", "params", "master", "grads", "optimizer", "activations", "logits", "grad buffers",
                "step", "overhead", "host", "peak", "with grad ckpt", "verdict"]
        rows = []
        chosen_key = (self.zero_stage, self.offload)
        for m, mc in zip(self.memory, self.memory_checkpointing):
            mark = " *" if (m.zero_stage, m.offload) == chosen_key else ""
            chosen = mc if self.gradient_checkpointing else m
            rows.append([f"{m.label}{mark}"] + [_gib(chosen.item(k)) for k in (
                "parameters", "master weights", "gradients", "optimizer states", "activations", "logits",
                "gradient buffers", "optimizer step", "overhead")] + [_gib(m.host_bytes), _gib(m.peak_bytes),
                                                                      _gib(mc.peak_bytes), chosen.verdict])
        lines += _table(head, rows)
        st = self.chosen_memory.state
        lines += ["", f"(* the spec's stage) {self.optimizer} updates {st.optimizer_sees}" +
                  ("; Adafactor factors 2-D second moments only under ZeRO 0" if self.optimizer == "adafactor" else ""),
                  f"train.gradient_checkpointing is {'on' if self.gradient_checkpointing else 'off'}: the spec's "
                  f"peak is the '{'with grad ckpt' if self.gradient_checkpointing else 'peak'}' column; 'host' is "
                  "what train.offload keeps in host memory per process"]
        v = self.volume
        lines += ["", f"volume   {v.message}",
                  f"         one checkpoint {_gb(self.checkpoint.total)} ({self.checkpoint.note}); one export "
                  f"{_gb(self.export_bytes)} (fp32 safetensors + tokenizer)"]
        tp = self.time
        if tp is not None:
            lines += ["", f"speed    {tp.tokens_per_s:,.0f} tokens/s ({tp.source})" if tp.tokens_per_s else
                      f"speed    {tp.source}"]
            if tp.total_s is not None:
                lines += [f"time     training {_dur(tp.train_s)} + evaluations {_dur(tp.eval_s)} + checkpoints "
                          f"{_dur(tp.checkpoint_s)} + startup, samples, export {_dur(tp.startup_s + tp.other_s)}"
                          + (f" + prepare {_dur(tp.prepare_s)}" if tp.prepare_s else "") + f" = {_dur(tp.total_s)}",
                          f"limits   #SBATCH --time={tp.slurm_time}   activeDeadlineSeconds: {tp.active_deadline_s}"
                          f"   (estimate x {TIME_MARGIN} + {TIME_MARGIN_S / 60:.0f} min)"]
                if tp.eval_s and self.data is not None:
                    lines.insert(-1, f"eval     {_n(self.steps.evaluations, 'evaluation')} x {tp.eval_blocks:,} of "
                                 f"{self.data.blocks['valid']:,} validation blocks (train.eval_blocks)"
                                 + (f" + one pass over all {tp.full_eval_blocks:,}" if tp.full_eval_blocks else "")
                                 + f": {_dur(tp.eval_s)}, {100 * tp.eval_share:.0f}% of the run")
            lines.append(f"grace    {tp.grace_s} s: #SBATCH --signal=B:USR1@{tp.grace_s}, "
                         f"terminationGracePeriodSeconds: {tp.grace_s} (a checkpoint writes in "
                         f"{tp.one_checkpoint_s:.1f} s at {tp.write_bytes_per_s / 1e6:.0f} MB/s, assumed)")
        if self.findings:
            lines += [""] + [f"{f.severity:8} {f.message}" for f in self.findings]
        return "\n".join(lines) + "\n"


def resolve_world(spec, accelerator: str, gpus: int | None = None, world: int | None = None) -> tuple[int, int, int]:
    """(world, procs_per_node, nnodes) as job/train/launch.py would start it: procs_per_node 0 means one per
    GPU (`gpus`, default 1) on CUDA and 2 on CPU."""
    r = spec.resources
    nnodes = int(r.nnodes)
    procs = int(r.procs_per_node)
    if world:
        return int(world), procs, nnodes
    per_node = procs or ((gpus or 1) if accelerator != "cpu" else 2)
    return per_node * nnodes, procs, nnodes


def resolve_precision(precision: str, accelerator: str) -> str:
    """job/train/setup.py's rule: auto is fp16 on a GPU and fp32 on CPU."""
    if precision == "auto":
        return "fp16" if accelerator != "cpu" else "fp32"
    return precision


def make_plan(arch: Architecture, spec, manifest: dict | None = None, *, activations=None,
              data: DataFigures | None = None, world: int | None = None, gpus: int | None = None,
              accelerator: str | None = None, gpu_memory_gib: float = 80.0, host_memory_gib: float | None = None,
              tokens_per_s: float | None = None, free_bytes: int | None = None, present_bytes: int = 0,
              tokenizer_bytes: int | None = None, tokenizer_vocab: int | None = None,
              write_bytes_per_s: float = CHECKPOINT_WRITE_BYTES_PER_S, name: str | None = None) -> Plan:
    """The whole plan. `arch`: the model as the run builds it (job.architecture.describe); `activations`:
    a function of (precision, device) giving job.architecture.trace_activations' figures for the spec's
    micro-batch and block (or those figures); `spec`: job.spec.JobSpec; `manifest`: data/manifest.json as
    a dict (or `data` from estimate_data_from_sample); `world` overrides what `gpus` x nodes gives;
    `accelerator`: "cuda"/"cpu" (default: the spec's, and for "auto" cuda when `gpus` is given or the
    precision is fp16, else cpu); `free_bytes`: free space on the output volume; `present_bytes`: what the
    run already has there (its data/, checkpoints)."""
    t, d = spec.train, spec.data
    if accelerator is None:
        accelerator = getattr(spec.resources, "accelerator", "auto")
        if accelerator == "auto":
            accelerator = "cuda" if gpus or t.precision == "fp16" else "cpu"
    precision = resolve_precision(t.precision, accelerator)
    world, procs, nnodes = resolve_world(spec, accelerator, gpus, world)
    if manifest is not None:
        tokenizer_vocab = tokenizer_vocab or manifest.get("tokenizer", {}).get("vocab_size")
    acts = activations(precision, accelerator) if callable(activations) else (activations or {})
    if data is None and manifest is not None:
        data = data_from_manifest(manifest)
    grad_accum, accum_problem = resolve_grad_accum(t, world)
    attention = getattr(spec.model, "attn_implementation", None) or "auto"
    offload = getattr(t, "offload", "none") or "none"
    steps = None
    if data is not None:
        steps = steps_plan(data.blocks["train"], data.blocks["valid"], world, d.block_size, t, grad_accum)
    if accelerator != "cpu":
        limit = int(gpu_memory_gib * GiB)
    else:
        limit = int(host_memory_gib * GiB / max(1, world // max(1, nnodes))) if host_memory_gib else None
    kw = dict(precision=precision, optimizer=t.optimizer, world=world, micro_batch=t.micro_batch,
              block_size=d.block_size, grad_accum=grad_accum, device=accelerator, limit_bytes=limit)
    variants = MEMORY_VARIANTS + ([] if (t.zero_stage, offload) in MEMORY_VARIANTS else [(t.zero_stage, offload)])
    memory = [memory_plan(arch, acts, zero_stage=z, offload=o, **kw) for z, o in variants]
    memory_ckpt = [memory_plan(arch, acts, zero_stage=z, offload=o, gradient_checkpointing=True, **kw)
                   for z, o in variants]
    ckpt = checkpoint_bytes(arch, precision, t.zero_stage, t.optimizer, world)
    export = export_bytes(arch, tokenizer_bytes)
    data_bytes = data.data_bytes if data is not None else 0
    other = OTHER_RUN_FILES_BYTES + (250 * steps.total_steps // max(1, t.log_every) if steps else 0)
    best = bool(data is None or data.blocks["valid"] > 0) and d.valid_fraction > 0
    to_prepare = data is not None and data.source != "manifest"
    volume = volume_plan(data_bytes, ckpt.total, t.keep_checkpoints, export, free_bytes, present_bytes, other,
                         exports=2 if best else 1, best_checkpoint=best,
                         prepare_peak_bytes=data.prepare_peak_bytes if to_prepare else 0)
    time = None
    if steps is not None:
        valid = data.blocks["valid"]
        evaluated = t.eval_blocks_for(valid, steps.tokens_trained // steps.block_size, steps.evaluations)
        full = valid if t.final_eval == "full" and evaluated < valid else 0
        time = time_plan(arch, steps, evaluated, ckpt.total, export, device=accelerator, world=world,
                         tokens_per_s=tokens_per_s, eval_every=t.eval_every, write_bytes_per_s=write_bytes_per_s,
                         prepare_text_bytes=data.text_bytes if to_prepare else 0, full_eval_blocks=full)
    ckpt_on = bool(getattr(t, "gradient_checkpointing", False))
    plan = Plan(name or spec.name, arch, accelerator, precision, t.optimizer, t.zero_stage, world, data, steps,
                memory, memory_ckpt, ckpt, export, volume, time, [], ckpt_on, grad_accum, attention, offload,
                acts.get("method", ""))
    plan.findings = findings(arch, spec, steps, data, precision=precision, device=accelerator, world=world,
                             procs_per_node=procs, nnodes=nnodes, memory=plan.chosen_memory, volume=volume,
                             time=time, tokenizer_vocab=tokenizer_vocab)
    if accum_problem:
        plan.findings.insert(0, Finding("global_batch", "error", accum_problem))
    if acts.get("bytes") is None:
        plan.findings.append(Finding("activations", "note", "activation memory could not be traced for this "
                                     f"model ({acts.get('method', 'no trace')}); the peaks leave it out"))
    if getattr(t, "early_stopping_patience", 0) and time is not None:
        plan.findings.append(Finding("early_stopping", "note", "train.early_stopping_patience is set: the run may "
                                     "stop sooner; the time figures are for every step"))
    return plan


# ------------------------------------------------------------------ formatting helpers


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    if n == 0:
        return "0"
    if n < GiB:
        return f"{n / MiB:.1f} MiB" if n < 100 * MiB else f"{n / MiB:.0f} MiB"
    return f"{n / GiB:.2f} GiB"


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _dur(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]

    def fmt(row):
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
