"""The bad-input corpus: specs a new user will write, each with one mistake, and what ftjob must say.
tests/unit/test_bad_inputs.py runs every case through ftjob's entry point in-process;
tests/system/test_entrypoint.py runs a few as real processes.

Every case must end the way errors.py promises: exit code 2 (BAD_INPUT), ONE `ftjob: error:` line on
stderr that names what is wrong (the spec key, file, table or column), no traceback, and nothing on the
volume lost or overwritten: the output_dir already holds this spec's run directory and another run, and
the whole tree (names + content hashes), the database and the model are the same afterwards.
"""
from __future__ import annotations

import hashlib
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml


DROP = object()  # in Case.spec: remove the key from the demo spec


@dataclass
class Case:
    command: str  # "run" or "validate"
    expect: tuple[str, ...]  # words the error line must contain
    spec: dict = field(default_factory=dict)  # dotted keys replaced in (or DROPped from) the demo spec
    args: tuple[str, ...] = ()  # extra command-line arguments (--set ...)
    text: str | None = None  # the spec file's text, instead of the demo spec
    setup: Callable[[Path, object], dict] | None = None  # (tmp, demo_assets) -> more spec changes
    env: dict = field(default_factory=dict)  # environment variables (rank variables)


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


def tokenizer_without_eos(tmp, assets):
    """The demo model with a tokenizer that has no end-of-text token."""
    import json

    model = tmp / "model-no-eos"
    shutil.copytree(assets.model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    for key in ("eos_token", "bos_token", "unk_token"):
        config[key] = None  # absent, GPT2Tokenizer would bring back its default <|endoftext|>
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["added_tokens"] = []
    (model / "tokenizer.json").write_text(json.dumps(tok))
    (model / "special_tokens_map.json").unlink(missing_ok=True)
    return {"model.path": str(model), "data.join": "eos"}


def tokenizer_without_bos(tmp, assets):
    """The demo tokenizer without its BOS token (its EOS kept), asked to start documents with BOS."""
    import json

    model = tmp / "model-no-bos"
    shutil.copytree(assets.model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["bos_token"] = None
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "special_tokens_map.json").unlink(missing_ok=True)
    return {"model.path": str(model), "data.join": "bos_eos"}


def llama_smaller_than_tokenizer(tmp, assets):
    """A Llama whose embedding (300 rows) is smaller than the demo tokenizer (467 tokens)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tmp / "llama-300"
    config = AutoConfig.for_model("llama", vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0,
                                  pad_token_id=None)
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    for f in assets.model.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            shutil.copy(f, model / f.name)
    return {"model.path": str(model)}


def model_with(tmp, assets, name: str, damage: Callable[[Path], None]):
    model = tmp / name
    shutil.copytree(assets.model, model)
    damage(model)
    return {"model.path": str(model)}


def truncated_safetensors(tmp, assets):
    def cut(model):
        f = model / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return model_with(tmp, assets, "model-truncated-weights", cut)


def garbage_safetensors(tmp, assets):
    return model_with(tmp, assets, "model-garbage-weights",
                      lambda m: (m / "model.safetensors").write_bytes(b"not safetensors at all" * 100))


def model_without_weights(tmp, assets):
    return model_with(tmp, assets, "model-no-weights", lambda m: (m / "model.safetensors").unlink())


def broken_tokenizer_json(tmp, assets):
    return model_with(tmp, assets, "model-bad-tokenizer", lambda m: (m / "tokenizer.json").write_text("{oops"))


def model_path_is_a_file(tmp, assets):
    (tmp / "model.bin").write_bytes(b"\0" * 16)
    return {"model.path": str(tmp / "model.bin")}


def empty_file_as_db(tmp, assets):
    (tmp / "empty.sqlite").write_bytes(b"")
    return {"data.database": str(tmp / "empty.sqlite")}


def unicode_database_copy(tmp, assets):
    directory = tmp / "данные"
    directory.mkdir()
    shutil.copy(assets.database, directory / "книги.sqlite")
    return {"data.database": str(directory / "книги.sqlite"), "data.table": "русский"}


def type_changes_between_chunks(tmp, assets):
    """Text for the first chunks of 10 rows, then a number: found before anything is written."""
    return {**sqlite_db(tmp, "", [f"'text number {i}'" for i in range(14)] + ["42"]), "data.chunk_rows": 10}


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
    pytest.param(Case("run", ("train.eval_blocks", "0 (all) or auto", "'all'"), spec={"train.eval_blocks": "all"}),
                 id="eval-blocks-word"),
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
    # --- queries SQLite refuses only while running them, and functions that do not exist
    pytest.param(Case("run", ("data.query", "only reading is allowed", "load_extension"),
                      spec={"data.table": DROP, "data.query": "SELECT load_extension('evil.so')"}),
                 id="query-load-extension-refused-at-run-time"),
    pytest.param(Case("validate", ("data.query", "no such function: nosuchfunc"),
                      spec={"data.table": DROP, "data.query": "SELECT nosuchfunc(body_text) FROM en"}),
                 id="query-unknown-function"),
    pytest.param(Case("run", ("data.query", "no such function: readfile"),
                      spec={"data.table": DROP, "data.query": "SELECT readfile('/etc/passwd')"}),
                 id="query-readfile-is-a-shell-function"),
    pytest.param(Case("run", ("data.query", "read-only SELECT"),
                      spec={"data.table": DROP, "data.query": "ATTACH DATABASE '/tmp/x.db' AS x"}),
                 id="query-attach"),
    pytest.param(Case("validate", ("data.query", "exactly one SELECT"),
                      spec={"data.table": DROP, "data.query": "SELECT body_text FROM en; DROP TABLE en"}),
                 id="query-select-then-drop"),
    pytest.param(Case("run", ("data.query", "row 1", "integer values, not text"),
                      spec={"data.table": DROP, "data.query": "SELECT length(body_text) FROM en"}),
                 id="query-returns-numbers"),
    pytest.param(Case("run", ("data.query", "incomplete input"),
                      spec={"data.table": DROP, "data.query": "SELECT body_text FROM en WHERE"}),
                 id="query-syntax-error"),
    pytest.param(Case("run", ("no usable rows", "0 read"),
                      spec={"data.table": DROP, "data.query": "SELECT body_text FROM en LIMIT 0"}),
                 id="query-returns-no-rows"),
    # --- columns of mixed types
    pytest.param(Case("run", ("data.text_column", "row 3", "integer values"),
                      setup=lambda tmp, a: sqlite_db(tmp, "", ["'a text'", "'another'", "42", "'more'"])),
                 id="column-of-mixed-types"),
    pytest.param(Case("run", ("data.text_column", "row 15", "integer values"), setup=type_changes_between_chunks),
                 id="column-changes-type-between-chunks"),
    pytest.param(Case("run", ("data.text_column", "row 2", "real values"),
                      setup=lambda tmp, a: sqlite_db(tmp, "", ["'text'", "3.25"])), id="column-of-floats"),
    # --- the database file
    pytest.param(Case("run", ("data.database", "empty.sqlite", "not a SQLite database"), setup=empty_file_as_db),
                 id="database-empty-file"),
    # --- tokenizer and model directories
    pytest.param(Case("run", ("data.join", "no end-of-text token"), setup=tokenizer_without_eos),
                 id="tokenizer-without-eos"),
    pytest.param(Case("run", ("model.path", "model.safetensors", "not a readable safetensors file"),
                      setup=truncated_safetensors), id="model-truncated-safetensors"),
    pytest.param(Case("run", ("model.path", "model.safetensors", "not a readable safetensors file"),
                      setup=garbage_safetensors), id="model-garbage-safetensors"),
    pytest.param(Case("run", ("model.path", "no weights", "from_config"), setup=model_without_weights),
                 id="model-without-weights"),
    pytest.param(Case("validate", ("model.path", "model-bad-tokenizer", "no usable tokenizer"),
                      setup=broken_tokenizer_json), id="model-broken-tokenizer-json"),
    pytest.param(Case("run", ("model.path", "model.bin", "is a file"), setup=model_path_is_a_file),
                 id="model-path-is-a-file"),
    pytest.param(Case("run", ("model.from_config.n_layers", "not a GPT2Config field", "did you mean 'n_layer'"),
                      spec={"model.from_config": {"n_layers": 2}}), id="from-config-misspelt-field"),
    pytest.param(Case("run", ("model.from_config", "hidden size 65", "4 attention heads"),
                      spec={"model.from_config": {"n_embd": 65, "n_head": 4}}), id="from-config-heads-do-not-divide"),
    pytest.param(Case("run", ("model.from_config.model_type", "'lama'", "did you mean 'llama'"),
                      spec={"model.from_config": {"model_type": "lama", "hidden_size": 64}}),
                 id="from-config-unknown-model-type"),
    pytest.param(Case("run", ("model.from_config.num_hidden_layer", "not a LlamaConfig field",
                              "did you mean 'num_hidden_layers'"),
                      spec={"model.from_config": {"model_type": "llama", "num_hidden_layer": 2}}),
                 id="from-config-misspelt-field-of-another-family"),
    pytest.param(Case("run", ("model.from_config", "4 attention heads", "3 key-value heads"),
                      spec={"model.from_config": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                                  "num_key_value_heads": 3}}), id="from-config-kv-heads-do-not-divide"),
    pytest.param(Case("run", ("model.tokenizer", "467 tokens", "vocabulary has 300"), setup=llama_smaller_than_tokenizer),
                 id="tokenizer-larger-than-the-embedding"),
    pytest.param(Case("run", ("data.join", "bos_eos", "no begin-of-text token"), setup=tokenizer_without_bos),
                 id="join-bos-eos-without-bos"),
    pytest.param(Case("run", ("train.offload", "zero_stage: 3"), spec={"train.offload": "all"}),
                 id="offload-parameters-below-zero-3"),
    pytest.param(Case("run", ("model.attn_implementation", "flash-attn"),
                      spec={"model.attn_implementation": "flash_attention_2"}), id="flash-attention-not-installed"),
    pytest.param(Case("run", ("model.attn_implementation", "must be one of auto, sdpa, eager, flash_attention_2"),
                      spec={"model.attn_implementation": "flash"}), id="attention-unknown"),
    # --- overrides of list keys and sections
    pytest.param(Case("run", ("generation.prompts", "must be a list, got a string"),
                      args=("--set", "generation.prompts=hello")), id="set-list-key-to-a-string"),
    pytest.param(Case("run", ("generation.prompts.0", "prompts is not a section"),
                      args=("--set", "generation.prompts.0=hello")), id="set-into-a-list"),
    pytest.param(Case("run", ("train.adam_betas", "two numbers"), args=("--set", "train.adam_betas=[0.9]")),
                 id="set-list-too-short"),
    pytest.param(Case("validate", ("data", "must be a section"), args=("--set", "data=x")), id="set-section-to-a-value"),
    # --- unicode in names and paths
    pytest.param(Case("run", ("data.table", "no table 'русский'", "tables: en"), setup=unicode_database_copy),
                 id="unicode-table-in-a-unicode-path"),
    pytest.param(Case("run", ("data.database", "file not found", "нет/книги.sqlite"),
                      spec={"data.database": "/nonexistent/нет/книги.sqlite"}), id="unicode-database-path-missing"),
    pytest.param(Case("validate", ("data.text_column", "no column 'текст'"), spec={"data.text_column": "текст"}),
                 id="unicode-column-missing"),
    pytest.param(Case("run", ("name", "plain directory name", "'прогон/1'"), spec={"name": "прогон/1"}),
                 id="unicode-name-with-slash"),
    # --- more ranges and choices
    pytest.param(Case("run", ("train.epochs", "greater than 0"), spec={"train.epochs": 0}), id="epochs-zero"),
    pytest.param(Case("run", ("train.zero_stage", "at most 3", "got 4"), spec={"train.zero_stage": 4}),
                 id="zero-stage-4"),
    pytest.param(Case("validate", ("generation.top_p", "at most 1.0"), spec={"generation.top_p": 1.5}),
                 id="top-p-above-one"),
    pytest.param(Case("run", ("data.limit", "greater than 0", "got -5"), spec={"data.limit": -5}), id="limit-negative"),
    pytest.param(Case("run", ("data.join", "must be one of auto, newline, eos, bos_eos", "'tab'"), spec={"data.join": "tab"}),
                 id="join-unknown"),
    pytest.param(Case("run", ("name", "given twice", "lines 1 and 3"),
                      text="name: demo\noutput_dir: runs\nname: other\n"), id="yaml-duplicate-key"),
    pytest.param(Case("run", ("not valid YAML",), text="name: demo\n\toutput_dir: runs\n"), id="yaml-tab-indent"),
    # --- batch and resources
    pytest.param(Case("run", ("train.global_batch", "30 sequences", "2 processes x train.micro_batch 8"),
                      spec={"train.global_batch": 30, "resources.accelerator": "cpu"}),
                 id="global-batch-does-not-divide"),
    pytest.param(Case("run", ("resources.accelerator", "no GPU is visible"),
                      spec={"resources.accelerator": "cuda"}, env={"CUDA_VISIBLE_DEVICES": ""}),
                 id="cuda-without-gpu"),
    pytest.param(Case("run", ("NNODES > 1 needs MASTER_ADDR",), spec={"resources.nnodes": 2},
                      env={"MASTER_ADDR": None, "NNODES": None}), id="two-nodes-without-master"),
    pytest.param(Case("run", ("NODE_RANK 5", "outside 0..1"), env={"NNODES": "2", "NODE_RANK": "5",
                                                                     "MASTER_ADDR": "127.0.0.1"}),
                 id="node-rank-out-of-range"),
    pytest.param(Case("run", ("NPROC_PER_NODE", "'two'", "must be an integer"), env={"NPROC_PER_NODE": "two"}),
                 id="nproc-not-a-number"),
]

RANK_VARIABLES = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "JOB_COMPLETION_INDEX",
                  "SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")


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
