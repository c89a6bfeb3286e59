"""`vitlab study NAME`: the papers' experiments as resumable grids of training runs.

A study is a list of runs (`RunSpec`: a name, TrainConfig overrides and the grid values
shown in the table) built from a few size parameters with small defaults (8x8 digits, tiny
models, a few epochs: minutes on 2 CPU cores) that `--dataset`, `--epochs` and `key=value`
overrides scale up for real hardware.

Runs live in `<out>/runs/<run name>/` and are executed in order. A run whose summary.json
says `finished` is never redone; a run with a checkpoint but no finished summary is resumed
from it (the engine continues bit for bit on CPU); a run directory without a checkpoint is
started again. So an interrupted study resumes by running the same command again, and ends
with the same table as an uninterrupted one. Under `torchrun --nproc-per-node N -m vitlab
study ...` every process trains its own share of the runs (run i on process i mod N, one
process per run at a time); process 0 writes the table once every run is finished.

Every arm (a point of the grid) runs with several seeds (`seeds=0,1,2` by default).
Outputs: runs.csv (one row per run: the grid values, training-set size, images seen,
parameters, forward FLOPs per image, training FLOPs = counted forward+backward FLOPs per image
x images seen, final and best validation accuracy), table.csv (one row per arm: mean, sample
standard deviation and spread = best - worst seed of each metric, and a verdict saying whether
the paper's claimed difference is larger than the noise), table.md (both, plus the claims),
plot.png (means with one-standard-deviation error bars) and meta.json
(command, machine, wall times). Wall times are kept out of the table, which depends only on
the runs' results.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, did_you_mean


class StudyIncomplete(ConfigError):
    """A run stopped early (e.g. max_steps): the study can be continued, not tabulated yet."""


# ----------------------------------------------------------------------------- specs
@dataclass
class RunSpec:
    name: str                                   # directory under <out>/runs
    overrides: dict[str, Any]                   # TrainConfig fields of this run
    columns: dict[str, Any]                     # grid values shown in the table
    init_from: str | None = None                # fine-tune from this run's final weights (a run of the study)


@dataclass
class Study:
    name: str
    description: str
    claim: str                                  # what the paper says, for the README/meta
    params: dict[str, Any]                      # size parameters and their small defaults
    build: Callable[[dict], list[RunSpec]]
    plot: Callable[[list[dict], dict, Path], None]
    base: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields common to every run
    # the paper's claimed differences, each checked against the seed-to-seed spread
    claims: list["Claim"] = field(default_factory=list)
    # `--preset paper`: the paper's setting (option values) and what it costs, printed before it starts
    paper: dict[str, Any] = field(default_factory=dict)
    paper_cost: str = ""                        # the paper's setting, in words
    paper_images: int = 0                       # training-set size of that setting (for the compute estimate)
    # `--preset cifar10`: the study's grid on CIFAR-10 at 32 px for one consumer GPU (option values
    # over the small defaults, as `paper`) and what it runs, in words; printed with its compute
    cifar10: dict[str, Any] = field(default_factory=dict)
    cifar10_cost: str = ""


@dataclass
class Claim:
    """The paper says arms matching `better` beat arms matching `worse` (by `margin`, accuracy
    points as a fraction; 0 = "not worse"). Arms are paired on every other grid column, so one
    claim covers e.g. every training-set fraction."""
    better: dict[str, Any]
    worse: dict[str, Any]
    text: str
    metric: str = "val_acc"
    pair_on: tuple[str, ...] | None = None       # grid columns to pair arms on (None: all others)


STUDIES: dict[str, Study] = {}


def register_study(study: Study) -> Study:
    STUDIES[study.name] = study
    return study


def get_study(name: str) -> Study:
    from . import presets  # noqa: F401  (registers the built-in studies)

    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}.{did_you_mean(name, STUDIES)} "
                          f"Built-in studies: {', '.join(STUDIES)}.")
    return STUDIES[name]


# ----------------------------------------------------------------------------- parameters
def _parse_value(text: str, default: Any, key: str) -> Any:
    import yaml

    if isinstance(default, (list, tuple)):
        items = [t.strip() for t in str(text).strip("[]").split(",") if t.strip()]
        elem = default[0] if default else ""
        return [_parse_value(t, elem, key) for t in items]
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        v = text
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ConfigError(f"study option {key}={text!r} must be true or false")
        return v
    if isinstance(default, int) and not isinstance(default, bool):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"study option {key}={text!r} must be an integer") from None
        if not f.is_integer():
            raise ConfigError(f"study option {key}={text!r} must be an integer")
        return int(f)
    if isinstance(default, float):
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"study option {key}={text!r} must be a number") from None
    return v if not isinstance(v, (int, float)) or isinstance(default, (int, float)) or default is None \
        else str(text)


PRESETS = ("small", "paper", "cifar10")
# Training options every run of `--preset cifar10` starts from (train.FIELD=value replaces them):
# the usual CIFAR augmentation, random 32 px crops of the image zero-padded by 4 pixels and
# horizontal flips (configs/cifar10.yaml's first two)
CIFAR10_TRAIN = {"pad_crop": 4, "hflip": True}
# CIFAR-10's training-set size and class count, for the compute estimate
CIFAR10_IMAGES = 50_000
CIFAR10_CLASSES = 10


def preset_options(study: Study, preset: str) -> dict[str, Any]:
    """The option values `preset` sets over the study's small defaults ({} for 'small')."""
    from ..errors import check_choice

    check_choice("preset", preset, PRESETS)
    if preset == "small":
        return {}
    options = study.paper if preset == "paper" else study.cifar10
    if not options:
        raise ConfigError(f"study {study.name!r} has no {preset} preset; scale it with key=value options")
    return options


def resolve_params(study: Study, overrides: list[str] | dict | None = None, dataset: str | None = None,
                   epochs: int | None = None, preset: str = "small") -> tuple[dict, dict]:
    """(study parameters, TrainConfig fields for every run) from `key=value` overrides.

    Study parameters are the keys of `study.params` (lists take comma-separated values);
    `train.FIELD=value` sets a TrainConfig field of every run (e.g. train.batch_size=256,
    train.data_dir=/data); `--dataset`/`--epochs` set the usual two. `preset='paper'` starts
    from the paper's setting (`study.paper`) instead of the small defaults, `preset='cifar10'`
    from the study's CIFAR-10 grid (`study.cifar10`, every run with CIFAR10_TRAIN's augmentation)."""
    params = {**study.params, **preset_options(study, preset)}
    train: dict[str, Any] = dict(CIFAR10_TRAIN) if preset == "cifar10" else {}
    items = overrides.items() if isinstance(overrides, dict) else \
        [tuple(o.split("=", 1)) if "=" in o else (o, None) for o in (overrides or [])]
    for key, value in items:
        if value is None:
            raise ConfigError(f"study override {key!r} is not of the form key=value (e.g. epochs=5)")
        key = key.strip()
        if key.startswith("train."):
            train[key[len("train."):]] = value
            continue
        if key not in params:
            raise ConfigError(f"study {study.name!r} has no option {key!r}.{did_you_mean(key, params)} "
                              f"Its options: {', '.join(sorted(params))}; or train.FIELD=VALUE for any "
                              f"training option")
        # (a preset may add an option the small defaults lack, e.g. img_size: typed by its value)
        default = study.params.get(key, params[key])
        params[key] = _parse_value(value, default, key) if isinstance(value, str) else value
    if dataset is not None:
        params["dataset"] = dataset
    if epochs is not None:
        params["epochs"] = int(epochs)
    if int(params.get("epochs", 1)) < 1:
        raise ConfigError(f"epochs={params['epochs']} must be at least 1")
    return params, train


# ----------------------------------------------------------------------------- running
def _run_dir(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / spec.name


def read_summary(run_dir: Path) -> dict | None:
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return s if s.get("finished") else None


# study options that are training fields of every run where the study's runs do not set them
FORWARDED = ("train_fraction", "img_size")


def make_config(study: Study, params: dict, train: dict, spec: RunSpec, out: Path, session: dict | None = None):
    from ..train.config import TrainConfig, apply_overrides

    cfg = TrainConfig(progress=False, tensorboard=False)
    fields = {**study.base, "dataset": params.get("dataset", "digits"), "epochs": int(params.get("epochs", 1)),
              **{k: params[k] for k in FORWARDED if k in params}, **spec.overrides}
    cfg = apply_overrides(cfg, fields)
    # train.FIELD overrides: text from the command line is parsed like `vitlab train key=value`
    cfg = apply_overrides(cfg, {k: v for k, v in train.items() if not isinstance(v, str)})
    cfg = apply_overrides(cfg, [f"{k}={v}" for k, v in train.items() if isinstance(v, str)])
    cfg = dataclasses.replace(cfg, out=str(out / "runs"), name=spec.name)
    for k, v in (session or {}).items():
        cfg = dataclasses.replace(cfg, **{k: v})
    return cfg


def train_run(cfg, bundle=None, model=None):
    """One training run through the engine (a seam the tests interrupt)."""
    from ..train.engine import fit

    return fit(cfg, model=model, bundle=bundle, verbose=False).summary


def _pretrained_model(out: Path, spec: RunSpec, bundle):
    """The weights of run `spec.init_from`, made ready for supervised fine-tuning on `bundle`."""
    from ..train.checkpoint import load_model
    from .mpp import strip_pretraining_heads

    src = out / "runs" / spec.init_from
    if read_summary(src) is None:
        raise ConfigError(f"run {spec.name!r} fine-tunes {spec.init_from!r}, which has not finished; run the "
                          f"study again (runs are executed in order)")
    model, _ = load_model(src)
    model = strip_pretraining_heads(model)
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(int(bundle.num_classes))  # the paper's zero-initialised linear head
    return model.train()


def execute_run(study: Study, params: dict, train: dict, spec: RunSpec, out: Path,
                session: dict | None = None, log=print) -> dict:
    """Run (or resume, or skip) one run; returns its finished summary."""
    from ..train.engine import load_data

    run_dir = _run_dir(out, spec)
    done = read_summary(run_dir)
    if done is not None:
        log(f"[{study.name}] {spec.name}: done (val_acc {done.get('val_acc')})")
        return done
    cfg = make_config(study, params, train, spec, out, session)
    model = None
    if (run_dir / "checkpoints" / "last.json").is_file():
        log(f"[{study.name}] {spec.name}: resuming from its checkpoint")
        cfg = dataclasses.replace(cfg, resume=str(run_dir))
        bundle = load_data(cfg)
    else:
        if run_dir.exists():  # started but killed before its first checkpoint: start again
            shutil.rmtree(run_dir)
        log(f"[{study.name}] {spec.name}: training")
        bundle = load_data(cfg)
        if cfg.objective == "mpp":  # the colour targets are computed from the original pixels
            kw = dict(cfg.objective_kwargs)
            kw.setdefault("pixel_mean", list(bundle.mean))
            kw.setdefault("pixel_std", list(bundle.std))
            cfg = dataclasses.replace(cfg, objective_kwargs=kw)
        if spec.init_from:
            model = _pretrained_model(out, spec, bundle)
            cfg = dataclasses.replace(cfg, init_from=str(out / "runs" / spec.init_from))
    t0 = time.perf_counter()
    train_run(cfg, bundle=bundle, model=model)
    extra = {"train_images": len(bundle.train.labels), "session_wall_s": round(time.perf_counter() - t0, 3)}
    (run_dir / "study_run.json").write_text(json.dumps(extra, indent=1))
    summary = read_summary(run_dir)
    if summary is None:
        raise StudyIncomplete(f"run {spec.name!r} stopped before its last epoch (max_steps?); its checkpoint is "
                              f"kept: run the same study command again to continue")
    return summary


def forward_flops_per_image(cfg_dict: dict) -> int:
    """Counted forward FLOPs of one image (model built on the meta device)."""
    import torch

    from ..flops import count_flops
    from ..models import create_model
    from ..train.config import TrainConfig

    tc = TrainConfig.from_dict(cfg_dict, source="run config")
    with torch.device("meta"):
        model = create_model(tc.model, num_classes=tc.num_classes, img_size=tc.img_size, in_chans=tc.in_chans,
                             **tc.model_overrides())
    return count_flops(model, img_size=tc.img_size, in_chans=tc.in_chans)


def training_flops_per_image(cfg_dict: dict) -> int:
    """FLOPs of one training image: forward + backward = 3 x the counted forward FLOPs.

    The backward pass of every product computes two gradients (input and weight), each as
    expensive as the forward product. (Not PyTorch's backward count: FlopCounterMode counts a
    grouped/depthwise convolution's backward as if it were dense, dozens of times too high
    for ConvMixer and CvT; for a ViT 3F is exact up to the image's own gradient.)"""
    return 3 * forward_flops_per_image(cfg_dict)


def _images_seen(steps: int, batch: int, n_train: int | None, drop_last: bool) -> int:
    """Images the run trained on: whole batches, except each epoch's last, partial one (runs before
    drop_last existed, and drop_last=true, dropped it)."""
    if drop_last or not n_train:
        return steps * batch
    per_epoch = -(-int(n_train) // batch)
    epochs, rest = divmod(steps, per_epoch)
    return epochs * int(n_train) + rest * batch


def collect_row(out: Path, spec: RunSpec) -> dict:
    import yaml

    run_dir = _run_dir(out, spec)
    s = read_summary(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    extra = {}
    try:
        extra = json.loads((run_dir / "study_run.json").read_text())
    except (OSError, ValueError):
        pass
    images_seen = _images_seen(int(s["steps"]), int(cfg["batch_size"]), extra.get("train_images"),
                               bool(cfg.get("drop_last", True)))
    fwd = forward_flops_per_image(cfg)
    fb = 3 * fwd  # see training_flops_per_image
    row = {"run": spec.name, **spec.columns,
           "train_images": extra.get("train_images"),
           "images_seen": images_seen,
           "params": s.get("params"),
           "fwd_mflops_per_image": round(fwd / 1e6, 3),
           "train_gflops": round(fb * images_seen / 1e9, 3),
           "val_acc": None if s.get("val_acc") is None else round(float(s["val_acc"]), 4),
           "best_val_acc": None if s.get("best_val_acc") is None else round(float(s["best_val_acc"]), 4)}
    if cfg.get("objective") == "mpp":
        row["val_loss"] = None if s.get("val_loss") is None else round(float(s["val_loss"]), 4)
    row["_wall_s"] = s.get("wall_s")
    return row


# ----------------------------------------------------------------------------- seeds -> arms
STAT_METRICS = ("val_acc", "best_val_acc", "val_loss")
# per-run columns that differ between the seeds of one arm (everything else identifies the arm)
_PER_RUN = {"run", "seed", "val_acc", "best_val_acc", "val_loss", "images_seen", "train_gflops", "train_images"}
# measured, not chosen: never used to pair the arms a claim compares
_DERIVED = {"params", "fwd_mflops_per_image"}


def arm_key(row: dict) -> tuple:
    return tuple((k, row[k]) for k in row if k not in _PER_RUN and not k.startswith("_"))


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n-1; None for a single seed: no spread is known)."""
    import statistics

    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else None)


def aggregate_arms(rows: list[dict]) -> list[dict]:
    """One row per arm (runs equal in every grid column but the seed): the grid columns, the
    seeds, and mean, standard deviation and spread (max - min) of each metric over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(arm_key(r), []).append(r)
    arms = []
    for key, rs in groups.items():
        arm = {**dict(key), "seeds": len(rs), "_grid": {k: v for k, v in key if k not in _DERIVED}}
        for extra in ("train_images", "images_seen", "train_gflops"):
            vals = [r[extra] for r in rs if r.get(extra) is not None]
            if vals:
                arm[extra] = vals[0] if len(set(vals)) == 1 else round(sum(vals) / len(vals), 3)
        for m in STAT_METRICS:
            vals = [float(r[m]) for r in rs if r.get(m) is not None]
            if not vals:
                continue
            mean, std = _mean_std(vals)
            arm[f"{m}_mean"] = round(mean, 4)
            arm[f"{m}_std"] = None if std is None else round(std, 4)
            arm[f"{m}_spread"] = round(max(vals) - min(vals), 4)
        arms.append(arm)
    return arms


def _matches(arm: dict, sel: dict) -> bool:
    return all(str(arm.get(k)) == str(v) for k, v in sel.items())


def judge_claims(arms: list[dict], claims: list[Claim]) -> list[dict]:
    """For each claim and each pair of arms it compares (equal in every other grid column): the
    measured difference, the noise (the two arms' standard deviations combined, sqrt(sa^2 + sb^2),
    the standard deviation of a difference of two independent runs) and the verdict."""
    import math

    out = []
    for c in claims:
        keys = set(c.better) | set(c.worse)
        for a in arms:
            if not _matches(a, c.better):
                continue
            rest = {k: v for k, v in a["_grid"].items() if k not in keys and (c.pair_on is None or k in c.pair_on)}
            for b in arms:
                if b is a or not _matches(b, c.worse) or not _matches(b, rest):
                    continue
                ma, mb = a.get(f"{c.metric}_mean"), b.get(f"{c.metric}_mean")
                if ma is None or mb is None:
                    continue
                sa, sb = a.get(f"{c.metric}_std"), b.get(f"{c.metric}_std")
                diff = ma - mb
                noise = None if sa is None or sb is None else math.sqrt(sa ** 2 + sb ** 2)
                if noise is None:
                    verdict = "one seed: spread unknown"
                elif abs(diff) <= noise:
                    verdict = "within the spread"
                elif diff > 0:
                    verdict = "holds (beyond the spread)"
                else:
                    verdict = "reversed (beyond the spread)"
                label = ", ".join(f"{k}={v}" for k, v in rest.items()) or "-"
                out.append({"claim": c.text, "better": _sel(c.better), "worse": _sel(c.worse), "at": label,
                            "diff": round(diff, 4), "noise": None if noise is None else round(noise, 4),
                            "diff_over_noise": None if not noise else round(diff / noise, 2),
                            "verdict": verdict, "_arm": a})
    return out


def _sel(sel: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sel.items())


def arms_with_verdicts(arms: list[dict], verdicts: list[dict]) -> list[dict]:
    """The arm table with a verdict column: for the arm a claim says is better, the verdict
    against each arm it is compared with."""
    out = []
    for a in arms:
        v = [f"vs {x['worse']}: {x['verdict']} ({_fmt_pts(x['diff'])})" for x in verdicts if x["_arm"] is a]
        out.append({**a, "verdict": "; ".join(v) or None})
    return out


def _fmt_pts(diff: float) -> str:
    return f"{100 * diff:+.1f} pts"


def _dist() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_study(name: str, out: str | Path | None = None, overrides: list[str] | dict | None = None,
              dataset: str | None = None, epochs: int | None = None, session: dict | None = None,
              log=print, plot: bool = True, command: str | None = None, preset: str = "small") -> list[dict]:
    """Run (or resume) every run of study `name` and write table.csv, table.md, plot.png and
    meta.json into `out` (default results/NAME). Returns the table rows."""
    study = get_study(name)
    params, train = resolve_params(study, overrides, dataset, epochs, preset)
    if preset != "small":
        log(preset_banner(study, params, train, preset))
    # a missing data set is one line now, not a traceback from inside the first run
    check_data_files(study, params, train)
    out = Path(out or Path("results") / name)
    out.mkdir(parents=True, exist_ok=True)
    specs = study.build(params)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"study {name!r} produced duplicate run names; check its size overrides")
    rank, world = _dist()
    t0 = time.perf_counter()
    if world > 1:
        # one process per run: hide the launcher's world from the engine, so each run is a
        # plain single-process run
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(k, None)
        mine = specs[rank::world]
        for spec in mine:
            if spec.init_from:
                _wait_for(out, spec.init_from, log)
            execute_run(study, params, train, spec, out, session, log)
        if rank != 0:
            return []
        for spec in specs:
            _wait_for(out, spec.name, log)
    else:
        for spec in specs:
            execute_run(study, params, train, spec, out, session, log)
    rows = [collect_row(out, s) for s in specs]
    _check_seeds(rows, log)
    write_outputs(study, params, train, rows, out, plot, command, time.perf_counter() - t0, world)
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


# what a GPU sustains in mixed-precision training, for the cost estimate: 40% of an A100's 312
# TFLOP/s dense bf16 (a typical utilisation for these models), stated with the estimate
ESTIMATE_FLOPS_PER_S = 0.4 * 312e12


def estimate_training_flops(study: Study, params: dict, train: dict, n_images: int,
                            num_classes: int = 1000) -> float:
    """Counted training FLOPs of every run: 3 x forward FLOPs per image x epochs x the images it sees
    (the head sized for `num_classes`: ImageNet's unless a preset's data set says otherwise)."""
    import tempfile

    total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for spec in study.build(params):
            cfg = make_config(study, params, train, spec, Path(tmp))
            fwd = forward_flops_per_image({**cfg.to_dict(), "num_classes": cfg.num_classes or num_classes,
                                           "in_chans": cfg.in_chans or 3, "img_size": cfg.img_size or 224})
            total += 3 * fwd * cfg.epochs * n_images * cfg.train_fraction
    return total


def preset_banner(study: Study, params: dict, train: dict | None = None, preset: str = "paper") -> str:
    """What `--preset paper` (or `cifar10`) is about to run and what it costs, printed before it starts."""
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    n_runs = len(study.build(params))
    words, images, classes = ((study.paper_cost, study.paper_images, 1000) if preset == "paper"
                              else (study.cifar10_cost, CIFAR10_IMAGES, CIFAR10_CLASSES))
    text = f"[{study.name}] {preset} preset: {words}; {n_runs} runs ({shown})"
    if images:
        flops = estimate_training_flops(study, params, train or {}, images, classes)
        hours = flops / ESTIMATE_FLOPS_PER_S / 3600
        shown_h = f"{hours:,.1f}" if hours >= 10 else f"{hours:.2g}"  # (not "0.0" for a small preset)
        text += (f"\n[{study.name}] expected cost: {flops:.3g} training FLOPs (counted, {images:,} "
                 f"training images) = about {shown_h} GPU-hours at 125 TFLOP/s (40% of an A100's bf16 peak)")
        if preset == "cifar10":  # tiny steps: kernel launches and Python, not arithmetic, bound them
            text += ("; a lower bound for models this small, whose short steps keep a GPU far below that "
                     "utilisation")
    return text


def check_data_files(study: Study, params: dict, train: dict) -> None:
    """DataError, in one line, when the study trains on CIFAR-10/100 and its files are not where
    the loader looks (train.data_dir, else $VITLAB_DATA/NAME, ./data/NAME, ~/data/NAME); reads
    no file, so it is cheap enough to run before every study (`--list` skips it)."""
    from ..data import _canonical, _how_to_get
    from ..data.cifar import SPECS, find_cifar
    from ..data.core import candidate_dirs, format_dirs
    from ..errors import DataError

    try:
        key = _canonical(params.get("dataset", "digits"))
    except DataError:
        return  # an unknown name: the run's own loader says so, with the names it knows
    if key not in SPECS:
        return
    data_dir = train.get("data_dir")
    try:
        find_cifar(key, data_dir)
        return
    except DataError:
        pass
    spec = SPECS[key]
    looked = ([Path(data_dir).expanduser(), Path(data_dir).expanduser() / key] if data_dir
              else candidate_dirs(key, None))
    raise DataError(f"study {study.name!r} trains on {spec['title']}, whose files are not found (looked in "
                    f"{format_dirs(looked)}): {_how_to_get(key)} and put the archive, or the {spec['folder']}/ "
                    f"folder extracted from it, in a folder passed as train.data_dir=DIR (or in "
                    f"$VITLAB_DATA/{key}/)") from None


def _check_seeds(rows: list[dict], log) -> None:
    if rows and any(r.get("seed") is not None for r in rows) and \
            max(len(v) for v in _group_sizes(rows).values()) < 2:
        log("note: one seed per arm, so the table has no spread; the verdicts need seeds>=2 (default 3)")


def _group_sizes(rows):
    g: dict = {}
    for r in rows:
        g.setdefault(arm_key(r), []).append(r)
    return g


def _wait_for(out: Path, run_name: str, log, timeout_s: float = 7 * 24 * 3600) -> None:
    t0 = time.time()
    while read_summary(out / "runs" / run_name) is None:
        if time.time() - t0 > timeout_s:
            raise ConfigError(f"run {run_name!r} did not finish; run the study again")
        time.sleep(2.0)


# ----------------------------------------------------------------------------- outputs
def table_columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if not k.startswith("_") and k not in cols:
                cols.append(k)
    return cols


def to_csv(rows: list[dict]) -> str:
    cols = table_columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in cols})
    return buf.getvalue()


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def to_markdown(rows: list[dict]) -> str:
    cols = table_columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _pm(arm: dict, m: str, scale: float) -> str:
    mean, std = arm.get(f"{m}_mean"), arm.get(f"{m}_std")
    if mean is None:
        return "-"
    digits = 1 if scale == 100 else 4
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}" if std is not None else f"{scale * mean:.{digits}f}"


def tables_markdown(arm_rows: list[dict], verdicts: list[dict], rows: list[dict]) -> str:
    """Arms (metric mean ± std in percent over the seeds, spread = best - worst seed), the
    claims' verdicts, then every run."""
    skip = {f"{m}_{s}" for m in STAT_METRICS for s in ("mean", "std")}
    view = []
    for a in arm_rows:
        v = {k: x for k, x in a.items() if k not in skip and k != "verdict"}
        for m in STAT_METRICS:
            if f"{m}_mean" in a:
                spread = v.pop(f"{m}_spread")
                if m == "val_loss":  # a loss as it is
                    v[m], v[f"{m}_spread"] = _pm(a, m, 1.0), spread
                else:                # accuracies in percent, their spread in points
                    v[f"{m} (%)"], v[f"{m}_spread (pts)"] = _pm(a, m, 100.0), round(100 * spread, 2)
        view.append(v)
    text = "## arms (mean ± std over seeds)\n\n" + to_markdown(view)
    if verdicts:
        text += ("\n## the paper's claims against the spread\n\nnoise = sqrt(std_better² + std_worse²), the "
                 "standard deviation of the difference of two single runs.\n\n"
                 + to_markdown([{k: v for k, v in x.items() if not k.startswith("_")} for x in verdicts]))
    return text + "\n## runs\n\n" + to_markdown(rows)


def machine_description() -> str:
    import torch

    from ..bench import cpu_model_name

    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{ncpu} CPU cores ({cpu_model_name()}), {gpu}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def write_outputs(study: Study, params: dict, train: dict, rows: list[dict], out: Path, plot: bool,
                  command: str | None, wall: float, world: int) -> None:
    from ..train.checkpoint import atomic_write_text

    arms = aggregate_arms(rows)
    verdicts = judge_claims(arms, study.claims)
    arm_rows = arms_with_verdicts(arms, verdicts)
    # table.csv: one row per arm (mean, std, spread over the seeds, verdict); runs.csv: one row per run
    atomic_write_text(out / "table.csv", to_csv(arm_rows))
    atomic_write_text(out / "runs.csv", to_csv(rows))
    tables = tables_markdown(arm_rows, verdicts, rows)
    atomic_write_text(out / "table.md", f"# study `{study.name}`\n\n{study.description}\n\n" + tables)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        study.plot(rows, params, out / "plot.png")
    meta_path = out / "meta.json"
    try:
        prev = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        prev = {}
    sessions = prev.get("sessions", []) + [{"command": command or " ".join(sys.argv), "wall_s": round(wall, 1),
                                            "processes": world, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}]
    meta = {"study": study.name, "description": study.description, "claim": study.claim,
            "command": command or " ".join(["vitlab"] + sys.argv[1:]), "params": params,
            "train_overrides": {k: str(v) for k, v in train.items()},
            "machine": machine_description(),
            "runs_wall_s": {r["run"]: r.get("_wall_s") for r in rows},
            "total_run_wall_s": round(sum(r.get("_wall_s") or 0.0 for r in rows), 1),
            "sessions": sessions}
    atomic_write_text(meta_path, json.dumps(meta, indent=1, default=str))
    wall_total = sum(x["wall_s"] for x in sessions)
    readme = (f"# study `{study.name}`\n\n{study.description}\n\n**Paper's claim.** {study.claim}\n\n"
              f"- command: `{meta['command']}`\n- machine: {meta['machine']}\n"
              f"- wall time: {wall_total / 60:.1f} min over {len(sessions)} invocation(s) "
              f"(training itself: {meta['total_run_wall_s'] / 60:.1f} min)\n\n"
              + ("![plot](plot.png)\n\n" if plot else "") + tables)
    atomic_write_text(out / "README.md", readme)
