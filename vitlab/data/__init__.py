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
  with ``data_dir/val/`` and/or ``data_dir/test/`` (named as on disk: ``bundle.val_name`` is
  'test' when only test/ exists; with both, ``bundle.test`` holds test/); without those, a seeded
  stratified ``val_fraction`` is held out. Options ``image_size`` (the training size; default: the
  most common size), ``in_chans`` (3 or 1), ``fit`` ('center_crop': shorter side resized then the
  centre cut out, aspect kept; or 'squash'), ``cache`` (decoded arrays cached in
  ``$VITLAB_CACHE_DIR``, ``~/.cache/vitlab`` or ``data_dir/.vitlab_cache``), ``lazy`` ('auto':
  decoded on the fly when the decoded set exceeds ``memory_budget_mb``, default 1024),
  ``interpolation`` (the resizing filter: 'bilinear', the default, 'bicubic' or 'nearest'; a run
  fine-tuning published weights sets it to theirs).
- ``shards``: WebDataset tar shards written by ``vitlab data shard`` (``data_dir`` = the brace
  pattern of the train shards, e.g. ``OUT/train-{000000..000099}.tar``; ``index.json`` beside them);
  see :mod:`vitlab.data.shards`. Options ``image_size``, ``in_chans``, ``interpolation`` as for
  ``imagefolder``, ``shuffle_buffer``, ``val_pattern``.
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
    "imagefolder": {"image_size", "in_chans", "fit", "cache", "lazy", "memory_budget_mb", "interpolation"},
    "shards": {"image_size", "in_chans", "shuffle_buffer", "val_pattern", "interpolation"},
    "synthetic": {"num_classes", "img_size", "in_chans", "n_train", "n_val", "noise", "seed"},
}
_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100", "image-folder": "imagefolder", "folder": "imagefolder",
            "webdataset": "shards", "wds": "shards"}


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
                 on_bad_image: str = "skip", train_fraction: float = 1.0, report=None, **options) -> DataBundle:
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
    if data_dir is not None and key != "shards" and not Path(data_dir).expanduser().is_dir():
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
        train, val, test, val_name, class_names, stats = _load_imagefolder(
            data_dir, val_fraction, split_seed, on_bad_image, in_chans=in_chans or 3, meta=meta, report=report,
            **options)
        return _bundle(key, train, val, class_names, meta, train_fraction, split_seed, stats, test, val_name)
    elif key == "shards":
        from .shards import load_shards
        return load_shards(data_dir, in_chans=in_chans or 3, on_bad_image=on_bad_image, report=report,
                           train_fraction=train_fraction, **options)
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
    return _bundle(key, ImageDataset(xt, yt), ImageDataset(xv, yv), class_names, meta, train_fraction, split_seed)


def _bundle(key, train, val, class_names, meta, train_fraction, split_seed, stats=None, test=None,
            val_name="val") -> DataBundle:
    mean, std = stats or channel_stats(train.images)
    if float(train_fraction) < 1.0:
        train = train.subset(nested_fraction(train.labels.numpy(), float(train_fraction), split_seed))
        meta["train_fraction"] = float(train_fraction)
    _, c, h, w = train.images.shape
    return DataBundle(name=key, train=train, val=val, num_classes=len(class_names), in_chans=int(c),
                      native_size=(int(h), int(w)), class_names=class_names, mean=mean, std=std, meta=meta,
                      test=test, val_name=val_name)


def _load_imagefolder(data_dir, val_fraction, split_seed, on_bad_image, in_chans=3, image_size=None,
                      fit="center_crop", cache=True, lazy="auto", memory_budget_mb=1024, meta=None, report=None,
                      interpolation="bilinear"):
    """(train, val, test or None, val_name, class_names, mean/std or None) of an image folder.

    In memory (decoded once, cached on disk) while the decoded pixels fit ``memory_budget_mb``;
    beyond it, or with ``lazy=True``, decoded on the fly (:class:`~vitlab.data.lazy.LazyImageFolder`)."""
    from .imagefolder import (check_fit, check_resample, decode_tree, describe_fit, find_split_dirs,
                              most_common_size, parse_size, report_bad, scan)
    from .lazy import LazyImageFolder, estimate_stats

    if data_dir is None:
        raise DataError("imagefolder needs a folder: pass --data-dir DIR (DIR/<class>/<image>.jpg, or "
                        "DIR/train/<class>/... and DIR/val/<class>/... and/or DIR/test/<class>/...)")
    check_fit(fit)
    check_resample(interpolation)
    if lazy not in ("auto", True, False):
        raise ConfigError(f"lazy must be auto, true or false, got {lazy!r}")
    say = report or (lambda text: None)
    root = Path(data_dir).expanduser()
    say(f"imagefolder {root}: listing images ...")
    dirs = find_split_dirs(root) or {"all": root}
    size_hw = parse_size(image_size)
    listing = {name: scan(d) for name, d in dirs.items()}
    n_files = sum(len(files) for _, files in listing.values())
    bad_sizes: dict = {}
    if size_hw is None:
        say(f"  reading {n_files:,} image headers for the most common size (--img-size N skips this) ...")
        first = listing.get("train", listing.get("all"))
        size_hw = most_common_size(dirs.get("train", root), [f[0] for f in first[1]], bad_sizes)
    decoded_mb = n_files * in_chans * size_hw[0] * size_hw[1] / 2**20
    use_lazy = lazy is True or (lazy == "auto" and decoded_mb > float(memory_budget_mb))
    say(f"imagefolder {root}: {n_files:,} images in {', '.join(f'{k}/' for k in dirs if k != 'all') or 'one tree'}"
        f", {decoded_mb:,.0f} MB decoded at {size_hw[0]}x{size_hw[1]} -> "
        + ("decoded on the fly by loader workers" if use_lazy else "decoded into memory"))

    def one_split(name):
        d = dirs[name]
        if use_lazy:
            classes, files = listing[name]
            ds = LazyImageFolder([f[0] for f in files], [f[1] for f in files], size_hw, in_chans, fit, on_bad_image,
                                 resample=interpolation)
            return ds, classes, [], False, None
        x, y, classes, bad, cached, shapes = decode_tree(d, size_hw, in_chans, fit, cache, report=report,
                                                         resample=interpolation)
        return ImageDataset(x, y), classes, bad, cached, shapes

    parts = {name: one_split(name) for name in dirs}
    bad = [b for p in parts.values() for b in p[2]]
    report_bad(bad, on_bad_image)
    shapes = [p[4] for p in parts.values() if p[4]]
    if shapes:
        total = {k: sum(s[k] for s in shapes) for k in shapes[0]}
        meta["fit"] = describe_fit(total, size_hw, fit)
    else:
        meta["fit"] = (f"decoded on the fly: shorter side resized to {min(size_hw)} and centre-cropped to "
                       f"{size_hw[0]}x{size_hw[1]}, aspect kept" if fit == "center_crop" else
                       f"decoded on the fly: resized to {size_hw[0]}x{size_hw[1]} (fit=squash: aspect NOT kept)")
    say(f"  {meta['fit']}")
    meta.update(root=str(root), lazy=use_lazy, from_cache=all(p[3] for p in parts.values()))
    meta["skipped"] = [p for p, _ in bad]
    if "all" in parts:
        ds, classes = parts["all"][0], parts["all"][1]
        if len(ds) == 0:
            raise DataError(f"no readable image in {root}: every image failed to decode; check the files")
        tr, va = stratified_split(ds.labels.numpy(), val_fraction, split_seed)
        train, val, test, val_name = ds.subset(tr), ds.subset(va), None, "val"
        meta["split"] = "held-out val_fraction"
    else:
        classes = parts["train"][1]
        out = {}
        for name in ("val", "test"):
            if name not in parts:
                continue
            ds, vclasses = parts[name][0], parts[name][1]
            extra = sorted(set(vclasses) - set(classes))
            if extra:
                raise DataError(f"{dirs[name]} has classes {', '.join(extra)} that {dirs['train']} lacks: the "
                                f"{name} classes must be a subset of the train classes")
            remap = torch.tensor([classes.index(c) for c in vclasses], dtype=torch.int64)
            ds.labels = remap[ds.labels]
            out[name] = ds
        for name, ds in [("train", parts["train"][0]), *out.items()]:
            if len(ds) == 0:
                raise DataError(f"no readable image in {dirs[name]}: check the files")
        train = parts["train"][0]
        # the split evaluated during training is val/ when there is one, else test/ (named test)
        val_name = "val" if "val" in out else "test"
        val, test = out[val_name], out.get("test") if val_name == "val" else None
        meta["split"] = " + ".join(f"{n}/" for n in dirs)
    stats = estimate_stats(train) if use_lazy else None
    return train, val, test, val_name, classes, stats
