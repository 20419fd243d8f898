"""SQLite rows -> cleaned texts -> train/validation split -> text shards -> token shards + manifest.

Memory does not grow with the corpus. One pass streams the rows; every UNIT_BYTES of usable texts is a
work unit (independent of data.shards) for one of data.workers processes (default: one per core), which
writes the unit's JSON lines and token ids to files of its own, batch by batch; the units' files are
appended to one text file and one token file in reading order, so the result is the same on any number
of processes. The split is made on document indices as sklearn's train_test_split makes it, which gives
the same membership and order as splitting the list of texts itself (the original run's 2635 / 659 from
3294 texts). The shards are then copied document by document, in split order, from the two files, memory
mapped. So the `ftjob` process holds the units in flight and per-document offsets and token counts, never
all the texts; a worker one unit and the tokens of one batch.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import resource
import shutil
import time
from concurrent import futures
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from json.encoder import encode_basestring
from pathlib import Path

import numpy as np

from .. import families, pretrained
from ..errors import DataError
from ..progress import Progress
from ..rundir import RunPaths, atomic_dir, read_manifest
from ..spec import JobSpec
from .shards import TokenShard, TokenShardWriter, token_dtype
from .sqlite_source import TextSource, check_source, iter_texts

log = logging.getLogger("ftjob")

FORMAT_VERSION = 1  # bump when the shard layout or the packing rule changes: old manifests then rebuild
SPLITS = ("train", "valid")


def text_source(spec: JobSpec) -> TextSource:
    d = spec.data
    return TextSource(d.database, d.table, d.text_column, d.query, d.limit, d.chunk_rows)


# The data keys that decide which blocks a run trains on; `database` (where the rows come from) is the
# source, tracked apart: a run keeps its own snapshot when only the source changed.
SETTINGS_KEYS = ("table", "text_column", "query", "limit", "valid_fraction", "split_seed", "shards", "block_size")


def data_settings(spec: JobSpec, tok) -> dict:
    """What the prepared blocks depend on, with data.join: auto resolved (a run prepared before `auto`
    existed recorded the join it used, so it keeps matching)."""
    return {**{k: getattr(spec.data, k) for k in SETTINGS_KEYS}, "join": resolve_join(spec, tok),
            "tokenizer": pretrained.tokenizer_fingerprint(tok), "format": FORMAT_VERSION}


def resolve_join(spec: JobSpec, tok) -> str:
    """data.join, with auto replaced by the model family's default (job/families.py)."""
    if spec.data.join != "auto":
        return spec.data.join
    model_type = pretrained.model_facts(spec.model)["model_type"]
    return families.join_for(model_type, pretrained.adds_bos(tok), tok.bos_token_id is not None,
                             tok.eos_token_id is not None)


def document_boundaries(tok, join: str) -> tuple[list[int], list[int]]:
    """(ids before, ids after) each document in the token stream: "newline" ends it with the tokens of a
    newline (the original run joined its texts with newlines), "eos" with EOS, "bos_eos" also starts it
    with BOS, as Llama-style models saw their pretraining documents."""
    if join == "newline":
        return [], tok("\n", add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is None:
        raise DataError(f"data.join: {join}, but the tokenizer has no end-of-text token; use data.join: newline")
    if join == "bos_eos" and tok.bos_token_id is None:
        raise DataError("data.join: bos_eos, but the tokenizer has no begin-of-text token; use data.join: eos")
    return ([tok.bos_token_id] if join == "bos_eos" else []), [tok.eos_token_id]


def source_identity(spec: JobSpec) -> dict:
    """The database by path, size and modification time, not content: hashing a many-GB file on every
    start would cost more than the check saves."""
    st = os.stat(spec.data.database)
    return {"database": str(Path(spec.data.database).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def input_hash(settings: dict, source: dict) -> str:
    """What the shards depend on: rebuilt when this changes (and the run has no checkpoint yet)."""
    return hashlib.sha256(json.dumps({**settings, "source": source}, sort_keys=True).encode()).hexdigest()


def changed_settings(manifest: dict, settings: dict) -> list[str]:
    """The data keys whose value differs from the one the prepared data was built with."""
    built = manifest.get("settings", {})
    return [k for k in settings if built.get(k) != settings[k]]


def tokenizer_for(spec: JobSpec):
    name = spec.model.tokenizer or spec.model.path
    return name, pretrained.load_tokenizer(name, "model.tokenizer" if spec.model.tokenizer else "model.path")


def manifest_is_current(paths: RunPaths, expected_hash: str) -> bool:
    m = read_manifest(paths)
    if not m or m.get("input_hash") != expected_hash:
        return False
    for split in SPLITS:
        for shard in m["splits"][split]["shards"]:
            p = paths.data / shard["tokens"]
            if not p.exists() or p.stat().st_size != shard["tokens_bytes"]:
                return False
    return True


def prepare(spec: JobSpec, paths: RunPaths, force: bool = False, interval_s: float = 30.0) -> dict:
    """Build the data directory, or do nothing when the manifest says the inputs have not changed."""
    check_source(text_source(spec))
    tok_name, tok = tokenizer_for(spec)
    settings, source = data_settings(spec, tok), source_identity(spec)
    expected = input_hash(settings, source)
    if not force and manifest_is_current(paths, expected):
        log.info("prepare: inputs unchanged since %s, nothing to do (%s)", read_manifest(paths)["created"],
                 paths.manifest)
        return read_manifest(paths)

    boundaries = document_boundaries(tok, settings["join"])
    dtype = token_dtype(len(tok))
    t0 = time.perf_counter()
    with atomic_dir(paths.data) as build:
        corpus = _read_and_tokenise(spec, build, tok.backend_tokenizer.to_str(), dtype, interval_s)
        t_tokens = time.perf_counter() - t0
        split_order = _split(corpus.n_docs, spec.data.valid_fraction, spec.data.split_seed)
        shards = _write_shards(corpus, split_order, spec.data.shards, spec.data.block_size, boundaries, dtype,
                               build, paths)
        corpus.remove()
        seconds = {"read": corpus.read_s, "tokenise": t_tokens - corpus.read_s,
                   "shards": time.perf_counter() - t0 - t_tokens, "total": time.perf_counter() - t0}
        manifest = _manifest(spec, tok, tok_name, expected, settings, source, corpus, split_order, shards,
                             boundaries, dtype, seconds)
        (build / paths.manifest.name).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    counts = corpus.counts
    log.info("prepare: %d rows read, %d dropped, %d train / %d valid documents, %d / %d blocks of %d tokens "
             "in %.1fs", counts["rows_read"], counts["rows_dropped"], manifest["splits"]["train"]["documents"],
             manifest["splits"]["valid"]["documents"], manifest["splits"]["train"]["blocks"],
             manifest["splits"]["valid"]["blocks"], spec.data.block_size, manifest["seconds"]["total"])
    valid = manifest["splits"]["valid"]
    if valid["documents"] and not valid["blocks"]:
        # Each shard cuts its own blocks, so a small validation split spread over many shards can make none.
        log.warning("prepare: warning: the %d validation tokens in %d shards make no block of %d tokens, so the "
                    "run reports no validation loss and keeps no best model; raise data.valid_fraction or lower "
                    "data.shards or data.block_size", valid["tokens"], spec.data.shards, spec.data.block_size)
    return manifest


@dataclass
class Corpus:
    """Every usable document, in reading order: texts as JSON lines in one file, token ids in another."""
    texts: Path
    tokens: Path
    text_offsets: np.ndarray  # n_docs + 1 byte offsets: document i is texts[offsets[i]:offsets[i + 1]]
    token_lengths: np.ndarray  # tokens of each document, without its boundaries
    counts: dict
    read_s: float
    worker_max_rss: int | None  # peak RSS of the largest tokenising process, bytes (None: tokenised here)
    processes: int  # tokenising processes (0: tokenised in the job's process)

    @property
    def n_docs(self) -> int:
        return len(self.token_lengths)

    def remove(self) -> None:
        self.texts.unlink()
        self.tokens.unlink()


UNIT_BYTES = 1 << 20  # text per work unit: handing it over costs nothing beside tokenising it, and the
# processes finish together
BATCH_DOCS, BATCH_BYTES = 1024, 1 << 20  # documents per tokenizer call: bounds a worker's memory
IN_PROCESS_TEXT_BYTES = 16 << 20  # below this, tokenising processes cost more (start, tokenizer load) than they save
IN_FLIGHT_PER_WORKER = 2  # units handed out and not yet collected: keeps every process busy, bounds memory


def _read_and_tokenise(spec: JobSpec, build: Path, tokenizer_json: str, dtype: np.dtype, interval_s: float) -> Corpus:
    """Stream rows once, dropping unusable texts; every UNIT_BYTES of texts goes to a tokenising process,
    which writes their JSON lines and their token ids to files of its own. This process only reads and
    decodes rows and hands them over: about 100 MB/s of the demo's 350-byte rows, 300 MB/s of 5 KB pages,
    on one core (BENCHMARKS.md), against 2-3 MB/s per core for a 32K BPE tokenizer: reading does not hold
    the workers back below 40-100 tokenising cores."""
    counts = {"rows_read": 0, "rows_dropped": 0, "dropped_null": 0, "dropped_blank": 0}
    t0 = time.perf_counter()
    with _Tokeniser(build, tokenizer_json, dtype, spec.data.workers) as tokeniser, \
            Progress(spec.data.limit, "reading and tokenising", "rows", interval_s) as bar:
        unit, size = [], 0
        for text in iter_texts(text_source(spec)):
            counts["rows_read"] += 1
            if text is None or not text or text.isspace():  # not text.strip(), without copying the text
                counts["rows_dropped"] += 1
                counts["dropped_null" if text is None else "dropped_blank"] += 1
            else:
                unit.append(text)
                size += len(text)
                if size >= UNIT_BYTES:
                    tokeniser.submit(unit)
                    unit, size = [], 0
            if counts["rows_read"] % 1000 == 0:
                bar.update(1000, tokens=tokeniser.n_tokens)
        if unit:
            tokeniser.submit(unit)
        read_s = time.perf_counter() - t0
        if not counts["rows_read"] - counts["rows_dropped"]:
            raise DataError(f"data: no usable rows in {text_source(spec).describe()} ({counts['rows_read']} read, "
                            "all NULL, empty or whitespace)")
        tokeniser.finish()
        bar.update(counts["rows_read"] % 1000, tokens=tokeniser.n_tokens)
    line_lengths = np.concatenate(tokeniser.line_lengths)
    return Corpus(tokeniser.texts, tokeniser.tokens, np.concatenate([[0], np.cumsum(line_lengths)]),
                  np.concatenate(tokeniser.token_lengths), counts, read_s, tokeniser.worker_max_rss,
                  tokeniser.n_workers if tokeniser.pool else 0)


def _json_line(text: str) -> bytes:
    """json.dumps({"text": text}, ensure_ascii=False) + newline, byte for byte, without the encoder's
    Python layers (a third of the time otherwise)."""
    return b'{"text": ' + encode_basestring(text).encode() + b"}\n"


class _Tokeniser:
    """Work units (lists of texts) to `workers` processes, or to this process while the text is small and
    data.workers is 0 (one per core). Their text and token files are appended to the corpus files in the
    order the units were read, whatever order they finish in, so the result is the same on any number of
    processes; at most IN_FLIGHT_PER_WORKER units per process are out at a time."""

    def __init__(self, build: Path, tokenizer_json: str, dtype: np.dtype, workers: int):
        self.texts, self.tokens = build / "all.jsonl", build / "all.tok"
        self.unit_dir = build / "units"
        self.unit_dir.mkdir()
        self.work = functools.partial(tokenise_unit, dtype=dtype.str)
        self.tokenizer_json = tokenizer_json
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.pending: list[tuple] = []  # units kept here until a pool starts (or, for small data, never does)
        self.in_flight: collections.deque = collections.deque()
        self.units = self.text_bytes = self.n_tokens = 0
        self.line_lengths: list[np.ndarray] = []
        self.token_lengths: list[np.ndarray] = []
        self.worker_max_rss: int | None = None
        # Unbuffered: units are appended by the kernel (copy_file_range), never through a Python buffer.
        self.out_texts, self.out_tokens = open(self.texts, "wb", buffering=0), open(self.tokens, "wb", buffering=0)
        if workers:
            self._start(workers)

    def _start(self, n: int) -> None:
        self.pool = _process_pool(n, initializer=_worker_init, initargs=(self.tokenizer_json,))
        self.n_workers = n
        for unit in self.pending:
            self.in_flight.append(self.pool.submit(self.work, *unit))
        self.pending = []

    def submit(self, texts: list[str]) -> None:
        stem = str(self.unit_dir / f"{self.units:06d}")
        self.units += 1
        self.text_bytes += sum(map(len, texts))
        unit = (texts, stem + ".jsonl", stem + ".tok")
        if self.pool is None:
            self.pending.append(unit)
            if not self.workers and self.text_bytes >= IN_PROCESS_TEXT_BYTES:
                self._start(os.cpu_count() or 1)
            return
        self.in_flight.append(self.pool.submit(self.work, *unit))
        while len(self.in_flight) > IN_FLIGHT_PER_WORKER * self.n_workers:
            self._collect(self.in_flight.popleft().result())

    def finish(self) -> None:
        """Collect every unit still out (or, small data, tokenise them here)."""
        if self.pool is None:
            _load_encoder(self.tokenizer_json)
            for unit in self.pending:
                self._collect(self.work(*unit), worker=False)
        while self.in_flight:
            self._collect(self.in_flight.popleft().result())
        self.out_texts.close()
        self.out_tokens.close()
        self.unit_dir.rmdir()

    def _collect(self, result: dict, worker: bool = True) -> None:
        for path, out in ((result["texts"], self.out_texts), (result["tokens"], self.out_tokens)):
            with open(path, "rb") as f:
                _append(f, out)
            os.unlink(path)
        self.line_lengths.append(result["line_lengths"])
        self.token_lengths.append(result["token_lengths"])
        self.n_tokens += int(result["token_lengths"].sum())
        if worker:
            self.worker_max_rss = max(self.worker_max_rss or 0, result["max_rss"])

    def __enter__(self) -> "_Tokeniser":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.out_texts.close()
        self.out_tokens.close()


def _process_pool(n: int, **kwargs) -> ProcessPoolExecutor:
    """Processes from a fork server that imported only this module: their memory is theirs alone, not a
    copy of whatever the job's process holds by then, and no thread of the job's process is forked."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(n, mp_context=context, **kwargs)


def _append(src, dst) -> None:
    """Append file src to dst; in the kernel where it can (copy_file_range), else through a buffer."""
    size = os.fstat(src.fileno()).st_size
    try:
        while size > 0:
            n = os.copy_file_range(src.fileno(), dst.fileno(), size)
            if n == 0:
                break
            size -= n
    except (AttributeError, OSError):  # not Linux, or a file system without it
        src.seek(os.fstat(src.fileno()).st_size - size)
        dst.seek(0, os.SEEK_END)
        shutil.copyfileobj(src, dst, 1 << 20)


_encode = None  # this process's tokenizing function


def _load_encoder(tokenizer_json: str) -> None:
    """The Rust tokenizer the job loaded, rebuilt from its JSON: no transformers import in a worker, and
    no chance of another one. Called directly, it skips the Python BatchEncoding wrapper, and
    encode_batch_fast skips character offsets we never use (about 30% faster than tok(batch) on one core)."""
    from tokenizers import Tokenizer

    global _encode
    backend = Tokenizer.from_str(tokenizer_json)
    _encode = getattr(backend, "encode_batch_fast", backend.encode_batch)


def _worker_init(tokenizer_json: str) -> None:
    # Each process tokenises its own units on one core: the tokenizer's own threads would only compete.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _load_encoder(tokenizer_json)


def tokenise_unit(texts: list[str], text_path: str, token_path: str, dtype: str) -> dict:
    """One work unit: the texts' JSON lines to text_path, their token ids to token_path, BATCH_DOCS /
    BATCH_BYTES at a time: memory holds the unit and one batch's tokens, however much text the corpus
    has. Returns each document's line length and token count, and this process's peak RSS."""
    line_lengths = np.empty(len(texts), dtype=np.int64)
    token_lengths = np.empty(len(texts), dtype=np.int64)
    with open(text_path, "wb") as text_out, open(token_path, "wb") as token_out:
        i = 0
        while i < len(texts):
            j, size = i, 0
            while j < len(texts) and j - i < BATCH_DOCS and size < BATCH_BYTES:
                size += len(texts[j])
                j += 1
            lines = [_json_line(t) for t in texts[i:j]]
            text_out.write(b"".join(lines))
            line_lengths[i:j] = [len(x) for x in lines]
            ids = [e.ids for e in _encode(texts[i:j], add_special_tokens=False)]
            token_lengths[i:j] = [len(x) for x in ids]
            token_out.write(np.fromiter(itertools.chain.from_iterable(ids), dtype,
                                        count=int(token_lengths[i:j].sum())).data)
            i = j
    return {"texts": text_path, "tokens": token_path, "line_lengths": line_lengths, "token_lengths": token_lengths,
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _split(n_docs: int, valid_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """sklearn's train_test_split(range(n_docs), test_size=valid_fraction, random_state=seed), computed as it
    does (ceil(fraction x n) validation documents first in one RandomState(seed) permutation, the rest for
    training; tests/unit/test_data.py compares the two) without importing scikit-learn (2-3 s)."""
    if valid_fraction == 0:
        return {"train": np.arange(n_docs), "valid": np.arange(0)}
    if round(n_docs * valid_fraction) < 1 or n_docs - n_docs * valid_fraction < 1:
        raise DataError(f"data.valid_fraction: {n_docs} usable documents are too few to split "
                        f"{valid_fraction} off for validation; add rows or change data.valid_fraction")
    n_valid = math.ceil(valid_fraction * n_docs)
    order = np.random.RandomState(seed).permutation(n_docs)
    return {"train": order[n_valid:], "valid": order[:n_valid]}


def _write_shards(corpus: Corpus, split_order, n_shards: int, block_size: int,
                  boundaries: tuple[list[int], list[int]], dtype: np.dtype, build: Path,
                  paths: RunPaths) -> dict[str, list[dict]]:
    """Each split's documents, in split order, cut into n contiguous shards. A text shard holds their JSON
    lines; a token shard their tokens, each document between its boundaries (document_boundaries), cut into blocks of
    block_size, the tail shorter than a block dropped (as the original run's TextDataset did). Shards are
    written in parallel, on as many processes as tokenised (at most one per shard)."""
    text_dir, token_dir = (p.relative_to(paths.data) for p in (paths.text_shards, paths.token_shards))
    (build / text_dir).mkdir()
    (build / token_dir).mkdir()
    t = corpus.text_offsets
    k = np.concatenate([[0], np.cumsum(corpus.token_lengths)]) * dtype.itemsize
    prefix, suffix = (np.asarray(ids, dtype).tobytes() for ids in boundaries)
    around = len(boundaries[0]) + len(boundaries[1])
    jobs, shards = [], {split: [] for split in split_order}
    for split, order in split_order.items():
        for i, part in enumerate(np.array_split(order, min(n_shards, max(1, len(order))))):
            name = f"{split}-{i:05d}"
            n_tokens = int(corpus.token_lengths[part].sum()) + around * len(part)
            shards[split].append({"text": f"{text_dir}/{name}.jsonl", "documents": int(len(part)),
                                  "tokens": f"{token_dir}/{name}.bin", "n_tokens": n_tokens,
                                  "blocks": n_tokens // block_size})
            jobs.append((split, len(shards[split]) - 1, part, n_tokens // block_size, name))
    work = functools.partial(write_shard, texts=str(corpus.texts), tokens=str(corpus.tokens), prefix=prefix, suffix=suffix,
                             dtype=dtype.str, block_size=block_size)

    def args(job):
        _, _, part, n_blocks, name = job
        return (np.stack([t[part], t[part + 1]], 1), np.stack([k[part], k[part + 1]], 1), n_blocks,
                str(build / text_dir / f"{name}.jsonl"), str(build / token_dir / f"{name}.bin"))

    processes = min(corpus.processes, len(jobs))
    if processes > 1:
        results, running = [], {}
        with _process_pool(processes) as pool:
            for job in jobs:  # at most one shard's document ranges per process at a time
                if len(running) >= processes:
                    done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                    results += [(running.pop(f), f.result()) for f in done]
                running[pool.submit(work, *args(job))] = job
            results += [(job, f.result()) for f, job in running.items()]
    else:
        results = [(job, work(*args(job))) for job in jobs]
    for (split, i, *_), result in results:
        shards[split][i].update(result)
    return shards


SHARD_CHUNK_DOCS = 4096  # documents copied per write while making shards (at most a few MB of text)


def write_shard(text_ranges: np.ndarray, token_ranges: np.ndarray, n_blocks: int, text_path: str, token_path: str,
                texts: str, tokens: str, prefix: bytes, suffix: bytes, dtype: str, block_size: int) -> dict:
    """One text shard and its token shard, from its documents' byte ranges in the corpus files, read with
    pread a chunk of documents at a time: memory holds one chunk; the files stay in the page cache, not in
    this process (a memory map would count every page it touched as the process's resident memory)."""
    dtype = np.dtype(dtype)
    text_sha, text_bytes, read = hashlib.sha256(), 0, os.pread
    fd_texts, fd_tokens = os.open(texts, os.O_RDONLY), os.open(tokens, os.O_RDONLY)
    try:
        with open(text_path, "wb") as text_out, \
                TokenShardWriter(Path(token_path), block_size, n_blocks, dtype) as token_out:
            for start in range(0, len(text_ranges), SHARD_CHUNK_DOCS):
                chunk = slice(start, start + SHARD_CHUNK_DOCS)
                lines = b"".join([read(fd_texts, b - a, a) for a, b in text_ranges[chunk].tolist()])
                text_out.write(lines)
                text_sha.update(lines)
                text_bytes += len(lines)
                ids = b"".join([prefix + read(fd_tokens, b - a, a) + suffix for a, b in token_ranges[chunk].tolist()])
                token_out.write(np.frombuffer(ids, dtype))
    finally:
        os.close(fd_texts)
        os.close(fd_tokens)
    return {"text_bytes": text_bytes, "text_sha256": text_sha.hexdigest(), "tokens_bytes": token_out.bytes,
            "tokens_sha256": token_out.sha256.hexdigest()}


def _manifest(spec, tok, tok_name, expected, settings, source, corpus: Corpus, split_order, shards, boundaries,
              dtype, seconds):
    splits = {}
    for split in SPLITS:
        splits[split] = {"documents": int(len(split_order[split])), "shards": shards[split],
                         "tokens": sum(s["n_tokens"] for s in shards[split]),
                         "blocks": sum(s["blocks"] for s in shards[split]),
                         "text_bytes": sum(s["text_bytes"] for s in shards[split])}
    return {
        "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "input_hash": expected,
        "source": text_source(spec).describe(), "settings": settings, "source_identity": source, **corpus.counts,
        "tokenizer": {"source": tok_name, "fingerprint": pretrained.tokenizer_fingerprint(tok),
                      "vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
                      "document_prefix": boundaries[0], "document_suffix": boundaries[1]},
        "block_size": spec.data.block_size, "dtype": dtype.name, "join": settings["join"], "splits": splits,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "worker_max_rss_bytes": corpus.worker_max_rss,
    }


def open_split(paths: RunPaths, split: str) -> list[TokenShard]:
    m = read_manifest(paths)
    if m is None:
        raise DataError(f"no data manifest at {paths.manifest}; run `ftjob prepare` first")
    return [TokenShard.open(paths.data / s["tokens"]) for s in m["splits"][split]["shards"]]
