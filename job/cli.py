"""`ftjob`: parses the command line and hands it to job/pipeline.py, one function per subcommand. Errors a
user can fix are one line on stderr and a documented exit code (job/errors.py); only bugs print a
traceback."""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from pathlib import Path

from . import errors, logs

EPILOG = "exit codes: " + "; ".join(f"{code} {what}" for code, what in errors.EXIT_CODES.items())


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="show DeepSpeed's, transformers' and torch's own log lines on the console too "
                             "(they always go to <run>/logs/ftjob.log)")
    with_spec = argparse.ArgumentParser(add_help=False, parents=[common])
    with_spec.add_argument("spec", help="job spec (YAML)")
    with_spec.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a spec value, e.g. --set train.epochs=1 (repeatable)")

    parser = argparse.ArgumentParser(prog="ftjob", description=__doc__.split("\n")[0], epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"ftjob {__import__('job').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, parents=(with_spec,)):
        return sub.add_parser(name, help=help, parents=list(parents), epilog=EPILOG)

    p = command("run", "all stages; resumes from the newest complete checkpoint")
    p.add_argument("--restart", action="store_true", help="move the existing run aside and start over")
    p.add_argument("--wait-for-inputs", type=float, default=0, metavar="SECONDS",
                   help="wait up to SECONDS for data.database and model.path to appear (Kubernetes first apply)")
    p = command("validate", "check the spec, database, model and output directory; writes nothing")
    p.add_argument("--print", action="store_true", help="print the resolved spec")
    p = command("plan", "steps, memory, disk and time before you submit; writes nothing")
    p.add_argument("--gpus", type=int, help="processes in all (default: the spec's nodes x processes per node)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB", help="memory per GPU (default 80)")
    p.add_argument("--tokens-per-s", type=float, metavar="X", help="measured training speed, all GPUs together")
    p.add_argument("--json", action="store_true", help="the figures as JSON")
    p = command("smoke", "the spec end to end at toy size on CPU: train, stop, resume, export, plan (CI)")
    p.add_argument("--rows", type=int, default=2000, help="read the first N rows (default 2000)")
    p.add_argument("--database", type=Path, metavar="FIXTURE.sqlite",
                   help="a small database of the same schema instead of the spec's")
    p.add_argument("--out", type=Path, default=Path("ftjob-smoke"),
                   help="scratch directory (default: ./ftjob-smoke); the spec's output_dir is never touched")
    p.add_argument("--gpus", type=int, help="GPUs for the real-size plan (default: the spec's)")
    p = command("prepare", "SQLite -> text shards -> token shards + manifest")
    p.add_argument("--force", action="store_true", help="rebuild even if the inputs have not changed")
    command("train", "launch DeepSpeed training on prepared data (resumes automatically)")
    p = command("generate", "samples from the exported model (or --model DIR)")
    p.add_argument("--model", type=Path, help="a Hugging Face model directory (default: the run's final/)")
    p.add_argument("--name", default="after", help="samples/<name>.jsonl (default: after)")
    p = command("export", "export a checkpoint to Hugging Face format")
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the newest complete one)")
    p.add_argument("--out", type=Path, help="output directory (default: <run>/export-step-N)")
    p = command("status", "where a run stands, from its files (works while it runs elsewhere)", (common,))
    p.add_argument("run_dir", type=Path)
    p.add_argument("--json", action="store_true", help="the figures as JSON")
    p = command("report", "write report.md and loss.png for a run directory", (common,))
    p.add_argument("run_dir", type=Path)
    sub.add_parser("bench", help="training-step and data-path benchmark (see `ftjob bench --help`)", add_help=False)
    p = command("demo-assets", "write the offline demo database and tiny model", (common,))
    p.add_argument("directory", type=Path)
    p.add_argument("--rows", type=int, default=600)
    return parser


def dispatch(args) -> int:
    from . import pipeline, smoke

    spec_args = (args.spec, args.overrides) if hasattr(args, "spec") else ()
    commands = {
        "run": lambda: pipeline.run(*spec_args, restart=args.restart, wait_for_inputs_s=args.wait_for_inputs,
                                    verbose=args.verbose),
        "validate": lambda: pipeline.validate(*spec_args, print_spec=args.print),
        "plan": lambda: pipeline.plan(*spec_args, gpus=args.gpus, gpu_memory_gib=args.gpu_memory,
                                      tokens_per_s=args.tokens_per_s, as_json=args.json),
        "prepare": lambda: pipeline.prepare(*spec_args, force=args.force),
        "smoke": lambda: smoke.smoke(*spec_args, rows=args.rows, database=args.database, out=args.out,
                                     gpus=args.gpus),
        "train": lambda: pipeline.train(*spec_args, verbose=args.verbose),
        "generate": lambda: pipeline.generate(*spec_args, model_dir=args.model, name=args.name),
        "export": lambda: pipeline.export(*spec_args, checkpoint=args.checkpoint, out=args.out),
        "status": lambda: pipeline.status(args.run_dir, as_json=args.json),
        "report": lambda: pipeline.report(args.run_dir),
        "demo-assets": lambda: pipeline.demo_assets(args.directory, args.rows),
    }
    return commands[args.command]()


def _stopped_while_starting(signum, frame):
    raise errors.Stopped(f"stopped by {signal.Signals(signum).name} while starting; nothing was written yet")


def main(argv=None) -> None:
    if argv is None:  # the process's entry point (not a test calling in): a preemption notice in the first
        # seconds, before the run installs its own handlers, is still "stopped, resumable" (75)
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, _stopped_while_starting)
    argv = sys.argv[1:] if argv is None else argv
    # Clusters rarely reach the Hub: models come from local paths or the local cache, for this process
    # and (through the environment) its workers.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars: ftjob has its own
    if argv[:1] == ["bench"]:  # its own parser: a tool for engineers, not a job stage
        logs.setup()
        from .bench import main as bench_main

        sys.exit(bench_main(argv[1:]))
    args = build_parser().parse_args(argv)
    logs.setup(verbose=args.verbose)
    try:
        code = dispatch(args)
    except errors.Stopped as e:
        print(f"ftjob: {e}", file=sys.stderr)
        code = e.exit_code
    except errors.JobError as e:
        print(f"ftjob: error: {e}", file=sys.stderr)
        code = e.exit_code
    except PermissionError as e:
        if not e.filename:
            raise
        # An input or output path the checks above did not name: still one line, with the uid and the fix.
        print(f"ftjob: error: {errors.permission_denied('', e.filename, 'open')}", file=sys.stderr)
        code = errors.BAD_INPUT
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
            raise
        print(f"ftjob: error: the volume failed while writing {e.filename or 'a file'}: {e.strerror}; free space "
              "or fix the volume, then run again (it resumes)", file=sys.stderr)
        code = errors.VOLUME
    except KeyboardInterrupt:
        print("ftjob: interrupted", file=sys.stderr)
        code = errors.PREEMPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
