"""The `vitlab` command line: a thin layer over the Python API.

Each area registers its own sub-commands (`register(subparsers)` in the modules below) and
imports its heavy dependencies inside the handler, so `vitlab --help` stays fast. Every
VitlabError becomes one line on stderr and exit status 2: no traceback for bad input.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import VitlabError

COMMAND_MODULES = (
    "vitlab.models.cli",      # models
    "vitlab.train.cli",       # train, eval, finetune, predict
    "vitlab.analysis.cli",    # analyze
    "vitlab.studies.cli",     # pretrain, fewshot, study
    "vitlab.bench_cli",       # bench (vitlab/bench.py imports torch; its options live apart)
    "vitlab.env_cli",         # env (what vitlab.accel found on this machine)
    "vitlab.deploy.cli",      # export (predict's options are in vitlab.train.cli)
    "vitlab.models.publish_cli",  # push (and the hf/timm formats of export)
    "vitlab.data_cli",        # data shard, data verify
)


class HelpFormatter(argparse.HelpFormatter):
    """Wraps a one-paragraph description to the terminal like argparse's default, but keeps text
    with its own line breaks (example and option tables in epilogs) as written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitlab",
        description="Build, train, fine-tune, study and explain patch-based image models "
                    "(ViT, hybrid ResNet+ViT, CvT, ConvMixer, BiT ResNet).",
    )
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}",
                        help="print vitlab's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # an area not written yet must not break the others
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        if args.command is None:
            # `vitlab` alone runs the main job: `vitlab train` with its defaults
            args = parser.parse_args(["train"] + list(argv or sys.argv[1:]))
        else:
            parser.parse_args([args.command, "--help"])
    try:
        return int(args.func(args) or 0)
    except VitlabError as e:
        print(f"vitlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # a training run stopped by SIGTERM/SIGUSR1 saved a checkpoint and exits with the shell's
        # status for that signal (128 + number: 143 for SIGTERM), as a killed process would
        print(f"vitlab {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return int(getattr(e, "exit_status", 130))
    except BrokenPipeError:
        # the reader of our output went away (`vitlab study NAME --list | head`): stop quietly, as
        # Unix tools do, with stdout pointed at /dev/null so the interpreter's final flush is silent
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
