"""`vitlab train`, `vitlab eval`, `vitlab finetune`, `vitlab predict`: thin over vitlab.train.api."""
from __future__ import annotations

import argparse
import sys

from .runlog import dumps

TRAIN_EXAMPLES = """\
examples:
  vitlab train                      # small ViT on the bundled digits (< 1 min on 2 cores)
  vitlab train --config configs/fashion_mnist.yaml --data-dir /usr/share/datasets/fashion-mnist
  vitlab train --model vit_micro_p4 --dataset mnist --data-dir ../shared/data/mnist epochs=5 lr=2e-3
  vitlab train --resume runs/digits-vit_nano_p2-20250101-120000   # continue an interrupted run
  torchrun --nproc-per-node 2 -m vitlab train batch_size=128      # DDP (same global batch and lr)

every option (set any of them as key=value after the flags; dotted keys set
mapping entries, e.g. model_kwargs.pos_embed=sincos_2d; lists as [a,b]):
"""


def _options_epilog() -> str:
    from .config import describe_fields

    import shutil
    import textwrap

    rows = describe_fields()
    # column widths from the rows themselves, so a long type (randaugment's) or default cannot shift its row
    wn, wt, wd = (max(len(r[i]) for r in rows) for i in range(3))
    indent = 2 + wn + 1 + wt + 1 + len("default ") + wd + 1
    width = shutil.get_terminal_size((100, 24)).columns - 1
    lines = [TRAIN_EXAMPLES]
    for name, tp, default, help_ in rows:
        head = f"  {name:<{wn}} {tp:<{wt}} default {default:<{wd}} "
        if width - indent >= 30:  # wrap the help in its own column
            lines.append(textwrap.fill(help_, width, initial_indent=head, subsequent_indent=" " * indent))
        else:  # a narrow terminal: the help on the lines below its row
            lines.append(head.rstrip())
            lines.append(textwrap.fill(help_, max(width, 40), initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


class _OverridesParser(argparse.ArgumentParser):
    """A sub-command parser that takes `key=value` overrides anywhere on the line (argparse
    alone only takes positionals in one run), and builds its long option table only when
    help is printed."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        kv = [a for a in extras if "=" in a and not a.startswith("-")]
        if kv:
            ns.overrides = list(getattr(ns, "overrides", None) or []) + kv
        return ns, [a for a in extras if a not in kv]

    def format_help(self):
        if self.epilog is None and getattr(self, "_lazy_epilog", None):
            self.epilog = self._lazy_epilog()
        return super().format_help()


def _default(name: str):
    """A training option's default as `vitlab train` with no arguments uses it (config.py imports no torch)."""
    from .config import TrainConfig

    return getattr(TrainConfig(), name)


def register(sub) -> None:
    from ..cli import HelpFormatter as fmt  # descriptions wrapped, the example/option tables as written
    p = sub.add_parser(
        "train", help="train a model (default: a small ViT on digits)", formatter_class=fmt,
        description="Train a model. With no arguments: the default digits recipe (configs/digits.yaml), "
                    "printing the validation accuracy and where the run directory is. Options come from "
                    "the dataclass defaults, then --config FILE, then the flags below, then key=value "
                    "overrides. The run directory (runs/NAME) holds config.yaml, metrics.jsonl, steps.jsonl, "
                    "TensorBoard events, checkpoints/, summary.json and curves.png.")
    p.__class__ = _OverridesParser
    p._lazy_epilog = _options_epilog
    p.epilog = None
    p.add_argument("--config", metavar="FILE",
                   help="YAML config file, see configs/ (default: none, the defaults listed below)")
    p.add_argument("--model", help="model variant, e.g. vit_nano_p2, vit_micro_p4, vit_b16 (`vitlab models`) "
                                   f"(default: {_default('model')})")
    p.add_argument("--dataset", help="digits, mnist, fashion-mnist, cifar10, cifar100, imagefolder, shards, synthetic "
                                     f"(default: {_default('dataset')})")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder with the data set's files (default: where the loader looks, see the README)")
    p.add_argument("--epochs", type=int, help=f"number of epochs (default: {_default('epochs')})")
    p.add_argument("--batch-size", type=int, help="global batch size, over processes and accumulation "
                                                  f"(default: {_default('batch_size')})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default: {_default('lr')})")
    p.add_argument("--img-size", type=int, help="training resolution (default: the data's own)")
    p.add_argument("--out", metavar="DIR", help=f"parent folder of run directories (default: {_default('out')})")
    p.add_argument("--name", help="run directory name (default: <dataset>-<model>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (default: start a new run)")
    p.add_argument("--device", help=f"auto, cpu, cuda, cuda:N (default: {_default('device')})")
    p.add_argument("--seed", type=int, help="seed of initialisation, data order and augmentation "
                                            f"(default: {_default('seed')})")
    p.add_argument("--quiet", action="store_true",
                   help="no log lines or progress bar; the result is still printed (default: off)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (default: off)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any option below, e.g. epochs=10 hflip=true")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="evaluate a run or checkpoint: accuracy, loss, per-class, confusion matrix",
                       description="Evaluate a trained model: accuracy, mean cross-entropy, per-class accuracy "
                                   "and a confusion-matrix image. By default on the run's own data set and "
                                   "held-out split, with the run's preprocessing.")
    e.add_argument("checkpoint", metavar="RUN_or_CHECKPOINT", help="run directory or .safetensors file")
    e.add_argument("--dataset", help="data set to evaluate on (default: the run's)")
    e.add_argument("--data-dir", metavar="DIR", help="folder with the data set's files (default: the run's)")
    e.add_argument("--split", default=None, choices=("train", "val", "test"),
                   help="which split, named as on disk (default: the held-out split: val/, else test/)")
    e.add_argument("--batch-size", type=int, default=512, help="evaluation batch size (default: %(default)s)")
    e.add_argument("--best", action="store_true",
                   help="the run's best checkpoint instead of the last (default: off, the last)")
    e.add_argument("--no-ema", action="store_true",
                   help="the raw weights even when the run kept an EMA (default: off, the EMA's)")
    e.add_argument("--out", metavar="DIR",
                   help="where eval.json and confusion.png go (default: <run>/eval-<data>-<split>)")
    e.add_argument("--device", default="cpu", help="cpu, cuda, auto (default: %(default)s)")
    e.add_argument("--json", action="store_true", help="print the full result as JSON (default: off)")
    e.set_defaults(func=run_eval)

    f = sub.add_parser("finetune", help="fine-tune a trained model on another data set (the paper's recipe)",
                       formatter_class=fmt,
                       description="Fine-tune: new zero-initialised linear head for the new classes, learned "
                                   "position embeddings resampled to the new patch grid, SGD momentum 0.9, no "
                                   "weight decay, gradient clipping at 1, linear warmup then cosine decay. "
                                   "Published weights bring their preprocessing (resizing filter, evaluation "
                                   "crop_pct, input size, mean/std), used unless set (interpolation=, crop_pct=, "
                                   "mean=/std=, --img-size). Any training option can be overridden as key=value.")
    f.add_argument("checkpoint", metavar="SOURCE",
                   help="weights to start from: a run directory or checkpoint, a Hugging Face folder (config.json + "
                        "model.safetensors), a timm .safetensors/.pth (with --model), a Google .npz, "
                        "hf-hub:ORG/NAME, timm/NAME.TAG, or a published tag such as vit_b16.augreg_in21k")
    f.add_argument("--model", dest="source_model", metavar="NAME",
                   help="architecture of a checkpoint that does not record it (timm files): a vitlab variant "
                        "(vit_b16) or timm's name (vit_base_patch16_224) (default: read from the checkpoint)")
    f.add_argument("--revision", help="Hub revision (branch, tag or commit) of an hf-hub:/timm/ source "
                                      "(default: main)")
    f.add_argument("--dataset", help="the new data set, e.g. imagefolder with --data-dir (default: none; "
                                     "required unless in --config)")
    f.add_argument("--data-dir", metavar="DIR", help="folder with the data set's files (default: where the "
                                                     "loader looks, see the README)")
    f.add_argument("--img-size", type=int, help="fine-tuning resolution (default: the weights' input size "
                                                   "where they state one, else the new data's own)")
    f.add_argument("--epochs", type=int, help="number of epochs (default: 10)")
    f.add_argument("--batch-size", type=int, help="global batch size (default: 64)")
    f.add_argument("--lr", type=float, help="peak learning rate (default: 0.01)")
    f.add_argument("--optimizer", help="sgd, adamw or adam (default: sgd)")
    f.add_argument("--out", metavar="DIR", help=f"parent folder of run directories (default: {_default('out')})")
    f.add_argument("--name", help="run directory name (default: <dataset>-<model>-<time>)")
    f.add_argument("--quiet", action="store_true", help="no log lines or progress bar (default: off)")
    f.add_argument("--json", action="store_true", help="print the summary as JSON (default: off)")
    f.add_argument("overrides", nargs="*", metavar="key=value", help="any `vitlab train` option, e.g. hflip=true")
    f.add_argument("--config", metavar="FILE", help="YAML file of training options, e.g. "
                                                    "configs/finetune_flowers.yaml (default: none)")
    f.__class__ = _OverridesParser
    f.set_defaults(func=run_finetune)

    q = sub.add_parser("predict", help="top-k classes of images (files, folders, globs) with a trained model",
                       description="Classify images (JPEG, PNG, ...) with a trained model or an exported .onnx file: "
                                   "the top-k classes with their probabilities, using the model's own preprocessing. "
                                   "Folders are searched recursively; images are read and classified in batches, so "
                                   "memory does not grow with their number. An unreadable image is named on stderr, "
                                   "the others are predicted, and the exit status is 1.")
    q.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory, .safetensors file or exported .onnx file")
    q.add_argument("images", nargs="+", metavar="PATH", help="image files, folders (recursive) or glob patterns")
    q.add_argument("--topk", "--top-k", dest="topk", type=int, default=5, help="how many classes per image (default 5)")
    q.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    q.add_argument("--format", default="table", choices=("table", "csv", "jsonl"),
                   help="table (one line per image), csv or jsonl (default table)")
    q.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"),
                   help="torch (the checkpoint) or onnxruntime (an exported file: --onnx, or RUN/export-onnx/model.onnx) "
                        "(default torch)")
    q.add_argument("--onnx", metavar="MODEL.onnx", help="exported file to run with ONNX Runtime (preprocess.json beside it) (default: none)")
    q.add_argument("--best", action="store_true", help="the run's best checkpoint instead of the last (default: off)")
    q.add_argument("--json", action="store_true", help="same as --format jsonl (default: off)")
    q.set_defaults(func=run_predict)


def _flag_overrides(args, names: list[str]) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _train_config(args):
    from ..errors import ConfigError
    from .checkpoint import read_state, resolve_checkpoint
    from .config import SESSION_FIELDS, TrainConfig, apply_overrides, load_config

    flags = _flag_overrides(args, ["model", "dataset", "data_dir", "epochs", "batch_size", "lr", "img_size",
                                   "out", "name", "device", "seed"])
    if args.resume:
        if args.config:
            raise ConfigError("--resume continues a run with its own saved config; drop --config "
                              "(change single options with key=value)")
        from .runlock import ensure_free

        ensure_free(args.resume)
        found = resolve_checkpoint(args.resume)
        if found["state"] is None:
            raise ConfigError(f"{args.resume!r} has no training state to resume; pass a run directory")
        saved = read_state(found["state"])["config"]
        # session fields (max_steps, device, threads, ...) steer one invocation, not the run
        saved = {k: v for k, v in saved.items() if k not in SESSION_FIELDS}
        cfg = TrainConfig.from_dict(saved, source=f"{found['state']}")
        cfg = apply_overrides(cfg, {k: v for k, v in flags.items() if k not in ("out", "name")})
        cfg = apply_overrides(cfg, args.overrides)
        return apply_overrides(cfg, {"resume": args.resume})
    cfg = load_config(args.config) if args.config else TrainConfig()
    cfg = apply_overrides(cfg, flags)
    return apply_overrides(cfg, args.overrides)


def run_train(args) -> int:
    from .engine import fit

    cfg = _train_config(args)
    result = fit(cfg, verbose=not args.quiet, merge_resume=False)
    return _report(result, args, "trained")


def _report(result, args, verb: str) -> int:
    from .runlog import plural

    s = result.summary
    if getattr(args, "json", False) and result.rank == 0:
        print(dumps(s, indent=1))
        return 0
    if result.rank != 0:  # under torchrun only rank 0 reports
        return 0
    if getattr(result, "already_complete", False):  # fit said so unless --quiet; nothing was trained
        if getattr(args, "quiet", False):
            print(f"run {result.run_dir} is complete ({s.get('epochs')} epochs); nothing to do")
        print(f"run: {result.run_dir}   (vitlab eval {result.run_dir}; curves.png, metrics.jsonl, checkpoints/)")
        return 0
    acc = s.get("val_acc")
    best = s.get("best_val_acc")
    if acc is not None:
        what = f"validation accuracy {100 * acc:.2f}% (best {100 * best:.2f}%)"
    elif s.get("val_loss") is not None:
        what = f"validation loss {s['val_loss']:.4f}"
    else:
        what = "no evaluation yet"
    state = "" if s.get("finished") else f" (stopped at step {s['steps']}; continue with --resume)"
    print(f"{verb} {s['model']} on {s['dataset']}: {what} after {plural(s['epochs'], 'epoch')} in {s['wall_s']:.1f} s"
          f"{state}")
    print(f"run: {result.run_dir}   (vitlab eval {result.run_dir}; curves.png, metrics.jsonl, checkpoints/)")
    return 0


def run_eval(args) -> int:
    from .api import evaluate

    r = evaluate(args.checkpoint, args.dataset, args.data_dir, split=args.split, batch_size=args.batch_size,
                 out=args.out, which="best" if args.best else "last", ema=False if args.no_ema else None,
                 device=args.device)
    if args.json:
        print(dumps(r, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"{r['dataset']} {r['split']} ({r['n']} images): accuracy [bold]{100 * r['accuracy']:.2f}%"
                  f"[/bold], loss {r['loss']:.4f}" + (" (EMA weights)" if r["ema"] else ""), highlight=False)
    table = Table(title="per-class accuracy")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("accuracy", justify="right")
    for i, (name, acc) in enumerate(r["per_class_accuracy"].items()):
        n = sum(r["confusion_matrix"][i])
        table.add_row(name, str(n), "-" if acc is None else f"{100 * acc:.1f}%")
    console.print(table)
    print(f"confusion matrix: {r.get('confusion_png')}   results: {r['json']}")
    return 0


def run_finetune(args) -> int:
    from .api import finetune

    fields = {}
    if args.config:  # a YAML file of options, applied before the flags and key=value overrides
        import yaml

        from .config import load_config

        load_config(args.config)  # validates the keys with a clear message
        fields.update(yaml.safe_load(open(args.config)) or {})
    fields.update(_flag_overrides(args, ["epochs", "batch_size", "lr", "optimizer", "out", "name"]))
    dataset = args.dataset or fields.pop("dataset", None)
    fields.pop("dataset", None)
    data_dir = args.data_dir or fields.pop("data_dir", None)
    fields.pop("data_dir", None)
    img_size = args.img_size or fields.pop("img_size", None)
    fields.pop("img_size", None)
    if not dataset:
        from ..errors import ConfigError

        raise ConfigError("finetune needs the new data set: --dataset NAME (or dataset: in --config)")
    result = finetune(args.checkpoint, dataset, img_size=img_size, data_dir=data_dir,
                      overrides=args.overrides, verbose=not args.quiet, model_name=args.source_model,
                      revision=args.revision, **fields)
    return _report(result, args, "fine-tuned")


def run_predict(args) -> int:
    from ..deploy.cli import run_predict as run

    return run(args)


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
