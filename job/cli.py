"""`ftjob`: one subcommand per stage, and `run` for all of them. Errors a user can fix are one line
on stderr and a documented exit code (job/errors.py); only bugs print a traceback."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import errors

log = logging.getLogger("ftjob")

EPILOG = "exit codes: " + "; ".join(f"{code} {what}" for code, what in errors.EXIT_CODES.items())


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set train.epochs=1 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftjob", description=__doc__.split("\n")[0], epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"ftjob {__import__('job').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="all stages; resumes from the newest complete checkpoint", epilog=EPILOG)
    _spec_args(p)
    p.add_argument("--restart", action="store_true", help="move the existing run aside and start over")
    p.add_argument("--wait-for-inputs", type=float, default=0, metavar="SECONDS",
                   help="wait up to SECONDS for data.database and model.path to appear (Kubernetes first apply)")

    p = sub.add_parser("validate", help="check the spec, database, model and output directory; writes nothing")
    _spec_args(p)
    p.add_argument("--print", action="store_true", help="print the resolved spec")

    p = sub.add_parser("prepare", help="SQLite -> text shards -> token shards + manifest")
    _spec_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if the inputs have not changed")

    p = sub.add_parser("train", help="launch DeepSpeed training on prepared data (resumes automatically)")
    _spec_args(p)

    p = sub.add_parser("generate", help="samples from the exported model (or --model DIR)")
    _spec_args(p)
    p.add_argument("--model", type=Path, help="a Hugging Face model directory (default: the run's final/)")
    p.add_argument("--name", default="after", help="samples/<name>.jsonl (default: after)")

    p = sub.add_parser("export", help="export a checkpoint to Hugging Face format")
    _spec_args(p)
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the newest complete one)")
    p.add_argument("--out", type=Path, help="output directory (default: <run>/export-step-N)")

    p = sub.add_parser("status", help="where a run stands, from its files (works while it runs elsewhere)")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("report", help="write report.md and loss.png for a run directory")
    p.add_argument("run_dir", type=Path)

    sub.add_parser("bench", help="training-step and data-path benchmark (see `ftjob bench --help`)",
                   add_help=False)

    p = sub.add_parser("demo-assets", help="write the offline demo database and tiny model")
    p.add_argument("directory", type=Path)
    p.add_argument("--rows", type=int, default=600)
    return parser


def _load(args):
    from . import spec as spec_lib

    return spec_lib.load(args.spec, args.overrides)


def dispatch(args) -> int:
    from .paths import RunPaths

    if args.command == "demo-assets":
        from .demo import write_demo_assets

        out = write_demo_assets(args.directory, args.rows)
        print(f"database: {out['database']}\nmodel:    {out['model']}")
        return errors.OK
    if args.command == "status":
        from .status import status_text

        print(status_text(args.run_dir))
        return errors.OK
    if args.command == "report":
        from .report import write_report

        print(write_report(RunPaths(args.run_dir)))
        return errors.OK

    spec = _load(args)  # before the heavy imports below: a spec error answers in a fraction of a second
    from . import pipeline

    paths = RunPaths(spec.run_dir)
    if args.command == "validate":
        facts = pipeline.preflight(spec)
        if args.print:
            from .spec import dump

            print(dump(spec))
        print(f"ok: {args.spec} is valid (run directory {paths.root}, tokenizer vocabulary "
              f"{facts['tokenizer_vocab']}, {facts['positions']} positions)")
        return errors.OK
    if args.command == "run":
        return pipeline.run(spec, restart=args.restart, wait_for_inputs_s=args.wait_for_inputs)
    if args.command == "prepare":
        pipeline.preflight(spec)
        from .lock import RunLock

        with RunLock(paths):
            pipeline.start_run_dir(spec, paths, restart=False)
            pipeline.prepare_stage(spec, paths, force=args.force)
        return errors.OK
    if args.command == "train":
        from .lock import RunLock
        from .train.launch import node_info

        node = node_info(spec)
        pipeline.preflight(spec, node.accelerator)
        with RunLock(paths):
            pipeline.start_run_dir(spec, paths, restart=False)
            return pipeline.train_stage(spec, paths, node)
    if args.command == "generate":
        pipeline.generate_stage(spec, paths, args.model, args.name)
        return errors.OK
    if args.command == "export":
        from .train.offline_export import export_checkpoint

        print(export_checkpoint(paths, args.checkpoint, args.out))
        return errors.OK
    raise AssertionError(args.command)


def main(argv=None) -> None:
    from .progress import setup_logging

    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: it is a tool for engineers, not a job stage
        from .bench import main as bench_main

        sys.exit(bench_main(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        code = dispatch(args)
    except errors.JobError as e:
        print(f"ftjob: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("ftjob: interrupted", file=sys.stderr)
        code = errors.PREEMPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
