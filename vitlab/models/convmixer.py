"""ConvMixer (Trockman & Kolter, "Patches Are All You Need?").

    z0 = BN(act(Conv_{c_in -> h}(X, kernel = stride = p)))            patch embedding
    z'_l = BN(act(DepthwiseConv(z_{l-1}, k x k, 'same'))) + z_{l-1}     spatial mixing (residual)
    z_l  = BN(act(PointwiseConv(z'_l)))                                 channel mixing (no residual)
    y = Linear(GAP(z_d))

ConvMixer-h/d: width h, depth d, patch size p, kernel size k. The resolution h x (H/p) x (W/p)
is kept through the whole network (isotropic, like ViT). Named variants at the bottom.

Kernel size must be odd: 'same' padding of an even kernel is asymmetric (one more pixel on one
side), which shifts every layer's output by half a pixel; the paper only uses odd kernels
(3, 5, 7, 9), so an even one is rejected rather than silently shifted.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, did_you_mean
from . import fast
from .layers import check_input, to_2tuple
from .registry import register_family

ACTS = {"gelu": nn.GELU, "relu": nn.ReLU}


_HAS_ONEDNN_CONV = hasattr(torch.ops.mkldnn, "_convolution_pointwise") and torch.backends.mkldnn.is_available()
_ONEDNN_ACT = {nn.ReLU: ("relu", ""), nn.GELU: ("gelu", "none")}  # "none": exact (erf) GELU


def _fused_ok(x: torch.Tensor, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> bool:
    """bf16 channels-last inference on CPU with BatchNorm on running statistics: the
    oneDNN fused path of `_conv_act_bn` applies (same function, fewer memory passes)."""
    if not (_HAS_ONEDNN_CONV and fast.fast_paths_enabled() and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and conv.weight.dtype == torch.bfloat16 and conv.bias is not None and x.is_contiguous(
                memory_format=torch.channels_last) and isinstance(norm, nn.BatchNorm2d)
            and not norm.training and norm.running_mean is not None):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        return False
    if torch.compiler.is_compiling():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return _get_current_dispatch_mode() is None  # no FLOP counter / fake tensors


def _bn_affine(bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm on running statistics as y * scale + shift (per channel), computed in float32."""
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.float()
    shift = -bn.running_mean.float() * scale
    if bn.affine:
        shift = shift + bn.bias.float()
    return scale, shift


def _conv_act(x: torch.Tensor, conv: nn.Conv2d, act: nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """act(conv(x)) as one oneDNN call: bias and activation applied while the output is written."""
    name, algo = _ONEDNN_ACT[type(act)]
    return torch.ops.mkldnn._convolution_pointwise(
        x, conv.weight, conv.bias if bias is None else bias, list(conv.padding), list(conv.stride),
        list(conv.dilation), conv.groups, name, [], algo)


def _act_ok(act: nn.Module) -> bool:
    return type(act) in _ONEDNN_ACT and getattr(act, "approximate", "none") == "none" \
        and not getattr(act, "inplace", False)


class ConvMixerLayer(nn.Module):
    """One ConvMixer layer: residual(depthwise k x k -> act -> BN), then pointwise 1x1 -> act -> BN."""

    def __init__(self, dim: int, kernel_size: int, act: type[nn.Module]):
        super().__init__()
        # groups=dim: one k x k filter per channel (spatial mixing only); odd k -> symmetric 'same'
        self.dw = nn.Conv2d(dim, dim, kernel_size, groups=dim, padding=kernel_size // 2)
        self.dw_act = act()
        self.dw_norm = nn.BatchNorm2d(dim)
        self.pw = nn.Conv2d(dim, dim, 1)
        self.pw_act = act()
        self.pw_norm = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training and _act_ok(self.dw_act) and _act_ok(self.pw_act)
                and _fused_ok(x, self.dw, self.dw_norm) and _fused_ok(x, self.pw, self.pw_norm)):
            return self._forward_fused(x)
        # bf16 training on CPU: oneDNN's bf16 depthwise weight gradient is the slow part; vitlab's
        # kernel computes it where it applies, else the conv runs in float32
        y = fast.depthwise_conv_bf16_train(x, self.dw) if fast.depthwise_conv_f32_pays(x, self.dw) else self.dw(x)
        x = x + self.dw_norm(self.dw_act(y))
        return self.pw_norm(self.pw_act(self.pw(x)))

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer in four memory passes instead of seven (bf16 CPU inference).

        BN after an activation cannot be folded into the conv before it, but it is a per-channel
        affine map s * y + t, and everything here is exact algebra on it:
            x' = x + s1 * act(dw(x)) + t1      t1 moves into the pointwise conv's bias:
            pw(x') = pw(x + s1 * act(dw(x))) + W t1    (a 1x1 conv has no padding)
            z  = s2 * act(pw(x')) + t2         one multiply-add pass
        dw/pw conv + bias + activation are single oneDNN calls.
        """
        s1, t1 = _bn_affine(self.dw_norm, x.dtype)
        s2, t2 = _bn_affine(self.pw_norm, x.dtype)
        dt = x.dtype
        a = _conv_act(x, self.dw, self.dw_act)
        x = torch.addcmul(x, a, s1.to(dt).view(1, -1, 1, 1))
        w = self.pw.weight
        pw_bias = (self.pw.bias.float() + w.reshape(w.shape[0], -1).float() @ t1).to(dt)
        r = _conv_act(x, self.pw, self.pw_act, bias=pw_bias)
        return _affine_(r, s2.to(dt), t2.to(dt))


def _affine_(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """y * scale + shift per channel, in place on a freshly computed `y` (one pass)."""
    return torch.addcmul(shift.view(1, -1, 1, 1), y, scale.view(1, -1, 1, 1), out=y)


class ConvMixer(nn.Module):
    """ConvMixer-`dim`/`depth` with patch size `patch_size` and depthwise kernel `kernel_size`.

    Args:
        act: 'gelu' (the paper's default) or 'relu' (used for ConvMixer-768/32).
        img_size: default input size (for FLOPs and reports). The network is convolutional:
            any size that is a multiple of `patch_size` works at run time.
        drop_rate: dropout before the classifier.
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
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.grid_size = (h // patch_size, w // patch_size)
        act_layer = ACTS[act]

        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.patch_act = act_layer()
        self.patch_norm = nn.BatchNorm2d(dim)
        self.blocks = nn.Sequential(*[ConvMixerLayer(dim, kernel_size, act_layer) for _ in range(depth)])
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
        """Patch embedding z0 = BN(act(conv_p(x))), shape (B, dim, H/p, W/p)."""
        check_input(x, self.in_chans, self.img_size, self.patch_size, dynamic=True)
        w = self.patch_embed.weight
        if (not self.training and w.dtype == torch.bfloat16 and x.is_floating_point() and x.dtype != w.dtype
                and not (torch.is_grad_enabled() and w.requires_grad)):
            # a bf16 model (`fast.optimize_for_inference`): images arrive in its dtype and
            # channels-last memory, as its input hook on `patch_embed` would make them
            x = x.to(w.dtype).contiguous(memory_format=torch.channels_last)
        if not self.training and _act_ok(self.patch_act) and _fused_ok(x, self.patch_embed, self.patch_norm):
            s, t = _bn_affine(self.patch_norm, x.dtype)
            return _affine_(_conv_act(x, self.patch_embed, self.patch_act), s.to(x.dtype), t.to(x.dtype))
        return self.patch_norm(self.patch_act(self.patch_embed(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> feature map (B, dim, H/p, W/p) after the last layer."""
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))  # global average pooling
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        streams = fast.streams_for(self, x)  # CPU inference: batch parts on separate cores
        if streams > 1:
            return fast.run_in_streams(self.forward, x, streams)
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
