"""`vitlab analyze`: the ViT paper's analyses of a trained run, as figures and a report."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "analyze", help="attention distance, attention maps, position-embedding similarity, filters: a report",
        description="Compute every analysis that applies to a trained model over N validation images of its "
                    "data set (one batched pass): mean attention distance per head and depth, attention rollout, "
                    "position-embedding similarity, principal components of the patch-embedding filters "
                    "(ConvMixer: filters and depthwise kernels). Writes one PNG per figure, analysis.json and a "
                    "self-contained report.html.")
    p.add_argument("target", metavar="RUN_or_CHECKPOINT", help="a run directory (runs/<name>) or a checkpoint file")
    p.add_argument("--dataset", default=None, help="data set to draw images from (default: the run's)")
    p.add_argument("--data-dir", default=None, help="where the data set lives (default: the loader's default)")
    p.add_argument("--images", type=int, default=128, help="number of validation images (default 128, as the paper)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/analysis)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the model loads)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from .report import analyze_run

    if args.images < 1:
        raise ConfigError(f"--images must be at least 1, got {args.images}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    written = analyze_run(args.target, dataset=args.dataset, data_dir=args.data_dir, images=args.images,
                          out=args.out, batch_size=args.batch_size, device=args.device)
    report = written["report.html"]
    print(f"wrote {len(written)} files to {report.parent}")
    for name in sorted(written):
        print(f"  {name}")
    print(f"open {report}")
    return 0
