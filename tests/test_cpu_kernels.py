"""vitlab's CPU kernels (vitlab/csrc/cpu_kernels.cpp): the fused bf16 attention and layer norm
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
    (1, 2, 130, 129, 64, "split"),   # odd key count, several 64-key blocks, q blocks of 128 + 2
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
