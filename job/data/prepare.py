"""SQLite rows -> cleaned texts -> train/validation split -> text shards -> token shards + manifest.

The split is made on document indices with sklearn's train_test_split, which gives the same membership
and order as splitting the list of texts itself (the original run's 2635 / 659 from 3294 texts), while
the texts stay on disk: memory holds one offset per document, not the documents.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .. import families, pretrained
from ..errors import DataError
from ..progress import Progress
from ..rundir import RunPaths, atomic_dir, read_manifest, sha256_file
from ..spec import JobSpec
from .shards import TokenShard, token_dtype, write_token_shard
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

    t0 = time.perf_counter()
    text_dir, token_dir = (p.relative_to(paths.data) for p in (paths.text_shards, paths.token_shards))
    with atomic_dir(paths.data) as build:
        (build / text_dir).mkdir()
        (build / token_dir).mkdir()
        counts, offsets, all_docs = _collect(spec, build, interval_s)
        split_order = _split(len(offsets), spec.data.valid_fraction, spec.data.split_seed)
        text_shards = _write_text_shards(all_docs, offsets, split_order, spec.data.shards, build / text_dir)
        all_docs.unlink()
        t_text = time.perf_counter() - t0
        boundaries = document_boundaries(tok, settings["join"])
        dtype = token_dtype(len(tok))
        tokenise = functools.partial(tokenise_shard, build=build, tok_name=tok_name, boundaries=boundaries,
                                     block_size=spec.data.block_size, dtype=dtype.str, token_dir=str(token_dir))
        token_stats = _tokenise_all(text_shards, tokenise, spec.data.workers, interval_s)
        manifest = _manifest(spec, tok, tok_name, expected, settings, source, counts, split_order, text_shards,
                             token_stats, boundaries, dtype, t_text, time.perf_counter() - t0)
        (build / paths.manifest.name).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
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


def _collect(spec: JobSpec, build: Path, interval_s: float):
    """Stream rows once: drop unusable texts, append the rest to one file, remember where each starts."""
    counts = {"rows_read": 0, "rows_dropped": 0, "dropped_null": 0, "dropped_blank": 0}
    offsets: list[int] = []
    path = build / "all.jsonl"
    total = spec.data.limit
    with open(path, "wb") as out, Progress(total, "reading rows", "rows", interval_s) as bar:
        for text in iter_texts(text_source(spec)):
            counts["rows_read"] += 1
            if text is None or not text.strip():
                counts["rows_dropped"] += 1
                counts["dropped_null" if text is None else "dropped_blank"] += 1
            else:
                offsets.append(out.tell())
                out.write(json.dumps({"text": text}, ensure_ascii=False).encode() + b"\n")
            bar.update(1)
    if not offsets:
        raise DataError(f"data: no usable rows in {text_source(spec).describe()} ({counts['rows_read']} read, "
                        "all NULL, empty or whitespace)")
    return counts, np.asarray(offsets, dtype=np.int64), path


def _split(n_docs: int, valid_fraction: float, seed: int) -> dict[str, np.ndarray]:
    if valid_fraction == 0:
        return {"train": np.arange(n_docs), "valid": np.arange(0)}
    if round(n_docs * valid_fraction) < 1 or n_docs - n_docs * valid_fraction < 1:
        raise DataError(f"data.valid_fraction: {n_docs} usable documents are too few to split "
                        f"{valid_fraction} off for validation; add rows or change data.valid_fraction")
    from sklearn.model_selection import train_test_split

    train, valid = train_test_split(np.arange(n_docs), test_size=valid_fraction, random_state=seed)
    return {"train": train, "valid": valid}


def _write_text_shards(all_docs: Path, offsets: np.ndarray, split_order, n_shards: int, text_dir: Path):
    """Each split's documents, in split order, cut into n contiguous text shards (JSON lines)."""
    shards = {}
    with open(all_docs, "rb") as src:
        for split, order in split_order.items():
            shards[split] = []
            n = min(n_shards, max(1, len(order)))
            for i, part in enumerate(np.array_split(order, n)):
                rel = f"{text_dir.name}/{split}-{i:05d}.jsonl"
                h, size = hashlib.sha256(), 0
                with open(text_dir / Path(rel).name, "wb") as out:
                    for doc in part:
                        src.seek(int(offsets[doc]))
                        line = src.readline()
                        out.write(line)
                        h.update(line)
                        size += len(line)
                shards[split].append({"text": rel, "documents": int(len(part)), "text_bytes": size,
                                      "text_sha256": h.hexdigest()})
    return shards


IN_PROCESS_TEXT_BYTES = 16e6  # below this, starting tokenising processes costs more than it saves


def _tokenise_all(text_shards, tokenise, workers, interval_s):
    """`tokenise` on every text shard: one process per core (data.workers: 0), or as many as asked. Small
    data (data.workers: 0 and under 16 MB of text) is tokenised in this process: each worker process
    would spend a second or two importing transformers for a fraction of that in work."""
    jobs = [(split, s) for split in SPLITS for s in text_shards[split]]
    small = sum(s["text_bytes"] for _, s in jobs) < IN_PROCESS_TEXT_BYTES
    workers = workers or (1 if small else os.cpu_count() or 1)
    workers = max(1, min(workers, len(jobs)))
    results = {}
    with Progress(len(jobs), "tokenising", "shards", interval_s) as bar:
        if workers == 1:
            outs = map(tokenise, [s for _, s in jobs])
        else:
            pool = ProcessPoolExecutor(workers)
            outs = pool.map(tokenise, [s for _, s in jobs])
        for (split, shard), out in zip(jobs, outs):
            results[(split, shard["text"])] = out
            bar.update(1, tokens=sum(r["n_tokens"] for r in results.values()))
        if workers > 1:
            pool.shutdown()
    return results


def tokenise_shard(shard: dict, build: Path, tok_name: str, boundaries: tuple[list[int], list[int]],
                   block_size: int, dtype: str, token_dir: str) -> dict:
    """One text shard -> one token shard. Runs in a worker process; each document is put between
    `boundaries` (document_boundaries) and the stream is cut into blocks of block_size, the tail shorter
    than a block dropped (as the original run's TextDataset did)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per shard already uses every core
    tok = pretrained.load_tokenizer(tok_name)
    # The Rust tokenizer directly: skips the Python BatchEncoding wrapper, and encode_batch_fast skips
    # character offsets we never use (about 30% faster than tok(batch) on one core).
    backend = tok.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    prefix, suffix = boundaries
    pieces, batch = [], []

    def flush():
        encodings = encode(batch, add_special_tokens=False)
        pieces.append(np.fromiter(itertools.chain.from_iterable(prefix + e.ids + suffix for e in encodings), np.int64))
        batch.clear()

    with open(build / shard["text"], encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1024:
                flush()
    if batch:
        flush()
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    n_tokens = len(stream)
    n_blocks = n_tokens // block_size
    blocks = stream[: n_blocks * block_size].astype(dtype).reshape(n_blocks, block_size)
    rel = f"{token_dir}/{Path(shard['text']).stem}.bin"
    write_token_shard(build / rel, blocks)
    return {"tokens": rel, "n_tokens": int(n_tokens), "blocks": int(n_blocks),
            "tokens_bytes": (build / rel).stat().st_size, "tokens_sha256": sha256_file(build / rel)}


def _manifest(spec, tok, tok_name, expected, settings, source, counts, split_order, text_shards, token_stats,
              boundaries, dtype, t_text, t_total):
    splits = {}
    for split in SPLITS:
        shards = [{**s, **token_stats[(split, s["text"])]} for s in text_shards[split]]
        splits[split] = {"documents": int(len(split_order[split])), "shards": shards,
                         "tokens": sum(s["n_tokens"] for s in shards), "blocks": sum(s["blocks"] for s in shards),
                         "text_bytes": sum(s["text_bytes"] for s in shards)}
    return {
        "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "input_hash": expected,
        "source": text_source(spec).describe(), "settings": settings, "source_identity": source, **counts,
        "tokenizer": {"source": tok_name, "fingerprint": pretrained.tokenizer_fingerprint(tok),
                      "vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
                      "document_prefix": boundaries[0], "document_suffix": boundaries[1]},
        "block_size": spec.data.block_size, "dtype": dtype.name, "join": settings["join"], "splits": splits,
        "seconds": {"text": round(t_text, 3), "tokenise": round(t_total - t_text, 3), "total": round(t_total, 3)},
    }


def open_split(paths: RunPaths, split: str) -> list[TokenShard]:
    m = read_manifest(paths)
    if m is None:
        raise DataError(f"no data manifest at {paths.manifest}; run `ftjob prepare` first")
    return [TokenShard.open(paths.data / s["tokens"]) for s in m["splits"][split]["shards"]]
