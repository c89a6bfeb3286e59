"""vitlab's depthwise-convolution weight gradient (`dwconv_weight_grad`) and the bf16 training path built
on it (`cpu_kernels.depthwise_conv`): it computes the float64 reference's dW and db (summed in float32,
closer than oneDNN's bf16 kernel), in an order that does not depend on the thread count, applies only
where it should, and ConvMixer trains through it with the same loss and gradients."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlab.accel import kernels as cpu_kernels, ops as fast

from vitlab.accel import accelerate
from vitlab.models import create_model as _create_plain


def create_model(*args, **kwargs):
    """The registry's model with vitlab.accel's modules swapped in: these tests check the fast paths."""
    return accelerate(_create_plain(*args, **kwargs))


def _reference_grads(g, x, C, k, s, p):
    """dW (C, 1, k, k) and db (C,) of a depthwise conv in float64 (PyTorch's own backward)."""
    w = torch.zeros(C, 1, k, k, dtype=torch.float64)
    _, dw, db = torch.ops.aten.convolution_backward(g.double(), x.double(), w, [C], [s, s], [p, p], [1, 1], False,
                                                    [0, 0], C, [False, True, True])
    return dw, db


def _maps(B, C, H, W, k, s, p, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    g = torch.randn(B, C, Ho, Wo, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    return g, x


def _nhwc(t):
    return t.permute(0, 2, 3, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,C,H,W,k,s,p", [
    (2, 32, 12, 12, 7, 1, 3),    # ConvMixer's 7x7 'same' (the 4-column blocks, no tail)
    (3, 16, 9, 11, 9, 1, 4),     # 9x9, width not a multiple of 4 (column tail), H != W
    (2, 48, 10, 10, 5, 1, 2),    # 5x5
    (2, 16, 13, 13, 5, 2, 2),    # stride 2, odd size
    (1, 16, 9, 9, 3, 2, 1),      # 3x3 stride 2 (the kernel takes it; models keep oneDNN's there)
    (2, 16, 10, 8, 4, 3, 0),     # no specialised row routine (even k, stride 3): the generic path
    (1, 32, 6, 6, 11, 1, 5),     # kernel larger than the map: most taps read padding
])
def test_weight_gradient_matches_the_float64_reference(mod, B, C, H, W, k, s, p, dtype):
    g, x = _maps(B, C, H, W, k, s, p, dtype)
    dw, db = mod.dwconv_weight_grad(_nhwc(g), _nhwc(x), k, s, p)
    ref_dw, ref_db = _reference_grads(g, x, C, k, s, p)
    assert dw.dtype == db.dtype == torch.float32 and dw.shape == (C, k * k) and db.shape == (C,)
    scale = ref_dw.abs().max()
    # summed in float32 from the exact inputs: float32 rounding only (bf16 inputs are exact in float32)
    assert (dw.double().view(C, 1, k, k) - ref_dw).abs().max() < 1e-5 * scale
    assert (db.double() - ref_db).abs().max() < 1e-5 * ref_db.abs().max()


def test_weight_gradient_is_closer_than_onednns_bf16_kernel(mod):
    C, k = 32, 7
    g, x = _maps(4, C, 16, 16, k, 1, 3, torch.bfloat16)
    ref_dw, _ = _reference_grads(g, x, C, k, 1, 3)
    ours = mod.dwconv_weight_grad(_nhwc(g), _nhwc(x), k, 1, 3)[0].double().view_as(ref_dw)
    onednn = torch.ops.aten.convolution_backward(g, x, torch.zeros(C, 1, k, k, dtype=torch.bfloat16), [C], [1, 1],
                                                 [3, 3], [1, 1], False, [0, 0], C, [False, True, False])[1]
    assert (ours - ref_dw).abs().max() < (onednn.double() - ref_dw).abs().max()


def test_weight_gradient_does_not_depend_on_the_thread_count(mod):
    g, x = _maps(3, 64, 14, 14, 7, 1, 3, torch.bfloat16, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mod.dwconv_weight_grad(_nhwc(g), _nhwc(x), 7, 1, 3)
        torch.set_num_threads(2)
        two = mod.dwconv_weight_grad(_nhwc(g), _nhwc(x), 7, 1, 3)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_bad_arguments_fail_with_a_clear_message(mod):
    g, x = _maps(1, 16, 8, 8, 5, 1, 2, torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        mod.dwconv_weight_grad(_nhwc(g[:, :8]).contiguous(), _nhwc(x[:, :8]).contiguous(), 5, 1, 2)
    with pytest.raises(RuntimeError, match="does not follow"):
        mod.dwconv_weight_grad(_nhwc(g).contiguous(), _nhwc(x).contiguous(), 5, 1, 1)  # wrong padding for g's size
    with pytest.raises(RuntimeError, match="both bf16 or both float32"):
        mod.dwconv_weight_grad(_nhwc(g).contiguous(), _nhwc(x).float().contiguous(), 5, 1, 2)
    with pytest.raises(RuntimeError, match="contiguous"):
        mod.dwconv_weight_grad(g, x, 5, 1, 2)  # NCHW views of channels-last memory


def test_the_kernel_applies_only_where_it_should(mod):
    x = torch.randn(2, 32, 8, 8)
    ok = lambda conv, t=x: cpu_kernels.depthwise_conv_ok(t, conv)  # noqa: E731
    with torch.enable_grad():
        assert ok(nn.Conv2d(32, 32, 7, padding=3, groups=32))
        assert ok(nn.Conv2d(32, 32, 5, stride=2, padding=2, groups=32))
        assert not ok(nn.Conv2d(32, 32, 3, padding=1, groups=32))              # 3x3: oneDNN's own fast path
        assert not ok(nn.Conv2d(24, 24, 7, padding=3, groups=24), torch.randn(2, 24, 8, 8))  # channels % 16
        assert not ok(nn.Conv2d(32, 64, 7, padding=3, groups=32))              # channel multiplier 2
        assert not ok(nn.Conv2d(32, 32, 7, padding=6, dilation=2, groups=32))  # dilation
        assert not ok(nn.Conv2d(32, 32, (7, 5), padding=(3, 2), groups=32))    # not square
        assert not ok(nn.Conv2d(32, 32, 7, padding=3, groups=32, padding_mode="reflect"))
        assert not ok(nn.Conv2d(32, 32, 7, stride=3, padding=3, groups=32))    # stride 3
        with fast.reference_mode():
            assert not ok(nn.Conv2d(32, 32, 7, padding=3, groups=32))
    with torch.no_grad():
        assert not ok(nn.Conv2d(32, 32, 7, padding=3, groups=32))              # inference has its own path


@pytest.mark.parametrize("weights", ["bf16", "fp32_autocast"])
def test_depthwise_conv_follows_pytorchs_function_and_gradients(mod, weights, grad_fn_names):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 7, padding=3, groups=32)
    x0 = torch.randn(2, 32, 10, 10).contiguous(memory_format=torch.channels_last)
    ref_conv = copy.deepcopy(conv).double()
    xr = x0.double().requires_grad_(True)
    ref = ref_conv(xr)
    gy = torch.randn_like(ref)
    ref.backward(gy)
    if weights == "bf16":
        conv = conv.to(torch.bfloat16)
    x = x0.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights != "bf16"):
        y = cpu_kernels.depthwise_conv(x, conv)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert "_DepthwiseConvBackward" in grad_fn_names(y)
    y.backward(gy.to(torch.bfloat16))
    assert conv.weight.grad.dtype == conv.weight.dtype  # float32 master weights get float32 gradients

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()
    assert rel(y, ref) < 1e-2
    assert rel(x.grad, xr.grad) < 1e-2
    assert rel(conv.weight.grad, ref_conv.weight.grad) < 1e-2
    assert rel(conv.bias.grad, ref_conv.bias.grad) < 1e-2


def test_convmixer_bf16_training_step_uses_the_kernel_and_follows_pytorch(mod, grad_fn_names):
    torch.manual_seed(0)
    base = create_model("convmixer_256_8", num_classes=5, img_size=32, kernel_size=7, depth=2).train()
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    ref = copy.deepcopy(base).double()
    F.cross_entropy(ref(x.double()), y).backward()
    model = copy.deepcopy(base).to(torch.bfloat16).to(memory_format=torch.channels_last)
    fast.use_cpu_kernels(model)
    loss = F.cross_entropy(model(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)).float(), y)
    assert "_DepthwiseConvBackward" in grad_fn_names(loss)
    loss.backward()
    got = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    want = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert F.cosine_similarity(got, want, dim=0).item() > 0.99  # the same gradient up to bf16 rounding
    dw = [(m.dw.weight.grad.double(), r.dw.weight.grad) for m, r in zip(model.blocks, ref.blocks)]
    assert all(((a - b).norm() / b.norm()).item() < 3e-2 for a, b in dw)
