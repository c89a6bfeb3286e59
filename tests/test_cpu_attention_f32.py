"""vitlab's float32 CPU attention with its backward (float32 training): output, log-sum-exp and
dq, dk, dv match the float64 reference within float32's error, at least as closely as PyTorch's
SDPA, for every branch of the kernel's blocking (its thread-count independence and the fused-qkv
entry are tested with the bf16 kernel's, in test_cpu_attention_training.py); models train through it
in float32 with the plain model's loss and gradients, only where it applies, and resume bit for bit."""
import copy

import pytest
import torch
import torch.nn.functional as F
from attention_reference import assert_as_close_as_pytorch, reference

from vitlab.accel import accelerate, kernels as cpu_kernels, ops as fast
from vitlab.models import create_model
from vitlab.models.layers import Attention


@pytest.fixture
def mod():
    """The compiled kernels (their float32 attention has no AMX variant, so unlike conftest's `mod`
    this runs once); skips with the reason where they cannot be built."""
    m = cpu_kernels.get()
    if m is None:
        pytest.skip(f"vitlab's CPU kernels are not available here: {cpu_kernels.unavailable_reason()}")
    return m


def _qkv(B, H, Nq, N, d, gen, strided=True):
    """float32 q (B, H, Nq, d), k, v (B, H, N, d): views of (B, N, 3, H, d) memory as the models'
    qkv projection gives them (strided), or contiguous."""
    if strided:
        qkv = torch.randn(B, max(Nq, N), 3, H, d, generator=gen)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q[:, :, :Nq], k[:, :, :N], v[:, :, :N]
    return tuple(torch.randn(B, H, n, d, generator=gen) for n in (Nq, N, N))


# every branch of the blocking: column blocks of 64, 32 and 16 (head dims 64, 96 = 64 + 32, 48 =
# 32 + 16, 16), row tails of every size, key counts that are and are not multiples of 16, Nq != N,
# more than one block of 256 query rows (300, 600), one query, one key
SHAPES = [(2, 3, 197, 197, 64), (2, 1, 50, 17, 32), (1, 2, 33, 50, 96), (1, 1, 300, 80, 48),
          (1, 2, 5, 197, 64), (2, 2, 16, 16, 16), (1, 1, 1, 1, 16), (1, 1, 600, 150, 64), (3, 1, 7, 35, 80)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [True, False])
def test_float32_kernel_matches_the_float64_reference(mod, shape, strided):
    B, H, Nq, N, d = shape
    gen = torch.Generator().manual_seed(Nq * 1000 + N)
    q, k, v = _qkv(B, H, Nq, N, d, gen, strided)
    scale = d ** -0.5
    g = torch.randn(B, H, Nq, d, generator=gen)
    out, lse, dq_ref, dk_ref, dv_ref = reference(q, k, v, scale, g)

    o, l2 = mod.attention_fwd_f32(q, k, v, scale)
    assert o.shape == (B, Nq, H * d) and o.dtype == torch.float32 and l2.shape == (B, H, Nq)
    assert (l2.double() - lse).abs().max().item() < 1e-5
    got = {"out": o.view(B, Nq, H, d).transpose(1, 2)}
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    mod.attention_backward_f32(g.transpose(1, 2).reshape(B, Nq, H * d).contiguous(), q, k, v, o, l2, scale, dq, dk, dv)
    got.update(dq=dq, dk=dk, dv=dv)
    # PyTorch's float32 SDPA against the same reference
    assert_as_close_as_pytorch(got, q, k, v, g, scale, (out, dq_ref, dk_ref, dv_ref),
                               lambda q, k, v, s: F.scaled_dot_product_attention(q, k, v, scale=s), bound=1e-5, slack=1e-6)


def test_float32_kernel_refuses_bad_arguments_with_a_clear_message(mod):
    q, k, v = _qkv(1, 2, 8, 8, 32, torch.Generator().manual_seed(4))
    with pytest.raises(RuntimeError, match="head dim must be a multiple of 16"):
        mod.attention_fwd_f32(q[..., :8], k[..., :8], v[..., :8], 0.2)
    with pytest.raises(RuntimeError, match="float32 q, k, v"):
        mod.attention_fwd_f32(q.double(), k.double(), v.double(), 0.2)
    o, lse = mod.attention_fwd_f32(q, k, v, 0.2)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    with pytest.raises(RuntimeError, match="lse: float32"):
        mod.attention_backward_f32(o, q, k, v, o, lse[:, :1], 0.2, *grads)
    with pytest.raises(RuntimeError, match="dq, dk, dv"):
        mod.attention_backward_f32(o, q, k, v, o, lse, 0.2, grads[0].bfloat16(), grads[1], grads[2])


ATTENTION_BACKWARDS = {"_QKVAttentionBackward", "_AttentionBackward"}


@pytest.mark.parametrize("name, used", [("vit_ti16", "_QKVAttentionBackward"), ("cvt_tiny", "_AttentionBackward")])
def test_float32_models_train_through_the_kernel_with_the_plain_models_gradients(mod, name, used, grad_fn_names):
    """The accelerated float32 model (no flag: `ops.f32_attention_kernel` decides) computes the plain
    model's loss and gradients, within float32 rounding."""
    torch.manual_seed(0)
    plain = create_model(name, num_classes=5, img_size=96, drop_path_rate=0.0).train()
    fastm = accelerate(copy.deepcopy(plain))
    x, y = torch.randn(2, 3, 96, 96), torch.tensor([1, 3])
    losses, grads = [], []
    for m in (fastm, plain):
        loss = F.cross_entropy(m(x), y)
        assert used in grad_fn_names(loss) if m is fastm else not grad_fn_names(loss) & ATTENTION_BACKWARDS
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert abs(losses[0] - losses[1]) < 1e-5 * max(1.0, abs(losses[1]))
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-4


def test_float32_kernel_is_used_only_where_it_applies(mod, grad_fn_names, monkeypatch):
    x = torch.randn(2, 40, 64, requires_grad=True)
    attn = accelerate(Attention(64, num_heads=2)).train()
    assert grad_fn_names(attn(x)[0]) & ATTENTION_BACKWARDS  # 40 keys, float32, training
    short = torch.randn(2, fast.F32_KERNEL_MIN_KEYS - 1, 64, requires_grad=True)
    assert not grad_fn_names(attn(short)[0]) & ATTENTION_BACKWARDS  # too few keys: SDPA
    assert not grad_fn_names(attn(x, return_attn=True)[0]) & ATTENTION_BACKWARDS  # probabilities asked for
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: its bf16 attention, not a float32 kernel
        assert not grad_fn_names(attn(x)[0]) & ATTENTION_BACKWARDS
    with torch.no_grad():
        assert attn(x)[0].grad_fn is None
    with fast.reference_mode():
        assert not grad_fn_names(attn(x)[0]) & ATTENTION_BACKWARDS
    dropped = accelerate(Attention(64, num_heads=2, attn_drop=0.1)).train()
    assert not grad_fn_names(dropped(x)[0]) & ATTENTION_BACKWARDS
    odd = accelerate(Attention(72, num_heads=6)).train()  # head dim 12: not a multiple of 16
    assert not grad_fn_names(odd(torch.randn(2, 40, 72, requires_grad=True))[0]) & ATTENTION_BACKWARDS


def test_without_the_kernels_float32_training_runs_sdpa_with_the_same_gradients(grad_fn_names, monkeypatch):
    """Where vitlab's kernels cannot be used (no AVX-512 BF16, no compiler, VITLAB_CPU_KERNELS=0: what
    CI's AVX2-capped run and ARM machines see) float32 training falls back to SDPA, same function."""
    monkeypatch.setattr(cpu_kernels, "get", lambda: None)
    x = torch.randn(2, 40, 64, requires_grad=True)
    plain = Attention(64, num_heads=2).train()
    fastm = accelerate(copy.deepcopy(plain))
    assert not fast.f32_attention_kernel(x, 40)
    out = fastm(x)[0]
    assert not grad_fn_names(out) & ATTENTION_BACKWARDS
    g = torch.randn_like(out)
    (gx_fast,) = torch.autograd.grad(out, x, g)
    (gx_plain,) = torch.autograd.grad(plain(x)[0], x, g)
    torch.testing.assert_close(gx_fast, gx_plain, rtol=1e-5, atol=1e-6)


def test_float32_training_through_the_kernel_resumes_bit_for_bit(mod, tmp_path, monkeypatch):
    """`vitlab train` in float32 on CPU runs the kernel (no flag) and a resumed run ends with the
    uninterrupted run's weights and losses, bit for bit (the kernel's sums do not depend on threads)."""
    from safetensors.torch import load_file

    from vitlab.train import checkpoint as ckpt
    from vitlab.train.config import TrainConfig
    from vitlab.train.engine import fit

    calls = []
    attention = cpu_kernels._QKVAttention.forward
    monkeypatch.setattr(cpu_kernels._QKVAttention, "forward",
                        staticmethod(lambda ctx, qkv, *a: calls.append(qkv.dtype) or attention(ctx, qkv, *a)))
    # digits at 12 px in patches of 2: 37 tokens, above F32_KERNEL_MIN_KEYS
    base = dict(out=str(tmp_path), epochs=2, batch_size=64, lr=3e-3, threads=1, tensorboard=False, progress=False,
                precision="fp32", img_size=12, model_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2})
    full = fit(TrainConfig(name="full", **base), verbose=False)
    assert calls and set(calls) == {torch.float32}
    part = fit(TrainConfig(name="part", max_steps=30, **base), verbose=False)
    rest = fit(TrainConfig(resume=str(part.run_dir)), verbose=False)
    a, b = (load_file(str(ckpt.resolve_checkpoint(r.run_dir)["weights"])) for r in (full, rest))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rest.step_losses == full.step_losses[30:]
