"""SQLite -> text shards -> token shards + manifest, the epoch schedule, and the example specs."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from job import spec as spec_lib
from job.data.schedule import EpochSchedule
from job.data.shards import BlockStore
from job.data.prepare import prepare
from job.data.shards import TokenShard, token_dtype
from job.rundir import RunPaths

ROOT = Path(__file__).resolve().parents[2]


def make_spec(demo_assets, tmp_path, **data) -> spec_lib.JobSpec:
    raw = {"name": "d", "output_dir": str(tmp_path / "runs"), "model": {"path": str(demo_assets.model)},
           "data": {"database": str(demo_assets.database), "table": "en", "text_column": "body_text", **data}}
    spec = spec_lib.from_dict(raw)
    RunPaths(spec.run_dir).root.mkdir(parents=True, exist_ok=True)
    return spec


def test_original_split_sizes_and_membership(demo_assets, tmp_path):
    """3300 rows, 6 empty: 3294 texts -> 2635 train / 659 valid, the same texts train_test_split gives."""
    from sklearn.model_selection import train_test_split

    db = tmp_path / "wb.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE ru (title TEXT, body_text TEXT)")
        rows = [(f"t{i}", "" if i % 550 == 3 else f"Текст номер {i}. " * (1 + i % 5)) for i in range(3400)]
        conn.executemany("INSERT INTO ru VALUES (?, ?)", rows)
    conn.close()
    spec = make_spec(demo_assets, tmp_path, database=str(db), table="ru", limit=3300, shards=3)
    m = prepare(spec, RunPaths(spec.run_dir))
    assert (m["rows_read"], m["rows_dropped"]) == (3300, 6)
    assert (m["splits"]["train"]["documents"], m["splits"]["valid"]["documents"]) == (2635, 659)
    texts = [t for _, t in rows[:3300] if t.strip()]
    want_train, want_valid = train_test_split(texts, test_size=0.2, random_state=0)
    got = {}
    for split in ("train", "valid"):
        got[split] = [json.loads(line)["text"] for s in m["splits"][split]["shards"]
                      for line in (RunPaths(spec.run_dir).data / s["text"]).read_text(encoding="utf-8").splitlines()]
    assert got["train"] == want_train and got["valid"] == want_valid  # same texts, same order


@pytest.mark.parametrize("n,fraction,seed", [(3294, 0.2, 0), (564, 0.2, 0), (1000, 0.1, 7), (7, 0.3, 1), (50, 0.5, 3)])
def test_the_split_is_sklearns(n, fraction, seed):
    """prepare computes train_test_split's split itself (importing scikit-learn costs 2-3 s): the same."""
    from sklearn.model_selection import train_test_split

    from job.data.prepare import _split

    want_train, want_valid = train_test_split(np.arange(n), test_size=fraction, random_state=seed)
    got = _split(n, fraction, seed)
    assert got["train"].tolist() == want_train.tolist() and got["valid"].tolist() == want_valid.tolist()


def test_shards_and_manifest_describe_each_other(demo_assets, tmp_path):
    spec = make_spec(demo_assets, tmp_path, shards=3, block_size=32)
    paths = RunPaths(spec.run_dir)
    m = prepare(spec, paths)
    assert m["dtype"] == "uint16" and m["block_size"] == 32 and m["tokenizer"]["vocab_size"] > 0
    total_blocks = 0
    for s in m["splits"]["train"]["shards"] + m["splits"]["valid"]["shards"]:
        for kind in ("text", "tokens"):
            data = (paths.data / s[kind]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s[f"{kind}_sha256"]
        shard = TokenShard.open(paths.data / s["tokens"])
        assert (shard.n_blocks, shard.block_size) == (s["blocks"], 32)
        assert s["blocks"] == s["n_tokens"] // 32
        total_blocks += s["blocks"]
        assert shard.blocks().max() < m["tokenizer"]["vocab_size"]
    assert total_blocks == m["splits"]["train"]["blocks"] + m["splits"]["valid"]["blocks"]
    # Each token shard is its text shard's documents, tokenised one by one by transformers, each followed
    # by a newline's tokens (GPT-2's join), cut into blocks: the tail shorter than a block dropped.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_assets.model)
    sep = tok("\n", add_special_tokens=False)["input_ids"]
    assert (m["join"], m["tokenizer"]["document_prefix"], m["tokenizer"]["document_suffix"]) == ("newline", [], sep)
    for s in m["splits"]["train"]["shards"] + m["splits"]["valid"]["shards"]:
        texts = [json.loads(line)["text"] for line in (paths.data / s["text"]).read_text(encoding="utf-8").splitlines()]
        stream = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + sep]
        assert s["n_tokens"] == len(stream) and len(texts) == s["documents"]
        blocks = TokenShard.open(paths.data / s["tokens"]).blocks()
        assert blocks.reshape(-1).tolist() == stream[:s["blocks"] * 32]
    first = (paths.data / m["splits"]["train"]["shards"][0]["text"]).read_text(encoding="utf-8").splitlines()[0]
    assert json.loads(first)["text"].strip()  # one readable document per line


def test_tokenising_processes_give_what_this_process_gives(demo_assets, tmp_path, monkeypatch):
    """data.workers 0 tokenises small data in the job's own process. With work units of 50 KB (5 of the
    demo's text): 2 processes, and data.workers 0 past a 100 KB threshold (the processes start once that
    much is read, and take the units read so far), make the same shards, byte for byte."""
    from job.data import prepare as prepare_module

    here = make_spec(demo_assets, tmp_path / "here")
    here = prepare(here, RunPaths(here.run_dir))
    assert here["worker_max_rss_bytes"] is None
    monkeypatch.setattr(prepare_module, "UNIT_BYTES", 50_000)
    monkeypatch.setattr(prepare_module, "IN_PROCESS_TEXT_BYTES", 100_000)
    for name, workers in (("two", 2), ("started", 0)):
        spec = make_spec(demo_assets, tmp_path / name, workers=workers)
        got = prepare(spec, RunPaths(spec.run_dir))
        assert got["worker_max_rss_bytes"] > 0, name  # tokenised in processes
        assert got["splits"] == here["splits"], name  # every shard's sha256, text and tokens


def test_prepare_skips_unchanged_inputs_and_rebuilds_changed_ones(demo_assets, tmp_path, caplog):
    spec = make_spec(demo_assets, tmp_path)
    paths = RunPaths(spec.run_dir)
    first = prepare(spec, paths)
    caplog.set_level("INFO", logger="ftjob")
    again = prepare(spec, paths)
    assert again["created"] == first["created"] and "nothing to do" in caplog.text
    spec.data.block_size = 48  # a changed input: new shards
    changed = prepare(spec, paths)
    assert changed["input_hash"] != first["input_hash"] and changed["block_size"] == 48
    os.remove(paths.data / changed["splits"]["train"]["shards"][0]["tokens"])  # a lost shard: rebuilt
    assert prepare(spec, paths)["input_hash"] == changed["input_hash"]
    assert (paths.data / changed["splits"]["train"]["shards"][0]["tokens"]).exists()


def test_a_validation_split_too_small_for_one_block_is_warned_about(demo_assets, tmp_path, caplog):
    """~3,900 validation tokens in 4 shards of ~970: no shard holds a block of 2048, so no validation loss."""
    spec = make_spec(demo_assets, tmp_path, valid_fraction=0.1, shards=4, block_size=2048)
    caplog.set_level("INFO", logger="ftjob")
    m = prepare(spec, RunPaths(spec.run_dir))
    assert m["splits"]["valid"]["blocks"] == 0 and m["splits"]["valid"]["tokens"] > 2048
    assert f"the {m['splits']['valid']['tokens']} validation tokens in 4 shards make no block" in caplog.text
    spec = make_spec(demo_assets, tmp_path / "one", valid_fraction=0.1, shards=1, block_size=2048)
    caplog.clear()
    assert prepare(spec, RunPaths(spec.run_dir))["splits"]["valid"]["blocks"] == 1
    assert "validation tokens" not in caplog.text


def test_token_dtype_grows_with_the_vocabulary():
    assert token_dtype(50264) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


@pytest.mark.parametrize("n_blocks,world,micro,accum", [(503, 2, 8, 2), (100, 3, 4, 1), (7, 2, 2, 2), (64, 1, 8, 4)])
def test_every_block_once_per_epoch_and_weights_make_a_mean(n_blocks, world, micro, accum):
    sched = EpochSchedule(n_blocks, world, micro, accum, seed=1)
    for epoch in range(2):
        seen = []
        for k in range(sched.steps_per_epoch):
            step = epoch * sched.steps_per_epoch + k
            before = len(seen)
            for rank in range(world):
                for mb in sched.micro_batches(step, rank):
                    seen.extend(mb.indices.tolist())
                    assert len(mb.indices) <= micro
            assert len(seen) - before == sched.blocks_in_step(step)
            # sum of weights == world * accum: DeepSpeed's averaging then makes the step loss a mean
            assert abs(sum(mb.weight for r in range(world) for mb in sched.micro_batches(step, r))
                       - world * accum) < 1e-9, step
        assert sorted(seen) == list(range(n_blocks))
    assert not np.array_equal(sched.order(0), sched.order(1))


def test_block_store_gathers_across_shards(tmp_path):
    from job.data.shards import write_token_shard

    a = np.arange(20, dtype="<u2").reshape(5, 4)
    b = np.arange(100, 112, dtype="<u2").reshape(3, 4)
    write_token_shard(tmp_path / "a.bin", a)
    write_token_shard(tmp_path / "b.bin", b)
    store = BlockStore([TokenShard.open(tmp_path / "a.bin"), TokenShard.open(tmp_path / "b.bin")])
    assert len(store) == 8
    got = store.gather(np.array([6, 0, 4, 5]))
    assert got.tolist() == [b[1].tolist(), a[0].tolist(), a[4].tolist(), b[0].tolist()]
    (tmp_path / "a.bin").write_bytes((tmp_path / "a.bin").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        TokenShard.open(tmp_path / "a.bin")


def test_wikibooks_example_has_the_original_settings():
    spec = spec_lib.load(ROOT / "examples" / "wikibooks-ru.yaml")
    d, t, g = spec.data, spec.train, spec.generation
    assert (d.table, d.text_column, d.limit, d.valid_fraction, d.split_seed, d.block_size) == \
        ("ru", "body_text", 3300, 0.2, 0, 64)
    assert spec.model.path == "ai-forever/rugpt3small_based_on_gpt2"
    assert (t.epochs, t.micro_batch, t.grad_accum, t.lr, t.optimizer, t.scheduler, t.precision, t.seed,
            t.checkpoint_every) == (10, 64, 2, 2e-4, "adafactor", "cosine", "fp16", 42, 1000)
    assert (g.prompts, g.do_sample, g.num_beams, g.temperature, g.top_p, g.max_length) == \
        (["женщина"], True, 2, 1.5, 0.9, 30)
    assert spec.resources.procs_per_node == 1  # one GPU: 128 sequences per step, as the original


def test_spec_errors_name_key_and_line(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: x\noutput_dir: /tmp/o\ndata:\n  database: a.db\n  table: t\n  shard: 3\nmodel:\n  path: m\n")
    with pytest.raises(spec_lib.SpecError, match=r"s.yaml:6: data.shard: unknown key; did you mean 'shards'"):
        spec_lib.load(p)
    p.write_text("name: x\noutput_dir: /tmp/o\ndata:\n  database: a.db\n  table: t\nmodel:\n  path: m\n")
    spec = spec_lib.load(p, ["train.lr=1e-3", "generation.prompts=[a, b]", "train.max_steps=5"])
    assert (spec.train.lr, spec.generation.prompts, spec.train.max_steps) == (1e-3, ["a", "b"], 5)
    assert spec.data.database == str(tmp_path / "a.db")  # relative to the spec file
    with pytest.raises(spec_lib.SpecError, match="train.micro_batch: must be greater than 0"):
        spec_lib.load(p, ["train.micro_batch=0"])


def test_eval_blocks_auto_keeps_evaluation_a_sixth_of_training_and_the_original_run_evaluates_everything():
    from job.data.schedule import evaluations

    t = spec_lib.load(ROOT / "examples" / "wikibooks-ru.yaml").train
    assert t.eval_blocks == "auto" and t.final_eval == "subset"
    # The original run: 5860 steps of 128 blocks (10 epochs of ~75,000), evaluations every 500 steps. Its
    # 659 validation texts of 3294 make about 659 / 2635 x 75,000 = 18,757 blocks; auto covers them all,
    # with room for a split a third longer than its share.
    evals = evaluations(5860, 500)
    assert evals == 13
    for valid in (18_757, 25_000):
        assert t.eval_blocks_for(valid, 5860 * 128, evals) == valid
    # 50 GB of text: 160M training blocks of 64 in one epoch, 40M validation blocks, batches of 512,
    # evaluations every 500 steps: each covers 128K blocks (not 40M), all of them half of what is trained.
    steps = 160_000_000 // 512
    evals = evaluations(steps, 500)
    per_eval = t.eval_blocks_for(40_000_000, 160_000_000, evals)
    assert per_eval == 127_796 and abs(per_eval * evals / 160_000_000 - 0.5) < 1e-3
    assert t.eval_blocks_for(10_000, 100, 2) == 256  # at least 256 blocks for a meaningful mean ...
    assert t.eval_blocks_for(100, 100, 2) == 100  # ... and never more than there are
    set_to = lambda v: spec_lib.TrainSpec(eval_blocks=v)  # noqa: E731
    assert set_to(0).eval_blocks_for(5000, 10**6, 3) == 5000 and set_to(40).eval_blocks_for(5000, 10**6, 3) == 40
    for bad in (-1, "many", 1.5):
        with pytest.raises(Exception, match="eval_blocks"):
            spec_lib.from_dict({"name": "x", "output_dir": "/o", "data": {"database": "d", "table": "t"},
                                "model": {"path": "m"}, "train": {"eval_blocks": bad}})


def test_the_eval_subset_is_fixed_by_the_seed():
    from job.data.schedule import eval_subset

    a = eval_subset(10_000, 300, seed=42)
    assert len(a) == len(set(a.tolist())) == 300 and a.tolist() == sorted(a.tolist()) and a.max() < 10_000
    assert np.array_equal(a, eval_subset(10_000, 300, seed=42))  # every evaluation, every attempt
    assert not np.array_equal(a, eval_subset(10_000, 300, seed=43))
    assert a.max() > 5_000 and a.tolist() != list(range(a.min(), a.min() + 300))  # drawn, not a run of blocks
    assert eval_subset(50, 300, seed=42).tolist() == list(range(50))
