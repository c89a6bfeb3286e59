"""Batched augmentation and regularisation of image batches: random resized crop, pad-and-crop,
horizontal flip, RandAugment, mixup, cutmix and label smoothing.

Everything works on a whole uint8 batch (B, C, H, W) as tensor operations on the batch's own
device; nothing decodes or loops over pixels in Python. Random resized crop and RandAugment come
from kornia (a maintained library); flips, pad-and-crop and mixup/cutmix are a few lines of torch.

Randomness (the rule the training engine relies on for bit-identical resume):

- with ``generator`` given, one 63-bit seed is drawn from it per call; torch's global RNG is left
  untouched;
- without, that seed is drawn from torch's global CPU RNG (exactly one draw per call), so saving
  and restoring ``torch.get_rng_state()`` reproduces the augmentation.

Every random number of the call (kornia's parameters included) is then drawn on the CPU inside
``torch.random.fork_rng`` seeded from that seed, so the result depends only on the seed and the
input, never on the device or on the CUDA RNG.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ConfigError(f"img_size must be an int or (H, W), got {v!r}")
    return v


@dataclass
class AugmentConfig:
    """What :class:`BatchTransform` does to training batches (eval batches are only resized).

    ``interpolation`` is the resizing filter of both (bilinear, bicubic or nearest). ``crop_pct``
    is the evaluation crop of published weights (timm's convention): eval batches are resized to
    ``floor(img_size / crop_pct)`` and the centre ``img_size`` cut out; 1.0 (the default) resizes to
    ``img_size`` directly.

    ``randaugment=(N, M)``: N operations per image at magnitude M on RandAugment's 0..30 scale
    (Cubuk et al.; e.g. (2, 9) or (2, 15)). ``pad_crop=p``: zero-pad p pixels and take a random
    crop back to ``img_size`` (the CIFAR recipe). With mixup and cutmix both on, each batch uses
    one of them (cutmix with probability ``switch_prob``); ``mix_prob`` is the chance a batch is
    mixed at all. ``label_smoothing`` spreads eps over the classes: (1 - eps) * one_hot + eps / K.
    """

    img_size: int | tuple[int, int]
    random_resized_crop: bool = False
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    pad_crop: int = 0
    hflip: bool = False
    randaugment: tuple[int, int] | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0
    random_erasing: float = 0.0
    erase_scale: tuple[float, float] = (0.02, 1 / 3)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    # kornia's RandAugment picks one operation sequence per call; applying it to groups of this
    # many images gives different operations across the batch at a few calls per batch.
    randaugment_group: int = 32

    def __post_init__(self):
        self.img_size = _pair(self.img_size)
        if min(self.img_size) < 1:
            raise ConfigError(f"img_size must be positive, got {self.img_size}")
        self.rrc_scale = tuple(float(s) for s in self.rrc_scale)
        self.rrc_ratio = tuple(float(s) for s in self.rrc_ratio)
        if not (len(self.rrc_scale) == 2 and 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1):
            raise ConfigError(f"rrc_scale must be (min, max) with 0 < min <= max <= 1, got {self.rrc_scale}")
        if not (len(self.rrc_ratio) == 2 and 0 < self.rrc_ratio[0] <= self.rrc_ratio[1]):
            raise ConfigError(f"rrc_ratio must be (min, max) aspect ratios with 0 < min <= max, got {self.rrc_ratio}")
        if int(self.pad_crop) < 0:
            raise ConfigError(f"pad_crop must be >= 0 pixels, got {self.pad_crop}")
        self.pad_crop = int(self.pad_crop)
        if self.randaugment is not None:
            ra = tuple(self.randaugment)
            if len(ra) != 2 or not 1 <= int(ra[0]) <= 15 or not 0 < float(ra[1]) < 30:
                raise ConfigError(f"randaugment must be (N ops in 1..15, magnitude M in (0, 30)), "
                                  f"got {self.randaugment!r}; e.g. randaugment=[2, 9]")
            self.randaugment = (int(ra[0]), float(ra[1]))
        for k in ("mixup_alpha", "cutmix_alpha"):
            if float(getattr(self, k)) < 0:
                raise ConfigError(f"{k} must be >= 0 (0 turns it off), got {getattr(self, k)}")
        if not 0.0 <= float(self.label_smoothing) < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for k in ("mix_prob", "switch_prob", "random_erasing"):
            if not 0.0 <= float(getattr(self, k)) <= 1.0:
                raise ConfigError(f"{k} must be in [0, 1], got {getattr(self, k)}")
        if int(self.randaugment_group) < 1:
            raise ConfigError(f"randaugment_group must be >= 1, got {self.randaugment_group}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not 0.0 < float(self.crop_pct) <= 1.0:
            raise ConfigError(f"crop_pct must be in (0, 1] (e.g. 0.875 or 0.9; 1.0 = no crop), got {self.crop_pct}")
        self.crop_pct = float(self.crop_pct)

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            from ..errors import did_you_mean
            raise ConfigError(f"unknown augmentation option(s) {', '.join(unknown)}."
                              f"{did_you_mean(unknown[0], sorted(names))} Known: {', '.join(sorted(names))}")
        return cls(**d)

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def one_hot_smooth(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(1 - eps) * one_hot(labels) + eps / K, float32 (B, K)."""
    t = F.one_hot(labels.long(), num_classes).to(torch.float32)
    if smoothing > 0:
        t = t * (1.0 - smoothing) + smoothing / num_classes
    return t


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize images in [0, 1] with `mode` (bilinear or bicubic: antialiased, as PIL does, since a
    plain downscale aliases; bicubic's overshoot is clipped back to [0, 1] as PIL's uint8 output is)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    y = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    return y.clamp_(0.0, 1.0) if mode == "bicubic" else y


def eval_resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear", crop_pct: float = 1.0):
    """The evaluation geometry: with crop_pct < 1, resize to floor(size / crop_pct) and cut out the
    centre `size` (timm's eval transform on inputs that already have the target's aspect ratio);
    else a plain resize to `size`."""
    if crop_pct >= 1.0:
        return resize(x, size, mode)
    scaled = eval_scale_size(size, crop_pct)
    x = resize(x, scaled, mode)
    top, left = (scaled[0] - size[0]) // 2, (scaled[1] - size[1]) // 2
    return x[..., top:top + size[0], left:left + size[1]]


def eval_scale_size(size, crop_pct: float) -> tuple[int, int]:
    """(H, W) an evaluation image is resized to before its centre `size` is cut out."""
    h, w = _pair(size)
    if crop_pct >= 1.0:
        return (h, w)
    return (int(math.floor(h / crop_pct)), int(math.floor(w / crop_pct)))


def pad_random_crop(x: torch.Tensor, pad: int, size: tuple[int, int], oy: torch.Tensor, ox: torch.Tensor):
    """Zero-pad by ``pad`` and crop ``size`` at per-image offsets (oy, ox) in [0, 2 * pad], batched
    by gathering rows and columns with advanced indexing."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (oy.view(b, 1) + torch.arange(size[0], device=x.device)).view(b, 1, size[0], 1)
    cols = (ox.view(b, 1) + torch.arange(size[1], device=x.device)).view(b, 1, 1, size[1])
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return xp[bi, ci, rows, cols]


def cutmix_box(lam: float, h: int, w: int, cy: int, cx: int) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of a box of area about (1 - lam) * h * w centred at (cy, cx), clipped to
    the image (Yun et al., CutMix); the caller recomputes lam from the clipped area."""
    r = math.sqrt(1.0 - lam)
    ch, cw = int(h * r), int(w * r)
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y1, y2, x1, x2


def random_erase(x: torch.Tensor, prob: float, scale=(0.02, 1 / 3), ratio=(0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020, timm's mode 'pixel'), on a normalised batch where it lies:
    each image, with probability `prob`, gets one rectangle of area fraction ~ U(scale) and aspect
    ratio log-uniform in `ratio` (clipped to the image) replaced by N(0, 1) noise, i.e. noise at the
    data's own mean and spread. One vectorised pass: the boxes are drawn on the CPU generator (seeded
    like the other augmentations), the masks built on the batch's device."""
    b, c, h, w = x.shape
    on = torch.rand(b) < prob
    area = torch.empty(b).uniform_(*scale) * (h * w)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(log_r)
    eh = torch.sqrt(area * r).round().clamp(1, h).long()
    ew = torch.sqrt(area / r).round().clamp(1, w).long()
    y0 = (torch.rand(b) * (h - eh + 1).float()).long()
    x0 = (torch.rand(b) * (w - ew + 1).float()).long()
    noise = torch.randn(x.shape).to(x.device, x.dtype)
    dev = x.device
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    y0, x0, eh, ew, on = (t.to(dev).view(b, 1, 1) for t in (y0, x0, eh, ew, on))
    mask = on & (ys >= y0) & (ys < y0 + eh) & (xs >= x0) & (xs < x0 + ew)
    return torch.where(mask.unsqueeze(1), noise, x)


class BatchTransform:
    """uint8 (B, C, H, W) batch -> (float32 normalised (B, C, *img_size), targets).

    Targets are the int64 labels unless the (training) config mixes or smooths labels; then they
    are float32 soft targets (B, num_classes) whose rows sum to 1. Eval (``train=False``) only
    resizes (bilinear, antialias) and normalises, and returns the labels.
    """

    def __init__(self, cfg: AugmentConfig, mean, std, num_classes: int, train: bool):
        self.cfg = cfg
        self.size = _pair(cfg.img_size)
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor([float(s) for s in std], dtype=torch.float32).view(1, -1, 1, 1)
        if self.mean.shape != self.std.shape or (self.std <= 0).any():
            raise ConfigError(f"mean and std must have one positive std per channel, got {mean}, {std}")
        self.num_classes = int(num_classes)
        self.train = bool(train)
        self._rrc = None
        self._ra = {}
        if self.train and cfg.random_resized_crop:
            import kornia.augmentation as K
            self._rrc = K.RandomResizedCrop(self.size, scale=cfg.rrc_scale, ratio=cfg.rrc_ratio,
                                            resample=cfg.interpolation, cropping_mode="resample")
        if self.train and cfg.randaugment is not None and self.mean.shape[1] not in (1, 3):
            raise ConfigError(f"randaugment works on 1- or 3-channel images, not {self.mean.shape[1]}: "
                              f"set randaugment to null")

    @property
    def soft_targets(self) -> bool:
        return self.train and (self.cfg.mixes or self.cfg.label_smoothing > 0)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def _check(self, images, labels):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"BatchTransform takes uint8 (B, C, H, W) images, "
                             f"got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] != self.mean.shape[1]:
            raise ConfigError(f"images have {images.shape[1]} channels but mean/std have {self.mean.shape[1]}: "
                              f"use the data set's own DataBundle.mean/std")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be (B,) = ({images.shape[0]},), got {tuple(labels.shape)}")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        self._check(images, labels)
        x = images.to(torch.float32).div_(255.0)
        if not self.train:
            x = eval_resize(x, self.size, self.cfg.interpolation, self.cfg.crop_pct)
            return self.normalize(x).contiguous(), labels.long()
        if generator is not None:
            seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        else:
            seed = int(torch.randint(0, 2**63 - 1, (1,)))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            x = self._geometric_and_photometric(x)
            x = self.normalize(x)
            if self.cfg.random_erasing > 0:
                x = random_erase(x, self.cfg.random_erasing, self.cfg.erase_scale, self.cfg.erase_ratio)
            x, targets = self._mix(x, labels)
        return x.contiguous(), targets

    def _geometric_and_photometric(self, x: torch.Tensor) -> torch.Tensor:
        cfg, b = self.cfg, x.shape[0]
        dev = x.device
        if self._rrc is not None:
            x = self._rrc(x)
        else:
            x = resize(x, self.size, cfg.interpolation)
        if cfg.pad_crop > 0:
            oy = torch.randint(0, 2 * cfg.pad_crop + 1, (b,)).to(dev)
            ox = torch.randint(0, 2 * cfg.pad_crop + 1, (b,)).to(dev)
            x = pad_random_crop(x, cfg.pad_crop, self.size, oy, ox)
        if cfg.hflip:
            flip = (torch.rand(b) < 0.5).to(dev).view(b, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        if cfg.randaugment is not None:
            ra = self._randaugment(x.shape[1])
            g = cfg.randaugment_group
            x = torch.cat([ra(x[i:i + g]) for i in range(0, b, g)]).clamp_(0.0, 1.0)
        return x

    def _randaugment(self, channels: int):
        """kornia's RandAugment (images in [0, 1]). Its 'color' (saturation) operation needs RGB; on
        grey images it would be the identity anyway, so it is left out of the candidates there."""
        if channels not in self._ra:
            from kornia.augmentation.auto import RandAugment
            from kornia.augmentation.auto.rand_augment.rand_augment import default_policy
            policy = default_policy if channels == 3 else [p for p in default_policy if p[0][0] != "color"]
            n, m = self.cfg.randaugment
            self._ra[channels] = RandAugment(n=min(n, len(policy)), m=m, policy=policy)
        return self._ra[channels]

    def _mix(self, x: torch.Tensor, labels: torch.Tensor):
        cfg = self.cfg
        eps = float(cfg.label_smoothing)
        if not cfg.mixes:
            if eps > 0:
                return x, one_hot_smooth(labels, self.num_classes, eps).to(x.device)
            return x, labels.long()
        targets = one_hot_smooth(labels, self.num_classes, eps).to(x.device)
        if float(torch.rand(())) >= cfg.mix_prob:
            return x, targets
        use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or float(torch.rand(())) < cfg.switch_prob)
        alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        # Each image is paired with the batch in reverse order (one flip, no extra permutation).
        x2, t2 = x.flip(0), targets.flip(0)
        if use_cutmix:
            h, w = x.shape[-2:]
            cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
            y1, y2, x1, x2_ = cutmix_box(lam, h, w, cy, cx)
            x = x.clone()
            x[:, :, y1:y2, x1:x2_] = x2[:, :, y1:y2, x1:x2_]
            lam = 1.0 - (y2 - y1) * (x2_ - x1) / float(h * w)
        else:
            x = x * lam + x2 * (1.0 - lam)
        return x, targets * lam + t2 * (1.0 - lam)
