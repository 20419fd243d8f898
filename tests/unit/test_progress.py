"""Progress in a batch log: plain periodic lines (no bar redraws), and rank-prefixed lines from other ranks."""
from __future__ import annotations

import logging

from job.progress import Progress, setup_logging


def test_batch_log_gets_periodic_lines_with_rate_and_eta(monkeypatch, caplog):
    monkeypatch.setenv("FTJOB_PROGRESS", "log")
    clock = iter(range(0, 1000, 10))  # every update is 10 s later
    monkeypatch.setattr("job.progress.time.monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="ftjob")
    with Progress(5, "training", "steps", interval_s=15) as bar:
        for _ in range(5):
            bar.update(1, loss=2.5)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("training: 2/5 steps, 40%, eta ") and "loss 2.5" in lines[0]
    assert lines[-1].startswith("training: 5/5 steps, 100%") and lines[-1].endswith("(done)")
    assert len(lines) == 3  # two interval lines and the last one, not one per update


def test_other_ranks_log_with_their_rank(capsys):
    setup_logging(3)
    logging.getLogger("ftjob").error("boom")
    assert "ftjob [rank 3] boom" in capsys.readouterr().err
    setup_logging(0)
    logging.getLogger("ftjob").error("fine")
    assert "[rank" not in capsys.readouterr().err
