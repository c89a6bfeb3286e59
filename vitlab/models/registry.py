"""Named model variants as data.

Each family module (vit.py, cvt.py, convmixer.py, resnet.py, hybrid.py) calls
`register_family(family, builder, variants)` at import time, where `variants` maps a
canonical name (``vit_b16``) to the keyword arguments of `builder` that define it, plus
optional aliases (the papers' spellings, ``ViT-B/16``). `create_model` looks a name up,
merges user overrides on top of the variant's config, validates the keys against the
builder's signature, and calls the builder.
"""
from __future__ import annotations

import inspect
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    builder: Callable[..., nn.Module]
    config: dict[str, Any]
    aliases: tuple[str, ...] = ()
    description: str = ""
    default_img_size: int = 224
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}

# The modules that register families, imported on the first lookup (not when the package is
# imported: `vitlab --help` must not import torch).
FAMILY_MODULES = ("vit", "resnet", "hybrid", "cvt", "convmixer")
_families_loaded = False


def load_families() -> None:
    """Import every family module once, so lookups see every registered variant."""
    global _families_loaded
    if _families_loaded:
        return
    _families_loaded = True  # set first: a family module that looks a name up must not recurse
    import importlib

    for mod in FAMILY_MODULES:
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:  # pragma: no cover - only while a family is being written
            if e.name != f"{__package__}.{mod}":
                _families_loaded = False
                raise
        except BaseException:  # a broken family module: the next lookup tries again (and fails loudly)
            _families_loaded = False
            raise


def _norm(name: str) -> str:
    """Normalise a spelling: 'ViT-B/16' -> 'vitb16', 'vit_b16' -> 'vitb16'."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def register_family(family: str, builder: Callable[..., nn.Module], variants: dict[str, dict],
                    aliases: dict[str, str] | None = None, descriptions: dict[str, str] | None = None,
                    default_img_size: dict[str, int] | None = None) -> None:
    for name, cfg in variants.items():
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(
            name=name, family=family, builder=builder, config=dict(cfg),
            aliases=tuple(a for a, n in (aliases or {}).items() if n == name),
            description=(descriptions or {}).get(name, ""),
            default_img_size=(default_img_size or {}).get(name, 224),
        )
        _ALIASES[_norm(name)] = name
    for alias, name in (aliases or {}).items():
        _ALIASES[_norm(alias)] = name


def resolve_name(name: str) -> str:
    """Canonical name for a name or alias; ConfigError with close matches otherwise."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"the model name must be a non-empty string such as 'vit_b16', got {name!r}; "
                          f"run `vitlab models` for the list")
    load_families()
    if name in _REGISTRY:
        return name
    key = _norm(name)
    if key in _ALIASES:
        return _ALIASES[key]
    raise ConfigError(
        f"unknown model {name!r}.{did_you_mean(name, _REGISTRY)} "
        f"Run `vitlab models` for the full list."
    )


def get_spec(name: str) -> ModelSpec:
    return _REGISTRY[resolve_name(name)]


def list_models(family: str | None = None) -> list[str]:
    """Canonical names of every registered variant (optionally of one family)."""
    load_families()
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def builder_params(builder: Callable[..., nn.Module]) -> list[str]:
    sig = inspect.signature(builder)
    return [p for p in sig.parameters if p not in ("self", "args", "kwargs")]


def create_model(name: str, num_classes: int = 1000, img_size: int | tuple[int, int] | None = None,
                 in_chans: int = 3, **overrides) -> nn.Module:
    """Build a named variant.

    `overrides` replace any of the variant's constructor arguments (e.g.
    ``global_pool="avg"``, ``pos_embed="sincos_2d"``, ``drop_path_rate=0.1``). Unknown keys
    raise a ConfigError naming the key and the closest valid ones.
    """
    spec = get_spec(name)
    valid = builder_params(spec.builder)
    for key in overrides:
        if key not in valid:
            raise ConfigError(
                f"model {spec.name!r} has no option {key!r}.{did_you_mean(key, valid)} "
                f"Valid options: {', '.join(sorted(valid))}."
            )
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ConfigError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ConfigError(f"in_chans must be a positive integer, got {in_chans!r}")
    sizes = img_size if isinstance(img_size, (tuple, list)) else (img_size,)
    if img_size is not None and not (len(sizes) in (1, 2) and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in sizes)):
        raise ConfigError(f"img_size must be a positive integer or (height, width), got {img_size!r}; "
                          f"e.g. img_size={spec.default_img_size}")
    cfg = {**spec.config, **overrides}
    cfg.update(num_classes=num_classes, in_chans=in_chans,
               img_size=spec.default_img_size if img_size is None else img_size)
    model = spec.builder(**cfg)
    model.variant_name = spec.name  # recorded in checkpoints, reports and benchmarks
    model.variant_config = {k: v for k, v in cfg.items()}
    return model


# ----------------------------------------------------------------------------- published weights
# Weights others published, as data: a tag `<vitlab variant>.<origin>` names the Hub repository
# and file, the layout, and the preprocessing the weights were trained with. That preprocessing
# follows the weights into fine-tuning (recorded with the run, used by eval and predict).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PublishedWeights:
    tag: str
    model: str                    # vitlab variant the weights fit
    repo_id: str                  # Hugging Face Hub repository
    filename: str                 # file in it (config.json beside it describes the layout)
    layout: str                   # 'timm' or 'hf'
    num_classes: int              # classifier size (0: backbone only)
    input_size: int
    mean: tuple[float, ...] = HALF
    std: tuple[float, ...] = HALF
    interpolation: str = "bicubic"
    crop_pct: float = 0.9
    description: str = ""

    def preprocessing(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "crop_pct": self.crop_pct, "input_size": self.input_size, "num_classes": self.num_classes,
                "weights": self.tag}


def _augreg(variant: str, timm_name: str, tag: str, classes: int, size: int = 224, crop: float = 0.9):
    return PublishedWeights(f"{variant}.{tag}", variant, f"timm/{timm_name}.{tag}", "model.safetensors", "timm",
                            classes, size, crop_pct=crop,
                            description=f"AugReg ({'ImageNet-21k' if classes == 21843 else 'ImageNet-1k'}), timm")


PUBLISHED: dict[str, PublishedWeights] = {w.tag: w for w in (
    _augreg("vit_ti16", "vit_tiny_patch16_224", "augreg_in21k", 21843),
    _augreg("vit_s16", "vit_small_patch16_224", "augreg_in21k", 21843),
    _augreg("vit_s32", "vit_small_patch32_224", "augreg_in21k", 21843),
    _augreg("vit_b16", "vit_base_patch16_224", "augreg_in21k", 21843),
    _augreg("vit_b32", "vit_base_patch32_224", "augreg_in21k", 21843),
    _augreg("vit_l16", "vit_large_patch16_224", "augreg_in21k", 21843),
    _augreg("vit_b16", "vit_base_patch16_224", "augreg2_in21k_ft_in1k", 1000),
    _augreg("vit_s16", "vit_small_patch16_224", "augreg_in21k_ft_in1k", 1000),
    PublishedWeights("vit_b16.google_in21k", "vit_b16", "google/vit-base-patch16-224-in21k", "model.safetensors",
                     "hf", 0, 224, interpolation="bilinear", crop_pct=1.0,
                     description="the ViT paper's ImageNet-21k ViT-B/16 (Hugging Face ViTModel with pooler)"),
    PublishedWeights("vit_b16.google_in21k_ft_in1k", "vit_b16", "google/vit-base-patch16-224", "model.safetensors",
                     "hf", 1000, 224, interpolation="bilinear", crop_pct=1.0,
                     description="the ViT paper's ViT-B/16, ImageNet-21k then ImageNet-1k"),
    PublishedWeights("cvt_13.microsoft_in1k", "cvt_13", "microsoft/cvt-13", "model.safetensors", "hf", 1000, 224,
                     IMAGENET_MEAN, IMAGENET_STD, "bicubic", 0.875, description="CvT-13, ImageNet-1k"),
    PublishedWeights("convmixer_768_32.in1k", "convmixer_768_32", "timm/convmixer_768_32.in1k", "model.safetensors",
                     "timm", 1000, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 0.96,
                     description="ConvMixer-768/32, ImageNet-1k, timm"),
)}
