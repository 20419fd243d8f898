"""`ftjob status` from the run directory's files alone, with the lock held and released."""
import json
import os
import socket

import pytest

from job.errors import BadInput
from job.rundir import RunLock
from job.rundir import RunPaths
from job.humanize import format_age, parse_time
from job.status import collect_status, status_text

UPDATED = "2024-05-01T12:00:00+0000"
NOW = parse_time(UPDATED) + 12


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_run(root, stage="train", step=50, total=200):
    paths = RunPaths(root)
    paths.root.mkdir(parents=True)
    paths.state.write_text(json.dumps({"stage": stage, "step": step, "total_steps": total, "epoch": 0.5,
                                       "world_size": 2, "loss": 2.75, "updated": UPDATED}))
    write_jsonl(paths.metrics, [{"step": 40, "loss": 2.9, "tokens_per_s": 7000.0, "tokens": 40960, "time": NOW - 60},
                                {"step": 50, "loss": 2.75, "tokens_per_s": 7212.4, "tokens": 51200, "time": NOW - 12}])
    write_jsonl(paths.evals, [{"step": 0, "loss": 3.5, "perplexity": 33.12, "blocks": 10, "tokens": 0},
                              {"step": 50, "loss": 2.8123, "perplexity": 16.65, "blocks": 10, "tokens": 51200}])
    for ckpt_step, complete in ((25, True), (50, False)):  # step 50 is torn: no marker yet
        ckpt = paths.checkpoints / f"step-{ckpt_step:08d}"
        ckpt.mkdir(parents=True)
        if complete:
            (ckpt / "COMPLETE.json").write_text(json.dumps({"step": ckpt_step, "tokens": 25600, "epoch": 0,
                                                            "time": "2024-05-01T11:55:00+0000", "files": {}}))
    return paths


def fields(text: str) -> dict:
    return dict((k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in text.splitlines()))


def test_status_shows_where_the_run_stands_and_who_holds_it(tmp_path):
    paths = make_run(tmp_path / "demo")
    with RunLock(paths):
        held = fields(status_text(paths.root, now=NOW))
    assert held["stage"] == "train"
    assert held["step"] == "50 / 200 (25.0%)"
    assert held["epoch"] == "0.50"
    assert held["train loss"] == "2.7500 at step 50, 7,212 tokens/s"
    assert held["valid loss"] == "2.8123 (perplexity 16.65) at step 50"
    assert held["checkpoint"] == "step-00000025 (step 25, 5m 12s ago)"
    assert held["job"].startswith(f"running: pid {os.getpid()} on {socket.gethostname()} since 20")
    assert held["updated"] == f"{UPDATED} (12s ago)"
    assert held["final model"] == "not yet"

    released = fields(status_text(paths.root, now=NOW))
    assert released["job"] == "no live job holds the run directory"
    assert "killed" in released["stage"]  # state says train, but nobody is training


def test_status_text_is_aligned(tmp_path):
    text = status_text(make_run(tmp_path / "demo").root, now=NOW)
    value_columns = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in text.splitlines()}
    assert len(value_columns) == 1


def test_status_of_a_finished_run(tmp_path):
    paths = make_run(tmp_path / "demo", stage="done", step=200)
    (paths.final).mkdir()
    (paths.final / "config.json").write_text("{}")
    s = fields(status_text(paths.root, now=NOW))
    assert s["stage"] == "done" and s["step"] == "200 / 200 (100.0%)" and s["final model"] == "present (final/)"
    assert collect_status(paths.root)["final"] is True


def test_status_of_a_new_run_and_of_a_stopped_one(tmp_path):
    paths = RunPaths(tmp_path / "new")
    paths.root.mkdir()
    paths.spec.write_text("name: new\n")
    s = fields(status_text(paths.root, now=NOW))
    assert s["stage"].startswith("not started") and s["checkpoint"] == "none complete yet"
    assert s["train loss"].startswith("-") and s["valid loss"].startswith("-")

    paths.state.write_text(json.dumps({"stage": "diverged", "step": 7, "reason": "loss became nan near step 7"}))
    s = fields(status_text(paths.root, now=NOW))
    assert s["stage"] == "diverged" and s["reason"] == "loss became nan near step 7" and s["step"] == "7"


def test_missing_or_wrong_run_dir_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        status_text(tmp_path / "nope")
    make_run(tmp_path / "out" / "demo")
    with pytest.raises(BadInput, match="not an ftjob run directory.*demo"):
        status_text(tmp_path / "out")  # the output_dir, not the run directory inside it


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59, "59s"), (61, "1m 01s"), (3600, "1h 00m"),
                                           (90061, "1d 01h")])
def test_format_age(seconds, text):
    assert format_age(seconds) == text
