"""Where weights come from: one SOURCE string -> a vitlab model (or its state dict) and what was loaded.

A SOURCE is any of
- a vitlab run directory or checkpoint (`runs/NAME`, `.../checkpoints/step-*.safetensors`);
- a Hugging Face folder (`config.json` + `model.safetensors`; ViTForImageClassification, ViTModel,
  CvtForImageClassification, read through `transformers`);
- a timm folder (`config.json` with "architecture" + `model.safetensors`) or a timm `.safetensors` /
  `.pth` file (the architecture comes from `--model NAME`: timm files carry no config);
- an original Google `.npz` (vit_jax and big_vision ViT, including the MAP head): the architecture
  is read from the array names and shapes;
- a Hub id: `hf-hub:ORG/NAME` (any repo in one of the layouts above) or `timm/NAME.TAG`, fetched
  through `huggingface_hub` into its cache (HF_HUB_OFFLINE=1 reads only the cache);
- a published-weights tag of the registry (`vit_b16.augreg_in21k`, see `registry.PUBLISHED`).

`load_source` builds the model the source describes (for fine-tuning); `init_from_source` loads
a source into an already built model (`vitlab train init_from=SOURCE`), keeping the model's head
when the class count differs and resampling position embeddings, and says what it did.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
HF_CLASSES = ("ViTForImageClassification", "ViTModel", "CvtForImageClassification", "CvtModel")
TIMM_SIZES = {"tiny": "ti", "small": "s", "base": "b", "large": "l", "huge": "h"}


@dataclass
class Loaded:
    """A source resolved to weights in vitlab names, plus everything needed to rebuild its model."""
    state_dict: dict
    description: str                      # "Hugging Face ViTForImageClassification in /path"
    path: str                             # the file or folder read
    model_name: str | None = None         # registry variant to build (None: unknown, --model needed)
    model_kwargs: dict = field(default_factory=dict)
    num_classes: int = 0
    img_size: int | None = None
    in_chans: int = 3
    preprocessing: dict = field(default_factory=dict)  # mean, std, interpolation, crop_pct, input_size
    class_names: list | None = None
    model: nn.Module | None = None        # already built (Hugging Face conversions)


# ============================================================================ hub
def hub_cache_dir() -> str:
    """The Hub cache `huggingface_hub` uses, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.expanduser(os.path.join(home, "hub"))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_download(repo_id: str, revision: str | None = None, filename: str | None = None) -> Path:
    """A Hub repo's snapshot folder (config, safetensors and npz files only) or one file of it,
    from the local cache or the network. Offline (HF_HUB_OFFLINE=1) only the cache is read."""
    try:
        import huggingface_hub as hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise ConfigError(f"loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub: "
                          f"pip install huggingface_hub") from None
    cache, offline = hub_cache_dir(), hub_offline()
    where = f"{repo_id}" + (f" at revision {revision}" if revision else "")
    try:
        if filename:
            path = hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache, local_files_only=offline)
            return Path(path)
        path = hub.snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                     allow_patterns=["*.json", "*.safetensors", "*.npz"])
        return Path(path)
    except hub_errors.LocalEntryNotFoundError:
        if offline:
            raise CheckpointError(f"{where} is not in the local Hugging Face cache {cache} and HF_HUB_OFFLINE=1 "
                                  f"forbids downloading it; download it where there is network "
                                  f"(hf download {repo_id}{' --revision ' + revision if revision else ''}) into that cache, "
                                  f"or unset HF_HUB_OFFLINE") from None
        raise CheckpointError(f"cannot download {where} (no network?) and it is not in the local Hugging Face "
                              f"cache {cache}; connect, or download it into that cache elsewhere") from None
    except hub_errors.RevisionNotFoundError:
        raise CheckpointError(f"{repo_id} has no revision {revision!r}; pass an existing branch, tag or "
                              f"commit with --revision") from None
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError):
        raise CheckpointError(f"the Hub has no accessible repository {repo_id!r} (misspelt, private or gated; "
                              f"log in with `hf auth login` for private ones)") from None
    except hub_errors.EntryNotFoundError:
        raise CheckpointError(f"{repo_id} has no file {filename!r}") from None
    except (hub_errors.HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot fetch {where} from the Hub: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''} (cache: {cache})") from None


# ============================================================================ architecture from keys
def timm_name_to_vitlab(name: str) -> tuple[str, dict] | None:
    """timm's model name (e.g. 'vit_base_patch16_224.augreg_in21k') -> (vitlab variant, kwargs), or None."""
    base = name.split(".")[0]
    m = re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(?:clip_|gap_|siglip_)?(\d+)(?:_\w+)?", base)
    if m:
        size, patch, img = TIMM_SIZES[m.group(1)], int(m.group(2)), int(m.group(3))
        from .registry import list_models

        variant = f"vit_{size}{patch}"
        if variant not in list_models("vit"):
            variant, kw = "vit_b16", dict(patch_size=patch)
            from .vit import _SIZES

            w, d, h = _SIZES[size]
            kw.update(embed_dim=w, depth=d, num_heads=h)
            return variant, dict(kw, img_size=img)
        return variant, {"img_size": img}
    if re.fullmatch(r"convmixer_\d+_\d+", base):
        from .registry import list_models

        if base in list_models():
            return base, {}
    return None


def vit_kwargs_from_state_dict(sd: dict, num_heads: int | None) -> dict:
    """VisionTransformer arguments read from a state dict in vitlab names (timm/npz conversions).
    Everything is in the tensors' names and shapes except the number of heads (timm fuses q, k, v)."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        raise CheckpointError("the checkpoint has no patch embedding (patch_embed.proj.weight): not a ViT")
    embed_dim, in_chans, ph, pw = (int(s) for s in w.shape)
    depth = len({m.group(1) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    hidden = sd.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = hidden.shape[0] / embed_dim if hidden is not None else 4.0
    while hidden is not None and int(embed_dim * mlp_ratio) < hidden.shape[0]:
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)
    class_token = "cls_token" in sd
    fc_norm = "fc_norm.weight" in sd
    pool = "map" if "attn_pool.latent" in sd else ("token" if class_token and not fc_norm else "avg")
    kw = dict(embed_dim=embed_dim, depth=depth, patch_size=ph if ph == pw else (ph, pw), mlp_ratio=mlp_ratio,
              qkv_bias="blocks.0.attn.qkv.bias" in sd, class_token=class_token, global_pool=pool, fc_norm=fc_norm)
    if num_heads:
        kw["num_heads"] = int(num_heads)
    if "pre_logits.0.weight" in sd:
        kw.update(head="mlp_tanh", representation_size=int(sd["pre_logits.0.weight"].shape[0]))
    else:
        kw["head"] = "linear"
    pe = sd.get("pos_embed")
    img = None
    if pe is not None:
        n = pe.reshape(-1, pe.shape[-1]).shape[0] - int(class_token)
        side = math.isqrt(max(n, 0))
        img = side * ph if side * side == n else None
        kw["pos_embed"] = "learned"
    else:
        kw["pos_embed"] = "sincos_2d"  # big_vision's default when no table is stored
    return dict(kw, in_chans=in_chans, img_size=img,
                num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0)


def npz_num_heads(raw: dict) -> int | None:
    for k, v in raw.items():
        if re.search(r"MultiHeadDotProductAttention_\d/query/kernel$", k) and not k.startswith("MAPHead"):
            return int(v.shape[-2])
    return None


def registry_variant(family: str, kwargs: dict) -> tuple[str, dict]:
    """A registered variant whose defining fields equal `kwargs` (else the family's first with
    overrides) and the model_kwargs that rebuild the model through create_model."""
    from .registry import get_spec, list_models

    names = list_models(family)
    # the variant agreeing on the most defining fields (exact when all agree); the rest are overrides
    def agree(name):
        return sum(kwargs.get(k) == v for k, v in get_spec(name).config.items())

    name = max(names, key=agree)
    cfg = get_spec(name).config
    return name, {k: v for k, v in kwargs.items() if k not in cfg or cfg[k] != v}


# ============================================================================ reading a source
def _is_vitlab_checkpoint(p: Path) -> bool:
    if p.is_dir():
        return (p / "checkpoints").is_dir() or (p / "last.json").is_file()
    if p.suffix == ".safetensors" and p.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(p), "pt") as f:
                return bool((f.metadata() or {}).get("vitlab")) or "config" in (f.metadata() or {})
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the loader that follows
            return False
    return p.name == "last.json"


def _weights_in(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.npz")) + sorted(folder.glob("*.pth"))
    if len(found) == 1:
        return found[0]
    raise CheckpointError(f"{folder} has no weights file (model.safetensors, pytorch_model.bin, or one "
                          f".safetensors/.npz/.pth); pass the file itself" if not found else
                          f"{folder} has several weight files ({', '.join(f.name for f in found[:5])}); pass one")


def _read_hf_folder(folder: Path, cfg: dict) -> Loaded:
    arch = (cfg.get("architectures") or [None])[0] or {"vit": "ViTModel", "cvt": "CvtModel"}.get(cfg.get("model_type"))
    if arch not in HF_CLASSES:
        raise CheckpointError(f"{folder}/config.json describes a {arch or cfg.get('model_type')!r}; vitlab reads "
                              f"Hugging Face {', '.join(HF_CLASSES)} folders")
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"reading the Hugging Face folder {folder} needs transformers: pip install transformers") \
            from None
    from .convert import from_transformers

    transformers.utils.logging.disable_progress_bar()  # one weights file: a bar is only noise
    hf = getattr(transformers, arch).from_pretrained(str(folder))
    model = from_transformers(hf)
    pre = {}
    pp = folder / "preprocessor_config.json"
    if pp.is_file():
        p = json.loads(pp.read_text())
        size = p.get("size") or {}
        pre = {k: v for k, v in dict(
            mean=p.get("image_mean"), std=p.get("image_std"),
            interpolation={2: "bilinear", 3: "bicubic", 0: "nearest"}.get(p.get("resample"), p.get("resample")),
            crop_pct=p.get("crop_pct"),
            input_size=size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size).items()
            if v is not None}
    labels = cfg.get("id2label")
    names = [labels[str(i)] for i in range(len(labels))] if labels and arch.endswith("Classification") else None
    family = "cvt" if arch.startswith("Cvt") else "vit"
    kwargs = {k: v for k, v in model.variant_config.items() if k not in ("num_classes", "img_size", "in_chans")} \
        if family == "vit" else _cvt_kwargs(hf)
    name, mk = registry_variant(family, kwargs)
    img = model.img_size[0] if family == "vit" else int(getattr(hf.config, "image_size", 224) or 224)
    return Loaded(state_dict=model.state_dict(), description=f"Hugging Face {arch} in {folder}", path=str(folder),
                  model_name=name, model_kwargs=mk, num_classes=int(getattr(model, "num_classes", 0) or 0),
                  img_size=img, in_chans=int(hf.config.num_channels), preprocessing=pre, class_names=names,
                  model=model)


def _cvt_kwargs(hf) -> dict:
    from .cvt import hf_cvt_config

    kw = hf_cvt_config(hf.config)
    kw.pop("in_chans", None)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}


def _timm_pretrained_cfg(cfg: dict) -> dict:
    pc = cfg.get("pretrained_cfg") or {}
    size = pc.get("input_size")
    return {k: v for k, v in dict(mean=pc.get("mean"), std=pc.get("std"), interpolation=pc.get("interpolation"),
                                  crop_pct=pc.get("crop_pct"), input_size=size[-1] if size else None).items()
            if v is not None}


def _from_tensors(raw: dict, path: Path, description: str, model_name: str | None, heads: int | None = None,
                  preprocessing: dict | None = None, name_kwargs: dict | None = None) -> Loaded:
    """A Loaded from a raw timm/npz/vitlab state dict; the architecture from the keys (+ model_name)."""
    from .convert import to_vitlab_state_dict
    from .registry import get_spec

    sd, fmt = to_vitlab_state_dict(raw)
    spec = get_spec(model_name) if model_name else None
    if "stem.root.0.weight" in sd and "patch_embed.proj.weight" in sd:
        return _hybrid(sd, fmt, path, description, heads, preprocessing)
    if fmt == "npz (BiT ResNet)" and spec is None:
        return _bit(sd, fmt, path, description, preprocessing)
    if "patch_embed.proj.weight" in sd and (spec is None or spec.family == "vit"):
        heads = heads or (spec.config.get("num_heads") if spec else None) or (name_kwargs or {}).get("num_heads")
        if heads is None:
            raise ConfigError(f"cannot tell the architecture of {path}: a {fmt} checkpoint does not record the "
                              f"number of attention heads; pass --model NAME (a vitlab variant such as vit_b16, or "
                              f"timm's name such as vit_base_patch16_224)")
        kw = vit_kwargs_from_state_dict(sd, heads)
        num_classes, img, in_chans = kw.pop("num_classes"), kw.pop("img_size"), kw.pop("in_chans")
        img = img or (name_kwargs or {}).get("img_size") or (spec.default_img_size if spec else 224)
        name, mk = registry_variant("vit", kw)
        return Loaded(sd, f"{description} ({fmt} layout)", str(path), name, mk, num_classes, img, in_chans,
                      dict(preprocessing or {}))
    if spec is None:
        raise ConfigError(f"cannot tell the architecture of {path} ({fmt} layout, no config): pass --model NAME "
                          f"(see `vitlab models`)")
    # other families: the named variant, with the class count and channels of the checkpoint
    head = sd.get("head.weight")
    first = next((v for k, v in sd.items() if v.ndim == 4), None)
    return Loaded(sd, f"{description} ({fmt} layout)", str(path), spec.name, {},
                  int(head.shape[0]) if head is not None else 0,
                  (name_kwargs or {}).get("img_size") or spec.default_img_size,
                  int(first.shape[1]) if first is not None else 3, dict(preprocessing or {}))


def _stage_layers(sd: dict, prefix: str) -> tuple[int, ...]:
    units: dict[int, set] = {}
    for k in sd:
        m = re.match(re.escape(prefix) + r"(\d+)\.(\d+)\.", k)
        if m:
            units.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return tuple(len(units[i]) for i in sorted(units))


def _hybrid(sd, fmt, path, description, heads, preprocessing) -> Loaded:
    """ResNet stem + ViT (vit_jax R50+ViT): the stem is one of vitlab's named hybrid stems."""
    from .resnet import HYBRID_STEMS

    layers = _stage_layers(sd, "stem.stages.")
    width, in_chans, k = (int(s) for s in sd["stem.root.0.weight"].shape[:3])
    stem = next((n for n, c in HYBRID_STEMS.items() if tuple(c["layers"]) == layers and c["width"] == width
                 and (c["root"] == "same") == (k == 7)), None)
    if stem is None:
        raise CheckpointError(f"{path}: the hybrid's ResNet (stages {layers}, width {width}, {k}x{k} root) is none "
                              f"of vitlab's hybrid stems ({', '.join(HYBRID_STEMS)})")
    if heads is None:
        raise ConfigError(f"cannot tell the number of attention heads of {path}; pass --model NAME")
    vit_sd = {k: v for k, v in sd.items() if not k.startswith("stem.")}
    kw = vit_kwargs_from_state_dict(vit_sd, heads)
    num_classes, img = kw.pop("num_classes"), kw.pop("img_size")
    kw.pop("in_chans")
    cfg = HYBRID_STEMS[stem]
    stride = (4 if cfg["root"] == "same" else 1) * cfg["first_stride"] * 2 ** (len(cfg["layers"]) - 1)
    grid = img // kw["patch_size"] if img else None
    img_px = grid * kw["patch_size"] * stride if grid else 224
    name, mk = registry_variant("hybrid", dict(kw, hybrid_stem=stem))
    return Loaded(sd, f"{description} ({fmt} layout, hybrid {stem})", str(path), name, mk, num_classes, img_px,
                  in_chans, dict(preprocessing or {}))


def _bit(sd, fmt, path, description, preprocessing) -> Loaded:
    layers = _stage_layers(sd, "stages.")
    width = int(sd["stem.0.weight"].shape[0])
    kw = dict(layers=layers, width_factor=width / 64 if width % 64 else width // 64, block="bottleneck",
              stem="fixed")
    name, mk = registry_variant("resnet", kw)
    head = sd.get("head.weight")
    return Loaded(sd, f"{description} ({fmt} layout)", str(path), name, mk,
                  int(head.shape[0]) if head is not None else 0, 224, int(sd["stem.0.weight"].shape[1]),
                  dict(preprocessing or {}))


def read_source(source: str, model_name: str | None = None, revision: str | None = None) -> Loaded:
    """Resolve SOURCE (see the module docstring) to weights in vitlab names and a model description.
    vitlab runs are not handled here (load them with vitlab.train.load_model)."""
    from .registry import PUBLISHED

    source = str(source)
    preprocessing: dict = {}
    tag = PUBLISHED.get(source)
    if tag is not None:
        path = hub_download(tag.repo_id, revision)  # the folder: config.json says the layout
        preprocessing = tag.preprocessing()
        model_name = model_name or tag.model
    elif source.startswith("hf-hub:"):
        path = hub_download(source[len("hf-hub:"):], revision)
    elif source.startswith("timm/") and not Path(source).exists():
        path = hub_download(source, revision)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            from .registry import PUBLISHED as pub
            from ..errors import did_you_mean

            hint = did_you_mean(source, list(pub)) if "." in source else ""
            raise CheckpointError(f"weights {source!r} not found: not a file or folder, not a Hub id "
                                  f"(hf-hub:ORG/NAME, timm/NAME.TAG) and not a published tag.{hint} "
                                  f"Published tags: {', '.join(pub)}")
    if path.is_file() and path.suffix in (".safetensors", ".bin") and (path.parent / "config.json").is_file():
        path = path.parent  # a Hugging Face / timm weights file: its config.json beside it says the architecture
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path} is neither a vitlab run (no checkpoints/) nor a Hugging Face/timm folder "
                                  f"(no config.json); pass a run directory, a model folder or a weights file")
        cfg = json.loads(cfg_file.read_text())
        if "architecture" in cfg:  # timm's hub layout
            named = timm_name_to_vitlab(cfg["architecture"])
            if named is None and model_name is None:
                raise ConfigError(f"{path}: timm architecture {cfg['architecture']!r} has no vitlab equivalent "
                                  f"that vitlab recognises; pass --model NAME")
            name, nk = (model_name, {}) if model_name else named
            from .convert import read_checkpoint

            pre = {**_timm_pretrained_cfg(cfg), **preprocessing}
            return _from_tensors(read_checkpoint(_weights_in(path)), path, f"timm {cfg['architecture']} in {path}",
                                 name, preprocessing=pre, name_kwargs=nk)
        loaded = _read_hf_folder(path, cfg)
        loaded.preprocessing = {**loaded.preprocessing, **preprocessing}
        return loaded
    # a single file: its layout from the keys
    from .convert import read_checkpoint

    raw = read_checkpoint(path)
    nk = None
    if model_name and not _known(model_name):
        named = timm_name_to_vitlab(model_name)
        if named is None:
            from .registry import resolve_name

            resolve_name(model_name)  # raises the usual unknown-model error
        model_name, nk = named
    if path.suffix == ".npz":
        kind = "Google .npz"
        return _from_tensors(raw, path, f"{kind} {path}", model_name, heads=npz_num_heads(raw),
                             preprocessing=preprocessing or {"mean": [0.5] * 3, "std": [0.5] * 3}, name_kwargs=nk)
    return _from_tensors(raw, path, f"{path}", model_name, preprocessing=preprocessing, name_kwargs=nk)


def _known(name: str) -> bool:
    from .registry import resolve_name

    try:
        resolve_name(name)
        return True
    except ConfigError:
        return False


# ============================================================================ building / loading
def build_model(loaded: Loaded) -> nn.Module:
    """The model a Loaded describes, with its weights (strict: every tensor must land)."""
    from .convert import _load_checked
    from .registry import create_model

    if loaded.model is not None:
        return loaded.model
    model = create_model(loaded.model_name, num_classes=loaded.num_classes, img_size=loaded.img_size,
                         in_chans=loaded.in_chans, **loaded.model_kwargs)
    _load_checked(model, loaded.state_dict, loaded.description, strict=True)
    return model


def load_source(source, *, model_name: str | None = None, revision: str | None = None, which: str = "last",
                ema: bool | None = None) -> tuple[nn.Module, dict]:
    """(model in eval mode, info) for any SOURCE; info has the keys of vitlab.train.load_model's
    (config, class_names, mean, std, img_size, in_chans, num_classes, checkpoint, run_dir, ...)
    plus 'source' (what was read) and 'preprocessing' (the published weights' own, if any)."""
    p = Path(str(source)).expanduser()
    if p.exists() and _is_vitlab_checkpoint(p):
        from ..train.checkpoint import load_model

        model, info = load_model(p, which=which, ema=ema)
        info.update(source=f"vitlab checkpoint {info['checkpoint']}", preprocessing={})
        return model, info
    loaded = read_source(str(source), model_name, revision)
    model = build_model(loaded).eval()
    pre = loaded.preprocessing
    cfg = {"model": loaded.model_name, "model_kwargs": loaded.model_kwargs, "img_size": loaded.img_size,
           "num_classes": loaded.num_classes, "in_chans": loaded.in_chans}
    info = {"config": cfg, "class_names": loaded.class_names, "mean": tuple(pre.get("mean") or ()),
            "std": tuple(pre.get("std") or ()), "img_size": loaded.img_size, "in_chans": loaded.in_chans,
            "num_classes": loaded.num_classes, "step": None, "epoch": None, "ema": False,
            "checkpoint": str(source), "run_dir": None, "source": loaded.description, "preprocessing": pre}
    return model, info


def _grid(n: int) -> str:
    s = math.isqrt(n)
    return f"{s}x{s}" if s * s == n else f"{n} positions"


def read_init_source(source, model_name: str | None = None, revision: str | None = None) -> Loaded | None:
    """SOURCE read for `vitlab train init_from=SOURCE` before the run builds its model (its
    preprocessing decides how the data is decoded); None for a vitlab run or checkpoint, which
    init_from_source reads itself."""
    p = Path(str(source)).expanduser()
    if p.exists() and _is_vitlab_checkpoint(p):
        return None
    return read_source(str(source), model_name if model_name and _known(str(model_name)) else None, revision)


def init_from_source(model: nn.Module, source, revision: str | None = None, loaded: Loaded | None = None) -> list[str]:
    """Load SOURCE's weights into `model` (in place) for `vitlab train init_from=SOURCE`.

    Every backbone tensor must land (else one CheckpointError listing the differences); the
    classifier (and the pre-logits layer) is kept as the model built it when the source's
    differs; learned position embeddings are resampled to the model's grid. Returns log lines
    saying what was loaded, re-initialised and resampled."""
    from .convert import _mismatch_message
    from .vit import VisionTransformer, resample_state_dict

    p = Path(str(source)).expanduser()
    if p.exists() and _is_vitlab_checkpoint(p):
        from ..train.checkpoint import read_weights, resolve_checkpoint, split_ema

        found = resolve_checkpoint(p)
        tensors, _ = read_weights(found["weights"])
        weights, ema_w = split_ema(tensors)
        sd, what = (ema_w if ema_w is not None else weights), f"vitlab checkpoint {found['weights']}"
    else:
        if loaded is None:
            model_name = getattr(model, "variant_name", None)
            loaded = read_source(str(source), model_name if _known(str(model_name)) else None, revision)
        sd, what = loaded.state_dict, loaded.description
    sd = {k: v for k, v in sd.items()}
    own = model.state_dict()
    notes = []
    if isinstance(model, VisionTransformer) and "pos_embed" in sd and model.pos_embed is not None:
        before = tuple(sd["pos_embed"].shape)
        sd = resample_state_dict(model, sd)
        if tuple(sd["pos_embed"].shape) != before:
            p0 = model.num_prefix_tokens
            notes.append(f"position embeddings resampled {_grid(before[1] - p0)} -> "
                         f"{model.grid_size[0]}x{model.grid_size[1]}")
    head_keys = [k for k in own if k.startswith(("head.", "pre_logits."))]
    reinit = [k for k in head_keys if k not in sd or tuple(sd[k].shape) != tuple(own[k].shape)]
    dropped = [k for k in sd if k.startswith(("head.", "pre_logits.")) and (k not in own or k in reinit)]
    for k in dropped:
        sd.pop(k)
    missing = [k for k in own if k not in sd and k not in reinit]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise CheckpointError("init_from: " + _mismatch_message(what, model, sd, own, missing, unexpected, mismatched))
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))
    notes.insert(0, f"init_from: loaded {len(sd)} tensors from {what}")
    if reinit:
        notes.append(f"re-initialised {', '.join(reinit)} (the source's classifier does not fit "
                     f"{getattr(model, 'num_classes', '?')} classes)")
    if [k for k in dropped if k not in own]:
        notes.append(f"not used: {', '.join(k for k in dropped if k not in own)} (the source's head)")
    return notes
