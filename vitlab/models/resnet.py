"""BiT ResNet (Kolesnikov et al., "Big Transfer (BiT): General Visual Representation Learning").

The ViT paper's CNN baseline ("ResNet (BiT)") and the CNN stem of its hybrids. BiT changes a
ResNet in two ways that matter for transfer: Batch Norm is replaced by Group Norm (32 groups),
and every convolution is weight-standardised (each output filter's weights are shifted to zero
mean and scaled to unit variance before the convolution). Group Norm + WS keep training
independent of the per-device batch size.

Two block flavours live here:

* `PreActBottleneck` / `PreActBasic` -- ResNet v2 ("Identity Mappings in Deep Residual
  Networks"), norm -> ReLU -> conv, as in BiT's released models; used by the `ResNetV2`
  classifier (`resnet50_bit`, ...).
* `Bottleneck` -- post-activation (conv -> norm -> ReLU, ReLU after the sum), which is the
  ResNet the ViT authors' hybrid uses in front of the transformer (google-research/
  vision_transformer, models_resnet.py); used by `build_hybrid_stem`.

Named variants are registered at the bottom as data.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, check_choice, did_you_mean
from .layers import DropPath, to_2tuple
from .registry import register_family


# ----------------------------------------------------------------------------- padding helpers
def same_pad_amounts(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow/Flax 'SAME' padding along one axis: output = ceil(size / stride), the extra
    pixel (when the total is odd) goes after, not before. For stride 2 on even inputs this is
    asymmetric (0 before, 1 after for a 3x3), which symmetric PyTorch padding cannot express."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
              value: float = 0.0) -> torch.Tensor:
    top, bottom = same_pad_amounts(x.shape[-2], kernel[0], stride[0], dilation[0])
    left, right = same_pad_amounts(x.shape[-1], kernel[1], stride[1], dilation[1])
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


# ----------------------------------------------------------------------------- layers
class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al.; BiT):

        W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)

    over each output filter's (in, kh, kw) weights (biased variance), then an ordinary conv.

    padding: an int (symmetric, PyTorch style) or 'same' (TF 'SAME': output = ceil(in/stride),
    asymmetric when needed; computed from the input size at run time, as the original JAX
    hybrid does). eps: 1e-8 by default (the BiT PyTorch port uses 1e-10, timm 1e-8; the
    standardised weights differ by < 1e-6 relative for any realistic filter).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, eps: float = 1e-8):
        k, s, d = to_2tuple(kernel_size), to_2tuple(stride), to_2tuple(dilation)
        dynamic = False
        if padding == "same":
            # stride 1 + odd kernel: 'SAME' is symmetric, so a static padding does it without F.pad
            static = s == (1, 1) and all(((ki - 1) * di) % 2 == 0 for ki, di in zip(k, d))
            pad = tuple(((ki - 1) * di) // 2 for ki, di in zip(k, d)) if static else 0
            dynamic = not static
        else:
            pad = padding
        super().__init__(in_channels, out_channels, k, s, pad, d, groups, bias)
        self.same_pad = dynamic  # pad from the input size at run time (TF 'SAME' with stride > 1)
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (self.weight - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            x = _pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", padding=same" if self.same_pad else "") + f", eps={self.eps}"


class MaxPool2dSame(nn.MaxPool2d):
    """Max pooling with TF 'SAME' padding (padded cells never win: they are -inf)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__(kernel_size, stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_same(x, to_2tuple(self.kernel_size), to_2tuple(self.stride), (1, 1), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


def _gn(channels: int, groups: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps)


# ----------------------------------------------------------------------------- blocks
class PreActBottleneck(nn.Module):
    """ResNet v2 bottleneck (BiT): x + conv1x1(r(gn(conv3x3(r(gn(conv1x1(r(gn(x)))))))).
    The projection shortcut (when shape changes) reads the pre-activated input, as in BiT."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1, groups: int = 32, gn_eps: float = 1e-5,
                 ws_eps: float = 1e-8, drop_path: float = 0.0, padding="fixed"):
        super().__init__()
        pad3 = "same" if padding == "same" else 1
        self.norm1 = _gn(cin, groups, gn_eps)
        self.conv1 = StdConv2d(cin, cmid, 1, eps=ws_eps)
        self.norm2 = _gn(cmid, groups, gn_eps)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride, pad3, eps=ws_eps)  # stride on the 3x3 (v1.5/BiT)
        self.norm3 = _gn(cmid, groups, gn_eps)
        self.conv3 = StdConv2d(cmid, cout, 1, eps=ws_eps)
        self.downsample = StdConv2d(cin, cout, 1, stride, eps=ws_eps) if stride != 1 or cin != cout else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.norm2(out)))
        out = self.conv3(F.relu(self.norm3(out)))
        return self.drop_path(out) + shortcut


class PreActBasic(nn.Module):
    """ResNet v2 basic block (two 3x3 convs), for the small CIFAR-sized baseline."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1, groups: int = 32, gn_eps: float = 1e-5,
                 ws_eps: float = 1e-8, drop_path: float = 0.0, padding="fixed"):
        super().__init__()
        pad3 = "same" if padding == "same" else 1
        self.norm1 = _gn(cin, groups, gn_eps)
        self.conv1 = StdConv2d(cin, cmid, 3, stride, pad3, eps=ws_eps)
        self.norm2 = _gn(cmid, groups, gn_eps)
        self.conv2 = StdConv2d(cmid, cout, 3, 1, pad3, eps=ws_eps)
        self.downsample = StdConv2d(cin, cout, 1, stride, eps=ws_eps) if stride != 1 or cin != cout else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.norm2(out)))
        return self.drop_path(out) + shortcut


class Bottleneck(nn.Module):
    """Post-activation bottleneck with GN + WS: relu(proj(x) + gn3(conv3(relu(gn2(conv2(relu(gn1(conv1(x))))))))).
    This is the ViT hybrid's ResNet unit; gn3's scale starts at zero so each unit starts as
    the identity (on its shortcut), as in the original."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1, groups: int = 32, gn_eps: float = 1e-6,
                 ws_eps: float = 1e-8, padding="same"):
        super().__init__()
        pad3 = "same" if padding == "same" else 1
        self.conv1 = StdConv2d(cin, cmid, 1, eps=ws_eps)
        self.norm1 = _gn(cmid, groups, gn_eps)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride, pad3, eps=ws_eps)
        self.norm2 = _gn(cmid, groups, gn_eps)
        self.conv3 = StdConv2d(cmid, cout, 1, eps=ws_eps)
        self.norm3 = _gn(cout, groups, gn_eps)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(StdConv2d(cin, cout, 1, stride, eps=ws_eps), _gn(cout, groups, gn_eps))
        else:
            self.downsample = None
        nn.init.zeros_(self.norm3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x) if self.downsample is not None else x
        out = F.relu(self.norm1(self.conv1(x)))
        out = F.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return F.relu(out + shortcut)


# ----------------------------------------------------------------------------- validation
def _check_image(x: torch.Tensor, in_chans: int) -> None:
    if x.ndim != 4:
        raise ConfigError(f"expected images of shape (batch, {in_chans}, H, W), got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ConfigError(f"the model takes {in_chans}-channel images but got {x.shape[1]} channels "
                          f"(shape {tuple(x.shape)}); build it with in_chans={x.shape[1]} or convert the images")


def _check_groups(channels: list[int], groups: int, hint: str) -> None:
    bad = sorted({c for c in channels if c % groups})
    if bad:
        raise ConfigError(f"Group Norm with {groups} groups needs channel counts divisible by {groups}, but this "
                          f"configuration has {bad}; {hint}")


def _positive_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")


STEMS = ("fixed", "same", "cifar")
BLOCKS = ("bottleneck", "basic")
POOLS = ("avg", "max")




# ----------------------------------------------------------------------------- classifier
class ResNetV2(nn.Module):
    """BiT ResNet v2 classifier: stem -> pre-activation stages -> GN -> ReLU -> global pool -> linear.

    Args:
        layers: blocks per stage; (3, 4, 6, 3) is ResNet-50, (3, 4, 23, 3) ResNet-101.
        width_factor: BiT's width multiplier (R50x1, R50x3, ...); widths are 64*w (stem),
            256*w*2^i (bottleneck stage outputs) or 64*w*2^i (basic blocks).
        block: 'bottleneck' (BiT) or 'basic' (two 3x3 convs, for small CIFAR-sized nets).
        stem: 'fixed' (BiT PyTorch: 7x7/2 conv, pad 3, zero pad 1 + 3x3/2 max pool), 'same'
            (same stem with TF 'SAME' padding, like BiT's TF/JAX code) or 'cifar' (3x3/1 conv, no
            pool: for 28-32 px images).
        num_groups: Group Norm groups (32 in BiT); every width must be divisible by it.
        head_zero_init: zero-initialise the classifier, as BiT does (for training and transfer).
        img_size: stored (default input size for FLOPs counting and reports); the network is
            fully convolutional and accepts any size at run time.
    """

    def __init__(
        self,
        layers=(3, 4, 6, 3),
        width_factor: float = 1,
        block: str = "bottleneck",
        stem: str = "fixed",
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size=224,
        global_pool: str = "avg",
        num_groups: int = 32,
        gn_eps: float = 1e-5,
        ws_eps: float = 1e-8,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        head_zero_init: bool = True,
    ):
        super().__init__()
        check_choice("stem", stem, STEMS)
        check_choice("block", block, BLOCKS)
        check_choice("global_pool", global_pool, POOLS)
        layers = tuple(layers)
        if not layers:
            raise ConfigError("layers must list at least one stage, e.g. layers=(3, 4, 6, 3)")
        for i, n in enumerate(layers):
            _positive_int(f"layers[{i}]", n)
        _positive_int("in_chans", in_chans)
        _positive_int("num_groups", num_groups)
        if not isinstance(width_factor, (int, float)) or width_factor <= 0:
            raise ConfigError(f"width_factor must be a positive number, got {width_factor!r}")
        for name, v in dict(drop_rate=drop_rate, drop_path_rate=drop_path_rate).items():
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name}={v} must be in [0, 1)")
        self.img_size = to_2tuple(img_size)
        if min(self.img_size) < 1:
            raise ConfigError(f"img_size must be positive, got {img_size!r}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.layers = layers
        self.width_factor = width_factor
        self.global_pool = global_pool
        self.block_kind = block
        self.stem_kind = stem

        stem_width = int(64 * width_factor)
        expansion = 4 if block == "bottleneck" else 1
        outs = [int(64 * width_factor * expansion * 2 ** i) for i in range(len(layers))]
        mids = [int(64 * width_factor * 2 ** i) for i in range(len(layers))]
        _check_groups([stem_width] + outs + mids, num_groups,
                      f"use a width_factor such that 64*width_factor is a multiple of {num_groups}, "
                      f"or set num_groups")

        if stem == "cifar":
            self.stem = nn.Sequential(StdConv2d(in_chans, stem_width, 3, 1, 1, eps=ws_eps))
            stem_stride = 1
        elif stem == "same":
            self.stem = nn.Sequential(StdConv2d(in_chans, stem_width, 7, 2, "same", eps=ws_eps),
                                      MaxPool2dSame(3, 2))
            stem_stride = 4
        else:
            self.stem = nn.Sequential(StdConv2d(in_chans, stem_width, 7, 2, 3, eps=ws_eps),
                                      nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, 2))
            stem_stride = 4

        block_cls = PreActBottleneck if block == "bottleneck" else PreActBasic
        total = sum(layers)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear rule; meta-safe
        stages, cin, j = [], stem_width, 0
        for i, n in enumerate(layers):
            blocks = []
            for b in range(n):
                stride = 2 if (b == 0 and i > 0) else 1
                blocks.append(block_cls(cin, outs[i], mids[i], stride, num_groups, gn_eps, ws_eps, dpr[j],
                                        padding="same" if stem == "same" else "fixed"))
                cin, j = outs[i], j + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        self.feature_stride = stem_stride * 2 ** (len(layers) - 1)
        # pre-activation nets end un-normalised: BiT's head is GN -> ReLU -> pool -> classifier
        self.norm = _gn(cin, num_groups, gn_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self._build_head(num_classes, head_zero_init)
        self._init_weights()

    def _build_head(self, num_classes: int, zero_init: bool) -> None:
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ConfigError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0 and zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # scale is irrelevant under weight standardisation; kaiming keeps plain convs sane too
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def reset_classifier(self, num_classes: int, zero_init: bool = True) -> None:
        """New classifier for fine-tuning; zero-initialised by default (BiT-HyperRule)."""
        self.num_classes = num_classes
        self._build_head(num_classes, zero_init)

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond norms and biases (which the optimiser groups itself): a ResNet has no
        position or class tokens."""
        return set()

    def set_input_size(self, img_size) -> None:
        """Record a new default input size (nothing to resample in a CNN)."""
        self.img_size = to_2tuple(img_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> normalised, activated feature map (B, num_features, H/s, W/s)."""
        _check_image(x, self.in_chans)
        x = self.stages(self.stem(x))
        return F.relu(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3)) if self.global_pool == "avg" else x.amax(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------- hybrid stems
class HybridStem(nn.Module):
    """The CNN in front of a hybrid ViT: root (conv + GN + ReLU [+ max pool]) followed by
    post-activation bottleneck stages (the ViT authors' ResNet). Output: the last stage's
    feature map; `out_chans` channels at `stride` pixels per cell."""

    def __init__(self, layers, width: int = 64, in_chans: int = 3, root: str = "same", first_stride: int = 1,
                 num_groups: int = 32, gn_eps: float = 1e-6, ws_eps: float = 1e-8):
        super().__init__()
        _positive_int("in_chans", in_chans)
        mids = [width * 2 ** i for i in range(len(layers))]
        outs = [4 * m for m in mids]
        _check_groups([width] + mids + outs, num_groups, "use a stem width that is a multiple of 32")
        if root == "same":
            # ViT/BiT JAX: 7x7/2 'SAME' conv, GN, ReLU, 3x3/2 'SAME' max pool
            self.root = nn.Sequential(StdConv2d(in_chans, width, 7, 2, "same", eps=ws_eps),
                                      _gn(width, num_groups, gn_eps), nn.ReLU(), MaxPool2dSame(3, 2))
            stride = 4
        elif root == "cifar":
            self.root = nn.Sequential(StdConv2d(in_chans, width, 3, 1, 1, eps=ws_eps),
                                      _gn(width, num_groups, gn_eps), nn.ReLU())
            stride = 1
        else:
            raise ConfigError(f"unknown hybrid root {root!r}; choose 'same' or 'cifar'")
        stages, cin = [], width
        for i, n in enumerate(layers):
            s = first_stride if i == 0 else 2
            stages.append(nn.Sequential(*[
                Bottleneck(cin if b == 0 else outs[i], outs[i], mids[i], s if b == 0 else 1, num_groups, gn_eps,
                           ws_eps, padding="same")
                for b in range(n)]))
            cin = outs[i]
            stride *= s
        self.stages = nn.Sequential(*stages)
        self.out_chans = cin
        self.stride = stride
        self.in_chans = in_chans
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.root(x))


HYBRID_STEMS: dict[str, dict] = {
    # ViT paper, option (i): the output of a regular ResNet-50's stage 4 (stride 32, 2048 channels)
    "r50_s32": dict(layers=(3, 4, 6, 3), width=64, root="same", first_stride=1),
    # option (ii): stage 4 removed, its 3 blocks moved into stage 3 (3+6=9): stride 16, 1024
    # channels, 4x the sequence length of r50_s32 at the same image size
    "r50_s16": dict(layers=(3, 4, 9), width=64, root="same", first_stride=1),
    # CPU studies on 28-32 px images: 3x3/1 root + two one-block stages of stride 2 -> stride 4
    # (8x8 = 64 tokens at 32 px, 7x7 at 28 px), 256 channels
    "rsmall_s4": dict(layers=(1, 1), width=32, root="cifar", first_stride=2),
}


def build_hybrid_stem(name: str, in_chans: int = 3) -> tuple[nn.Module, int, int]:
    """(stem mapping (B, in_chans, H, W) -> (B, C', H/s, W/s), C', s) for a named hybrid stem."""
    if name not in HYBRID_STEMS:
        raise ConfigError(f"unknown hybrid_stem {name!r}.{did_you_mean(str(name), HYBRID_STEMS)} "
                          f"Choose one of: {', '.join(HYBRID_STEMS)}.")
    stem = HybridStem(in_chans=in_chans, **HYBRID_STEMS[name])
    return stem, stem.out_chans, stem.stride


# ----------------------------------------------------------------------------- registry
VARIANTS: dict[str, dict] = {
    "resnet50_bit": dict(layers=(3, 4, 6, 3), width_factor=1, block="bottleneck", stem="fixed"),
    "resnet101_bit": dict(layers=(3, 4, 23, 3), width_factor=1, block="bottleneck", stem="fixed"),
    "resnet50x3_bit": dict(layers=(3, 4, 6, 3), width_factor=3, block="bottleneck", stem="fixed"),
    # BiT's large models (Kolesnikov et al. 2020; the ViT paper's BiT-L baseline is R152x4)
    "resnet152x2_bit": dict(layers=(3, 8, 36, 3), width_factor=2, block="bottleneck", stem="fixed"),
    "resnet152x4_bit": dict(layers=(3, 8, 36, 3), width_factor=4, block="bottleneck", stem="fixed"),
    # ResNet-18 layout (pre-activation basic blocks, 2-2-2-2) at half width with the CIFAR stem:
    # ~2.8M parameters, cheap enough for 28-32 px images on a CPU
    "resnet_small": dict(layers=(2, 2, 2, 2), width_factor=0.5, block="basic", stem="cifar"),
}
ALIASES = {"BiT-R50x1": "resnet50_bit", "ResNet-50": "resnet50_bit", "R50x1": "resnet50_bit",
           "BiT-R101x1": "resnet101_bit", "ResNet-101": "resnet101_bit", "BiT-R50x3": "resnet50x3_bit",
           "R50x3": "resnet50x3_bit", "ResNet-18-small": "resnet_small",
           "BiT-R152x2": "resnet152x2_bit", "R152x2": "resnet152x2_bit",
           "BiT-R152x4": "resnet152x4_bit", "R152x4": "resnet152x4_bit"}
DESCRIPTIONS = {"resnet50_bit": "BiT ResNet-50 (R50x1): GN + weight standardisation, pre-activation",
                "resnet101_bit": "BiT ResNet-101 (R101x1)",
                "resnet50x3_bit": "BiT ResNet-50x3 (3x wider)",
                "resnet152x2_bit": "BiT ResNet-152x2 (2x wider)",
                "resnet152x4_bit": "BiT ResNet-152x4 (4x wider, BiT-L)",
                "resnet_small": "half-width pre-act ResNet-18 with a 3x3 stem, for 28-32 px images"}
DEFAULT_IMG = {"resnet_small": 32}

register_family("resnet", ResNetV2, VARIANTS, ALIASES, DESCRIPTIONS, DEFAULT_IMG)
