"""Where log lines go: ftjob's own lines to the console, everything to the run's log file.

A user reads ftjob's lines (what it is doing, warnings that matter, errors). DeepSpeed's INFO lines, library
FutureWarnings and transformers' notices are for debugging: they go to `<run>/logs/ftjob.log` always and to
the console only with `--verbose`. The workers run in other processes; their output comes through a pipe
to the `ftjob` process, which applies the same rule line by line (console_wants).
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
from pathlib import Path

FORMAT_DATE = "%Y-%m-%d %H:%M:%S"
# Libraries that install their own console handlers; routed through ours instead.
LIBRARY_LOGGERS = ("DeepSpeed", "transformers", "torch", "huggingface_hub", "accelerate")

_OWN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ftjob ")
_LIBRARY_ERROR = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+ (ERROR|CRITICAL): |\[ERROR\]")
# DeepSpeed's launcher logs a worker's exit 75 (a preemption checkpointed: ftjob says so itself) as an error.
_PREEMPTED_WORKER = re.compile(r"sigkill_handler\].* exits with return code = 75$")
_RAW_ERROR = re.compile(r"^(Traceback \(most recent call last\):|\w+(Error|Exception)\b|Fatal Python error|"
                        r"Segmentation fault|Killed)")


class LineFormatter(logging.Formatter):
    """`2024-05-01 12:00:00 ftjob [rank 1] message` for ftjob's records, `... DeepSpeed WARNING: message` for
    a library's, and every line of a multi-line record (a traceback) carries the same prefix, so it can be
    told apart line by line after it went through a pipe."""

    def __init__(self, rank: int | None = None):
        super().__init__(datefmt=FORMAT_DATE)
        self.rank_prefix = f"[rank {rank}] " if rank else ""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        when = self.formatTime(record, self.datefmt)
        if record.name == "ftjob" or record.name.startswith("ftjob."):
            prefix = f"{when} ftjob {self.rank_prefix}"
        else:
            prefix = f"{when} {record.name} {record.levelname}: "
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class ConsoleFilter(logging.Filter):
    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == "ftjob" or record.name.startswith("ftjob.")
        return self.verbose or own or record.levelno >= logging.ERROR


def setup(rank: int | None = None, verbose: bool = False, stream=None) -> None:
    """Console logging for this process (stderr): ftjob's lines, and the rest with --verbose."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LineFormatter(rank))
    handler.addFilter(ConsoleFilter(verbose))
    root = logging.getLogger()
    for h in list(root.handlers):
        if not isinstance(h, logging.FileHandler):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("ftjob").setLevel(logging.INFO)
    logging.captureWarnings(True)  # FutureWarning & co. become records: file always, console if verbose
    logging.raiseExceptions = False  # a log file on a full volume must not print tracebacks of its own
    route_library_loggers()


def route_library_loggers() -> None:
    """Send already-imported libraries' loggers through our handlers (they print to the console
    themselves otherwise). Call again after importing such a library."""
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            lib.removeHandler(h)
        lib.propagate = True
    if "transformers" in sys.modules:  # never import it here: `ftjob status` stays light
        import transformers.utils.logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in a batch log


_quiet = [False]  # console_level above INFO: the workers' own lines stay in the log file too


@contextlib.contextmanager
def console_level(level: int):
    """The console shows only records at `level` or above for a while (errors still show); the run's log
    file keeps everything. For `ftjob smoke`, whose inner runs would otherwise print dozens of lines."""
    handlers = [h for h in logging.getLogger().handlers if not isinstance(h, logging.FileHandler)]
    before = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(level)
    _quiet[0] = level > logging.INFO
    try:
        yield
    finally:
        for h, old in zip(handlers, before):
            h.setLevel(old)
        _quiet[0] = False


def add_file(path: Path, rank: int | None = None) -> logging.Handler:
    """Everything, unfiltered, appended to the run's log file (kept across attempts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(LineFormatter(rank))
    logging.getLogger().addHandler(handler)
    return handler


def remove_handler(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        try:
            handler.close()
        except OSError:  # closing flushes; on a full volume that fails and the lines are lost, not the job
            pass


class WorkerOutputFilter:
    """Decides, line by line, which lines of the launcher's and workers' output reach the console:
    ftjob's own lines, error lines, and a raw traceback from its first line to the exception line."""

    def __init__(self, verbose: bool):
        self.verbose, self.in_traceback = verbose, False

    def console_wants(self, line: str) -> bool:
        if self.verbose or (_OWN_LINE.match(line) and not _quiet[0]):
            return True
        if self.in_traceback:
            if not line.startswith((" ", "\t")):
                self.in_traceback = False  # the exception's own line ends the block
            return True
        if line.startswith("Traceback (most recent call last):"):
            self.in_traceback = True
            return True
        if _PREEMPTED_WORKER.search(line.rstrip("\n")):
            return False
        return bool(_LIBRARY_ERROR.search(line) or _RAW_ERROR.match(line))
