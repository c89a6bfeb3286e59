"""What the embedding layers learned: position-embedding similarity (ViT Fig. 7 centre), the
per-dimension maps of the fixed 2D sinusoidal embedding over the image (the slides' figure),
principal components of the patch-embedding filters (ViT Fig. 7 left), and ConvMixer's
patch-embedding filters and depthwise kernels (the ConvMixer paper's weight figures).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


# --------------------------------------------------------------------------- position embeddings
def position_embedding_table(model, stage: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """The model's absolute position embeddings of its patch grid as ((gh * gw, D), (gh, gw)).

    ViT: the model's own `position_embedding(grid)`, so learned 1D, learned 2D (row and
    column tables concatenated) and fixed sinusoids all come out as one row per patch in
    raster order (the class token's entry is left out). Multi-stage models (CvT with
    pos_embed='learned') keep one table per stage: `stage` picks it (default the first, the
    finest grid). ConfigError when the model has none.
    """
    kind = getattr(model, "pos_embed_kind", None)
    fn = getattr(model, "position_embedding", None)
    grid = getattr(model, "grid_size", None)
    pe = None
    stages = getattr(model, "stages", None)
    if callable(fn) and grid is not None:
        param = next(model.parameters(), None)
        pe = fn(tuple(grid), device=param.device if param is not None else None,
                dtype=param.dtype if param is not None else None)
    elif stages is not None and any(getattr(s, "pos_embed", None) is not None for s in stages):
        i = 0 if stage is None else stage
        if not -len(stages) <= i < len(stages):
            raise ConfigError(f"stage={stage} is out of range: the model has {len(stages)} stages")
        pe, grid = stages[i].pos_embed, stages[i].grid_size
        if pe is None:
            raise ConfigError(f"stage {i} of this model has no position embedding")
    if pe is None:
        what = f"pos_embed={kind!r}" if kind else f"{type(model).__name__}"
        raise ConfigError(
            f"this model has no absolute position embeddings ({what}): there is no position-embedding "
            "similarity to show. It applies to models with pos_embed='learned', 'learned_2d', 'sincos_1d' or "
            "'sincos_2d' (relative position biases and CvT's convolutions carry position differently)")
    pe = pe.detach().float().reshape(-1, pe.shape[-1])
    gh, gw = (int(g) for g in grid)
    if pe.shape[0] != gh * gw:
        raise ConfigError(f"position embedding has {pe.shape[0]} rows but the grid is {gh}x{gw}")
    return pe, (gh, gw)


def pos_embed_similarity(model, stage: int | None = None) -> torch.Tensor:
    """Cosine similarity of each patch's position embedding with every other's.

    Returns (gh, gw, gh, gw): out[i, j] is the (gh, gw) map of similarities of patch (row i,
    column j) to every patch — the ViT paper's Fig. 7 centre draws one such map per patch.
    """
    pe, (gh, gw) = position_embedding_table(model, stage)
    z = F.normalize(pe.double(), dim=-1)
    return (z @ z.T).float().reshape(gh, gw, gh, gw)


def default_sincos_dims(dim: int) -> list[int]:
    """Eight channels that show the 2D sinusoid's structure: the sine of frequency pairs 0, 1, 2 and 4
    (periods 2 pi, then growing by T^(4/D) per pair) of the column half (channels 0 .. D/2-1), then
    the same of the row half. Later pairs vary too slowly to show on a small grid."""
    half = dim // 2
    xs = [2 * p for p in (0, 1, 2, 4) if 2 * p < half]
    return xs + [half + d for d in xs]


def sincos_dimension_maps(grid, dim: int, dims=None, temperature: float = 10000.0) -> torch.Tensor:
    """The fixed 2D sinusoidal position embedding (`sincos_2d`), one channel at a time, drawn over
    the patch grid: (len(dims), gh, gw), map k = channel dims[k] of every patch at its (row, column).
    Column channels vary along x only and row channels along y only, each at its own frequency."""
    from ..models.layers import sincos_2d, to_2tuple

    gh, gw = to_2tuple(grid)
    dims = default_sincos_dims(dim) if dims is None else [int(d) for d in dims]
    bad = [d for d in dims if not 0 <= d < dim]
    if bad:
        raise ConfigError(f"dims {bad} are out of range for a {dim}-wide embedding (0..{dim - 1})")
    table = sincos_2d((gh, gw), dim, temperature)            # (gh * gw, dim), raster order
    return table[:, dims].T.reshape(len(dims), gh, gw)


def model_sincos_dimension_maps(model, dims=None) -> tuple[torch.Tensor, list[int]]:
    """The maps of the model's own sincos_2d position embedding (ConfigError for other kinds)."""
    if getattr(model, "pos_embed_kind", None) != "sincos_2d":
        raise ConfigError(f"the per-dimension sinusoid maps need pos_embed='sincos_2d'; this model has "
                          f"{getattr(model, 'pos_embed_kind', None)!r}")
    pe, (gh, gw) = position_embedding_table(model)
    dims = default_sincos_dims(pe.shape[1]) if dims is None else [int(d) for d in dims]
    return pe[:, dims].T.reshape(len(dims), gh, gw), dims


# --------------------------------------------------------------------------- patch-embedding filters
def patch_embedding_weight(model) -> torch.Tensor:
    """The patch-embedding filters (D, C, p, p) of a ViT or ConvMixer; ConfigError when the
    model's first layer is not a patchify convolution on pixels."""
    w = getattr(model, "patch_embed_weight", None)
    if callable(w):
        w = w()
    if w is None:
        stem = getattr(model, "stem", None)
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        if isinstance(stem, nn.Module) and proj is not None:
            raise ConfigError(
                "this is a hybrid model: its patch embedding is a 1x1 convolution on the ResNet stem's feature map, "
                "not a filter on image pixels, so the filter components (ViT Fig. 7 left) do not apply")
        if isinstance(proj, nn.Conv2d):
            w = proj.weight
    if w is None:
        raise ConfigError(f"{type(model).__name__} has no patch-embedding convolution on pixels; filter components "
                          "apply to ViT and ConvMixer models")
    w = w.detach().float()
    if w.ndim != 4:
        raise ConfigError(f"patch-embedding weight must be (D, C, p, p); got {tuple(w.shape)}")
    if w.shape[-1] == 1 and w.shape[-2] == 1:
        raise ConfigError("the patch embedding is a 1x1 convolution: its filters are single pixels, "
                          "so filter components show nothing")
    return w


@dataclass
class FilterComponents:
    """Top-k principal components of the patch-embedding filters.

    components: (k, C, p, p), orthonormal when flattened; explained_variance_ratio: (k,),
    each component's share of the total variance of the D filters (all ratios sum to 1).
    """
    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor
    num_filters: int


def embedding_filter_components(model_or_weight, k: int = 28) -> FilterComponents:
    """PCA of the patch-embedding filters (the ViT paper's Fig. 7 left: "the top principal
    components of the learned embedding filters ... resemble plausible basis functions for a
    low-dimensional representation of the fine structure within each patch").

    Each of the D filters (C x p x p) is one sample; filters are centred on their mean and
    the right singular vectors of the (D, C*p*p) matrix are the components. Signs are fixed
    so each component's largest-magnitude entry is positive (SVD signs are arbitrary).
    Accepts a model or a weight tensor (D, C, p, p).
    """
    w = model_or_weight if isinstance(model_or_weight, torch.Tensor) else patch_embedding_weight(model_or_weight)
    if w.ndim != 4:
        raise ConfigError(f"filters must be (D, C, p, p); got {tuple(w.shape)}")
    if k < 1:
        raise ConfigError(f"k={k} must be at least 1")
    d, c, ph, pw = w.shape
    x = w.detach().double().reshape(d, -1)
    x = x - x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    var = s ** 2 / max(d - 1, 1)
    total = var.sum().clamp_min(torch.finfo(var.dtype).tiny)
    k = min(k, vh.shape[0])
    comps = vh[:k]
    flip = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    comps = comps * torch.where(flip == 0, torch.ones_like(flip), flip)
    return FilterComponents(components=comps.float().reshape(k, c, ph, pw), explained_variance=var[:k].float(),
                            explained_variance_ratio=(var[:k] / total).float(), num_filters=d)


# --------------------------------------------------------------------------- ConvMixer
def _depthwise_convs(model) -> list[nn.Conv2d]:
    """Depthwise convolutions (groups == in == out channels) in module order."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1
            and m.groups == m.in_channels == m.out_channels]


def depthwise_kernels(model, layer: int) -> torch.Tensor:
    """The depthwise kernels (channels, k, k) of ConvMixer layer `layer` (negative counts from the end)."""
    fn = getattr(model, "depthwise_kernels", None)
    n = num_depthwise_layers(model)
    if n == 0:
        raise ConfigError(f"{type(model).__name__} has no depthwise convolutions; depthwise kernels apply to ConvMixer")
    if not -n <= layer < n:
        raise ConfigError(f"layer {layer} is out of range: the model has {n} depthwise layers (0..{n - 1})")
    layer = layer % n
    w = fn(layer) if callable(fn) else _depthwise_convs(model)[layer].weight
    w = w.detach().float()
    return w.reshape(w.shape[0], w.shape[-2], w.shape[-1])


def num_depthwise_layers(model) -> int:
    depth = getattr(model, "depth", None)
    if callable(getattr(model, "depthwise_kernels", None)) and isinstance(depth, int):
        return depth
    return len(_depthwise_convs(model))


def is_convmixer(model) -> bool:
    return callable(getattr(model, "depthwise_kernels", None)) or (
        type(model).__name__.lower().startswith("convmixer") and bool(_depthwise_convs(model)))
