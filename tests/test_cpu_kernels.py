"""vitlab's CPU kernels (vitlab/csrc/cpu_kernels.cpp): the fused bf16 attention, layer norm and GELU
compute the float32 reference's function within bf16's error, models use them after
`optimize_for_inference` and give the same logits, and without them everything falls back."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import ConfigError
from vitlab.models import cpu_kernels, create_model, fast


@pytest.fixture(scope="module")
def mod():
    m = cpu_kernels.get()
    if m is None:
        pytest.skip(f"vitlab's CPU kernels are not available here: {cpu_kernels.unavailable_reason()}")
    return m


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


def _bf16_values():
    """Every finite bf16 value with |x| < 1e4 (GELU's whole input domain at bf16 resolution)."""
    allv = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return allv[torch.isfinite(allv.float()) & (allv.float().abs() < 1e4)].clone()


def _ulps(got, exact):
    """|got - exact| in units of bf16's spacing at |exact| (8 significant bits)."""
    return (got.double() - exact).abs() / 2.0 ** (torch.floor(torch.log2(exact.abs())) - 7)


def test_gelu_kernel_is_exact_gelu_within_bf16_rounding(mod):
    x = _bf16_values()
    exact = x.double() * torch.special.ndtr(x.double())  # x Phi(x), the erf form
    got = x.clone()
    assert cpu_kernels.gelu_(mod, got) is got  # in place
    big = exact.abs() > 1e-6
    ulps = _ulps(got, exact)[big]
    # rounding alone is 0.5 ulp; the piecewise cubic adds < 0.05 ulp where it matters
    assert ulps.max().item() < 1.2, ulps.max().item()
    assert ulps.max().item() <= _ulps(F.gelu(x), exact)[big].max().item()  # no worse than PyTorch's bf16 GELU
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
    mlp = Mlp(64, 256).eval()
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
    m = fast.optimize_for_inference(create_model("vit_ti16", num_classes=5))
    assert cpu_kernels.unavailable_reason() == f"disabled by {cpu_kernels.ENV}=0"
    assert not any(isinstance(x, cpu_kernels.FastLayerNorm) for x in m.modules())
    assert not any(getattr(x, "cpu_kernel", False) for x in m.modules())
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 224)).shape == (1, 5)
    with pytest.raises(ConfigError, match=f"disabled by {cpu_kernels.ENV}=0.*cpu_kernels=False"):
        fast.optimize_for_inference(create_model("vit_ti16", num_classes=5), cpu_kernels=True)
    # float32 inference never uses them (the kernels are bf16)
    monkeypatch.setenv(cpu_kernels.ENV, "1")
    m32 = fast.optimize_for_inference(create_model("vit_ti16", num_classes=5), dtype="fp32")
    assert not any(getattr(x, "cpu_kernel", False) for x in m32.modules())


def test_a_build_announces_itself_and_a_failed_build_falls_back_with_the_reason(monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp

    class Built:
        @staticmethod
        def available():
            return True

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
