"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words"), with every
option the paper and its ablations use, and the hybrid (ResNet stem + ViT, 1x1 patches).

    z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos          (eq. 1)
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                      (eq. 2)
    z_l = MLP(LN(z'_l)) + z'_l                             (eq. 3)
    y = LN(z_L^0)                                          (eq. 4)

Options are explicit constructor arguments (timm style); named variants live in the
registry at the bottom as data.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import CheckpointError, ConfigError, check_choice
from .layers import (POS_EMBED_KINDS, AttentionPool, Block, PatchEmbed, RelativePositionBias, check_input, resample_1d,
                     resample_abs_pos_embed, sincos_1d, sincos_2d, to_2tuple)
from .registry import register_family

GLOBAL_POOLS = ("token", "avg", "map")
HEADS = ("linear", "mlp_tanh")




class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        global_pool: str = "token",
        class_token: bool | None = None,
        pos_embed: str = "learned",
        head: str = "linear",
        representation_size: int | None = None,
        head_zero_init: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        fc_norm: bool = False,
        dynamic_img_size: bool = False,
        hybrid_stem: str | None = None,
        grad_checkpointing: bool = False,
    ):
        """
        Args:
            global_pool: 'token' (classify from the class token), 'avg' (global average
                pooling of the patch tokens, the paper's GAP) or 'map' (multi-head attention
                pooling: a learned probe attends over the tokens, big_vision's MAPHead).
            class_token: prepend a learned class token; default True for 'token', False otherwise.
            fc_norm: layer-normalise after pooling instead of normalising the tokens (timm's
                layout of MAE/BEiT-style GAP models: no final `norm`, an `fc_norm` on the pooled vector).
            pos_embed: 'none', 'learned' (1D), 'learned_2d' (row and column tables of D/2,
                concatenated), 'sincos_1d', 'sincos_2d' (fixed), 'relative' (learned bias in attention).
            head: 'linear', or 'mlp_tanh' (the paper's pre-training head: one hidden layer of
                `representation_size` (default D) with tanh).
            head_zero_init: zero-initialise the final linear layer (the paper's fine-tuning head).
            dynamic_img_size: accept any image size divisible by the patch size at run time.
            hybrid_stem: name of a BiT ResNet stem ('r50_s32', 'r50_s16', ...) that turns the image
                into a feature map; patches are then 1x1 on that map (the paper's hybrid).
            grad_checkpointing: recompute each block in the backward pass instead of storing its
                activations (less memory, about one more forward of compute); see
                `set_grad_checkpointing`.
        """
        super().__init__()
        check_choice("global_pool", global_pool, GLOBAL_POOLS)
        check_choice("pos_embed", pos_embed, POS_EMBED_KINDS)
        check_choice("head", head, HEADS)
        for name, v in dict(drop_rate=drop_rate, pos_drop_rate=pos_drop_rate, attn_drop_rate=attn_drop_rate,
                            drop_path_rate=drop_path_rate).items():
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name}={v} must be in [0, 1)")
        for name, v in dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads).items():
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if class_token is None:
            class_token = global_pool == "token"
        if global_pool == "token" and not class_token:
            raise ConfigError("global_pool='token' classifies from the class token, but class_token=False; "
                              "use global_pool='avg' or class_token=True")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.pos_embed_kind = pos_embed
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = bool(grad_checkpointing)
        self.img_size = to_2tuple(img_size)

        if hybrid_stem is not None:
            from .resnet import build_hybrid_stem  # the BiT ResNet lives with the ResNet family

            self.stem, stem_chans, stem_stride = build_hybrid_stem(hybrid_stem, in_chans)
            # The paper uses 1x1 patches on the stem's feature map; p > 1 groups p x p cells.
            # patch_size is then the pixel stride of one token: stem stride x p.
            fp = to_2tuple(patch_size)
            self.patch_size = (stem_stride * fp[0], stem_stride * fp[1])
            if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
                raise ConfigError(f"image size {self.img_size} is not divisible by the hybrid's token stride "
                                  f"{self.patch_size[0]} (stem stride {stem_stride} x patch_size {fp[0]}); "
                                  f"use a multiple of {self.patch_size[0]}")
            self.patch_embed = PatchEmbed((self.img_size[0] // stem_stride, self.img_size[1] // stem_stride), fp,
                                          stem_chans, embed_dim, dynamic_img_size=True)
            self.in_chans = in_chans
        else:
            self.stem = None
            self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim, dynamic_img_size)
            self.patch_size = self.patch_embed.patch_size
            self.in_chans = in_chans
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        gh, gw = self.grid_size

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        # Learned tables; fixed sinusoids are buffers recomputed for the grid in use.
        self.pos_embed = self.pos_embed_row = self.pos_embed_col = None
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, self.num_prefix_tokens + gh * gw, embed_dim) * 0.02)
        elif pos_embed == "learned_2d":
            if embed_dim % 2:
                raise ConfigError(f"pos_embed='learned_2d' splits the width in two halves; embed_dim={embed_dim} is odd")
            self.pos_embed_col = nn.Parameter(torch.randn(gw, embed_dim // 2) * 0.02)  # X-embedding
            self.pos_embed_row = nn.Parameter(torch.randn(gh, embed_dim // 2) * 0.02)  # Y-embedding
        elif pos_embed in ("sincos_1d", "sincos_2d"):
            sincos_2d((1, 1), embed_dim) if pos_embed == "sincos_2d" else sincos_1d(1, embed_dim)  # validates width
        # class token of 2D/sinusoidal models gets its own learned position (sinusoids add none: slide p.78)
        self.cls_pos = (nn.Parameter(torch.zeros(1, 1, embed_dim))
                        if class_token and pos_embed == "learned_2d" else None)
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear rule; no tensors (meta-safe)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], norm_eps)
            for i in range(depth)
        ])
        self.rel_pos = nn.ModuleList([RelativePositionBias(self.grid_size, num_heads, self.num_prefix_tokens)
                                      for _ in range(depth)]) if pos_embed == "relative" else None
        # fc_norm: the final norm moves after pooling (timm's layout for its GAP checkpoints)
        self.norm = nn.Identity() if fc_norm else nn.LayerNorm(embed_dim, eps=norm_eps)
        self.attn_pool = (AttentionPool(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_eps)
                          if global_pool == "map" else None)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if fc_norm else None
        self.head_kind = head
        self.representation_size = representation_size or embed_dim
        self.head_drop = nn.Dropout(drop_rate)
        self._build_head(num_classes, head, head_zero_init)
        self._init_weights()

    # ------------------------------------------------------------------ construction helpers
    def _build_head(self, num_classes: int, head: str, zero_init: bool) -> None:
        if head == "mlp_tanh":
            self.pre_logits = nn.Sequential(nn.Linear(self.embed_dim, self.representation_size), nn.Tanh())
            in_features = self.representation_size
        else:
            self.pre_logits = nn.Identity()
            in_features = self.embed_dim
        self.head = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()
        if zero_init and num_classes > 0:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.head:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # the paper initialises the patch projection like a linear layer (lecun normal)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def reset_classifier(self, num_classes: int, head: str | None = None, zero_init: bool = True) -> None:
        """New head for fine-tuning: by default the paper's zero-initialised linear layer
        (the pre-training MLP head is dropped)."""
        self.num_classes = num_classes
        self.head_kind = head or "linear"
        self._build_head(num_classes, self.head_kind, zero_init)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the encoder blocks (training with autograd only)."""
        self.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay (besides norms and biases)."""
        return {n for n, _ in self.named_parameters()
                if n.startswith(("pos_embed", "cls_token", "cls_pos", "attn_pool.latent")) or ".table" in n or ".prefix" in n}

    # ------------------------------------------------------------------ sizes
    def set_input_size(self, img_size) -> None:
        """Change the default input size; learned position embeddings are resampled in 2D."""
        img_size = to_2tuple(img_size)
        if img_size[0] % self.patch_size[0] or img_size[1] % self.patch_size[1]:
            raise ConfigError(f"image size {img_size} is not divisible by the patch size {self.patch_size}; "
                              f"use a multiple of {self.patch_size[0]}")
        new_grid = (img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1])
        with torch.no_grad():
            if self.pos_embed is not None:
                self.pos_embed = nn.Parameter(resample_abs_pos_embed(self.pos_embed.data, new_grid, self.grid_size,
                                                                     self.num_prefix_tokens))
            if self.pos_embed_row is not None:
                self.pos_embed_row = nn.Parameter(resample_1d(self.pos_embed_row.data, new_grid[0]))
                self.pos_embed_col = nn.Parameter(resample_1d(self.pos_embed_col.data, new_grid[1]))
            if self.rel_pos is not None:
                for rp in self.rel_pos:
                    t = F.interpolate(rp.table.data[None], size=(2 * new_grid[0] - 1, 2 * new_grid[1] - 1),
                                      mode="bicubic", align_corners=False)[0]
                    rp.table = nn.Parameter(t)
                    rp.grid = new_grid
        self.img_size = img_size
        self.grid_size = new_grid
        if self.stem is None:
            self.patch_embed.img_size = img_size
            self.patch_embed.grid_size = new_grid
        else:
            self.patch_embed.img_size = new_grid
            self.patch_embed.grid_size = new_grid

    # ------------------------------------------------------------------ forward pieces
    def patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image -> (patch embeddings x_p E of shape (B, N, D), grid). No position, no class token."""
        if self.stem is not None:
            check_input(x, self.in_chans, self.img_size, self.patch_size, self.dynamic_img_size)
            x = self.stem(x)
        return self.patch_embed(x)

    def position_embedding(self, grid: tuple[int, int], device=None, dtype=None) -> torch.Tensor | None:
        """E_pos for the patch tokens of `grid` as (1, gh*gw, D), or None ('none'/'relative')."""
        kind = self.pos_embed_kind
        p = self.num_prefix_tokens
        if kind == "learned":
            pe = self.pos_embed[:, p:]
            if tuple(grid) != tuple(self.grid_size):
                pe = resample_abs_pos_embed(pe, grid, self.grid_size, 0)
            return pe
        if kind == "learned_2d":
            col = resample_1d(self.pos_embed_col, grid[1])
            row = resample_1d(self.pos_embed_row, grid[0])
            gh, gw = grid
            pe = torch.cat([col[None, :, :].expand(gh, gw, -1), row[:, None, :].expand(gh, gw, -1)], dim=-1)
            return pe.reshape(1, gh * gw, -1)
        if kind == "sincos_1d":
            return sincos_1d(grid[0] * grid[1], self.embed_dim)[None].to(device=device, dtype=dtype)
        if kind == "sincos_2d":
            return sincos_2d(grid, self.embed_dim)[None].to(device=device, dtype=dtype)
        return None

    def prefix_position_embedding(self) -> torch.Tensor | None:
        if self.cls_token is None:
            return None
        if self.pos_embed_kind == "learned":
            return self.pos_embed[:, : self.num_prefix_tokens]
        return self.cls_pos  # learned_2d: own entry; sinusoidal/none/relative: none

    def embed_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch embeddings -> z0: add E_pos, prepend the class token (eq. 1)."""
        pe = self.position_embedding(grid, tokens.device, tokens.dtype)
        if pe is not None:
            tokens = tokens + pe
        if self.cls_token is not None:
            cls = self.cls_token
            cpe = self.prefix_position_embedding()
            if cpe is not None:
                cls = cls + cpe
            tokens = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.pos_drop(tokens)

    def encode(self, z: torch.Tensor, grid: tuple[int, int], return_attn: bool = False,
               return_hidden: bool = False, last_queries: int | None = None) -> dict:
        """Run the encoder blocks on z0. Returns {'tokens': LN(z_L), 'attentions': [...],
        'hidden_states': [z0, z1, ..., zL]} (lists only when asked for). `last_queries=n`: the
        last block computes only the first n tokens' outputs (z_L is then (B, n, D))."""
        attentions, hidden = [], [z] if return_hidden else []
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            bias = self.rel_pos[i](grid) if self.rel_pos is not None else None
            queries = last_queries if i == last else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled() and not return_attn:
                z, attn = checkpoint(blk, z, False, bias, queries, use_reentrant=False)
            else:
                z, attn = blk(z, return_attn=return_attn, bias=bias, queries=queries)
            if return_attn:
                attentions.append(attn)
            if return_hidden:
                hidden.append(z)
        return {"tokens": self.norm(z), "attentions": attentions, "hidden_states": hidden}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens, grid = self.patch_tokens(x)
        return self.encode(self.embed_tokens(tokens, grid), grid)["tokens"]

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "avg":
            x = tokens[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "map":
            x = self.attn_pool(tokens)  # all tokens, as big_vision and timm
        else:
            x = tokens[:, 0]
        return x if self.fc_norm is None else self.fc_norm(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.head_drop(self.pool(tokens)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, grid = self.patch_tokens(x)
        # class-token pooling reads only token 0 of the last block: compute just that one
        # (exactly the same logits and gradients; forward_features still returns every token)
        last_queries = 1 if self.global_pool == "token" and len(self.blocks) else None
        z = self.encode(self.embed_tokens(tokens, grid), grid, last_queries=last_queries)["tokens"]
        return self.forward_head(z)

    def forward_intermediates(self, x: torch.Tensor, return_attention: bool = True,
                              return_hidden_states: bool = True) -> dict:
        """Logits plus per-layer attention probabilities (B, heads, N, N) and hidden states
        (B, N, D), for analysis. `grid` gives the patch grid, `num_prefix_tokens` the prefix."""
        tokens, grid = self.patch_tokens(x)
        out = self.encode(self.embed_tokens(tokens, grid), grid, return_attention, return_hidden_states)
        out["logits"] = self.forward_head(out["tokens"])
        out["grid"] = grid
        out["num_prefix_tokens"] = self.num_prefix_tokens
        return out


def resample_state_dict(model: VisionTransformer, state_dict: dict) -> dict:
    """A copy of `state_dict` whose learned position tables are resampled to the model's
    grid (bicubic 2D for 'learned', linear for 'learned_2d' rows/columns, bicubic for the
    relative-bias tables). Entries already at the model's shape are returned unchanged.

    The grid of a checkpoint's 1D table is inferred as a square; a non-square one raises a
    CheckpointError telling how to resample it with an explicit grid.
    """
    sd = dict(state_dict)
    pe = sd.get("pos_embed")
    # (a table of another width is left as it is, for the caller's shape-mismatch report)
    if (model.pos_embed is not None and pe is not None and tuple(pe.shape) != tuple(model.pos_embed.shape)
            and pe.ndim == 3 and pe.shape[0] == 1 and pe.shape[2] == model.embed_dim):
        p = model.num_prefix_tokens
        n_old = pe.shape[1] - p
        side = math.isqrt(max(n_old, 0))
        if n_old <= 0 or side * side != n_old:
            raise CheckpointError(
                f"pos_embed in the checkpoint has {pe.shape[1]} entries = {p} prefix (class) token(s) + {n_old} "
                f"grid positions, which is not a square grid, so its grid cannot be inferred. If the checkpoint "
                f"was made with{'out' if p else ''} a class token, build the model with "
                f"class_token={not p}; for a non-square grid resample it first with "
                f"resample_abs_pos_embed(pos_embed, {model.grid_size}, old_grid=(h, w), num_prefix_tokens={p})")
        sd["pos_embed"] = resample_abs_pos_embed(pe, model.grid_size, (side, side), p)
    if model.pos_embed_row is not None:
        for key, length in (("pos_embed_row", model.grid_size[0]), ("pos_embed_col", model.grid_size[1])):
            if key in sd and sd[key].ndim == 2 and sd[key].shape[1] == model.embed_dim // 2:
                sd[key] = resample_1d(sd[key], length)
    if model.rel_pos is not None:
        for i, rp in enumerate(model.rel_pos):
            key = f"rel_pos.{i}.table"
            t = sd.get(key)
            if t is not None and t.ndim == 3 and t.shape != rp.table.shape and t.shape[0] == rp.table.shape[0]:
                sd[key] = F.interpolate(sd[key][None].float(), size=tuple(rp.table.shape[1:]), mode="bicubic",
                                        align_corners=False)[0].to(sd[key].dtype)
    return sd


def load_resampled_state_dict(model: VisionTransformer, state_dict: dict, strict: bool = True):
    """Load a state dict saved at another grid size: learned position tables are resampled
    to the model's grid first (bicubic 2D for 'learned', linear for 'learned_2d')."""
    return model.load_state_dict(resample_state_dict(model, state_dict), strict=strict)


# ----------------------------------------------------------------------------- registry
_SIZES = {  # name: (width, depth, heads) — ViT paper, Table 1 (+ Ti/S from DeiT, as the issue lists)
    "ti": (192, 12, 3),
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
    "h": (1280, 32, 16),
}
_PATCHES = {"ti": (16,), "s": (16, 32), "b": (16, 32), "l": (16, 32), "h": (14,)}

VARIANTS: dict[str, dict] = {}
ALIASES: dict[str, str] = {}
for _size, (_w, _d, _h) in _SIZES.items():
    for _p in _PATCHES[_size]:
        _name = f"vit_{_size}{_p}"
        VARIANTS[_name] = dict(embed_dim=_w, depth=_d, num_heads=_h, patch_size=_p)
        ALIASES[f"ViT-{_size.capitalize() if _size != 'ti' else 'Ti'}/{_p}"] = _name
# Small variants for small images on a CPU (digits 8x8, MNIST 28x28, CIFAR 32x32).
VARIANTS["vit_nano_p2"] = dict(embed_dim=64, depth=4, num_heads=4, patch_size=2)
VARIANTS["vit_micro_p4"] = dict(embed_dim=128, depth=6, num_heads=4, patch_size=4)
VARIANTS["vit_mini_p4"] = dict(embed_dim=192, depth=8, num_heads=6, patch_size=4)
DEFAULT_IMG = {"vit_nano_p2": 8, "vit_micro_p4": 28, "vit_mini_p4": 32}
DESCRIPTIONS = {n: f"ViT-{n[4:].upper()}" for n in VARIANTS}
DESCRIPTIONS.update(vit_nano_p2="tiny ViT for 8x8 digits", vit_micro_p4="small ViT for 28x28 images",
                    vit_mini_p4="small ViT for 32x32 images")

register_family("vit", VisionTransformer, VARIANTS, ALIASES, DESCRIPTIONS, DEFAULT_IMG)
