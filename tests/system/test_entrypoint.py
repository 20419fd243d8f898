"""`ftjob` as the real process a scheduler starts: bad input gives exit 2 and one line on stderr, with no
traceback, from the console script itself (tests/unit/test_bad_inputs.py runs the whole corpus through
the same entry point in-process), a database another process holds locked, and inputs this user may
not read."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time

import pytest
import yaml

from conftest import ftjob_command, run_ftjob
from bad_input_cases import CASES, assert_clean_error, make_volume, tree, with_changes

PROCESS_CASES = [p for p in CASES if p.id in ("yaml-malformed-line-number", "table-missing",
                                               "model-truncated-safetensors", "query-load-extension-refused-at-run-time")]


@pytest.mark.parametrize("case", PROCESS_CASES)
def test_bad_input_from_the_real_process(case, demo_assets, demo_spec, tmp_path):

    volume = make_volume(tmp_path)
    changes = {"output_dir": str(volume), **(case.setup(tmp_path, demo_assets) if case.setup else {}), **case.spec}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(case.text if case.text is not None else yaml.safe_dump(with_changes(demo_spec, changes)))
    before = tree(tmp_path, demo_assets.database, demo_assets.model)
    proc = run_ftjob(case.command, spec_path, *case.args, cwd=tmp_path, timeout=120)
    assert_clean_error(proc, case.expect)
    assert tree(tmp_path, demo_assets.database, demo_assets.model) == before


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




def without_root_file_access() -> list[str]:
    """A command prefix under which a file's mode counts as it does for any user. Root reads every file
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH); setpriv drops both for the child, which keeps uid 0 (so it
    still reaches the interpreter, wherever root installed it). A non-root user needs nothing."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): no way to be refused a file")
    drop = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}"]


# (what is unreadable, the key the message names); each a real file made mode 000, or for "database-dir"
# the database's directory made 0600 (listable, not enterable).
UNREADABLE = [("spec", "spec file"), ("database", "data.database"), ("database-dir", "data.database"),
              ("weights", "model.path"), ("tokenizer", "model.tokenizer")]


@pytest.mark.parametrize("what,key", UNREADABLE, ids=[u[0] for u in UNREADABLE])
def test_unreadable_input_says_permission_denied_with_the_file_the_uid_and_the_fix(what, key, demo_assets,
                                                                                    demo_spec, tmp_path):
    """EACCES on an input, through the real entrypoint: exit 2 and one line with "permission denied", the
    path, the uid the job runs as and a chmod that fixes it; not "not a readable safetensors file
    (FileNotFoundError ...)", which is what a model saved 0600 by another uid gave before."""
    model, tokenizer, data = tmp_path / "model", tmp_path / "tokenizer", tmp_path / "data"
    shutil.copytree(demo_assets.model, model)
    tokenizer.mkdir()
    shutil.copy(demo_assets.model / "tokenizer.json", tokenizer)
    data.mkdir()
    db = data / "db.sqlite"
    shutil.copy(demo_assets.database, db)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(with_changes(demo_spec, {
        "output_dir": str(tmp_path / "runs"), "data.database": str(db), "model.path": str(model),
        "model.tokenizer": str(tokenizer)})))
    if what == "database-dir":
        data.chmod(0o600)
        expect = (f"cannot enter directory {data} ", "mode 0600", f"chmod a+x {data}")
    else:
        target = {"spec": spec, "database": db, "weights": model / "model.safetensors",
                  "tokenizer": tokenizer / "tokenizer.json"}[what]
        target.chmod(0)
        expect = (f"cannot read {target} ", "mode 0000", f"chmod a+r {target}")
    try:
        proc = subprocess.run(without_root_file_access() + ftjob_command() + ["validate", str(spec)],
                              capture_output=True, text=True, timeout=120)
    finally:
        data.chmod(0o755)  # so that pytest can remove it
    line = assert_clean_error(proc, (f"{key}: permission denied", *expect, f"as uid {os.geteuid()}"))
    assert "FileNotFoundError" not in line and "not a readable" not in line
