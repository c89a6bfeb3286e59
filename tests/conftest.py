"""Shared fixtures. Real data lives in ../shared/data (or $VITLAB_SHARED_DATA); tests that
need it skip with the reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tests run on tiny tensors in two pytest-xdist workers on a 2-core machine: one intra-op
# thread per worker avoids oversubscription, which made tiny forward passes 50x slower.
torch.set_num_threads(1)


def shared_data_dir() -> Path | None:
    env = os.environ.get("VITLAB_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data not found: set VITLAB_SHARED_DATA or put shared/data beside the repo")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def bf16_values() -> torch.Tensor:
    """Every finite bf16 value with |x| < 1e4 (an element-wise kernel's whole input domain at bf16 resolution)."""
    allv = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return allv[torch.isfinite(allv.float()) & (allv.float().abs() < 1e4)].clone()


@pytest.fixture(scope="session")
def bf16_ulps():
    """ulps(got, exact): |got - exact| in units of bf16's spacing at |exact| (8 significant bits)."""
    return lambda got, exact: (got.double() - exact).abs() / 2.0 ** (torch.floor(torch.log2(exact.abs())) - 7)


def _bf16_reason() -> str:
    from vitlab.accel import caps

    return caps.capabilities().cpu_bf16_reason


@pytest.fixture
def native_bf16():
    """Skips (with the reason) where bf16 is not native on this CPU: there the bf16-only fast paths are
    off by design, and tests/test_accel.py checks that the plain paths run instead."""
    from vitlab.accel import caps

    if not caps.bf16_native("cpu"):
        pytest.skip(f"this fast path needs native bf16, and here {_bf16_reason()}")


@pytest.fixture(scope="session", params=["amx", "avx512_bf16"])
def mod(request):
    """vitlab's compiled CPU kernels (vitlab.accel.kernels), once with attention's products on
    AMX tiles and once as AVX-512 BF16 dot products; a test skips, with the reason, where the
    kernels cannot be built or the CPU has no AMX."""
    from vitlab.accel import kernels as cpu_kernels

    m = cpu_kernels.get()
    if m is None:
        pytest.skip(f"vitlab's CPU kernels are not available here: {cpu_kernels.unavailable_reason()}")
    default = cpu_kernels.isa() == "AMX"
    if cpu_kernels.use_amx(request.param == "amx") != (request.param == "amx"):
        cpu_kernels.use_amx(default)
        pytest.skip("this CPU (or OS) offers no AMX tiles: the AVX-512 BF16 run covers the kernels here")
    yield m
    cpu_kernels.use_amx(default)


def _grad_fn_names(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(nxt for nxt, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


@pytest.fixture(scope="session")
def grad_fn_names():
    """grad_fn_names(t): the type names of every autograd node behind tensor t (which backward kernels it will run)."""
    return _grad_fn_names
