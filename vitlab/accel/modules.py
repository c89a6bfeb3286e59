"""Accelerated versions of the models' modules: the same parameters, the same function, computed
with fewer and faster kernels where the hardware allows (`caps`), and the plain module's code
where it does not.

`accelerate(model)` swaps each module of a built model for its accelerated subclass here (in place;
state dict, hooks and parameter names unchanged). The model files never see any of this: they hold
the papers' math in plain PyTorch. Every path here switches itself off under `reference_mode()`,
under tracers and counters (`state.plain_context`), and where its dtype or device does not apply;
`tests/test_accel.py` checks that accelerated and plain models compute the same logits and gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.convmixer import ConvMixer, ConvMixerLayer
from ..models.cvt import ConvAttention, CvTBlock
from ..models.layers import Attention, Mlp, PatchEmbed, check_input
from . import caps, kernels as ck, ops
from .state import fast_paths_enabled, plain_context


# ============================================================================ ViT layers (layers.py)
class FastPatchEmbed(PatchEmbed):
    """The strided patch conv (kernel = stride = p) as one gather into (patches, C*p*p) rows and one
    matrix product on CPU: oneDNN's convolution runs this case several times below the matrix-product
    rate (ViT-S/16, batch 32, bf16: 6.6 ms against 2.8 ms)."""

    def forward(self, x):
        if not (x.device.type == "cpu" and torch.is_tensor(x) and fast_paths_enabled() and plain_context()):
            return super().forward(x)
        check_input(x, self.proj.in_channels, self.img_size, self.patch_size, self.dynamic_img_size)
        w = self.proj.weight
        B, C, H, W = x.shape
        (p, q), (gh, gw) = self.patch_size, (H // self.patch_size[0], W // self.patch_size[1])
        patches = x.reshape(B, C, gh, p, gw, q).permute(0, 2, 4, 1, 3, 5)
        if x.dtype != w.dtype and not torch.is_autocast_enabled("cpu"):
            # bf16 inference models (what the input-cast hook on `proj` would do): the cast and
            # the patch gather in one copy (ViT-S/16, batch 32: 1.7 ms against 2.3 ms for two)
            rows = torch.empty(patches.shape, dtype=w.dtype).copy_(patches).view(B * gh * gw, C * p * q)
        else:
            rows = patches.reshape(B * gh * gw, C * p * q)
        out = F.linear(rows, w.reshape(self.proj.out_channels, C * p * q), self.proj.bias)
        return out.view(B, gh * gw, -1), (gh, gw)


class FastAttention(Attention):
    """Attention with its projections by `ops.linear` (bias and residual add fused into oneDNN's bf16
    product where bf16 is native), the attention core chosen by `ops.attention` for the device and
    shape, and with `cpu_kernel` (set by `ops.use_cpu_kernels`) vitlab's bf16 CPU attention: in
    training its kernel pair with the backward reading q, k, v from the qkv projection's output in
    place. float32 CPU training uses the float32 kernel pair the same way where
    `ops.f32_attention_kernel` says so (no flag needed)."""

    cpu_kernel = False

    def forward(self, x, return_attn: bool = False, bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None, queries: int | None = None):
        B, N, C = x.shape
        qkv = ops.linear(x, self.qkv).reshape(B, N, 3, self.num_heads, self.head_dim)
        if (not return_attn and bias is None and not (self.training and self.attn_drop)
                and (self.cpu_kernel or ops.f32_attention_kernel(qkv, N))
                and ops.attention_qkv_train_ok(qkv)):
            x, attn = ck.attention_qkv_train(qkv, self.scale, queries), None
        else:
            x, attn = self._attention(qkv, return_attn, bias, queries)
        if residual is not None and not (self.training and self.proj_drop.p > 0):
            return ops.linear(x, self.proj, residual=residual), attn
        out = self.proj_drop(ops.linear(x, self.proj))
        return (out if residual is None else residual + out), attn

    def attend(self, q, k, v, bias, need_weights: bool):
        return ops.attention(q, k, v, self.scale, bias, self.attn_drop, self.training, need_weights=need_weights,
                             cpu_kernel=self.cpu_kernel)


class FastMlp(Mlp):
    """fc1 -> act -> fc2 with oneDNN's fused bias / residual where bf16 is native, GELU in place in
    inference (one (tokens x 4D) buffer fewer per block: fewer fresh pages from the C allocator), and:
    - `fused_inference` (CvT, where it measured faster: stage 1 41 vs 63 ms per call; off for ViT,
      0.86-0.96x at ViT-B/16): bf16 CPU inference as `ops.mlp_inference` (row blocks, GELU in
      oneDNN's epilogue);
    - `cpu_kernel` (set by `ops.use_cpu_kernels`): vitlab's GELU kernel, in place in inference
      (ViT-S/16's fc1: 1.6-2.2 ms against 2.2-2.9), with its backward in bf16 training."""

    cpu_kernel = False
    fused_inference = False

    def forward(self, x, residual: torch.Tensor | None = None):
        if (self.fused_inference and residual is not None and not self.training
                and ops.mlp_inference_ok(self.fc1, self.fc2, self.act, x)):
            return ops.mlp_inference(self.fc1, self.fc2, x, residual, cpu_kernel=self.cpu_kernel)
        h = ops.linear(x, self.fc1)
        if self.cpu_kernel and ops.gelu_kernel_ok(self.act, h):
            x = self.drop(ops.gelu_kernel_(h))
        elif self.cpu_kernel and ops.gelu_train_kernel_ok(self.act, h):  # training: kernels with autograd
            x = self.drop(ops.gelu_kernel(h))
        elif (type(self.act) is nn.GELU and fast_paths_enabled()
                and not (torch.is_grad_enabled() and h.requires_grad)):
            x = self.drop(torch.ops.aten.gelu_(h, approximate=self.act.approximate))
        else:
            x = self.drop(self.act(h))
        if residual is not None and not (self.training and self.drop.p > 0):
            return ops.linear(x, self.fc2, residual=residual)
        out = self.drop(ops.linear(x, self.fc2))
        return out if residual is None else residual + out


# ============================================================================ CvT (cvt.py)
def _folded_dw_bn(proj: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of depthwise conv + BatchNorm as one conv, for BatchNorm using its
    running statistics (eval mode): BN(conv(x)) = conv(x; w * g / sqrt(var + eps)) + (beta -
    mean * g / sqrt(var + eps)). Exact (BN is a per-channel affine map then); a few hundred
    numbers, so it is recomputed on every call and never goes stale after training.
    `ops.fold_batchnorm` may already have done it (the BN is then an Identity)."""
    conv, bn = proj.conv, proj.bn
    if not isinstance(bn, nn.BatchNorm2d):
        return conv.weight, conv.bias
    inv = torch.rsqrt(bn.running_var.float() + bn.eps)
    scale = inv * bn.weight.float() if bn.affine else inv
    shift = -bn.running_mean.float() * scale
    if bn.affine:
        shift = shift + bn.bias.float()
    if conv.bias is not None:
        shift = shift + conv.bias.float() * scale
    dt = conv.weight.dtype
    return (conv.weight.float() * scale.view(-1, 1, 1, 1)).to(dt), shift.to(dt)


def _bn_uses_batch_stats(bn: nn.Module) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and (bn.training or bn.running_mean is None)


def _dw_bn(proj: nn.Sequential, fmap: torch.Tensor) -> torch.Tensor:
    """BN(depthwise conv(fmap)) on a channels-last map, computed the fastest correct way.

    - BN with running statistics (eval): one conv with the BN folded into its weight and bias.
    - Training in bf16 on CPU with a strided conv: the conv + BN run in float32
      (`ops.depthwise_conv_f32_pays`: oneDNN's bf16 depthwise backward is 5-15x slower here).
    - Otherwise: the module as it is.
    """
    conv, bn = proj.conv, proj.bn
    if not fast_paths_enabled():
        return bn(conv(fmap))
    if not _bn_uses_batch_stats(bn):
        w, b = _folded_dw_bn(proj)
        return F.conv2d(fmap, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
    if conv.stride != (1, 1) and ops.depthwise_conv_f32_pays(fmap, conv):
        y = ops.conv2d_f32(fmap, conv, out_dtype=None)
        with torch.autocast("cpu", enabled=False):
            y = _batch_norm_f32(bn, y)
        return y.to(torch.bfloat16)
    return bn(conv(fmap))


def _batch_norm_f32(bn: nn.BatchNorm2d, y: torch.Tensor) -> torch.Tensor:
    """`bn(y)` for a float32 `y` whatever the dtype of the BN's parameters; running statistics
    are updated in place as the module would (they stay in the module's own dtype)."""
    if bn.weight is None or bn.weight.dtype == torch.float32:
        return bn(y)
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    rm = bn.running_mean.float() if bn.running_mean is not None else None
    rv = bn.running_var.float() if bn.running_var is not None else None
    out = F.batch_norm(y, rm, rv, bn.weight.float(), bn.bias.float(), True, momentum, bn.eps)
    if rm is not None and bn.training:
        with torch.no_grad():
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
    return out


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense in the input's memory format.

    The q/k/v maps of a stage with a class token are concatenated after the class token, so
    their gradient is a slice of a (B, 1 + h*w, C) tensor: not dense, and oneDNN's BatchNorm /
    depthwise conv backward then take a slow generic path (measured 5x slower at CvT-13's
    stage 3) plus a copy per op. One explicit copy here is much cheaper."""

    @staticmethod
    def forward(ctx, x):
        ctx.channels_last = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous(memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)


def _explicit_attention(q, k, v, scale: float, attn_drop: float, training: bool):
    """softmax(q k^T * scale) v by matrix products; returns (out, probabilities)."""
    # scaling the logits in place: the product's backward needs q and k, not its output
    attn = torch.matmul(q, k.transpose(-2, -1)).mul_(scale).softmax(dim=-1)
    dropped = F.dropout(attn, attn_drop, training) if attn_drop and training else attn
    return dropped @ v, attn


# Largest key count for which the explicit matrix-product attention is used when gradients
# are needed on CPU. Measured at CvT-13's shapes, batch 32, bf16, forward + backward on one
# core: 50 keys (stage 3) explicit 21 ms vs fused SDPA 88 ms; 196 keys (stage 2) 101 vs
# 126 ms; 784 keys (stage 1) 553 vs 486 ms (there the fused kernel wins).
EXPLICIT_TRAIN_MAX_KEYS = 256


class FastConvAttention(ConvAttention):
    """CvT's convolutional attention computed faster: BN folded into the depthwise conv in eval, the
    strided conv + BN in float32 for bf16 CPU training (oneDNN's bf16 depthwise backward is 5-15x
    slower), dense gradients for the concatenated class token, oneDNN-fused projections, explicit
    attention products for CPU training at moderate key counts, and with `cpu_kernel` vitlab's
    kernels (the three depthwise projections with the layer norm fused in; attention)."""

    cpu_kernel = False
    fused_projections = True  # with cpu_kernel: norm1 + the three depthwise projections in one kernel

    @staticmethod
    def _squeeze(proj: nn.Module | None, fmap: torch.Tensor, tokens: torch.Tensor, dense_grad: bool = False
                 ) -> torch.Tensor:
        """One of q/k/v as tokens (B, n, C): the map projection (or the tokens themselves)."""
        if proj is None:
            return tokens
        y = _dw_bn(proj, fmap) if hasattr(proj, "conv") else proj(fmap)
        if dense_grad and y.requires_grad:
            y = _DenseGrad.apply(y)
        B, C, h, w = y.shape
        # channels-last (B, h, w, C) memory: this is a view
        return y.permute(0, 2, 3, 1).reshape(B, h * w, C)

    def _fused_projections(self, x: torch.Tensor, grid: tuple[int, int], p: int, want_q: bool,
                           norm: nn.Module | None = None):
        """(q, k, v) tokens of `norm(x)` from vitlab's depthwise-projection kernel
        (`cpu_kernels.dwconv_qkv`, the layer norm fused in), or None where it does not apply:
        bf16 CPU inference with 3x3 depthwise conv + BatchNorm (running statistics) projections,
        padding 1, q at stride 1, k and v at one stride, an affine LayerNorm over the width (or
        none), not training. Measured at CvT-13's stages (batch 32, with the copies and
        concatenations it saves): 1.3x, 1.3x and 2x oneDNN's three convolutions."""
        projs = (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v)
        if self.training or not fast_paths_enabled() or not plain_context() or ck.get() is None:
            return None
        if not ck.dwconv_qkv_ok(x) or any(pr is None or not hasattr(pr, "conv") or _bn_uses_batch_stats(pr.bn)
                                          for pr in projs):
            return None
        convs = [pr.conv for pr in projs]
        s = convs[1].stride
        if (any(c.kernel_size != (3, 3) or c.padding != (1, 1) or c.dilation != (1, 1) or c.groups != x.shape[2]
                for c in convs) or convs[0].stride != (1, 1) or convs[2].stride != s or s[0] != s[1]):
            return None
        C = x.shape[2]
        if norm is not None and not (isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (C,)
                                     and norm.weight is not None and norm.bias is not None):
            return None
        mods = projs + ((norm,) if norm is not None else ())
        tensors = [t for m in mods for t in m.parameters()] + [t for m in mods for t in m.buffers()]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        cache = getattr(self, "_dw_cache", None)
        if cache is None or cache[0] != key:  # float32 weights (BN folded), rebuilt when a parameter changes
            folded = [_folded_dw_bn(pr) for pr in projs]
            wt = torch.stack([w.detach().float().reshape(C, 9).t() for w, _ in folded]).contiguous()
            bt = torch.stack([torch.zeros(C) if b is None else b.detach().float() for _, b in folded]).contiguous()
            ln = ((norm.weight.detach().float().contiguous(), norm.bias.detach().float().contiguous(), norm.eps)
                  if norm is not None else None)
            cache = self._dw_cache = (key, wt, bt, ln)
        return ck.dwconv_qkv(ck.get(), x, p, grid, cache[1], cache[2], s[0], want_q, cache[3])

    def _attention(self, q, k, v, return_attn: bool):
        if return_attn:
            return _explicit_attention(q, k, v, self.scale, self.attn_drop, self.training)
        drop = self.attn_drop if self.training else 0.0
        # vitlab's fused CPU attention (with its backward in training) where it applies
        if self.cpu_kernel or (not drop and ops.f32_attention_kernel(q, k.shape[-2])):
            out = ops.cpu_kernel_attention(q, k, v, self.scale, None, drop, self.training)
            if out is not None:
                return out, None
        if (q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad and q.dtype in ops.MATMUL_TRAIN_DTYPES
                and k.shape[-2] <= EXPLICIT_TRAIN_MAX_KEYS and fast_paths_enabled()):
            return _explicit_attention(q, k, v, self.scale, drop, self.training)[0], None
        # fused SDPA otherwise: at all three CvT-13 shapes in bf16 inference it beats explicit
        # products on CPU (one core, batch 32: 73 vs 320 ms, 24 vs 29 ms, 7.0 vs 8.2 ms), so no
        # timed choice (which a busy machine can get wrong) is needed
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        return out, None

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0, return_attn: bool = False,
                residual: torch.Tensor | None = None, queries: int | None = None, norm: nn.Module | None = None):
        """`queries=n` (n <= num_prefix_tokens): outputs for the first n (class) tokens only;
        their queries bypass the convolution, so the query map projection is skipped.
        `norm`: applied to `x` first (the block's pre-norm; fused into vitlab's projection
        kernel where that applies)."""
        B, N, C = x.shape
        p = num_prefix_tokens
        if queries is not None and not 0 < queries <= p:
            raise ConfigError(f"queries={queries} must select class tokens (1..{p}) of this stage")
        fused = (self._fused_projections(x, grid, p, queries is None, norm)
                 if self.cpu_kernel and getattr(self, "fused_projections", True) else None)
        if fused is not None:  # vitlab's kernel: the three depthwise convs, class token attached
            q, k, v = fused
            if queries is not None:  # the (normalised) class tokens lead k
                q = k[:, :queries]
            return self._project_attend(q, k, v, B, C, return_attn, residual)
        if norm is not None:
            x = norm(x)
        prefix, tokens = x[:, :p], x[:, p:]
        if p and self.conv_proj_q is not None and fast_paths_enabled():
            # one dense copy of the patch tokens: a slice after the class token has a batch
            # stride of (prefix + h*w) * C, which oneDNN would otherwise copy for each of q/k/v
            tokens = tokens.contiguous()
        # token map as (B, C, h, w) in channels-last memory (a view: no copy)
        fmap = tokens.reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2)
        # with a class token the projections' gradients arrive as slices of the gradient of
        # the concatenation below: made dense before they reach BatchNorm / conv backward
        dense = bool(p) and fast_paths_enabled()
        k = self._squeeze(self.conv_proj_k, fmap, tokens, dense)
        v = self._squeeze(self.conv_proj_v, fmap, tokens, dense)
        if p:  # the class token is never convolved: re-attached before the linear projections
            k, v = (torch.cat([prefix, t], dim=1) for t in (k, v))
        if queries is not None:
            q = prefix[:, :queries]
        else:
            q = self._squeeze(self.conv_proj_q, fmap, tokens, dense)
            q = torch.cat([prefix, q], dim=1) if p else q
        return self._project_attend(q, k, v, B, C, return_attn, residual)

    def _project_attend(self, q, k, v, B: int, C: int, return_attn: bool, residual):
        """Linear projections of the q/k/v token tensors, attention, output projection (+ residual)."""
        H, d = self.num_heads, self.head_dim
        q = ops.linear(q, self.proj_q).reshape(B, q.shape[1], H, d).transpose(1, 2)
        k = ops.linear(k, self.proj_k).reshape(B, k.shape[1], H, d).transpose(1, 2)
        v = ops.linear(v, self.proj_v).reshape(B, v.shape[1], H, d).transpose(1, 2)
        out, attn = self._attention(q, k, v, return_attn)
        out = out.transpose(1, 2).reshape(B, q.shape[2], C)
        if residual is not None and not (self.training and self.proj_drop.p > 0):
            return ops.linear(out, self.proj, residual=residual), attn
        out = self.proj_drop(ops.linear(out, self.proj))
        return (out if residual is None else residual + out), attn


class FastCvTBlock(CvTBlock):
    """Hands norm1 to the attention (whose projection kernel can fuse it) and adds stochastic depth as
    one fused multiply-add."""

    def forward(self, x, grid, num_prefix_tokens: int = 0, return_attn: bool = False, queries: int | None = None):
        """`queries=n`: the output of the first n (class) tokens only (see ConvAttention)."""
        if self.drop_path.p == 0.0 or not self.training:
            # no stochastic depth: the residual adds ride on the output projections (ops.linear);
            # norm1 is handed to the attention, whose projection kernel can fuse it
            res = x if queries is None else x[:, :queries]
            x, attn = self.attn(x, grid, num_prefix_tokens, return_attn, residual=res, queries=queries, norm=self.norm1)
            return self.mlp(self.norm2(x), residual=x), attn
        h = self.norm1(x)
        if queries is not None:
            x = x[:, :queries]
        y, attn = self.attn(h, grid, num_prefix_tokens, return_attn, queries=queries)
        x = self._drop_path_add(x, y)
        x = self._drop_path_add(x, self.mlp(self.norm2(x)))
        return x, attn

    def _drop_path_add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + DropPath(y) as one fused multiply-add: x + y * (mask / keep), with the per-sample
        Bernoulli(keep) mask of DropPath (one kernel instead of mul, div and add)."""
        if not fast_paths_enabled():
            return x + self.drop_path(y)
        keep = 1.0 - self.drop_path.p
        mask = y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1)).bernoulli_(keep).div_(keep)
        return torch.addcmul(x, y, mask)



# ============================================================================ ConvMixer (convmixer.py)
_HAS_ONEDNN_CONV = hasattr(torch.ops.mkldnn, "_convolution_pointwise") and torch.backends.mkldnn.is_available()
_ONEDNN_ACT = {nn.ReLU: ("relu", ""), nn.GELU: ("gelu", "none")}  # "none": exact (erf) GELU


def _fused_ok(x: torch.Tensor, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> bool:
    """bf16 channels-last inference on CPU with BatchNorm on running statistics: the
    oneDNN fused path of `_conv_act_bn` applies (same function, fewer memory passes)."""
    if not (_HAS_ONEDNN_CONV and fast_paths_enabled() and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and conv.weight.dtype == torch.bfloat16 and conv.bias is not None and x.is_contiguous(
                memory_format=torch.channels_last) and isinstance(norm, nn.BatchNorm2d)
            and not norm.training and norm.running_mean is not None):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        return False
    return caps.bf16_native("cpu") and plain_context()  # oneDNN's fused bf16 conv needs native bf16


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



def _affine_(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """y * scale + shift per channel, in place on a freshly computed `y` (one pass)."""
    return torch.addcmul(shift.view(1, -1, 1, 1), y, scale.view(1, -1, 1, 1), out=y)


class FastConvMixerLayer(ConvMixerLayer):
    """bf16 CPU inference in four memory passes instead of seven (`_forward_fused`); bf16 CPU training
    with vitlab's depthwise weight-gradient kernel (or the conv in float32) where oneDNN's is slow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (getattr(self, "residual", True) and getattr(self, "norm_kind", "batch") == "batch"):
            return super().forward(x)  # the fast paths below are written for BatchNorm + residual
        if (not self.training and _act_ok(self.dw_act) and _act_ok(self.pw_act)
                and _fused_ok(x, self.dw, self.dw_norm) and _fused_ok(x, self.pw, self.pw_norm)):
            return self._forward_fused(x)  # evaluation: drop_path is the identity
        # bf16 training on CPU: oneDNN's bf16 depthwise weight gradient is the slow part; vitlab's
        # kernel computes it where it applies, else the conv runs in float32
        y = ops.depthwise_conv_bf16_train(x, self.dw) if ops.depthwise_conv_f32_pays(x, self.dw) else self.dw(x)
        y = self.dw_norm(self.dw_act(y))
        x = x + (self.drop_path(y) if hasattr(self, "drop_path") else y)
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


class FastConvMixer(ConvMixer):
    """The patch embedding conv + activation + BN as one oneDNN call and one affine pass (bf16 CPU inference)."""

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans, self.img_size, self.patch_size, dynamic=True)
        w = self.patch_embed.weight
        if (not self.training and w.dtype == torch.bfloat16 and x.is_floating_point() and x.dtype != w.dtype
                and not (torch.is_grad_enabled() and w.requires_grad)):
            # a bf16 model (`ops.optimize_for_inference`): images arrive in its dtype and
            # channels-last memory, as its input hook on `patch_embed` would make them
            x = x.to(w.dtype).contiguous(memory_format=torch.channels_last)
        if not self.training and _act_ok(self.patch_act) and _fused_ok(x, self.patch_embed, self.patch_norm):
            s, t = _bn_affine(self.patch_norm, x.dtype)
            return _affine_(_conv_act(x, self.patch_embed, self.patch_act), s.to(x.dtype), t.to(x.dtype))
        return self.patch_norm(self.patch_act(self.patch_embed(x)))


# ============================================================================ the swap
# plain module class -> its accelerated subclass (exact types only: a user's own subclass keeps its code)
ACCELERATED: dict[type, type] = {
    PatchEmbed: FastPatchEmbed, Attention: FastAttention, Mlp: FastMlp,
    ConvAttention: FastConvAttention, CvTBlock: FastCvTBlock,
    ConvMixerLayer: FastConvMixerLayer, ConvMixer: FastConvMixer,
}
PLAIN: dict[type, type] = {fast: plain for plain, fast in ACCELERATED.items()}


def accelerate(model: nn.Module, enable: bool = True) -> nn.Module:
    """Swap every module of `model` for its accelerated subclass (or back, `enable=False`), in place;
    returns the model. Parameters, buffers, state-dict keys and hooks are unchanged, and so is the
    function computed (up to float rounding). Idempotent."""
    table = ACCELERATED if enable else PLAIN
    for m in model.modules():
        new = table.get(type(m))
        if new is not None:
            m.__class__ = new
        if enable and type(m) is FastCvTBlock:
            # CvT's MLP in bf16 CPU inference as row blocks with GELU in oneDNN's epilogue: measured
            # faster at CvT-13's stages (41 vs 63 ms at stage 1); at ViT-B/16 widths it was 0.86-0.96x
            m.mlp.fused_inference = True
    if not enable:
        from .ops import use_cpu_kernels

        use_cpu_kernels(model, False)
    return model


def is_accelerated(model: nn.Module) -> bool:
    return any(type(m) in PLAIN for m in model.modules())
