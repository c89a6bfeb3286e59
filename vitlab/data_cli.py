"""`vitlab data shard FOLDER OUT/`: write an image folder as WebDataset shards (see vitlab.data.shards).
Outside the vitlab.data package, whose import loads torch: `vitlab --help` must not."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    d = sub.add_parser("data", help="prepare data sets (WebDataset shards)",
                       description="Prepare data sets for training at scale.")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION", help="shard or verify (default: print this help)")
    s = dsub.add_parser(
        "shard", help="write an image folder as WebDataset tar shards plus index.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write FOLDER (FOLDER/<class>/<image> or FOLDER/train/, val/, test/) as WebDataset tar shards "
                    "OUT/<split>-000000.tar ... in a seeded random order, with OUT/index.json (classes, counts, "
                    "per-shard sha256). Train from them with --dataset shards --data-dir 'OUT/train-{000000..N}.tar'.",
        epilog="example:\n  vitlab data shard photos/ shards/ --shard-size 256MB\n"
               "  vitlab train --dataset shards --data-dir 'shards/train-{000000..000009}.tar' --img-size 64")
    s.add_argument("folder", metavar="FOLDER", help="the image folder (default: none, required)")
    s.add_argument("out", metavar="OUT", help="output folder, empty or new (default: none, required)")
    s.add_argument("--shard-size", default="256MB", help="largest shard size (default 256MB)")
    s.add_argument("--max-count", type=int, default=100_000, help="most samples per shard (default 100000)")
    s.add_argument("--max-side", type=int, default=None,
                   help="re-encode images whose shorter side exceeds N pixels at N (JPEG q90; aspect kept) "
                        "(default: none, kept as they are)")
    s.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out fraction for a folder without train/ and val/ or test/ (default 0.1)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sample order and the held-out split (default 0)")
    s.set_defaults(func=run_shard)
    v = dsub.add_parser("verify", help="check the shards' sizes and sha256 against index.json")
    v.add_argument("out", metavar="OUT", help="the shard folder (default: none, required)")
    v.set_defaults(func=run_verify)
    d.set_defaults(func=lambda args: d.print_help() or 2)


def run_shard(args) -> int:
    from .data.shards import write_shards

    write_shards(args.folder, args.out, shard_size=args.shard_size, max_count=args.max_count, max_side=args.max_side,
                 val_fraction=args.val_fraction, split_seed=args.seed, seed=args.seed)
    return 0


def run_verify(args) -> int:
    from .errors import DataError
    from .data.shards import verify_shards

    bad = verify_shards(args.out)
    if bad:
        raise DataError(f"{len(bad)} shard(s) differ from index.json: {', '.join(bad[:10])}; rewrite them")
    print(f"{args.out}: every shard matches index.json")
    return 0
