"""The acceleration layer (vitlab.accel): one place knows the hardware, the models stay plain, the
accelerated models compute the plain function, and standard PyTorch tools work on both."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import vitlab
from vitlab import accel
from vitlab.accel import caps

ROOT = Path(__file__).resolve().parents[1]

# (name, overrides, image size): one small model of every family, ViT with its options
FAMILIES = [
    ("vit_nano_p2", {}, 8),
    ("vit_nano_p2", {"global_pool": "avg", "pos_embed": "sincos_2d"}, 8),
    ("vit_nano_p2", {"pos_embed": "relative"}, 8),
    ("vit_nano_p2", {"pos_embed": "learned_2d", "head": "mlp_tanh"}, 8),
    ("rsmall_vit_micro", {}, 28),
    ("cvt_tiny", {}, 32),
    ("convmixer_256_8", {}, 16),
    ("resnet_small", {}, 32),
    # ConvMixer's ablation switches: the fast layer must fall back to the plain function
    ("convmixer_256_8", {"residual": False, "norm": "layer"}, 16),
    ("convmixer_256_8", {"norm": "group", "drop_path_rate": 0.3}, 16),
    ("convmixer_256_8", {"norm": "none"}, 16),
    ("convmixer_256_8", {"drop_path_rate": 0.3}, 16),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for n, o, _ in FAMILIES]


def _model(name, overrides, size, seed=0):
    torch.manual_seed(seed)
    return vitlab.create_model(name, num_classes=5, img_size=size, **overrides)


def _images(model, size, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, getattr(model, "in_chans", 3), size, size, generator=g)


# ----------------------------------------------------------------------------- capabilities
def test_capabilities_are_probed_once_and_consistent():
    c = caps.capabilities()
    assert caps.capabilities() is c  # cached
    assert c.arch and c.os and c.aten_cpu_capability
    if c.cpu_bf16_native and c.arch == "x86_64":
        # native bf16 is claimed only with the instructions for it
        assert c.has("avx512_bf16") or c.has("amx_bf16") or c.has("avx_ne_convert")
    assert caps.auto_dtype("cpu") == (torch.bfloat16 if c.cpu_bf16_native else torch.float32)
    assert c.cpu_bf16_reason  # always says why
    d = c.as_dict()
    assert json.loads(json.dumps(d))["arch"] == c.arch


AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}

_AVX2_SCRIPT = r"""
import json, warnings, torch, vitlab
from vitlab import accel
from vitlab.accel import caps, kernels
c = caps.capabilities()
m = vitlab.create_model("vit_nano_p2", num_classes=4, in_chans=1)
auto = accel.optimize_for_inference(vitlab.create_model("vit_nano_p2", num_classes=4, in_chans=1))
x = torch.randn(8, 1, 8, 8)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    b = accel.optimize_for_inference(m, "bf16")
    with torch.no_grad():
        out = b(x)
        out2 = b(x)
mix = accel.optimize_for_inference(vitlab.create_model("convmixer_256_8", num_classes=4, in_chans=1), "bf16")
with torch.no_grad():
    mixout = mix(torch.randn(4, 1, 16, 16))
print(json.dumps(dict(native=c.cpu_bf16_native, reason=c.cpu_bf16_reason, kernels=kernels.static_reason(),
                      f32_linear=caps.onednn_f32_linear_reason(c),
                      auto=str(auto.inference_dtype), finite=bool(out.float().isfinite().all()),
                      mix=bool(mixout.float().isfinite().all()),
                      warnings=[str(x.message) for x in w if issubclass(x.category, RuntimeWarning)])))
"""


def test_avx2_capped_machine_takes_the_plain_paths():
    """Under the AVX2 cap (what an AVX2-only CPU reports), bf16 is not native, vitlab's kernels are off,
    'auto' picks float32, and an explicit bf16 request runs through plain PyTorch with one warning."""
    env = {**os.environ, **AVX2_ENV}
    out = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["native"] is False and "ONEDNN_MAX_CPU_ISA" in r["reason"]
    assert r["kernels"] is not None
    assert r["auto"] == "torch.float32"
    assert r["f32_linear"] is not None  # oneDNN's float32 linear (measured on AVX-512 only) is off
    assert r["finite"] and r["mix"]
    bf16_warnings = [w for w in r["warnings"] if "bf16 requested" in w]
    assert len(bf16_warnings) == 1 and "fp32" in bf16_warnings[0]


def test_emulated_bf16_request_warns_once(monkeypatch):
    fake = dataclasses.replace(caps.capabilities(), cpu_bf16_native=False, cpu_bf16_reason="test: no bf16 unit")
    monkeypatch.setattr(caps, "capabilities", lambda: fake)
    monkeypatch.setattr(caps, "_WARNED", set())
    assert caps.auto_dtype("cpu") == torch.float32
    with pytest.warns(RuntimeWarning, match="test: no bf16 unit"):
        assert caps.warn_emulated_bf16("thing") is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert caps.warn_emulated_bf16("thing") is True  # once per process


def test_precision_auto_follows_the_hardware(monkeypatch):
    from vitlab.train.config import TrainConfig

    base = caps.capabilities()
    assert TrainConfig().amp_dtype("cpu") is None  # CPU training: float32 by default
    for cc, want in (((7, 0), None), ((8, 0), torch.bfloat16)):
        fake = dataclasses.replace(base, cuda=True, cuda_capability=cc)
        monkeypatch.setattr(caps, "capabilities", lambda fake=fake: fake)
        assert TrainConfig().amp_dtype("cuda") == want


# ----------------------------------------------------------------------------- the models stay plain
def test_model_files_hold_no_reference_to_kernels_or_cpu_flags():
    # no import of the acceleration layer, no kernel, no CPU flag, no dispatch on them
    pattern = re.compile(r"import.*accel|from \.\.accel|cpu_kernel|mkldnn|onednn|avx|amx|fast\.|plain_context|"
                         r"streams_for|bf16_native|capabilities\(", re.I)
    for path in sorted((ROOT / "vitlab" / "models").glob("*.py")):
        hits = [f"{path.name}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
                if pattern.search(line)]
        assert not hits, hits


def test_created_models_are_plain_and_accelerate_swaps_in_place():
    m = _model("cvt_tiny", {}, 32)
    assert not accel.is_accelerated(m)
    keys = list(m.state_dict())
    same = accel.accelerate(m)
    assert same is m and accel.is_accelerated(m)
    assert list(m.state_dict()) == keys
    accel.accelerate(m, enable=False)
    assert not accel.is_accelerated(m)


# every parity test runs on each device present (CUDA where there is one: benchmarks/gpu_check.sh runs them)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,overrides,size", FAMILIES, ids=IDS)
def test_accelerated_models_compute_the_plain_function(name, overrides, size, device):
    """Same logits and same gradients (float32, training and evaluation mode) with and without the
    fast paths; the accelerated model is the same model with its modules swapped."""
    plain = _model(name, overrides, size).to(device)
    fast = accel.accelerate(copy.deepcopy(plain))
    x = _images(plain, size).to(device)
    y = torch.tensor([0, 1, 2], device=device)
    for train in (True, False):
        plain.train(train)
        fast.train(train)
        torch.manual_seed(3)
        lp = plain(x)
        torch.manual_seed(3)
        lf = fast(x)
        torch.testing.assert_close(lf, lp, atol=2e-5, rtol=1e-4)
    plain.train()
    fast.train()
    for m in (plain, fast):
        torch.manual_seed(3)
        nn.functional.cross_entropy(m(x), y).backward()
    fp = dict(fast.named_parameters())
    for n, p in plain.named_parameters():
        if p.grad is None:
            assert fp[n].grad is None, n
            continue
        torch.testing.assert_close(fp[n].grad, p.grad, atol=2e-5, rtol=1e-3, msg=n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["vit_nano_p2", "cvt_tiny", "convmixer_256_8"])
def test_optimized_inference_follows_float32_on_every_device(name, device):
    """`optimize_for_inference` with the device's own default dtype (bf16 where native) gives the
    float32 model's predictions."""
    size = {"vit_nano_p2": 8, "cvt_tiny": 32, "convmixer_256_8": 16}[name]
    ref = _model(name, {}, size).to(device).eval()
    x = _images(ref, size, n=8).to(device)
    with torch.no_grad():
        want = ref(x).float()
        model = accel.optimize_for_inference(copy.deepcopy(ref))
        assert model.inference_dtype == caps.auto_dtype(device)
        got = model(x).float()
    tol = 0.05 if model.inference_dtype == torch.bfloat16 else 1e-4
    assert (got - want).abs().max() <= tol * want.abs().max() + 1e-5


# ----------------------------------------------------------------------------- standard tools
@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "accelerated"])
@pytest.mark.parametrize("name,overrides,size", [FAMILIES[0], FAMILIES[5], FAMILIES[6]], ids=["vit", "cvt", "convmixer"])
def test_torch_export_and_jit_trace(name, overrides, size, accelerated):
    model = _model(name, overrides, size).eval()
    if accelerated:
        accel.accelerate(model)
    x = _images(model, size)
    with torch.no_grad():
        want = model(x)
        ep = torch.export.export(model, (x,))
        torch.testing.assert_close(ep.module()(x), want, atol=1e-5, rtol=1e-4)
        traced = torch.jit.trace(model, x, check_trace=True)  # check_trace re-runs and compares the graphs
        torch.testing.assert_close(traced(x), want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(traced(x.flip(0)), model(x.flip(0)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "accelerated"])
def test_dynamic_int8_quantisation(accelerated):
    model = _model("vit_nano_p2", {}, 8).eval()
    if accelerated:
        accel.accelerate(model)
    x = _images(model, 8, n=16)
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    assert any("Quantized" in type(m).__name__ or "quantized" in type(m).__module__ for m in q.modules())
    with torch.no_grad():
        want, got = model(x), q(x)
    assert (got - want).abs().max() < 0.1 * want.abs().max() + 1e-3


@pytest.mark.parametrize("prepare", ["plain", "accelerated", "optimized"])
def test_forward_hooks_see_every_call(prepare):
    model = _model("vit_nano_p2", {}, 8).eval()
    if prepare == "accelerated":
        accel.accelerate(model)
    elif prepare == "optimized":
        accel.optimize_for_inference(model, "fp32")
    seen = []
    h = model.blocks[1].register_forward_hook(lambda mod, args, out: seen.append(out[0].shape))
    x = _images(model, 8, n=16)
    with torch.no_grad():
        model(x)
    h.remove()
    assert seen == [torch.Size([16, 17, 64])]  # once, on the whole batch (streams step aside for hooks)


def test_flop_counter_counts_the_same_for_plain_and_accelerated():
    from torch.utils.flop_counter import FlopCounterMode

    plain = _model("cvt_tiny", {}, 32).eval()
    fast = accel.accelerate(copy.deepcopy(plain))
    x = _images(plain, 32)
    counts = []
    for m in (plain, fast):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(x)
        counts.append(fc.get_total_flops())
    assert counts[0] > 1e6 and counts[0] == counts[1]


# ----------------------------------------------------------------------------- env and bench
def test_vitlab_env_reports_capabilities_and_every_fast_path(capsys):
    from vitlab.accel.paths import PATHS
    from vitlab.cli import main

    assert main(["env", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["torch"] == torch.__version__
    assert r["capabilities"]["cpu_bf16_native"] == caps.capabilities().cpu_bf16_native
    assert [p["name"] for p in r["fast_paths"]] == [p.name for p in PATHS]
    assert all(p["on"] or p["why_not"] for p in r["fast_paths"])  # off always says why
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "native bf16:" in text and "fast paths:" in text


def test_every_fast_path_names_a_parity_test_that_exists():
    from vitlab.accel.paths import PATHS

    for p in PATHS:
        for ref in re.split(r",\s*", p.test):
            if ref.startswith("benchmarks/"):  # a GPU-only check, run by benchmarks/gpu_check.sh
                assert (ROOT / ref).exists(), ref
                continue
            file, _, func = ref.split(" ")[0].partition("::")
            text = (ROOT / "tests" / file).read_text()
            assert not func or re.search(rf"def {re.escape(func)}\b", text), ref


def test_matmul_peak_is_bounded_in_time():
    from vitlab.bench import matmul_peak_by_shape

    # with a tiny budget every shape is shrunk (its largest side first); the measured rates are still positive
    got = matmul_peak_by_shape("cpu", torch.float32, shapes=((4096, 512, 512),), reps=1, seconds=1e-3)
    (m, k, n), rate = next(iter(got.items()))
    assert m < 4096 and max(m, k, n) < 4096 and rate > 0
    got = matmul_peak_by_shape("cpu", torch.float32, shapes=((256, 256, 256),), reps=1, seconds=60)
    assert list(got) == [(256, 256, 256)]  # a shape that fits its budget is measured as it is
