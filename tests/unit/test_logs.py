"""What reaches the console: ftjob's own lines, errors and tracebacks; the rest only in the log file or
with --verbose. Progress: plain periodic lines in a batch log, events for the parent's bar."""
from __future__ import annotations

import io
import json
import logging

from job import logs
from job.progress import EVENT_PREFIX, EventBar, Progress


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


def test_other_ranks_log_with_their_rank_and_libraries_stay_off_the_console():
    out = io.StringIO()
    logs.setup(rank=3, stream=out)
    logging.getLogger("ftjob").error("boom")
    logging.getLogger("DeepSpeed").info("[INFO] chatter")
    logging.getLogger("transformers.modeling_utils").warning("loss_type=None was set")
    logging.getLogger("DeepSpeed").error("real trouble")
    text = out.getvalue()
    assert "ftjob [rank 3] boom" in text and "DeepSpeed ERROR: real trouble" in text
    assert "chatter" not in text and "loss_type" not in text
    out = io.StringIO()
    logs.setup(rank=0, verbose=True, stream=out)
    logging.getLogger("ftjob").info("fine")
    logging.getLogger("acme.library").warning("chatter")
    assert "[rank" not in out.getvalue() and "acme.library WARNING: chatter" in out.getvalue()
    logs.setup()


def test_every_line_of_a_logged_traceback_carries_the_prefix():
    out = io.StringIO()
    logs.setup(rank=1, stream=out)
    try:
        raise ValueError("bad value")
    except ValueError:
        logging.getLogger("ftjob").exception("training failed")
    lines = out.getvalue().splitlines()
    logs.setup()
    assert len(lines) > 3 and all(" ftjob [rank 1] " in line for line in lines)
    assert lines[-1].endswith("ValueError: bad value")


def test_worker_output_filter_passes_own_lines_errors_and_raw_tracebacks():
    f = logs.WorkerOutputFilter(verbose=False)
    shown = [line for line in [
        "2026-11-27 17:48:19 ftjob eval at step 0: validation loss 6.1848",
        "[2026-11-27 17:47:43,861] [INFO] [runner.py:630:main] cmd = python -u -m deepspeed.launcher.launch",
        "2026-11-27 17:48:19 py.warnings WARNING: FutureWarning: deprecated",
        "2026-11-27 17:48:19 DeepSpeed ERROR: something broke",
        "[2026-11-27 17:48:20,000] [ERROR] [launch.py:325:sigkill_handler] exits with return code = -9",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "RuntimeError: boom",
        "after the traceback, plain chatter",
    ] if f.console_wants(line)]
    assert shown == ["2026-11-27 17:48:19 ftjob eval at step 0: validation loss 6.1848",
                     "2026-11-27 17:48:19 DeepSpeed ERROR: something broke",
                     "[2026-11-27 17:48:20,000] [ERROR] [launch.py:325:sigkill_handler] exits with return code = -9",
                     "Traceback (most recent call last):", '  File "x.py", line 1, in <module>', "RuntimeError: boom"]
    assert logs.WorkerOutputFilter(verbose=True).console_wants("anything at all")


def test_progress_events_drive_the_parents_bar(monkeypatch, capsys):
    monkeypatch.setenv("FTJOB_PROGRESS", "events")
    with Progress(4, "training", "steps") as bar:
        for _ in range(4):
            bar.update(1, loss=1.5)
    events = [json.loads(line[len(EVENT_PREFIX):]) for line in capsys.readouterr().err.splitlines()
              if line.startswith(EVENT_PREFIX)]
    assert events[0]["n"] == 0 and events[-1] == {"desc": "training", "unit": "steps", "n": 4, "total": 4,
                                                  "initial": 0, "fields": {"loss": "1.5"}, "done": True}
    drawn = EventBar()
    for e in events:
        drawn.handle(EVENT_PREFIX + json.dumps(e))
    assert drawn._bar is None  # closed by the last event
    assert "training: 100%" in capsys.readouterr().err
