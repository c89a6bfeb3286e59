"""The `vitlab` command line: a thin layer over the Python API.

Each area registers its own sub-commands (`register(subparsers)` in the modules below) and
imports its heavy dependencies inside the handler, so `vitlab --help` stays fast. Every
VitlabError becomes one line on stderr and exit status 2: no traceback for bad input.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import VitlabError

COMMAND_MODULES = (
    "vitlab.models.cli",      # models
    "vitlab.train.cli",       # train, eval, finetune, predict
    "vitlab.analysis.cli",    # analyze
    "vitlab.studies.cli",     # pretrain, fewshot, study
    "vitlab.bench",           # bench
    "vitlab.accel.cli",       # env
    "vitlab.data.cli",        # data shard, data verify
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitlab",
        description="Build, train, fine-tune, study and explain patch-based image models "
                    "(ViT, hybrid ResNet+ViT, CvT, ConvMixer, BiT ResNet).",
    )
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
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
