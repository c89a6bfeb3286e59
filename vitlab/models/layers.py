"""Layers shared by the transformer families: attention, MLP, pre-norm block, stochastic
depth, patch embedding and every kind of position embedding the seeds describe.

Normal runs use the fused `scaled_dot_product_attention`; `return_attn=True` switches a
layer to the explicit softmax(QK^T/sqrt(d)) V path so the probabilities can be returned
(the analysis tools need them), computing the same function.

This file is the papers' math in plain PyTorch. Faster ways to compute the same functions on
particular hardware live beside the models in `vitlab.accel`, which swaps these modules for
subclasses with the same parameters (`vitlab.accel.accelerate`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

POS_EMBED_KINDS = ("none", "learned", "learned_2d", "sincos_1d", "sincos_2d", "relative")


def to_2tuple(x) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ConfigError(f"expected an int or a pair (height, width), got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


# --------------------------------------------------------------------------- regularisers
class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability `p`."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p}"


# --------------------------------------------------------------------------- sinusoids
def sincos_1d(num_positions: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """PE(x, 2i) = sin(x / T^(2i/D)), PE(x, 2i+1) = cos(x / T^(2i/D)) (slide deck, p.78).

    Returns (num_positions, dim); sine and cosine interleaved, as in the formula.
    """
    if dim % 2:
        raise ConfigError(f"sincos_1d position embedding needs an even width, got {dim}")
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    i = torch.arange(dim // 2, dtype=torch.float64)[None, :]
    angle = pos / temperature ** (2 * i / dim)
    out = torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(num_positions, dim)
    return out.float()


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """2D sinusoid (slide deck, p.86): the first D/2 channels encode the column x,
    PE(x, y, 2i) = sin(x / T^(4i/D)), PE(x, y, 2i+1) = cos(x / T^(4i/D)), and the last D/2
    encode the row y the same way. Returns (gh*gw, dim) in raster (row-major) order.
    """
    if dim % 4:
        raise ConfigError(f"sincos_2d position embedding needs a width divisible by 4, got {dim}")
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    half = dim // 2
    # sincos_1d over D/2 channels uses T^(2i/(D/2)) = T^(4i/D): exactly the 2D formula.
    table_x = sincos_1d(gw, half, temperature)
    table_y = sincos_1d(gh, half, temperature)
    return torch.cat([table_x[xs.reshape(-1)], table_y[ys.reshape(-1)]], dim=1)


# --------------------------------------------------------------------------- resampling
def resample_abs_pos_embed(pos_embed: torch.Tensor, new_grid: Sequence[int], old_grid: Sequence[int] | None = None,
                           num_prefix_tokens: int = 1, mode: str = "bicubic") -> torch.Tensor:
    """Resample a learned (1, prefix + gh*gw, D) position embedding to a new patch grid.

    The grid part is treated as a (D, gh, gw) image and resized in 2D (bicubic, as the ViT
    paper does for fine-tuning at higher resolution); prefix tokens (class token) are left
    alone. Same grid in, same tensor out. Usable on a state dict entry on its own.
    """
    new_grid = to_2tuple(new_grid)
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(math.isqrt(n))
        if side * side != n:
            raise ConfigError(f"cannot infer a square grid from {n} position embeddings; pass old_grid=(h, w)")
        old_grid = (side, side)
    old_grid = to_2tuple(old_grid)
    if old_grid[0] * old_grid[1] != n:
        raise ConfigError(f"position embedding has {n} grid entries, which is not the grid {old_grid}")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    dtype = grid.dtype
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    downsample = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False, antialias=downsample)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(dtype)
    return torch.cat([prefix, grid], dim=1)


def resample_1d(table: torch.Tensor, length: int) -> torch.Tensor:
    """Resize an (L, D) table of embeddings along L (linear) — used for learned_2d rows/cols."""
    if table.shape[0] == length:
        return table
    t = table.float().t()[None]  # (1, D, L)
    t = F.interpolate(t, size=length, mode="linear", align_corners=False)
    return t[0].t().to(table.dtype)


# --------------------------------------------------------------------------- relative bias
class RelativePositionBias(nn.Module):
    """A learned bias b[h, dy, dx] added to attention logits for every pair of patches
    (the ViT paper's relative position embedding ablation, Appendix D.4), plus three
    learned entries for prefix tokens: prefix->patch, patch->prefix, prefix->prefix.
    The table is resampled bicubically when the grid changes.
    """

    def __init__(self, grid: tuple[int, int], num_heads: int, num_prefix_tokens: int = 0):
        super().__init__()
        self.grid = to_2tuple(grid)
        self.num_prefix_tokens = num_prefix_tokens
        gh, gw = self.grid
        self.table = nn.Parameter(torch.zeros(num_heads, 2 * gh - 1, 2 * gw - 1))
        self.prefix = nn.Parameter(torch.zeros(num_heads, 3)) if num_prefix_tokens else None
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        gh, gw = grid
        table = self.table
        if (gh, gw) != self.grid:
            table = F.interpolate(table[None].float(), size=(2 * gh - 1, 2 * gw - 1), mode="bicubic",
                                  align_corners=False)[0].to(self.table.dtype)
        ys, xs = torch.meshgrid(torch.arange(gh, device=table.device), torch.arange(gw, device=table.device),
                                indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        dy = ys[:, None] - ys[None, :] + gh - 1
        dx = xs[:, None] - xs[None, :] + gw - 1
        bias = table[:, dy, dx]  # (H, N, N)
        p = self.num_prefix_tokens
        if p:
            h, n = bias.shape[0], bias.shape[1]
            full = bias.new_empty(h, p + n, p + n)
            full[:, p:, p:] = bias
            full[:, :p, p:] = self.prefix[:, 0, None, None]
            full[:, p:, :p] = self.prefix[:, 1, None, None]
            full[:, :p, :p] = self.prefix[:, 2, None, None]
            bias = full
        return bias


# --------------------------------------------------------------------------- core blocks
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              bias: torch.Tensor | None = None, dropout_p: float = 0.0, training: bool = False,
              need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T * scale + bias) v on (B, H, N, d) tensors; returns (out, probabilities or None).

    `bias` is an additive logit bias broadcastable to (B, H, Nq, Nk) (a (H, Nq, Nk) table is
    allowed). With `need_weights` the probabilities are computed explicitly and returned (the
    analysis tools read them); otherwise the fused `scaled_dot_product_attention` runs.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dropout_p = dropout_p if training else 0.0
    if need_weights:
        logits = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        attn = logits.softmax(dim=-1)
        dropped = F.dropout(attn, dropout_p, True) if dropout_p else attn
        return dropped @ v, attn
    mask = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale), None


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    forward(x, return_attn=False, bias=None) -> (out, attn or None). `bias` is an additive
    (heads, N, N) logit bias (relative position).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"width {dim} is not divisible by num_heads={num_heads}; "
                              f"choose num_heads that divides the width (e.g. {dim // 64 or 1})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, return_attn: bool = False, bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None, queries: int | None = None):
        """`residual`, when given, is added to the output: `residual + attn(x)`. `queries=n`: outputs
        for the first n tokens only (all N tokens still give keys and values); `residual` then has
        n tokens."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        x, attn = self._attention(qkv, return_attn, bias, queries)
        out = self.proj_drop(self.proj(x))
        return (out if residual is None else residual + out), attn

    def _attention(self, qkv, return_attn: bool, bias, queries):
        """(out (B, Nq, C), probabilities or None) from qkv (B, N, 3, H, d)."""
        B = qkv.shape[0]
        # (B, H, N, d) views; unbinding dim 2 makes their gradient one (B, N, 3, H, d) buffer, which
        # the qkv projection's backward reads as it is (no stacked copy to permute back)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        if queries is not None:
            q = q[:, :, :queries]
            bias = None if bias is None else bias[..., :queries, :]
        x, attn = self.attend(q, k, v, bias, return_attn)
        return x.transpose(1, 2).reshape(B, q.shape[2], -1), attn

    def attend(self, q, k, v, bias, need_weights: bool):
        """The attention core on (B, H, N, d): softmax(q k^T * scale + bias) v (and the probabilities)."""
        return attention(q, k, v, self.scale, bias, self.attn_drop, self.training, need_weights=need_weights)


class Mlp(nn.Module):
    """fc1 -> act -> fc2 (with dropout after the activation and after fc2)."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x, residual: torch.Tensor | None = None):
        """fc2(act(fc1(x))); with `residual`, `residual + mlp(x)`."""
        out = self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
        return out if residual is None else residual + out


class AttentionPool(nn.Module):
    """Multi-head attention pooling (big_vision's MAPHead, timm's AttentionPoolLatent): a
    learned probe query attends over all tokens, then a residual MLP on its layer-normed
    output; returns one vector per image (B, D). Names follow timm: latent, q, kv, proj,
    norm, mlp.fc1/fc2."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"width {dim} is not divisible by num_heads={num_heads} (attention pooling)")
        self.num_heads = num_heads
        self.latent = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.num_heads
        q = self.q(self.latent).expand(B, -1, -1).reshape(B, -1, h, D // h).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)
        out, _ = attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, -1, D))
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


class Block(nn.Module):
    """Pre-norm transformer encoder block (ViT eq. 2-3): x + MSA(LN(x)); x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x, return_attn: bool = False, bias: torch.Tensor | None = None, queries: int | None = None):
        """`queries=n`: the block's output for the first n tokens only (B, n, D), attending to
        all of x. With class-token pooling the last block needs only the class token's output:
        the same logits for about a quarter of that block's work (the qkv projection still runs
        on every token; attention, output projection and MLP on one)."""
        h = self.norm1(x)
        if queries is not None:
            x = x[:, :queries]
        if self.drop_path.p == 0.0 or not self.training:
            # no stochastic depth: the residual is handed to the output projections (where
            # `vitlab.accel` fuses the add into the product)
            x, attn = self.attn(h, return_attn=return_attn, bias=bias, residual=x, queries=queries)
            return self.mlp(self.norm2(x), residual=x), attn
        y, attn = self.attn(h, return_attn=return_attn, bias=bias, queries=queries)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping p x p patches and project each linearly to D
    (a conv with kernel = stride = p, as the seeds show). Output (B, N, D) and the grid."""

    def __init__(self, img_size, patch_size, in_chans: int, embed_dim: int, dynamic_img_size: bool = False):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        check_divisible(self.img_size, self.patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.dynamic_img_size = dynamic_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x):
        check_input(x, self.proj.in_channels, self.img_size, self.patch_size, self.dynamic_img_size)
        x = self.proj(x)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid


def check_divisible(img_size: tuple[int, int], patch_size: tuple[int, int]) -> None:
    if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
        raise ConfigError(
            f"image size {img_size[0]}x{img_size[1]} is not divisible by the patch size "
            f"{patch_size[0]}x{patch_size[1]}; use an image size that is a multiple of "
            f"{patch_size[0]} (e.g. {max(1, round(img_size[0] / patch_size[0])) * patch_size[0]})"
        )


def check_input(x: torch.Tensor, in_chans: int, img_size, patch_size, dynamic: bool) -> None:
    """One clear error for a wrong input shape, instead of a conv/reshape failure deep inside."""
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"expected a tensor of images of shape (batch, {in_chans}, H, W), got a {type(x).__name__}; "
                          f"stack the images into one tensor first (torch.stack)")
    if x.ndim == 4 and x.shape[0] == 0:
        raise ConfigError("got an empty batch (0 images); pass at least one image")
    if x.ndim != 4:
        raise ConfigError(f"expected images of shape (batch, {in_chans}, H, W), got a tensor of shape "
                          f"{tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ConfigError(f"the model takes {in_chans}-channel images but got {x.shape[1]} channels "
                          f"(shape {tuple(x.shape)}); build it with in_chans={x.shape[1]} or convert the images")
    h, w = x.shape[2], x.shape[3]
    if dynamic:
        if h % patch_size[0] or w % patch_size[1]:
            raise ConfigError(f"input {h}x{w} is not divisible by the patch size {patch_size[0]}x{patch_size[1]}; "
                              f"resize or pad the images to a multiple of {patch_size[0]}")
    elif (h, w) != tuple(img_size):
        raise ConfigError(f"the model was built for {img_size[0]}x{img_size[1]} images but got {h}x{w}; "
                          f"resize the input, call model.set_input_size({h}) or build with dynamic_img_size=True")
