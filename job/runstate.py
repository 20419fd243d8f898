"""Small files that say where a run stands: state.json and the JSON-lines logs.

Written by rank 0 only; `ftjob status` reads them from a login node while the job runs elsewhere.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .paths import RunPaths


def write_state(paths: RunPaths, **fields) -> None:
    """Merge fields into state.json; replaced atomically so a reader never sees half a file."""
    state = read_state(paths)
    state.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    tmp = paths.state.with_name(f".state.json.{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, paths.state)


def read_state(paths: RunPaths) -> dict:
    try:
        return json.loads(paths.state.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut short by a kill; the rest of the file is still good
    return out


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only records up to `last_step`: a resumed run trains the later steps again."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
