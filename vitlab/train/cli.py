"""`vitlab train`, `vitlab eval`, `vitlab finetune`, `vitlab predict`: thin over vitlab.train.api."""
from __future__ import annotations

import argparse
import json
import sys

TRAIN_EXAMPLES = """\
examples:
  vitlab train                                  # small ViT on the bundled digits (< 1 min on 2 CPU cores)
  vitlab train --config configs/fashion_mnist.yaml --data-dir /usr/share/datasets/fashion-mnist
  vitlab train --model vit_micro_p4 --dataset mnist --data-dir ../shared/data/mnist epochs=5 lr=2e-3
  vitlab train --resume runs/digits-vit_nano_p2-20250101-120000   # continue an interrupted run
  torchrun --nproc-per-node 2 -m vitlab train batch_size=128      # DDP (same global batch and lr)

every option (set any of them as key=value after the flags; dotted keys set mapping entries,
e.g. model_kwargs.pos_embed=sincos_2d; lists as [a,b]):
"""


def _options_epilog() -> str:
    from .config import describe_fields

    lines = [TRAIN_EXAMPLES]
    for name, tp, default, help_ in describe_fields():
        lines.append(f"  {name:<20} {tp:<18} default {default:<14} {help_}")
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


def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
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
    p.add_argument("--config", metavar="FILE", help="YAML config file (see configs/)")
    p.add_argument("--model", help="model variant, e.g. vit_nano_p2, vit_micro_p4, vit_b16 (`vitlab models`)")
    p.add_argument("--dataset", help="digits, mnist, fashion-mnist, cifar10, cifar100, imagefolder, shards, synthetic")
    p.add_argument("--data-dir", metavar="DIR", help="folder with the data set's files")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--batch-size", type=int, help="global batch size (over processes and accumulation)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--img-size", type=int, help="training resolution (default: the data's own)")
    p.add_argument("--out", metavar="DIR", help="parent folder of run directories (default runs)")
    p.add_argument("--name", help="run directory name (default <dataset>-<model>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, help="seed of initialisation, data order and augmentation")
    p.add_argument("--quiet", action="store_true", help="no log lines or progress bar (the result is still printed)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any option below, e.g. epochs=10 hflip=true")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="evaluate a run or checkpoint: accuracy, loss, per-class, confusion matrix",
                       description="Evaluate a trained model: accuracy, mean cross-entropy, per-class accuracy "
                                   "and a confusion-matrix image. By default on the run's own data set and "
                                   "held-out split, with the run's preprocessing.")
    e.add_argument("checkpoint", metavar="RUN_or_CHECKPOINT", help="run directory or .safetensors file")
    e.add_argument("--dataset", help="data set to evaluate on (default: the run's)")
    e.add_argument("--data-dir", metavar="DIR", help="folder with the data set's files")
    e.add_argument("--split", default=None, choices=("train", "val", "test"),
                   help="which split, named as on disk (default: the held-out split: val/, else test/)")
    e.add_argument("--batch-size", type=int, default=512, help="evaluation batch size (default 512)")
    e.add_argument("--best", action="store_true", help="the run's best checkpoint instead of the last")
    e.add_argument("--no-ema", action="store_true", help="the raw weights even when the run kept an EMA")
    e.add_argument("--out", metavar="DIR", help="where eval.json and confusion.png go (default <run>/eval-<data>-<split>)")
    e.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    e.add_argument("--json", action="store_true", help="print the full result as JSON")
    e.set_defaults(func=run_eval)

    f = sub.add_parser("finetune", help="fine-tune a trained model on another data set (the paper's recipe)",
                       formatter_class=fmt,
                       description="Fine-tune: new zero-initialised linear head for the new classes, learned "
                                   "position embeddings resampled to the new patch grid, SGD momentum 0.9, no "
                                   "weight decay, gradient clipping at 1, linear warmup then cosine decay. "
                                   "Any training option can be overridden as key=value.")
    f.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory or .safetensors file to start from")
    f.add_argument("--dataset", help="the new data set (e.g. imagefolder with --data-dir); required unless in --config")
    f.add_argument("--data-dir", metavar="DIR", help="folder with the data set's files")
    f.add_argument("--img-size", type=int, help="fine-tuning resolution (default: the new data's own)")
    f.add_argument("--epochs", type=int, help="number of epochs (default 10)")
    f.add_argument("--batch-size", type=int, help="global batch size (default 64)")
    f.add_argument("--lr", type=float, help="peak learning rate (default 0.01)")
    f.add_argument("--optimizer", help="sgd (default), adamw or adam")
    f.add_argument("--out", metavar="DIR", help="parent folder of run directories (default runs)")
    f.add_argument("--name", help="run directory name")
    f.add_argument("--quiet", action="store_true", help="no log lines or progress bar")
    f.add_argument("--json", action="store_true", help="print the summary as JSON")
    f.add_argument("overrides", nargs="*", metavar="key=value", help="any `vitlab train` option, e.g. hflip=true")
    f.add_argument("--config", metavar="FILE", help="YAML file of training options (e.g. configs/finetune_flowers.yaml)")
    f.__class__ = _OverridesParser
    f.set_defaults(func=run_finetune)

    q = sub.add_parser("predict", help="top-k classes of image files with a trained model",
                       description="Classify image files (JPEG, PNG, ...) with a trained model: the top-k "
                                   "classes with their probabilities, using the model's own preprocessing.")
    q.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory or .safetensors file")
    q.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    q.add_argument("--topk", type=int, default=5, help="how many classes per image (default 5)")
    q.add_argument("--best", action="store_true", help="the run's best checkpoint instead of the last")
    q.add_argument("--json", action="store_true", help="print JSON")
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
    s = result.summary
    if getattr(args, "json", False) and result.rank == 0:
        print(json.dumps(s, indent=1))
        return 0
    if result.rank != 0:  # under torchrun only rank 0 reports
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
    print(f"{verb} {s['model']} on {s['dataset']}: {what} after {s['epochs']} epochs in {s['wall_s']:.1f} s"
          f"{state}")
    print(f"run: {result.run_dir}   (vitlab eval {result.run_dir}; curves.png, metrics.jsonl, checkpoints/)")
    return 0


def run_eval(args) -> int:
    from .api import evaluate

    r = evaluate(args.checkpoint, args.dataset, args.data_dir, split=args.split, batch_size=args.batch_size,
                 out=args.out, which="best" if args.best else "last", ema=False if args.no_ema else None,
                 device=args.device)
    if args.json:
        print(json.dumps(r, indent=1))
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
                      overrides=args.overrides, verbose=not args.quiet, **fields)
    return _report(result, args, "fine-tuned")


def run_predict(args) -> int:
    from .api import predict

    results = predict(args.checkpoint, args.images, topk=args.topk, which="best" if args.best else "last")
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        tops = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r["top"])
        print(f"{r['image']}: {tops}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
