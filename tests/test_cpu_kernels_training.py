"""vitlab's CPU kernels with autograd (bf16 training): GELU and layer norm, forward and backward,
compute the float64 reference's function and gradients within bf16's error (no worse than
PyTorch's bf16 kernels), sum their parameter gradients in an order that does not depend on the
thread count, and models trained with them follow the same loss and gradients."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlab import bench
from vitlab.accel import kernels as cpu_kernels, ops as fast
from vitlab.accel import accelerate
from vitlab.models import create_model as _create_plain


def create_model(*args, **kwargs):
    """The registry's model with vitlab.accel's modules swapped in: these tests check the fast paths."""
    return accelerate(_create_plain(*args, **kwargs))
from vitlab.models.layers import Mlp


def _gelu_grad_exact(x):
    """GELU'(x) = Phi(x) + x phi(x) in float64."""
    xd = x.double()
    return torch.special.ndtr(xd) + xd * torch.exp(-0.5 * xd * xd) / (2 * torch.pi) ** 0.5


def test_gelu_backward_is_exact_within_bf16_rounding(mod, bf16_values, bf16_ulps):
    x = bf16_values.clone().requires_grad_(True)
    y = cpu_kernels.gelu(x)
    with torch.no_grad():  # the forward is the inference kernel's function, bit for bit
        assert torch.equal(y, cpu_kernels.gelu_(mod, x.detach().clone()))
    y.backward(torch.ones_like(y))
    exact = _gelu_grad_exact(x.detach())
    xt = x.detach().clone().requires_grad_(True)
    F.gelu(xt).backward(torch.ones_like(xt))
    big, large = exact.abs() > 1e-3, exact.abs() > 1e-2
    ulps = bf16_ulps(x.grad, exact)
    # one bf16 rounding of a float32 value within ~3e-6 of GELU': faithfully rounded everywhere
    # (PyTorch's kernel: 0.5 ulp), within 0.65 ulp away from GELU's minimum at x = -0.75, where
    # Phi(x) + x phi(x) cancels
    assert ulps[big].max().item() < 1.0, ulps[big].max().item()
    assert ulps[large].max().item() < 0.65, ulps[large].max().item()
    assert bf16_ulps(xt.grad, exact)[large].max().item() < 0.65  # what PyTorch's bf16 kernel gets
    assert (x.grad.double() - exact).abs()[~big].max().item() < 1e-5  # near GELU' = 0 and far left


def test_gelu_backward_scales_the_incoming_gradient_and_handles_special_values(mod):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 37, generator=g) * 3).to(torch.bfloat16).requires_grad_(True)
    gy = torch.randn(3, 7, 37, generator=g).to(torch.bfloat16)
    cpu_kernels.gelu(x).backward(gy)
    ref = (gy.double() * _gelu_grad_exact(x.detach()))
    assert torch.allclose(x.grad.double(), ref, rtol=1e-2, atol=1e-3)
    special = torch.tensor([float("nan"), 30.0, -30.0, 0.0]).to(torch.bfloat16).requires_grad_(True)
    cpu_kernels.gelu(special).backward(torch.ones(4, dtype=torch.bfloat16))
    d = special.grad.float()
    assert d[0].isnan() and d[1] == 1.0 and d[2] == 0.0 and d[3] == 0.5


@pytest.mark.parametrize("n", [1, 15, 16, 17, 33, 1000])
def test_gelu_backward_handles_every_length(mod, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 3).to(torch.bfloat16).requires_grad_(True)
    cpu_kernels.gelu(x).sum().backward()
    assert torch.allclose(x.grad.double(), _gelu_grad_exact(x.detach()), rtol=1e-2, atol=1e-3)


def test_gelu_kernel_refuses_a_second_derivative(mod):
    x = torch.randn(8).to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(8).to(torch.bfloat16).requires_grad_(True)  # the incoming gradient depends on w
    (gx,) = torch.autograd.grad((cpu_kernels.gelu(x) * w).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice|once_differentiable|double"):
        gx.sum().backward()


def test_gelu_training_kernel_applies_only_where_it_can(mod):
    h = torch.randn(4, 8).to(torch.bfloat16)
    assert fast.gelu_train_kernel_ok(nn.GELU(), h)
    assert fast.gelu_train_kernel_ok(nn.GELU(), h.t())                     # any layout (copied)
    assert not fast.gelu_train_kernel_ok(nn.GELU(approximate="tanh"), h)  # another function
    assert not fast.gelu_train_kernel_ok(nn.GELU(), h.float())            # not bf16
    with fast.reference_mode():
        assert not fast.gelu_train_kernel_ok(nn.GELU(), h)                 # fast paths off


def _ln_case(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = shape[-1]
    x = (torch.randn(*shape, generator=g) * 3 + 1).to(torch.bfloat16)
    gy = torch.randn(*shape, generator=g).to(torch.bfloat16)
    w = torch.randn(D, generator=g) * 0.3 + 1
    b = torch.randn(D, generator=g) * 0.2
    return x, gy, w, b


def _ln_grads(ln_cls, x, gy, w, b, dtype):
    ln = ln_cls(x.shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
    xi = x.detach().to(dtype).requires_grad_(True)
    y = ln(xi)
    y.backward(gy.to(dtype))
    return y, xi.grad, ln.weight.grad, ln.bias.grad


@pytest.mark.parametrize("shape", [(3, 50, 64), (2, 9, 100), (2, 197, 384), (5, 192), (4200, 64)])
def test_layer_norm_backward_matches_the_float64_reference(mod, shape):
    x, gy, w, b = _ln_case(shape)
    ref = _ln_grads(nn.LayerNorm, x, gy, w, b, torch.float64)
    got = _ln_grads(cpu_kernels.FastLayerNorm, x, gy, w, b, torch.bfloat16)
    plain = _ln_grads(nn.LayerNorm, x, gy, w, b, torch.bfloat16)
    assert type(got[0].grad_fn).__name__ == "_LayerNormBackward"
    # the forward is the inference kernel's function, bit for bit
    ln = cpu_kernels.FastLayerNorm(shape[-1], eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
        assert torch.equal(got[0], ln(x))
    for name, g, r, p in zip(("y", "dx", "dw", "db"), got, ref, plain):
        err = ((g.double() - r).abs().max() / r.abs().max()).item()
        torch_err = ((p.double() - r).abs().max() / r.abs().max()).item()
        assert g.dtype == torch.bfloat16 and g.shape == r.shape
        assert err < 1e-2, (name, err)                                  # bf16 rounding
        assert err <= 1.5 * torch_err + 2e-3, (name, err, torch_err)    # no worse than PyTorch's bf16 kernel


def test_layer_norm_parameter_gradients_do_not_depend_on_the_thread_count(mod):
    x, gy, w, b = _ln_case((6000, 192), seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ln_grads(cpu_kernels.FastLayerNorm, x, gy, w, b, torch.bfloat16)
        torch.set_num_threads(max(2, threads))
        many = _ln_grads(cpu_kernels.FastLayerNorm, x, gy, w, b, torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(one, many):
        assert torch.equal(a, c)


def test_layer_norm_kernel_refuses_a_second_derivative(mod):
    x, gy, w, b = _ln_case((4, 64))
    ln = cpu_kernels.FastLayerNorm(64).to(torch.bfloat16)
    xi, gi = x.requires_grad_(True), gy.requires_grad_(True)
    (gx,) = torch.autograd.grad(ln(xi).mul(gi).sum(), xi, create_graph=True)
    with pytest.raises(RuntimeError, match="twice|once_differentiable|double"):
        gx.sum().backward()


@pytest.mark.parametrize("name", ["vit_ti16", "cvt_tiny"])
def test_bf16_training_step_with_the_kernels_follows_pytorchs(mod, name, grad_fn_names):
    torch.manual_seed(0)
    base = create_model(name, num_classes=5, img_size=64).train().to(torch.bfloat16)
    with_k, without = copy.deepcopy(base), copy.deepcopy(base)
    assert fast.use_cpu_kernels(with_k, True) and not fast.use_cpu_kernels(without, False)
    x = torch.randn(2, 3, 64, 64).to(torch.bfloat16)
    y = torch.tensor([1, 3])
    losses, grads = [], []
    for m in (with_k, without):
        loss = F.cross_entropy(m(x).float(), y)
        names = grad_fn_names(loss)
        assert (("_GeluBackward" in names and "_LayerNormBackward" in names) == (m is with_k))
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.float().flatten() for p in m.parameters()]))
    assert abs(losses[0] - losses[1]) < 2e-2 * max(1.0, abs(losses[1]))
    cos = F.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert cos > 0.99, cos  # the same gradient up to bf16 rounding


def test_benchmark_training_step_uses_the_kernels(mod):
    model = bench.prepare(create_model("vit_ti16", num_classes=5, img_size=32), "train", torch.bfloat16,
                          torch.device("cpu"), fast=True)
    assert any(isinstance(m, cpu_kernels.FastLayerNorm) for m in model.modules())
    assert all(m.cpu_kernel for m in model.modules() if isinstance(m, Mlp))
    ref = bench.prepare(create_model("vit_ti16", num_classes=5, img_size=32), "train", torch.bfloat16,
                        torch.device("cpu"), fast=False)
    assert not any(isinstance(m, cpu_kernels.FastLayerNorm) for m in ref.modules())


def test_bf16_training_with_the_kernels_resumes_bit_for_bit(mod, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from vitlab.train import checkpoint as ckpt
    from vitlab.train.config import TrainConfig
    from vitlab.train.engine import fit

    calls = []
    gelu, attention = cpu_kernels._Gelu.forward, cpu_kernels._QKVAttention.forward
    monkeypatch.setattr(cpu_kernels._Gelu, "forward", staticmethod(lambda ctx, x: calls.append("gelu") or gelu(ctx, x)))
    monkeypatch.setattr(cpu_kernels._QKVAttention, "forward",
                        staticmethod(lambda ctx, *a: calls.append("attention") or attention(ctx, *a)))
    # head dim 32: the attention kernel applies too
    base = dict(out=str(tmp_path), epochs=2, batch_size=64, lr=3e-3, threads=1, tensorboard=False, progress=False,
                precision="bf16", dropout=0.1, model_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2})
    full = fit(TrainConfig(name="full", **base), verbose=False)
    assert set(calls) == {"gelu", "attention"}  # the trainer's bf16 CPU steps ran vitlab's kernels
    part = fit(TrainConfig(name="part", max_steps=30, **base), verbose=False)
    rest = fit(TrainConfig(resume=str(part.run_dir)), verbose=False)
    a, b = (load_file(str(ckpt.resolve_checkpoint(r.run_dir)["weights"])) for r in (full, rest))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rest.step_losses == full.step_losses[30:]
