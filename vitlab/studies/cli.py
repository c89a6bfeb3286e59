"""`vitlab pretrain`, `vitlab fewshot` and `vitlab study`."""
from __future__ import annotations

import argparse
import shutil
import textwrap

from ..cli import HelpFormatter


def register(sub) -> None:
    # ------------------------------------------------------------------ pretrain
    p = sub.add_parser(
        "pretrain", help="self-supervised pre-training (masked patch prediction)",
        description="Pre-train a ViT with the ViT paper's masked patch prediction (Appendix B.1.2) through the "
                    "training engine (checkpoints, resume, logs). The result fine-tunes with `vitlab finetune` "
                    "like any checkpoint. Extra `key=value` arguments set any training option.")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="training options (see `vitlab train --help`)")
    p.add_argument("--objective", default="mpp", choices=["mpp"],
                   help="pre-training objective, masked patch prediction (default: %(default)s)")
    p.add_argument("--model", default=None, help=f"a vit_* or hybrid model (default: {_train_default('model')})")
    p.add_argument("--dataset", default=None,
                   help=f"data set: digits, mnist, fashion-mnist, cifar10, ... (default: {_train_default('dataset')})")
    p.add_argument("--data-dir", default=None, help="folder with the data set's files (default: where the loader "
                                                    "looks, see the README's data sets)")
    p.add_argument("--epochs", type=int, default=None, help=f"number of epochs (default: {_train_default('epochs')})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch size (default: {_train_default('batch_size')})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {_train_default('lr')})")
    p.add_argument("--img-size", type=int, default=None, help="training resolution (default: the data's own)")
    p.add_argument("--target", default="color3bit",
                   help="what is predicted: color3bit (the paper's), patch4x4 or l2 (default: %(default)s)")
    p.add_argument("--mask-rate", type=float, default=0.5,
                   help="fraction of patches corrupted (default: %(default)s, as the paper)")
    p.add_argument("--mask-prob", type=float, default=0.8,
                   help="of those, the fraction replaced by [MASK] (default: %(default)s)")
    p.add_argument("--random-prob", type=float, default=0.1,
                   help="of those, the fraction replaced by a random patch (default: %(default)s)")
    p.add_argument("--out", default=None, help="parent folder of run directories (default: runs)")
    p.add_argument("--name", default=None, help="run directory name (default: <dataset>-<model>-<time>)")
    p.add_argument("--resume", default=None, help="run directory to continue (default: start a new run)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of initialisation, data order and masking (default: {_train_default('seed')})")
    p.set_defaults(func=run_pretrain, _parser=p)

    # ------------------------------------------------------------------ fewshot
    f = sub.add_parser(
        "fewshot", help="few-shot linear evaluation of a checkpoint's frozen features",
        description="The ViT paper's few-shot evaluation: frozen features, a closed-form regularised least-squares "
                    "fit to {-1, 1} targets on k images per class, accuracy on the validation set, averaged over "
                    "seeds; plus a full linear probe on every training image.")
    f.add_argument("checkpoint", help="run directory or .safetensors file")
    f.add_argument("--dataset", default=None, help="data set to evaluate on (default: the checkpoint's)")
    f.add_argument("--data-dir", default=None, help="folder with the data set's files (default: the checkpoint's)")
    f.add_argument("--shots", default="1,5,10,25", help="comma-separated shots per class (default: %(default)s)")
    f.add_argument("--seeds", type=int, default=3,
                   help="number of random draws per shot count (default: %(default)s)")
    f.add_argument("--l2-reg", type=float, default=1.0, help="ridge regulariser (default: %(default)s)")
    f.add_argument("--feature", default="pre_logits", choices=["pre_logits", "token", "avg"],
                   help="pre_logits: the model's own pooled features (CLS or GAP); token/avg force one (ViT) "
                        "(default: %(default)s)")
    f.add_argument("--no-linear-probe", action="store_true", help="skip the full linear probe (default: off)")
    f.add_argument("--batch-size", type=int, default=256,
                   help="images per forward pass of feature extraction (default: %(default)s)")
    f.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    f.set_defaults(func=run_fewshot)

    # ------------------------------------------------------------------ study
    s = sub.add_parser(
        "study", help="run a built-in experiment grid and write a table and a plot",
        description="Run one of the papers' experiments as a grid of training runs (resumable: run the same "
                    "command again after an interruption), then write table.csv, table.md, plot.png and meta.json. "
                    "Size overrides: key=value for the study's options (lists comma-separated) or "
                    "train.FIELD=value for any training option. Under `torchrun --nproc-per-node N -m vitlab study` "
                    "the runs are shared out, one process per run.",
        formatter_class=HelpFormatter)
    s.__class__ = _LazyEpilogParser  # the list of studies imports torch: built only when help is printed
    s._lazy_epilog = _study_epilog
    s.add_argument("name", help="study name (see below)")
    s.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="study options (lists comma-separated) or train.FIELD=value for any training option")
    s.add_argument("--dataset", default=None, help="data set of every run (default: the study's own, see below)")
    s.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: the study's own)")
    s.add_argument("--out", default=None, help="output folder (default: results/NAME)")
    s.add_argument("--no-plot", action="store_true", help="skip plot.png (default: off, the plot is written)")
    s.add_argument("--preset", default="small", choices=["small", "paper", "cifar10"],
                   help="small: minutes on 2 CPU cores; paper: the paper's setting (data set, model sizes, epochs) "
                        "for a GPU machine; cifar10: the study's grid on CIFAR-10 at 32 px (models a little larger "
                        "than small's, 3 seeds, pad-and-crop and flips) for one consumer GPU, its files in "
                        "train.data_dir=DIR or $VITLAB_DATA/cifar10/ (checked before the first run). paper and "
                        "cifar10 print what they run and their counted training compute first "
                        "(default: %(default)s)")
    s.add_argument("--list", action="store_true",
                   help="only print the runs the study would train (and a preset's cost); needs no data files "
                        "(default: off)")
    s.set_defaults(func=run_study_cmd, _parser=s)


def _train_default(name: str):
    """The training option's default (vitlab/train/config.py imports no torch)."""
    from ..train.config import TrainConfig

    return getattr(TrainConfig(), name)


class _LazyEpilogParser(argparse.ArgumentParser):
    """Builds its epilog only when help is printed."""

    def format_help(self):
        if self.epilog is None and getattr(self, "_lazy_epilog", None):
            self.epilog = self._lazy_epilog()
        return super().format_help()


def _study_epilog() -> str:
    try:
        from .study import STUDIES, get_study

        get_study("pooling")
        width = shutil.get_terminal_size((100, 24)).columns - 2
        lines = ["built-in studies:"]
        for st in STUDIES.values():
            opts = ", ".join(f"{k}={v if not isinstance(v, list) else ','.join(map(str, v))}"
                             for k, v in st.params.items())
            lines.append(textwrap.fill(f"{st.name}: {st.description}", width, initial_indent="  ",
                                       subsequent_indent="      "))
            lines.append(textwrap.fill(f"options: {opts}", width, initial_indent="      ",
                                       subsequent_indent="        ", break_on_hyphens=False))
        return "\n".join(lines)
    except Exception:  # pragma: no cover - help must never fail
        return ""


def _intermixed(args) -> None:
    """`key=value` overrides may come before, between or after the options: argparse stops
    at the first positional, so the rest (REMAINDER) is parsed again here."""
    rest = list(args.overrides or [])
    if not rest:
        return
    from ..errors import ConfigError

    parser = args._parser
    known = argparse.Namespace()
    positional, options = [], []
    i = 0
    while i < len(rest):
        a = rest[i]
        if a.startswith("-") and not a.lstrip("-")[:1].isdigit():
            options.append(a)
            action = next((act for act in parser._actions if a.split("=", 1)[0] in act.option_strings), None)
            if action is None:
                raise ConfigError(f"unknown option {a!r}; see `vitlab {args.command} --help`")
            if action.nargs != 0 and "=" not in a and i + 1 < len(rest):
                options.append(rest[i + 1])
                i += 1
        else:
            positional.append(a)
        i += 1
    sub = argparse.ArgumentParser(add_help=False)
    for act in parser._actions:
        if act.option_strings and act.dest != "help":
            sub._add_action(act)
    sub.parse_args(options, namespace=known)
    for k, v in vars(known).items():
        if v != parser.get_default(k):
            setattr(args, k, v)
    args.overrides = positional


def run_pretrain(args) -> int:
    import dataclasses

    _intermixed(args)
    from ..train.config import TrainConfig, apply_overrides
    from ..train.engine import fit, load_data

    cfg = TrainConfig()
    fields = {"objective": args.objective}
    for key, val in (("model", args.model), ("dataset", args.dataset), ("data_dir", args.data_dir),
                     ("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                     ("img_size", args.img_size), ("out", args.out), ("name", args.name), ("seed", args.seed),
                     ("resume", args.resume)):
        if val is not None:
            fields[key] = val
    cfg = apply_overrides(cfg, fields)
    cfg = apply_overrides(cfg, list(args.overrides))
    kw = {"target": args.target, "mask_rate": args.mask_rate, "mask_prob": args.mask_prob,
          "random_prob": args.random_prob, **cfg.objective_kwargs}
    from .mpp import MPPObjective

    bundle = None
    if not cfg.resume:  # (a resumed run keeps its saved objective options, data statistics included)
        MPPObjective(**kw)  # validate the options before loading the data
        bundle = load_data(cfg)
        kw.setdefault("pixel_mean", list(bundle.mean))
        kw.setdefault("pixel_std", list(bundle.std))
        cfg = dataclasses.replace(cfg, objective_kwargs=kw)
    result = fit(cfg, bundle=bundle)
    print(f"pre-trained weights: {result.run_dir} (fine-tune with `vitlab finetune {result.run_dir} ...`)")
    return 0


def run_fewshot(args) -> int:
    import json

    from ..data import load_dataset
    from ..train.checkpoint import load_model
    from .fewshot import extract_features, few_shot_eval, linear_probe, parse_shots

    shots = parse_shots(args.shots)
    if args.seeds < 1:
        from ..errors import ConfigError

        raise ConfigError(f"--seeds {args.seeds} must be at least 1")
    model, info = load_model(args.checkpoint)
    cfg = info["config"]
    name = args.dataset or cfg.get("dataset")
    data_dir = args.data_dir if args.dataset else (args.data_dir or cfg.get("data_dir"))
    bundle = load_dataset(name, data_dir, val_fraction=cfg.get("val_fraction", 0.1),
                          split_seed=cfg.get("split_seed", 0), in_chans=info["in_chans"])
    img = info["img_size"]
    mean, std = info["mean"] or bundle.mean, info["std"] or bundle.std

    def prep(images):
        import torch.nn.functional as F

        if images.shape[-1] != img or images.shape[-2] != img:
            images = F.interpolate(images.float(), size=(img, img), mode="bilinear", antialias=True,
                                   align_corners=False).round().clamp(0, 255).byte()
        return images

    tx = extract_features(model, prep(bundle.train.images), mean, std, args.feature, args.batch_size)
    vx = extract_features(model, prep(bundle.val.images), mean, std, args.feature, args.batch_size)
    ty, vy = bundle.train.labels.numpy(), bundle.val.labels.numpy()
    k = bundle.num_classes
    results = few_shot_eval(tx, ty, vx, vy, shots, seeds=range(args.seeds), l2_reg=args.l2_reg, num_classes=k)
    print(f"few-shot linear evaluation of {info['checkpoint']} on {bundle.name} ({len(vy)} val images, "
          f"{k} classes, {tx.shape[1]}-d {args.feature} features, l2_reg {args.l2_reg:g}, {args.seeds} seed{'s' if args.seeds != 1 else ''})")
    for r in results:
        print(f"  {r.shots:>4}-shot: {100 * r.mean:6.2f}% +- {100 * r.std:.2f}")
    out = {"checkpoint": info["checkpoint"], "dataset": bundle.name, "feature": args.feature,
           "l2_reg": args.l2_reg, "fewshot": [r.to_dict() for r in results]}
    if not args.no_linear_probe:
        acc = linear_probe(tx, ty, vx, vy, l2_reg=args.l2_reg, num_classes=k)
        print(f"  linear probe (all {len(ty)} training images): {100 * acc:.2f}%")
        out["linear_probe_acc"] = acc
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def run_study_cmd(args) -> int:
    import shlex
    import sys

    from .study import get_study, resolve_params, run_study

    _intermixed(args)
    if args.list:
        study = get_study(args.name)
        params, train = resolve_params(study, args.overrides, args.dataset, args.epochs, args.preset)
        if args.preset != "small":  # (no data files needed: --list is how to see a preset before getting them)
            from .study import preset_banner

            print(preset_banner(study, params, train, args.preset))
        for spec in study.build(params):
            print(spec.name, spec.columns)
        return 0
    command = "vitlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = run_study(args.name, args.out, args.overrides, args.dataset, args.epochs, plot=not args.no_plot,
                     command=command, preset=args.preset)
    if rows:  # (process 0 only under torchrun) the arms with mean ± std, the claims' verdicts, the runs
        from pathlib import Path

        print((Path(args.out or Path("results") / args.name) / "table.md").read_text())
    return 0
