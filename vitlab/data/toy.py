"""Data sets that need no files: scikit-learn's bundled digits and a synthetic generator."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def load_digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits (values 0..16) as uint8 (N, 1, 8, 8) scaled to 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).to(torch.float64)  # (N, 8, 8), 0..16
    x = (x * (255.0 / 16.0)).round_().clamp_(0, 255).to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(d.target).to(torch.int64)
    return x.contiguous(), y


def make_synthetic(num_classes: int = 10, img_size: int = 32, in_chans: int = 3, n_train: int = 2048,
                   n_val: int = 512, noise: float = 0.35, seed: int = 0):
    """Random images with learnable class structure, for smoke runs and benchmarks.

    Each class has a smooth random prototype (a 4x4 Gaussian field upsampled to the image size);
    an image is its class prototype at a random contrast plus per-pixel noise and a random
    brightness shift, so a model must use spatial structure, not a single pixel or the mean, and
    accuracy climbs above chance within a few hundred steps. Labels are balanced (i % classes,
    shuffled). Generated with its own ``torch.Generator(seed)``: the same options give the same data.
    """
    for k, v in dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                     n_train=n_train, n_val=n_val).items():
        if int(v) < 1:
            raise ConfigError(f"synthetic option {k} must be a positive integer, got {v}")
    if num_classes < 2:
        raise ConfigError(f"synthetic needs num_classes >= 2, got {num_classes}")
    g = torch.Generator().manual_seed(int(seed))
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    protos = torch.randn(num_classes, in_chans, 4, 4, generator=g)
    protos = F.interpolate(protos, size=size, mode="bicubic", align_corners=False)
    protos = protos / protos.flatten(1).std(dim=1).view(-1, 1, 1, 1)

    def draw(n):
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
        shift = 0.15 * torch.randn(n, 1, 1, 1, generator=g)
        x = protos[y] * contrast * 0.25 + shift + noise * 0.25 * torch.randn(n, in_chans, *size, generator=g)
        x = ((x + 0.5) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        return x, y.to(torch.int64)

    xt, yt = draw(int(n_train))
    xv, yv = draw(int(n_val))
    return xt, yt, xv, yv
