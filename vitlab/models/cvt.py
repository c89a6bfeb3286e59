"""Convolutional vision Transformer (Wu et al., "CvT: Introducing Convolutions to Vision
Transformers", 2021).

Three stages, each:

    convolutional token embedding  conv k x k / stride s on the token map, then LayerNorm
                                   (7x7 s4 p2 in stage 1, 3x3 s2 p1 in stages 2-3)
    [class token]                  only in the last stage, concatenated after the embedding
    blocks                         pre-norm: x + Attn(LN(x)); x + MLP(LN(x))   (MLP ratio 4)

where the attention uses the *convolutional projection*: the patch tokens are reshaped to
their 2D map and each of q, k, v is a depthwise 3x3 conv + BatchNorm on that map, flattened,
then a linear projection. The query uses stride 1, key and value stride 2 ("squeezed"
projection), so Nk ~ Nq / 4. The class token is split off before the convolution (it has no
place on the map) and re-attached before the linear projections: it is never convolved.
No position embedding: the convolutions carry position.

Ablation switches (constructor arguments; every combination is valid and any image size
that yields at least one token per stage works, because convolutions take any size):

    conv_embed=False   non-overlapping patch embedding as in ViT (kernel = stride, no padding);
                       the map is zero-padded at the right/bottom to a multiple of the stride
                       first, so every image size works and the grids equal the conv embedding's
                       at 224 px (56/28/14) and at 28 px (14/7/4 for cvt_tiny).
    conv_proj=False    plain linear q/k/v (no depthwise conv, no BatchNorm). With kv_stride=2 the
                       keys/values are then squeezed by a 3x3 stride-2 average pool (the official
                       code's 'avg' projection), so the key grid equals the conv path's.
    kv_stride          1 or 2: stride of the key/value projection (query stride is always 1).
    pos_embed          'none' (paper default) or 'learned': a learned table per stage added to the
                       patch tokens right after the token embedding (before the class token);
                       resampled bicubically in 2D when the input size differs from `img_size`.

Per-stage settings (`embed_dims`, `depths`, `num_heads`, `patch_sizes`, ...) are sequences with
one entry per stage; most scalar options may also be given per stage (a scalar applies to all
stages), which is what the Hugging Face conversion needs.

Attention scale: the official CvT code (and hence the released weights and Hugging Face's port)
scales the logits by 1/sqrt(stage width), not 1/sqrt(head width). `attn_scale='dim'` (default)
keeps that, `attn_scale='head_dim'` gives the usual Transformer scale.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, check_choice
from .layers import DropPath, Mlp, attention, check_input, resample_abs_pos_embed, to_2tuple
from .registry import register_family

CVT_POS_EMBEDS = ("none", "learned")
ATTN_SCALES = ("dim", "head_dim")




def _per_stage(field: str, value, num_stages: int, scalar_ok: bool = True) -> tuple:
    """Broadcast a scalar to every stage, or check that a sequence has one entry per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ConfigError(f"{field} has {len(value)} entries but the model has {num_stages} stages "
                              f"(len(embed_dims)); give one entry per stage, e.g. {field}={tuple(value[:1]) * num_stages}")
        return tuple(value)
    if not scalar_ok:
        raise ConfigError(f"{field} must be a sequence with one entry per stage, got {value!r}")
    return (value,) * num_stages


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


# ----------------------------------------------------------------------------- token embedding
class ConvEmbed(nn.Module):
    """Convolutional token embedding: conv on the (image or token) map, flatten, LayerNorm.

    With `overlap=False` it is ViT's non-overlapping patch embedding (kernel = stride, no
    padding); the map is first zero-padded at the right/bottom to a multiple of the stride.
    """

    def __init__(self, in_chans: int, embed_dim: int, kernel: int, stride: int, padding: int,
                 overlap: bool = True, norm_eps: float = 1e-5):
        super().__init__()
        self.overlap = overlap
        if overlap:
            self.kernel, self.stride, self.padding = kernel, stride, padding
        else:
            self.kernel, self.stride, self.padding = stride, stride, 0
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.kernel, stride=self.stride, padding=self.padding)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def out_grid(self, h: int, w: int) -> tuple[int, int]:
        if self.overlap:
            return (_conv_out(h, self.kernel, self.stride, self.padding),
                    _conv_out(w, self.kernel, self.stride, self.padding))
        return -(-h // self.stride), -(-w // self.stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if not self.overlap:
            s = self.stride
            ph, pw = (-x.shape[2]) % s, (-x.shape[3]) % s
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph))
        x = self.proj(x)
        B, D, h, w = x.shape
        # (B, D, h, w) -> (B, h*w, D); a view when the conv output is channels-last
        x = x.permute(0, 2, 3, 1).reshape(B, h * w, D)
        return self.norm(x), (h, w)


# ----------------------------------------------------------------------------- attention
def _conv_projection(dim: int, kernel: int, stride: int, conv: bool) -> nn.Module | None:
    """The map -> map part of one of q/k/v: depthwise conv + BatchNorm ('dw_bn'), a 3x3
    average pool when the linear projection is squeezed, or nothing (plain linear)."""
    if conv:
        return nn.Sequential(OrderedDict(
            conv=nn.Conv2d(dim, dim, kernel, stride=stride, padding=kernel // 2, groups=dim, bias=False),
            bn=nn.BatchNorm2d(dim),
        ))
    if stride > 1:
        return nn.Sequential(OrderedDict(
            avg=nn.AvgPool2d(kernel, stride=stride, padding=kernel // 2, count_include_pad=False)))
    return None


class ConvAttention(nn.Module):
    """Multi-head attention with convolutional projection (CvT Fig. 3(c)).

    forward(x, grid, num_prefix_tokens, return_attn, residual) -> (out, attn or None).
    `x` is (B, prefix + h*w, C); the prefix (class token) bypasses the convolution.
    With `residual` the output is `residual + attention(x)`.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, conv_proj: bool = True, kv_stride: int = 2,
                 kernel: int = 3, attn_scale: str = "dim", attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"width {dim} is not divisible by num_heads={num_heads}; choose num_heads that "
                              f"divides the width (e.g. {max(1, dim // 64)})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = (dim if attn_scale == "dim" else self.head_dim) ** -0.5
        self.kernel, self.kv_stride = kernel, kv_stride
        self.conv_proj_q = _conv_projection(dim, kernel, 1, conv_proj)
        self.conv_proj_k = _conv_projection(dim, kernel, kv_stride, conv_proj)
        self.conv_proj_v = _conv_projection(dim, kernel, kv_stride, conv_proj)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def kv_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        if self.kv_stride == 1:
            return tuple(grid)
        k, s = self.kernel, self.kv_stride
        return _conv_out(grid[0], k, s, k // 2), _conv_out(grid[1], k, s, k // 2)

    @staticmethod
    def _squeeze(proj: nn.Module | None, fmap: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One of q/k/v as tokens (B, n, C): the map projection (or the tokens themselves)."""
        if proj is None:
            return tokens
        y = proj(fmap)
        B, C, h, w = y.shape
        return y.permute(0, 2, 3, 1).reshape(B, h * w, C)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0, return_attn: bool = False,
                residual: torch.Tensor | None = None, queries: int | None = None):
        """`queries=n` (n <= num_prefix_tokens): outputs for the first n (class) tokens only;
        their queries bypass the convolution, so the query map projection is skipped."""
        B, N, C = x.shape
        p = num_prefix_tokens
        if queries is not None and not 0 < queries <= p:
            raise ConfigError(f"queries={queries} must select class tokens (1..{p}) of this stage")
        prefix, tokens = x[:, :p], x[:, p:]
        fmap = tokens.reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2)  # token map (B, C, h, w)
        k = self._squeeze(self.conv_proj_k, fmap, tokens)
        v = self._squeeze(self.conv_proj_v, fmap, tokens)
        if p:  # the class token is never convolved: re-attached before the linear projections
            k, v = (torch.cat([prefix, t], dim=1) for t in (k, v))
        if queries is not None:
            q = prefix[:, :queries]
        else:
            q = self._squeeze(self.conv_proj_q, fmap, tokens)
            q = torch.cat([prefix, q], dim=1) if p else q
        return self._project_attend(q, k, v, B, C, return_attn, residual)

    def _project_attend(self, q, k, v, B: int, C: int, return_attn: bool, residual):
        """Linear projections of the q/k/v token tensors, attention, output projection (+ residual)."""
        H, d = self.num_heads, self.head_dim
        q = self.proj_q(q).reshape(B, q.shape[1], H, d).transpose(1, 2)
        k = self.proj_k(k).reshape(B, k.shape[1], H, d).transpose(1, 2)
        v = self.proj_v(v).reshape(B, v.shape[1], H, d).transpose(1, 2)
        out, attn = attention(q, k, v, self.scale, None, self.attn_drop, self.training, need_weights=return_attn)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, q.shape[2], C)))
        return (out if residual is None else residual + out), attn


class CvTBlock(nn.Module):
    """Pre-norm block: x + DropPath(Attn(LN(x))); x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 conv_proj: bool = True, kv_stride: int = 2, kernel: int = 3, attn_scale: str = "dim",
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = ConvAttention(dim, num_heads, qkv_bias, conv_proj, kv_stride, kernel, attn_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x, grid, num_prefix_tokens: int = 0, return_attn: bool = False, queries: int | None = None):
        """`queries=n`: the output of the first n (class) tokens only (see ConvAttention)."""
        h = self.norm1(x)
        if queries is not None:
            x = x[:, :queries]
        if self.drop_path.p == 0.0 or not self.training:  # the residual handed to the output projections
            x, attn = self.attn(h, grid, num_prefix_tokens, return_attn, residual=x, queries=queries)
            return self.mlp(self.norm2(x), residual=x), attn
        y, attn = self.attn(h, grid, num_prefix_tokens, return_attn, queries=queries)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn


class CvTStage(nn.Module):
    """Token embedding (+ learned position) (+ class token) then the stage's blocks."""

    def __init__(self, in_chans: int, embed_dim: int, depth: int, num_heads: int, patch_size: int, patch_stride: int,
                 patch_padding: int, conv_embed: bool, cls_token: bool, pos_embed: str, grid: tuple[int, int],
                 mlp_ratio: float, qkv_bias: bool, conv_proj: bool, kv_stride: int, kernel_qkv: int, attn_scale: str,
                 drop: float, attn_drop: float, drop_paths: Sequence[float], norm_eps: float):
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, embed_dim, patch_size, patch_stride, patch_padding, conv_embed, norm_eps)
        self.grid_size = tuple(grid)
        self.num_prefix_tokens = 1 if cls_token else 0
        self.pos_embed = (nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
                          if pos_embed == "learned" else None)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.pos_drop = nn.Dropout(drop)
        self.blocks = nn.ModuleList([
            CvTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, conv_proj, kv_stride, kernel_qkv, attn_scale,
                     drop, attn_drop, drop_paths[j], norm_eps)
            for j in range(depth)
        ])

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) map -> (B, prefix + h*w, D) tokens with position and class token."""
        tokens, grid = self.patch_embed(x)
        if self.pos_embed is not None:
            pe = self.pos_embed
            if tuple(grid) != self.grid_size:
                pe = resample_abs_pos_embed(pe, grid, self.grid_size, num_prefix_tokens=0)
            tokens = tokens + pe
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.pos_drop(tokens), grid


# ----------------------------------------------------------------------------- the model
class ConvolutionalVisionTransformer(nn.Module):
    def __init__(
        self,
        img_size=224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 192, 384),
        depths: Sequence[int] = (1, 2, 10),
        num_heads: Sequence[int] = (1, 3, 6),
        patch_sizes: Sequence[int] = (7, 3, 3),
        patch_strides: Sequence[int] = (4, 2, 2),
        patch_paddings: Sequence[int] = (2, 1, 1),
        mlp_ratio: float | Sequence[float] = 4.0,
        qkv_bias: bool | Sequence[bool] = True,
        conv_embed: bool = True,
        conv_proj: bool | Sequence[bool] = True,
        kv_stride: int | Sequence[int] = 2,
        kernel_qkv: int | Sequence[int] = 3,
        pos_embed: str = "none",
        cls_token: bool | Sequence[bool] | None = None,
        attn_scale: str = "dim",
        drop_rate: float | Sequence[float] = 0.0,
        attn_drop_rate: float | Sequence[float] = 0.0,
        drop_path_rate: float | Sequence[float] = 0.0,
        head_zero_init: bool = False,
        norm_eps: float = 1e-5,
    ):
        """
        Args:
            embed_dims, depths, num_heads: one entry per stage (the paper uses 3 stages).
            patch_sizes, patch_strides, patch_paddings: the convolutional token embedding of
                each stage (kernel, stride, padding).
            conv_embed: False = ViT-style non-overlapping patch embedding (kernel = stride).
            conv_proj: False = plain linear q/k/v (no depthwise conv + BN).
            kv_stride: 1 or 2, stride of the key/value projection (query stride is 1).
            kernel_qkv: kernel of the depthwise q/k/v convolution (3 in the paper).
            pos_embed: 'none' (paper) or 'learned' (a table per stage, added after the embedding).
            cls_token: class token per stage; default only in the last stage. Class tokens of
                earlier stages take part in their stage's attention and are then dropped (as
                the official code does). Without a last-stage class token the head averages
                the final tokens (global average pooling).
            attn_scale: 'dim' (1/sqrt(stage width), the official code) or 'head_dim'.
            drop_path_rate: per stage (or one value for all); rises linearly from 0 inside a stage.
            head_zero_init: zero-initialise the classifier (fine-tuning).
        """
        super().__init__()
        if not isinstance(embed_dims, (list, tuple)) or len(embed_dims) < 1:
            raise ConfigError(f"embed_dims must be a sequence with one width per stage, e.g. (64, 192, 384); "
                              f"got {embed_dims!r}")
        n = len(embed_dims)
        depths = _per_stage("depths", depths, n, scalar_ok=False)
        num_heads = _per_stage("num_heads", num_heads, n, scalar_ok=False)
        patch_sizes = _per_stage("patch_sizes", patch_sizes, n, scalar_ok=False)
        patch_strides = _per_stage("patch_strides", patch_strides, n, scalar_ok=False)
        patch_paddings = _per_stage("patch_paddings", patch_paddings, n, scalar_ok=False)
        mlp_ratio = _per_stage("mlp_ratio", mlp_ratio, n)
        qkv_bias = _per_stage("qkv_bias", qkv_bias, n)
        conv_proj = _per_stage("conv_proj", conv_proj, n)
        kv_stride = _per_stage("kv_stride", kv_stride, n)
        kernel_qkv = _per_stage("kernel_qkv", kernel_qkv, n)
        cls_token = _per_stage("cls_token", (False,) * (n - 1) + (True,) if cls_token is None else cls_token, n)
        drop_rate = _per_stage("drop_rate", drop_rate, n)
        attn_drop_rate = _per_stage("attn_drop_rate", attn_drop_rate, n)
        drop_path_rate = _per_stage("drop_path_rate", drop_path_rate, n)
        for field, values in dict(embed_dims=embed_dims, depths=depths, num_heads=num_heads, patch_sizes=patch_sizes,
                                  patch_strides=patch_strides).items():
            for v in values:
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ConfigError(f"{field} must hold positive integers, got {tuple(values)!r}")
        for i, (dim, heads) in enumerate(zip(embed_dims, num_heads)):
            if dim % heads:
                raise ConfigError(f"stage {i + 1}: width {dim} is not divisible by num_heads={heads}; choose "
                                  f"num_heads that divides the width (e.g. {max(1, dim // 64)})")
        for v in kv_stride:
            if v not in (1, 2):
                raise ConfigError(f"kv_stride={v!r} is not valid; use 1 (full keys/values) or 2 (the paper's "
                                  f"squeezed projection)")
        for v in kernel_qkv:
            if not isinstance(v, int) or v < 1 or v % 2 == 0:
                raise ConfigError(f"kernel_qkv={v!r} must be an odd positive integer (3 in the paper)")
        for v in patch_paddings:
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"patch_paddings must hold non-negative integers, got {tuple(patch_paddings)!r}")
        check_choice("pos_embed", pos_embed, CVT_POS_EMBEDS)
        check_choice("attn_scale", attn_scale, ATTN_SCALES)
        if not isinstance(conv_embed, bool):
            raise ConfigError(f"conv_embed must be True or False, got {conv_embed!r}")
        for field, values in dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                  drop_path_rate=drop_path_rate).items():
            for v in values:
                if not 0.0 <= v < 1.0:
                    raise ConfigError(f"{field}={v} must be in [0, 1)")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ConfigError(f"in_chans must be a positive integer, got {in_chans!r}")

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)
        self.embed_dims = tuple(embed_dims)
        self.embed_dim = self.num_features = embed_dims[-1]
        self.num_prefix_tokens = 1 if cls_token[-1] else 0
        self.global_pool = "token" if cls_token[-1] else "avg"
        self.pos_embed_kind = pos_embed
        self.conv_embed = conv_embed

        stages, chans, grid = [], in_chans, self.img_size
        stride_px = 1
        self.stage_strides: list[int] = []  # pixel stride of one token of each stage
        for i in range(n):
            embed = ConvEmbed(chans, embed_dims[i], patch_sizes[i], patch_strides[i], patch_paddings[i], conv_embed)
            grid = embed.out_grid(*grid)
            if grid[0] < 1 or grid[1] < 1:
                raise ConfigError(f"img_size {self.img_size} is too small: stage {i + 1} would have no tokens; use a "
                                  f"larger image or smaller patch_strides")
            stride_px *= patch_strides[i]
            self.stage_strides.append(stride_px)
            dprs = [drop_path_rate[i] * j / max(depths[i] - 1, 1) for j in range(depths[i])]  # no tensors: meta-safe
            stages.append(CvTStage(chans, embed_dims[i], depths[i], num_heads[i], patch_sizes[i], patch_strides[i],
                                   patch_paddings[i], conv_embed, bool(cls_token[i]), pos_embed, grid, mlp_ratio[i],
                                   bool(qkv_bias[i]), bool(conv_proj[i]), kv_stride[i], kernel_qkv[i], attn_scale,
                                   drop_rate[i], attn_drop_rate[i], dprs, norm_eps))
            chans = embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self.grid_size = grid
        self.patch_size = (self.stage_strides[-1], self.stage_strides[-1])  # pixel stride of a final token
        self.norm = nn.LayerNorm(self.embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate[-1])
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        if head_zero_init and num_classes > 0:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def _init_weights(self) -> None:
        # as the official code: truncated normal (0.02) for linear layers and tokens
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for stage in self.stages:
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)
            if stage.pos_embed is not None:
                nn.init.trunc_normal_(stage.pos_embed, std=0.02)

    def reset_classifier(self, num_classes: int, zero_init: bool = True) -> None:
        """A new classifier for fine-tuning (zero-initialised by default)."""
        self.num_classes = num_classes
        dev = self.norm.weight.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=dev) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            if zero_init:
                nn.init.zeros_(self.head.weight)
            else:
                nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay (besides norms and biases): tokens and positions."""
        return {name for name, _ in self.named_parameters() if name.endswith(("cls_token", "pos_embed"))}

    # ------------------------------------------------------------------ shapes
    def feature_grids(self, img_size) -> list[tuple[int, int]]:
        """Token grid (h, w) of every stage for an input of `img_size`."""
        h, w = to_2tuple(img_size)
        grids = []
        for stage in self.stages:
            h, w = stage.patch_embed.out_grid(h, w)
            grids.append((h, w))
        return grids

    def _check(self, x: torch.Tensor) -> None:
        check_input(x, self.in_chans, self.img_size, (1, 1), dynamic=True)
        grids = self.feature_grids((x.shape[2], x.shape[3]))
        if min(min(g) for g in grids) < 1:
            raise ConfigError(f"input {x.shape[2]}x{x.shape[3]} is too small for this CvT (a stage would have no "
                              f"tokens); use images of at least {self.stage_strides[-1]}x{self.stage_strides[-1]}")

    # ------------------------------------------------------------------ forward
    def _run(self, x: torch.Tensor, return_attn: bool = False, return_hidden: bool = False,
             last_queries: int | None = None) -> dict:
        """`last_queries=n`: the very last block computes only the first n (class) tokens."""
        self._check(x)
        attentions, grids_info, hidden, stage_embeddings = [], [], [], []
        z, grid = x, None
        for i, stage in enumerate(self.stages):
            if i > 0:
                # tokens of the previous stage (class token dropped) back to a channels-last map
                p_prev = self.stages[i - 1].num_prefix_tokens
                t = z[:, p_prev:]
                z = t.reshape(t.shape[0], grid[0], grid[1], t.shape[2]).permute(0, 3, 1, 2)
            z, grid = stage.embed(z)
            p = stage.num_prefix_tokens
            if return_hidden:
                stage_embeddings.append(z)
            for j, blk in enumerate(stage.blocks):
                last = i == len(self.stages) - 1 and j == len(stage.blocks) - 1
                z, attn = blk(z, grid, p, return_attn, queries=last_queries if last else None)
                if return_attn:
                    attentions.append(attn)
                    grids_info.append(dict(stage=i, q_grid=tuple(grid), kv_grid=blk.attn.kv_grid(grid),
                                           num_prefix_tokens=p, stride_px=self.stage_strides[i],
                                           kv_stride_px=self.stage_strides[i] * blk.attn.kv_stride))
                if return_hidden:
                    hidden.append(z)
        return {"tokens": self.norm(z), "grid": tuple(grid), "attentions": attentions, "attention_grids": grids_info,
                "hidden_states": hidden, "stage_embeddings": stage_embeddings}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> LN(final-stage tokens), (B, prefix + h*w, D) with the class token first."""
        return self._run(x)["tokens"]

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "avg":
            return tokens[:, self.num_prefix_tokens:].mean(dim=1)
        return tokens[:, 0]

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(tokens))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # class-token pooling reads only the class token of the last block: in evaluation,
        # compute just that one there (the same logits; forward_features returns every token).
        # Not in training: the skipped query convolution's BatchNorm would miss its statistics
        # update and its parameters their (zero) gradients, which weight decay and DDP expect.
        last_queries = 1 if self.global_pool == "token" and not self.training else None
        return self.forward_head(self._run(x, last_queries=last_queries)["tokens"])

    def forward_intermediates(self, x: torch.Tensor, return_attention: bool = True,
                              return_hidden_states: bool = True) -> dict:
        """Logits plus, for every block of every stage (in order):

        attentions:       (B, heads, Nq, Nk) probabilities; Nq = prefix + h*w, Nk = prefix + h'*w'
                          (smaller by the key/value stride).
        attention_grids:  dict(stage, q_grid=(h, w), kv_grid=(h', w'), num_prefix_tokens,
                          stride_px (pixels per query token), kv_stride_px (pixels per key token)).
        hidden_states:    the block's output (B, prefix + h*w, D_stage), one per block (aligned
                          with `attentions`); `stage_embeddings` holds each stage's input tokens
                          (after token embedding, position and class token).
        Also `tokens` (LN of the final tokens), `grid` (final grid), `num_prefix_tokens`.
        """
        out = self._run(x, return_attention, return_hidden_states)
        out["logits"] = self.forward_head(out["tokens"])
        out["num_prefix_tokens"] = self.num_prefix_tokens
        return out


# ----------------------------------------------------------------------------- Hugging Face
def _hf_list(cfg, key: str, n: int) -> tuple:
    v = getattr(cfg, key)
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


def hf_cvt_config(hf_config) -> dict[str, Any]:
    """Constructor kwargs of ConvolutionalVisionTransformer equivalent to a transformers CvtConfig."""
    n = len(hf_config.depth)
    get = lambda key: _hf_list(hf_config, key, n)  # noqa: E731
    methods = get("qkv_projection_method")
    kernels, pad_q, pad_kv = get("kernel_qkv"), get("padding_q"), get("padding_kv")
    stride_q, stride_kv = get("stride_q"), get("stride_kv")
    conv_proj, kv_stride = [], []
    for i in range(n):
        if stride_q[i] != 1:
            raise ConfigError(f"CvT stage {i + 1} has stride_q={stride_q[i]}; vitlab's CvT keeps the query at "
                              f"stride 1 (as the paper); convert a model with stride_q=1")
        if pad_q[i] != kernels[i] // 2 or pad_kv[i] != kernels[i] // 2:
            raise ConfigError(f"CvT stage {i + 1} pads q/k/v by {pad_q[i]}/{pad_kv[i]} with kernel {kernels[i]}; "
                              f"vitlab uses 'same' padding kernel//2 = {kernels[i] // 2}")
        if methods[i] != "dw_bn":
            # transformers' CvtSelfAttentionProjection only builds a module for 'dw_bn'; its forward
            # fails for any other method, so no such model can exist with meaningful weights
            raise ConfigError(f"CvT stage {i + 1} uses qkv_projection_method={methods[i]!r}, which transformers "
                              f"itself cannot run; only 'dw_bn' models can be converted")
        if stride_kv[i] not in (1, 2):
            raise ConfigError(f"CvT stage {i + 1} has stride_kv={stride_kv[i]}; vitlab supports 1 or 2")
        conv_proj.append(True)
        kv_stride.append(stride_kv[i])
    return dict(
        in_chans=hf_config.num_channels,
        embed_dims=tuple(hf_config.embed_dim), depths=tuple(hf_config.depth), num_heads=get("num_heads"),
        patch_sizes=get("patch_sizes"), patch_strides=get("patch_stride"), patch_paddings=get("patch_padding"),
        mlp_ratio=get("mlp_ratio"), qkv_bias=tuple(bool(b) for b in get("qkv_bias")),
        conv_embed=True, conv_proj=tuple(conv_proj), kv_stride=tuple(kv_stride), kernel_qkv=kernels,
        pos_embed="none", cls_token=tuple(bool(c) for c in get("cls_token")), attn_scale="dim",
        drop_rate=get("drop_rate"), attn_drop_rate=get("attention_drop_rate"), drop_path_rate=get("drop_path_rate"),
        norm_eps=1e-5,  # transformers' CvT builds every LayerNorm with the default eps (layer_norm_eps is unused)
    )


def _hf_key_map(model: ConvolutionalVisionTransformer, prefix: str) -> dict[str, str]:
    """vitlab key -> transformers key for every parameter and buffer."""
    m: dict[str, str] = {}
    for i, stage in enumerate(model.stages):
        hs, vs = f"{prefix}encoder.stages.{i}.", f"stages.{i}."
        emb = hs + "embedding.convolution_embeddings."
        for t in ("weight", "bias"):
            m[f"{vs}patch_embed.proj.{t}"] = emb + f"projection.{t}"
            m[f"{vs}patch_embed.norm.{t}"] = emb + f"normalization.{t}"
        if stage.cls_token is not None:
            m[vs + "cls_token"] = hs + "cls_token"
        for j, blk in enumerate(stage.blocks):
            hl, vl = hs + f"layers.{j}.", vs + f"blocks.{j}."
            for t in ("weight", "bias"):
                m[vl + f"norm1.{t}"] = hl + f"layernorm_before.{t}"
                m[vl + f"norm2.{t}"] = hl + f"layernorm_after.{t}"
                m[vl + f"attn.proj.{t}"] = hl + f"attention.output.dense.{t}"
                m[vl + f"mlp.fc1.{t}"] = hl + f"intermediate.dense.{t}"
                m[vl + f"mlp.fc2.{t}"] = hl + f"output.dense.{t}"
            for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
                ha = hl + "attention.attention."
                for t in ("weight", "bias"):
                    m[vl + f"attn.proj_{ours}.{t}"] = ha + f"projection_{theirs}.{t}"
                proj = getattr(blk.attn, f"conv_proj_{ours}")
                if proj is not None and hasattr(proj, "conv"):
                    hc = ha + f"convolution_projection_{theirs}.convolution_projection."
                    m[vl + f"attn.conv_proj_{ours}.conv.weight"] = hc + "convolution.weight"
                    for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                        m[vl + f"attn.conv_proj_{ours}.bn.{t}"] = hc + f"normalization.{t}"
    return m


def convert_hf_cvt(hf_model, num_classes: int | None = None) -> ConvolutionalVisionTransformer:
    """A transformers `CvtForImageClassification` (or `CvtModel`) as the equivalent vitlab model.

    The state dict is mapped key by key (no transformers code at run time beyond reading the
    model). From `CvtModel` (no final LayerNorm, no classifier) the result has `num_classes=0`
    and a freshly initialised final LayerNorm (weight 1, bias 0): its pre-norm hidden states
    equal the HF encoder's. Raises CheckpointError listing any key that did not map.
    """
    from ..errors import CheckpointError

    cfg = hf_model.config
    if getattr(cfg, "model_type", None) != "cvt":
        raise ConfigError(f"convert_hf_cvt needs a transformers CvT model, got model_type="
                          f"{getattr(cfg, 'model_type', None)!r}; use vitlab.from_transformers for other families")
    sd = hf_model.state_dict()
    with_head = any(k.startswith("cvt.") for k in sd)
    prefix = "cvt." if with_head else ""
    kwargs = hf_cvt_config(cfg)
    if num_classes is None:
        num_classes = (cfg.num_labels if cfg.num_labels > 0 else 0) if with_head else 0
    image_size = getattr(cfg, "image_size", None) or 224
    model = ConvolutionalVisionTransformer(img_size=image_size, num_classes=num_classes, **kwargs)
    key_map = _hf_key_map(model, prefix)
    if with_head:
        for t in ("weight", "bias"):
            key_map[f"norm.{t}"] = f"layernorm.{t}"
            if num_classes > 0 and num_classes == cfg.num_labels:
                key_map[f"head.{t}"] = f"classifier.{t}"
    ours = model.state_dict()
    new_sd, missing = {}, []
    for k, v in ours.items():
        src = key_map.get(k)
        if src is None or src not in sd:
            missing.append(k)
            continue
        if sd[src].shape != v.shape:
            raise CheckpointError(f"HF tensor {src} has shape {tuple(sd[src].shape)} but vitlab's {k} needs "
                                  f"{tuple(v.shape)}; the HF config and weights disagree (e.g. a class token in a "
                                  f"stage whose width differs from the last stage's)")
        new_sd[k] = sd[src]
    used = set(key_map[k] for k in new_sd)
    unexpected = [k for k in sd if k not in used and not (k.startswith("classifier.") and num_classes != cfg.num_labels)]
    allowed_missing = set() if with_head else {"norm.weight", "norm.bias"}
    if num_classes > 0 and (not with_head or num_classes != cfg.num_labels):
        allowed_missing |= {"head.weight", "head.bias"}
    really_missing = [k for k in missing if k not in allowed_missing]
    if really_missing or unexpected:
        raise CheckpointError(f"cannot map the HF CvT weights: missing {really_missing[:10]} "
                              f"({len(really_missing)} in all), unexpected {unexpected[:10]} ({len(unexpected)} in all)")
    model.load_state_dict(new_sd, strict=False)
    return model


# ----------------------------------------------------------------------------- registry
# CvT paper, Table 2. Widths 64/192/384 (W24: 192/768/1024), heads = width / 64 per stage.
VARIANTS = {
    "cvt_13": dict(embed_dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6), drop_path_rate=(0.0, 0.0, 0.1)),
    "cvt_21": dict(embed_dims=(64, 192, 384), depths=(1, 4, 16), num_heads=(1, 3, 6), drop_path_rate=(0.0, 0.0, 0.1)),
    "cvt_w24": dict(embed_dims=(192, 768, 1024), depths=(2, 2, 20), num_heads=(3, 12, 16),
                    drop_path_rate=(0.0, 0.0, 0.1)),
    # A small CvT for 28-32 px images on a CPU (MNIST/CIFAR): every stage embeds with a 3x3
    # stride-2 conv (28 px -> 14/7/4 token grids, 32 px -> 16/8/4) instead of 7x7/4 then 3x3/2,
    # which would leave a 2x2 grid in stage 3; widths 32/64/128, depths 1/1/2, heads 1/2/4.
    "cvt_tiny": dict(embed_dims=(32, 64, 128), depths=(1, 1, 2), num_heads=(1, 2, 4), patch_sizes=(3, 3, 3),
                     patch_strides=(2, 2, 2), patch_paddings=(1, 1, 1)),
}
ALIASES = {"CvT-13": "cvt_13", "CvT-21": "cvt_21", "CvT-W24": "cvt_w24"}
DESCRIPTIONS = {"cvt_13": "CvT-13 (Wu et al. 2021)", "cvt_21": "CvT-21 (Wu et al. 2021)",
                "cvt_w24": "CvT-W24 (Wu et al. 2021)",
                "cvt_tiny": "small CvT for 28-32 px images (3x3/2 token embeddings, widths 32/64/128)"}
DEFAULT_IMG = {"cvt_tiny": 28}

register_family("cvt", ConvolutionalVisionTransformer, VARIANTS, ALIASES, DESCRIPTIONS, DEFAULT_IMG)
