"""`vitlab push RUN REPO_ID`, and the `hf` / `timm` formats of `vitlab export` (export_formats)."""
from __future__ import annotations


def export_formats() -> dict:
    """{format: function(run, out_dir) -> Path} for `vitlab export RUN --format FORMAT`."""
    from .publish import export_hf, export_timm

    return {"hf": export_hf, "timm": export_timm}


def register(sub) -> None:
    p = sub.add_parser("push", help="upload a trained model to the Hugging Face Hub (transformers or timm format)",
                       description="Export a run (as `vitlab export --format hf|timm` does: weights, config, "
                                   "model card README.md) and upload the folder to a Hub repository through "
                                   "huggingface_hub (log in first with `hf auth login`, or set HF_TOKEN).")
    p.add_argument("run", metavar="RUN", help="run directory or checkpoint")
    p.add_argument("repo_id", metavar="REPO_ID", help="ORG_OR_USER/NAME on the Hub (created if missing)")
    p.add_argument("--format", dest="fmt", default="hf", choices=("hf", "timm"),
                   help="hf: transformers' ViTForImageClassification/CvtForImageClassification (default); "
                        "timm: timm's key layout")
    p.add_argument("--private", action="store_true", help="create the repository as private (default: public)")
    p.add_argument("--revision", help="branch to upload to (default main)")
    p.add_argument("--message", help="commit message (default: huggingface_hub's)")
    p.set_defaults(func=run_push)


def run_push(args) -> int:
    from .publish import push_to_hub

    url = push_to_hub(args.run, args.repo_id, fmt=args.fmt, private=args.private, message=args.message,
                      revision=args.revision)
    print(f"pushed {args.run} to {args.repo_id} ({args.fmt} format): {url}")
    return 0
