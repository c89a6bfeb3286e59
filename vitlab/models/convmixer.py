"""ConvMixer (Trockman & Kolter, "Patches Are All You Need?").

    z0 = BN(act(Conv_{c_in -> h}(X, kernel = stride = p)))            patch embedding
    z'_l = BN(act(DepthwiseConv(z_{l-1}, k x k, 'same'))) + z_{l-1}     spatial mixing (residual)
    z_l  = BN(act(PointwiseConv(z'_l)))                                 channel mixing (no residual)
    y = Linear(GAP(z_d))

ConvMixer-h/d: width h, depth d, patch size p, kernel size k. The resolution h x (H/p) x (W/p)
is kept through the whole network (isotropic, like ViT). Named variants at the bottom.

The paper's ablations switch parts off: `residual=False` drops the skip connection around the
spatial mixing, `norm` replaces BatchNorm ('layer': LayerNorm over the channels at each position,
'group': GroupNorm, 'none'), and `drop_path_rate` adds stochastic depth on the residual branch
(rising linearly from 0 at the first layer to the rate at the last, as in timm).

Kernel size must be odd: 'same' padding of an even kernel is asymmetric (one more pixel on one
side), which shifts every layer's output by half a pixel; the paper only uses odd kernels
(3, 5, 7, 9), so an even one is rejected rather than silently shifted.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError, did_you_mean
from .layers import DropPath, check_input, to_2tuple
from .registry import register_family

ACTS = {"gelu": nn.GELU, "relu": nn.ReLU}
NORMS = ("batch", "layer", "group", "none")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of a (B, C, H, W) map (ConvNeXt's 'channels-wise LN')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(dim)
    if kind == "layer":
        return LayerNorm2d(dim)
    if kind == "group":
        return nn.GroupNorm(math.gcd(dim, 32), dim)  # 32 groups (Wu & He) where the width allows
    return nn.Identity()


class ConvMixerLayer(nn.Module):
    """One ConvMixer layer: residual(depthwise k x k -> act -> norm), then pointwise 1x1 -> act -> norm."""

    def __init__(self, dim: int, kernel_size: int, act: type[nn.Module], residual: bool = True,
                 norm: str = "batch", drop_path: float = 0.0):
        super().__init__()
        # groups=dim: one k x k filter per channel (spatial mixing only); odd k -> symmetric 'same'
        self.dw = nn.Conv2d(dim, dim, kernel_size, groups=dim, padding=kernel_size // 2)
        self.dw_act = act()
        self.dw_norm = make_norm(norm, dim)
        self.pw = nn.Conv2d(dim, dim, 1)
        self.pw_act = act()
        self.pw_norm = make_norm(norm, dim)
        self.residual = residual
        self.norm_kind = norm
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw_norm(self.dw_act(self.dw(x)))
        x = x + self.drop_path(y) if self.residual else y  # residual around the spatial mixing only
        return self.pw_norm(self.pw_act(self.pw(x)))


class ConvMixer(nn.Module):
    """ConvMixer-`dim`/`depth` with patch size `patch_size` and depthwise kernel `kernel_size`.

    Args:
        act: 'gelu' (the paper's default) or 'relu' (used for ConvMixer-768/32).
        img_size: default input size (for FLOPs and reports). The network is convolutional:
            any size that is a multiple of `patch_size` works at run time.
        drop_rate: dropout before the classifier.
        residual: the skip connection around each layer's spatial mixing (off: the paper's ablation).
        norm: 'batch' (the paper's), 'layer' (channels-wise LayerNorm), 'group' or 'none'; also in the stem.
        drop_path_rate: stochastic depth of the residual branch at the last layer (linear from 0).
        head_zero_init: zero-initialise the classifier (for fine-tuning).
    """

    def __init__(
        self,
        dim: int = 768,
        depth: int = 32,
        patch_size: int = 7,
        kernel_size: int = 7,
        act: str = "gelu",
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size=224,
        drop_rate: float = 0.0,
        head_zero_init: bool = False,
        residual: bool = True,
        norm: str = "batch",
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        for name, v in dict(dim=dim, depth=depth, patch_size=patch_size, kernel_size=kernel_size,
                            in_chans=in_chans).items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size={kernel_size} is even; 'same' padding of an even kernel is asymmetric "
                              f"and shifts the feature map by half a pixel. Use an odd kernel "
                              f"({kernel_size - 1} or {kernel_size + 1}).")
        if act not in ACTS:
            raise ConfigError(f"act={act!r} is not valid.{did_you_mean(str(act), ACTS)} "
                              f"Choose one of: {', '.join(ACTS)}.")
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"drop_rate={drop_rate} must be in [0, 1)")
        if norm not in NORMS:
            raise ConfigError(f"norm={norm!r} is not valid.{did_you_mean(str(norm), NORMS)} "
                              f"Choose one of: {', '.join(NORMS)}.")
        if not isinstance(residual, bool):
            raise ConfigError(f"residual must be true or false, got {residual!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate={drop_path_rate} must be in [0, 1)")
        if drop_path_rate > 0 and not residual:
            raise ConfigError("drop_path_rate drops the residual branch, and residual=false has none; "
                              "set drop_path_rate=0 or residual=true")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ConfigError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        self.img_size = to_2tuple(img_size)
        h, w = self.img_size
        if patch_size > min(h, w):
            raise ConfigError(f"patch_size={patch_size} is larger than the image ({h}x{w}); use a patch size of at "
                              f"most {min(h, w)} or larger images")
        if h % patch_size or w % patch_size:
            raise ConfigError(f"image size {h}x{w} is not divisible by the patch size {patch_size} (the last "
                              f"{h % patch_size} rows / {w % patch_size} columns would be dropped); use an image "
                              f"size that is a multiple of {patch_size} (e.g. {max(1, round(h / patch_size)) * patch_size})")
        self.dim = self.num_features = self.embed_dim = dim
        self.depth = depth
        self.patch_size = (patch_size, patch_size)
        self.kernel_size = kernel_size
        self.act = act
        self.residual = residual
        self.norm = norm
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.grid_size = (h // patch_size, w // patch_size)
        act_layer = ACTS[act]

        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.patch_act = act_layer()
        self.patch_norm = make_norm(norm, dim)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[ConvMixerLayer(dim, kernel_size, act_layer, residual, norm, r)
                                      for r in rates])
        self.head_drop = nn.Dropout(drop_rate)
        self._build_head(num_classes, head_zero_init)

    def _build_head(self, num_classes: int, zero_init: bool) -> None:
        self.head = nn.Linear(self.dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0 and zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ API shared by the zoo
    def reset_classifier(self, num_classes: int, zero_init: bool = True) -> None:
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ConfigError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        self.num_classes = num_classes
        self._build_head(num_classes, zero_init)

    def no_weight_decay(self) -> set[str]:
        """No token or position parameters; norms and biases are grouped by the optimiser."""
        return set()

    def set_input_size(self, img_size) -> None:
        """Record a new default input size (nothing to resample in a convolutional net)."""
        img_size = to_2tuple(img_size)
        if img_size[0] % self.patch_size[0] or img_size[1] % self.patch_size[1]:
            raise ConfigError(f"image size {img_size} is not divisible by the patch size {self.patch_size[0]}; "
                              f"use a multiple of {self.patch_size[0]}")
        self.img_size = img_size
        self.grid_size = (img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1])

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding z0 = norm(act(conv_p(x))), shape (B, dim, H/p, W/p)."""
        check_input(x, self.in_chans, self.img_size, self.patch_size, dynamic=True)
        return self.patch_norm(self.patch_act(self.patch_embed(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> feature map (B, dim, H/p, W/p) after the last layer."""
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))  # global average pooling
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ analysis accessors
    @property
    def patch_embed_weight(self) -> torch.Tensor:
        """The patch-embedding filters, (dim, in_chans, p, p) (the paper's Fig. visualises them)."""
        return self.patch_embed.weight

    def depthwise_kernels(self, layer: int) -> torch.Tensor:
        """The k x k depthwise filters of layer `layer` (0-based; negative counts from the end),
        shape (dim, k, k)."""
        if not isinstance(layer, int) or not -self.depth <= layer < self.depth:
            raise ConfigError(f"layer={layer!r} is out of range: this ConvMixer has {self.depth} layers "
                              f"(0..{self.depth - 1}, or negative from the end)")
        return self.blocks[layer].dw.weight[:, 0]


# ----------------------------------------------------------------------------- registry
VARIANTS: dict[str, dict] = {
    "convmixer_1536_20": dict(dim=1536, depth=20, patch_size=7, kernel_size=9, act="gelu"),
    "convmixer_768_32": dict(dim=768, depth=32, patch_size=7, kernel_size=7, act="relu"),
    # CIFAR-sized inputs: the authors' CIFAR-10 setting (locuslab/convmixer-cifar10 defaults:
    # ConvMixer-256/8, patch 2, kernel 5): 16x16 internal resolution at 32 px, 14x14 at 28 px
    "convmixer_256_8": dict(dim=256, depth=8, patch_size=2, kernel_size=5, act="gelu"),
}
ALIASES = {"ConvMixer-1536/20": "convmixer_1536_20", "ConvMixer-768/32": "convmixer_768_32",
           "ConvMixer-256/8": "convmixer_256_8"}
DESCRIPTIONS = {"convmixer_1536_20": "ConvMixer-1536/20, p7 k9, GELU",
                "convmixer_768_32": "ConvMixer-768/32, p7 k7, ReLU",
                "convmixer_256_8": "ConvMixer-256/8, p2 k5, for 28-32 px images"}
DEFAULT_IMG = {"convmixer_256_8": 32}

register_family("convmixer", ConvMixer, VARIANTS, ALIASES, DESCRIPTIONS, DEFAULT_IMG)
