"""Figures of the analyses (matplotlib, Agg backend: no display needed).

Grids of many small images (position similarity, filters, kernels) are tiled into one array
and drawn with a single `imshow`: one axes instead of hundreds keeps a 14 x 14 x 14 x 14
similarity figure fast to draw.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def tile(images: np.ndarray, cols: int, pad: int = 1, pad_value: float = np.nan) -> np.ndarray:
    """(n, h, w[, c]) -> one (rows*(h+pad)-pad, cols*(w+pad)-pad[, c]) mosaic, row-major."""
    n, h, w = images.shape[:3]
    rest = images.shape[3:]
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad) + rest, pad_value, dtype=np.float64)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = images[i]
    return out


def _minmax(x: np.ndarray, axes) -> np.ndarray:
    lo = x.min(axis=axes, keepdims=True)
    hi = x.max(axis=axes, keepdims=True)
    return (x - lo) / np.where(hi - lo > 0, hi - lo, 1.0)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    _plt().close(fig)
    return path


# --------------------------------------------------------------------------- attention distance
def plot_attention_distance(distance: list[torch.Tensor], stage: list[int], path, reference: list[float] | None = None,
                            title: str = "Mean attention distance") -> Path:
    """The paper's Fig. 7 right: one dot per head, x = block (network depth), y = pixels.

    `reference[l]` (optional) is the distance of uniform attention in block l's geometry,
    drawn as a dashed step: a head on it attends everywhere equally.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    max_heads = max(d.numel() for d in distance)
    cmap = plt.get_cmap("tab20" if max_heads > 10 else "tab10")
    for h in range(max_heads):
        xs = [l + 1 for l, d in enumerate(distance) if d.numel() > h]
        ys = [float(d[h]) for d in distance if d.numel() > h]
        ax.scatter(xs, ys, s=22, color=cmap(h % cmap.N), label=f"head {h + 1}", edgecolors="none", alpha=0.9)
    if reference is not None:
        ax.step(np.arange(1, len(reference) + 1), reference, where="mid", ls="--", color="0.5", lw=1,
                label="uniform attention")
    stages = sorted(set(stage))
    if len(stages) > 1:  # CvT: mark stage boundaries
        for s in stages[1:]:
            ax.axvline(stage.index(s) + 0.5, color="0.8", lw=1)
        for s in stages:
            idx = [i for i, t in enumerate(stage) if t == s]
            ax.text((idx[0] + idx[-1]) / 2 + 1, 1.0, f"stage {s + 1}", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="0.4")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_xticks(range(1, len(distance) + 1))
    top = max([float(d.max()) for d in distance] + list(reference or []))
    ax.set_ylim(0, 1.1 * top if top > 0 else 1.0)  # head room: dots at the uniform line stay visible
    ax.set_title(title, pad=14 if len(stages) > 1 else 6)
    if max_heads <= 16:
        ax.legend(fontsize=7, ncol=2, loc="lower right", framealpha=0.8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- position embeddings
def plot_pos_similarity(sim: torch.Tensor, path, title: str = "Position embedding similarity") -> Path:
    """The paper's Fig. 7 centre: a gh x gw grid of panels; panel (i, j) is the (gh, gw) map
    of cosine similarities of patch (row i, col j)'s embedding to every patch."""
    plt = _plt()
    gh, gw = sim.shape[:2]
    panels = sim.reshape(gh * gw, gh, gw).numpy()
    mosaic = tile(panels, cols=gw, pad=1)
    side = min(9.0, max(4.0, 0.45 * max(gh, gw) * max(gh, gw) ** 0.5))
    fig, ax = plt.subplots(figsize=(side * gw / max(gh, gw) + 1.2, side * gh / max(gh, gw)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([(gw + 1) * j + (gw - 1) / 2 for j in range(gw)], [str(j + 1) for j in range(gw)], fontsize=7)
    ax.set_yticks([(gh + 1) * i + (gh - 1) / 2 for i in range(gh)], [str(i + 1) for i in range(gh)], fontsize=7)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Cosine similarity")
    return _save(fig, path)


def plot_sincos_dimensions(maps: torch.Tensor, dims: list[int], dim: int, path,
                           title: str = "Sinusoidal position embedding, per dimension") -> Path:
    """One gh x gw image per selected channel of the 2D sinusoid (values in [-1, 1]); channels below
    dim/2 encode the column, the rest the row."""
    plt = _plt()
    n = len(dims)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 0.8, 2.2 * rows + 0.4), squeeze=False)
    im = None
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        im = ax.imshow(maps[k].numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        half = dim // 2
        d = dims[k]
        axis, i = ("column x", d) if d < half else ("row y", d - half)
        ax.set_title(f"dim {d}: {'sin' if i % 2 == 0 else 'cos'}, {axis}", fontsize=8)
    fig.suptitle(title)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
    return _save(fig, path)


# --------------------------------------------------------------------------- filters
def _to_hwc(x: np.ndarray) -> np.ndarray:
    """(n, C, h, w) -> (n, h, w) grey or (n, h, w, 3) colour (first three channels)."""
    if x.shape[1] == 1:
        return x[:, 0]
    return np.moveaxis(x[:, :3], 1, -1)


def plot_filter_grid(filters: torch.Tensor, path, title: str, cols: int = 7, labels: list[str] | None = None) -> Path:
    """Filters (n, C, h, w), each min-max scaled to [0, 1] on its own (grey for C=1, RGB for C>=3)."""
    plt = _plt()
    f = filters.detach().float().numpy()
    if f.shape[1] == 2:  # no sensible colour mapping: show the first channel
        f = f[:, :1]
    f = _minmax(f, axes=(1, 2, 3))
    imgs = _to_hwc(f)
    n = imgs.shape[0]
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.25 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(imgs[i], cmap="gray" if imgs.ndim == 3 else None, vmin=0, vmax=1, interpolation="nearest")
            if labels:
                ax.set_title(labels[i], fontsize=6, pad=2)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_kernel_layers(kernels: dict[int, torch.Tensor], path, title: str, max_channels: int = 64) -> Path:
    """ConvMixer depthwise kernels: one panel per layer, each channel's k x k kernel a tile
    (shared symmetric colour scale per layer: blue negative, red positive)."""
    plt = _plt()
    layers = sorted(kernels)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.6), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        k = kernels[layer][:max_channels].numpy()
        cols = int(math.ceil(math.sqrt(k.shape[0])))
        mosaic = tile(k, cols=cols, pad=1)
        lim = float(np.nanmax(np.abs(mosaic))) or 1.0
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
        ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(f"layer {layer + 1}: {min(kernels[layer].shape[0], max_channels)} of "
                     f"{kernels[layer].shape[0]} channels", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- attention maps
def plot_attention_maps(images: torch.Tensor, maps: torch.Tensor, path, title: str,
                        captions: list[str] | None = None) -> Path:
    """Each input image (uint8 (n, C, H, W)) above the same image with its token map
    (n, gh, gw), upsampled and normalised to [0, 1] per image, overlaid as a heat map."""
    from .attention import upsample_map

    plt = _plt()
    n = images.shape[0]
    imgs = images.detach()
    if imgs.dtype != torch.uint8:
        imgs = (_minmax(imgs.float().numpy(), axes=(1, 2, 3)) * 255).round().astype(np.uint8)
        imgs = torch.from_numpy(imgs)
    h, w = imgs.shape[-2:]
    up = upsample_map(maps, (h, w)).numpy()
    up = _minmax(up, axes=(1, 2))
    rgb = _to_hwc(imgs.numpy())
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for i in range(n):
        grey = rgb.ndim == 3
        axes[0, i].imshow(rgb[i], cmap="gray" if grey else None, vmin=0, vmax=255)
        axes[1, i].imshow(rgb[i], cmap="gray" if grey else None, vmin=0, vmax=255)
        axes[1, i].imshow(up[i], cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        if captions:
            axes[0, i].set_title(captions[i], fontsize=7)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- training curves
def plot_training_curves(rows: list[dict], path, title: str = "Training curves") -> Path | None:
    """Every numeric metric of metrics.jsonl against epoch (or step): losses on the left,
    accuracies and other metrics on the right. None when there is nothing to plot."""
    plt = _plt()
    xkey = next((k for k in ("epoch", "step", "iteration") if any(k in r for r in rows)), None)
    keys = sorted({k for r in rows for k, v in r.items()
                   if k != xkey and isinstance(v, (int, float)) and not isinstance(v, bool)})
    keys = [k for k in keys if k not in ("time", "lr_step", "seconds", "elapsed", "wall_s")]
    if not keys:
        return None
    loss = [k for k in keys if "loss" in k]
    other = [k for k in keys if "loss" not in k]
    groups = [g for g in (loss, other) if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for k in group:
            pts = [(r.get(xkey, i), r[k]) for i, r in enumerate(rows) if isinstance(r.get(k), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=k)
        ax.set_xlabel(xkey or "record")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if group is loss and all(r.get(k, 1) > 0 for r in rows for k in group if isinstance(r.get(k), float)):
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
