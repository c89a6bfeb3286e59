"""vitlab's fused CPU attention with its backward (bf16 training; the entry points it shares with
the float32 kernel are tested for both, the rest of that kernel in test_cpu_attention_f32.py): the
forward's output and log-sum-exp and the backward's dq, dk, dv match the float64 reference within
bf16's error (no worse than PyTorch's own bf16 attention), for every shape class the kernel's
blocking meets; the fused-qkv entry writes one gradient buffer; results do not depend on the
thread count; models use it in training only where it applies."""
import copy

import pytest
import torch
import torch.nn.functional as F
from attention_reference import assert_as_close_as_pytorch, reference, rel

from vitlab.accel import kernels as cpu_kernels, ops as fast

from vitlab.accel import accelerate
from vitlab.models import create_model as _create_plain


def create_model(*args, **kwargs):
    """The registry's model with vitlab.accel's modules swapped in: these tests check the fast paths."""
    return accelerate(_create_plain(*args, **kwargs))
from vitlab.models.layers import Attention


def _qkv(B, H, Nq, N, d, gen, strided=True):
    """q (B, H, Nq, d), k, v (B, H, N, d) in bf16, as (B, N, H, d)-memory views like the models' (strided) or contiguous."""
    if strided:
        q = torch.randn(B, Nq, H, d, generator=gen).to(torch.bfloat16).transpose(1, 2)
        kv = torch.randn(B, N, 2, H, d, generator=gen).to(torch.bfloat16)
        return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return tuple(torch.randn(B, H, n, d, generator=gen).to(torch.bfloat16) for n in (Nq, N, N))


# shapes that meet every branch of the blocking: full and partial 32-row query blocks (one of <= 16
# rows too), key counts that are and are not multiples of 16 and 32, Nq != N, head dims 32 / 64 / 96
SHAPES = [(2, 3, 197, 197, 64), (2, 1, 50, 17, 32), (1, 2, 33, 50, 64), (2, 1, 300, 80, 64), (1, 2, 5, 197, 64),
          (2, 2, 16, 16, 96), (1, 1, 1, 1, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [True, False])
def test_kernel_forward_and_backward_match_the_float64_reference(mod, shape, strided):
    B, H, Nq, N, d = shape
    gen = torch.Generator().manual_seed(Nq * 1000 + N)
    q, k, v = _qkv(B, H, Nq, N, d, gen, strided)
    scale = d ** -0.5
    g = torch.randn(B, H, Nq, d, generator=gen).to(torch.bfloat16)
    out, lse, dq_ref, dk_ref, dv_ref = reference(q, k, v, scale, g)

    o, l2 = mod.attention_fwd_bf16(q, k, v, scale)
    assert o.shape == (B, Nq, H * d) and l2.shape == (B, H, Nq) and l2.dtype == torch.float32
    assert torch.equal(o, mod.attention_bf16(q, k, v, scale, 0))  # the inference kernel's function, bit for bit
    # the softmax's exponential has a relative error of 8e-5 (degree 3): 1.2e-4 in log2 of a sum
    assert (l2.double() - lse).abs().max().item() < 2e-4
    got = {"out": o.view(B, Nq, H, d).transpose(1, 2)}
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    mod.attention_backward_bf16(g.transpose(1, 2).reshape(B, Nq, H * d).contiguous(), q, k, v, o, l2, scale, dq, dk, dv, 0)
    got.update(dq=dq, dk=dk, dv=dv)
    # PyTorch's bf16 attention (explicit products with autograd) against the same reference
    assert_as_close_as_pytorch(got, q, k, v, g, scale, (out, dq_ref, dk_ref, dv_ref),
                               lambda *a: fast.attention_reference(*a)[0], bound=1e-2, slack=1e-3)


# both kernels share these entry points: bound on the relative error against float64 for each
BOUND = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _kernel_pair(mod, dtype):
    """(forward(q, k, v, scale) -> (out, lse), backward(g, q, k, v, out, lse, scale, dq, dk, dv)) of the kernel for dtype."""
    if dtype == torch.float32:
        return mod.attention_fwd_f32, mod.attention_backward_f32
    return mod.attention_fwd_bf16, lambda *a: mod.attention_backward_bf16(*a, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_fused_qkv_entry_writes_one_gradient_and_zero_for_tokens_without_a_query(mod, dtype):
    gen = torch.Generator().manual_seed(1)
    B, N, H, d, n = 2, 37, 2, 32, 5
    base = torch.randn(B, N, 3, H, d, generator=gen).to(dtype)
    g = torch.randn(B, n, H * d, generator=gen).to(dtype)
    qkv = base.clone().requires_grad_(True)
    out = cpu_kernels.attention_qkv_train(qkv, d ** -0.5, queries=n)
    assert out.shape == (B, n, H * d) and out.dtype == dtype
    out.backward(g)
    assert qkv.grad.is_contiguous() and qkv.grad.shape == qkv.shape
    assert torch.all(qkv.grad[:, n:, 0] == 0)  # no query for these tokens: no gradient through q
    ref = base.double().requires_grad_(True)
    q, k, v = ref.permute(2, 0, 3, 1, 4).unbind(0)
    r = ((q[:, :, :n] @ k.transpose(-1, -2)) * d ** -0.5).softmax(-1) @ v
    r.transpose(1, 2).reshape(B, n, H * d).backward(g.double())
    assert rel(out.detach(), r.detach().transpose(1, 2).reshape(B, n, H * d)) < BOUND[dtype]
    assert rel(qkv.grad, ref.grad) < BOUND[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_does_not_depend_on_the_thread_count(mod, dtype):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (t.to(dtype) for t in _qkv(4, 3, 70, 70, 64, gen))
    g = torch.randn(4, 70, 192, generator=gen).to(dtype)
    forward, backward = _kernel_pair(mod, dtype)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            o, lse = forward(q, k, v, 0.125)
            grads = [torch.empty_like(t) for t in (q, k, v)]
            backward(g, q, k, v, o, lse, 0.125, *grads)
            results.append([o, lse, *grads])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_kernel_refuses_a_second_derivative(mod):
    q, k, v = (t.detach().requires_grad_(True) for t in _qkv(1, 1, 8, 8, 32, torch.Generator().manual_seed(3)))
    out = cpu_kernels.attention_train(q, k, v, 0.2)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="twice|once_differentiable|double"):
        gq.sum().backward()


def test_bad_arguments_fail_with_a_clear_message(mod):
    q, k, v = _qkv(1, 2, 8, 8, 32, torch.Generator().manual_seed(4))
    with pytest.raises(RuntimeError, match="head dim must be a multiple of 32"):
        mod.attention_fwd_bf16(q[..., :16], k[..., :16], v[..., :16], 0.2)
    o, lse = mod.attention_fwd_bf16(q, k, v, 0.2)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    with pytest.raises(RuntimeError, match="lse: float32"):
        mod.attention_backward_bf16(o, q, k, v, o, lse[:, :1], 0.2, *grads, 0)
    with pytest.raises(RuntimeError, match="dq, dk, dv"):
        mod.attention_backward_bf16(o, q, k, v, o, lse, 0.2, grads[0].float(), grads[1], grads[2], 0)


ATTENTION_BACKWARDS = {"_QKVAttentionBackward", "_AttentionBackward"}


@pytest.mark.parametrize("name, used", [("vit_ti16", "_QKVAttentionBackward"), ("cvt_tiny", "_AttentionBackward")])
def test_models_train_through_the_kernel_and_follow_pytorch(mod, name, used, grad_fn_names):
    torch.manual_seed(0)
    base = create_model(name, num_classes=5, img_size=64).train().to(torch.bfloat16)
    with_k, without = copy.deepcopy(base), copy.deepcopy(base)
    fast.use_cpu_kernels(with_k, True)
    fast.use_cpu_kernels(without, False)
    x = torch.randn(2, 3, 64, 64).to(torch.bfloat16)
    y = torch.tensor([1, 3])
    losses, grads = [], []
    for m in (with_k, without):
        loss = F.cross_entropy(m(x).float(), y)
        assert grad_fn_names(loss) & ATTENTION_BACKWARDS == ({used} if m is with_k else set())
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.float().flatten() for p in m.parameters()]))
    assert abs(losses[0] - losses[1]) < 2e-2 * max(1.0, abs(losses[1]))
    assert F.cosine_similarity(grads[0], grads[1], dim=0).item() > 0.99


def test_the_kernel_is_not_used_where_it_does_not_apply(mod, grad_fn_names):
    x = torch.randn(2, 10, 64).to(torch.bfloat16).requires_grad_(True)
    for attn, expect in [(Attention(64, num_heads=2), True),     # head dim 32
                         (Attention(64, num_heads=4), False),    # head dim 16: PyTorch's kernels
                         (Attention(64, num_heads=2, attn_drop=0.1), False)]:  # attention dropout
        attn = attn.to(torch.bfloat16).train()
        fast.use_cpu_kernels(attn, True)
        out, _ = attn(x)
        assert bool(grad_fn_names(out) & ATTENTION_BACKWARDS) == expect
    attn = Attention(64, num_heads=2).to(torch.bfloat16).train()
    fast.use_cpu_kernels(attn, True)
    out, probs = attn(x, return_attn=True)  # the probabilities asked for: the explicit path
    assert probs is not None and not grad_fn_names(out) & ATTENTION_BACKWARDS
    with torch.no_grad():  # inference: the inference kernel, no autograd
        assert attn(x)[0].grad_fn is None
    with fast.reference_mode():  # reference mode turns every fast path off
        assert not grad_fn_names(attn(x)[0]) & ATTENTION_BACKWARDS
