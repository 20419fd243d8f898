"""`ftjob` as the real process a scheduler starts: bad input gives exit 2 and one line on stderr, with no
traceback, from the console script itself (tests/unit/test_bad_inputs.py runs the whole corpus through
the same entry point in-process), and a database another process holds locked."""
from __future__ import annotations

import shutil
import sqlite3
import time

import pytest
import yaml

from conftest import run_ftjob
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


