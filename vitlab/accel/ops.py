"""Fast paths: the same functions as the reference layers, computed with fewer, larger kernels.

Every function here computes exactly what the plain PyTorch code in `vitlab/models` computes (up to
bf16 rounding; `tests/test_fastpaths.py` compares each one with the float32 reference), so
speed never changes the model. What they remove, measured on the CPU this project is developed
on (see `benchmarks/RESULTS.md`):

- `linear(x, layer, act)`: on CPU, a bf16 linear layer with its bias (and GELU) fused into one
  oneDNN call. Plain `F.linear` with a bias first broadcasts the bias into the output and then
  accumulates the product into it (one extra pass over the output), and GELU is a third pass.
- `attention(q, k, v, ...)`: picks, per device, dtype, shape and whether a backward follows,
  the fastest correct attention kernel (fused SDPA or explicit softmax(QK^T)V matrix
  products), timed once on first use; the explicit path is always used when the
  probabilities are asked for (`need_weights=True`). On the development CPU, SDPA wins bf16
  inference at ViT shapes and the explicit products win training (forward + backward) 2-3x.
- `optimize_for_inference(model, dtype)`: eval mode, BatchNorm folded into the convolution
  before it, weights cast once to bf16 (no per-call casts as under autocast), channels-last
  memory for convolutional models, optionally `torch.compile` of the repeated blocks.
- `set_grad_checkpointing(model)`: recompute each block in the backward pass (memory for time).
- `fused_adamw(...)` and `MasterWeightAdamW`: AdamW as one fused kernel; training a bf16 model
  with float32 master weights (no autocast casts of weights and activations on every call).

Fast paths switch themselves off where they cannot apply (autograd needs, another device, a
dispatch mode such as the FLOP counter or meta tensors, `torch.compile` tracing) and can be
switched off explicitly with `reference_mode()`, which benchmarks use as the "before".
"""
from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, did_you_mean
from ..models.layers import attention as _plain_attention
from . import caps, kernels as ck
from .state import _STATE, fast_paths_enabled, plain_context as _plain_context, reference_mode  # noqa: F401 (re-exported)

ATTENTION_KERNELS = ("auto", "measure", "sdpa", "matmul")
# 'auto' on CPU with autograd: explicit products up to this many logits per head (Nq * Nk).
# Measured on the development CPU (AMX, bf16): explicit forward + backward beats SDPA by 2-3x
# at ViT shapes (197 x 197) and at CvT stage 3 (197 x 50), SDPA wins at CvT stage 1 (3136 x 784).
MATMUL_TRAIN_MAX_LOGITS = 1 << 18
# ... and only in reduced precision. In float32 PyTorch's fused CPU attention wins forward + backward
# (2-core Zen 4, batch 32, SDPA / explicit time: ViT-S/16 0.81-0.86, ViT-B/16 0.65-0.69, CvT-13 stage 3
# 0.85, stage 1 0.61), while in bf16 the explicit products still win there (1.25x, 1.68x)
MATMUL_TRAIN_DTYPES = (torch.bfloat16, torch.float16)
_ATTN_CHOICE: dict[tuple, str] = {}  # (device, dtype, shapes, mask?) -> measured fastest kernel
_HAS_ONEDNN_LINEAR = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()


# ----------------------------------------------------------------------------- switches
def set_attention_kernel(kind: str = "auto") -> None:
    """'auto' (a fixed rule: SDPA for inference and on GPU, explicit products for CPU training
    at moderate sequence lengths), 'measure' (time both once per device/dtype/shape and keep
    the fastest), 'sdpa' or 'matmul'. 'auto' is the default because it is deterministic: a
    timed choice can differ between two processes on a busy machine, and then a resumed or
    distributed run would not compute bit-identically to the original."""
    if kind not in ATTENTION_KERNELS:
        raise ConfigError(f"attention kernel {kind!r} is not valid.{did_you_mean(str(kind), ATTENTION_KERNELS)} "
                          f"Choose one of: {', '.join(ATTENTION_KERNELS)}.")
    _STATE["attention"] = kind


def attention_choices() -> dict[tuple, str]:
    """The kernels `attention` has measured and chosen so far (for reports)."""
    return dict(_ATTN_CHOICE)


# ----------------------------------------------------------------------------- allocator
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters (malloc.h)
GLIBC_MMAP_MAX = 65536  # glibc's default M_MMAP_MAX: pass it to `tune_cpu_allocator` to allow mmap again


def tune_cpu_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30, mmap_max: int = 0) -> bool:
    """Keep freed CPU tensor memory in the process for reuse (glibc `mallopt`).

    By default glibc serves every large allocation (tensors of a few MB and up: activations
    of a batch) with a fresh `mmap` and returns it to the OS on free, so the next step pays a
    page fault and a page clear for every 4 KiB it touches again: on the development CPU this
    made element-wise kernels (GELU, residual adds) and fresh matmul outputs 30-50% slower
    than their memory bandwidth allows. Raising the mmap threshold (to its 32 MiB maximum)
    and the trim threshold keeps that memory in the heap, as tcmalloc/jemalloc would.
    `mmap_max=0` (the default) also serves blocks over 32 MiB from the heap: no mmap at all.
    Those are the activations of wide models at batch 32 (ConvMixer-768/32: 50 MB in bf16);
    the paper's ConvMixer page-faulted 2.8 million times per inference step without it (5.7 s,
    of which 5 s in the kernel) and not at all with it (3.5 s; docs/speed.md, "Session 11").
    `mmap_max=GLIBC_MMAP_MAX` keeps glibc's mmap for those.
    Process-wide (it helps every library in the process equally); returns False where glibc
    is not the allocator. Memory is not leaked: it is reused by later allocations, and up to
    `trim_threshold` bytes of free memory at the heap's top are kept, the rest given back.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
        ok = libc.mallopt(_M_MMAP_MAX, int(mmap_max)) == 1 and ok
    except (OSError, AttributeError):
        return False
    _STATE["allocator_tuned"] = ok
    return ok


# ----------------------------------------------------------------------------- linear
def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The oneDNN path applies: CPU, bf16 activations and weights, nothing intercepting ops."""
    return (_STATE["enabled"] and _HAS_ONEDNN_LINEAR and x.device.type == "cpu"
            and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and caps.bf16_native("cpu")
            and _plain_context())


@functools.lru_cache(maxsize=1)
def _onednn_f32_here() -> bool:
    return _HAS_ONEDNN_LINEAR and caps.onednn_f32_linear_reason() is None


def _onednn_f32_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The float32 oneDNN linear applies: CPU, float32 activations and weights (no autocast, which
    would make the product bf16), an AVX-512 CPU (`caps.onednn_f32_linear_reason`), nothing
    intercepting ops."""
    return (_STATE["enabled"] and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and _onednn_f32_here()
            and _plain_context())


class _FusedLinear(torch.autograd.Function):
    """y = x W^T + b (+ residual) with the bias / residual add fused into oneDNN's product in
    the forward; the backward is the usual pair of matrix products (what aten's linear does),
    plus the bias gradient as a column sum and the residual's gradient passed through."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if weight.dtype == torch.float32:
                # float32: oneDNN's product with the transposed weight (copied dense: a few hundred
                # kB) beat MKL's g @ W by 1.1-1.35x at ViT-S/16 and CvT-13 shapes (one thread, Zen 4)
                gx = torch.ops.mkldnn._linear_pointwise(g2.contiguous(), weight.t().contiguous(), None, "none",
                                                        [], "").reshape(x.shape)
            else:
                gx = (g2 @ weight).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        gr = grad if ctx.has_residual and ctx.needs_input_grad[3] else None
        return gx, gw, gb, gr


def linear(x: torch.Tensor, layer: nn.Linear, act: str | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """`act(layer(x))` (act None, 'gelu' (exact, erf form) or 'relu'), plus `residual` if given.

    On CPU in bf16, the bias (and a ReLU, or the residual add) is applied by oneDNN while the
    product is written: one pass over the output instead of two or three, and no separate
    output buffer for the bias broadcast. With autograd the same forward runs inside
    `_FusedLinear` (backward: the usual matrix products). Elsewhere plain PyTorch. GELU is not
    fused there: oneDNN's erf-GELU epilogue measured slower than the separate kernel.
    """
    w, b = layer.weight, layer.bias
    if not isinstance(w, torch.Tensor):  # a swapped-in module (dynamic int8 quantisation): its own forward
        out = layer(x)
        out = F.gelu(out) if act == "gelu" else F.relu(out) if act == "relu" else out
        return out if residual is None else residual + out
    if _onednn_ok(x, w) or _onednn_f32_ok(x, w):
        if not x.is_contiguous():
            x = x.contiguous()
        fuse_res = (residual is not None and act is None and residual.dtype == x.dtype
                    and tuple(residual.shape) == tuple(x.shape[:-1]) + (w.shape[0],))
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (fuse_res and residual.requires_grad)):
            out = _FusedLinear.apply(x, w, b, residual.contiguous() if fuse_res else None)
            if fuse_res:
                return out
        elif fuse_res:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), w, b, "add")
        else:
            out = torch.ops.mkldnn._linear_pointwise(x, w, b, "relu" if act == "relu" else "none", [], "")
            if act == "relu":
                return out if residual is None else residual + out
        if act == "gelu":
            out = F.gelu(out)
        elif act == "relu":
            out = F.relu(out)
        return out if residual is None else residual + out
    out = F.linear(x, w, b)
    if act == "gelu":
        out = F.gelu(out)
    elif act == "relu":
        out = F.relu(out)
    return out if residual is None else residual + out


def depthwise_conv_f32_pays(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """True when a grouped conv about to be trained on CPU in bf16 (weights or autocast) should not
    run as oneDNN's bf16 conv: its backward is several times slower than the float32 one for
    strided convs and kernels of 5x5 and up (measured, batch 32, channels-last, forward + backward:
    ConvMixer-768/32's 9x9 layer 1072 vs 593 ms on the AMX CPU; CvT-13's stride-2 key/value
    projections 35-40 vs 3-12 ms on the AMX and the Zen 4 CPU), far more than the two casts cost.
    Stride-1 3x3 convs stay in bf16: oneDNN has a fast path for them (ConvMixer-768/32 widths with
    k=3 on the Zen 4 CPU: 38 ms in bf16, 65 ms in float32). `depthwise_conv_bf16_train` is the
    replacement. The values are the same up to bf16 rounding of the output."""
    return (_STATE["enabled"] and x.device.type == "cpu" and conv.groups > 1 and torch.is_grad_enabled()
            and (conv.stride != (1, 1) or max(conv.kernel_size) >= 5)
            and (x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                               and torch.get_autocast_dtype("cpu") == torch.bfloat16)))


def depthwise_conv_bf16_train(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`conv(x)` for a depthwise conv trained on CPU in bf16 (where `depthwise_conv_f32_pays`), the
    fastest correct way: in bf16 with vitlab's weight-gradient kernel for 5x5 kernels and larger
    (`cpu_kernels.depthwise_conv`: ConvMixer's 7x7 and 9x9 layers train 2.2-2.6x faster than in
    float32, without the casts), else in float32. Returns bf16."""
    if ck.depthwise_conv_ok(x, conv):
        return ck.depthwise_conv(x, conv)
    return conv2d_f32(x, conv)


def conv2d_f32(x: torch.Tensor, conv: nn.Conv2d, out_dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """`conv(x)` computed in float32 (autocast off), returned in `out_dtype` (None: float32);
    see depthwise_conv_f32_pays."""
    with torch.autocast("cpu", enabled=False):
        y = F.conv2d(x.float(), conv.weight.float(), None if conv.bias is None else conv.bias.float(),
                     conv.stride, conv.padding, conv.dilation, conv.groups)
    return y if out_dtype is None else y.to(out_dtype)


# Rows of an MLP computed at once in bf16 inference: keeps the (rows, 4C) hidden activation
# under ~16 MB. Larger buffers are served by fresh mmap'd pages from the OS on every call (glibc
# cannot keep blocks over 32 MB in its heap), whose page faults cost as much as the GELU:
# CvT-13's stage-1 hidden layer is 51 MB at batch 32.
MLP_CHUNK_BYTES = 16 << 20


def mlp_inference_ok(fc1: nn.Linear, fc2: nn.Linear, act: nn.Module, x: torch.Tensor) -> bool:
    """`mlp_inference` applies: bf16 CPU inference (no autograd), biases, exact GELU."""
    return (_onednn_ok(x, fc1.weight) and fc2.weight.dtype == torch.bfloat16 and fc1.bias is not None
            and fc2.bias is not None and type(act) is nn.GELU and act.approximate == "none"
            and not (torch.is_grad_enabled() and (x.requires_grad or fc1.weight.requires_grad)))


def gelu_kernel_ok(act: nn.Module, h: torch.Tensor) -> bool:
    """vitlab's GELU kernel applies to `act(h)`: exact nn.GELU, fast paths on, the kernels built,
    `h` a contiguous bf16 CPU tensor outside autograd."""
    return (type(act) is nn.GELU and act.approximate == "none" and _STATE["enabled"] and _plain_context()
            and ck.get() is not None and ck.gelu_ok(h))


def gelu_train_kernel_ok(act: nn.Module, h: torch.Tensor) -> bool:
    """vitlab's differentiable GELU kernels apply to `act(h)` (training; see `cpu_kernels.gelu`)."""
    return type(act) is nn.GELU and act.approximate == "none" and _STATE["enabled"] and ck.gelu_train_ok(h)


def gelu_kernel(h: torch.Tensor) -> torch.Tensor:
    """Exact GELU of `h` by vitlab's CPU kernels, with autograd (see `gelu_train_kernel_ok`)."""
    return ck.gelu(h)


def gelu_kernel_(h: torch.Tensor) -> torch.Tensor:
    """Exact GELU of `h` in place by vitlab's CPU kernel (see `gelu_kernel_ok`)."""
    return ck.gelu_(ck.get(), h)


def mlp_inference(fc1: nn.Linear, fc2: nn.Linear, x: torch.Tensor, residual: torch.Tensor,
                  cpu_kernel: bool = False) -> torch.Tensor:
    """residual + fc2(GELU(fc1(x))) for bf16 inference on CPU, in row blocks of MLP_CHUNK_BYTES.

    oneDNN applies fc1's bias and the exact (erf) GELU while writing the product, and fc2's bias
    and the residual add while writing its product: two passes over memory fewer than separate
    kernels, and GELU computed from the float32 accumulator (one rounding instead of two).
    Measured against linear + F.gelu at CvT-13's shapes (batch 32, one core): stage 1 41 vs
    63 ms, stage 2 15 vs 37 ms, stage 3 equal."""
    B, N, C = x.shape
    x2 = x.reshape(B * N, C).contiguous()
    r2 = residual.reshape(B * N, C).contiguous()
    M = B * N
    chunks = max(1, -(-M * fc1.out_features * x.element_size() // MLP_CHUNK_BYTES))
    rows = -(-M // chunks)  # equal chunks: no small remainder product
    outs = []
    for s in range(0, M, rows):  # over row blocks of the batch, not over tokens one by one
        if cpu_kernel:  # vitlab's GELU kernel on the product (faster than oneDNN's erf epilogue)
            h = gelu_kernel_(torch.ops.mkldnn._linear_pointwise(x2[s:s + rows], fc1.weight, fc1.bias, "none", [], ""))
        else:
            h = torch.ops.mkldnn._linear_pointwise(x2[s:s + rows], fc1.weight, fc1.bias, "gelu", [], "none")
        outs.append(torch.ops.mkldnn._linear_pointwise.binary(h, r2[s:s + rows], fc2.weight, fc2.bias, "add"))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(B, N, C)


# ----------------------------------------------------------------------------- attention
def attention_reference(q, k, v, scale: float | None = None, bias: torch.Tensor | None = None,
                        dropout_p: float = 0.0, training: bool = False):
    """softmax(q k^T * scale + bias) v by explicit matrix products (the plain model's
    `layers.attention` with the probabilities). Returns (out, probabilities)."""
    return _plain_attention(q, k, v, scale, bias, dropout_p, training, need_weights=True)


def _sdpa(q, k, v, scale, bias, dropout_p, training):
    return _plain_attention(q, k, v, scale, bias, dropout_p, training)[0]


def _matmul(q, k, v, scale, bias, dropout_p, training):
    return attention_reference(q, k, v, scale, bias, dropout_p, training)[0]


_KERNELS = {"sdpa": _sdpa, "matmul": _matmul}


def _measure(fn, args, reps: int = 3) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best


def _fwd_bwd(fn, q, k, v, scale, bias):
    """A forward + backward of kernel `fn` on fresh leaves shaped like q, k, v (for timing)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    if bias is not None:  # detached: timing must not backpropagate into the real graph
        bias = bias.detach().clone().requires_grad_(bias.requires_grad)

    def run():
        with torch.enable_grad():
            out = fn(*leaves, scale, bias, 0.0, False)
            out.backward(torch.ones_like(out))
    return run


def _choose_kernel(q, k, v, scale, bias, dropout_p, training) -> str:
    kind = _STATE["attention"]
    if kind in ("sdpa", "matmul"):
        return kind
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    # Fused kernels are the right choice wherever the choice cannot be timed cheaply and
    # safely: on GPU (flash / memory-efficient SDPA), with attention dropout, under tracing
    # and counters.
    if (not _STATE["enabled"] or q.device.type != "cpu" or (dropout_p and training) or not _plain_context()):
        return "sdpa"
    if kind == "auto":
        return ("matmul" if grad and q.dtype in MATMUL_TRAIN_DTYPES and q.shape[-2] * k.shape[-2] <= MATMUL_TRAIN_MAX_LOGITS
                else "sdpa")
    key = (q.device.type, q.dtype, tuple(q.shape), tuple(k.shape), bias is not None, grad, torch.get_num_threads())
    choice = _ATTN_CHOICE.get(key)
    if choice is None:
        # 'measure': time both once for this shape (the CPU kernels' relative speed depends on
        # the shape, the dtype, the thread count and on whether a backward follows).
        # identity saved-tensor hooks: the timing runs must not be seen by an enclosing
        # activation checkpoint (its recomputation would find other saved tensors)
        with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            if grad:
                times = {name: _measure(_fwd_bwd(fn, q, k, v, scale, bias), (), reps=2)
                         for name, fn in _KERNELS.items()}
            else:
                times = {name: _measure(fn, (q, k, v, scale, bias, 0.0, False)) for name, fn in _KERNELS.items()}
        choice = min(times, key=times.get)
        _ATTN_CHOICE[key] = choice
    return choice


def cpu_kernel_attention(q, k, v, scale: float, bias=None, dropout_p: float = 0.0, training: bool = False):
    """vitlab's fused CPU attention (`kernels`: the bf16 inference kernel, or with autograd the
    bf16 or float32 kernel pair with its backward) as (B, H, Nq, d), or None where it does not apply."""
    if bias is not None or (dropout_p and training) or not _STATE["enabled"] or not _plain_context():
        return None
    mod = ck.get()
    if mod is not None and ck.attention_ok(q, k, v):
        return ck.attention(mod, q, k, v, scale)
    if _train_kernel_ok(dropout_p, training, (q, k, v)) and ck.attention_train_ok(q, k, v):
        return ck.attention_train(q, k, v, scale)
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              bias: torch.Tensor | None = None, dropout_p: float = 0.0, training: bool = False,
              need_weights: bool = False, cpu_kernel: bool = False):
    """Multi-head attention core on (B, H, N, d) tensors: softmax(q k^T * scale + bias) v.

    `bias` is an additive logit bias broadcastable to (B, H, Nq, Nk) (a (H, Nq, Nk) table is
    allowed). Returns (out (B, H, Nq, d), probabilities (B, H, Nq, Nk) or None). With
    `need_weights` the explicit path runs and returns the probabilities; otherwise the fastest
    correct kernel for the device and shape (see `set_attention_kernel`). `cpu_kernel`: use
    vitlab's fused bf16 CPU attention (`cpu_kernels`) where it applies (set on the modules by
    `optimize_for_inference`); the output is then a view of (B, Nq, H*d) memory.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if need_weights:
        return attention_reference(q, k, v, scale, bias, dropout_p, training)
    if cpu_kernel:
        out = cpu_kernel_attention(q, k, v, scale, bias, dropout_p, training)
        if out is not None:
            return out, None
    kind = _choose_kernel(q, k, v, scale, bias, dropout_p, training)
    return _KERNELS[kind](q, k, v, scale, bias, dropout_p, training), None


def _train_kernel_ok(dropout_p: float, training: bool, tensors) -> bool:
    return (_STATE["enabled"] and not (dropout_p and training) and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors))


# float32 training attention through vitlab's kernel (`kernels.attention_fwd_f32` and its backward:
# AVX-512 float32 products over a whole head). Faster than SDPA's forward + backward at every shape
# measured (one Zen 4 core: 1.06x at 17 tokens, 1.29x at ViT-S/16's 197, 1.17-1.27x at CvT-13's
# stages; docs/speed.md). Below F32_KERNEL_MIN_KEYS keys (the default digits model has 17 tokens)
# attention is a sliver of the step and the kernels' first-use build (about 25 s, once per machine)
# would cost a short run more than it saves, so such models keep SDPA. The choice depends on the
# shape only, never on timing, so a run and its resume compute the same bits.
F32_KERNEL_MIN_KEYS = 32


def f32_attention_kernel(x: torch.Tensor, n_keys: int) -> bool:
    """Whether float32 attention over `n_keys` keys, whose input `x` is about to be differentiated,
    runs on vitlab's float32 kernel: CPU float32 training (autograd on, no autocast), at least
    F32_KERNEL_MIN_KEYS keys, fast paths on, and the kernels available here (x86-64 with AVX-512
    BF16, `VITLAB_CPU_KERNELS` not 0; built at first use)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and n_keys >= F32_KERNEL_MIN_KEYS
            and _train_kernel_ok(0.0, False, (x,)) and not torch.is_autocast_enabled("cpu") and _plain_context()
            and ck.get() is not None)  # get() decides once per process (and builds, where it can)


def attention_qkv_train_ok(qkv: torch.Tensor) -> bool:
    """vitlab's attention kernel with its backward applies to a fused qkv projection's output
    (B, N, 3, H, d) (bf16 or float32 CPU training; see `kernels.attention_train_ok`)."""
    if not _train_kernel_ok(0.0, False, (qkv,)) or qkv.dim() != 5 or qkv.shape[2] != 3:
        return False
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return ck.attention_train_ok(q, k, v)


# ----------------------------------------------------------------------------- model-level
def block_lists(model: nn.Module) -> list[nn.ModuleList | nn.Sequential]:
    """The containers of repeated blocks of any vitlab model: `model.blocks` (ViT, ConvMixer)
    and `model.stages[i].blocks` (CvT, staged models)."""
    found = []
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        found.append(blocks)
    for stage in getattr(model, "stages", None) or []:
        sb = getattr(stage, "blocks", None)
        if isinstance(sb, (nn.ModuleList, nn.Sequential)):
            found.append(sb)
    return found


def _checkpointed(module: nn.Module, plain_forward: Callable, *args, **kwargs):
    if module.training and torch.is_grad_enabled() and not kwargs.get("return_attn", False):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(plain_forward, *args, use_reentrant=False, **kwargs)
    return plain_forward(*args, **kwargs)


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> nn.Module:
    """Activation checkpointing: keep only each block's input and recompute the block in the
    backward pass (about one more forward of compute for much less activation memory).

    Uses the model's own `set_grad_checkpointing` when it has one (ViT); otherwise wraps the
    forward of every block found by `block_lists` (CvT, ConvMixer). Parameter names do not
    change, so checkpoints load either way. Only active in training mode with autograd on.
    """
    own = getattr(type(model), "set_grad_checkpointing", None)
    if own is not None:
        own(model, enable)
        return model
    containers = block_lists(model)
    if not containers:
        raise ConfigError(f"{type(model).__name__} has no `blocks` or `stages[i].blocks` to checkpoint; "
                          f"call torch.utils.checkpoint yourself around its repeated parts")
    for container in containers:
        for blk in container:
            if enable and "forward" not in blk.__dict__:
                blk.forward = functools.partial(_checkpointed, blk, type(blk).forward.__get__(blk))
            elif not enable and "forward" in blk.__dict__:
                del blk.forward
    model.grad_checkpointing = enable
    return model


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d inside an nn.Sequential into the
    convolution (inference only: w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var +
    eps) + beta) and replace the BatchNorm by Identity. Returns the number folded. CvT's
    depthwise q/k/v projections are conv + BN; ConvMixer's BN follows an activation, so it stays.
    """
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.running_var is not None):
                continue
            inv = (bn.running_var.float() + bn.eps).rsqrt()
            g = bn.weight.float() if bn.affine else torch.ones_like(inv)
            beta = bn.bias.float() if bn.affine else torch.zeros_like(inv)
            scale = g * inv
            w = conv.weight.float() * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
            bias0 = conv.bias.float() if conv.bias is not None else torch.zeros_like(inv)
            new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                            device=conv.weight.device, dtype=conv.weight.dtype)
            new.weight.copy_(w)
            new.bias.copy_((bias0 - bn.running_mean.float()) * scale + beta)
            seq._modules[a] = new
            seq._modules[b] = nn.Identity()
            folded += 1
    return folded


def _has_spatial_convs(model: nn.Module) -> bool:
    """True for models that run convolutions on feature maps (CvT, ConvMixer, ResNet), not just
    a stride = kernel patch projection (ViT), where channels-last memory pays."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and (m.groups > 1 or m.kernel_size != m.stride):
            return True
    return False


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """`torch.compile` each repeated block in place (regional compilation: identical blocks
    share one compiled graph, so compile time is that of one block per distinct shape).
    Returns the number of blocks. Compilation itself happens on the first call (`vitlab bench
    --compile` reports its time)."""
    n = 0
    for container in block_lists(model):
        for blk in container:
            blk.compile(**compile_kwargs)
            n += 1
    if n == 0:
        raise ConfigError(f"{type(model).__name__} has no repeated blocks to compile; use torch.compile(model)")
    return n


def _cast_input_hook(dtype: torch.dtype, channels_last: bool):
    """A forward pre-hook casting incoming float images once to the model's dtype (and
    channels-last memory): float32 images from a loader need no manual cast."""
    def hook(module, args, kwargs):
        if not args or not torch.is_tensor(args[0]) or not args[0].is_floating_point():
            return None
        x = args[0].to(dtype)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x,) + tuple(args[1:]), kwargs
    return hook


def _image_input_module(model: nn.Module) -> nn.Module:
    """The module that first sees the images: the first Conv2d taking the model's input
    channels (patch projection, conv stem, token embedding). Every entry point (forward,
    forward_intermediates, forward_features) goes through it."""
    in_chans = getattr(model, "in_chans", None)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and (in_chans is None or m.in_channels == in_chans):
            return m
    return model


def optimize_for_inference(model: nn.Module, dtype: torch.dtype | str = "auto",
                           channels_last: bool | None = None, fold_bn: bool = True,
                           compile: bool = False, cpu_kernels: bool | None = None,
                           streams: int | None = None) -> nn.Module:
    """Prepare a built model for fast inference, in place; returns it.

    - eval mode, autograd off for its parameters;
    - BatchNorm after a convolution folded into it (`fold_batchnorm`; CvT's q/k/v projections);
    - the modules swapped for their accelerated versions (`accelerate`);
    - parameters and buffers cast once to `dtype` ('auto': bf16 where the device runs it natively,
      `caps.auto_dtype`, else float32; an explicit 'bf16' where it is emulated warns once): no
      weight casts on every call as under autocast;
    - channels-last memory for models with spatial convolutions (default: auto);
    - a pre-hook on the first convolution that casts incoming float images to `dtype`
      (and channels-last), whichever entry point (forward, forward_intermediates) is used;
    - `compile=True`: `torch.compile` of each repeated block (`compile_blocks`);
    - bf16 on a CPU with AVX-512 BF16 (or AMX): vitlab's fused attention, layer-norm and GELU kernels
      (`vitlab.accel.kernels`, built by the first such call, ~25 s once). `cpu_kernels=None` uses
      them where they can be built, `False` never, `True` insists (an error says why not);
    - CPU batches run as `streams` parts in parallel, one core each (`run_in_streams`; None: one
      stream per core on CPUs with 2-4 cores, `auto_inference_streams`; 1: off). Not with `compile`.

    Outputs are in `dtype`; `model(x).float()` for float32 logits. Training after this needs a
    fresh model (BatchNorm statistics were folded away).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dtype == "auto":
        dtype = caps.auto_dtype(device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}.get(dtype, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be 'auto', 'bf16', 'fp32', 'fp16' or a floating torch.dtype, got {dtype!r}")
    if dtype == torch.bfloat16:
        caps.warn_emulated_bf16("optimize_for_inference", device)
    elif cpu_kernels:
        raise ConfigError(f"cpu_kernels=True needs dtype='bf16' (vitlab's CPU kernels are bf16 kernels), got {dtype}; "
                          f"pass dtype='bf16' or leave cpu_kernels=None")
    from .modules import accelerate

    accelerate(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if fold_bn:
        fold_batchnorm(model)
    model.to(dtype=dtype)
    if channels_last is None:
        channels_last = _has_spatial_convs(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.inference_dtype = dtype
    model.inference_channels_last = bool(channels_last)
    old_hook = getattr(model, "_vitlab_cast_hook", None)
    if old_hook is not None:
        old_hook.remove()
    model._vitlab_cast_hook = _image_input_module(model).register_forward_pre_hook(
        _cast_input_hook(dtype, bool(channels_last)), with_kwargs=True)
    use_cpu_kernels(model, cpu_kernels if dtype == torch.bfloat16 else False)
    if streams is not None and (not isinstance(streams, int) or streams < 1):
        raise ConfigError(f"streams must be a positive number of parallel batch parts (or None: auto), got {streams!r}")
    model.inference_streams = 1 if compile else streams
    if "forward" not in model.__dict__:
        # batch parts on separate cores (CPU inference); a partial, so deepcopy and pickle follow the model
        model.forward = functools.partial(_streamed_forward, model)
    if compile:
        compile_blocks(model)
    return model


def _streamed_forward(model: nn.Module, x, *args, **kwargs):
    """`type(model).forward`, run as `streams_for(model, x)` batch parts in parallel where that applies."""
    plain = type(model).forward.__get__(model)
    n = streams_for(model, x) if not args and not kwargs else 1
    return run_in_streams(plain, x, n) if n > 1 else plain(x, *args, **kwargs)


def use_cpu_kernels(model: nn.Module, enable: bool | None = None) -> bool:
    """Route a bf16 CPU model's attention, layer norms and GELUs through vitlab's CPU kernels
    (`vitlab.accel.kernels`; the model is accelerated first) or, with `enable=False`, back to
    PyTorch's. `None`: where they can be built. Returns whether they are in use. Same parameters
    and state dict."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if enable is None:
        enable = on_cpu and caps.bf16_native("cpu") and ck.get() is not None
    elif enable:
        if not on_cpu:
            raise ConfigError("vitlab's CPU kernels run on CPU; this model has parameters on another device")
        if ck.get() is None:
            raise ConfigError(f"vitlab's CPU kernels cannot be used here: {ck.unavailable_reason()}; "
                              f"pass cpu_kernels=False (or leave it None) to use PyTorch's kernels")
    if enable:
        from .modules import accelerate

        accelerate(model)
    for m in model.modules():
        if hasattr(m, "cpu_kernel"):  # FastAttention (ViT, hybrid), FastConvAttention (CvT), FastMlp (GELU)
            m.cpu_kernel = bool(enable)
        if type(m) in (nn.LayerNorm, ck.FastLayerNorm):
            m.__class__ = ck.FastLayerNorm if enable else nn.LayerNorm
    return bool(enable)


# ----------------------------------------------------------------------------- inference streams
# Batch-parallel inference on CPU: the batch split into equal parts, each run by its own thread
# whose operators use one core, instead of every operator split over all cores (PyTorch's
# intra-op threads). What IPEX calls multi-stream inference, with plain threads: every operator
# vitlab calls releases the GIL. Why: each intra-op operator ends at a barrier where every core
# waits for the slowest, hundreds of times per forward; on a CPU shared with other tenants one
# core is often slower for seconds, and the streams stop waiting for it except at the very end.
# Measured on the development CPU (2 cores, batch 32, bf16, alternating with intra-op threads):
# ViT-S/16 1.06-1.23x, CvT-13 1.09-1.19x (docs/speed.md). Bit-identical outputs there (the row
# blocking of the products does not change with the batch); at most bf16 rounding apart elsewhere.
_STREAMS: dict = {"n": 0, "pool": None, "lock": threading.Lock()}
_STREAM_THREAD = threading.local()
MIN_IMAGES_PER_STREAM = 4
MAX_AUTO_STREAMS = 4  # one stream per core up to 4 cores (measured on 2); more cores: intra-op threads


def auto_inference_streams() -> int:
    """Streams `inference_streams=None` uses: one per intra-op thread for 2-4 threads, else 1 (off)."""
    n = torch.get_num_threads()
    return n if 2 <= n <= MAX_AUTO_STREAMS else 1


def _user_hooks(model: nn.Module) -> bool:
    """Forward hooks other than vitlab's input cast: they would run once per part, in other threads."""
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    ours = getattr(getattr(model, "_vitlab_cast_hook", None), "id", None)
    return any(m._forward_hooks or any(k != ours for k in m._forward_pre_hooks) for m in model.modules())


def streams_for(model: nn.Module, x) -> int:
    """How many streams `model(x)` runs as (1: the usual intra-op threads). Streams apply to
    models prepared by `optimize_for_inference` (`model.inference_streams`), CPU inference
    (autograd off, no autocast, nothing intercepting operators, no user forward hooks) and
    batches of at least MIN_IMAGES_PER_STREAM images per stream."""
    n = getattr(model, "inference_streams", 1)
    n = auto_inference_streams() if n is None else int(n)
    if (n < 2 or not torch.is_tensor(x) or x.device.type != "cpu" or x.ndim == 0
            or x.shape[0] < MIN_IMAGES_PER_STREAM * n or getattr(_STREAM_THREAD, "active", False)):
        return 1
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or not (_STATE["enabled"] and _plain_context()):
        return 1
    return 1 if _user_hooks(model) else n


def _stream_pool(n: int):
    with _STREAMS["lock"]:
        if _STREAMS["n"] != n:
            if _STREAMS["pool"] is not None:
                _STREAMS["pool"].shutdown(wait=True)
            main_threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, thread_name_prefix="vitlab-stream")
            ready = threading.Barrier(n)  # n distinct threads, each set up once

            def setup():
                torch.set_num_threads(1)  # this thread's operators run on one core
                _STREAM_THREAD.active = True
                ready.wait()
            for f in [pool.submit(setup) for _ in range(n)]:
                f.result()
            torch.set_num_threads(main_threads)  # the process default back (the stream threads keep 1)
            _STREAMS.update(n=n, pool=pool)
        return _STREAMS["pool"]


def _forget_streams_after_fork():  # a forked child (DataLoader worker) has none of the threads
    _STREAMS.update(n=0, pool=None, lock=threading.Lock())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_streams_after_fork)


def run_in_streams(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int) -> torch.Tensor:
    """forward(x) as n equal parts of the batch, each in a stream thread; the parts' outputs
    concatenated. Inference mode is carried into the threads (autograd is off: see streams_for)."""
    pool = _stream_pool(n)
    inference = torch.is_inference_mode_enabled()

    def job(part):
        with torch.inference_mode(inference), torch.no_grad():
            return forward(part)
    futures = [pool.submit(job, part) for part in x.chunk(n)]
    wait(futures)  # every part finished (or failed) before anything is returned or raised
    return torch.cat([f.result() for f in futures])


# ----------------------------------------------------------------------------- training streams
# The same idea for float32 CPU training: each stream thread runs the forward, the loss and the
# backward of its part of the batch on one core; the parts' gradients are summed in a fixed order.
# Only where that computes the same function as the whole batch: every sample's loss independent
# of the others (no BatchNorm using batch statistics, a per-sample objective), no random layers
# (dropout, drop path: their draws from the one global generator would interleave in an order that
# changes from run to run), float32 without autocast (the only dtype measured), nothing
# intercepting operators, no hooks. Measured on the development CPU (2 cores, shared, ViT-S/16 batch
# 32, alternating with intra-op threads): docs/speed.md, "Training streams".
def _batch_coupled_or_random(model: nn.Module) -> str | None:
    """Why splitting this model's training batch would change what it computes, or None."""
    from ..models.layers import DropPath

    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.batchnorm._NormBase) and not isinstance(m, nn.modules.instancenorm._InstanceNorm):
            if m.training or m.running_mean is None:
                return f"{name or 'the model'} is a batch norm (its statistics span the whole batch)"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{name} is dropout (random)"
        if isinstance(m, DropPath) and m.p > 0:
            return f"{name} is drop path (random)"
        drop = getattr(m, "attn_drop", 0.0)
        if isinstance(drop, (int, float)) and drop > 0:
            return f"{name} has attention dropout (random)"
    return None


def train_streams_for(model: nn.Module, x, streams: int | None = None) -> int:
    """How many streams a CPU training step of `model` on the batch `x` runs as (1: PyTorch's
    intra-op threads, the usual way). `streams`: how many where they apply (None: one per intra-op
    thread with 2-4 of them, else 1). Streams apply to float32 training on CPU, at least MIN_IMAGES_PER_STREAM images per stream, autograd on,
    no autocast, nothing intercepting operators, no forward hooks, and a model whose samples do not
    interact and that draws no random numbers (`_batch_coupled_or_random`). The loss must be a
    mean of per-sample losses: that is the caller's part (the trainer asks its objective)."""
    n = auto_inference_streams() if streams is None else int(streams)
    if (n < 2 or not torch.is_tensor(x) or x.device.type != "cpu" or x.ndim == 0
            or x.shape[0] < MIN_IMAGES_PER_STREAM * n or getattr(_STREAM_THREAD, "active", False)):
        return 1
    if (not torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or not (_STATE["enabled"] and _plain_context())
            or not x.is_floating_point() or x.dtype != torch.float32):
        return 1
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return 1
    if _user_hooks(model) or _backward_hooks(model, params) or _batch_coupled_or_random(model) is not None:
        return 1
    flops = _forward_flops_per_image(model, x)
    if flops is None or flops * (x.shape[0] // n) < MIN_TRAIN_STREAM_FLOPS:
        return 1
    return n


# A stream's part must be worth its thread: the default run's tiny model (vit_nano_p2 on 8x8
# digits, 0.2 GFLOP forward per stream part, as `count_flops` counts) trained 0.79x as fast with
# streams on a quiet machine (27.2 s against 21.5 s: its Python-bound operators contend for the
# GIL), ViT-S/16 (150 GFLOP per part at batch 32) faster. Sizes in between are not measured; this
# bound is about 20 ms of one core's float32 products per forward.
MIN_TRAIN_STREAM_FLOPS = 2e9


def _forward_flops_per_image(model: nn.Module, x: torch.Tensor) -> float | None:
    """The model's forward FLOPs for one image shaped like x[0] (`vitlab.flops.count_flops`,
    counted once per shape and kept on the model), or None where they cannot be counted."""
    key = tuple(x.shape[1:])
    cache = model.__dict__.setdefault("_vitlab_flops_per_image", {})
    if key not in cache:
        from ..flops import count_flops

        try:
            with torch.no_grad():
                cache[key] = float(count_flops(model, img_size=tuple(x.shape[-2:]), in_chans=x.shape[1]))
        except Exception:  # a model the counter cannot run: no streams (the usual intra-op threads)
            cache[key] = None
    return cache[key]


def _backward_hooks(model: nn.Module, params: list[torch.Tensor]) -> bool:
    """Backward hooks on modules or parameters: in streams they would see one part's gradients, in
    another thread, and the streams' `autograd.grad` never runs post-accumulate-grad hooks."""
    if any(m._backward_hooks or m._backward_pre_hooks for m in model.modules()):
        return True
    return any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in params)


def train_in_streams(loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]],
                     x: torch.Tensor, y: torch.Tensor, n: int, params: list[torch.Tensor],
                     backward_scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss
                     ) -> tuple[torch.Tensor, dict]:
    """One training forward + backward of the batch (x, y) as `n` equal parts, each in a stream
    thread (see `train_streams_for`). `loss_fn(x_part, y_part)` returns (mean loss of the part,
    {metric: mean over the part}); part i's loss is weighted by its share of the batch, so the
    gradient is that of the whole batch's mean loss. The gradient of `backward_scale(loss)` is
    added to each parameter's `.grad` (as `backward_scale(loss).backward()` would), the parts'
    gradients summed in part order on this thread: the same bits on every run. Returns (the
    batch's loss, detached, and its metrics)."""
    pool = _stream_pool(n)
    B = x.shape[0]

    def job(xp, yp):
        with torch.enable_grad():
            loss, metrics = loss_fn(xp, yp)
            w = xp.shape[0] / B
            grads = torch.autograd.grad(backward_scale(loss * w), params, allow_unused=True)
        return loss.detach() * w, {k: torch.as_tensor(v).detach().float() * w for k, v in metrics.items()}, grads
    futures = [pool.submit(job, xp, yp) for xp, yp in zip(x.chunk(n), y.chunk(n))]
    wait(futures)  # every part finished (or failed) before anything is returned or raised
    results = [f.result() for f in futures]
    total_loss = results[0][0]
    metrics = dict(results[0][1])
    for loss, m, _ in results[1:]:
        total_loss = total_loss + loss
        for k, v in m.items():
            metrics[k] = metrics[k] + v
    with torch.no_grad():
        for i, p in enumerate(params):
            parts = [r[2][i] for r in results if r[2][i] is not None]
            if not parts:
                continue
            if p.grad is not None:
                for g in parts:  # part order: the same sum on every run
                    p.grad.add_(g)
                continue
            # a fresh buffer in the parameter's layout: autograd may hand two parameters the same
            # gradient tensor, so the parts themselves are never written to
            g = torch.empty_like(p, memory_format=torch.preserve_format)
            if len(parts) == 1:
                g.copy_(parts[0])
            else:
                torch.add(parts[0], parts[1], out=g)
                for other in parts[2:]:
                    g.add_(other)
            p.grad = g
    return total_loss, metrics


# ----------------------------------------------------------------------------- optimizers
def fused_adamw(params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW as one fused kernel over all parameters (`fused=True`) where PyTorch has it for
    the parameters' device (CPU and CUDA in torch >= 2.4), else the multi-tensor (`foreach`)
    version. Same update as the per-parameter loop."""
    params = list(params)
    if fused is None:
        first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
        fused = first.device.type in ("cpu", "cuda")
    if fused:
        try:
            return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)


class MasterWeightAdamW:
    """AdamW for a model whose parameters are bf16, keeping float32 master weights.

    The model computes in bf16 end to end (no autocast: no per-call casts of weights, and the
    residual stream, norms and activations stay bf16, halving their memory traffic); gradients
    are copied into the float32 masters, AdamW (fused) updates the masters, and the bf16
    parameters are refreshed from them. Small updates accumulate in float32, as with
    autocast's float32 weights.

        model.to(torch.bfloat16)
        opt = MasterWeightAdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        loss.backward(); opt.step(); opt.zero_grad()

    `params` may be parameter groups (dicts with "params" and options), as for torch optimizers.
    """

    def __init__(self, params: Iterable, **adamw_kwargs):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.model_params: list[torch.Tensor] = []
        self.master_params: list[torch.Tensor] = []
        master_groups = []
        for g in groups:
            ps = [p for p in g["params"] if p.requires_grad]
            masters = [p.detach().float().clone().requires_grad_(True) for p in ps]
            self.model_params += ps
            self.master_params += masters
            master_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": masters})
        if not self.model_params:
            raise ConfigError("MasterWeightAdamW got no trainable parameters")
        self.optimizer = fused_adamw(master_groups, **adamw_kwargs)
        self.param_groups = self.optimizer.param_groups

    @torch.no_grad()
    def step(self) -> None:
        pairs = [(m, p) for m, p in zip(self.master_params, self.model_params) if p.grad is not None]
        for m, p in pairs:
            m.grad = p.grad.float()
        self.optimizer.step()
        if pairs:
            torch._foreach_copy_([p for _, p in pairs], [m for m, _ in pairs])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "master": [m.detach().clone() for m in self.master_params]}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        with torch.no_grad():
            for m, saved, p in zip(self.master_params, sd["master"], self.model_params):
                m.copy_(saved)
                p.copy_(saved)
