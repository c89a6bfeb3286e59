"""The Python API behind `vitlab train / eval / finetune / predict`.

    from vitlab import train, evaluate, finetune, predict, TrainConfig
    result = train(TrainConfig(epochs=10))             # RunResult(run_dir, summary, ...)
    evaluate(result.run_dir)                            # accuracy, loss, per-class, confusion matrix
    ft = finetune(result.run_dir, "imagefolder", img_size=16, data_dir="flowers5")
    predict(ft.run_dir, ["rose.jpg"], topk=3)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError, DataError
from .checkpoint import build_model_from_config, load_model
from .config import TrainConfig, apply_overrides
from .engine import RunResult, file_decode_options, fit
from .runlog import dumps


def train(config: TrainConfig | dict | str | Path | None = None, **overrides) -> RunResult:
    """Train a model; returns RunResult(run_dir, summary, history, step_losses).

    `config` is a TrainConfig, a dict of its fields or the path of a YAML config file
    (e.g. "configs/digits.yaml"); keyword arguments override fields.
    With `config.resume` set to a run directory the run continues from its last checkpoint:
    its saved config is used, overridden by any field given here that differs from the
    defaults (e.g. `epochs=`)."""
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    elif isinstance(config, (str, Path)):
        from .config import load_config

        config = load_config(config)
    elif not isinstance(config, TrainConfig):
        raise ConfigError(f"train() takes a TrainConfig, a dict of its fields or a YAML file path, got "
                          f"{type(config).__name__}")
    if overrides:
        config = apply_overrides(config, overrides)
    return fit(config)


# ---------------------------------------------------------------------------- evaluation
def preprocessing_of(info: dict) -> dict:
    """The resizing filter and evaluation crop a loaded model was trained with (load_model's info):
    AugmentConfig's interpolation and crop_pct (runs from before these options: bilinear, no crop)."""
    cfg = info.get("config") or {}
    return dict(interpolation=cfg.get("interpolation") or "bilinear",
                crop_pct=1.0 if cfg.get("crop_pct") is None else float(cfg["crop_pct"]))


def _load_eval_data(info: dict, dataset: str | None, data_dir: str | None, data_options: dict | None):
    """The data a checkpoint is evaluated on: by default its own data set and held-out split,
    decoded with the model's number of channels."""
    from ..data import load_dataset

    cfg = info["config"]
    same = dataset is None or dataset == cfg.get("dataset")
    name = cfg.get("dataset") if dataset is None else dataset
    options = dict(cfg.get("data_options") or {}) if same else {}
    options.update(data_options or {})
    if name != "synthetic" or "in_chans" not in options:
        options.setdefault("in_chans", info["in_chans"])
    # files are decoded at the model's size (with its evaluation crop) and with its resizing filter
    options = {**file_decode_options(name, info["img_size"], preprocessing_of(info)), **options}
    return load_dataset(name, data_dir if data_dir is not None else (cfg.get("data_dir") if same else None),
                        val_fraction=cfg.get("val_fraction", 0.1), split_seed=cfg.get("split_seed", 0),
                        on_bad_image=cfg.get("on_bad_image", "skip"), **options)


@torch.no_grad()
def _logits(model, dataset, transform, device, batch_size: int) -> torch.Tensor:
    out = []
    for start in range(0, len(dataset.labels), batch_size):
        x, _ = transform(dataset.images[start:start + batch_size].to(device),
                         dataset.labels[start:start + batch_size].to(device))
        out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def evaluate(run_or_checkpoint: str | Path, dataset: str | None = None, data_dir: str | None = None, *,
             split: str | None = None, batch_size: int = 512, out: str | Path | None = None, which: str = "last",
             ema: bool | None = None, device: str = "cpu", data_options: dict | None = None,
             plot: bool = True) -> dict[str, Any]:
    """Accuracy, mean cross-entropy, per-class accuracy and the confusion matrix of a trained
    model on a data set's `split` ('train', 'val' or 'test', named as on disk: an image folder's test/
    folder is 'test'); by default the run's own data set and held-out split. Writes eval.json and
    confusion.png into `out` (default: <run>/eval-<data>-<split>)."""
    from ..data import AugmentConfig, BatchTransform
    from .distributed import resolve_device

    if split not in (None, "val", "train", "test"):
        raise ConfigError(f"split={split!r} is not valid; choose train, val or test")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer (e.g. --batch-size 512)")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} is a file; pass a folder for eval.json and confusion.png")
    model, info = load_model(run_or_checkpoint, which=which, ema=ema)
    dev = resolve_device(device)
    model.to(dev)
    bundle = _load_eval_data(info, dataset, data_dir, data_options)
    if bundle.num_classes != info["num_classes"]:
        raise ConfigError(f"the model predicts {info['num_classes']} classes but {bundle.name} has "
                          f"{bundle.num_classes}; fine-tune it first: vitlab finetune {run_or_checkpoint} "
                          f"--dataset {bundle.name}")
    data = bundle.split(split)
    split = split or bundle.val_name
    # the preprocessing the model was trained with: its own size, filter, crop and normalisation
    tf = BatchTransform(AugmentConfig(img_size=info["img_size"], **preprocessing_of(info)), info["mean"] or bundle.mean,
                        info["std"] or bundle.std, bundle.num_classes, train=False)
    logits = _logits(model, data, tf, dev, batch_size)
    _check_finite(logits, info)
    labels = data.labels.long()
    k = info["num_classes"]
    pred = logits.argmax(dim=1)
    cm = torch.zeros(k, k, dtype=torch.int64)
    cm.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class_n = cm.sum(dim=1)
    names = list(info.get("class_names") or bundle.class_names)
    per_class = {names[i]: (float(cm[i, i] / per_class_n[i]) if per_class_n[i] else None) for i in range(k)}
    result = {
        "checkpoint": info["checkpoint"], "dataset": bundle.name, "split": split, "n": int(len(labels)),
        "accuracy": float((pred == labels).float().mean()) if len(labels) else None,
        "loss": float(F.cross_entropy(logits, labels)) if len(labels) else None,
        "per_class_accuracy": per_class, "confusion_matrix": cm.tolist(), "class_names": names,
        "ema": info["ema"],
    }
    out_dir = out_dir if out_dir is not None else Path(info["run_dir"]) / f"eval-{bundle.name}-{split}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output folder {str(out_dir)!r} ({e.strerror or type(e).__name__}); "
                          f"pass --out a folder you can write to") from None
    if plot:
        result["confusion_png"] = str(_plot_confusion(cm, names, out_dir / "confusion.png",
                                                      f"{bundle.name} {split}: accuracy {100 * result['accuracy']:.2f}%"))
    (out_dir / "eval.json").write_text(dumps(result, indent=1))
    result["json"] = str(out_dir / "eval.json")
    return result


def _check_finite(logits: torch.Tensor, info: dict) -> None:
    """Non-finite outputs mean broken weights (a run that diverged before vitlab guarded against
    it, or a damaged file): say so instead of reporting 'nan%' as a prediction."""
    if logits.numel() and not bool(torch.isfinite(logits).all()):
        raise CheckpointError(f"the model in {info['checkpoint']!r} outputs NaN/inf: its weights are not finite "
                              f"(the run diverged?); use an earlier checkpoint (e.g. --best) or retrain with a "
                              f"lower lr")


def _plot_confusion(cm: torch.Tensor, names: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = cm.shape[0]
    rows = cm.sum(dim=1, keepdim=True).clamp(min=1)
    frac = (cm / rows).numpy()
    size = min(2 + 0.45 * k, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), names, rotation=90 if k > 10 or max(map(len, names)) > 4 else 0, fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- fine-tuning
FINETUNE_DEFAULTS = dict(optimizer="sgd", momentum=0.9, lr=0.01, min_lr=0.0, weight_decay=0.0, schedule="cosine",
                         warmup_epochs=1.0, grad_clip=1.0, epochs=10, batch_size=64)
# the architecture a fine-tuned run inherits; data, augmentation and optimisation start afresh
_INHERITED = ("model", "model_kwargs", "drop_path", "dropout", "objective", "objective_kwargs", "precision", "seed")


def finetune(checkpoint: str | Path, dataset: str, img_size: int | None = None, data_dir: str | None = None, *,
             overrides: list[str] | dict | None = None, which: str = "last", ema: bool | None = None,
             verbose: bool = True, model_name: str | None = None, revision: str | None = None,
             **fields) -> RunResult:
    """Fine-tune a trained model on another data set, the paper's way: the classifier is
    replaced by a zero-initialised linear layer for the new classes, learned position
    embeddings are resampled to the new patch grid (2D interpolation) when `img_size`
    changes, and the whole network is trained with SGD momentum 0.9, no weight decay,
    gradient clipping at 1 and linear warmup then cosine decay (FINETUNE_DEFAULTS).
    `fields`/`overrides` change any TrainConfig field (e.g. epochs=, lr=, name=).

    `checkpoint` is any weights SOURCE (vitlab.models.sources): a vitlab run or checkpoint, a
    Hugging Face or timm folder, a timm file (with `model_name`), a Google .npz, `hf-hub:ORG/NAME`,
    `timm/NAME.TAG` or a published tag; `revision` pins a Hub revision. Published weights'
    preprocessing (mean/std, resizing filter, evaluation crop_pct, input size) is adopted wherever
    the run leaves it unset (so `img_size=None` fine-tunes at the weights' input size) and is
    recorded in the run's config, which eval, predict and export read."""
    from ..models.sources import load_source

    model, info = load_source(checkpoint, model_name=model_name, revision=revision, which=which, ema=ema)
    base = info["config"]
    cfg = TrainConfig.from_dict({k: base[k] for k in _INHERITED if k in base})
    cfg = apply_overrides(cfg, {**FINETUNE_DEFAULTS, "dataset": dataset, "data_dir": data_dir,
                                "img_size": img_size, "init_from": str(info["checkpoint"])})
    cfg = apply_overrides(cfg, fields)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    if cfg.objective != "classification":  # the fine-tuned model classifies, whatever pre-trained it
        cfg = dataclasses.replace(cfg, objective="classification", objective_kwargs={})
    if cfg.resume:
        raise ConfigError("finetune starts a new run; to continue one use `vitlab train --resume RUN_DIR`")
    # the new data is decoded with the model's channels (grey <-> RGB), so the patch
    # projection keeps its meaning
    cfg.data_options = dict(cfg.data_options)
    cfg.data_options.setdefault("in_chans", info["in_chans"])
    from .engine import adopt_preprocessing, apply_normalisation, load_data, resolve_img_size

    pre = info.get("preprocessing") or {}
    if pre.get("mean") and len(pre["mean"]) != info["in_chans"]:
        pre = {k: v for k, v in pre.items() if k not in ("mean", "std")}  # not this model's channels
    # the weights' own preprocessing (filter, evaluation crop, input size, normalisation) where the
    # run leaves it unset: recorded in the run's config, so eval, predict and export apply it too
    cfg, pre_notes = adopt_preprocessing(cfg, pre)
    cfg.validate()
    bundle = apply_normalisation(cfg, load_data(cfg))
    new_size = resolve_img_size(cfg, bundle)  # default: the weights' input size, else the new data's own
    cfg = dataclasses.replace(cfg, img_size=new_size, num_classes=int(bundle.num_classes),
                              in_chans=int(bundle.in_chans))
    before, old_grid = _shapes(model), getattr(model, "grid_size", None)
    _adapt_model(model, bundle.num_classes, new_size, info)
    # what was loaded, re-initialised and resampled: in the run's log (train.log) after its first line
    notes = [f"finetune: loaded {info.get('source') or info['checkpoint']}; new zero-initialised head for "
             f"{bundle.num_classes} classes"]
    notes += pre_notes
    notes += describe_resampling(before, _shapes(model), info["img_size"], new_size, old_grid,
                                 getattr(model, "grid_size", None))
    model.train()
    # the run must be rebuildable from its config (checkpoints, resume, load_model)
    cfg = _matching_config(cfg, model)
    result = fit(cfg, model=model, bundle=bundle, verbose=verbose, notes=notes)
    if getattr(result, "rank", None) == 0:  # where the weights came from and their preprocessing (model cards read it)
        import shlex
        import sys

        cli = Path(sys.argv[0]).name in ("vitlab", "__main__.py") and "finetune" in sys.argv
        record = {"source": str(checkpoint), "read": info.get("source"), "revision": revision,
                  "command": shlex.join(["vitlab", *sys.argv[sys.argv.index("finetune"):]]) if cli else None,
                  "preprocessing": pre, "mean": list(bundle.mean), "std": list(bundle.std)}
        (Path(result.run_dir) / "source.json").write_text(dumps(record, indent=1))
    return result


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def describe_resampling(before: dict, after: dict, old_size, new_size, old_grid=None, new_grid=None) -> list[str]:
    """The log line saying what fine-tuning at a new resolution resampled: every tensor outside the
    classifier whose shape changed (position embeddings, relative-position tables), from which
    patch grid to which. Empty when the resolution is unchanged."""
    def hw(size):
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    if hw(old_size) == hw(new_size):
        return []
    head = {k for k in before if k.startswith(("head.", "fc.", "classifier."))}
    changed = [f"{k} {'x'.join(map(str, before[k]))} -> {'x'.join(map(str, after[k]))}"
               for k in before if k in after and before[k] != after[k] and k not in head]
    (oh, ow), (nh, nw) = hw(old_size), hw(new_size)
    grid = ""
    if old_grid and new_grid and tuple(old_grid) != tuple(new_grid):
        grid = f", patch grid {'x'.join(map(str, old_grid))} -> {'x'.join(map(str, new_grid))}"
    what = ("resampled " + ", ".join(changed) + " by interpolation" if changed
            else "no position embedding to resample")
    return [f"fine-tuning at {nh}x{nw} px (trained at {oh}x{ow}){grid}: {what}"]


def _adapt_model(model, num_classes: int, img_size: int, info: dict) -> None:
    # modules that only served a pre-training objective (e.g. MPP's head and [MASK] token)
    for name in getattr(model, "pretraining_heads", ()):
        delattr(model, name)
    model.pretraining_heads = ()
    if not hasattr(model, "reset_classifier"):
        raise ConfigError(f"model {info['config'].get('model')!r} has no reset_classifier(); it cannot be fine-tuned")
    try:
        model.reset_classifier(num_classes, zero_init=True)
    except TypeError:
        model.reset_classifier(num_classes)
    if img_size != info["img_size"]:
        if not hasattr(model, "set_input_size"):
            raise ConfigError(f"model {info['config'].get('model')!r} cannot change its input size "
                              f"(no set_input_size); fine-tune at img_size={info['img_size']}")
        model.set_input_size(img_size)


def _matching_config(cfg: TrainConfig, model) -> TrainConfig:
    """`cfg` whose create_model rebuilds exactly `model`'s tensors (a pre-training MLP head
    becomes 'linear' after reset_classifier)."""
    def shapes(m):
        return {k: tuple(v.shape) for k, v in m.state_dict().items()}

    want = shapes(model)
    with torch.device("meta"):
        got = shapes(build_model_from_config(cfg.to_dict()))
    if got != want and cfg.model_kwargs.get("head", "linear") != "linear":
        cfg = dataclasses.replace(cfg, model_kwargs={**cfg.model_kwargs, "head": "linear"})
        with torch.device("meta"):
            got = shapes(build_model_from_config(cfg.to_dict()))
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:6]
        raise CheckpointError(f"internal: the fine-tuned {cfg.model} cannot be rebuilt from its config ({diff})")
    return cfg


# ---------------------------------------------------------------------------- prediction
def _read_image(path: str | Path, in_chans: int, size: int | tuple[int, int] | None = None,
                interpolation: str = "bilinear") -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    from ..data.imagefolder import decode_image, to_mode

    p = Path(path)
    if p.is_dir():
        raise DataError(f"{str(p)!r} is a folder, not an image; pass image files (e.g. {str(p / '*.jpg')!r})")
    if not p.is_file():
        raise DataError(f"image {str(p)!r} does not exist; pass paths of image files (JPEG, PNG, ...)")
    if in_chans not in (1, 3):
        raise DataError(f"the model takes {in_chans}-channel images; predict reads grey (1) or RGB (3) images only")
    mode = "L" if in_chans == 1 else "RGB"
    if size is not None:
        # the decoder image folders use for training: shorter side resized, centre cut out
        size_hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        arr = decode_image(str(p), size_hw, mode, "center_crop", resample=interpolation)
        if isinstance(arr, Exception):
            raise DataError(f"cannot read image {str(p)!r} ({type(arr).__name__}: {arr}); pass a valid image file")
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    try:
        with Image.open(p) as im:
            im = to_mode(im, mode)
            arr = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            h, w = im.height, im.width
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {str(p)!r} ({type(e).__name__}: {e}); pass a valid image file") from None
    return arr.view(h, w, 1 if in_chans == 1 else 3).permute(2, 0, 1).contiguous()


def prediction_inputs(info: dict, images: Sequence[str | Path]) -> torch.Tensor:
    """The float32 (B, C, H, W) batch a model (load_model's info) sees for image files: decoded at the
    size its evaluation crop starts from (its own size when crop_pct is 1) with its resizing filter,
    the centre cut out, normalised with its mean/std."""
    from ..data import AugmentConfig, BatchTransform
    from ..data.augment import eval_scale_size

    pre = preprocessing_of(info)
    tf = BatchTransform(AugmentConfig(img_size=info["img_size"], **pre), info["mean"], info["std"],
                        info["num_classes"], train=False)
    scaled = eval_scale_size(info["img_size"], pre["crop_pct"])
    return torch.cat([tf(_read_image(p, info["in_chans"], scaled, pre["interpolation"])[None],
                         torch.zeros(1, dtype=torch.int64))[0] for p in images])


@torch.no_grad()
def predict(checkpoint: str | Path, images: Sequence[str | Path], topk: int = 5, which: str = "last",
            ema: bool | None = None, device: str = "cpu") -> list[dict]:
    """Top-k classes with probabilities for each image file, with the evaluation
    preprocessing the model was trained with (`prediction_inputs`: shorter side resized with its
    filter to its size, or to size / crop_pct, and the centre cut out; its normalisation)."""
    from .distributed import resolve_device

    if isinstance(images, (str, Path)):
        images = [images]
    if not images:
        raise ConfigError("no image given; pass one or more image files")
    if topk < 1:
        raise ConfigError(f"topk={topk} must be at least 1")
    model, info = load_model(checkpoint, which=which, ema=ema)
    dev = resolve_device(device)
    model.to(dev)
    k = info["num_classes"]
    names = list(info.get("class_names") or [str(i) for i in range(k)])
    logits = model(prediction_inputs(info, images).to(dev)).float()
    _check_finite(logits, info)
    probs = logits.softmax(dim=-1).cpu()
    top = probs.topk(min(topk, k), dim=-1)
    results = [{"image": str(p), "top": [{"class": names[int(i)], "index": int(i), "prob": float(v)}
                                         for v, i in zip(top.values[n], top.indices[n])]}
               for n, p in enumerate(images)]
    _add_input_notes(results, info)
    return results


def _add_input_notes(results: list[dict], info: dict) -> None:
    """results[i]['note']: what was done to an image unlike the training data (None when alike)."""
    from ..data.inputs import describe_input_conversion

    for r in results:
        r["note"] = describe_input_conversion(r["image"], info["img_size"], info["in_chans"])
