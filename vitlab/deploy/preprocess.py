"""The input contract of an exported model (preprocess.json) and the code that applies it.

An exported file takes float32 (B, C, H, W) images that were decoded to grey or RGB, scaled to
[0, 1], resized with the run's filter (``interpolation``: bilinear unless the run fine-tuned
published weights that use another) to the training size, or with ``crop_pct`` < 1 to
size / crop_pct and the centre cut out, and normalised with the training mean/std: exactly
vitlab's evaluation transform, so the same code (BatchTransform) prepares the inputs of the
PyTorch model and of the exported one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError

SPEC_VERSION = 1


def _size_hw(img_size) -> list[int]:
    return [int(img_size), int(img_size)] if isinstance(img_size, int) else [int(s) for s in img_size]


def spec_from_info(info: dict, mean=None, std=None, dynamic_size: bool = False) -> dict:
    """preprocess.json's content for a model loaded with vitlab.train.load_model."""
    mean = tuple(info.get("mean") or mean or ())
    std = tuple(info.get("std") or std or ())
    if not mean or not std:
        raise CheckpointError(f"{info['checkpoint']} records no normalisation mean/std; retrain with this "
                              f"version of vitlab or pass the data set so they can be computed")
    k = int(info["num_classes"])
    from ..train.api import preprocessing_of

    pre = preprocessing_of(info)
    return {
        "version": SPEC_VERSION,
        "size": _size_hw(info["img_size"]),          # (H, W) the model was trained at
        "dynamic_size": bool(dynamic_size),           # the file also takes other sizes (multiples of the patch)
        "resize": (f"shorter side to the size's, {pre['interpolation']} (aspect ratio kept), as training decodes "
                   f"image folders" + (f"; first to size / crop_pct, then the centre cut out" if pre["crop_pct"] < 1 else "")),
        "crop": "center",
        "interpolation": pre["interpolation"],        # the resizing filter (bilinear, bicubic, nearest)
        "crop_pct": pre["crop_pct"],                  # evaluation crop: resize to size / crop_pct, cut the centre
        "channels": int(info["in_chans"]),
        "color": "L" if int(info["in_chans"]) == 1 else "RGB",
        "scale": 1 / 255,                             # uint8 -> [0, 1] before normalising
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "layout": "NCHW float32",
        "input": "images",
        "output": "logits",
        "class_names": list(info.get("class_names") or [str(i) for i in range(k)]),
        "model": info["config"].get("model"),
        "checkpoint": str(info["checkpoint"]),
    }


def load_spec(path: str | Path) -> dict:
    """preprocess.json beside an exported file (or the file itself)."""
    p = Path(path)
    if p.suffix != ".json":
        p = p.parent / "preprocess.json"
    if not p.is_file():
        raise CheckpointError(f"no preprocess.json beside {str(path)!r}; export the model with "
                              f"`vitlab export RUN` (it writes both) or copy the file next to it")
    try:
        spec = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {p} ({e}); re-export the model") from None
    missing = [k for k in ("size", "channels", "mean", "std", "class_names") if k not in spec]
    if missing:
        raise CheckpointError(f"{p} lacks {', '.join(missing)}; re-export the model with `vitlab export`")
    return spec


class Preprocess:
    """uint8 (C, H, W) images of any sizes -> one float32 (B, C, *size) batch, as vitlab's evaluation."""

    def __init__(self, spec: dict):
        from ..data import AugmentConfig, BatchTransform

        self.spec = spec
        self.channels = int(spec["channels"])
        self.size = tuple(spec["size"])
        # files from before these keys: bilinear, no crop (what vitlab did then)
        self.interpolation = spec.get("interpolation", "bilinear")
        self.crop_pct = float(spec.get("crop_pct", 1.0))
        self.transform = BatchTransform(AugmentConfig(img_size=self.size, interpolation=self.interpolation,
                                                      crop_pct=self.crop_pct), spec["mean"], spec["std"],
                                        len(spec["class_names"]), train=False)

    @property
    def decode_size(self) -> tuple[int, int]:
        """(H, W) files are decoded at: the evaluation crop's starting size."""
        from ..data.augment import eval_scale_size

        return eval_scale_size(self.size, self.crop_pct)

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 (B, C, H, W) batch of one size."""
        return self.transform(images, torch.zeros(images.shape[0], dtype=torch.int64))[0]

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        # one image at a time: files in a folder have different sizes
        return torch.cat([self.batch(x[None]) for x in images]) if images else torch.zeros(0, self.channels, *self.size)
