"""A small on-disk cache of JSON facts that cost an import of transformers (and torch) to compute: what a
tokenizer and a config are once transformers has built them, and the plan's description of a model.

A key holds every input of the computation (file identities, spec values, the transformers version, the
source of the module that computes it), so a change to any of them computes again. A cache that cannot be
read or written (a read-only home in a container) is skipped, never an error. The place:
FTJOB_CACHE_DIR, else $XDG_CACHE_HOME/ftjob, else ~/.cache/ftjob.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("FTJOB_CACHE_DIR"):
        return Path(os.environ["FTJOB_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftjob"


def cached(kind: str, key: dict, compute):
    """compute()'s JSON-serialisable result, kept under cache_dir()/kind/<sha256 of key>."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    path = cache_dir() / kind / f"{digest[:32]}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(value), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
    return value


@functools.cache
def source_hash(path: str) -> str:
    """The source of the module that computes a cached value: part of its key."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@functools.cache
def library_versions() -> str:
    """transformers' and tokenizers' versions (read from their metadata, without importing them)."""
    out = []
    for name in ("transformers", "tokenizers"):
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name}: none")
    return ",".join(out)


def files_identity(directory: Path, skip_suffixes: tuple[str, ...] = ()) -> list:
    """(name, size, mtime) of every file of a directory: what loading from it depends on, without reading
    the files (a multi-GB weights file is skipped by suffix)."""
    out = []
    for f in sorted(Path(directory).iterdir()):
        if f.is_file() and not f.name.endswith(skip_suffixes):
            st = f.stat()
            out.append([f.name, st.st_size, st.st_mtime_ns])
    return out
