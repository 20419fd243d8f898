"""Every case of the bad-input corpus (tests/bad_input_cases.py) through `ftjob`'s own entry point,
job.cli.main, in this process: a case costs milliseconds, not a Python start with torch.

Each must end the way errors.py promises: exit 2, ONE `ftjob: error:` line naming what is wrong, no
traceback, and the volume, the database and the model unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml

from bad_input_cases import (CASES, RANK_VARIABLES, Case, assert_clean_error, make_volume, sqlite_db, tree,
                             with_changes)
from job.cli import main as ftjob_main


@dataclass
class Outcome:
    returncode: int
    stderr: str


@pytest.fixture
def ftjob(capsys, monkeypatch):
    """`ftjob ARGS...` through its entry point in this process: the exit code and what it printed."""
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def no_training(*args, **kwargs):  # a case that gets this far is a missed check, not a slow test
        raise AssertionError("a bad-input case reached the training stage")
    monkeypatch.setattr("job.pipeline.train_stage", no_training)

    def call(*args, env: dict | None = None) -> Outcome:
        for name, value in (env or {}).items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        capsys.readouterr()
        try:
            ftjob_main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
        return Outcome(code, capsys.readouterr().err)
    return call




# ---------------------------------------------------------------- the corpus


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clean_line_and_touches_nothing(case: Case, demo_assets, demo_spec, tmp_path, ftjob,
                                                          monkeypatch):
    volume = make_volume(tmp_path)
    changes = {"output_dir": str(volume), **(case.setup(tmp_path, demo_assets) if case.setup else {}), **case.spec}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(case.text if case.text is not None else yaml.safe_dump(with_changes(demo_spec, changes),
                                                                               allow_unicode=True))
    before = tree(tmp_path, demo_assets.database, demo_assets.model)
    monkeypatch.chdir(tmp_path)

    proc = ftjob(case.command, spec_path, *case.args, env=case.env)

    assert_clean_error(proc, case.expect)
    assert tree(tmp_path, demo_assets.database, demo_assets.model) == before


def test_the_demo_spec_itself_is_valid(demo_assets, demo_spec, tmp_path, ftjob):
    """Guards the corpus: every case is the valid demo spec plus one mistake."""
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(with_changes(demo_spec, {"output_dir": str(make_volume(tmp_path))})))
    proc = ftjob("validate", spec_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------- cases that need more than a spec


def test_too_few_blocks_for_one_batch_across_two_ranks(demo_assets, demo_spec, tmp_path, ftjob):
    """Usable, but too little: the data is prepared, then the batch check fails. The run directory is written
    (spec, data), but what was there before is untouched and the other run is left alone."""
    volume = make_volume(tmp_path)
    changes = {"output_dir": str(volume), **sqlite_db(tmp_path, "TEXT", ["'The gardener reads a book.'"] * 12),
               "data.block_size": 8, "data.shards": 1, "train.micro_batch": 8, "resources.procs_per_node": 2,
               "resources.accelerator": "cpu"}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(with_changes(demo_spec, changes)))
    keep = {k: v for k, v in tree(volume).items() if "keep.txt" in k or k.startswith("volume/other")}

    proc = ftjob("run", spec_path)

    assert_clean_error(proc, ("training blocks", "fewer than one batch", "2 ranks", "train.micro_batch 8"))
    after = tree(volume)
    assert {k: after.get(k) for k in keep} == keep
    assert {k for k in after if k.startswith("volume/other")} == {k for k in keep if k.startswith("volume/other")}
