"""`vitlab analyze`: every analysis that applies to a model, over N real images, as PNG
figures, `analysis.json` (the numbers behind every figure) and one self-contained
`report.html` (figures embedded as base64 data URIs, so the page can be mailed or archived).
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError, DataError
from . import figures
from .attention import AttentionStats, collect_attentions, mean_pairwise_distance
from .embeddings import (depthwise_kernels, embedding_filter_components, is_convmixer, model_sincos_dimension_maps,
                         num_depthwise_layers, patch_embedding_weight, pos_embed_similarity)

CAPTIONS = {
    "attention_distance": "Each dot is one head: the mean distance in pixels between a query patch and the patches "
                          "it attends to (averaged over the images and all queries), plotted against depth; low dots "
                          "attend locally like a small CNN receptive field, the dashed line is uniform attention "
                          "over the whole image (in the paper, early layers spread from local to global and all "
                          "heads become global with depth).",
    "attention_distance_cvt": "Each dot is one head of one CvT block: mean attention distance in pixels from a query "
                              "token to the (stride-2, coarser) key tokens it attends to; grey lines separate the "
                              "stages, the dashed step is uniform attention over each stage's key grid.",
    "pos_embed_similarity": "Panel (row i, column j) is the cosine similarity of patch (i, j)'s position embedding "
                            "with every patch's (yellow = similar): a bright spot at the panel's own position and "
                            "bright row/column stripes mean the embeddings learned the 2D layout of the image.",
    "sincos_dimensions": "Each image is one channel of the fixed 2D sinusoidal position embedding drawn over the "
                         "patch grid (red +1, blue -1): the first half of the channels varies along the columns "
                         "only, the second half along the rows only, each channel pair at its own frequency, so "
                         "together they give every patch a distinct code.",
    "filter_components": "The top principal components of the patch-embedding filters (each scaled to its own "
                         "range; the percentage is its share of the filters' variance): smooth low-frequency "
                         "patterns mean the first layer learned a basis for the fine structure inside a patch.",
    "attention_rollout": "Top: input images (true label / prediction); bottom: attention rollout (residual-aware "
                         "product of the attention of all layers), bright where the patch's information reaches "
                         "the output.",
    "last_block_attention": "Top: input images (true label / prediction); bottom: the last block's attention "
                            "from the class token (mean over heads) over the key grid — CvT has no rollout because "
                            "its keys are downsampled.",
    "convmixer_patch_filters": "ConvMixer's patch-embedding filters (each scaled to its own range): a strided "
                               "p x p convolution, i.e. the same linear patch projection as ViT's.",
    "convmixer_depthwise_kernels": "Depthwise kernels of the chosen ConvMixer layers (blue negative, red "
                                   "positive): in the paper, early layers learn local, late layers wider and "
                                   "more diffuse spatial mixing.",
    "training_curves": "The run's training curves (loss and validation metrics per epoch, from the run's "
                       "curves.png or metrics.jsonl).",
}


def _round(x, digits: int = 6):
    """Tensor / nested numbers -> JSON-ready lists rounded to `digits` significant digits."""
    if isinstance(x, torch.Tensor):
        return _round(x.detach().cpu().tolist(), digits)
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    if isinstance(x, float):
        if not math.isfinite(x):
            return None
        return float(f"{x:.{digits}g}")
    return x


def _class_name(class_names, i: int) -> str:
    if class_names and 0 <= i < len(class_names):
        return str(class_names[i])
    return str(i)


def analyze_model(model, images: torch.Tensor, out_dir, mean=None, std=None, labels: torch.Tensor | None = None,
                  class_names: list[str] | None = None, batch_size: int = 64, num_maps: int = 8, k: int = 28,
                  kernel_layers: list[int] | None = None, device=None, stats: AttentionStats | None = None) -> dict:
    """Compute every analysis that applies to `model` over `images`, write one PNG per figure
    into `out_dir`, and return the analysis as a JSON-ready dict (figures listed under
    "figures", analyses that do not apply under "skipped" with the reason).

    images: uint8 (N, C, H, W) (normalised with mean/std for the model) or float, already
    normalised. One batched pass gathers all attention statistics.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"model": _model_facts(model), "num_images": int(images.shape[0]),
                              "image_size": list(images.shape[-2:]), "figures": [], "skipped": {}}

    def add_figure(name: str, path, title: str, caption_key: str | None = None):
        if path is not None:
            result["figures"].append({"name": name, "file": Path(path).name, "title": title,
                                      "caption": CAPTIONS[caption_key or name]})

    # ---- attention: distance and rollout, one pass
    if hasattr(model, "forward_intermediates"):
        if stats is None:
            stats = collect_attentions(model, images, batch_size=batch_size, mean=mean, std=std, device=device)
        preds = stats.logits.argmax(-1)
        if labels is not None:
            result["accuracy_on_analysed_images"] = float((preds == labels[: preds.shape[0]].to(preds)).float().mean())
        multi_stage = len(set(stats.stage)) > 1
        refs = [mean_pairwise_distance(g["q_grid"], g["stride_px"]) if g["q_grid"] == g["kv_grid"]
                else _uniform_distance(g) for g in stats.grids]
        name = "attention_distance"
        path = figures.plot_attention_distance(
            stats.distance, stats.stage, out_dir / f"{name}.png", reference=refs,
            title=f"Mean attention distance ({stats.num_images} images, {images.shape[-2]}x{images.shape[-1]} px)")
        result[name] = {
            "pixels_per_layer_per_head": _round(stats.distance), "stage": stats.stage,
            "uniform_attention_distance": _round(refs),
            "grids": [{k_: list(v) if isinstance(v, tuple) else v for k_, v in g.items()} for g in stats.grids],
            "num_images": stats.num_images,
            "prefix_tokens": "dropped as queries and keys; rows renormalised over patches",
        }
        add_figure(name, path, "Mean attention distance", "attention_distance_cvt" if multi_stage else None)

        n = min(num_maps, images.shape[0])
        shown = images[:n]
        captions = [(f"{_class_name(class_names, int(labels[i]))} / " if labels is not None else "") +
                    _class_name(class_names, int(preds[i])) for i in range(n)]
        if stats.rollout is not None:
            name = "attention_rollout"
            path = figures.plot_attention_maps(shown, stats.rollout[:n], out_dir / f"{name}.png",
                                               "Attention rollout (mean over heads)", captions)
            result[name] = {"maps": _round(stats.rollout[:n]), "head_fusion": "mean", "discard_ratio": 0.0,
                            "grid": list(stats.rollout.shape[-2:])}
            add_figure(name, path, "Attention rollout")
        elif stats.cls_attention is not None:
            name = "last_block_attention"
            path = figures.plot_attention_maps(shown, stats.cls_attention[:n], out_dir / f"{name}.png",
                                               "Last block's attention", captions)
            result[name] = {"maps": _round(stats.cls_attention[:n]), "grid": list(stats.cls_attention.shape[-2:])}
            result["skipped"]["attention_rollout"] = stats.notes[0] if stats.notes else "not applicable"
            add_figure(name, path, "Last block's attention")
    else:
        why = f"{type(model).__name__} has no self-attention"
        result["skipped"]["attention_distance"] = why
        result["skipped"]["attention_rollout"] = why

    # ---- position embeddings
    try:
        sim = pos_embed_similarity(model)
    except ConfigError as e:
        result["skipped"]["pos_embed_similarity"] = str(e)
    else:
        name = "pos_embed_similarity"
        path = figures.plot_pos_similarity(sim, out_dir / f"{name}.png",
                                           f"Position embedding similarity ({getattr(model, 'pos_embed_kind', '')})")
        result[name] = {"grid": list(sim.shape[:2]), "kind": getattr(model, "pos_embed_kind", None),
                        "cosine_similarity": _round(sim, 4)}
        add_figure(name, path, "Position embedding similarity")
        if getattr(model, "pos_embed_kind", None) == "sincos_2d":
            maps, dims = model_sincos_dimension_maps(model)
            name = "sincos_dimensions"
            path = figures.plot_sincos_dimensions(maps, dims, int(getattr(model, "embed_dim", maps.shape[0])),
                                                  out_dir / f"{name}.png")
            result[name] = {"dims": dims, "grid": list(maps.shape[1:])}
            add_figure(name, path, "Sinusoidal position embedding per dimension")

    # ---- patch-embedding filters
    convmixer = is_convmixer(model)
    try:
        fc = embedding_filter_components(model, k=k)
    except ConfigError as e:
        result["skipped"]["filter_components"] = str(e)
    else:
        name = "filter_components"
        labels_ = [f"{100 * float(r):.1f}%" for r in fc.explained_variance_ratio]
        path = figures.plot_filter_grid(fc.components, out_dir / f"{name}.png",
                                        f"Top {fc.components.shape[0]} principal components of the "
                                        f"{fc.num_filters} patch-embedding filters", cols=7, labels=labels_)
        result[name] = {"components": _round(fc.components, 5),
                        "explained_variance_ratio": _round(fc.explained_variance_ratio),
                        "explained_variance": _round(fc.explained_variance), "num_filters": fc.num_filters}
        add_figure(name, path, "Patch-embedding filter components")

    # ---- ConvMixer weights
    if convmixer:
        w = patch_embedding_weight(model)
        name = "convmixer_patch_filters"
        shown_w = w[:64]
        path = figures.plot_filter_grid(shown_w, out_dir / f"{name}.png",
                                        f"Patch-embedding filters ({shown_w.shape[0]} of {w.shape[0]})", cols=16)
        result[name] = {"filters": _round(shown_w, 5), "shape": list(w.shape)}
        add_figure(name, path, "ConvMixer patch-embedding filters")
        depth = num_depthwise_layers(model)
        layers = sorted({l % depth for l in (kernel_layers if kernel_layers is not None
                                              else [0, depth // 2, depth - 1])})
        kernels = {l: depthwise_kernels(model, l) for l in layers}
        name = "convmixer_depthwise_kernels"
        path = figures.plot_kernel_layers(kernels, out_dir / f"{name}.png", "Depthwise kernels")
        result[name] = {"layers": layers, "kernels": {str(l): _round(v[:64], 5) for l, v in kernels.items()},
                        "channels": int(next(iter(kernels.values())).shape[0])}
        add_figure(name, path, "ConvMixer depthwise kernels")
    return result


def _uniform_distance(g: dict) -> float:
    """Distance of uniform attention from the query grid onto a different key grid."""
    from .attention import distance_matrix

    return float(distance_matrix(g["q_grid"], g["stride_px"], g["kv_grid"], g["kv_stride_px"],
                                 g.get("kv_offset_px"), dtype=torch.float64).mean())


def _model_facts(model) -> dict:
    facts = {"class": type(model).__name__, "variant": getattr(model, "variant_name", None),
             "parameters": int(sum(p.numel() for p in model.parameters()))}
    for attr in ("img_size", "patch_size", "grid_size", "pos_embed_kind", "global_pool", "num_prefix_tokens",
                 "embed_dim"):
        v = getattr(model, attr, None)
        if isinstance(v, (int, str, tuple, list)):
            facts[attr] = list(v) if isinstance(v, tuple) else v
    if isinstance(getattr(model, "stem", None), torch.nn.Module) and hasattr(model, "patch_embed"):
        facts["hybrid"] = True
    return facts


# --------------------------------------------------------------------------- report
def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _table(d: dict) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
            v = v if len(v) < 200 else v[:197] + "..."
        rows.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top} th{background:#f6f6f6;font-weight:600}
figure{margin:1.2em 0;padding:.6em;border:1px solid #eee;border-radius:6px} figure img{max-width:100%;height:auto;display:block;margin:auto}
figcaption{color:#444;font-size:.92em;margin-top:.5em} .skip{color:#777;font-size:.9em}
.cfg table{display:block;columns:3 300px;column-gap:1.5em} .cfg tr{break-inside:avoid;display:table;width:100%;table-layout:fixed}
.cfg th{width:45%} .cfg td,.cfg th{overflow-wrap:anywhere}
.cols{display:flex;gap:2em;flex-wrap:wrap} .cols>div{flex:1 1 420px;min-width:0} pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.85em}
"""


def write_report(out_dir, analysis: dict, run: dict | None = None, title: str | None = None) -> dict[str, Path]:
    """Write `analysis.json` and a self-contained `report.html` for an `analyze_model` result.

    run (optional): {"name", "source", "config" (dict), "summary" (dict), "curves" (PNG path)}.
    Returns the paths written (figures included).
    """
    out_dir = Path(out_dir)
    run = run or {}
    figs = list(analysis.get("figures", []))
    curves = run.get("curves")
    if curves and Path(curves).is_file():
        figs.append({"name": "training_curves", "file": Path(curves).name, "path": str(curves),
                     "title": "Training curves", "caption": CAPTIONS["training_curves"]})
        analysis.setdefault("training_curves", {"file": Path(curves).name})
    json_path = out_dir / "analysis.json"
    payload = dict(analysis)
    if run:
        payload["run"] = {k: v for k, v in run.items() if k != "curves"}
    payload["figures"] = [{k: v for k, v in f.items() if k != "path"} for f in figs]
    json_path.write_text(json.dumps(payload, indent=1, default=str))

    name = run.get("name") or analysis.get("model", {}).get("variant") or analysis.get("model", {}).get("class")
    title = title or f"vitlab analysis: {name}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    sub = f"{analysis.get('num_images', 0)} images of {analysis.get('image_size', ['?', '?'])[0]}x" \
          f"{analysis.get('image_size', ['?', '?'])[1]} px"
    if run.get("source"):
        sub += f" · source: {html.escape(str(run['source']))}"
    if "accuracy_on_analysed_images" in analysis:
        sub += f" · top-1 on these images: {100 * analysis['accuracy_on_analysed_images']:.1f}%"
    parts.append(f"<p class='sub'>{sub}</p>")
    parts.append("<div class='cols'><div><h2>Model</h2>" + _table(analysis.get("model", {})) + "</div>")
    if run.get("summary"):
        parts.append("<div><h2>Metrics</h2>" + _table(run["summary"]) + "</div>")
    parts.append("</div>")
    parts.append("<h2>Figures</h2>")
    for f in figs:
        path = Path(f.get("path") or out_dir / f["file"])
        parts.append(f"<figure id='{html.escape(f['name'])}'><img alt='{html.escape(f['title'])}' "
                     f"src='{_data_uri(path)}'><figcaption><b>{html.escape(f['title'])}.</b> "
                     f"{html.escape(f['caption'])}</figcaption></figure>")
    if analysis.get("skipped"):
        parts.append("<h2>Not applicable to this model</h2><ul class='skip'>")
        for k, why in analysis["skipped"].items():
            parts.append(f"<li><b>{html.escape(k)}</b>: {html.escape(str(why))}</li>")
        parts.append("</ul>")
    if run.get("config"):
        cfg = run["config"]
        parts.append("<h2>Configuration</h2>")
        parts.append("<div class='cfg'>" + _table(_flatten(cfg)) + "</div>" if isinstance(cfg, dict)
                     else f"<pre>{html.escape(str(cfg))}</pre>")
    parts.append("<p class='sub'>Numbers behind every figure: analysis.json.</p></body></html>")
    html_path = out_dir / "report.html"
    html_path.write_text("\n".join(parts), encoding="utf-8")
    written = {"analysis.json": json_path, "report.html": html_path}
    written.update({f["file"]: Path(f.get("path") or out_dir / f["file"]) for f in figs})
    return written


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------- runs
def select_images(n_total: int, n: int, seed: int = 0) -> torch.Tensor:
    """`n` distinct indices of a split, seeded and sorted (the same images every time)."""
    if n < 1:
        raise ConfigError(f"--images must be at least 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[: min(n, n_total)].sort().values


def fit_images(images: torch.Tensor, img_size, in_chans: int) -> torch.Tensor:
    """Resize uint8 images to the model's input size (antialiased bilinear) and match channels."""
    if images.shape[1] != in_chans:
        if images.shape[1] == 1 and in_chans == 3:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] == 3 and in_chans == 1:
            images = (images.float() * torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
            images = images.round().clamp(0, 255).to(torch.uint8)
        else:
            raise DataError(f"the images have {images.shape[1]} channels but the model takes {in_chans}; "
                            "analyse the model on the data set it was trained on (--dataset)")
    size = tuple(int(s) for s in (img_size if isinstance(img_size, (tuple, list)) else (img_size, img_size)))
    if tuple(images.shape[-2:]) != size:
        x = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False,
                          antialias=size[0] < images.shape[-2])
        images = x.round().clamp(0, 255).to(torch.uint8)
    return images.contiguous()


def _read_run(run_dir: Path | None) -> dict:
    run: dict[str, Any] = {}
    if run_dir is None:
        return run
    import yaml

    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        try:
            run["config"] = yaml.safe_load(cfg.read_text()) or {}
        except yaml.YAMLError:
            run["config"] = cfg.read_text()
    summ = run_dir / "summary.json"
    if summ.is_file():
        try:
            s = json.loads(summ.read_text())
            run["summary"] = {k: v for k, v in s.items() if not isinstance(v, (dict, list))} if isinstance(s, dict) else {}
        except json.JSONDecodeError:
            pass
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = []
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        run["metrics_rows"] = rows
    if (run_dir / "curves.png").is_file():
        run["curves"] = run_dir / "curves.png"
    return run


def _dataset_name(info: dict, override: str | None) -> str:
    if override:
        return override
    cfg = info.get("config") or {}
    ds = info.get("dataset") or (cfg.get("dataset") if isinstance(cfg, dict) else None)
    if isinstance(ds, dict):
        ds = ds.get("name")
    if not ds:
        raise ConfigError("the checkpoint does not say which data set it was trained on; pass --dataset NAME")
    return str(ds)


def load_run_data(info: dict, dataset: str | None = None, data_dir=None):
    """The run's data set with the run's own split (same val_fraction, split_seed and loader
    options as training), so the analysed images are held-out ones. `dataset` / `data_dir`
    override the run's (another data set is loaded with the loader's defaults)."""
    from ..data import load_dataset

    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    run_ds = cfg.get("dataset")
    if cfg and (dataset is None or dataset == run_ds):
        from ..train.config import TrainConfig
        from ..train.engine import load_data

        tc = TrainConfig.from_dict(dict(cfg), source="checkpoint config")
        if data_dir is not None:
            tc.data_dir = str(data_dir)
        return load_data(tc)
    return load_dataset(_dataset_name(info, dataset), data_dir=data_dir)


def analyze_run(target, dataset: str | None = None, data_dir=None, images: int = 128, out=None,
                batch_size: int = 64, device: str | None = None, seed: int = 0) -> dict[str, Path]:
    """Load a run directory or checkpoint, analyse it over `images` validation images of its
    data set, and write the figures, analysis.json and report.html into `out` (default
    <run>/analysis). Returns the paths written."""
    try:
        from ..train.checkpoint import load_model
    except ImportError as e:  # the training area provides checkpoints
        raise ConfigError("loading runs needs vitlab.train.checkpoint.load_model, which this install lacks") from e
    target = Path(target)
    if not target.exists():
        raise CheckpointError(f"{target} does not exist; pass a run directory (runs/<name>) or a checkpoint file")
    model, info = load_model(target)
    info = info or {}
    run_dir = Path(info["run_dir"]) if info.get("run_dir") else (target if target.is_dir() else target.parent)
    run = _read_run(run_dir)
    if "config" not in run and info.get("config"):
        run["config"] = info["config"]
    bundle = load_run_data(info, dataset, data_dir)
    split = bundle.val if getattr(bundle, "val", None) is not None else bundle.train
    if len(split.labels) == 0:
        raise DataError("the data set's validation split is empty; nothing to analyse")
    idx = select_images(len(split.labels), images, seed)
    imgs = split.images[idx]
    labels = torch.as_tensor(split.labels)[idx]
    img_size = info.get("img_size") or getattr(model, "img_size", imgs.shape[-2:])
    in_chans = int(info.get("in_chans") or getattr(model, "in_chans", imgs.shape[1]))
    imgs = fit_images(torch.as_tensor(imgs), img_size, in_chans)
    mean = info.get("mean") or getattr(bundle, "mean", None)
    std = info.get("std") or getattr(bundle, "std", None)
    if mean is not None and len(mean) != in_chans:  # grey data set fed to an RGB model, or the reverse
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    class_names = info.get("class_names") or getattr(bundle, "class_names", None)
    out_dir = Path(out) if out else run_dir / "analysis"
    if device:
        model = model.to(device)
    analysis = analyze_model(model, imgs, out_dir, mean=mean, std=std, labels=labels, class_names=class_names,
                             batch_size=batch_size, device=device)
    if "curves" not in run and run.get("metrics_rows"):
        p = figures.plot_training_curves(run["metrics_rows"], out_dir / "training_curves.png")
        if p is not None:
            run["curves"] = p
    report_run = {"name": run_dir.name, "source": str(target), "config": run.get("config"),
                  "summary": run.get("summary"), "curves": run.get("curves"),
                  "dataset": getattr(bundle, "name", None) or _dataset_name(info, dataset),
                  "images_from": f"{len(idx)} images of the validation split (seed {seed})"}
    if report_run["curves"] is not None and Path(report_run["curves"]).parent != out_dir:
        # keep the report folder self-contained: copy the run's curves next to the other figures
        import shutil

        dst = out_dir / "training_curves.png"
        shutil.copyfile(report_run["curves"], dst)
        report_run["curves"] = dst
    return write_report(out_dir, analysis, report_run)
