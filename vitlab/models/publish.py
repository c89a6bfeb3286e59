"""Hand a vitlab model to people who use `transformers` or timm, and to the Hugging Face Hub.

    export_hf(run, out)        # a folder ViTForImageClassification / CvtForImageClassification.from_pretrained loads
    export_timm(run, out)      # timm's key layout (model.safetensors) + timm's config.json
    push_to_hub(run, repo_id)  # export, then huggingface_hub's create_repo + upload_folder

Each folder gets a model card (README.md: model, data, recipe, metrics from summary.json, the
command that made it). `run` is a vitlab run directory or checkpoint (or, for export_hf /
export_timm, an nn.Module with `info=` describing it).
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large",
              (1280, 32, 16): "huge"}


# ============================================================================ helpers
def _load_run(run_or_model, info: dict | None) -> tuple[nn.Module, dict]:
    if isinstance(run_or_model, nn.Module):
        info = dict(info or {})
        info.setdefault("config", {})
        info.setdefault("run_dir", None)
        return run_or_model.eval(), info
    from ..train.checkpoint import load_model

    model, info = load_model(run_or_model)
    return model.eval(), info


def _run_file(info: dict, name: str) -> dict:
    run_dir = info.get("run_dir")
    p = Path(run_dir) / name if run_dir else None
    if p is not None and p.is_file():
        try:
            return json.loads(p.read_text())
        except ValueError:
            return {}
    return {}


def _class_names(info: dict, n: int) -> list[str]:
    names = info.get("class_names")
    return [str(c) for c in names] if names and len(names) == n else [str(i) for i in range(n)]


def _prepare(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; export into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _need_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("export to the Hugging Face format needs transformers: pip install transformers") from None
    transformers.utils.logging.disable_progress_bar()
    return transformers


# ============================================================================ Hugging Face
def _vit_unsupported(model) -> list[str]:
    why = []
    if model.stem is not None:
        why.append("a hybrid ResNet stem")
    if model.global_pool != "token":
        why.append(f"global_pool={model.global_pool!r} (transformers' ViT classifies from the class token)")
    if model.pos_embed_kind != "learned":
        why.append(f"pos_embed={model.pos_embed_kind!r} (transformers' ViT has one learned 1D table)")
    if model.fc_norm is not None:
        why.append("fc_norm")
    if model.head_kind != "linear":
        why.append(f"head={model.head_kind!r}")
    if model.patch_size[0] != model.patch_size[1] or model.img_size[0] != model.img_size[1]:
        why.append("non-square patches or images")
    return why


def vit_to_hf(model, class_names: list[str]):
    """A transformers ViTForImageClassification computing the same function as a vitlab ViT."""
    transformers = _need_transformers()
    from .convert import _HF_BLOCK_NAMES

    why = _vit_unsupported(model)
    if why:
        raise ConfigError(f"cannot export this ViT to transformers' ViTForImageClassification: it has "
                          f"{'; '.join(why)}. Export it with --format timm instead")
    D = model.embed_dim
    blk = model.blocks[0]
    n = model.num_classes
    cfg = transformers.ViTConfig(
        hidden_size=D, num_hidden_layers=len(model.blocks), num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features, hidden_act="gelu", layer_norm_eps=model.norm.eps,
        image_size=model.img_size[0], patch_size=model.patch_size[0], num_channels=model.in_chans,
        qkv_bias=blk.attn.qkv.bias is not None, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=max(n, 1), id2label={i: c for i, c in enumerate(class_names)},
        label2id={c: i for i, c in enumerate(class_names)})
    hf = transformers.ViTForImageClassification(cfg).eval()
    keys = set(hf.state_dict())
    sd = model.state_dict()
    new = any(".layers." in k for k in keys)
    out = {"vit.embeddings.cls_token": sd["cls_token"], "vit.embeddings.position_embeddings": sd["pos_embed"],
           "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"],
           "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}
    for i in range(len(model.blocks)):
        pre = f"vit.layers.{i}." if new else f"vit.encoder.layer.{i}."
        name = {ours: pre + hf_names[0 if new else 1] for ours, hf_names in _HF_BLOCK_NAMES.items()}
        for ours in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            for t in ("weight", "bias"):
                out[f"{name[ours]}.{t}"] = sd[f"blocks.{i}.{ours}.{t}"]
        for t in ("weight", "bias"):
            if f"blocks.{i}.attn.qkv.{t}" in sd:
                for part, value in zip("qkv", sd[f"blocks.{i}.attn.qkv.{t}"].chunk(3, dim=0)):
                    out[f"{name[part]}.{t}"] = value
    if "vit.embeddings.mask_token" in keys:  # unused by classification; transformers may build it
        out["vit.embeddings.mask_token"] = hf.state_dict()["vit.embeddings.mask_token"]
    hf.load_state_dict({k: v.clone() for k, v in out.items()}, strict=True)
    return hf


def cvt_to_hf(model, class_names: list[str]):
    """A transformers CvtForImageClassification computing the same function as a vitlab CvT."""
    transformers = _need_transformers()
    import inspect

    from .cvt import ConvolutionalVisionTransformer, _hf_key_map

    defaults = {k: p.default for k, p in inspect.signature(ConvolutionalVisionTransformer).parameters.items()}
    kw = {**defaults, **getattr(model, "variant_config", {})}
    n = len(model.stages)

    def per(key):
        v = kw[key]
        return list(v) if isinstance(v, (list, tuple)) else [v] * n

    why = []
    if not kw["conv_embed"] or not all(per("conv_proj")):
        why.append("linear token embedding or projection (transformers' CvT has convolutions only)")
    if kw["pos_embed"] != "none":
        why.append(f"pos_embed={kw['pos_embed']!r}")
    if kw["attn_scale"] != "dim":
        why.append(f"attn_scale={kw['attn_scale']!r}")
    if why:
        raise ConfigError(f"cannot export this CvT to transformers' CvtForImageClassification: it has "
                          f"{'; '.join(why)}. Export it with --format timm instead")
    cls = [bool(c) for c in (per("cls_token") if kw["cls_token"] is not None else [False] * (n - 1) + [True])]
    kernels = per("kernel_qkv")
    cfg = transformers.CvtConfig(
        num_channels=model.in_chans, patch_sizes=per("patch_sizes"), patch_stride=per("patch_strides"),
        patch_padding=per("patch_paddings"), embed_dim=per("embed_dims"), num_heads=per("num_heads"),
        depth=per("depths"), mlp_ratio=per("mlp_ratio"), attention_drop_rate=[0.0] * n, drop_rate=[0.0] * n,
        drop_path_rate=[0.0] * n, qkv_bias=per("qkv_bias"), cls_token=cls, qkv_projection_method=["dw_bn"] * n,
        kernel_qkv=kernels, padding_kv=[k // 2 for k in kernels], stride_kv=per("kv_stride"),
        padding_q=[k // 2 for k in kernels], stride_q=[1] * n, layer_norm_eps=kw["norm_eps"],
        num_labels=max(model.num_classes, 1), id2label={i: c for i, c in enumerate(class_names)},
        label2id={c: i for i, c in enumerate(class_names)}, image_size=model.img_size[0])
    hf = transformers.CvtForImageClassification(cfg).eval()
    key_map = _hf_key_map(model, "cvt.")
    for t in ("weight", "bias"):
        key_map[f"norm.{t}"] = f"layernorm.{t}"
        key_map[f"head.{t}"] = f"classifier.{t}"
    sd = model.state_dict()
    hf.load_state_dict({key_map[k]: v.clone() for k, v in sd.items()}, strict=True)
    return hf


def to_transformers(model: nn.Module, class_names: list[str] | None = None):
    """The transformers model equivalent to a vitlab ViT or CvT (the inverse of from_transformers)."""
    from .cvt import ConvolutionalVisionTransformer
    from .vit import VisionTransformer

    names = class_names or [str(i) for i in range(max(getattr(model, "num_classes", 0), 1))]
    if getattr(model, "num_classes", 0) < 1:
        raise ConfigError("the model has no classifier (num_classes=0); fine-tune it first")
    if isinstance(model, VisionTransformer):
        return vit_to_hf(model, names)
    if isinstance(model, ConvolutionalVisionTransformer):
        return cvt_to_hf(model, names)
    raise ConfigError(f"transformers has no equivalent of {type(model).__name__} that vitlab writes (ViT and CvT "
                      f"only); export it with --format timm")


def export_hf(run_or_model, out_dir, *, info: dict | None = None, command: str | None = None) -> Path:
    """Write a Hugging Face folder (config.json, model.safetensors, preprocessor_config.json,
    README.md) that `ViTForImageClassification` / `CvtForImageClassification.from_pretrained`
    loads with the same logits as vitlab."""
    model, info = _load_run(run_or_model, info)
    hf = to_transformers(model, _class_names(info, getattr(model, "num_classes", 0)))
    out = _prepare(out_dir)
    hf.save_pretrained(str(out), safe_serialization=True)
    mean, std = _norm(info, model)
    size = int(model.img_size[0])
    (out / "preprocessor_config.json").write_text(json.dumps(hf_image_processor(info, size, mean, std), indent=1))
    write_model_card(out, model, info, fmt="hf", command=command)
    return out


# PIL's filter numbers, as Hugging Face image processors store `resample`
_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def hf_image_processor(info: dict, size: int, mean: list, std: list) -> dict:
    """preprocessor_config.json that prepares images as vitlab evaluates them: the run's filter, and
    its evaluation crop where there is one (ConvNextImageProcessor is the processor of transformers
    that resizes the shorter side to size / crop_pct and cuts out the centre, below 384 px;
    ViTImageProcessor resizes to size x size)."""
    from ..train.api import preprocessing_of

    pre = preprocessing_of(info)
    common = {"do_resize": True, "resample": _PIL_RESAMPLE[pre["interpolation"]], "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean, "image_std": std}
    if pre["crop_pct"] < 1 and size < 384:
        return {**common, "size": {"shortest_edge": size}, "crop_pct": pre["crop_pct"],
                "image_processor_type": "ConvNextImageProcessor"}
    return {**common, "size": {"height": size, "width": size}, "image_processor_type": "ViTImageProcessor"}


def _norm(info: dict, model) -> tuple[list, list]:
    c = getattr(model, "in_chans", 3)
    mean = list(info.get("mean") or ()) or [0.5] * c
    std = list(info.get("std") or ()) or [0.5] * c
    return [float(m) for m in mean], [float(s) for s in std]


# ============================================================================ timm
def _timm_state_dict(model) -> dict:
    from .convert import rename_keys
    from .convmixer import ConvMixer
    from .vit import VisionTransformer

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if isinstance(model, VisionTransformer):
        return rename_keys(sd, ((r"^pre_logits\.0\.", "pre_logits.fc."),))
    if isinstance(model, ConvMixer):
        inverse = ((r"^patch_embed\.", "stem.0."), (r"^patch_norm\.", "stem.2."),
                   (r"^blocks\.(\d+)\.dw\.", r"blocks.\1.0.fn.0."), (r"^blocks\.(\d+)\.dw_norm\.", r"blocks.\1.0.fn.2."),
                   (r"^blocks\.(\d+)\.pw\.", r"blocks.\1.1."), (r"^blocks\.(\d+)\.pw_norm\.", r"blocks.\1.3."))
        return rename_keys(sd, inverse)
    return sd


def timm_architecture(model) -> tuple[str, dict]:
    """timm's model name and the model_args that make timm build this model."""
    from .convmixer import ConvMixer
    from .vit import VisionTransformer

    if isinstance(model, VisionTransformer):
        blk = model.blocks[0]
        key = (model.embed_dim, len(model.blocks), blk.attn.num_heads)
        size = TIMM_SIZES.get(key, "base")
        name = f"vit_{size}_patch{model.patch_size[0]}_{model.img_size[0]}"
        args = dict(img_size=model.img_size[0], patch_size=model.patch_size[0], embed_dim=model.embed_dim,
                    depth=len(model.blocks), num_heads=blk.attn.num_heads,
                    mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
                    class_token=model.cls_token is not None, global_pool=model.global_pool,
                    fc_norm=model.fc_norm is not None, in_chans=model.in_chans)
        if model.head_kind == "mlp_tanh":
            args["pre_logits_size"] = model.representation_size
        if model.pos_embed_kind != "learned":
            args["pos_embed"] = "none"
        return name, args
    if isinstance(model, ConvMixer):
        cfg = getattr(model, "variant_config", {})
        return getattr(model, "variant_name", "convmixer"), {k: v for k, v in cfg.items()
                                                             if k in ("dim", "depth", "kernel_size", "patch_size")}
    return getattr(model, "variant_name", type(model).__name__), {}


def export_timm(run_or_model, out_dir, *, info: dict | None = None, command: str | None = None) -> Path:
    """Write timm's key layout (model.safetensors) plus timm's config.json (architecture,
    model_args, pretrained_cfg with the preprocessing) and a model card."""
    from safetensors.torch import save_file

    model, info = _load_run(run_or_model, info)
    out = _prepare(out_dir)
    save_file({k: v.contiguous() for k, v in _timm_state_dict(model).items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    name, args = timm_architecture(model)
    n = int(getattr(model, "num_classes", 0))
    mean, std = _norm(info, model)
    size = int(model.img_size[0]) if hasattr(model, "img_size") else int(info.get("img_size") or 224)
    from ..train.api import preprocessing_of

    pre = preprocessing_of(info)
    config = {"architecture": name, "num_classes": n, "num_features": int(getattr(model, "num_features", 0) or 0),
              "global_pool": getattr(model, "global_pool", "avg"), "model_args": args,
              "label_names": _class_names(info, n),
              "pretrained_cfg": {"tag": "vitlab", "input_size": [getattr(model, "in_chans", 3), size, size],
                                 "interpolation": pre["interpolation"], "crop_pct": pre["crop_pct"],
                                 "crop_mode": "center",
                                 "mean": mean, "std": std, "num_classes": n, "classifier": "head"}}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    write_model_card(out, model, info, fmt="timm", command=command)
    return out


# ============================================================================ model card
def _describe_resize(info: dict) -> str:
    from ..train.api import preprocessing_of

    pre = preprocessing_of(info)
    if pre["crop_pct"] < 1:
        return (f"{pre['interpolation']}; for evaluation, shorter side to img_size / {pre['crop_pct']:g} "
                f"and the centre cut out (crop_pct {pre['crop_pct']:g})")
    return f"{pre['interpolation']}; shorter side to the input size and the centre cut out"


def _command(info: dict) -> str:
    src = _run_file(info, "source.json")
    if src.get("command"):
        return src["command"]
    cfg = info.get("config") or {}
    if src.get("source"):
        return (f"vitlab finetune {shlex.quote(str(src['source']))} --dataset {cfg.get('dataset')}"
                + (f" --data-dir {shlex.quote(str(cfg['data_dir']))}" if cfg.get("data_dir") else "")
                + f" --img-size {cfg.get('img_size')} --epochs {cfg.get('epochs')}")
    if info.get("run_dir"):
        return f"vitlab train --config {Path(info['run_dir']) / 'config.yaml'}"
    return "(built in Python)"


def write_model_card(out_dir, model, info: dict, fmt: str = "hf", command: str | None = None) -> Path:
    """README.md with the Hub's YAML header: model, data, recipe, metrics, the command that made it."""
    from ..flops import count_params

    cfg = info.get("config") or {}
    summary = _run_file(info, "summary.json")
    src = _run_file(info, "source.json")
    name = cfg.get("model") or getattr(model, "variant_name", type(model).__name__)
    data = cfg.get("dataset") or "unknown"
    lib = "transformers" if fmt == "hf" else "timm"
    acc = summary.get("val_acc")
    lines = ["---", f"library_name: {lib}", "tags:", "- image-classification", "- vitlab", f"- {name}",
             "pipeline_tag: image-classification", "license: apache-2.0"]
    if acc is not None:
        lines += ["model-index:", f"- name: {name}", "  results:", "  - task:", "      type: image-classification",
                  "    dataset:", f"      name: {data}", f"      type: {data}", "    metrics:",
                  "    - type: accuracy", f"      value: {acc:.4f}"]
    lines += ["---", "", f"# {name} fine-tuned on {data}" if src else f"# {name} trained on {data}", "",
              "## Model", "",
              f"- architecture: {type(model).__name__} (vitlab variant `{name}`"
              + (f", options {json.dumps(cfg.get('model_kwargs'))}" if cfg.get("model_kwargs") else "") + ")",
              f"- parameters: {count_params(model) / 1e6:.2f}M",
              f"- input: {info.get('img_size') or cfg.get('img_size')} px, {getattr(model, 'in_chans', 3)} channels; "
              f"normalise with mean {_norm(info, model)[0]} and std {_norm(info, model)[1]}",
              "- resizing: " + _describe_resize(info),
              f"- classes ({getattr(model, 'num_classes', '?')}): "
              + ", ".join(_class_names(info, int(getattr(model, "num_classes", 0) or 0))[:20]),
              f"- format: {'Hugging Face transformers' if fmt == 'hf' else 'timm key layout'}"]
    if src:
        lines.append(f"- started from: `{src.get('source')}` ({src.get('read') or 'vitlab checkpoint'})")
    lines += ["", "## Data", "", f"- data set: `{data}`" + (f" from `{cfg['data_dir']}`" if cfg.get("data_dir") else ""),
              f"- held-out fraction for validation: {cfg.get('val_fraction', '?')} (split seed {cfg.get('split_seed', '?')})",
              "", "## Recipe", ""]
    for k in ("epochs", "batch_size", "optimizer", "lr", "min_lr", "weight_decay", "momentum", "schedule",
              "warmup_epochs", "grad_clip", "label_smoothing", "precision", "seed"):
        if k in cfg:
            lines.append(f"- {k}: {cfg[k]}")
    lines += ["", "## Metrics", ""]
    if summary:
        lines.append("| metric | value |")
        lines.append("|---|---|")
        for k in ("val_acc", "best_val_acc", "val_loss", "epochs", "steps", "wall_s", "images_per_sec", "device"):
            if summary.get(k) is not None:
                v = summary[k]
                lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    else:
        lines.append("no summary.json (the model was not exported from a vitlab run)")
    lines += ["", "## How it was made", "", "```bash", command or _command(info), "```", "",
              "Exported with `vitlab export RUN --format " + fmt + "` from "
              + (f"`{info['run_dir']}`" if info.get("run_dir") else "a Python model") + "."]
    if fmt == "hf":
        lines += ["", "```python", "from transformers import AutoModelForImageClassification",
                  "model = AutoModelForImageClassification.from_pretrained(\"PATH_OR_REPO\")", "```"]
    path = Path(out_dir) / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ============================================================================ Hub
def push_to_hub(run, repo_id: str, *, fmt: str = "hf", private: bool = False, message: str | None = None,
                revision: str | None = None, token: str | None = None, workdir=None) -> str:
    """Export `run` (format 'hf' or 'timm') and upload the folder to the Hub repo `repo_id`
    (created if missing). Returns the URL of the commit huggingface_hub reports."""
    import tempfile

    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ConfigError("pushing to the Hub needs huggingface_hub: pip install huggingface_hub") from None
    exporters = {"hf": export_hf, "timm": export_timm}
    if fmt not in exporters:
        raise ConfigError(f"format {fmt!r} is not one vitlab pushes; choose hf or timm")
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise ConfigError(f"repo id {repo_id!r} must be ORG_OR_USER/NAME, e.g. alice/vit-flowers")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = exporters[fmt](run, Path(tmp) / "export")
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                     commit_message=message or f"vitlab: upload {Path(str(run)).name} ({fmt} format)")
        except Exception as e:  # noqa: BLE001 - network, auth and HTTP errors of huggingface_hub
            from ..errors import CheckpointError

            raise CheckpointError(f"uploading to {repo_id} failed: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''} (log in with `hf auth login`, "
                                  f"check the network and the repo id)") from None
    return str(getattr(info, "commit_url", None) or info)
