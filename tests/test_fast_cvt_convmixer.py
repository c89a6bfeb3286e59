"""Fast paths of CvT and ConvMixer compute the same function as the float32 reference.

Every fast path (BatchNorm folded on the fly, fused oneDNN MLP in row chunks, float32 strided
depthwise convs in bf16 training, dense projection gradients, fused drop-path add, explicit
training attention, ConvMixer's fused conv + activation + BatchNorm) is compared with the
plain float32 model, and with the same bf16 model run through the plain code
(`fast.reference_mode()`): the fast path must be within bf16 tolerance of float32 and no
less accurate than the plain bf16 path.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vitlab.accel import ops as fast

from vitlab.accel import accelerate
from vitlab.models import create_model as _create_plain


def create_model(*args, **kwargs):
    """The registry's model with vitlab.accel's modules swapped in: these tests check the fast paths."""
    return accelerate(_create_plain(*args, **kwargs))
from vitlab.models import convmixer as convmixer_mod
from vitlab.models import cvt as cvt_mod
from vitlab.accel import modules as accel_mod


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def _randomize(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (so a wrong fold shows), sharper
    attention and a class token far from zero."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
            m.bias.copy_(0.3 * torch.randn(m.num_features, generator=g))
        elif isinstance(m, nn.LayerNorm):
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    for name, p in model.named_parameters():
        if name.endswith("cls_token"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith(("proj_q.weight", "proj_k.weight")):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _cvt(seed=0, **kw):
    torch.manual_seed(seed)
    # cvt_tiny with a class token in the last stage; 32 px gives 16/8/4 token grids
    model = create_model("cvt_tiny", num_classes=7, img_size=32, **kw)
    _randomize(model)
    return model


def _cvt_cl_bf16(model: nn.Module) -> nn.Module:
    return model.to(torch.bfloat16).to(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- CvT inference
def test_eval_bn_folding_on_the_fly_is_exact_in_float32():
    model = _cvt().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = model(x)
        with fast.reference_mode():  # conv then BatchNorm module, as written
            want = model(x)
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_optimized_inference_matches_float32_reference_and_intermediates():
    ref = _cvt().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
        model = fast.optimize_for_inference(copy.deepcopy(ref), "bf16")
        got = model(x)
        inter = model.forward_intermediates(x)
        with fast.reference_mode():
            plain_bf16 = model(x)
    assert got.dtype == torch.bfloat16
    err, plain_err = _rel(got, want), _rel(plain_bf16, want)
    assert err < 3e-2, err
    assert err < 1.5 * plain_err + 5e-3, (err, plain_err)
    # the explicit-attention path (probabilities returned) computes the same logits
    assert _rel(inter["logits"], got) < 2e-2
    assert len(inter["attentions"]) == sum(len(s.blocks) for s in ref.stages)
    for a in inter["attentions"]:
        torch.testing.assert_close(a.float().sum(-1), torch.ones(a.shape[:-1]), atol=2e-2, rtol=0)
    # and the float32 model's probabilities match the bf16 ones: within bf16's reach, and no
    # further from them than plain bf16 (the same weights, PyTorch's own operators) is. A fixed
    # bound alone failed on a CPU without AMX, where PyTorch's bf16 kernels round differently.
    with torch.no_grad():
        ref_attn = ref.forward_intermediates(x)["attentions"]
        with fast.reference_mode():
            plain_attn = model.forward_intermediates(x)["attentions"]
    for a, p, b in zip(inter["attentions"], plain_attn, ref_attn):
        err, plain_err = (a.float() - b).abs().max(), (p.float() - b).abs().max()
        assert err < 5e-2, err
        assert err < 1.5 * plain_err + 5e-3, (err, plain_err)


def test_fused_mlp_in_row_chunks_equals_plain_mlp(monkeypatch, native_bf16):
    torch.manual_seed(0)
    blk = accelerate(cvt_mod.CvTBlock(32, 2).eval())
    _randomize(blk)
    x = torch.randn(3, 1 + 36, 32)
    with torch.no_grad():
        want = blk(x, (6, 6), 1)[0]
        blk_b = copy.deepcopy(blk).to(torch.bfloat16)
        xb = x.bfloat16()
        h = blk_b.norm2(xb)
        m = blk_b.mlp
        assert fast.mlp_inference_ok(m.fc1, m.fc2, m.act, h)
        whole = fast.mlp_inference(m.fc1, m.fc2, h, xb)
        monkeypatch.setattr(fast, "MLP_CHUNK_BYTES", 1000)  # many chunks of rows
        chunked = fast.mlp_inference(m.fc1, m.fc2, h, xb)
        with fast.reference_mode():
            plain = xb + blk_b.mlp(h)
        got = blk_b(xb, (6, 6), 1)[0]
    assert torch.equal(whole, chunked)  # same products row by row
    assert _rel(whole, plain) < 1e-2
    assert _rel(got, want) < 2e-2


def test_explicit_and_fused_attention_give_equal_outputs_and_grads(monkeypatch):
    monkeypatch.setattr(fast, "MATMUL_TRAIN_DTYPES", (torch.float32,))  # float32 here: tight tolerances
    torch.manual_seed(0)
    attn = accelerate(cvt_mod.ConvAttention(32, 2).train())
    x = torch.randn(2, 1 + 64, 32, requires_grad=True)
    outs, grads = [], []
    for limit in (0, 10_000):  # 0: fused SDPA always; 10_000: explicit products in training
        accel_mod.EXPLICIT_TRAIN_MAX_KEYS = limit
        try:
            out, _ = attn(x, (8, 8), 1)
            g, = torch.autograd.grad(out.square().sum(), x)
        finally:
            accel_mod.EXPLICIT_TRAIN_MAX_KEYS = 256
        outs.append(out.detach())
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- CvT training
def _train_step(model, x, y, seed):
    torch.manual_seed(seed)  # same drop-path masks
    loss = nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    return loss.detach()


def test_bf16_training_fast_path_matches_float32_gradients_and_bn_statistics():
    ref = _cvt(drop_path_rate=0.0).train()
    fast_model = _cvt_cl_bf16(copy.deepcopy(ref))
    plain_model = copy.deepcopy(fast_model)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 3, 5, 6])
    want = _train_step(ref, x, y, 0)
    got = _train_step(fast_model, x.bfloat16().contiguous(memory_format=torch.channels_last), y, 0)
    with fast.reference_mode():
        _train_step(plain_model, x.bfloat16().contiguous(memory_format=torch.channels_last), y, 0)
    assert abs(got.item() - want.item()) < 2e-2 * abs(want.item())
    params = dict(ref.named_parameters())
    plain = dict(plain_model.named_parameters())
    worst = []
    for name, p in fast_model.named_parameters():
        w = params[name].grad
        if w.norm() < 1e-4:
            # e.g. the key biases: softmax ignores a shift shared by all keys, so their true
            # gradient is 0 and what is left is rounding noise in any precision
            continue
        err, plain_err = _rel(p.grad, w), _rel(plain[name].grad, w)
        worst.append(err)
        assert err < 1.5 * plain_err + 3e-2, (name, err, plain_err)
    assert sorted(worst)[len(worst) // 2] < 0.1 and max(worst) < 0.3, worst
    # BatchNorm running statistics (k/v projections are computed in float32 and copied back
    # into the bf16 buffers) move exactly as the reference's do, up to bf16 rounding
    ref_bn = {n: m for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for name, m in fast_model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            r = ref_bn[name]
            torch.testing.assert_close(m.running_mean.float(), r.running_mean, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(m.running_var.float(), r.running_var, atol=2e-2, rtol=2e-2)
            assert int(m.num_batches_tracked) == int(r.num_batches_tracked) == 1


def test_float32_training_fast_paths_are_exact():
    """In float32 the fast paths (dense gradients, fused drop-path add, explicit attention)
    compute the same numbers as the plain code, drop path included (same masks)."""
    model = _cvt(drop_path_rate=0.3).train()
    plain = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([1, 2, 3, 4])
    a = _train_step(model, x, y, 5)
    with fast.reference_mode():
        b = _train_step(plain, x, y, 5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    pp = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, pp[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_drop_path_add_is_x_plus_drop_path():
    blk = accelerate(cvt_mod.CvTBlock(16, 1, drop_path=0.5).train())
    x, y = torch.randn(64, 5, 16), torch.randn(64, 5, 16)
    torch.manual_seed(3)
    got = blk._drop_path_add(x, y)
    torch.manual_seed(3)
    want = x + blk.drop_path(y)
    torch.testing.assert_close(got, want)
    dropped = (got - x).abs().sum(dim=(1, 2)) == 0
    assert 10 < int(dropped.sum()) < 54  # about half the samples lose the branch


def test_dense_grad_makes_channels_last_gradient_dense():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = accel_mod._DenseGrad.apply(x)
    big = torch.randn(2, 21, 3)  # a gradient that is a slice of a larger tensor
    g = big[:, 1:].reshape(2, 4, 5, 3).permute(0, 3, 1, 2)
    assert not g.is_contiguous(memory_format=torch.channels_last)
    seen = []
    x.register_hook(lambda gr: seen.append(gr))
    y.backward(g)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(seen[0], g)


def test_strided_projection_in_float32_keeps_bn_buffers_in_their_dtype():
    proj = cvt_mod._conv_projection(8, 3, 2, True).train().to(torch.bfloat16)
    fmap = torch.randn(2, 8, 6, 6).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = accel_mod._dw_bn(proj, fmap)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 3, 3)
    assert proj.bn.running_mean.dtype == torch.bfloat16
    assert not torch.equal(proj.bn.running_mean, torch.zeros(8, dtype=torch.bfloat16))
    ref = copy.deepcopy(proj).float()
    want = ref.bn(ref.conv(fmap.detach().float()))
    assert _rel(out.detach(), want) < 1e-2


def test_fast_cvt_equals_hf_after_conversion_in_bf16():
    from transformers import CvtConfig, CvtForImageClassification

    torch.manual_seed(0)
    hf = CvtForImageClassification(CvtConfig(num_labels=5, embed_dim=[16, 32, 48], num_heads=[1, 2, 3],
                                             depth=[1, 2, 3])).eval()
    model = cvt_mod.convert_hf_cvt(hf)
    _randomize(model)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.3)
    hf.load_state_dict({**hf.state_dict(), **{k: v for k, v in _to_hf(model, hf).items()}})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = hf(pixel_values=x).logits
        got = fast.optimize_for_inference(model, "bf16")(x)
    assert want.std() > 0.1
    assert _rel(got, want) < 3e-2


def _to_hf(model, hf) -> dict:
    """vitlab state -> HF keys (inverse of the conversion's key map) for the randomised tensors."""
    key_map = cvt_mod._hf_key_map(model, "cvt.")
    key_map.update({"norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias",
                    "head.weight": "classifier.weight", "head.bias": "classifier.bias"})
    sd = model.state_dict()
    return {key_map[k]: v.clone() for k, v in sd.items() if k in key_map}


# ----------------------------------------------------------------------------- ConvMixer
def _convmixer(act="relu", seed=0):
    torch.manual_seed(seed)
    model = create_model("convmixer_256_8", num_classes=5, img_size=32, act=act, dim=64, depth=3, kernel_size=7)
    _randomize(model)
    return model.eval()


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_convmixer_fused_inference_matches_float32(act):
    from vitlab.accel import caps

    ref = _convmixer(act)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
        model = fast.optimize_for_inference(copy.deepcopy(ref), "bf16")
        with torch.profiler.profile() as prof:
            got = model(x)
        with fast.reference_mode():
            plain = model(x)
    names = {e.name for e in prof.events()}
    if caps.bf16_native("cpu"):
        assert "mkldnn::_convolution_pointwise" in names  # the fused path ran ...
        assert not any("batch_norm" in n for n in names)  # ... with no BatchNorm kernel left
    else:  # bf16 emulated: oneDNN's fused bf16 primitive cannot run; the plain layers do
        assert "mkldnn::_convolution_pointwise" not in names
    assert want.std() > 0.1
    err, plain_err = _rel(got, want), _rel(plain, want)
    assert err < 3e-2, err
    assert err < 1.5 * plain_err + 5e-3, (err, plain_err)


def test_convmixer_layer_fused_equals_definition_on_random_statistics(native_bf16):
    torch.manual_seed(0)
    layer = accelerate(convmixer_mod.ConvMixerLayer(32, 5, nn.GELU).eval())
    _randomize(layer, seed=4)
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        # the paper's definition written out independently
        h = x + layer.dw_norm(nn.functional.gelu(layer.dw(x)))
        want = layer.pw_norm(nn.functional.gelu(layer.pw(h)))
        lb = copy.deepcopy(layer).to(torch.bfloat16).to(memory_format=torch.channels_last)
        xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
        assert accel_mod._fused_ok(xb, lb.dw, lb.dw_norm)
        got = lb._forward_fused(xb)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert _rel(got, want) < 2e-2


def test_convmixer_fused_path_not_used_in_training_or_float32():
    model = _convmixer().train()
    x = torch.randn(2, 3, 32, 32)
    with torch.profiler.profile() as prof:
        model(x).sum().backward()
    assert "mkldnn::_convolution_pointwise" not in {e.name for e in prof.events()}
    assert model.blocks[0].dw.weight.grad is not None


def test_convmixer_bf16_training_runs_depthwise_in_float32_with_matching_gradients(monkeypatch):
    torch.manual_seed(0)
    # 8 channels: vitlab's bf16 depthwise kernel (16-channel blocks) does not apply, float32 does
    ref = accelerate(convmixer_mod.ConvMixerLayer(8, 5, nn.GELU).train())
    _randomize(ref, seed=5)
    lb = copy.deepcopy(ref).to(torch.bfloat16).to(memory_format=torch.channels_last)
    plain = copy.deepcopy(lb)
    x = torch.randn(2, 8, 9, 9)
    xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
    assert fast.depthwise_conv_f32_pays(xb, lb.dw) and not fast.depthwise_conv_f32_pays(x, ref.dw)
    # stride-1 3x3 convs stay in bf16 (oneDNN's fast path for them)
    assert not fast.depthwise_conv_f32_pays(xb, nn.Conv2d(8, 8, 3, padding=1, groups=8).bfloat16())
    assert fast.depthwise_conv_f32_pays(xb, nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8).bfloat16())
    ref(x).square().sum().backward()
    seen = []
    real = fast.conv2d_f32
    monkeypatch.setattr(fast, "conv2d_f32", lambda x, conv: seen.append(x.dtype) or real(x, conv))
    out = lb(xb)
    out.float().square().sum().backward()
    assert seen == [torch.bfloat16] and out.dtype == torch.bfloat16  # the float32 path ran, bf16 out
    with fast.reference_mode():
        plain(xb).float().square().sum().backward()
    for (name, p), q, r in zip(lb.named_parameters(), plain.parameters(), ref.parameters()):
        err, plain_err = _rel(p.grad, r.grad), _rel(q.grad, r.grad)
        assert err < 1.5 * plain_err + 3e-2, (name, err, plain_err)
