"""`ftjob prepare` at scale, in bounded memory: a generated corpus of more than 50 MB as one shard with one
tokenising worker, against its first fifth; and the same token shards on any number of workers."""
from __future__ import annotations

import sqlite3
import time

import pytest

from job import spec as spec_lib
from job.data.prepare import UNIT_BYTES, prepare
from job.demo import write_database
from job.rundir import RunPaths

pytestmark = pytest.mark.slow

ROWS = 160_000  # the demo's grammar: about 56 MB of text, 55 work units of 1 MB


@pytest.fixture(scope="module")
def corpus(demo_assets, tmp_path_factory):
    """20,000 demo rows, then the table doubled three times inside SQLite (seconds, not a minute of Python)."""
    tmp = tmp_path_factory.mktemp("scale")
    db = write_database(tmp / "big.sqlite", n_rows=ROWS // 8)
    with sqlite3.connect(db) as conn:
        for _ in range(3):
            conn.execute("INSERT INTO en SELECT * FROM en")
    conn.close()
    return tmp, db


def prepared(corpus, demo_assets, name: str, **data) -> tuple[dict, RunPaths, float]:
    tmp, db = corpus
    spec = spec_lib.from_dict({"name": name, "output_dir": str(tmp / "runs"), "model": {"path": str(demo_assets.model)},
                               "data": {"database": str(db), "table": "en", "text_column": "body_text",
                                        "shards": 1, **data}})
    paths = RunPaths(spec.run_dir)
    paths.root.mkdir(parents=True)
    t0 = time.perf_counter()
    manifest = prepare(spec, paths)
    return manifest, paths, time.perf_counter() - t0


def token_bytes(manifest: dict, paths: RunPaths) -> dict[str, bytes]:
    return {s["tokens"]: (paths.data / s["tokens"]).read_bytes()
            for split in ("train", "valid") for s in manifest["splits"][split]["shards"]}


def test_a_workers_memory_does_not_grow_with_its_shard_and_any_number_of_workers_gives_the_same_shards(
        corpus, demo_assets):
    """One worker tokenises all of a 56 MB corpus into one shard per split, then the corpus's first fifth:
    its peak RSS (measured inside the worker) stays within a few MB, where holding the shard's tokens
    would add about 16 bytes per token (here 170 MB). The first fifth again on 4 workers: the same token
    shards, byte for byte (units finish in any order; they are joined in reading order)."""
    full, _, full_s = prepared(corpus, demo_assets, "full", workers=1)
    text_bytes = sum(full["splits"][s]["text_bytes"] for s in ("train", "valid"))
    tokens = sum(full["splits"][s]["tokens"] for s in ("train", "valid"))
    assert text_bytes > 50e6 and text_bytes > 10 * UNIT_BYTES
    fifth, fifth_paths, fifth_s = prepared(corpus, demo_assets, "fifth", workers=1, limit=ROWS // 5)
    grew = full["worker_max_rss_bytes"] - fifth["worker_max_rss_bytes"]
    print(f"\n{text_bytes / 1e6:.0f} MB, {tokens:,} tokens in {full_s:.1f} s; worker peak RSS "
          f"{full['worker_max_rss_bytes'] / 2**20:.0f} MiB, first fifth {fifth['worker_max_rss_bytes'] / 2**20:.0f} "
          f"MiB ({fifth_s:.1f} s)")
    assert abs(grew) <= 8 * 2**20, f"the worker's peak RSS grew by {grew / 2**20:.0f} MiB with 5x the text"

    four, four_paths, _ = prepared(corpus, demo_assets, "four", workers=4, limit=ROWS // 5)
    assert token_bytes(four, four_paths) == token_bytes(fifth, fifth_paths)
    assert four["splits"] == fifth["splits"]  # text shards and their hashes too
