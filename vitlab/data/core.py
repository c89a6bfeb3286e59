"""Containers and shared helpers of the data layer: the in-memory dataset, the bundle a loader
returns, seeded stratified splits, channel statistics, checksums and where to look for files."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError


class ImageDataset(torch.utils.data.Dataset):
    """A whole split held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,).

    Kept as plain tensors so the training loop can gather a batch with one index operation and
    augment it on the device (see :mod:`vitlab.data.augment`), instead of going through a
    per-sample ``__getitem__`` and a collate function.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be (N,) with N={images.shape[0]}, got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64).contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def subset(self, indices) -> "ImageDataset":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return ImageDataset(self.images[idx], self.labels[idx])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageDataset(n={n}, shape=({c}, {h}, {w}))"


@dataclass
class DataBundle:
    """What :func:`vitlab.data.load_dataset` returns.

    ``mean``/``std`` are per-channel statistics of the (full, before ``train_fraction``) training
    split in [0, 1] units, for :class:`~vitlab.data.augment.BatchTransform`'s normalisation.
    ``meta`` carries loader details: where the files came from, skipped files, checksums checked.
    """

    name: str
    train: ImageDataset
    val: ImageDataset
    num_classes: int
    in_chans: int
    native_size: tuple[int, int]
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    meta: dict = field(default_factory=dict)
    test: object = None       # a test/ split held beside val/ (image folders with both)
    val_name: str = "val"     # what the held-out split is called on disk: 'val' or 'test'

    def split(self, name: str | None):
        """The split called ``name`` ('train', 'val', 'test'; None: the held-out split), as on disk."""
        from ..errors import DataError

        name = name or self.val_name
        if name == "train":
            return self.train
        if name == self.val_name:
            return self.val
        if name == "test" and self.test is not None:
            return self.test
        have = ["train", self.val_name] + (["test"] if self.test is not None else [])
        raise DataError(f"{self.name} has no {name!r} split (it has {', '.join(have)}); use --split "
                        f"{self.val_name}" + (" (put the images in a test/ folder beside train/ for a test split)"
                                              if name == "test" else ""))

    def summary(self) -> str:
        h, w = self.native_size
        return (f"{self.name}: {len(self.train)} train / {len(self.val)} {self.val_name} images, "
                f"{self.num_classes} classes, {self.in_chans}x{h}x{w}")


# ---------------------------------------------------------------------------------------------
# Seeded stratified splits


def _class_permutations(labels: np.ndarray, seed: int, salt: int) -> dict[int, np.ndarray]:
    """A seeded permutation of each class's indices. The same (seed, salt) always gives the same
    order, which is what makes the splits reproducible and the fractions nested."""
    rng = np.random.default_rng([int(seed), salt])
    out = {}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out[int(c)] = idx[rng.permutation(idx.size)]
    return out


def stratified_split(labels, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx), each sorted: ``round(val_fraction * n_c)`` of every class c goes to
    val (at least one where the class has two or more images, never all of a class)."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}: use e.g. val_fraction=0.1")
    labels = np.asarray(labels)
    train, val = [], []
    for _, idx in sorted(_class_permutations(labels, seed, salt=1).items()):
        n = idx.size
        k = int(round(val_fraction * n))
        k = min(max(k, 1 if n >= 2 else 0), n - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def nested_fraction(labels, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded stratified ``fraction`` of the samples.

    Each class keeps the first ``max(1, round(fraction * n_c))`` of one fixed seeded permutation,
    so for the same seed a smaller fraction is always a subset of a larger one (the data-scaling
    study trains on 10% ⊂ 30% ⊂ 100% of the same images).
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"train_fraction must be in (0, 1], got {fraction}: use e.g. train_fraction=0.1")
    labels = np.asarray(labels)
    if fraction == 1.0:
        return np.arange(labels.size)
    keep = []
    for _, idx in sorted(_class_permutations(labels, seed, salt=2).items()):
        k = max(1, int(round(fraction * idx.size)))
        keep.append(idx[:k])
    return np.sort(np.concatenate(keep))


# ---------------------------------------------------------------------------------------------
# Statistics, channels


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, exact, from a 256-bin histogram of each channel
    (counting uint8 values is several times faster than summing the set as floats)."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = hist.sum()
        mean = (hist * values).sum() / n
        var = (hist * (values - mean).square()).sum() / n
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def convert_channels(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Grey -> RGB by repeating the channel; RGB -> grey by ITU-R 601 luma (as PIL's 'L')."""
    c = images.shape[1]
    if c == in_chans:
        return images
    if c == 1 and in_chans == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and in_chans == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise ConfigError(f"cannot convert {c}-channel images to in_chans={in_chans}: use in_chans=1 or 3")


# ---------------------------------------------------------------------------------------------
# Checksums, locations


def file_digest(path: Path | str, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bytes_digest(data: bytes, algo: str = "sha256") -> str:
    return hashlib.new(algo, data).hexdigest()


def candidate_dirs(name: str, data_dir: str | os.PathLike | None, defaults: list[str] = (),
                   how_to_get: str | None = None) -> list[Path]:
    """Folders a loader looks in, in order.

    With ``data_dir``: that folder and ``data_dir/<name>`` only (an explicit folder that does not
    exist is an error, not a silent fall-back; its message ends with ``how_to_get``, where the
    files come from, as the message for files not found does: a config that names the folder,
    such as configs/fashion_mnist.yaml, must not lose the hint). Without: ``$VITLAB_DATA/<name>``, ``$VITLAB_DATA``,
    ``./data/<name>``, ``~/data/<name>``, then the dataset's own system places (``defaults``).
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"data_dir {str(root)!r} does not exist or is not a folder: "
                            f"pass the folder that holds the {name} files (--data-dir DIR)"
                            + (f"; to get them, {how_to_get}" if how_to_get else ""))
        return [root, root / name]
    dirs = []
    env = os.environ.get("VITLAB_DATA")
    if env:
        dirs += [Path(env).expanduser() / name, Path(env).expanduser()]
    dirs += [Path.cwd() / "data" / name, Path.home() / "data" / name]
    dirs += [Path(d) for d in defaults]
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def format_dirs(dirs: list[Path]) -> str:
    return ", ".join(str(d) for d in dirs)
