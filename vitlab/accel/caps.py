"""What the hardware can do: the one place in vitlab that looks at CPU flags, oneDNN, CUDA and MPS.

`capabilities()` probes once per process and caches a `Capabilities` record. Everything that picks a
fast path or a default precision asks it; model code never does. Where a flag can lie, a tiny real
operation decides:

- *native bf16 on CPU*: the CPU flags (AVX-512 BF16, AMX BF16 or AVX-NE-CONVERT) *and* oneDNN's own
  answer (`torch.ops.mkldnn._is_mkldnn_bf16_supported`, which honours `ONEDNN_MAX_CPU_ISA`) *and* a
  4x32x32 bf16 inner product through oneDNN that must run and match float32. Without it bf16 is
  emulated: ~35x slower than float32 in a matrix product on an AVX2-only AMD CPU, and oneDNN's fused
  bf16 primitives refuse to run ("could not create a primitive descriptor").
- *ATen's vector level* (`torch.backends.cpu.get_cpu_capability()`, honours `ATEN_CPU_CAPABILITY`).

So `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 VITLAB_CPU_KERNELS=0` makes an AVX-512 machine
take the paths an AVX2-only machine takes (`.ci/run` runs the fast-path tests that way).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
from pathlib import Path

import torch

# cpuinfo flag names (Linux /proc/cpuinfo) of the instruction sets the fast paths care about
X86_FLAGS = {
    "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw",
    "avx512vl": "avx512vl", "avx512dq": "avx512dq", "avx512_bf16": "avx512_bf16", "avx512_vnni": "avx512_vnni",
    "amx_tile": "amx_tile", "amx_bf16": "amx_bf16", "avx_ne_convert": "avx_ne_convert",
}
ARM_FLAGS = {"neon": ("asimd", "neon"), "sve": ("sve",), "bf16": ("bf16",)}
# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) below which bf16 is not native on x86
_ONEDNN_NO_BF16_CAPS = {"sse41", "avx", "avx2", "avx2_vnni", "avx512_core", "avx512_core_vnni"}


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """One device's capabilities (CPU always; CUDA / MPS when present)."""

    arch: str                      # x86_64, aarch64, arm64, ...
    os: str                        # Linux, Darwin, Windows
    cpu_model: str
    cpu_flags: tuple[str, ...]     # the instruction sets of X86_FLAGS / ARM_FLAGS this CPU reports
    aten_cpu_capability: str       # ATen's vector kernels: DEFAULT, AVX2, AVX512, ZVECTOR, SVE256...
    onednn: bool                   # oneDNN (mkldnn) built in and enabled
    onednn_max_isa: str | None     # ONEDNN_MAX_CPU_ISA when set
    cpu_bf16_native: bool          # bf16 matrix products run in hardware (probed)
    cpu_bf16_reason: str           # why (not)
    num_threads: int
    cuda: bool
    cuda_devices: tuple[str, ...] = ()
    cuda_capability: tuple[int, int] | None = None
    sdpa_flash: bool = False       # flash attention available to scaled_dot_product_attention
    sdpa_mem_efficient: bool = False
    mps: bool = False

    def has(self, flag: str) -> bool:
        return flag in self.cpu_flags

    @property
    def cuda_bf16_native(self) -> bool:
        """bf16 tensor cores: compute capability 8.0 (Ampere) and later."""
        return self.cuda and self.cuda_capability is not None and self.cuda_capability >= (8, 0)

    def bf16_native(self, device: str | torch.device = "cpu") -> bool:
        kind = torch.device(device).type
        if kind == "cuda":
            return self.cuda_bf16_native
        if kind == "mps":
            return False  # MPS bf16 needs macOS 14 and is slower than fp16; vitlab keeps float32 there
        return self.cpu_bf16_native

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cuda_bf16_native"] = self.cuda_bf16_native
        return d


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", set()
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and model == "unknown":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def _cpu_flags(arch: str, raw: set[str]) -> tuple[str, ...]:
    if arch in ("x86_64", "AMD64"):
        return tuple(name for name, flag in X86_FLAGS.items() if flag in raw)
    if arch in ("aarch64", "arm64"):
        # Apple silicon has no /proc/cpuinfo; every arm64 Mac has NEON
        found = [name for name, alts in ARM_FLAGS.items() if any(a in raw for a in alts)]
        if platform.system() == "Darwin" and "neon" not in found:
            found.append("neon")
        return tuple(found)
    return ()


def _probe_onednn_bf16() -> tuple[bool, str]:
    """Run a tiny bf16 inner product through oneDNN; True only if it runs and matches float32."""
    if not torch.backends.mkldnn.is_available():
        return False, "PyTorch was built without oneDNN"
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False, "oneDNN reports no native bf16 on this CPU (or ONEDNN_MAX_CPU_ISA caps it)"
    except (AttributeError, RuntimeError):
        pass
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g)
    w = torch.randn(32, 32, generator=g)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), w.bfloat16(), None, "none", [], "")
    except (RuntimeError, AttributeError) as e:
        return False, f"oneDNN's bf16 inner product does not run here ({str(e).splitlines()[0][:80]})"
    ref = x.bfloat16().float() @ w.bfloat16().float().t()
    if not torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-1):
        return False, "oneDNN's bf16 inner product gave wrong values"
    return True, "probed: oneDNN runs bf16 natively"


def _cpu_bf16(arch: str, raw: set[str], onednn_max_isa: str | None) -> tuple[bool, str]:
    if arch in ("x86_64", "AMD64"):
        if not ({"avx512_bf16"} <= raw or {"amx_bf16"} <= raw or "avx_ne_convert" in raw):
            return False, "this CPU has no AVX-512 BF16, AMX or AVX-NE-CONVERT: bf16 is emulated (~35x slower than fp32)"
        if onednn_max_isa and onednn_max_isa.strip().lower() in _ONEDNN_NO_BF16_CAPS:
            return False, f"ONEDNN_MAX_CPU_ISA={onednn_max_isa} caps oneDNN below its bf16 instructions"
        return _probe_onednn_bf16()
    if arch in ("aarch64", "arm64"):
        # ARMv8.6 BF16 (Graviton 3, Apple M2+) runs bf16 dot products; PyTorch's CPU kernels use them
        # only through oneDNN/ACL builds, so vitlab treats ARM bf16 as native only when oneDNN agrees
        if "bf16" not in raw:
            return False, "this ARM CPU has no BF16 extension"
        return _probe_onednn_bf16()
    return False, f"no native bf16 known for {arch}"


def onednn_f32_linear_reason(c: "Capabilities | None" = None) -> str | None:
    """None where vitlab computes float32 linear layers with oneDNN (`ops.linear`), else why not.
    Measured only on an AVX-512 CPU (Zen 4, one thread: forward with bias 1.05-1.3x, input
    gradient 1.1-1.35x MKL's products at ViT-S/16 and CvT-13 shapes), so used only where oneDNN
    runs its AVX-512 kernels."""
    c = c or capabilities()
    if not c.onednn:
        return "PyTorch here has no oneDNN"
    if c.arch not in ("x86_64", "AMD64") or not c.has("avx512f"):
        return "measured only on AVX-512 CPUs (this one has none)"
    if c.onednn_max_isa and c.onednn_max_isa.strip().lower() in {"sse41", "avx", "avx2", "avx2_vnni"}:
        return f"ONEDNN_MAX_CPU_ISA={c.onednn_max_isa} caps oneDNN below AVX-512"
    return None


@functools.lru_cache(maxsize=1)
def capabilities() -> Capabilities:
    """Probe once (a few milliseconds) and cache. `refresh()` probes again."""
    arch, system = platform.machine(), platform.system()
    model, raw = _cpuinfo()
    max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    bf16, why = _cpu_bf16(arch, raw, max_isa)
    try:
        aten = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        aten = "unknown"
    cuda = torch.cuda.is_available()
    devices, cc, flash, mem = (), None, False, False
    if cuda:
        devices = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        cc = tuple(torch.cuda.get_device_capability(0))
        flash = bool(torch.backends.cuda.is_flash_attention_available()) and cc >= (8, 0)
        mem = bool(getattr(torch.backends.cuda, "mem_efficient_sdp_enabled", lambda: False)())
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return Capabilities(arch=arch, os=system, cpu_model=model, cpu_flags=_cpu_flags(arch, raw),
                        aten_cpu_capability=str(aten), onednn=torch.backends.mkldnn.is_available(),
                        onednn_max_isa=max_isa, cpu_bf16_native=bf16, cpu_bf16_reason=why,
                        num_threads=torch.get_num_threads(), cuda=cuda, cuda_devices=devices, cuda_capability=cc,
                        sdpa_flash=flash, sdpa_mem_efficient=mem, mps=mps)


def refresh() -> Capabilities:
    capabilities.cache_clear()
    return capabilities()


def bf16_native(device: str | torch.device = "cpu") -> bool:
    return capabilities().bf16_native(device)


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The inference/training dtype 'auto' means on `device`: bf16 where it is native, float32 elsewhere."""
    return torch.bfloat16 if bf16_native(device) else torch.float32


_WARNED: set[str] = set()


def warn_emulated_bf16(what: str, device: str | torch.device = "cpu") -> bool:
    """One warning per process (per `what`) when bf16 is asked for where it is emulated. Returns
    True when bf16 is emulated on `device` (the caller then runs plain PyTorch)."""
    if bf16_native(device):
        return False
    kind = torch.device(device).type
    if what not in _WARNED:
        import warnings

        why = capabilities().cpu_bf16_reason if kind == "cpu" else f"{kind} has no native bf16 here"
        warnings.warn(f"{what}: bf16 requested, but {why}. It runs through plain PyTorch, emulated: expect it "
                      f"to be many times slower than float32 (use fp32 / precision=fp32 instead)",
                      RuntimeWarning, stacklevel=3)
        _WARNED.add(what)
    return True
