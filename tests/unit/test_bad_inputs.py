"""Bad inputs a new user will write, each run through the real `ftjob` command.

Every case must end the way errors.py promises: exit code 2 (BAD_INPUT), ONE `ftjob: error:` line on
stderr that names what is wrong (the spec key, file, table or column), no traceback, and nothing on the
volume lost or overwritten: the output_dir already holds this spec's run directory and another run, and
the whole tree (names + content hashes), the database and the model are the same afterwards.
"""
from __future__ import annotations

import hashlib
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import run_ftjob

DROP = object()  # in Case.spec: remove the key from the demo spec


@dataclass
class Case:
    command: str  # "run" or "validate"
    expect: tuple[str, ...]  # words the error line must contain
    spec: dict = field(default_factory=dict)  # dotted keys replaced in (or DROPped from) the demo spec
    args: tuple[str, ...] = ()  # extra command-line arguments (--set ...)
    text: str | None = None  # the spec file's text, instead of the demo spec
    setup: Callable[[Path, object], dict] | None = None  # (tmp, demo_assets) -> more spec changes


# ---------------------------------------------------------------- inputs the cases build


def sqlite_db(tmp: Path, column: str, rows_sql: list[str], table: str = "t") -> dict:
    """A database with one table `t(body <column>)` filled by the given VALUES expressions."""
    path = tmp / f"{table}-{column.lower() or 'any'}-{len(list(tmp.glob('*.sqlite')))}.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(f"CREATE TABLE {table} (body {column})")
        for values in rows_sql:
            conn.execute(f"INSERT INTO {table} VALUES ({values})")
    conn.close()
    return {"data.database": str(path), "data.table": table, "data.text_column": "body"}


def text_file_as_db(tmp, assets):
    (tmp / "notes.sqlite").write_text("title,body\nhello,world\n")
    return {"data.database": str(tmp / "notes.sqlite")}


def truncated_db(tmp, assets):
    path = tmp / "truncated.sqlite"
    shutil.copy(assets.database, path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return {"data.database": str(path)}


def directory_as_db(tmp, assets):
    (tmp / "db-dir.sqlite").mkdir()
    return {"data.database": str(tmp / "db-dir.sqlite")}


def model_without_tokenizer(tmp, assets):
    model = tmp / "model-no-tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(assets.model / name, model / name)
    return {"model.path": str(model)}


def output_dir_below_a_file(tmp, assets):
    (tmp / "a-file").write_text("not a directory\n")
    return {"output_dir": str(tmp / "a-file" / "runs")}


MALFORMED_YAML = "name: demo\noutput_dir: runs\ndata:\n  table: en\n   text_column: body_text\n"

CASES = [
    # --- the spec file itself
    pytest.param(Case("run", ("not valid YAML", ":5:"), text=MALFORMED_YAML), id="yaml-malformed-line-number"),
    pytest.param(Case("validate", ("must be a YAML mapping",), text="- name: demo\n- output_dir: runs\n"),
                 id="yaml-list-not-mapping"),
    pytest.param(Case("run", ("colour", "unknown key", "allowed: name"), spec={"colour": "blue"}),
                 id="unknown-top-level-key"),
    pytest.param(Case("run", ("train.micro_bacth", "unknown key", "did you mean 'micro_batch'"),
                      spec={"train.micro_batch": DROP, "train.micro_bacth": 8}), id="misspelt-nested-key"),
    pytest.param(Case("validate", ("data", "must be a section"), spec={"data": "demo.sqlite"}),
                 id="section-is-a-string"),
    # --- types
    pytest.param(Case("run", ("train.micro_batch", "must be an integer", "'8'"), spec={"train.micro_batch": "8"}),
                 id="string-for-int"),
    pytest.param(Case("run", ("name", "must be a string", "a list"), spec={"name": ["demo", "two"]}),
                 id="list-for-string"),
    pytest.param(Case("run", ("train.grad_accum", "must be an integer", "True"), spec={"train.grad_accum": True}),
                 id="bool-for-int"),
    pytest.param(Case("validate", ("train.lr", "must be a number", "'fast'"), spec={"train.lr": "fast"}),
                 id="word-for-float"),
    pytest.param(Case("run", ("train.optimizer", "must be one of adamw, adafactor", "'adam'"),
                      spec={"train.optimizer": "adam"}), id="choice-not-allowed"),
    # --- sizes and ranges
    pytest.param(Case("run", ("train.micro_batch", "greater than 0", "got 0"), spec={"train.micro_batch": 0}),
                 id="micro-batch-zero"),
    pytest.param(Case("run", ("data.block_size", "greater than 0", "got -1"), spec={"data.block_size": -1}),
                 id="block-size-negative"),
    pytest.param(Case("validate", ("data.shards", "greater than 0", "got 0"), spec={"data.shards": 0}),
                 id="shards-zero"),
    pytest.param(Case("run", ("train.lr", "greater than 0"), spec={"train.lr": 0}), id="lr-zero"),
    pytest.param(Case("run", ("data.valid_fraction", "at most 0.9", "got 1.5"), spec={"data.valid_fraction": 1.5}),
                 id="valid-fraction-above-range"),
    pytest.param(Case("validate", ("data.valid_fraction", "at least 0.0"), spec={"data.valid_fraction": -0.1}),
                 id="valid-fraction-below-range"),
    # --- command line
    pytest.param(Case("run", ("--set", "train.epochs", "expected key.path=value"), args=("--set", "train.epochs")),
                 id="set-without-equals"),
    pytest.param(Case("run", ("train.epoch", "unknown key", "did you mean 'epochs'"), args=("--set", "train.epoch=1")),
                 id="set-unknown-key"),
    # --- required keys
    pytest.param(Case("run", ("name: is required",), spec={"name": DROP}), id="missing-name"),
    pytest.param(Case("run", ("data.database: is required",), spec={"data.database": DROP}),
                 id="missing-data-database"),
    pytest.param(Case("validate", ("model.path: is required",), spec={"model.path": DROP}), id="missing-model-path"),
    pytest.param(Case("run", ("name", "plain directory name", "'team/demo'"), spec={"name": "team/demo"}),
                 id="name-with-slash"),
    # --- the database file
    pytest.param(Case("run", ("data.database", "file not found", "no-such.sqlite"),
                      spec={"data.database": "/nonexistent/no-such.sqlite"}), id="database-missing"),
    pytest.param(Case("run", ("data.database", "db-dir.sqlite", "is a directory"), setup=directory_as_db),
                 id="database-is-a-directory"),
    pytest.param(Case("run", ("data.database", "notes.sqlite", "not a SQLite database"), setup=text_file_as_db),
                 id="database-is-a-text-file"),
    pytest.param(Case("run", ("data.database", "truncated.sqlite", "malformed", "damaged or truncated"),
                      setup=truncated_db), id="database-truncated"),
    # --- tables, columns and queries
    pytest.param(Case("run", ("data.table", "no table 'fr'", "tables: en"), spec={"data.table": "fr"}),
                 id="table-missing"),
    pytest.param(Case("validate", ("data.text_column", "no column 'body'", "columns: title"),
                      spec={"data.text_column": "body"}), id="column-missing"),
    pytest.param(Case("run", ("data.table", "no table 'en; DROP TABLE en; --'"),
                      spec={"data.table": "en; DROP TABLE en; --"}), id="table-sql-injection"),
    pytest.param(Case("run", ("data.text_column", "no column 'body_text FROM en; --'"),
                      spec={"data.text_column": "body_text FROM en; --"}), id="column-sql-injection"),
    pytest.param(Case("run", ("data.query", "read-only SELECT"),
                      spec={"data.table": DROP, "data.query": "DELETE FROM en"}), id="query-deletes"),
    pytest.param(Case("validate", ("data.query", "exactly one SELECT"),
                      spec={"data.table": DROP, "data.query": "SELECT 1; SELECT 2"}), id="query-two-statements"),
    pytest.param(Case("run", ("data.query", "read-only SELECT"),
                      spec={"data.table": DROP, "data.query": "INSERT INTO en (title) VALUES ('x') RETURNING title"}),
                 id="query-insert-returning"),
    pytest.param(Case("validate", ("data.query", "read-only SELECT"),
                      spec={"data.table": DROP, "data.query": "PRAGMA journal_mode=WAL"}), id="query-pragma"),
    pytest.param(Case("run", ("data.query", "only reading is allowed"),
                      spec={"data.table": DROP, "data.query": "WITH d AS (SELECT 1) DELETE FROM en"}),
                 id="query-with-cte-deletes"),
    pytest.param(Case("validate", ("data.query", "no such table: pages"),
                      spec={"data.table": DROP, "data.query": "SELECT body FROM pages"}), id="query-unknown-table"),
    pytest.param(Case("run", ("data.query", "not both"), spec={"data.query": "SELECT body_text FROM en"}),
                 id="table-and-query"),
    # --- the rows
    pytest.param(Case("run", ("data.text_column", "row 1", "integer values, not text"),
                      setup=lambda tmp, a: sqlite_db(tmp, "INTEGER", ["1", "2", "3"])), id="column-of-integers"),
    pytest.param(Case("run", ("data.text_column", "row 2", "BLOBs"),
                      setup=lambda tmp, a: sqlite_db(tmp, "", ["'fine text'", "x'00ff10'"])), id="column-of-blobs"),
    pytest.param(Case("run", ("row 2", "not valid UTF-8", "0xff"),
                      setup=lambda tmp, a: sqlite_db(tmp, "TEXT", ["'fine text'", "CAST(x'ff41' AS TEXT)"])),
                 id="invalid-utf8"),
    pytest.param(Case("run", ("no usable rows", "3 read"),
                      setup=lambda tmp, a: sqlite_db(tmp, "TEXT", ["NULL", "''", "'  \n '"])), id="no-usable-rows"),
    # --- the model
    pytest.param(Case("validate", ("data.block_size", "512", "256 positions"), spec={"data.block_size": 512}),
                 id="block-size-beyond-positions"),
    pytest.param(Case("run", ("model.path", "directory not found", "/models/gpt2-nope"),
                      spec={"model.path": "/models/gpt2-nope"}), id="model-path-missing"),
    pytest.param(Case("run", ("model.path", "no tokenizer files", "model-no-tokenizer"),
                      setup=model_without_tokenizer), id="model-without-tokenizer"),
    # --- output, generation, precision
    pytest.param(Case("run", ("output_dir", "a-file", "is a file"), setup=output_dir_below_a_file),
                 id="output-dir-below-a-file"),
    pytest.param(Case("run", ("generation.prompts", "must not be empty"), spec={"generation.prompts": []}),
                 id="prompts-empty-list"),
    pytest.param(Case("validate", ("generation.prompts", "must not be empty"), spec={"generation.prompts": ["A", ""]}),
                 id="prompt-empty-string"),
    pytest.param(Case("run", ("train.precision", "fp16 needs a GPU"),
                      spec={"train.precision": "fp16", "resources.accelerator": "cpu"}), id="fp16-on-cpu"),
]


# ---------------------------------------------------------------- helpers


def with_changes(base: dict, changes: dict) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(base))
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = spec
        for part in parents:
            node = node.setdefault(part, {})
        if value is DROP:
            node.pop(last, None)
        else:
            node[last] = value
    return spec


def tree(*roots: Path) -> dict[str, str]:
    """Every file and directory under the roots: relative name -> content hash ('dir' for directories)."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]) if root.is_dir() else [root]:
            key = f"{root.name}/{p.relative_to(root)}" if root.is_dir() else root.name
            out[key] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def make_volume(tmp: Path, name: str = "demo") -> Path:
    """output_dir with this spec's run directory and another run already in it."""
    volume = tmp / "volume"
    for run in (name, "other"):
        (volume / run).mkdir(parents=True)
        (volume / run / "keep.txt").write_text(f"results of an earlier run: {run}\n")
    (volume / name / "spec.yaml").write_text("name: the earlier run's spec\n")
    return volume


def assert_clean_error(proc, words) -> str:
    """Exit 2, one `ftjob: error:` line that is stderr's last, naming the problem, and no traceback."""
    stderr = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ftjob: error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert lines[-1] == errors[0], f"the message is not one line, or something followed it:\n{stderr[-3000:]}"
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    return errors[0]


# ---------------------------------------------------------------- the corpus


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clean_line_and_touches_nothing(case: Case, demo_assets, demo_spec, tmp_path):
    volume = make_volume(tmp_path)
    changes = {"output_dir": str(volume), **(case.setup(tmp_path, demo_assets) if case.setup else {}), **case.spec}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(case.text if case.text is not None else yaml.safe_dump(with_changes(demo_spec, changes)))
    before = tree(tmp_path, demo_assets.database, demo_assets.model)

    proc = run_ftjob(case.command, spec_path, *case.args, cwd=tmp_path, timeout=120)

    assert_clean_error(proc, case.expect)
    assert tree(tmp_path, demo_assets.database, demo_assets.model) == before


def test_the_corpus_is_big_enough_and_mostly_runs():
    assert len(CASES) >= 30
    assert sum(p.values[0].command == "run" for p in CASES) >= 15


def test_the_demo_spec_itself_is_valid(demo_assets, demo_spec, tmp_path):
    """Guards the corpus: every case is the valid demo spec plus one mistake."""
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(with_changes(demo_spec, {"output_dir": str(make_volume(tmp_path))})))
    proc = run_ftjob("validate", spec_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------- cases that need more than a spec


def test_locked_database(demo_assets, demo_spec, tmp_path):
    """Another process holds a write lock: ftjob waits out its busy timeout, then says so in one line."""
    db = tmp_path / "busy.sqlite"
    shutil.copy(demo_assets.database, db)
    volume = make_volume(tmp_path)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(with_changes(demo_spec, {"output_dir": str(volume), "data.database": str(db)})))
    # Hash before taking the lock and after giving it back: closing any descriptor of the file in this
    # process would drop the lock (POSIX locks belong to the process, not the connection).
    before = tree(volume, db)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        t0 = time.monotonic()
        proc = run_ftjob("run", spec_path, timeout=120)
        took = time.monotonic() - t0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    after = tree(volume, db)
    assert_clean_error(proc, ("data.database", "busy.sqlite", "database is locked", "another process"))
    assert after == before
    assert took < 30, f"took {took:.0f}s"


def test_too_few_blocks_for_one_batch_across_two_ranks(demo_assets, demo_spec, tmp_path):
    """Usable, but too little: the data is prepared, then the batch check fails. The run directory is written
    (spec, data), but what was there before is untouched and the other run is left alone."""
    volume = make_volume(tmp_path)
    changes = {"output_dir": str(volume), **sqlite_db(tmp_path, "TEXT", ["'The gardener reads a book.'"] * 12),
               "data.block_size": 8, "data.shards": 1, "train.micro_batch": 8, "resources.procs_per_node": 2,
               "resources.accelerator": "cpu"}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(with_changes(demo_spec, changes)))
    keep = {k: v for k, v in tree(volume).items() if "keep.txt" in k or k.startswith("volume/other")}

    proc = run_ftjob("run", spec_path, timeout=300)

    assert_clean_error(proc, ("training blocks", "fewer than one batch", "2 ranks", "train.micro_batch 8"))
    after = tree(volume)
    assert {k: after.get(k) for k in keep} == keep
    assert {k for k in after if k.startswith("volume/other")} == {k for k in keep if k.startswith("volume/other")}
