"""Attention analyses of the ViT paper: mean attention distance (Fig. 7 right) and
attention rollout (Abnar & Zuidema 2020, the paper's Fig. 6 / Appendix D.8).

Everything here is a plain function on tensors; `collect_attentions` runs a model once over
a batch of images and reduces the per-layer attention on the fly, so memory stays at one
batch of attention maps however many images are analysed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.layers import to_2tuple

HEAD_FUSIONS = ("mean", "max", "min")


# --------------------------------------------------------------------------- geometry
def patch_centres(grid_size, stride_px, offset_px=None, device=None) -> torch.Tensor:
    """Pixel coordinates (y, x) of the centre of every token of a `grid_size` grid, raster order.

    Token (i, j) of a grid whose tokens are `stride_px` pixels apart sits at
    offset + (i * stride_y, j * stride_x); the default offset is half a stride, i.e. the
    centre of a non-overlapping patch. Returns (gh * gw, 2) float64.
    """
    gh, gw = to_2tuple(grid_size)
    sy, sx = (float(s) for s in _pair_float(stride_px))
    oy, ox = (sy / 2, sx / 2) if offset_px is None else _pair_float(offset_px)
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64, device=device),
                            torch.arange(gw, dtype=torch.float64, device=device), indexing="ij")
    return torch.stack([oy + ys.reshape(-1) * sy, ox + xs.reshape(-1) * sx], dim=1)


def _pair_float(v) -> tuple[float, float]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ConfigError(f"expected a number or a pair (y, x), got {v!r}")
        return float(v[0]), float(v[1])
    return float(v), float(v)


def distance_matrix(grid_size, patch_size, kv_grid_size=None, kv_patch_size=None, kv_offset_px=None,
                    device=None, dtype=torch.float32) -> torch.Tensor:
    """(Nq, Nk) Euclidean distances in pixels between query-patch and key-patch centres."""
    q = patch_centres(grid_size, patch_size, device=device)
    if kv_grid_size is None and kv_patch_size is None and kv_offset_px is None:
        k = q
    else:
        k = patch_centres(kv_grid_size if kv_grid_size is not None else grid_size,
                          kv_patch_size if kv_patch_size is not None else patch_size, kv_offset_px, device=device)
    return torch.cdist(q, k).to(dtype)


def attention_distance(attn: torch.Tensor, grid_size, patch_size, num_prefix_tokens: int = 0,
                       kv_grid_size=None, kv_patch_size=None, kv_offset_px=None) -> torch.Tensor:
    """Mean attention distance in pixels (the ViT paper's Fig. 7 right, "analogous to the
    receptive field size in CNNs").

    For each query patch, the distance from its centre to every key patch centre, weighted by
    the attention it pays to that key; then the mean over query patches.

    Args:
        attn: attention probabilities (..., Nq, Nk) (e.g. (B, heads, N, N) from one layer);
            rows include `num_prefix_tokens` leading prefix tokens (class token).
        grid_size: (gh, gw) patch grid of the queries.
        patch_size: pixel stride between neighbouring query tokens (int or (y, x)).
        num_prefix_tokens: leading tokens that have no position in the image.
        kv_grid_size, kv_patch_size: grid and pixel stride of the keys when they differ from
            the queries' (CvT's key/value projection has stride 2: keys lie on a grid of half
            the resolution, twice the stride).
        kv_offset_px: pixel centre (y, x) of key token (0, 0); default half of kv_patch_size
            (non-overlapping cells). A conv of kernel k, stride t, padding p on a query grid
            of stride s centres key 0 at (-p + (k - 1) / 2 + 1/2) * s.

    Prefix tokens: the class token has no location, so it is dropped both as a query and as a
    key, and every remaining row is renormalised to sum to 1 — the distance is then the
    expected distance *given* that the query attends to an image patch. (Keeping the class
    token's share as distance 0 would mix "attends to the class token" into "attends
    locally".) A row whose whole mass went to prefix tokens has distance 0.

    Returns a tensor of shape (...) (the leading dimensions of `attn`), in pixels.
    """
    if attn.ndim < 2:
        raise ConfigError(f"attention must have shape (..., N, N); got {tuple(attn.shape)}")
    gh, gw = to_2tuple(grid_size)
    kgh, kgw = to_2tuple(kv_grid_size) if kv_grid_size is not None else (gh, gw)
    p = int(num_prefix_tokens)
    if attn.shape[-2] != p + gh * gw or attn.shape[-1] != p + kgh * kgw:
        raise ConfigError(
            f"attention of shape {tuple(attn.shape)} does not match {p} prefix token(s) + a "
            f"{gh}x{gw} query grid and a {kgh}x{kgw} key grid (expected (..., {p + gh * gw}, {p + kgh * kgw})); "
            f"pass the grid the model used (forward_intermediates returns it)")
    a = attn[..., p:, p:].float()  # a view when attn is float32: no copy of the maps
    d = distance_matrix((gh, gw), patch_size, kv_grid_size, kv_patch_size, kv_offset_px, device=a.device)
    # sum_k a[q, k] d[q, k] / sum_k a[q, k]: one contraction over keys, then the renormalisation
    # on the (..., Nq) sums rather than on the full maps; the clamp makes a row with no mass on
    # patches contribute 0 instead of NaN
    weighted = torch.einsum("...qk,qk->...q", a, d)
    mass = a.sum(dim=-1).clamp_min(torch.finfo(a.dtype).tiny)
    return (weighted / mass).mean(dim=-1)


def mean_pairwise_distance(grid_size, patch_size) -> float:
    """Mean distance between two patches drawn uniformly (with replacement): the attention
    distance of a head that attends uniformly — the largest a head reaches on average."""
    d = distance_matrix(grid_size, patch_size, dtype=torch.float64)
    return float(d.mean())


# --------------------------------------------------------------------------- rollout
def attention_rollout(attentions: Sequence[torch.Tensor], num_prefix_tokens: int, head_fusion: str = "mean",
                      discard_ratio: float = 0.0, grid_size=None) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much each input patch flows into the
    output token through all layers.

    Per layer, heads are fused ('mean', 'max' or 'min'), optionally the weakest
    `discard_ratio` fraction of patch-to-patch weights are zeroed (prefix rows and columns
    are kept, so the class token's paths are never cut), the residual connection is
    accounted for as A' = 0.5 A + 0.5 I, rows are renormalised, and the layers are multiplied:
    R = A'_L ... A'_1.

    The map is R's class-token row over the patches when there is a prefix token; for
    models without one (GAP) it is the mean of R's patch rows (every patch is an output).

    Args:
        attentions: per layer (B, heads, N, N) (or (B, N, N), already fused).
        grid_size: (gh, gw) to reshape the map; inferred for square grids when None.
    Returns (B, gh, gw).
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ConfigError(f"head_fusion={head_fusion!r} is not valid; choose one of: {', '.join(HEAD_FUSIONS)}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ConfigError(f"discard_ratio={discard_ratio} must be in [0, 1)")
    if not attentions:
        raise ConfigError("attention_rollout needs at least one layer of attention")
    p = int(num_prefix_tokens)
    rollout = None
    for a in attentions:
        a = a.float()
        if a.ndim == 4:
            a = {"mean": lambda t: t.mean(1), "max": lambda t: t.amax(1), "min": lambda t: t.amin(1)}[head_fusion](a)
        if a.ndim != 3 or a.shape[-1] != a.shape[-2]:
            raise ConfigError(f"rollout needs square attention (B, heads, N, N) per layer; got {tuple(a.shape)} "
                              "(models whose keys are downsampled, like CvT, have no rollout)")
        n = a.shape[-1]
        if discard_ratio > 0:
            patch = a[:, p:, p:].reshape(a.shape[0], -1)
            k = int(patch.shape[1] * discard_ratio)
            if k:
                idx = patch.topk(k, dim=1, largest=False).indices
                patch = patch.scatter(1, idx, 0.0)
                a = a.clone()
                a[:, p:, p:] = patch.reshape(a.shape[0], n - p, n - p)
        a = 0.5 * a + 0.5 * torch.eye(n, device=a.device, dtype=a.dtype)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    m = rollout[:, 0, p:] if p else rollout[:, p:, p:].mean(dim=1)
    np_ = m.shape[-1]
    if grid_size is None:
        side = int(round(np_ ** 0.5))
        if side * side != np_:
            raise ConfigError(f"cannot infer the grid of {np_} patches; pass grid_size=(gh, gw)")
        grid_size = (side, side)
    gh, gw = to_2tuple(grid_size)
    if gh * gw != np_:
        raise ConfigError(f"grid {gh}x{gw} does not match {np_} patch tokens")
    return m.reshape(m.shape[0], gh, gw)


# --------------------------------------------------------------------------- one batched pass
@dataclass
class AttentionStats:
    """What one pass over the images gathered (means over all images).

    distance[l] is the (heads,) mean attention distance in pixels of block l; stage[l] the
    stage of block l (0 for single-stage models); rollout (num_images, gh, gw) or None.
    """
    distance: list[torch.Tensor]
    stage: list[int]
    grids: list[dict]
    num_images: int
    logits: torch.Tensor
    rollout: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None  # last block's class-token attention (N, kgh, kgw) when no rollout
    image_size: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)

    def distance_matrix(self) -> torch.Tensor | None:
        """(layers, heads) when every block has the same number of heads, else None."""
        if len({d.numel() for d in self.distance}) == 1:
            return torch.stack(self.distance)
        return None


def _standardise(batch: torch.Tensor, mean, std, device) -> torch.Tensor:
    """uint8 images -> float normalised with the dataset's mean/std; float images pass through."""
    x = batch.to(device)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
        if mean is not None:
            m = torch.as_tensor(mean, dtype=x.dtype, device=device).reshape(1, -1, 1, 1)
            s = torch.as_tensor(std, dtype=x.dtype, device=device).reshape(1, -1, 1, 1)
            x = (x - m) / s
    return x.float()


def _grids_of(out: dict, model) -> list[dict]:
    """Per-block token geometry: ViT from (grid, num_prefix_tokens, patch_size); CvT gives it."""
    if "attention_grids" in out:
        grids = [dict(g) for g in out["attention_grids"]]
        # Key/value projections with a strided conv or pool (CvT: kernel k, stride t, padding
        # k // 2) centre key token i on query token t * i, not on the middle of a cell of the
        # coarser grid: the centre of key 0 is (-pad + (k - 1) / 2 + 1/2) query strides.
        attn_mods = [m for m in model.modules() if hasattr(m, "kv_stride") and hasattr(m, "kernel")]
        if len(attn_mods) == len(grids):
            for g, m in zip(grids, attn_mods):
                if "kv_offset_px" not in g and tuple(g["kv_grid"]) != tuple(g["q_grid"]):
                    k = int(m.kernel)
                    sy, sx = _pair_float(g["stride_px"])
                    c = -(k // 2) + (k - 1) / 2 + 0.5
                    g["kv_offset_px"] = (c * sy, c * sx)
        return grids
    grid = tuple(out["grid"])
    stride = tuple(getattr(model, "patch_size", (1, 1)))
    return [dict(stage=0, q_grid=grid, kv_grid=grid, num_prefix_tokens=int(out["num_prefix_tokens"]),
                 stride_px=stride, kv_stride_px=stride) for _ in out["attentions"]]


def _kv_offset(g: dict):
    """Pixel centre of key token 0: given by the model, or cell-centred on the key grid."""
    return g.get("kv_offset_px")


@torch.no_grad()
def collect_attentions(model, images: torch.Tensor, batch_size: int = 64, mean=None, std=None,
                       rollout: bool = True, head_fusion: str = "mean", discard_ratio: float = 0.0,
                       device=None, autocast: bool = False) -> AttentionStats:
    """One batched pass (eval, no_grad) over `images`, reducing attention on the fly.

    `images` are (N, C, H, W): uint8 (normalised here with `mean`/`std`) or float (already
    normalised). Per block, the attention distance is summed over images batch by batch and
    divided at the end; rollout maps (small: one grid per image) are kept for every image.
    The model must provide `forward_intermediates(x)` with per-block `attentions`.
    """
    if not hasattr(model, "forward_intermediates"):
        raise ConfigError(f"{type(model).__name__} has no attention to analyse (no forward_intermediates); "
                          "attention distance and rollout apply to ViT, hybrid and CvT models")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ConfigError(f"images must be a non-empty batch (N, C, H, W); got {tuple(images.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: list[torch.Tensor] | None = None
    grids: list[dict] = []
    logits, maps, cls_maps = [], [], []
    notes: list[str] = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = _standardise(images[start:start + batch_size], mean, std, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model.forward_intermediates(x, **_intermediate_kwargs(model))
            atts = out["attentions"]
            if not atts:
                raise ConfigError(f"{type(model).__name__} returned no attention maps")
            grids = _grids_of(out, model)
            batch_sums = []
            for a, g in zip(atts, grids):
                d = attention_distance(a.float(), g["q_grid"], g["stride_px"], g["num_prefix_tokens"],
                                       g["kv_grid"], g["kv_stride_px"], _kv_offset(g))  # (B, H)
                batch_sums.append(d.sum(0).double().cpu())
            sums = batch_sums if sums is None else [s + b for s, b in zip(sums, batch_sums)]
            logits.append(out["logits"].float().cpu())
            square = all(a.shape[-1] == a.shape[-2] for a in atts) and len({a.shape[-1] for a in atts}) == 1
            if rollout and square:
                maps.append(attention_rollout(atts, grids[0]["num_prefix_tokens"], head_fusion, discard_ratio,
                                              grids[0]["q_grid"]).cpu())
            elif rollout:
                # CvT: token sets change between stages and keys are downsampled, so the
                # product of attention matrices is undefined; show the last block's class-token
                # attention (or the mean over patch queries) over its key grid instead.
                g, a = grids[-1], atts[-1].float().mean(1)
                p = g["num_prefix_tokens"]
                m = a[:, 0, p:] if p else a[:, p:, p:].mean(1)
                cls_maps.append(m.reshape(m.shape[0], *g["kv_grid"]).cpu())
    finally:
        model.train(was_training)
    n = images.shape[0]
    if cls_maps:
        notes.append("rollout needs square attention in every block with one token set; this model downsamples "
                     "keys/values and changes tokens between stages, so the last block's attention is shown instead")
    return AttentionStats(
        distance=[(s / n).float() for s in sums], stage=[int(g.get("stage", 0)) for g in grids], grids=grids,
        num_images=n, logits=torch.cat(logits), rollout=torch.cat(maps) if maps else None,
        cls_attention=torch.cat(cls_maps) if cls_maps else None, image_size=tuple(images.shape[-2:]), notes=notes)


def _intermediate_kwargs(model) -> dict:
    """Ask ViT not to keep hidden states (memory); other models take x alone."""
    import inspect

    params = inspect.signature(model.forward_intermediates).parameters
    return {"return_hidden_states": False} if "return_hidden_states" in params else {}


def upsample_map(m: torch.Tensor, size) -> torch.Tensor:
    """(B, gh, gw) -> (B, H, W) bilinear, to overlay a token map on its image."""
    return F.interpolate(m[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
