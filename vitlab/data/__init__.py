"""Data sets and batched augmentation.

``load_dataset(name, data_dir=None, ...)`` returns a :class:`DataBundle` whose ``train`` and
``val`` are in-memory uint8 (N, C, H, W) tensors; :class:`BatchTransform` augments and normalises
whole batches on the device the batch is on.

Data sets and where each looks for its files (``data_dir`` given: that folder, then
``data_dir/<name>``; otherwise ``$VITLAB_DATA/<name>``, ``$VITLAB_DATA``, ``./data/<name>``,
``~/data/<name>``, then the places listed here):

- ``digits``: scikit-learn's bundled 1,797 8x8 digits (no files); 0..16 scaled to 0..255, 1 channel,
  a seeded stratified ``val_fraction`` held out.
- ``mnist``: the four original IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each ``.gz`` or not); also
  ``/usr/share/datasets/mnist``. val = the official 10,000 test images.
- ``fashion-mnist``: the same four file names; also ``/usr/share/datasets/fashion-mnist`` (Debian:
  ``apt-get install dataset-fashion-mnist``). val = the official test set.
- ``cifar10`` / ``cifar100``: the official python version, the folder ``cifar-10-batches-py/``
  (``cifar-100-python/``) or the ``cifar-10-python.tar.gz`` (``cifar-100-python.tar.gz``) archive
  itself. val = the official test set. ``label_mode='coarse'`` gives CIFAR-100's 20 superclasses.
- ``imagefolder``: ``data_dir/<class>/<image>`` (jpg, png, ...), or ``data_dir/train/<class>/...``
  with ``data_dir/val/`` (or ``test/``); without those, a seeded stratified ``val_fraction`` is held
  out. Options ``image_size`` (default: the most common size), ``in_chans`` (3 or 1), ``fit``
  ('squash' or 'center_crop'), ``cache`` (decoded arrays cached in ``$VITLAB_CACHE_DIR``,
  ``~/.cache/vitlab`` or ``data_dir/.vitlab_cache``).
- ``synthetic``: generated class-structured images (no files); options ``num_classes``,
  ``img_size``, ``in_chans``, ``n_train``, ``n_val``, ``noise``, ``seed``.

Every file-based loader checks what it reads (magic numbers, shapes, counts, label ranges, the
published checksums unless ``verify=False``) and raises :class:`~vitlab.errors.DataError` saying
which files to put where when they are missing.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, DataError, did_you_mean
from .augment import AugmentConfig, BatchTransform
from .core import (DataBundle, ImageDataset, channel_stats, convert_channels, nested_fraction,
                   stratified_split)

__all__ = ["load_dataset", "list_datasets", "DataBundle", "ImageDataset", "AugmentConfig", "BatchTransform",
           "stratified_split", "nested_fraction"]

_OPTIONS = {
    "digits": {"in_chans"},
    "mnist": {"verify", "in_chans"},
    "fashion-mnist": {"verify", "in_chans"},
    "cifar10": {"verify", "in_chans"},
    "cifar100": {"verify", "in_chans", "label_mode"},
    "imagefolder": {"image_size", "in_chans", "fit", "cache"},
    "synthetic": {"num_classes", "img_size", "in_chans", "n_train", "n_val", "noise", "seed"},
}
_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100", "image-folder": "imagefolder", "folder": "imagefolder"}


def list_datasets() -> list[str]:
    return list(_OPTIONS)


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _OPTIONS:
        raise DataError(f"unknown dataset {name!r}.{did_you_mean(str(name), list(_OPTIONS))} "
                        f"Available: {', '.join(_OPTIONS)}")
    return key


def _how_to_get(key: str) -> str | None:
    """Where a data set's files come from (e.g. `apt-get install dataset-fashion-mnist`), the same
    words as the message for files not found, so a config naming a missing folder keeps the hint."""
    from . import cifar, idx

    if key in idx.SPECS:
        return idx.SPECS[key]["get"]
    if key in cifar.SPECS:
        return f"download https://www.cs.toronto.edu/~kriz/{cifar.SPECS[key]['archive']}"
    return None


def load_dataset(name: str, data_dir: str | None = None, *, val_fraction: float = 0.1, split_seed: int = 0,
                 on_bad_image: str = "skip", train_fraction: float = 1.0, **options) -> DataBundle:
    """Load a data set by name into memory (see the module docstring for names and options).

    ``val_fraction`` and ``split_seed`` define the held-out split of the sets without an official
    one (digits, imagefolder without train/val); MNIST, Fashion-MNIST and CIFAR use their official
    test sets as val. ``train_fraction < 1`` keeps a seeded stratified subset of train, nested
    across fractions for the same seed. ``mean``/``std`` are measured on the full train split
    (before ``train_fraction``), so runs of a data-scaling study normalise alike.
    """
    key = _canonical(name)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - _OPTIONS[key])
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for dataset {key!r}."
                          f"{did_you_mean(unknown[0], sorted(_OPTIONS[key]))} "
                          f"It accepts: {', '.join(sorted(_OPTIONS[key])) or 'no options'}")
    if on_bad_image not in ("skip", "error"):
        raise ConfigError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
    if not 0.0 < float(train_fraction) <= 1.0:
        raise ConfigError(f"train_fraction must be in (0, 1], got {train_fraction}: use e.g. train_fraction=0.1")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        hint = _how_to_get(key)
        raise DataError(f"data_dir {str(data_dir)!r} does not exist or is not a folder: "
                        f"pass the folder that holds the {key} files (--data-dir DIR)"
                        + (f"; to get them, {hint}" if hint else ""))
    meta: dict = {}
    in_chans = options.pop("in_chans", None)
    verify = bool(options.pop("verify", True))

    if key == "digits":
        from .toy import load_digits_arrays
        x, y = load_digits_arrays()
        tr, va = stratified_split(y.numpy(), val_fraction, split_seed)
        xt, yt, xv, yv = x[tr], y[tr], x[va], y[va]
        class_names = [str(i) for i in range(10)]
        meta["source"] = "sklearn.datasets.load_digits"
    elif key in ("mnist", "fashion-mnist"):
        from .idx import SPECS, load_idx_dataset
        xt, yt, xv, yv, m = load_idx_dataset(key, data_dir, verify=verify)
        class_names = list(SPECS[key]["class_names"])
        meta.update(m)
    elif key in ("cifar10", "cifar100"):
        from .cifar import load_cifar
        xt, yt, xv, yv, class_names, m = load_cifar(key, data_dir, verify=verify, **options)
        meta.update(m)
    elif key == "imagefolder":
        xt, yt, xv, yv, class_names = _load_imagefolder(data_dir, val_fraction, split_seed, on_bad_image,
                                                        in_chans=in_chans or 3, meta=meta, **options)
        in_chans = None  # already decoded in the requested mode
    else:  # synthetic
        from .toy import make_synthetic
        if in_chans is not None:
            options["in_chans"] = in_chans
            in_chans = None
        options.setdefault("seed", split_seed)
        xt, yt, xv, yv = make_synthetic(**options)
        class_names = [f"class_{i}" for i in range(int(options.get("num_classes", 10)))]
        meta["source"] = f"synthetic({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})"

    if in_chans is not None:
        xt, xv = convert_channels(xt, int(in_chans)), convert_channels(xv, int(in_chans))
    mean, std = channel_stats(xt)
    if float(train_fraction) < 1.0:
        keep = nested_fraction(yt.numpy(), float(train_fraction), split_seed)
        xt, yt = xt[torch.from_numpy(keep)], yt[torch.from_numpy(keep)]
        meta["train_fraction"] = float(train_fraction)
    return DataBundle(name=key, train=ImageDataset(xt, yt), val=ImageDataset(xv, yv),
                      num_classes=len(class_names), in_chans=int(xt.shape[1]),
                      native_size=(int(xt.shape[2]), int(xt.shape[3])), class_names=class_names,
                      mean=mean, std=std, meta=meta)


def _load_imagefolder(data_dir, val_fraction, split_seed, on_bad_image, in_chans=3, image_size=None,
                      fit="squash", cache=True, meta=None):
    from .imagefolder import decode_tree, find_split_dirs, report_bad

    if data_dir is None:
        raise DataError("imagefolder needs a folder: pass --data-dir DIR (DIR/<class>/<image>.jpg, or "
                        "DIR/train/<class>/... and DIR/val/<class>/...)")
    root = Path(data_dir).expanduser()
    split = find_split_dirs(root)
    if split is None:
        x, y, classes, bad, cached = decode_tree(root, image_size, in_chans, fit, cache)
        report_bad(bad, on_bad_image)
        if x.shape[0] == 0:
            raise DataError(f"no readable image in {root}: every image failed to decode; check the files")
        tr, va = stratified_split(y.numpy(), val_fraction, split_seed)
        xt, yt, xv, yv = x[tr], y[tr], x[va], y[va]
        meta.update(root=str(root), split="held-out val_fraction", from_cache=cached)
    else:
        tdir, vdir = split
        xt, yt, classes, bad, c1 = decode_tree(tdir, image_size, in_chans, fit, cache)
        size = image_size or (int(xt.shape[2]), int(xt.shape[3]))
        xv, yv, vclasses, vbad, c2 = decode_tree(vdir, size, in_chans, fit, cache)
        extra = sorted(set(vclasses) - set(classes))
        if extra:
            raise DataError(f"{vdir} has classes {', '.join(extra)} that {tdir} lacks: the val classes must be "
                            f"a subset of the train classes")
        remap = torch.tensor([classes.index(c) for c in vclasses], dtype=torch.int64)
        yv = remap[yv]
        bad = bad + vbad
        report_bad(bad, on_bad_image)
        if xt.shape[0] == 0 or xv.shape[0] == 0:
            raise DataError(f"no readable image in {tdir if xt.shape[0] == 0 else vdir}: check the files")
        meta.update(root=str(root), split=f"{tdir.name}/ + {vdir.name}/", from_cache=c1 and c2)
    meta["skipped"] = [p for p, _ in bad]
    return xt, yt, xv, yv, classes
