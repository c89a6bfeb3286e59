"""Weights made by others, in vitlab models.

`from_transformers(hf_model)` turns a Hugging Face ViT (or, through the CvT module, a CvT)
into the equivalent vitlab model; `load_weights(model, path)` reads a checkpoint file in
any of the layouts ViT weights are published in:

- vitlab's own state dicts (identity), in `.safetensors` or `.pth/.pt/.bin/.ckpt`;
- timm's key layout (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.{norm1,
  attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, `head`, `pre_logits.fc`), which
  is vitlab's except for the representation layer's name;
- Hugging Face's ViT layout (`vit.embeddings...`, a `model.safetensors` from the hub);
- the original Google `.npz` files (vit_jax and big_vision names, Flax kernels).

The mappings are written from the formats' documented parameter names; neither timm nor
JAX is needed. Learned position embeddings at another grid are resampled in 2D.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, did_you_mean

SUPPORTED_HF_CLASSES = ("ViTForImageClassification", "ViTModel", "CvtForImageClassification", "CvtModel")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SUFFIXES = (".safetensors",) + TORCH_SUFFIXES + (".npz",)

# Options of the converted ViT that do not change its function (or that the user asks to change).
_HF_OVERRIDES = ("global_pool", "dynamic_img_size", "img_size", "drop_rate", "pos_drop_rate", "attn_drop_rate",
                 "drop_path_rate")


# ============================================================================ Hugging Face
def from_transformers(hf_model: nn.Module, **overrides) -> nn.Module:
    """The vitlab model equivalent to a Hugging Face model, with its weights.

    Supported: `ViTForImageClassification`, `ViTModel` (its pooler, dense + tanh on the
    class token, becomes vitlab's `mlp_tanh` pre-logits head with no classifier, so
    `model(x)` is HF's `pooler_output`; without a pooler `model(x)` is the normalised class
    token), and `CvtForImageClassification` / `CvtModel` (handed to
    `vitlab.models.cvt.convert_hf_cvt`).

    `overrides` (ViT only) change options that HF lacks: `global_pool='avg'` (mean of the
    normalised patch tokens instead of the class token), `dynamic_img_size=True`,
    `img_size` (position embeddings resampled), dropout and stochastic-depth rates (with a
    ViTModel's pooler and 'avg', the pooler's dense + tanh acts on the mean). The returned model is in eval mode on the HF model's device and dtype.
    """
    cls_name = type(hf_model).__name__
    if cls_name in ("CvtForImageClassification", "CvtModel"):
        try:
            from .cvt import convert_hf_cvt
        except ImportError as e:
            raise ConfigError(f"converting {cls_name} needs vitlab.models.cvt.convert_hf_cvt, which this install "
                              f"does not have ({e}); update vitlab") from e
        model = convert_hf_cvt(hf_model, **overrides) if overrides else convert_hf_cvt(hf_model)
        return model.eval()  # like the ViT path: batch norm must use its running statistics
    if cls_name not in ("ViTForImageClassification", "ViTModel"):
        raise ConfigError(f"cannot convert a {cls_name}: from_transformers supports "
                          f"{', '.join(SUPPORTED_HF_CLASSES)}.{did_you_mean(cls_name, SUPPORTED_HF_CLASSES)} "
                          f"Load the checkpoint into one of those classes first.")
    cfg = hf_model.config
    if getattr(cfg, "model_type", "vit") != "vit":
        raise ConfigError(f"{cls_name} has model_type={cfg.model_type!r}; only plain ViT ('vit') configs convert")
    for key in overrides:
        if key not in _HF_OVERRIDES:
            raise ConfigError(f"from_transformers has no option {key!r}.{did_you_mean(key, _HF_OVERRIDES)} "
                              f"Options that keep the converted weights meaningful: {', '.join(_HF_OVERRIDES)}.")

    if cls_name == "ViTForImageClassification":
        sd_prefix, pooler = "vit.", None
        num_classes = cfg.num_labels if isinstance(hf_model.classifier, nn.Linear) else 0
    else:
        sd_prefix, num_classes = "", 0
        pooler = getattr(hf_model, "pooler", None)
    kwargs = vit_kwargs_from_hf_config(cfg, num_classes=num_classes, pooler=pooler is not None)
    img_size = overrides.pop("img_size", None)
    kwargs.update(overrides)

    from .vit import VisionTransformer

    param = next(hf_model.parameters())
    model = VisionTransformer(**kwargs)
    sd = hf_vit_to_vitlab(dict(hf_model.state_dict()), strip=sd_prefix)
    _load_checked(model, sd, f"the {cls_name}", strict=True)
    if img_size is not None:
        model.set_input_size(img_size)
    model.variant_name = f"hf:{getattr(cfg, '_name_or_path', '') or 'vit'}"
    model.variant_config = dict(kwargs, img_size=model.img_size)
    return model.to(device=param.device, dtype=param.dtype).eval()


def vit_kwargs_from_hf_config(cfg, num_classes: int, pooler: bool = False) -> dict:
    """VisionTransformer constructor arguments equivalent to a HF `ViTConfig`."""
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    act = getattr(cfg, "hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"HF hidden_act={act!r} has no vitlab equivalent: vitlab's ViT uses the exact (erf) GELU "
                          f"of the paper ('gelu')")
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is not None and head_dim * heads != hidden:
        raise ConfigError(f"HF head_dim={head_dim} x {heads} heads != hidden_size={hidden}; vitlab's attention "
                          f"splits the width evenly across heads")
    inter = cfg.intermediate_size
    mlp_ratio = inter / hidden
    while int(hidden * mlp_ratio) < inter:  # guard float round-off so int(D * ratio) == intermediate_size
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)
    img = cfg.image_size
    patch = cfg.patch_size
    kwargs = dict(
        img_size=tuple(img) if isinstance(img, (list, tuple)) else img,
        patch_size=tuple(patch) if isinstance(patch, (list, tuple)) else patch,
        in_chans=cfg.num_channels, num_classes=num_classes, embed_dim=hidden, depth=cfg.num_hidden_layers,
        num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=bool(getattr(cfg, "qkv_bias", True)),
        global_pool="token", class_token=True, pos_embed="learned", norm_eps=cfg.layer_norm_eps,
        drop_rate=float(cfg.hidden_dropout_prob), pos_drop_rate=float(cfg.hidden_dropout_prob),
        attn_drop_rate=float(cfg.attention_probs_dropout_prob),
    )
    if pooler:
        if getattr(cfg, "pooler_act", "tanh") != "tanh":
            raise ConfigError(f"HF pooler_act={cfg.pooler_act!r}: vitlab's pre-logits head is tanh; load the "
                              f"ViTModel with add_pooling_layer=False")
        kwargs.update(head="mlp_tanh", representation_size=getattr(cfg, "pooler_output_size", None) or hidden)
    return kwargs


# HF block parameter names: transformers >= 5 (first) and 4.x (second) spell them differently.
_HF_BLOCK_NAMES = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "q": ("attention.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "attention.attention.value"),
    "attn.proj": ("attention.o_proj", "attention.output.dense"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "mlp.fc1": ("mlp.fc1", "intermediate.dense"),
    "mlp.fc2": ("mlp.fc2", "output.dense"),
}


def hf_vit_to_vitlab(sd: dict, strip: str = "") -> dict:
    """A HF ViT state dict (ViTModel or ViTForImageClassification names) in vitlab names.
    HF's separate query/key/value projections are fused into one qkv projection in that
    order (vitlab splits qkv as [q; k; v] along the output dimension). Keys that do not
    belong to a ViT (and the unused mask token) are passed through, to be reported."""
    if strip:
        sd = {k[len(strip):] if k.startswith(strip) else k: v for k, v in sd.items()}
    out, used = {}, set()

    def take(key):
        used.add(key)
        return sd[key]

    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
        "pooler.dense.weight": "pre_logits.0.weight", "pooler.dense.bias": "pre_logits.0.bias",
        "classifier.weight": "head.weight", "classifier.bias": "head.bias",
    }
    for src, dst in simple.items():
        if src in sd:
            out[dst] = take(src)
    used.add("embeddings.mask_token")  # masked-image-modelling only; not part of the classifier's function
    blocks = sorted({int(m.group(2)) for k in sd for m in [re.match(r"(layers|encoder\.layer)\.(\d+)\.", k)] if m})
    for i in blocks:
        new = f"layers.{i}." if any(k.startswith(f"layers.{i}.") for k in sd) else None
        pre, names = (new, 0) if new else (f"encoder.layer.{i}.", 1)
        get = {ours: pre + hf[names] for ours, hf in _HF_BLOCK_NAMES.items()}
        for ours in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                if f"{get[ours]}.{p}" in sd:
                    out[f"blocks.{i}.{ours}.{p}"] = take(f"{get[ours]}.{p}")
        if all(f"{get[n]}.weight" in sd for n in "qkv"):
            out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([take(f"{get[n]}.weight") for n in "qkv"], 0)
        if all(f"{get[n]}.bias" in sd for n in "qkv"):
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(f"{get[n]}.bias") for n in "qkv"], 0)
    for k, v in sd.items():  # anything left is reported as unexpected, under its own name
        if k not in used:
            out[k] = v
    return out


# ============================================================================ checkpoint files
@dataclass
class LoadResult:
    """What `load_weights` did: the layout it recognised, the keys it could not use
    (only non-empty with strict=False) and the position tables it resampled."""
    format: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)


def load_weights(model: nn.Module, path, strict: bool = True) -> LoadResult:
    """Load a checkpoint file into `model` (in place) and say what was loaded.

    Reads `.safetensors`, `.pth/.pt/.bin/.ckpt` (`torch.load(weights_only=True)`; a dict
    holding the state dict under 'state_dict', 'model', 'model_state_dict' or 'module' is
    unwrapped, a 'module.' prefix stripped) and `.npz`. The layout (vitlab, timm, Hugging
    Face, vit_jax/big_vision npz) is recognised from the key names. Learned position
    embeddings at another (square) grid are resampled to the model's grid.

    strict=True: any missing or unexpected key or shape mismatch raises a CheckpointError
    listing them all. strict=False: the matching tensors are loaded, the rest reported in
    the returned LoadResult (e.g. a classifier for another number of classes).
    """
    path = Path(path)
    raw = read_checkpoint(path)
    sd, fmt = to_vitlab_state_dict(raw, model)
    return _load_checked(model, sd, f"checkpoint {path} ({fmt} layout)", strict, fmt)


def read_checkpoint(path) -> dict:
    """The raw name -> tensor (or numpy array) mapping stored in a checkpoint file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise CheckpointError(f"cannot read {path}: unknown checkpoint type {suffix or '(no suffix)'!r}; "
                              f"vitlab reads {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file); check the path")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                obj = {k: f[k] for k in f.files}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file raises SafetensorError, UnpicklingError, BadZipFile, ...
        detail = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {detail}"
                              f" - the file is corrupt, truncated or not a {suffix} checkpoint; re-download or "
                              f"re-save it") from e
    return _unwrap(obj, path)


def _unwrap(obj, path) -> dict:
    for _ in range(3):  # training checkpoints nest the weights one or two levels deep
        if isinstance(obj, dict) and obj and not all(_is_array(v) for v in obj.values()):
            for key in ("state_dict", "model", "model_state_dict", "module", "params"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"checkpoint {path} holds no state dict (found {type(obj).__name__}); save "
                              f"model.state_dict() or a dict with it under 'state_dict' or 'model'")
    tensors = {k: v for k, v in obj.items() if _is_array(v)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors (keys: {', '.join(list(map(str, obj))[:8])}); "
                              f"save model.state_dict()")
    if all(k.startswith("module.") for k in tensors):  # saved from DataParallel / DDP
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _is_array(v) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray))


def to_vitlab_state_dict(raw: dict, model: nn.Module | None = None) -> tuple[dict, str]:
    """Convert a raw checkpoint mapping to vitlab names; returns (state_dict, layout name)."""
    keys = list(raw)
    if any(k.endswith("root_block/standardized_conv2d/kernel") for k in keys):
        return npz_bit_to_vitlab(raw), "npz (BiT ResNet)"
    if any(k.endswith("embedding/kernel") for k in keys):
        sd, fmt = npz_vit_to_vitlab(raw, model)
        return sd, fmt
    sd = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in raw.items()}
    if any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in keys):
        return hf_vit_to_vitlab(sd, strip="vit." if any(k.startswith("vit.") for k in keys) else ""), "Hugging Face"
    if any(re.match(r"blocks\.\d+\.0\.fn\.0\.weight$", k) for k in keys) and "stem.0.weight" in keys:
        return timm_convmixer_to_vitlab(sd), "timm ConvMixer"
    if any(k.startswith("pre_logits.fc.") for k in keys) or "fc_norm.weight" in keys:
        return {re.sub(r"^pre_logits\.fc\.", "pre_logits.0.", k): v for k, v in sd.items()}, "timm"
    return sd, "vitlab/timm"


# timm's ConvMixer is nn.Sequential-built: stem = (conv, act, BN); block = (Residual(fn=(dw conv, act,
# BN)), 1x1 conv, act, BN). The indices name the layers; activations hold no tensors.
_TIMM_CONVMIXER = ((r"^stem\.0\.", "patch_embed."), (r"^stem\.2\.", "patch_norm."),
                   (r"^blocks\.(\d+)\.0\.fn\.0\.", r"blocks.\1.dw."), (r"^blocks\.(\d+)\.0\.fn\.2\.", r"blocks.\1.dw_norm."),
                   (r"^blocks\.(\d+)\.1\.", r"blocks.\1.pw."), (r"^blocks\.(\d+)\.3\.", r"blocks.\1.pw_norm."))


def rename_keys(sd: dict, rules) -> dict:
    """`sd` with each key renamed by the first (regex, replacement) rule that matches it (others kept)."""
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            new, n = re.subn(pat, rep, k)
            if n:
                k = new
                break
        out[k] = v
    return out


def timm_convmixer_to_vitlab(sd: dict) -> dict:
    """timm's ConvMixer state dict (the paper authors' nn.Sequential layout) in vitlab names."""
    return rename_keys(sd, _TIMM_CONVMIXER)


def npz_vit_to_vitlab(arrays: dict, model: nn.Module | None = None) -> tuple[dict, str]:
    """Original Google ViT weights (Flax parameter names, '/'-separated) in vitlab names.

    vit_jax: `Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_1,
    LayerNorm_2, MlpBlock_3/Dense_{0,1}}`, `Transformer/posembed_input/pos_embedding` with a
    class-token entry; big_vision: `{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
    MlpBlock_0}`, `pos_embedding` at the root without one (the class token gets no position,
    i.e. a zero entry in vitlab's table), blocks possibly stacked along a leading depth axis
    (`Transformer/encoderblock/...`, from `nn.scan`). Flax kernels are (in, out): dense
    weights are transposed, the patch kernel HWIO -> OIHW, attention kernels
    (D, heads, head_dim) / (heads, head_dim, D) flattened over the heads.
    """
    anchor = next(k for k in arrays if k.endswith("embedding/kernel") and "posembed" not in k)
    prefix = anchor[: -len("embedding/kernel")]
    w = {k[len(prefix):]: np.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}
    unknown = {k: v for k, v in arrays.items() if not k.startswith(prefix)}
    big_vision = any("MultiHeadDotProductAttention_0" in k for k in w)
    mha, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision else \
        ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    used = set()

    def take(key):
        used.add(key)
        return torch.from_numpy(np.ascontiguousarray(w[key])).float()

    sd: dict[str, torch.Tensor] = {}
    if "embedding/kernel" in w:
        sd["patch_embed.proj.weight"] = take("embedding/kernel").permute(3, 2, 0, 1).contiguous()
    if "embedding/bias" in w:
        sd["patch_embed.proj.bias"] = take("embedding/bias")
    if "cls" in w:
        sd["cls_token"] = take("cls").reshape(1, 1, -1)
    if "Transformer/posembed_input/pos_embedding" in w:
        sd["pos_embed"] = take("Transformer/posembed_input/pos_embedding")
    elif "pos_embedding" in w:
        pe = take("pos_embedding")
        pe = pe.reshape(1, -1, pe.shape[-1])
        if "cls" in w and model is not None and getattr(model, "num_prefix_tokens", 0) == 1:
            pe = torch.cat([pe.new_zeros(1, 1, pe.shape[-1]), pe], dim=1)  # class token: no position
        sd["pos_embed"] = pe
    for src, dst in (("Transformer/encoder_norm", "norm"), ("pre_logits", "pre_logits.0"), ("head", "head")):
        if f"{src}/kernel" in w:
            sd[f"{dst}.weight"] = take(f"{src}/kernel").t().contiguous()
        for a, b in (("scale", "weight"), ("bias", "bias")):
            if f"{src}/{a}" in w:
                sd[f"{dst}.{b}"] = take(f"{src}/{a}")

    # big_vision's MAPHead: probe, MultiHeadDotProductAttention_0 (query; key+value -> kv), LayerNorm_0, MlpBlock_0
    mp = "MAPHead_0/"
    if f"{mp}probe" in w:
        sd["attn_pool.latent"] = take(f"{mp}probe").reshape(1, -1, take(f"{mp}probe").shape[-1])
        att = f"{mp}MultiHeadDotProductAttention_0/"
        if f"{att}query/kernel" in w:
            sd["attn_pool.q.weight"] = take(f"{att}query/kernel").flatten(1).t().contiguous()
            sd["attn_pool.kv.weight"] = torch.cat([take(f"{att}{n}/kernel").flatten(1).t() for n in ("key", "value")],
                                                  0).contiguous()
        if f"{att}query/bias" in w:
            sd["attn_pool.q.bias"] = take(f"{att}query/bias").reshape(-1)
            sd["attn_pool.kv.bias"] = torch.cat([take(f"{att}{n}/bias").reshape(-1) for n in ("key", "value")], 0)
        if f"{att}out/kernel" in w:
            ok = take(f"{att}out/kernel")
            sd["attn_pool.proj.weight"] = ok.reshape(-1, ok.shape[-1]).t().contiguous()
        if f"{att}out/bias" in w:
            sd["attn_pool.proj.bias"] = take(f"{att}out/bias")
        for a, b in (("scale", "weight"), ("bias", "bias")):
            if f"{mp}LayerNorm_0/{a}" in w:
                sd[f"attn_pool.norm.{b}"] = take(f"{mp}LayerNorm_0/{a}")
        for r, dst in ((0, "fc1"), (1, "fc2")):
            if f"{mp}MlpBlock_0/Dense_{r}/kernel" in w:
                sd[f"attn_pool.mlp.{dst}.weight"] = take(f"{mp}MlpBlock_0/Dense_{r}/kernel").t().contiguous()
            if f"{mp}MlpBlock_0/Dense_{r}/bias" in w:
                sd[f"attn_pool.mlp.{dst}.bias"] = take(f"{mp}MlpBlock_0/Dense_{r}/bias")

    # the hybrid's ResNet (vit_jax): conv_root, gn_root, block{i}/unit{j}/{conv,gn}{1,2,3}, conv_proj, gn_proj
    for k in list(w):
        if k.startswith(("conv_root/", "gn_root/")):
            dst = "stem.root.0.weight" if k == "conv_root/kernel" else \
                f"stem.root.1.{'weight' if k.endswith('scale') else 'bias'}"
            sd[dst] = _flax_to_torch(take(k))
            continue
        m = re.match(r"block(\d+)/unit(\d+)/(conv|gn)(\d|_proj)/(kernel|scale|bias)$", k)
        if m:
            stage, unit, kind, idx, leaf = int(m.group(1)) - 1, int(m.group(2)) - 1, m.group(3), m.group(4), m.group(5)
            base = f"stem.stages.{stage}.{unit}."
            if idx == "_proj":
                base += "downsample.0." if kind == "conv" else "downsample.1."
            else:
                base += f"conv{idx}." if kind == "conv" else f"norm{idx}."
            sd[base + ("bias" if leaf == "bias" else "weight")] = _flax_to_torch(take(k))

    # per-block parameters, from separate blocks or a stacked (scanned) set
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for k in list(w):
        m = re.match(r"Transformer/encoderblock_(\d+)/(.+)$", k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = take(k)
        elif k.startswith("Transformer/encoderblock/"):
            stacked = take(k)
            for i in range(stacked.shape[0]):
                blocks.setdefault(i, {})[k[len("Transformer/encoderblock/"):]] = stacked[i]
    for i, b in sorted(blocks.items()):
        bp = f"blocks.{i}."
        for src, dst in (("LayerNorm_0", "norm1"), (ln2, "norm2")):
            if f"{src}/scale" in b:
                sd[bp + dst + ".weight"] = b.pop(f"{src}/scale")
            if f"{src}/bias" in b:
                sd[bp + dst + ".bias"] = b.pop(f"{src}/bias")
        for r, dst in ((0, "mlp.fc1"), (1, "mlp.fc2")):
            if f"{mlp}/Dense_{r}/kernel" in b:
                sd[bp + dst + ".weight"] = b.pop(f"{mlp}/Dense_{r}/kernel").t().contiguous()
            if f"{mlp}/Dense_{r}/bias" in b:
                sd[bp + dst + ".bias"] = b.pop(f"{mlp}/Dense_{r}/bias")
        qkv = [f"{mha}/{n}" for n in ("query", "key", "value")]
        if all(f"{n}/kernel" in b for n in qkv):
            # (D, heads, head_dim) -> (D, heads*head_dim) -> torch (out, in); stacked [q; k; v]
            sd[bp + "attn.qkv.weight"] = torch.cat(
                [b.pop(f"{n}/kernel").flatten(1).t() for n in qkv], 0).contiguous()
        if all(f"{n}/bias" in b for n in qkv):
            sd[bp + "attn.qkv.bias"] = torch.cat([b.pop(f"{n}/bias").reshape(-1) for n in qkv], 0)
        if f"{mha}/out/kernel" in b:
            ok = b.pop(f"{mha}/out/kernel")  # (heads, head_dim, D) -> (heads*head_dim, D) -> (D, heads*head_dim)
            sd[bp + "attn.proj.weight"] = ok.reshape(-1, ok.shape[-1]).t().contiguous()
        if f"{mha}/out/bias" in b:
            sd[bp + "attn.proj.bias"] = b.pop(f"{mha}/out/bias")
        for rest, v in b.items():  # unknown block entries are reported under their npz names
            sd[f"Transformer/encoderblock_{i}/{rest}"] = v
    for k in w:
        if k not in used:
            sd[prefix + k] = torch.from_numpy(np.ascontiguousarray(w[k]))
    for k, v in unknown.items():
        sd[k] = torch.from_numpy(np.ascontiguousarray(v))
    return sd, "npz (big_vision)" if big_vision else "npz (vit_jax)"


def _flax_to_torch(t: torch.Tensor) -> torch.Tensor:
    """A Flax conv kernel (H, W, in, out) as torch's (out, in, H, W); norm parameters flattened."""
    return t.permute(3, 2, 0, 1).contiguous() if t.ndim == 4 else t.reshape(-1)


def npz_bit_to_vitlab(arrays: dict) -> dict:
    """Google's BiT ResNet .npz (big_transfer names under 'resnet/': root_block, block{i}/unit{jj}/
    {a,b,c}/{standardized_conv2d,group_norm}, a/proj, group_norm, head/conv2d) in the names of
    vitlab's pre-activation ResNetV2. Unknown arrays are passed through to be reported."""
    sd: dict[str, torch.Tensor] = {}
    for k, v in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(v)).float()
        rest = k.split("resnet/", 1)[1] if "resnet/" in k else k
        m = re.match(r"block(\d+)/unit(\d+)/([abc])/(proj/)?(standardized_conv2d/kernel|group_norm/(gamma|beta))$",
                     rest)
        if rest == "root_block/standardized_conv2d/kernel":
            sd["stem.0.weight"] = _flax_to_torch(t)
        elif rest in ("group_norm/gamma", "group_norm/beta"):
            sd["norm." + ("weight" if rest.endswith("gamma") else "bias")] = t.reshape(-1)
        elif rest == "head/conv2d/kernel":
            sd["head.weight"] = t.reshape(-1, t.shape[-1]).t().contiguous()  # (1, 1, C, K) -> (K, C)
        elif rest == "head/conv2d/bias":
            sd["head.bias"] = t.reshape(-1)
        elif m:
            base = f"stages.{int(m.group(1)) - 1}.{int(m.group(2)) - 1}."
            r = "abc".index(m.group(3)) + 1
            if m.group(4):
                sd[base + "downsample.weight"] = _flax_to_torch(t)
            elif m.group(5).startswith("standardized"):
                sd[base + f"conv{r}.weight"] = _flax_to_torch(t)
            else:
                sd[base + f"norm{r}." + ("weight" if m.group(6) == "gamma" else "bias")] = t.reshape(-1)
        else:
            sd[k] = t
    return sd


# ============================================================================ checked loading
def _load_checked(model: nn.Module, sd: dict, source: str, strict: bool, fmt: str = "") -> LoadResult:
    from .vit import VisionTransformer, resample_state_dict

    result = LoadResult(format=fmt)
    if isinstance(model, VisionTransformer):
        before = {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}
        sd = resample_state_dict(model, sd)
        result.resampled = [k for k, v in sd.items() if k in before and tuple(v.shape) != before[k]]
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if strict and (missing or unexpected or mismatched):
        raise CheckpointError(_mismatch_message(source, model, sd, own, missing, unexpected, mismatched))
    result.missing, result.unexpected = missing, unexpected
    result.mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]
    usable = {k: v for k, v in sd.items() if k in own and k not in mismatched}
    model.load_state_dict(usable, strict=strict)
    return result


def _short(keys: list[str], limit: int = 24) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _group_blocks(keys: list[str], universe) -> list[str]:
    """'blocks.3.*' for a block whose every key (in `universe`) is listed; others as they are."""
    listed = set(keys)
    out, done = [], set()
    for k in keys:
        m = re.match(r"(blocks\.\d+\.)", k)
        if m:
            prefix = m.group(1)
            whole = [u for u in universe if u.startswith(prefix)]
            if len(whole) > 1 and all(u in listed for u in whole):
                if prefix not in done:
                    done.add(prefix)
                    out.append(f"{prefix}*")
                continue
        out.append(k)
    return out


def _mismatch_message(source, model, sd, own, missing, unexpected, mismatched) -> str:
    name = getattr(model, "variant_name", type(model).__name__)
    parts = [f"{source} does not match the model {name}:"]
    lists = []
    if missing:
        lists.append(f"missing keys ({len(missing)}): {_short(_group_blocks(missing, own))}")
    if unexpected:
        lists.append(f"unexpected keys ({len(unexpected)}): {_short(_group_blocks(unexpected, sd))}")
    if mismatched:
        shapes = [f"{k} checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]
        lists.append(f"shape mismatches ({len(mismatched)}): {_short(shapes, 12)}")
    parts.append("; ".join(lists) + ".")
    hints = []
    if "patch_embed.proj.weight" in mismatched:
        w = sd["patch_embed.proj.weight"]
        hints.append(f"the checkpoint is for width {w.shape[0]}, {w.shape[1]} input channels and "
                     f"{tuple(w.shape[2:])} patches: build that variant")
    elif mismatched and all(k.startswith("head.") for k in mismatched) and "head.weight" in sd:
        hints.append(f"build the model with num_classes={sd['head.weight'].shape[0]}, or pass strict=False and "
                     f"call model.reset_classifier(...) to fine-tune a new head")
    if any(k.startswith("pre_logits.") for k in unexpected):
        hints.append("the checkpoint has the paper's pre-logits (representation) layer: build with head='mlp_tanh'")
    if any(k.startswith("pre_logits.") for k in missing) and not any(k.startswith("pre_logits.") for k in sd):
        hints.append("the checkpoint has no pre-logits layer: build with head='linear'")
    if "fc_norm.weight" in unexpected:
        hints.append("the checkpoint normalises after pooling (timm's fc_norm): build with fc_norm=True")
    if any(k.startswith("attn_pool.") for k in unexpected):
        hints.append("the checkpoint pools with multi-head attention: build with global_pool='map'")
    if "cls_token" in missing or "cls_token" in unexpected:
        hints.append("class token present in one but not the other: set class_token/global_pool to match")
    odd_bias = [k for k in unexpected + missing if k.endswith("qkv.bias")
                and k[: -len("bias")] + "weight" not in unexpected + missing]
    if odd_bias:
        hints.append("qkv bias present in one but not the other: set qkv_bias to match")
    n_blocks = lambda keys: len({m.group(1) for k in keys for m in [re.match(r"blocks\.(\d+)\.", k)] if m})  # noqa: E731
    if n_blocks(sd) != n_blocks(own):
        hints.append(f"the checkpoint has {n_blocks(sd)} blocks, the model {n_blocks(own)}: build a variant of "
                     f"that depth")
    if not hints:
        hints.append("build the variant the checkpoint was made for (same width, depth, heads, patch size and "
                     "options), or pass strict=False to load only the matching tensors")
    parts.append("Fix: " + "; ".join(hints) + ".")
    return " ".join(parts)
