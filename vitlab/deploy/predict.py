"""Prediction over many images: files, folders (recursive) and glob patterns, read and classified
in batches by a generator, so memory holds one batch whatever the number of images.

An unreadable image does not stop the run: its record carries an 'error' naming the file.
"""
from __future__ import annotations

from .options import BACKENDS

import glob
import os
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..data.imagefolder import IMAGE_EXTENSIONS
from ..errors import CheckpointError, ConfigError, DataError
from .preprocess import Preprocess, load_spec, spec_from_info

_GLOB_CHARS = set("*?[")


def _walk(root: Path) -> Iterator[str]:
    """Image files under `root`, depth first in name order, found lazily (os.walk is a generator)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS:
                yield os.path.join(dirpath, f)


def iter_image_paths(paths: Iterable[str | Path]) -> Iterator[tuple[str, str | None]]:
    """(path, None) for every image named by `paths`, or (path, reason) for a name that gives
    none. A file is taken as named (whatever its extension); a folder gives its image files
    recursively; a pattern with * ? [ ] gives its matches (** spans folders)."""
    for p in paths:
        p = str(p)
        if os.path.isdir(p):
            found = False
            for f in _walk(Path(p)):
                found = True
                yield f, None
            if not found:
                yield p, f"folder has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        elif os.path.isfile(p):
            yield p, None
        elif _GLOB_CHARS & set(p):
            found = False
            for m in sorted(glob.iglob(p, recursive=True)):
                found = True
                if os.path.isdir(m):
                    yield from ((f, None) for f in _walk(Path(m)))
                else:
                    yield m, None
            if not found:
                yield p, "no file matches this pattern"
        else:
            yield p, "no such file or folder"


def _batched(it: Iterator, n: int) -> Iterator[list]:
    while chunk := list(islice(it, n)):
        yield chunk


def read_image(path: str, channels: int, size=None, interpolation: str = "bilinear") -> torch.Tensor:
    # the same decoder as `vitlab.predict` and training's image folders (image modes, EXIF rotation,
    # shorter side resized to `size` and the centre cut out: aspect kept), so fixes to it apply here
    from ..train.api import _read_image

    return _read_image(path, channels, size, interpolation)


def open_model(source: str | Path, backend: str = "torch", onnx: str | Path | None = None, *,
               which: str = "last", ema: bool | None = None, device: str = "cpu"):
    """(runner, preprocess spec) for a run directory / checkpoint (backend 'torch'), or an
    exported .onnx file (backend 'onnxruntime': `onnx`, or `source` itself, or the run's
    export-onnx/model.onnx), whose preprocess.json beside it gives the preprocessing."""
    from .export import OrtRunner, TorchRunner

    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} is not known; choose {' or '.join(BACKENDS)}")
    if backend == "onnxruntime" or str(source).endswith(".onnx") or onnx is not None:
        if onnx is None:
            onnx = source if str(source).endswith(".onnx") else Path(source) / "export-onnx" / "model.onnx"
        if not Path(onnx).is_file():
            raise ConfigError(f"{str(onnx)!r} does not exist; export the run first (vitlab export {source}) "
                              f"or pass the file with --onnx FILE")
        return OrtRunner(onnx), load_spec(onnx)
    from ..train.checkpoint import load_model
    from ..train.distributed import resolve_device

    model, info = load_model(source, which=which, ema=ema)
    dev = resolve_device(device)
    model.to(dev)
    return TorchRunner(lambda x: model(x.to(dev)).cpu()), spec_from_info(info)


@torch.no_grad()
def predict_iter(source: str | Path, paths: Iterable[str | Path], *, batch_size: int = 64, topk: int = 5,
                 backend: str = "torch", onnx: str | Path | None = None, which: str = "last",
                 ema: bool | None = None, device: str = "cpu") -> Iterator[dict]:
    """One record per image, in input order, produced batch by batch:
    {'path', 'top': [{'class', 'index', 'prob'}, ...]} or {'path', 'error'} for an image that
    could not be read. Paths are expanded and images read lazily, one batch at a time."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be at least 1")
    if topk < 1:
        raise ConfigError(f"--top-k {topk} must be at least 1")
    from ..data.inputs import describe_input_conversion

    runner, spec = open_model(source, backend, onnx, which=which, ema=ema, device=device)
    pre = Preprocess(spec)
    names = spec["class_names"]
    k = min(topk, len(names))
    for chunk in _batched(iter_image_paths(paths), batch_size):
        records, images, slots = [], [], []
        for path, err in chunk:
            records.append({"path": path})
            if err is not None:
                records[-1]["error"] = err
                continue
            try:
                images.append(read_image(path, pre.channels, pre.decode_size, pre.interpolation))
                slots.append(len(records) - 1)
            except DataError as e:
                records[-1]["error"] = str(e)
                continue
            note = describe_input_conversion(path, tuple(spec["size"]), pre.channels)
            if note:  # what was done to an image unlike the training data (colour, a large resize)
                records[-1]["note"] = note
        if images:
            logits = runner(pre(images)).float()
            if not bool(torch.isfinite(logits).all()):  # broken weights: never a 'nan%' prediction
                raise CheckpointError(f"the model in {str(spec.get('checkpoint', source))!r} outputs NaN/inf: its "
                                      f"weights are not finite (the run diverged?); use an earlier checkpoint "
                                      f"(e.g. --best) or retrain with a lower lr")
            probs = logits.softmax(dim=-1)
            top = probs.topk(k, dim=-1)
            for row, slot in enumerate(slots):
                records[slot]["top"] = [{"class": names[int(i)], "index": int(i), "prob": float(v)}
                                        for v, i in zip(top.values[row], top.indices[row])]
        yield from records
