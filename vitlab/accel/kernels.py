"""vitlab's own CPU kernels (fused attention, layer norm, GELU, CvT's depthwise q/k/v projections)
for bf16 inference, attention, GELU and layer norm with their backward for bf16 training, and
attention with its backward for float32 training (`ops.f32_attention_kernel`), on x86-64 CPUs with
AVX-512 BF16 (Intel Cooper Lake and later, AMD Zen 4 and later). bf16 attention's
matrix products run on AMX tiles where the CPU has them (Sapphire Rapids and later) and as AVX-512
BF16 dot products elsewhere; everything else needs AVX-512 BF16 only.

Built from `vitlab/csrc/cpu_kernels.cpp` with `torch.utils.cpp_extension` the first time
`vitlab.accel.optimize_for_inference` prepares a bf16 model on such a CPU (about 25 s, once, with a
notice on stderr; cached under torch's extension directory, keyed by the source's hash). Where
they cannot be used (no AVX-512 BF16, no C++ compiler or ninja, another OS, `VITLAB_CPU_KERNELS=0`),
`get()` returns None with the reason in `unavailable_reason()`, and every caller uses PyTorch's
kernels: the kernels are a speed-up, never a requirement. `VITLAB_CPU_AMX=0` keeps the products off
AMX on a CPU that has it (to compare the two, or to test the AVX-512 path there).
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import caps
from .state import active

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cpu_kernels.cpp"
ENV = "VITLAB_CPU_KERNELS"
_STATE: dict = {"module": None, "tried": False, "reason": None}


AMX_ENV = "VITLAB_CPU_AMX"
# What the kernels' code needs of the CPU (cpuinfo's names), and what they are compiled for: these
# instruction sets and nothing else (not -march=native or a CPU's name, which would let the compiler
# use instructions of the build machine that another CPU running the cached build lacks)
_NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma", "f16c")
_ISA_CFLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c",
               "-mamx-tile", "-mamx-bf16", "-mtune=generic"]  # AMX instructions run only where use_amx(True) succeeded


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _cpu_has_amx() -> bool:
    return {"amx_bf16", "amx_tile"} <= _cpu_flags()


def _why_not() -> str | None:
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"disabled by {ENV}={os.environ[ENV]}"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"built for x86-64 Linux only (this is {platform.system()} {platform.machine()})"
    missing = [f for f in _NEEDED_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)} (the kernels need AVX-512 with BF16 instructions)"
    c = caps.capabilities()
    if not c.cpu_bf16_native:  # e.g. ONEDNN_MAX_CPU_ISA caps the machine below its bf16 instructions
        return f"bf16 is not native here: {c.cpu_bf16_reason}"
    if c.aten_cpu_capability.upper() not in ("AVX512", "AVX512_BF16", "AMX"):
        return f"ATen runs its {c.aten_cpu_capability} kernels (ATEN_CPU_CAPABILITY caps it below AVX-512)"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        return "no C++ compiler found (install g++ to build vitlab's CPU kernels)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def static_reason() -> str | None:
    """Why the kernels cannot be used here, from what can be checked without building them (None: they
    can be built and loaded; `get()` builds them)."""
    if _STATE["tried"]:
        return _STATE["reason"]
    return _why_not()


def get():
    """The compiled kernels module, or None where they cannot be used (see `unavailable_reason`)."""
    if _STATE["tried"]:
        return _STATE["module"]
    with _BUILD_LOCK:  # training streams may ask from several threads at once: one build
        if _STATE["tried"]:
            return _STATE["module"]
        return _get()


_BUILD_LOCK = threading.Lock()


def _get():
    reason = _why_not()
    if reason is None:
        from torch.utils.cpp_extension import load

        tag = hashlib.sha256(SOURCE.read_bytes() + " ".join(_ISA_CFLAGS).encode()).hexdigest()[:10]
        if not _built(f"vitlab_cpu_kernels_{tag}"):  # a silent 25 s pause would look like a hang
            print(f"vitlab: building the CPU kernels (once, about 25 s; {ENV}=0 skips them)", file=sys.stderr, flush=True)
        try:
            # -fopenmp compiles at::parallel_for's OpenMP region; its symbols resolve to the
            # libgomp torch has loaded, so the process keeps one thread pool
            mod = load(f"vitlab_cpu_kernels_{tag}", [str(SOURCE)], extra_cflags=["-O3", *_ISA_CFLAGS, "-fopenmp"])
            use_amx(_cpu_has_amx() and os.environ.get(AMX_ENV, "1").strip().lower() not in ("0", "false", "no", "off"), mod)
            _STATE["module"] = mod
        except Exception as e:  # a failed build must never stop inference: fall back, say why once
            reason = f"the build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''})"
            warnings.warn(f"vitlab's CPU kernels are not used: {reason}; PyTorch's kernels run instead "
                          f"(set {ENV}=0 to skip the build)", RuntimeWarning, stacklevel=2)
    _STATE["reason"] = reason
    _STATE["tried"] = True  # last: a thread that sees it sees the module (or the reason) too
    return _STATE["module"]


def _built(name: str) -> bool:
    """Whether torch's extension directory already holds this build (then loading takes no time)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:  # a private helper of torch: if it moves, only the notice is affected
        return False


def use_amx(want: bool, mod=None) -> bool:
    """Run attention's products on AMX tiles (`want` and the CPU and OS allow it) or as AVX-512 BF16
    dot products; returns whether AMX is in use. The two compute the same sums in float32."""
    mod = mod if mod is not None else _STATE["module"]
    return bool(mod is not None and mod.use_amx(bool(want)))


def isa() -> str | None:
    """What the kernels' products run on ('AMX' or 'AVX-512 BF16'), None without the kernels."""
    mod = _STATE["module"]
    return None if mod is None else ("AMX" if mod.amx_in_use() else "AVX-512 BF16")


def unavailable_reason() -> str | None:
    """Why `get()` returned None (None when the kernels are in use or not tried yet)."""
    return _STATE["reason"]


def attention_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The fused attention applies: bf16 CPU tensors (B, H, N, d) with d a multiple of 32,
    contiguous last dims, no autograd."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.dim() == 4
            and q.shape[-1] % 32 == 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and k.shape == v.shape
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def attention(mod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v as (B, H, Nq, d), a view of a (B, Nq, H*d) tensor (so the usual
    `transpose(1, 2).reshape(B, Nq, H*d)` that follows costs nothing)."""
    B, H, Nq, d = q.shape
    return mod.attention_bf16(q, k, v, float(scale), 0).view(B, Nq, H, d).transpose(1, 2)


# Largest (keys x queries) per head for the training attention: its backward keeps P^T and dS^T of one
# head per thread (bf16), 32 MB per thread at this size (CvT-13's stage 1 at 224 px: 5 MB)
ATTENTION_TRAIN_MAX_LOGITS = 1 << 23


def attention_train_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The fused attention with its backward (`attention_train`) applies: the kernels built, CPU
    (B, H, N, d) tensors, bf16 with d a multiple of 32 or float32 with d a multiple of 16, contiguous
    last dims, nothing intercepting ops."""
    mult = {torch.bfloat16: 32, torch.float32: 16}.get(q.dtype)
    return (_STATE["module"] is not None and mult is not None and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype
            and q.dim() == 4 and q.shape[-1] % mult == 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and k.shape == v.shape and q.shape[:2] == k.shape[:2] and q.shape[-1] == k.shape[-1]
            and q.shape[2] * k.shape[2] <= ATTENTION_TRAIN_MAX_LOGITS and _plain())


def _attention_forward(q, k, v, scale):
    fwd = _STATE["module"].attention_fwd_f32 if q.dtype == torch.float32 else _STATE["module"].attention_fwd_bf16
    return fwd(q, k, v, float(scale))


def _attention_backward(ctx, g, q, k, v, dq, dk, dv):
    out, lse = ctx.saved_tensors[-2:]
    if q.dtype == torch.float32:
        _STATE["module"].attention_backward_f32(g.contiguous(), q, k, v, out, lse, ctx.scale, dq, dk, dv)
    else:
        _STATE["module"].attention_backward_bf16(g.contiguous(), q, k, v, out, lse, ctx.scale, dq, dk, dv, 0)


class _Attention(torch.autograd.Function):
    """softmax(scale q k^T) v with autograd on (B, H, N, d) q, k, v; returns (B, Nq, H*d). The
    forward also keeps each row's log-sum-exp; the backward recomputes the probabilities from it
    (flash-attention style) and computes dq, dk, dv in one kernel (bf16: AMX or AVX-512 BF16
    products; float32: AVX-512 float32 products)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = _attention_forward(q, k, v, scale)
        ctx.scale = float(scale)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        q, k, v = ctx.saved_tensors[:3]
        (B, H, Nq, d), N = q.shape, k.shape[2]
        # gradients in (B, N, H, d) memory: what the q / k / v projections' backward reads
        dq = q.new_empty(B, Nq, H, d).transpose(1, 2)
        dk, dv = (k.new_empty(B, N, H, d).transpose(1, 2) for _ in range(2))
        _attention_backward(ctx, g, q, k, v, dq, dk, dv)
        return dq, dk, dv, None


class _QKVAttention(torch.autograd.Function):
    """`_Attention` on the fused qkv projection's output (B, N, 3, H, d), read in place; the
    backward writes the gradient of all three into one buffer of that layout, which the qkv
    projection's backward reads as it is (no stacking or permuting of three gradients)."""

    @staticmethod
    def forward(ctx, qkv, scale, queries):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out, lse = _attention_forward(q[:, :, :queries], k, v, scale)
        ctx.scale, ctx.queries = float(scale), queries
        ctx.save_for_backward(qkv, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        qkv = ctx.saved_tensors[0]
        n = ctx.queries
        dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        if n < qkv.shape[1]:  # tokens that gave no query: no gradient through q
            dqkv[:, n:, 0].zero_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
        _attention_backward(ctx, g, q[:, :, :n], k, v, dq[:, :, :n], dk, dv)
        return dqkv, None, None


def attention_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v, differentiable (see `attention_train_ok`), as (B, H, Nq, d): a view
    of (B, Nq, H*d) memory, like `attention`."""
    B, H, Nq, d = q.shape
    return _Attention.apply(q, k, v, scale).view(B, Nq, H, d).transpose(1, 2)


def attention_qkv_train(qkv: torch.Tensor, scale: float, queries: int | None = None) -> torch.Tensor:
    """Attention of a fused qkv projection's output `qkv` (B, N, 3, H, d), differentiable, for the
    first `queries` tokens (all by default); returns (B, Nq, H*d)."""
    return _QKVAttention.apply(qkv, scale, qkv.shape[1] if queries is None else queries)


def dwconv_qkv(mod, x: torch.Tensor, prefix: int, grid: tuple[int, int], weights: torch.Tensor, biases: torch.Tensor,
               kv_stride: int, want_q: bool, norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
               ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """CvT's three depthwise 3x3 projections (padding 1; q at stride 1, k and v at `kv_stride`) of the
    token map in `x` (B, prefix + h*w, C), each returned as (B, prefix + n, C) tokens with the
    `prefix` (class) tokens in front. `weights` (3, 9, C) and `biases` (3, C) float32 (q, k, v;
    BatchNorm folded in). `norm` = (weight, bias, eps) (float32): layer norm applied to every token
    of `x` first (the class tokens too), in float32, without a bf16 copy in between. q is None
    unless `want_q`."""
    w, b, eps = norm if norm is not None else (_EMPTY, _EMPTY, 0.0)
    q, k, v = mod.dwconv_qkv_bf16(x, prefix, grid[0], grid[1], weights, biases, kv_stride, want_q, w, b, float(eps))
    return (q if want_q else None), k, v


_EMPTY = torch.empty(0)


def dwconv_qkv_ok(x: torch.Tensor) -> bool:
    """The fused depthwise projections apply to tokens `x`: bf16 CPU (B, N, C), C a multiple of 16,
    dense rows, no autograd."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 3 and x.shape[2] % 16 == 0
            and x.stride(2) == 1 and x.stride(1) == x.shape[2] and not (torch.is_grad_enabled() and x.requires_grad))


# GELU: Phi(x) as a cubic in u on each of GELU_INTERVALS intervals [a, a + w) of [GELU_LO, GELU_HI),
# u = (x - a) / w; the kernel computes x * Phi(x) with Phi clamped to the range's end points
GELU_LO, GELU_HI, GELU_INTERVALS = -6.0, 4.0, 32
@functools.cache
def gelu_coefficients() -> torch.Tensor:
    """(GELU_INTERVALS, 4) float32: c0..c3 of Phi (the standard normal CDF) on each interval,
    least-squares fits in float64 (max error 3e-6; GELU's relative error < 2e-4 where |GELU| > 0.01,
    about 10x below bf16's rounding). Computed once."""
    w = (GELU_HI - GELU_LO) / GELU_INTERVALS
    u = torch.linspace(0, 1, 256, dtype=torch.float64)
    V = torch.stack([u ** 0, u, u ** 2, u ** 3], 1)  # (256, 4)
    a = GELU_LO + w * torch.arange(GELU_INTERVALS, dtype=torch.float64)
    Y = torch.special.ndtr(a[None, :] + w * u[:, None])  # (256, intervals)
    return torch.linalg.lstsq(V, Y).solution.T.contiguous().float()


def gelu_ok(x: torch.Tensor) -> bool:
    """The GELU kernel applies: a contiguous bf16 CPU tensor, no autograd."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.is_contiguous()
            and not (torch.is_grad_enabled() and x.requires_grad))


def gelu_(mod, x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of bf16 `x` in place (see gelu_coefficients for its accuracy); returns x."""
    mod.gelu_bf16_(x, gelu_coefficients())
    return x


def gelu_train_ok(x: torch.Tensor) -> bool:
    """`gelu` applies to `x`: a bf16 CPU tensor, the kernels built, nothing intercepting ops."""
    return (_STATE["module"] is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and x.dim() > 0 and _plain())


class _Gelu(torch.autograd.Function):
    """Exact GELU with autograd: the kernel's forward out of place (the input is kept for the
    backward) and GELU'(x) = Phi(x) + x phi(x) by the backward kernel. Forward + backward at
    ViT-S/16's and CvT-13's MLP shapes in bf16: 1.2-1.5x PyTorch's pair, whose erf and exp
    dominate; at CvT stage 1 the fresh output buffers' page faults are most of what is left
    (docs/speed.md)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _STATE["module"].gelu_bf16(x, gelu_coefficients())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _STATE["module"].gelu_backward_bf16(g, x, gelu_coefficients())


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of bf16 `x` by vitlab's kernels, differentiable (see `gelu_train_ok`)."""
    return _Gelu.apply(x)


class _LayerNorm(torch.autograd.Function):
    """Layer norm of the last dim with autograd: vitlab's forward kernel, which also returns the
    rows' mean and 1/std, and a backward kernel (dx, and dw / db summed in a fixed order)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = _STATE["module"].layer_norm_stats_bf16(x, weight, bias, eps, True)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _STATE["module"].layer_norm_backward_bf16(g, x, mean, rstd, weight)
        return (dx if ctx.needs_input_grad[0] else None, dw.to(weight.dtype) if ctx.needs_input_grad[1] else None,
                db.to(weight.dtype) if ctx.needs_input_grad[2] else None, None)


class FastLayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm whose bf16 CPU forward (and backward, in training) runs vitlab's kernels (same
    parameters and state dict; `fast.use_cpu_kernels` swaps it in). Elsewhere it is nn.LayerNorm."""

    def forward(self, x):
        mod = _STATE["module"]
        if (mod is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.weight is not None
                and self.bias is not None and self.weight.dtype == torch.bfloat16 and self.bias.dtype == torch.bfloat16
                and len(self.normalized_shape) == 1 and x.dim() > 0 and _plain()):
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad):
                return _LayerNorm.apply(x, self.weight, self.bias, self.eps)
            return mod.layer_norm_bf16(x, self.weight, self.bias, self.eps)
        return super().forward(x)


def _plain() -> bool:
    return active()


# Depthwise convolutions in bf16 training: oneDNN computes the forward and the input gradient fast,
# but its weight gradient for kernels of 5x5 and up took 10-35x longer than vitlab's
# (`dwconv_weight_grad`; ConvMixer-768/32's 7x7 layer at batch 32 on a 2-core Zen 4: 330-410 ms
# against 26-28 ms). At 3x3 oneDNN has a fast path of its own (0.4-15 ms), so it keeps those.
DWCONV_MIN_KERNEL = 5


def depthwise_conv_ok(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """`depthwise_conv` applies to `conv(x)`: the kernels built, a CPU depthwise conv (one filter per
    channel, channels a multiple of 16) with a square kernel of DWCONV_MIN_KERNEL or more, equal
    strides of 1 or 2, symmetric zero padding, no dilation; autograd on; nothing intercepting ops."""
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    return (_STATE["module"] is not None and x.device.type == "cpu" and x.dim() == 4 and torch.is_grad_enabled()
            and conv.groups == conv.in_channels == conv.out_channels and conv.in_channels % 16 == 0
            and x.shape[1] == conv.in_channels and k[0] == k[1] >= DWCONV_MIN_KERNEL and s[0] == s[1] in (1, 2)
            and isinstance(p, tuple) and p[0] == p[1] and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and _plain())


class _DepthwiseConv(torch.autograd.Function):
    """A bf16 depthwise convolution (channels-last): forward and input gradient by oneDNN, the weight
    and bias gradients by `dwconv_weight_grad` (summed in float32, in an order that does not depend on
    the thread count)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        C, k = weight.shape[0], weight.shape[-1]
        g = g.contiguous(memory_format=torch.channels_last)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.convolution_backward(g, x, weight, None, [ctx.stride] * 2, [ctx.padding] * 2, [1, 1],
                                                     False, [0, 0], C, [True, False, False])[0]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            xc = x.contiguous(memory_format=torch.channels_last)
            dw, db = _STATE["module"].dwconv_weight_grad(g.permute(0, 2, 3, 1), xc.permute(0, 2, 3, 1), k,
                                                         ctx.stride, ctx.padding)
            dw, db = dw.view_as(weight).to(weight.dtype), (db.to(weight.dtype) if ctx.has_bias else None)
        return dx, dw, db, None, None


def depthwise_conv(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """`conv(x)` in bf16 (see `depthwise_conv_ok`), differentiable; under autocast the float32
    weights are cast for the call as autocast would, and their gradients come back in float32."""
    dt = torch.bfloat16
    x = x.to(dt).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", enabled=False):
        return _DepthwiseConv.apply(x, conv.weight.to(dt), None if conv.bias is None else conv.bias.to(dt),
                                    conv.stride[0], conv.padding[0])
