"""`vitlab bench`: how fast a model runs here, how close to the hardware's limit, and against
the well-known implementation of the same model, measured side by side.

    vitlab bench --model vit_s16 --mode infer --batch-size 32 --dtype bf16 --compare transformers

What one run measures:
- a timed step (inference forward, or a training step: forward + backward + optimizer
  update) after `--warmup` untimed ones; the median of `--steps` timed steps (synchronised on
  GPU). With `--compare`, the peer's step and ours alternate in the same process (ours, peer,
  ours, peer, ...), so both see the same machine load, and their ratio is reported;
- images/s, and TFLOP/s from the FLOPs counted by `vitlab.flops.count_flops` (a training
  step counts forward + backward; the optimizer's element-wise work is not counted);
- the peak of a matrix product measured on the spot (a large product in the same dtype on
  the same device) and the fraction of it the model reaches;
- peak memory of one step: CUDA's max_memory_allocated, or on CPU the peak of tensor storage
  allocated during the step and alive at once (tracked operator by operator; the resident
  set size says little there because the C allocator keeps freed memory for reuse).

"Fast" is vitlab as shipped: bf16 weights cast once (`optimize_for_inference`), the fused
linear/attention paths of `vitlab.accel`, vitlab's CPU kernels, inference streams on
CPUs with 2-4 cores (the batch in one part per core), bf16 training with float32 master weights,
vitlab's GELU and layer-norm kernels (with their backward) and fused AdamW. `--reference`
measures the "before": float32 weights under bf16 autocast, plain PyTorch kernels, AdamW's
default (foreach) update. The peer gets the usual options of
its library: float32 weights under bf16 autocast, SDPA attention where it has it, fused AdamW.
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, did_you_mean

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # and "auto": bf16 where native (vitlab.accel.caps)
MODES = ("infer", "train")
PEERS = ("transformers", "timm", "paper")


# ============================================================================ measuring
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_alternating(fns: dict[str, Callable[[], object]], steps: int, warmup: int = 1,
                     device: str | torch.device = "cpu", clock: Callable[[], float] = time.perf_counter
                     ) -> dict[str, list[float]]:
    """Run every function `warmup` times, then `steps` rounds of one timed call each, in turn
    (a, b, a, b, ...): slow phases of a shared machine hit all of them alike. Returns the
    per-call seconds of each. `clock=time.process_time` with one thread measures CPU work
    instead of wall time (robust to other processes on a shared machine)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            sync(device)
            t = clock()
            fn()
            sync(device)
            times[name].append(clock() - t)
    return times


# Shapes of the practical ceiling on CPU: a square product and the (tokens x width) x (width x
# 4 width) products of a ViT-S / ViT-B layer at batch 32. On the AMX development CPU the
# transformer-shaped products ran up to 1.7x faster than the 4096^2 square one (which spills
# its 32 MB operand out of L2), so a square-only "peak" understated the ceiling and overstated
# every row's fraction of it.
CPU_PEAK_SHAPES = ((4096, 4096, 4096), (6272, 384, 1536), (6272, 1536, 384), (6272, 768, 3072))
CUDA_PEAK_SHAPES = ((8192, 8192, 8192), (25088, 768, 3072), (25088, 3072, 768))


# The peak measurement's time bound: a shape whose product would take longer than this (predicted
# from a small product first) is shrunk along M until it fits. Emulated bf16 (CPUs without AVX-512
# BF16 / AMX: ~35x slower than float32) made the fixed 4096^3 product run for minutes.
PEAK_SECONDS_PER_SHAPE = 1.5


def matmul_peak_by_shape(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                         shapes=None, reps: int = 5, seconds: float = PEAK_SECONDS_PER_SHAPE
                         ) -> dict[tuple[int, int, int], float]:
    """FLOP/s of (M x K) @ (K x N) products in `dtype` on `device` for each (M, K, N) in
    `shapes`, measured now: best of `reps`, into a preallocated output (a fresh 30 MB output
    would add the C allocator's page faults to the product's time). Each shape's `reps + 1`
    products are bounded to about `seconds`: the largest side is halved until the predicted time
    fits (the returned key is the shape actually measured)."""
    device = torch.device(device)
    if shapes is None:
        shapes = CUDA_PEAK_SHAPES if device.type == "cuda" else (
            CPU_PEAK_SHAPES if dtype != torch.float32 else ((2048, 2048, 2048), (6272, 384, 1536)))
    out = {}
    with torch.inference_mode():
        rate = None
        if device.type == "cpu":  # a 256^3 product predicts the rest (milliseconds even when emulated)
            p = torch.randn(256, 256, dtype=dtype)
            torch.mm(p, p)
            t = time.perf_counter()
            torch.mm(p, p)
            rate = 2 * 256 ** 3 / max(time.perf_counter() - t, 1e-9)
        for m, k, n in shapes:
            while rate is not None and max(m, k, n) > 64 and 2 * m * k * n * (reps + 1) / rate > seconds:
                if m >= max(k, n):  # halve the largest side (M first): the product stays as square as it can
                    m //= 2
                elif k >= n:
                    k //= 2
                else:
                    n //= 2
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            c = torch.empty(m, n, device=device, dtype=dtype)
            torch.mm(a, b, out=c)
            sync(device)
            best = math.inf
            for _ in range(reps):
                t = time.perf_counter()
                torch.mm(a, b, out=c)
                sync(device)
                best = min(best, time.perf_counter() - t)
            out[(m, k, n)] = 2 * m * k * n / best
    return out


def matmul_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, size: int | None = None,
                reps: int = 5) -> float:
    """The practical matrix-product ceiling in `dtype` on `device`, measured now: the best
    FLOP/s of a square product and of transformer-shaped ones (`matmul_peak_by_shape`);
    `size` measures one square product of that size only. Every model row is compared with it."""
    shapes = None if size is None else ((size, size, size),)
    return max(matmul_peak_by_shape(device, dtype, shapes, reps).values())


class PeakMemory:
    """Peak memory of the code inside `with` (bytes, in `.bytes`): CUDA's allocator peak above
    what was allocated before, or on CPU the peak of tensor storage allocated inside and alive
    at once (`LiveTensorMemory`; the resident-set size is no measure there, since the C
    allocator keeps freed memory for reuse, all the more after `tune_cpu_allocator`)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.bytes: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self._live = LiveTensorMemory().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self._live.__exit__(*exc)
            self.bytes = self._live.peak
        return False


class LiveTensorMemory:
    """Peak bytes of tensor storage allocated inside the `with` block and alive at the same
    time: the CPU counterpart of CUDA's max_memory_allocated (minus what existed before),
    independent of how the C allocator keeps or returns memory. Tracks every operator's
    outputs through a dispatch mode, so vitlab's fast paths run their reference kernels
    while it is on (same tensors kept alive, a few more temporaries)."""

    def __init__(self):
        self.peak = 0
        self.current = 0

    def __enter__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        live: dict[int, tuple] = {}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                # storages of the inputs: outputs living there are views or in-place results
                inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                          if isinstance(a, torch.Tensor) and a.device.type != "meta"}
                for key, (ref, n) in list(live.items()):
                    if ref.expired():
                        del live[key]
                        tracker.current -= n
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key and key not in live and key not in inputs:
                            live[key] = (StorageWeakRef(st), st.nbytes())
                            tracker.current += st.nbytes()
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


# ============================================================================ models
def paper_convmixer(dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7, num_classes: int = 1000,
                    act: str = "gelu", in_chans: int = 3) -> nn.Sequential:
    """ConvMixer exactly as the paper defines it, in plain PyTorch, as the reference to beat:
    patch embedding conv (kernel = stride = p) -> act -> BN, then `depth` times
    [x + BN(act(depthwise k x k conv(x)))] -> BN(act(pointwise conv)), then global average
    pooling and a linear classifier."""
    Act = {"gelu": nn.GELU, "relu": nn.ReLU}[act]

    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x) + x

    layers = [nn.Conv2d(in_chans, dim, patch_size, stride=patch_size), Act(), nn.BatchNorm2d(dim)]
    for _ in range(depth):
        layers += [Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), Act(),
                                          nn.BatchNorm2d(dim))),
                   nn.Conv2d(dim, dim, 1), Act(), nn.BatchNorm2d(dim)]
    layers += [nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, num_classes)]
    return nn.Sequential(*layers)


@torch.no_grad()
def copy_weights_in_order(src: nn.Module, dst: nn.Module) -> None:
    """Copy a state dict between two implementations whose tensors are registered in the same
    order with the same shapes (vitlab's ConvMixer, the paper's and timm's all are)."""
    a, b = list(src.state_dict().values()), dst.state_dict()
    if len(a) != len(b):
        raise ConfigError(f"cannot copy weights: {len(a)} tensors in the source, {len(b)} in the target")
    for (name, t), s in zip(b.items(), a):
        if t.shape != s.shape:
            raise ConfigError(f"cannot copy weights: {name} has shape {tuple(t.shape)}, source {tuple(s.shape)}")
        t.copy_(s)


def _hf_vit(spec_cfg: dict, num_classes: int, img_size: int):
    from transformers import ViTConfig, ViTForImageClassification

    plain = dict(pos_embed="learned", global_pool="token", head="linear", hybrid_stem=None, class_token=None)
    for k, v in plain.items():
        if spec_cfg.get(k, v) != v:
            raise ConfigError(f"transformers' ViT has no {k}={spec_cfg[k]!r}; compare a plain ViT variant")
    dim = spec_cfg["embed_dim"]
    cfg = ViTConfig(hidden_size=dim, num_hidden_layers=spec_cfg["depth"], num_attention_heads=spec_cfg["num_heads"],
                    intermediate_size=int(dim * spec_cfg.get("mlp_ratio", 4.0)), image_size=img_size,
                    patch_size=spec_cfg["patch_size"], num_labels=num_classes, layer_norm_eps=1e-6,
                    qkv_bias=spec_cfg.get("qkv_bias", True), hidden_act="gelu")
    cfg._attn_implementation = "sdpa"  # the fastest attention transformers offers on CPU and GPU
    return ViTForImageClassification(cfg)


def _hf_cvt(spec_cfg: dict, num_classes: int, img_size: int):
    from transformers import CvtConfig, CvtForImageClassification

    n = len(spec_cfg["embed_dims"])

    def per(key, default):
        v = spec_cfg.get(key, default)
        return list(v) if isinstance(v, (list, tuple)) else [v] * n

    cfg = CvtConfig(num_labels=num_classes, embed_dim=list(spec_cfg["embed_dims"]), depth=list(spec_cfg["depths"]),
                    num_heads=list(spec_cfg["num_heads"]), patch_sizes=per("patch_sizes", [7, 3, 3]),
                    patch_stride=per("patch_strides", [4, 2, 2]), patch_padding=per("patch_paddings", [2, 1, 1]),
                    mlp_ratio=per("mlp_ratio", 4.0), drop_path_rate=per("drop_path_rate", 0.0),
                    cls_token=per("cls_token", None) if spec_cfg.get("cls_token") is not None
                    else [False] * (n - 1) + [True], image_size=img_size)
    return CvtForImageClassification(cfg)


@dataclass
class Pair:
    """vitlab's model and the peer implementation of the same function, with the same weights."""
    ours: nn.Module
    peer: nn.Module | None
    peer_name: str
    peer_forward: Callable  # peer(x) -> logits tensor


def build_pair(name: str, compare: str | None, num_classes: int = 1000, img_size: int = 224) -> Pair:
    """vitlab model `name` (fresh, float32, train mode) and, with `compare`, the peer built with
    the same configuration and carrying the same weights."""
    from .models import create_model
    from .models.registry import get_spec

    spec = get_spec(name)
    if compare is None:
        return Pair(create_model(spec.name, num_classes=num_classes, img_size=img_size), None, "", None)
    if compare not in PEERS:
        raise ConfigError(f"--compare {compare!r} is not valid.{did_you_mean(compare, PEERS)} "
                          f"Choose one of: {', '.join(PEERS)}.")
    if compare == "transformers" or (compare == "paper" and spec.family != "convmixer"):
        if compare == "paper":
            raise ConfigError(f"--compare paper is the plain-PyTorch ConvMixer; for {spec.name} use "
                              f"--compare transformers")
        from .models.convert import from_transformers

        if spec.family == "vit":
            hf = _hf_vit(spec.config, num_classes, img_size)
        elif spec.family == "cvt":
            hf = _hf_cvt(spec.config, num_classes, img_size)
        else:
            raise ConfigError(f"transformers has no {spec.family} model to compare {spec.name} with; "
                              + ("use --compare paper (the paper's definition in plain PyTorch)"
                                 if spec.family == "convmixer" else "compare a vit_* or cvt_* model"))
        ours = from_transformers(hf.eval()).train()  # same config, HF's (random) weights
        ours.variant_name = spec.name
        hf.train()
        return Pair(ours, hf, "transformers", lambda x: hf(pixel_values=x).logits)
    ours = create_model(spec.name, num_classes=num_classes, img_size=img_size)
    if compare == "paper":
        peer = paper_convmixer(ours.dim, ours.depth, ours.kernel_size, ours.patch_size[0], num_classes, ours.act,
                               ours.in_chans)
        copy_weights_in_order(ours, peer)
        return Pair(ours, peer, "paper (plain PyTorch)", peer)
    # timm: only where it is installed (the GPU machine)
    try:
        import timm  # noqa: F401
    except ImportError:
        raise ConfigError("timm is not installed here, so --compare timm cannot run; install it (pip install "
                          "timm) where it is allowed, e.g. on the GPU machine, or use --compare transformers")
    timm_names = {"vit_ti16": "vit_tiny_patch16_224", "vit_s16": "vit_small_patch16_224",
                  "vit_b16": "vit_base_patch16_224", "vit_s32": "vit_small_patch32_224",
                  "vit_b32": "vit_base_patch32_224", "vit_l16": "vit_large_patch16_224",
                  "convmixer_768_32": "convmixer_768_32", "convmixer_1536_20": "convmixer_1536_20"}
    if spec.name not in timm_names:
        raise ConfigError(f"no timm counterpart is mapped for {spec.name}; choose one of {', '.join(timm_names)}")
    import timm

    peer = timm.create_model(timm_names[spec.name], pretrained=False, num_classes=num_classes, img_size=img_size) \
        if spec.family == "vit" else timm.create_model(timm_names[spec.name], pretrained=False,
                                                       num_classes=num_classes)
    if spec.family == "vit":
        peer.load_state_dict(ours.state_dict(), strict=True)  # vitlab's ViT uses timm's key layout
    else:
        copy_weights_in_order(ours, peer)
    return Pair(ours, peer, "timm", peer)


def count_step_flops(name: str, mode: str, batch_size: int, img_size: int, num_classes: int = 1000) -> int:
    """FLOPs of one step, counted on a meta-device copy (no memory, no time)."""
    from .flops import count_flops
    from .models import create_model

    with torch.device("meta"):
        m = create_model(name, num_classes=num_classes, img_size=img_size)
    return count_flops(m, img_size=img_size, batch_size=batch_size, backward=(mode == "train"))


# ============================================================================ steps
def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def make_step(forward: Callable, model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, *, dtype,
              fast: bool, device: torch.device, optimizer: str = "foreach") -> Callable[[], None]:
    """One benchmark step as a closure.

    fast=True (vitlab as shipped): inference on a model prepared by `optimize_for_inference`
    (weights already in `dtype`); training a model whose weights are `dtype`, with float32
    master weights (`MasterWeightAdamW`, fused) when dtype is bf16.
    fast=False (reference / peer): float32 weights under `dtype` autocast; training uses
    `torch.optim.AdamW` with `optimizer` = 'fused' or 'foreach' (PyTorch's default).
    """
    from .accel import ops as fastmod

    if mode == "infer":
        if fast:
            def step():
                with torch.inference_mode():
                    forward(x)
        else:
            def step():
                with torch.inference_mode(), _autocast(device, dtype):
                    forward(x)
        return step

    if fast and dtype != torch.float32:
        opt = fastmod.MasterWeightAdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        xb = x.to(dtype)

        def step():
            loss = F.cross_entropy(forward(xb).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if fast:
        # float32: what `vitlab train` does (precision=auto is float32 on CPU): its optimizer
        # (`build_optimizer`: fused AdamW, no weight decay on norms and biases) and, where they
        # apply, its training streams (`ops.train_in_streams`)
        from types import SimpleNamespace

        from .train.optim import build_optimizer

        opt = build_optimizer(model, SimpleNamespace(optimizer="adamw", lr=1e-4, betas=(0.9, 0.999),
                                                     weight_decay=0.05, layer_decay=None))
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_fn(xp, yp):
            return F.cross_entropy(forward(xp).float(), yp), {}

        def step():
            n = fastmod.train_streams_for(model, x)
            if n > 1:
                fastmod.train_in_streams(loss_fn, x, y, n, params)
            else:
                loss_fn(x, y)[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if optimizer == "fused":
        opt = fastmod.fused_adamw(model.parameters(), lr=1e-4, weight_decay=0.05)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, foreach=True)

    def step():
        with _autocast(device, dtype):
            out = forward(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def in_reference_mode(step: Callable[[], None]) -> Callable[[], None]:
    """The step with vitlab's fast paths switched off (the "before" of every fast path)."""
    from .accel.ops import reference_mode

    def ref_step():
        with reference_mode():
            step()
    return ref_step


def prepare(model: nn.Module, mode: str, dtype: torch.dtype, device: torch.device, fast: bool,
            grad_checkpointing: bool = False) -> nn.Module:
    """Move and prepare a model for its benchmark step (see `make_step`)."""
    from .accel import ops as fastmod

    from .accel import accelerate, caps

    model = model.to(device)
    if fast:
        accelerate(model)
    if grad_checkpointing:
        fastmod.set_grad_checkpointing(model, True)
    if mode == "infer":
        if fast:
            return fastmod.optimize_for_inference(model, dtype)
        return model.eval()
    model.train()
    if fast:
        if dtype != torch.float32:
            model.to(dtype)
        if dtype == torch.bfloat16 and device.type == "cpu" and caps.bf16_native("cpu"):
            fastmod.use_cpu_kernels(model)  # GELU and layer norm kernels with their backward, where they build
        if fastmod._has_spatial_convs(model):
            model.to(memory_format=torch.channels_last)
            model.memory_format_channels_last = True
    return model


# ============================================================================ the benchmark
@dataclass
class BenchResult:
    model: str
    impl: str
    mode: str
    batch_size: int
    img_size: int
    dtype: str
    device: str
    step_s: float
    images_per_s: float
    flops_per_step: int
    tflops: float
    peak_tflops: float
    frac_peak: float
    peak_mem_mb: float | None
    compile_s: float | None = None
    times: list[float] = field(default_factory=list)

    def row(self) -> dict:
        d = asdict(self)
        d.pop("times")
        return d


def run_benchmark(name: str, mode: str = "infer", batch_size: int = 32, img_size: int | None = None,
                  dtype: str = "bf16", device: str = "cpu", steps: int = 5, warmup: int = 2,
                  compare: str | None = None, compile: bool = False, reference: bool = False,
                  grad_checkpointing: bool = False, peak: float | None = None, num_classes: int = 1000,
                  measure_memory: bool = True, seed: int = 0) -> list[BenchResult]:
    """Benchmark vitlab's `name` (and the peer with `compare`). Returns one BenchResult per
    implementation, vitlab first. `peak` reuses a matrix-product peak already measured."""
    from .models.registry import get_spec

    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r} is not valid; choose infer or train")
    from .accel import caps

    if dtype == "auto":
        dtype = "bf16" if caps.bf16_native(device) else "fp32"
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not valid; choose auto, bf16 or fp32")
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ConfigError("--batch-size and --steps must be >= 1 and --warmup >= 0")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    spec = get_spec(name)
    img_size = img_size or spec.default_img_size
    tdtype = DTYPES[dtype]
    torch.manual_seed(seed)
    pair = build_pair(spec.name, compare, num_classes, img_size)
    flops = count_step_flops(spec.name, mode, batch_size, img_size, num_classes)
    if peak is None:
        peak = matmul_peak(dev, tdtype)

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, pair.ours.in_chans, img_size, img_size, generator=g).to(dev)
    y = torch.randint(0, max(num_classes, 1), (batch_size,), generator=g).to(dev)

    fast = not reference
    ours = prepare(pair.ours, mode, tdtype, dev, fast, grad_checkpointing)
    x_ours = x
    if fast and mode == "train" and getattr(ours, "memory_format_channels_last", False):
        x_ours = x.contiguous(memory_format=torch.channels_last)
    step = make_step(ours, ours, mode, x_ours, y, dtype=tdtype, fast=fast, device=dev, optimizer="foreach")
    impls: dict[str, tuple[Callable, nn.Module]] = {
        "vitlab (reference)" if reference else "vitlab": (in_reference_mode(step) if reference else step, ours)}
    if pair.peer is not None:
        peer = pair.peer.to(dev)
        peer.train(mode == "train")
        x_peer = x
        if any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in peer.modules()):
            peer.to(memory_format=torch.channels_last)  # the usual advice for conv nets, given to the peer too
            x_peer = x.contiguous(memory_format=torch.channels_last)
        impls[pair.peer_name] = (make_step(pair.peer_forward, peer, mode, x_peer, y, dtype=tdtype, fast=False,
                                           device=dev, optimizer="fused"), peer)

    compile_s: dict[str, float | None] = {k: None for k in impls}
    if compile:
        from .accel.ops import compile_blocks

        for key, (step, model) in impls.items():
            if key.startswith("vitlab"):
                compile_blocks(model)
            else:
                blocks = _peer_blocks(model)
                if not blocks:
                    continue  # nothing repeated to compile: measured as it is
                for blk in blocks:
                    blk.compile()
            t = time.perf_counter()
            step()  # the first call compiles
            sync(dev)
            first = time.perf_counter() - t
            t = time.perf_counter()
            step()
            sync(dev)
            compile_s[key] = max(0.0, first - (time.perf_counter() - t))

    mem: dict[str, float | None] = {k: None for k in impls}
    if measure_memory:
        for key, (step, _) in impls.items():
            step()  # allocations of the first call (optimizer state, caches) are not the step's
            with PeakMemory(dev) as pm:
                step()
            mem[key] = None if pm.bytes is None else pm.bytes / 2 ** 20
    times = time_alternating({k: s for k, (s, _) in impls.items()}, steps, warmup, dev)
    results = []
    for key, ts in times.items():
        med = statistics.median(ts)
        results.append(BenchResult(
            model=spec.name, impl=key, mode=mode, batch_size=batch_size, img_size=img_size, dtype=dtype,
            device=describe_device(dev), step_s=med, images_per_s=batch_size / med, flops_per_step=flops,
            tflops=flops / med / 1e12, peak_tflops=peak / 1e12, frac_peak=flops / med / peak,
            peak_mem_mb=mem[key], compile_s=compile_s[key], times=ts))
    return results


def _peer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of a peer model (transformers encoders, timm blocks) for regional compile."""
    for path in ("vit.encoder.layer", "blocks"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, (nn.ModuleList, nn.Sequential)):
            return list(obj)
    stages = getattr(getattr(model, "cvt", None), "encoder", None)
    if stages is not None:
        return [layer for st in stages.stages for layer in st.layers]
    return []


def cpu_model_name() -> str:
    """The CPU's model name with the unit bf16 products run on (which sets the peak): ", AMX",
    ", AVX-512 BF16", or ", AVX2, bf16 emulated" / the widest vector set where bf16 is not native."""
    from .accel import caps

    c = caps.capabilities()
    name = c.cpu_model if c.cpu_model != "unknown" else (platform.processor() or platform.machine() or "CPU")
    if c.cpu_bf16_native:
        return name + (", AMX" if c.has("amx_bf16") else ", AVX-512 BF16" if c.has("avx512_bf16") else ", native bf16")
    return name + f", {c.aten_cpu_capability}, bf16 emulated"


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{cpu_model_name()} ({torch.get_num_threads()} threads)"


# ============================================================================ loader check
def loader_throughput(img_size: int, batch_size: int = 32, src_size: int | None = None, steps: int = 3,
                      randaugment: tuple[int, int] | None = None, device: str = "cpu") -> float:
    """Images/s of vitlab's training BatchTransform (random resized crop, flip, optional
    RandAugment, normalisation) on uint8 batches of `src_size` px, on `device`."""
    from .data import AugmentConfig, BatchTransform

    src_size = src_size or int(img_size * 1.15)
    cfg = AugmentConfig(img_size=img_size, random_resized_crop=True, hflip=True, randaugment=randaugment)
    tf = BatchTransform(cfg, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_classes=1000, train=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, src_size, src_size), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
    ts = time_alternating({"loader": lambda: tf(images, labels, generator=g)}, steps, 1, device)["loader"]
    return batch_size / statistics.median(ts)


# ============================================================================ CLI
from .bench_cli import register  # noqa: E402,F401  (the options live where torch is not imported)


def format_table(results: list[BenchResult]) -> str:
    head = "| impl | mode | dtype | batch | img/s | step (s) | TFLOP/s | % of matmul peak | peak mem (MB) | compile (s) |"
    lines = [head, "|" + "---|" * 10]
    for r in results:
        mem = "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}"
        comp = "-" if r.compile_s is None else f"{r.compile_s:.1f}"
        lines.append(f"| {r.impl} | {r.mode} | {r.dtype} | {r.batch_size} | {r.images_per_s:.1f} | {r.step_s:.3f} | "
                     f"{r.tflops:.3f} | {100 * r.frac_peak:.1f} | {mem} | {comp} |")
    return "\n".join(lines)


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_benchmark(args.model, args.mode, args.batch_size, args.img_size, args.dtype, args.device,
                            args.steps, args.warmup, args.compare, args.compile, args.reference,
                            args.grad_checkpointing, num_classes=args.num_classes)
    from .accel import caps

    r0 = results[0]
    print(f"{r0.model}: {r0.mode}, batch {r0.batch_size}, {r0.img_size} px, {r0.dtype}, on {r0.device}; "
          f"{r0.flops_per_step / 1e9:.1f} GFLOP per step; matmul peak {r0.peak_tflops:.2f} TFLOP/s "
          f"({r0.dtype}, measured now); median of {args.steps} steps")
    print(format_table(results))
    if r0.dtype == "bf16" and torch.device(args.device).type == "cpu" and not caps.bf16_native("cpu"):
        print(f"note: bf16 is emulated on this CPU ({caps.capabilities().cpu_bf16_reason}); "
              f"--dtype fp32 is the fast choice here (and the % of peak means little: emulated products vary by shape)")
    if r0.dtype == "bf16" and torch.device(args.device).type == "cpu" and not args.reference:
        from vitlab.accel import kernels as cpu_kernels
        used = cpu_kernels.get() is not None
        which = ("fused attention, layer norm, GELU, CvT's q/k/v projections" if r0.mode == "infer"
                 else "attention, GELU and layer norm, forward and backward")
        print(f"vitlab's CPU kernels ({which}): "
              + (f"in use (attention's products on {cpu_kernels.isa()})" if used
                 else f"not used ({cpu_kernels.unavailable_reason()})"))
    if r0.mode == "infer" and torch.device(args.device).type == "cpu" and not args.reference and not args.compile:
        from vitlab.accel import ops as fast

        n = fast.auto_inference_streams()
        per = r0.batch_size // max(n, 1)
        print(f"inference streams: {n} (the batch in {n} parts of {per} images, one core each)" if n > 1
              and per >= fast.MIN_IMAGES_PER_STREAM else "inference streams: off (intra-op threads)")
    if len(results) > 1:
        ratio = results[1].step_s / results[0].step_s
        paired = [b / a for a, b in zip(results[0].times, results[1].times)]
        print(f"vitlab / {results[1].impl}: {ratio:.2f}x images/s (median of per-round ratios "
              f"{statistics.median(paired):.2f}x, alternating runs in one process)")
    if args.loader:
        lps = loader_throughput(r0.img_size, r0.batch_size, device=args.device)
        verdict = "keeps up" if lps >= r0.images_per_s else "STARVES the model: use more loader workers"
        print(f"loader (BatchTransform: random resized crop + flip + normalise): {lps:.0f} img/s vs model "
              f"{r0.images_per_s:.1f} img/s -> {verdict} ({lps / r0.images_per_s:.1f}x)")
    return 0
