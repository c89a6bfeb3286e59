"""Every fast path computes the same function as the float32 reference code.

bf16 paths are compared with the float32 reference by relative error (||a - b|| / ||b||)
within what bf16 rounding allows (about 2**-8 per operation, a few 1e-3 through a small
network; 2e-2 is the bound the speed work promised). float32 paths that only reorganise the
computation (BN folding, checkpointing, fused AdamW, fused adds) must match much tighter.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from vitlab.errors import ConfigError
from vitlab.accel import ops as fast
from vitlab.accel import accelerate
from vitlab.models import create_model as _create_plain


def create_model(*args, **kwargs):
    """The registry's model with vitlab.accel's modules swapped in: these tests check the fast paths."""
    return accelerate(_create_plain(*args, **kwargs))

BF16_TOL = 2e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are 0/1: folding
    them would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("act", [None, "gelu", "relu"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_linear_matches_float32(act, with_residual):
    torch.manual_seed(0)
    layer = nn.Linear(48, 96)
    x = torch.randn(3, 17, 48)
    res = torch.randn(3, 17, 96) if with_residual else None
    ref = F.linear(x, layer.weight, layer.bias)
    ref = {None: ref, "gelu": F.gelu(ref), "relu": F.relu(ref)}[act]
    if with_residual:
        ref = ref + res
    lb = copy.deepcopy(layer).to(torch.bfloat16)
    with torch.inference_mode():
        out = fast.linear(x.bfloat16(), lb, act=act, residual=None if res is None else res.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert rel(out, ref) < 1e-2
    # float32: oneDNN's product on AVX-512 CPUs (`caps.onednn_f32_linear_reason`), else F.linear
    out = fast.linear(x, layer, act=act, residual=res)
    assert out.dtype == torch.float32 and rel(out, ref) < 1e-6


@pytest.mark.parametrize("with_residual", [False, True])
def test_float32_linear_and_its_gradients_match_the_plain_layer(with_residual, monkeypatch):
    """float32 training through `ops.linear`: oneDNN's forward (bias, residual fused) and input
    gradient where the CPU qualifies, F.linear elsewhere; the same outputs and gradients either way."""
    torch.manual_seed(4)
    layer = nn.Linear(40, 72)
    x = torch.randn(3, 11, 40, requires_grad=True)
    res = torch.randn(3, 11, 72, requires_grad=True) if with_residual else None
    g = torch.randn(3, 11, 72)
    out = F.linear(x, layer.weight, layer.bias) + (res if with_residual else 0)
    out.backward(g)
    ref = [out.detach(), x.grad, layer.weight.grad, layer.bias.grad] + ([res.grad] if with_residual else [])
    for here in (True, False):
        if not here:  # the plain path, as on CPUs without AVX-512
            monkeypatch.setattr(fast, "_onednn_f32_here", lambda: False)
        for t in [x, layer.weight, layer.bias] + ([res] if with_residual else []):
            t.grad = None
        got_out = fast.linear(x, layer, residual=res)
        got_out.backward(g)
        got = [got_out.detach(), x.grad, layer.weight.grad, layer.bias.grad] + ([res.grad] if with_residual else [])
        for a, b in zip(got, ref):
            assert a is not None and a.shape == b.shape and a.dtype == torch.float32
            assert rel(a, b) < 1e-5
    with torch.autocast("cpu", torch.bfloat16):  # autocast: its bf16 product, never oneDNN's float32 one
        assert not fast._onednn_f32_ok(x, layer.weight)


def test_float32_onednn_linear_is_used_only_on_avx512_cpus():
    from vitlab.accel import caps

    c = caps.capabilities()
    why = caps.onednn_f32_linear_reason(c)
    capped = (c.onednn_max_isa or "").strip().lower() in {"sse41", "avx", "avx2", "avx2_vnni"}
    assert (why is None) == (c.onednn and c.has("avx512f") and not capped)


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_linear_gradients_match_float32(with_residual):
    """With autograd the fused forward runs inside a custom Function: its gradients (input,
    weight, bias, residual) must be the reference ones."""
    torch.manual_seed(15)
    layer = nn.Linear(32, 24)
    x = torch.randn(2, 5, 32, requires_grad=True)
    res = torch.randn(2, 5, 24, requires_grad=True) if with_residual else None
    g = torch.randn(2, 5, 24)
    out = F.linear(x, layer.weight, layer.bias) + (res if with_residual else 0)
    out.backward(g)
    ref = [x.grad, layer.weight.grad, layer.bias.grad] + ([res.grad] if with_residual else [])
    lb = copy.deepcopy(layer).to(torch.bfloat16)
    lb.zero_grad()
    xb = x.detach().bfloat16().requires_grad_(True)
    rb = res.detach().bfloat16().requires_grad_(True) if with_residual else None
    fast.linear(xb, lb, residual=rb).backward(g.bfloat16())
    got = [xb.grad, lb.weight.grad, lb.bias.grad] + ([rb.grad] if with_residual else [])
    for a, b in zip(got, ref):
        assert a is not None and a.shape == b.shape
        assert rel(a, b) < 1e-2


@pytest.mark.parametrize("kernel", ["auto", "sdpa", "matmul"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_kernels_match_reference(kernel, with_bias):
    torch.manual_seed(1)
    B, H, N, d = 2, 3, 21, 16
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    bias = torch.randn(H, N, N) if with_bias else None
    # independent reference: per-head softmax(QK^T/sqrt(d) + b) V written out
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) / d ** 0.5 + (bias if with_bias else 0)
    ref = torch.einsum("bhnm,bhmd->bhnd", logits.softmax(-1), v)
    fast.set_attention_kernel(kernel)
    try:
        with torch.inference_mode():
            out32, _ = fast.attention(q, k, v, bias=bias)
            out16, _ = fast.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias=bias)
    finally:
        fast.set_attention_kernel("auto")
    assert rel(out32, ref) < 1e-5
    assert rel(out16, ref) < BF16_TOL


def test_attention_returns_probabilities_when_asked():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    out, attn = fast.attention(q, k, v, need_weights=True)
    assert attn.shape == (2, 2, 9, 9)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 2, 9), atol=1e-5)
    assert torch.allclose(out, attn @ v, atol=1e-6)
    assert fast.attention(q, k, v)[1] is None


def test_unknown_attention_kernel_is_a_config_error():
    with pytest.raises(vitlab.ConfigError, match="sdpa"):
        fast.set_attention_kernel("flash3")


# ----------------------------------------------------------------------------- models
def _vit():
    torch.manual_seed(0)
    m = vitlab.create_model("vit_nano_p2", num_classes=10, img_size=8).eval()
    with torch.no_grad():  # a non-zero head so logits are not all bias
        m.head.weight.normal_(0, 0.2)
    return m


def test_vit_inference_fast_path_matches_float32_and_keeps_attention():
    model = _vit()
    x = torch.randn(4, 3, 8, 8)
    with torch.inference_mode():
        ref = model.forward_intermediates(x)
    fastm = fast.optimize_for_inference(copy.deepcopy(model), "bf16")
    assert all(p.dtype == torch.bfloat16 for p in fastm.parameters())
    with torch.inference_mode():
        logits = fastm(x)  # float32 images are cast by the model's pre-hook
        inter = fastm.forward_intermediates(x)
    assert logits.dtype == torch.bfloat16
    assert rel(logits, ref["logits"]) < BF16_TOL
    assert rel(inter["logits"], ref["logits"]) < BF16_TOL
    # analysis still gets per-layer attention probabilities from the fast model
    assert len(inter["attentions"]) == len(ref["attentions"]) == len(model.blocks)
    for a, b in zip(inter["attentions"], ref["attentions"]):
        assert a.shape == b.shape
        assert torch.allclose(a.float().sum(-1), torch.ones(a.shape[:-1]), atol=2e-2)
        assert (a.float() - b).abs().max() < 2e-2


def test_reference_mode_is_the_plain_computation():
    model = _vit()
    x = torch.randn(2, 3, 8, 8)
    fastm = fast.optimize_for_inference(copy.deepcopy(model), "bf16")
    with torch.inference_mode():
        a = fastm(x)
        with fast.reference_mode():
            b = fastm(x)
    assert rel(a, b) < BF16_TOL and rel(b, model(x)) < BF16_TOL


def test_fast_paths_do_not_hide_flops():
    """FLOPs counted on a bf16 CPU model (where fast paths would run) equal the meta count."""
    from vitlab.flops import count_flops

    fastm = fast.optimize_for_inference(_vit(), "bf16")
    with torch.device("meta"):
        meta = vitlab.create_model("vit_nano_p2", num_classes=10, img_size=8)
    assert count_flops(fastm, img_size=8) == count_flops(meta, img_size=8) > 0


def test_fold_batchnorm_is_exact_in_float32():
    torch.manual_seed(3)
    model = vitlab.create_model("cvt_tiny", num_classes=10, img_size=32).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        folded = copy.deepcopy(model)
        n = fast.fold_batchnorm(folded)
        out = folded(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n == n_bn > 0  # every q/k/v projection's BN follows its conv
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert rel(out, ref) < 1e-5


def test_cvt_inference_fast_path_matches_float32():
    torch.manual_seed(4)
    model = vitlab.create_model("cvt_tiny", num_classes=10, img_size=32).eval()
    _randomise_bn(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        ref_attn = model.forward_intermediates(x)["attentions"]
    fastm = fast.optimize_for_inference(copy.deepcopy(model), torch.bfloat16)
    assert fastm.inference_channels_last
    with torch.inference_mode():
        out = fastm(x)
        attn = fastm.forward_intermediates(x)["attentions"]
    assert rel(out, ref) < BF16_TOL
    assert [a.shape for a in attn] == [a.shape for a in ref_attn]


def test_convmixer_channels_last_bf16_matches_float32():
    torch.manual_seed(5)
    model = vitlab.create_model("convmixer_256_8", num_classes=10, img_size=32).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    fastm = fast.optimize_for_inference(copy.deepcopy(model))
    assert fastm.patch_embed.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = fastm(x)
    assert rel(out, ref) < BF16_TOL


def test_paper_convmixer_reference_computes_vitlabs_function():
    """The benchmark's plain-PyTorch ConvMixer (written from the paper) with vitlab's weights
    gives vitlab's outputs: the speed comparison compares the same function."""
    from vitlab.bench import copy_weights_in_order, paper_convmixer

    torch.manual_seed(6)
    model = vitlab.create_model("convmixer_256_8", num_classes=10, img_size=32).eval()
    _randomise_bn(model)
    peer = paper_convmixer(256, 8, kernel_size=5, patch_size=2, num_classes=10, act="gelu").eval()
    copy_weights_in_order(model, peer)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(peer(x), model(x)) < 1e-5


def test_benchmark_pair_with_transformers_has_the_same_function():
    pytest.importorskip("transformers")
    from vitlab.bench import build_pair

    torch.manual_seed(7)
    pair = build_pair("vit_nano_p2", "transformers", num_classes=10, img_size=8)
    pair.ours.eval(), pair.peer.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel(pair.ours(x), pair.peer_forward(x)) < 1e-4
    # (transformers cannot build a CvT with a stage i of depth <= i, like cvt_tiny: use CvT-13 at 64 px)
    pair = build_pair("cvt_13", "transformers", num_classes=10, img_size=64)
    pair.ours.eval(), pair.peer.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel(pair.ours(x), pair.peer_forward(x)) < 1e-4


# ----------------------------------------------------------------------------- training
def _train_steps(model, opt, x, y, steps, autocast_dtype=None):
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_master_weight_bf16_training_follows_float32_training():
    torch.manual_seed(8)
    ref = vitlab.create_model("vit_nano_p2", num_classes=10, img_size=8)
    init = [p.detach().clone() for p in ref.parameters()]
    bf = copy.deepcopy(ref).to(torch.bfloat16)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    ref_losses = _train_steps(ref, torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.05), x, y, 5)
    opt = fast.MasterWeightAdamW(bf.parameters(), lr=3e-3, weight_decay=0.05)
    bf_losses = _train_steps(bf, opt, x.bfloat16(), y, 5)
    assert ref_losses[-1] < 0.8 * ref_losses[0]
    for a, b in zip(bf_losses, ref_losses):
        assert abs(a - b) / abs(b) < 1e-2
    # the float32 masters carry the update; the bf16 weights are their rounding
    for m, p in zip(opt.master_params, bf.parameters()):
        assert m.dtype == torch.float32 and p.dtype == torch.bfloat16
        assert torch.equal(p, m.to(torch.bfloat16))
    # the whole update points where float32 training's does (single small-gradient entries
    # may differ: Adam normalises each by its own gradient scale, as under autocast)
    d_ref = torch.cat([(p.detach() - i).flatten() for p, i in zip(ref.parameters(), init)])
    d_bf = torch.cat([(m.detach() - i).flatten() for m, i in zip(opt.master_params, init)])
    assert F.cosine_similarity(d_ref, d_bf, 0) > 0.99
    with torch.no_grad():
        assert rel(bf(x.bfloat16()), ref(x)) < BF16_TOL


def test_fused_adamw_is_the_same_update():
    torch.manual_seed(9)
    a = vitlab.create_model("vit_nano_p2", num_classes=10, img_size=8)
    b = copy.deepcopy(a)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    _train_steps(a, torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.05, foreach=False), x, y, 3)
    opt = fast.fused_adamw(b.parameters(), lr=1e-2, weight_decay=0.05)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    _train_steps(b, opt, x, y, 3)
    # Same function after training. (Parameters are compared through it: the key bias of
    # attention has an exactly-zero true gradient, softmax being shift-invariant, so Adam
    # turns rounding noise into full-size steps there, differently per implementation, with
    # no effect on any output.)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5, rtol=1e-4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if not name.endswith("qkv.bias"):
            assert torch.allclose(pa, pb, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("name,img", [("vit_nano_p2", 8), ("cvt_tiny", 32), ("convmixer_256_8", 16)])
def test_grad_checkpointing_gives_the_same_gradients(name, img):
    torch.manual_seed(10)
    model = vitlab.create_model(name, num_classes=10, img_size=img).train()
    ckpt = copy.deepcopy(model)
    keys = list(ckpt.state_dict())
    fast.set_grad_checkpointing(ckpt, True)
    assert list(ckpt.state_dict()) == keys  # checkpoints still load
    x, y = torch.randn(4, 3, img, img), torch.randint(0, 10, (4,))
    for m in (model, ckpt):
        torch.manual_seed(11)  # same stochastic depth draws
        F.cross_entropy(m(x), y).backward()
    for (n, p), q in zip(model.named_parameters(), ckpt.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), n
    fast.set_grad_checkpointing(ckpt, False)
    assert not getattr(ckpt, "grad_checkpointing", False)


def test_vit_grad_checkpointing_constructor_option():
    model = vitlab.create_model("vit_nano_p2", num_classes=10, img_size=8, grad_checkpointing=True)
    assert model.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing


# ----------------------------------------------------------------------------- bench
def test_run_benchmark_reports_consistent_numbers():
    pytest.importorskip("transformers")
    from vitlab.bench import run_benchmark

    for mode in ("infer", "train"):
        rs = run_benchmark("vit_nano_p2", mode=mode, batch_size=2, img_size=8, steps=2, warmup=1,
                           compare="transformers", num_classes=10, peak=1e12)
        assert [r.impl for r in rs] == ["vitlab", "transformers"]
        for r in rs:
            assert r.flops_per_step > 0 and r.step_s > 0
            assert r.images_per_s == pytest.approx(2 / r.step_s)
            assert r.tflops == pytest.approx(r.flops_per_step / r.step_s / 1e12)
            assert r.frac_peak == pytest.approx(r.tflops)  # peak given as 1 TFLOP/s
    # a training step counts forward + backward: about 3x the forward
    fwd = rs[0].flops_per_step
    from vitlab.bench import count_step_flops
    assert 2.5 * count_step_flops("vit_nano_p2", "infer", 2, 8, 10) < fwd < 3.5 * count_step_flops(
        "vit_nano_p2", "infer", 2, 8, 10)


def test_matmul_peak_is_measured():
    from vitlab.bench import matmul_peak

    assert matmul_peak("cpu", torch.float32, size=256, reps=2) > 1e8


def test_matmul_peak_takes_the_best_of_square_and_transformer_shapes():
    from vitlab.bench import CPU_PEAK_SHAPES, matmul_peak_by_shape

    # the default ceiling is not only a square product: ViT-shaped products run faster on AMX
    assert any(len({m, k, n}) > 1 for m, k, n in CPU_PEAK_SHAPES)
    shapes = ((96, 64, 128), (64, 64, 64))
    got = matmul_peak_by_shape("cpu", torch.float32, shapes=shapes, reps=2)
    assert list(got) == list(shapes) and all(v > 1e7 for v in got.values())


def test_cli_bench_timm_without_timm_is_one_clear_error():
    try:
        import timm  # noqa: F401
        pytest.skip("timm is installed here")
    except ImportError:
        pass
    r = subprocess.run([sys.executable, "-m", "vitlab", "bench", "--model", "vit_nano_p2", "--compare", "timm",
                        "--batch-size", "1", "--steps", "1", "--warmup", "0"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "timm is not installed" in r.stderr and "Traceback" not in r.stderr


_ALLOC_PROBE = """
import resource, statistics, torch
# the modules a training process has loaded (`import vitlab` no longer loads them): with only torch
# loaded, the heap has few small free chunks, small allocations split the freed 64 MB block and the
# next one lands above it, faulting again (6 of 6 runs pass with them loaded, 4 of 6 without)
from vitlab import create_model, evaluate, finetune, from_transformers, load_model, predict, TrainConfig
from vitlab.accel import ops as fast

def faults():  # page faults of each of 5 allocations of a 64 MB tensor, written and freed (median)
    def one():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(16 << 20)
        t.fill_(1.0)
        del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    one()  # the first block after a change may land where small allocations then split it
    return int(statistics.median(one() for _ in range(5)))

before = faults()
ok = fast.tune_cpu_allocator()
print(ok, before, faults())
"""


def test_tune_cpu_allocator_keeps_large_blocks_for_reuse():
    """With glibc's defaults a 64 MB tensor (over glibc's 32 MB mmap limit, like ConvMixer's
    activations) is a fresh mmap every time: every 4 KiB page faults again. After
    `tune_cpu_allocator` it comes from the heap and reuses the pages it had. In a subprocess:
    the setting is process-wide. Medians of 5 allocations: the heap may still grow once (one
    allocation faulting on every page, seen in CI), but not every time."""
    r = subprocess.run([sys.executable, "-c", _ALLOC_PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    ok, before, after = r.stdout.split()
    if ok != "True":
        pytest.skip("the C allocator here is not glibc's: tune_cpu_allocator does not apply")
    pages = (64 << 20) // 4096
    assert int(before) > pages // 2, (before, after)  # the defaults fault on (almost) every page
    assert int(after) < pages // 20, (before, after)


def test_cvt_training_fast_paths_give_the_reference_gradients():
    """CvT's attention runs through vitlab.accel too: with autograd, the fast paths
    (auto-tuned attention kernel, fused residuals) give the reference gradients."""
    torch.manual_seed(12)
    model = vitlab.create_model("cvt_tiny", num_classes=10, img_size=32).train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    grads = []
    for ref in (True, False):
        model.zero_grad()
        torch.manual_seed(13)
        ctx = fast.reference_mode() if ref else torch.enable_grad()
        with ctx:
            F.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("kernel", ["auto", "measure"])
def test_training_attention_kernel_choice_keeps_gradients(kernel):
    """Whichever kernel the rule or the timing picks for a training shape, gradients equal the reference."""
    torch.manual_seed(14)
    fast.set_attention_kernel(kernel)
    try:
        q, k, v = (torch.randn(2, 3, 11, 8, requires_grad=True) for _ in range(3))
        out, _ = fast.attention(q, k, v)
        out.sum().backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        ref, _ = fast.attention_reference(q, k, v)
        ref.sum().backward()
        for g, t in zip(grads, (q, k, v)):
            assert torch.allclose(g, t.grad, atol=1e-5)
        if kernel == "measure":
            assert any(key[5] for key in fast.attention_choices())  # a training (grad) shape was timed
    finally:
        fast.set_attention_kernel("auto")


def test_auto_attention_rule_is_deterministic():
    """'auto' never times anything: explicit products for reduced-precision CPU training at moderate
    length, SDPA for float32, inference and long sequences (so resumed and distributed runs match exactly)."""
    q = torch.randn(1, 1, 16, 8).bfloat16().requires_grad_(True)
    assert fast._choose_kernel(q, q, q, 1.0, None, 0.0, True) == "matmul"
    q32 = torch.randn(1, 1, 16, 8, requires_grad=True)
    assert fast._choose_kernel(q32, q32, q32, 1.0, None, 0.0, True) == "sdpa"
    with torch.no_grad():
        assert fast._choose_kernel(q, q, q, 1.0, None, 0.0, False) == "sdpa"
    long_q = torch.randn(1, 1, 3136, 8).bfloat16().requires_grad_(True)
    long_k = torch.randn(1, 1, 784, 8).bfloat16().requires_grad_(True)
    assert fast._choose_kernel(long_q, long_k, long_k, 1.0, None, 0.0, True) == "sdpa"


def test_compiled_blocks_compute_the_same_function():
    """`compile_blocks` (the `--compile` path) compiles each block in place; the compiled model
    gives the eager model's logits (float32, inductor on CPU)."""
    import shutil

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile's CPU backend needs a C++ compiler; none on PATH")
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        # a cap artifact, not an AVX2 behaviour: inductor packs weights for the ISA it detects from the
        # CPU (AVX-512 here) while the capped oneDNN runs AVX2 kernels on them (NaN, or a crash in free());
        # on a real AVX2 CPU both see AVX2
        pytest.skip("ONEDNN_MAX_CPU_ISA caps oneDNN below the CPU that inductor compiles for")
    torch.manual_seed(0)
    model = vitlab.create_model("vit_nano_p2", num_classes=5, img_size=8, depth=2).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        eager = model(x)
        assert fast.compile_blocks(model) == 2
        assert all(blk._compiled_call_impl is not None for blk in model.blocks)  # compiled in place
        compiled = model(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("patch,size", [(16, (32, 48)), (4, (28, 28)), (1, (5, 7))])
def test_patch_embedding_as_one_matrix_product_is_the_strided_conv(patch, size):
    # the CPU fast path (reshape into patch rows + one product) computes the conv's function,
    # values and gradients, on non-square inputs too
    from vitlab.models.layers import PatchEmbed

    torch.manual_seed(0)
    pe = accelerate(PatchEmbed(size, patch, 3, 24, dynamic_img_size=True).double())
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    out, grid = pe(x)
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, pe.proj.weight, pe.proj.bias), g)
    with fast.reference_mode():
        ref, ref_grid = pe(x)
        rx, rw, rb = torch.autograd.grad(ref, (x, pe.proj.weight, pe.proj.bias), g)
    assert grid == ref_grid == (size[0] // patch, size[1] // patch)
    for a, b in ((out, ref), (gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- inference streams
@pytest.mark.parametrize("name,dtype", [("vit_ti16", "bf16"), ("cvt_13", "bf16"), ("convmixer_256_8", "fp32")])
def test_inference_streams_compute_the_same_logits(name, dtype):
    torch.manual_seed(0)
    m = fast.optimize_for_inference(create_model(name, num_classes=7, img_size=64 if "convmixer" in name else 224),
                                    dtype=dtype, streams=2)
    x = torch.randn(8, 3, 64 if "convmixer" in name else 224, 64 if "convmixer" in name else 224)
    with torch.inference_mode():
        assert fast.streams_for(m, x) == 2
        got = m(x)
        m.inference_streams = 1
        assert fast.streams_for(m, x) == 1
        want = m(x)
    assert got.shape == want.shape == (8, 7)
    # each part's rows are computed as in the whole batch, up to the products' row blocking
    assert torch.allclose(got.float(), want.float(), atol=2e-2 * want.float().abs().max().item(), rtol=0)


def test_stream_threads_run_their_operators_on_one_core_each():
    main = torch.get_num_threads()
    x = torch.zeros(8, 3)
    with torch.inference_mode():
        seen = fast.run_in_streams(lambda p: torch.full((p.shape[0],), torch.get_num_threads()), x, 2)
    assert seen.tolist() == [1] * 8
    assert torch.get_num_threads() == main  # the caller's intra-op threads are unchanged


def test_streams_apply_only_where_they_keep_the_semantics():
    m = fast.optimize_for_inference(create_model("vit_ti16", num_classes=5), streams=2)
    x = torch.randn(8, 3, 224, 224)
    assert fast.streams_for(m, x) == 1                      # autograd on: training / gradients stay whole
    with torch.no_grad():
        assert fast.streams_for(m, x) == 2
        assert fast.streams_for(m, x[:7]) == 1              # fewer than 4 images per stream
        with torch.autocast("cpu", torch.bfloat16):
            assert fast.streams_for(m, x) == 1              # thread-local autocast state is not carried over
        handle = m.blocks[0].register_forward_hook(lambda *a: None)
        assert fast.streams_for(m, x) == 1                  # a user's hook would see parts, in other threads
        handle.remove()
        assert fast.streams_for(m, x) == 2                  # vitlab's own input-cast hook does not count
        plain = create_model("vit_ti16", num_classes=5).eval()
        assert fast.streams_for(plain, x) == 1              # only models prepared by optimize_for_inference
    with pytest.raises(ConfigError, match="streams must be a positive"):
        fast.optimize_for_inference(create_model("vit_ti16", num_classes=5), streams=0)


def test_an_error_in_a_stream_reaches_the_caller():
    def boom(part):
        raise ConfigError("bad part")
    with torch.no_grad(), pytest.raises(ConfigError, match="bad part"):
        fast.run_in_streams(boom, torch.zeros(8, 3), 2)
    m = fast.optimize_for_inference(create_model("vit_ti16", num_classes=5), streams=2)
    with torch.no_grad(), pytest.raises(ConfigError, match="channels"):
        m(torch.randn(8, 4, 224, 224))  # wrong channel count: the model's own clear error, from a stream


# ----------------------------------------------------------------------------- training streams
def _plain_grads(m, x, y):
    for p in m.parameters():
        p.grad = None
    loss = F.cross_entropy(m(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in m.parameters()]


def test_training_streams_compute_the_whole_batch_gradient():
    torch.manual_seed(0)
    m = accelerate(_create_plain("vit_ti16", num_classes=5)).train()
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 5, (8,))
    params = list(m.parameters())
    want_loss, want = _plain_grads(m, x, y)
    assert fast.train_streams_for(m, x, 2) == 2

    def step():
        for p in params:
            p.grad = None
        return fast.train_in_streams(lambda a, b: (F.cross_entropy(m(a), b), {"n": torch.tensor(float(len(b)))}),
                                     x, y, 2, params)
    loss, metrics = step()
    got = [p.grad.clone() for p in params]
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    assert metrics["n"].item() == pytest.approx(4.0)  # the parts' means weighted by their share: a mean
    for g, w, p in zip(got, want, params):
        assert g.shape == p.shape and g.stride() == p.stride()
        assert rel(g, w) < 1e-4
    step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, got))  # the parts summed in a fixed order
    # gradients already there (accumulation steps) are added to, as backward() would
    fast.train_in_streams(lambda a, b: (F.cross_entropy(m(a), b), {}), x, y, 2, params,
                          backward_scale=lambda loss: loss * 0.5)
    for p, g in zip(params, got):
        assert torch.allclose(p.grad, 1.5 * g, rtol=1e-5, atol=1e-7)


def test_training_streams_apply_only_where_they_keep_the_semantics():
    torch.manual_seed(0)
    m = accelerate(_create_plain("vit_ti16", num_classes=5)).train()
    x = torch.randn(8, 3, 224, 224)
    assert fast.train_streams_for(m, x, 2) == 2
    assert fast.train_streams_for(m, x, 1) == 1
    assert fast.train_streams_for(m, x[:7], 2) == 1                # fewer than 4 images per stream
    with torch.no_grad():
        assert fast.train_streams_for(m, x, 2) == 1                # no backward: not a training step
    with torch.autocast("cpu", torch.bfloat16):
        assert fast.train_streams_for(m, x, 2) == 1                # float32 only (measured there)
    with fast.reference_mode():
        assert fast.train_streams_for(m, x, 2) == 1
    handle = m.blocks[0].register_forward_hook(lambda *a: None)
    assert fast.train_streams_for(m, x, 2) == 1                    # a user's hook would see parts
    handle.remove()
    for register in (lambda: m.blocks[0].register_full_backward_hook(lambda *a: None),
                     lambda: m.head.weight.register_hook(lambda g: g),
                     lambda: m.head.weight.register_post_accumulate_grad_hook(lambda p: None)):
        handle = register()
        assert fast.train_streams_for(m, x, 2) == 1                # backward hooks would see parts, or not run
        handle.remove()
    assert fast.train_streams_for(m, x, 2) == 2
    for kw, why in (({"drop_path_rate": 0.1}, "drop path"), ({"drop_rate": 0.1}, "dropout")):
        rnd = accelerate(_create_plain("vit_ti16", num_classes=5, **kw)).train()
        assert why in fast._batch_coupled_or_random(rnd)
        assert fast.train_streams_for(rnd, x, 2) == 1              # random draws would interleave
        assert fast.train_streams_for(rnd.eval(), x, 2) == 2       # (not drawn in eval mode)
    cvt = accelerate(_create_plain("cvt_13", num_classes=5)).train()
    assert "batch norm" in fast._batch_coupled_or_random(cvt)
    assert fast.train_streams_for(cvt, x, 2) == 1                  # batch statistics span the batch
    tiny = accelerate(_create_plain("vit_nano_p2", num_classes=10, in_chans=1)).train()
    digits = torch.randn(64, 1, 8, 8)
    assert fast._forward_flops_per_image(tiny, digits) * 32 < fast.MIN_TRAIN_STREAM_FLOPS
    assert fast.train_streams_for(tiny, digits, 2) == 1            # too little work per stream to pay
    assert tiny.training                                           # counting the FLOPs left the mode as it was
    assert fast.train_streams_for(m.to(torch.bfloat16), x.bfloat16(), 2) == 1
