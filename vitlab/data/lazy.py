"""Image folders decoded on the fly: for sets whose decoded pixels do not fit the memory budget.

:class:`LazyImageFolder` holds only the file list and labels. Each ``__getitem__`` decodes one
image and brings it to the training size the same way the in-memory path does (shorter side
resized, centre cut out: :func:`vitlab.data.imagefolder.decode_image`), so a set trains alike
whichever path it takes; the random augmentation (random resized crop, pad-and-crop, flips, ...)
then runs on the batch as for in-memory sets. In training, DataLoader worker processes call it
(:mod:`vitlab.data.stream`); evaluation and analysis code that indexes ``dataset.images[idx]``
gets the same images decoded by a thread pool (:class:`LazyImages`).
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import DataError


class LazyImageFolder(torch.utils.data.Dataset):
    """``files`` (paths), ``labels`` int64 (N,), decoded to uint8 (C, H, W) at ``size_hw``.

    A file that fails to decode is reported by name; with ``on_bad_image='error'`` that stops
    the run, with 'skip' the next readable image of the list stands in for it (a batch keeps its
    size; the warning names the file).
    """

    lazy = True

    def __init__(self, files: list[str], labels, size_hw: tuple[int, int], in_chans: int = 3,
                 fit: str = "center_crop", on_bad_image: str = "skip", resample: str = "bilinear"):
        self.files = list(files)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))
        self.in_chans = int(in_chans)
        self.mode = "RGB" if in_chans == 3 else "L"
        self.fit = fit
        self.resample = resample
        self.on_bad_image = on_bad_image
        self.images = LazyImages(self)

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, i: int) -> torch.Tensor:
        from .imagefolder import decode_image

        for k in range(len(self.files)):
            j = (int(i) + k) % len(self.files)
            arr = decode_image(self.files[j], self.size_hw, self.mode, self.fit, resample=self.resample)
            if not isinstance(arr, Exception):
                return torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous()  # a writable copy
            if self.on_bad_image == "error":
                raise DataError(f"cannot decode image {self.files[j]} ({type(arr).__name__}: {arr}): remove or "
                                f"replace the file, or pass on_bad_image=skip")
            warnings.warn(f"skipped unreadable image {self.files[j]} ({type(arr).__name__}: {arr}); "
                          f"the next image stands in for it", stacklevel=2)
        raise DataError("no readable image in the folder: every file failed to decode")

    def __getitem__(self, i):
        return self.decode(i), int(self.labels[i])

    def subset(self, indices) -> "LazyImageFolder":
        idx = np.asarray(indices, dtype=np.int64)
        return LazyImageFolder([self.files[i] for i in idx], self.labels[torch.from_numpy(idx)], self.size_hw,
                               self.in_chans, self.fit, self.on_bad_image, self.resample)

    def __repr__(self) -> str:
        return f"LazyImageFolder(n={len(self)}, shape=({self.in_chans}, {self.size_hw[0]}, {self.size_hw[1]}))"


class LazyImages:
    """``dataset.images`` of a lazy set: indexing (int, slice, index tensor or list) decodes those
    images with a thread pool (PIL releases the GIL while decoding) into a uint8 (N, C, H, W)
    tensor, so code written for in-memory sets (evaluation, analysis) runs unchanged."""

    def __init__(self, ds: LazyImageFolder):
        self.ds = ds

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.ds), self.ds.in_chans, *self.ds.size_hw)

    dtype = torch.uint8
    ndim = 4

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx) -> torch.Tensor:
        n = len(self.ds)
        if isinstance(idx, int):
            return self.ds.decode(idx % n)
        if isinstance(idx, slice):
            ids = list(range(n))[idx]
        else:
            ids = [int(i) for i in torch.as_tensor(idx).reshape(-1)]
        if not ids:
            return torch.zeros((0, *self.shape[1:]), dtype=torch.uint8)
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            return torch.stack(list(pool.map(self.ds.decode, ids)))

    def to(self, *args, **kwargs):  # pragma: no cover - guards code that moves a whole set at once
        raise TypeError("a lazily decoded image set cannot be moved as one tensor; index a batch first")


def estimate_stats(ds: LazyImageFolder, n: int = 1000, seed: int = 0) -> tuple[tuple, tuple]:
    """Per-channel mean/std from a seeded sample of ``n`` images (decoding the whole set just for
    two numbers per channel would cost what the lazy path avoids)."""
    from .core import channel_stats

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(ds), size=min(n, len(ds)), replace=False))
    return channel_stats(ds.images[torch.from_numpy(idx)])
