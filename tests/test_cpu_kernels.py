"""vitlab's CPU kernels (vitlab/csrc/cpu_kernels.cpp): the fused bf16 attention, layer norm, GELU and
CvT's depthwise q/k/v projections
compute the float32 reference's function within bf16's error, models use them after
`optimize_for_inference` and give the same logits, and without them everything falls back."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import ConfigError
from vitlab.accel import kernels as cpu_kernels, ops as fast
from vitlab.accel import accelerate
from vitlab.models import create_model as _create_plain


def create_model(*args, **kwargs):
    """The registry's model with vitlab.accel's modules swapped in: these tests check the fast paths."""
    return accelerate(_create_plain(*args, **kwargs))


def _qkv(B, H, Nq, N, d, seed=0, layout="split"):
    g = torch.Generator().manual_seed(seed)
    if layout == "fused":  # q, k, v as strided views of one qkv projection, as in ViT's Attention
        qkv = (torch.randn(B, N, 3, H, d, generator=g) * 2).to(torch.bfloat16).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q[:, :, :Nq], k, v
    q = (torch.randn(B, Nq, H, d, generator=g) * 2).to(torch.bfloat16).transpose(1, 2)
    k, v = ((torch.randn(B, N, H, d, generator=g) * 2).to(torch.bfloat16).transpose(1, 2) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("B,H,Nq,N,d,layout", [
    (2, 6, 197, 197, 64, "fused"),   # ViT-S/16
    (2, 6, 1, 197, 64, "fused"),     # the class-token-only last block
    (2, 1, 300, 75, 64, "split"),    # CvT: fewer keys than queries, one head
    (3, 2, 17, 5, 32, "split"),      # fewer keys than one vector, d = 32
    (1, 2, 130, 129, 64, "split"),   # odd key count, 16-key tail, query blocks of 32 + a 2-row tail
    (2, 2, 33, 50, 128, "split"),    # d = 128 (four k-steps), 32 + 1 query rows
    (1, 1, 400, 784, 64, "split"),   # CvT-13 stage 1's 784 keys
])
def test_fused_attention_matches_the_float32_reference(mod, B, H, Nq, N, d, layout):
    q, k, v = _qkv(B, H, Nq, N, d, layout=layout)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    got = cpu_kernels.attention(mod, q, k, v, d ** -0.5)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    assert got.shape == ref.shape and got.dtype == torch.bfloat16
    err, sdpa_err = (got.float() - ref).abs().max().item(), (sdpa.float() - ref).abs().max().item()
    # bf16 probabilities and output: the same order of error as PyTorch's own bf16 kernel
    assert err < 3 * sdpa_err + 2e-3, (err, sdpa_err)
    assert torch.allclose(got.float(), ref, rtol=2e-2, atol=2e-2)
    # the output is a view of (B, Nq, H*d) memory: the projection's layout, no copy needed
    assert got.transpose(1, 2).is_contiguous()


def test_fused_attention_scale_is_applied(mod):
    q, k, v = _qkv(2, 3, 40, 40, 64)
    for scale in (0.05, 0.5):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
        got = cpu_kernels.attention(mod, q, k, v, scale).float()
        assert torch.allclose(got, ref, rtol=2e-2, atol=2e-2)


def test_attention_ok_rejects_what_the_kernel_cannot_take():
    q, k, v = _qkv(1, 2, 8, 8, 64)
    assert cpu_kernels.attention_ok(q, k, v)
    assert not cpu_kernels.attention_ok(q.float(), k.float(), v.float())          # not bf16
    assert not cpu_kernels.attention_ok(*_qkv(1, 2, 8, 8, 48))                     # d not a multiple of 32
    leaf = q.detach().requires_grad_(True)
    with torch.enable_grad():
        assert not cpu_kernels.attention_ok(leaf, k, v)                            # autograd needs PyTorch's


def test_fused_attention_takes_any_row_stride(mod):
    """Keys and values as views with an odd row stride (e.g. slices of a wider bf16 buffer)."""
    g = torch.Generator().manual_seed(5)
    buf = (torch.randn(2, 40, 2 * 64 + 3, generator=g) * 2).to(torch.bfloat16)  # row stride 131 elements
    k, v = (buf[:, :, i * 64:(i + 1) * 64].unflatten(2, (1, 64)).transpose(1, 2) for i in (0, 1))
    q = (torch.randn(2, 1, 30, 64, generator=g) * 2).to(torch.bfloat16)
    assert k.stride(2) % 2 == 1 and cpu_kernels.attention_ok(q, k, v)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    got = cpu_kernels.attention(mod, q, k, v, 64 ** -0.5)
    assert torch.allclose(got.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("D", [64, 100, 384, 768])
def test_layer_norm_matches_the_float32_reference(mod, D):
    g = torch.Generator().manual_seed(D)
    x = (torch.randn(3, 50, D, generator=g) * 3 + 1).to(torch.bfloat16)
    ln = nn.LayerNorm(D, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.2, generator=g)
        ln.bias.normal_(0.0, 0.2, generator=g)
    ref = ln(x.float())
    ln = ln.to(torch.bfloat16)
    got = mod.layer_norm_bf16(x, ln.weight, ln.bias, ln.eps).float()
    torch_bf16 = ln(x).float()
    err, torch_err = (got - ref).abs().max().item(), (torch_bf16 - ref).abs().max().item()
    assert err <= 1.5 * torch_err + 1e-3, (err, torch_err)


def test_gelu_kernel_is_exact_gelu_within_bf16_rounding(mod, bf16_values, bf16_ulps):
    x = bf16_values.clone()
    exact = x.double() * torch.special.ndtr(x.double())  # x Phi(x), the erf form
    got = x.clone()
    assert cpu_kernels.gelu_(mod, got) is got  # in place
    big = exact.abs() > 1e-6
    ulps = bf16_ulps(got, exact)[big]
    # rounding alone is 0.5 ulp; the piecewise cubic adds < 0.05 ulp where it matters
    assert ulps.max().item() < 1.2, ulps.max().item()
    assert ulps.max().item() <= bf16_ulps(F.gelu(x), exact)[big].max().item()  # no worse than PyTorch's bf16 GELU
    assert (got.double() - exact).abs()[~big].max().item() < 1e-8  # tiny outputs: tiny absolute error
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -7.0]).to(torch.bfloat16)
    out = cpu_kernels.gelu_(mod, special.clone()).float()
    assert out[0].isnan() and out[1] == float("inf") and out[2:].abs().max() == 0


@pytest.mark.parametrize("n", [1, 15, 16, 17, 33, 1000])
def test_gelu_kernel_handles_every_length(mod, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n + 5, generator=g) * 3).to(torch.bfloat16)
    got = cpu_kernels.gelu_(mod, x[:n].clone())
    assert torch.allclose(got.float(), F.gelu(x[:n].float()), rtol=1e-2, atol=1e-3)
    # the elements past the end are never written
    buf = x.clone()
    cpu_kernels.gelu_(mod, buf[:n])
    assert torch.equal(buf[n:], x[n:])


def test_gelu_kernel_applies_only_where_it_can(mod):
    h = torch.randn(4, 8).to(torch.bfloat16)
    assert fast.gelu_kernel_ok(nn.GELU(), h)
    assert not fast.gelu_kernel_ok(nn.GELU(approximate="tanh"), h)  # another function
    assert not fast.gelu_kernel_ok(nn.GELU(), h.float())            # not bf16
    assert not fast.gelu_kernel_ok(nn.GELU(), h.t())                 # not contiguous
    with fast.reference_mode():
        assert not fast.gelu_kernel_ok(nn.GELU(), h)                 # fast paths off


def test_mlp_uses_the_gelu_kernel_and_keeps_its_function(mod, monkeypatch):
    from vitlab.models.layers import Mlp

    torch.manual_seed(0)
    mlp = accelerate(Mlp(64, 256).eval())
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        want = mlp(x)
        mlp = mlp.to(torch.bfloat16)
        mlp.cpu_kernel = True
        calls = []
        real = cpu_kernels.gelu_
        monkeypatch.setattr(cpu_kernels, "gelu_", lambda m, h: calls.append(h.shape) or real(m, h))
        got = mlp(x.to(torch.bfloat16)).float()
        assert calls == [(2, 50, 256)]
        mlp.cpu_kernel = False
        plain = mlp(x.to(torch.bfloat16)).float()
    err, plain_err = (got - want).abs().max().item(), (plain - want).abs().max().item()
    assert err <= 1.5 * plain_err + 1e-3, (err, plain_err)


def _dw_reference(x, p, h, w, wt, bt, s, ln):
    """float32 reference of the depthwise q/k/v projections: (layer norm,) three convs, prefix attached."""
    B, N, C = x.shape
    z = x.float()
    if ln is not None:
        z = F.layer_norm(z, (C,), ln[0], ln[1], ln[2])
    fmap = z[:, p:].reshape(B, h, w, C).permute(0, 3, 1, 2)
    outs = []
    for i, stride in enumerate((1, s, s)):
        weight = wt[i].t().reshape(C, 1, 3, 3)
        y = F.conv2d(fmap, weight, bt[i], stride, 1, 1, C).permute(0, 2, 3, 1).reshape(B, -1, C)
        outs.append(torch.cat([z[:, :p], y], 1))
    return outs


@pytest.mark.parametrize("B,p,h,w,C,s,norm", [
    (2, 1, 14, 14, 384, 2, True),    # CvT-13 stage 3 (class token, layer norm fused)
    (2, 0, 28, 28, 192, 2, True),    # stage 2
    (1, 0, 9, 7, 64, 2, False),      # non-square, odd sizes: 4-wide blocks + column tails
    (2, 2, 5, 3, 32, 3, True),       # two prefix tokens, maps narrower than a block, stride 3
    (1, 1, 4, 6, 16, 1, False),      # k/v at stride 1
    (1, 0, 5, 9, 32, 1, True),       # k/v at stride 1: two 4-wide blocks + a column tail per row
])
def test_depthwise_projection_kernel_matches_float32_convs(mod, B, p, h, w, C, s, norm):
    g = torch.Generator().manual_seed(B * 100 + h)
    x = (torch.randn(B, p + h * w, C, generator=g) * 2 + 0.5).to(torch.bfloat16)
    wt, bt = torch.randn(3, 9, C, generator=g) * 0.3, torch.randn(3, C, generator=g)
    ln = (torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g), 1e-5) if norm else None
    for want_q in (True, False):
        q, k, v = cpu_kernels.dwconv_qkv(mod, x, p, (h, w), wt, bt, s, want_q, ln)
        ref = _dw_reference(x, p, h, w, wt, bt, s, ln)
        assert (q is None) == (not want_q)
        for got, want in zip((q, k, v), ref):
            if got is None:
                continue
            assert got.dtype == torch.bfloat16 and got.shape == want.shape and got.is_contiguous()
            # float32 sums, one rounding to bf16 at the end: within half a bf16 unit (plus the sums' order)
            assert torch.allclose(got.float(), want, rtol=2 ** -8, atol=1e-4), (got.float() - want).abs().max()


def test_depthwise_projection_kernel_reads_a_strided_batch(mod):
    """The tokens may be a slice with gaps between images (e.g. the rows after a longer prefix)."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(2, 1 + 1 + 36, 32, generator=g).to(torch.bfloat16)
    x = big[:, 1:]  # batch stride (38 * 32) != 37 * 32
    wt, bt = torch.randn(3, 9, 32, generator=g), torch.randn(3, 32, generator=g)
    assert cpu_kernels.dwconv_qkv_ok(x) and not x.is_contiguous()
    got = cpu_kernels.dwconv_qkv(mod, x, 1, (6, 6), wt, bt, 2, True)
    want = cpu_kernels.dwconv_qkv(mod, x.contiguous(), 1, (6, 6), wt, bt, 2, True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not cpu_kernels.dwconv_qkv_ok(torch.zeros(2, 5, 24, dtype=torch.bfloat16))  # width not a multiple of 16
    assert not cpu_kernels.dwconv_qkv_ok(torch.zeros(2, 5, 32))  # float32


def test_cvt_uses_the_projection_kernel_and_follows_its_weights(mod, monkeypatch):
    from vitlab.accel.modules import FastConvAttention

    torch.manual_seed(0)
    m = fast.optimize_for_inference(create_model("cvt_13", num_classes=10))
    calls = []
    real = cpu_kernels.dwconv_qkv
    monkeypatch.setattr(cpu_kernels, "dwconv_qkv", lambda *a, **k: calls.append(k.get("norm", a[8] if len(a) > 8 else None)) or real(*a, **k))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        got = m(x).float()
        assert len(calls) == sum(len(st.blocks) for st in m.stages)  # every block, norm1 fused into each
        assert all(c is not None for c in calls)
        monkeypatch.setattr(FastConvAttention, "_fused_projections", lambda self, *a, **k: None)
        plain = m(x).float()
        monkeypatch.undo()
        # same function as PyTorch's layer norm + oneDNN's convs (bf16 rounding apart)
        assert torch.allclose(got, plain, atol=0.05 * plain.abs().max().item())
        # a changed weight is picked up (the kernel's float32 copies are rebuilt)
        conv = m.stages[2].blocks[0].attn.conv_proj_k.conv
        conv.weight.mul_(-1.0)
        flipped = m(x).float()
        monkeypatch.setattr(FastConvAttention, "_fused_projections", lambda self, *a, **k: None)
        flipped_plain = m(x).float()
    assert not torch.allclose(flipped, got, atol=1e-3)
    assert torch.allclose(flipped, flipped_plain, atol=0.05 * flipped_plain.abs().max().item())


@pytest.mark.parametrize("name", ["vit_ti16", "cvt_13"])
def test_models_use_the_kernels_and_keep_their_function(mod, name):
    torch.manual_seed(0)
    ref = create_model(name, num_classes=10).eval()
    m = fast.optimize_for_inference(copy.deepcopy(ref))  # same weights, bf16, BN folded
    assert any(isinstance(x, cpu_kernels.FastLayerNorm) for x in m.modules())
    assert all(x.cpu_kernel for x in m.modules() if hasattr(x, "cpu_kernel"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = ref(x)
        got = m(x).float()
        fast.use_cpu_kernels(m, False)
        assert not any(isinstance(x, cpu_kernels.FastLayerNorm) for x in m.modules())
        plain = m(x).float()
    scale = want.abs().max().item()
    err, plain_err = (got - want).abs().max().item(), (plain - want).abs().max().item()
    assert err < max(2 * plain_err, 0.02 * scale), (err, plain_err, scale)


def test_state_dict_is_unchanged_by_the_kernels(mod):
    m = fast.optimize_for_inference(create_model("vit_ti16", num_classes=5))
    keys_on = list(m.state_dict())
    fast.use_cpu_kernels(m, False)
    assert keys_on == list(m.state_dict())


def test_unavailable_kernels_fall_back_and_insisting_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_STATE", {"module": None, "tried": False, "reason": None})
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    m = fast.optimize_for_inference(create_model("vit_ti16", num_classes=5), "bf16")
    assert cpu_kernels.static_reason() == f"disabled by {cpu_kernels.ENV}=0"
    assert not any(isinstance(x, cpu_kernels.FastLayerNorm) for x in m.modules())
    assert not any(getattr(x, "cpu_kernel", False) for x in m.modules())
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 224)).shape == (1, 5)
    with pytest.raises(ConfigError, match=f"disabled by {cpu_kernels.ENV}=0.*cpu_kernels=False"):
        fast.optimize_for_inference(create_model("vit_ti16", num_classes=5), "bf16", cpu_kernels=True)
    with pytest.raises(ConfigError, match="cpu_kernels=True.*bf16"):  # never silently ignored
        fast.optimize_for_inference(create_model("vit_ti16", num_classes=5), "fp32", cpu_kernels=True)
    # float32 inference never uses them (the kernels are bf16)
    monkeypatch.setenv(cpu_kernels.ENV, "1")
    m32 = fast.optimize_for_inference(create_model("vit_ti16", num_classes=5), dtype="fp32")
    assert not any(getattr(x, "cpu_kernel", False) for x in m32.modules())


def test_a_build_announces_itself_and_a_failed_build_falls_back_with_the_reason(monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp

    class Built:
        @staticmethod
        def use_amx(want):
            return False

    monkeypatch.setattr(cpu_kernels, "_why_not", lambda: None)
    monkeypatch.setattr(cpu_kernels, "_built", lambda name: False)
    monkeypatch.setattr(cpu_kernels, "_STATE", {"module": None, "tried": False, "reason": None})
    monkeypatch.setattr(cpp, "load", lambda *a, **k: Built)
    assert cpu_kernels.get() is Built
    assert "building the CPU kernels (once" in capsys.readouterr().err  # a 25 s pause is announced

    def broken(*a, **k):
        raise RuntimeError("Error building extension 'vitlab_cpu_kernels'\nc++: fatal error: no input files")
    monkeypatch.setattr(cpu_kernels, "_STATE", {"module": None, "tried": False, "reason": None})
    monkeypatch.setattr(cpp, "load", broken)
    with pytest.warns(RuntimeWarning, match="CPU kernels are not used: the build failed.*PyTorch's kernels run"):
        assert cpu_kernels.get() is None
    assert "no input files" in cpu_kernels.unavailable_reason()
