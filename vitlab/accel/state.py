"""Process-wide switches of the acceleration layer (no other vitlab imports: every accel module may use it)."""
from __future__ import annotations

import contextlib

import torch

_STATE = {"enabled": True, "attention": "auto"}


def fast_paths_enabled() -> bool:
    return _STATE["enabled"]


@contextlib.contextmanager
def reference_mode():
    """Run the plain reference code paths inside this block (for parity checks and "before"
    timings), even on accelerated models. Kernels chosen by `optimize_for_inference` (bf16
    weights, folded BN) stay."""
    old = _STATE["enabled"]
    _STATE["enabled"] = False
    try:
        yield
    finally:
        _STATE["enabled"] = old


def plain_context() -> bool:
    """True when nothing intercepts the operators: no FLOP counter / fake or meta tensor mode,
    no torch.compile / torch.export tracing, no TorchScript tracing. Fast paths call ops the
    counters and tracers may not know, and choose kernels from values a trace would freeze."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is None


def active() -> bool:
    """Fast paths on and nothing intercepting operators."""
    return _STATE["enabled"] and plain_context()
