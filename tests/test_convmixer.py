"""ConvMixer against an independent reference written from the paper's description, parameter
counts against the paper's table, the analysis accessors and the promised errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import ConfigError
from vitlab.flops import count_params
from vitlab.models import create_model, list_models
from vitlab.models.convmixer import ConvMixer


def reference_convmixer(h: int, depth: int, kernel_size: int, patch_size: int, n_classes: int, in_chans: int,
                        act: type[nn.Module]) -> nn.Sequential:
    """The paper's listing, as plain nn.Sequential:
    patch conv (kernel = stride = p) -> act -> BN; depth x [Residual(depthwise conv k, groups=h,
    padding 'same' -> act -> BN), pointwise 1x1 -> act -> BN]; GAP; flatten; linear."""

    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x) + x

    return nn.Sequential(
        nn.Conv2d(in_chans, h, kernel_size=patch_size, stride=patch_size), act(), nn.BatchNorm2d(h),
        *[nn.Sequential(
            Residual(nn.Sequential(nn.Conv2d(h, h, kernel_size, groups=h, padding="same"), act(),
                                   nn.BatchNorm2d(h))),
            nn.Conv2d(h, h, kernel_size=1), act(), nn.BatchNorm2d(h),
        ) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(h, n_classes),
    )


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial BN affine parameters and running statistics, so eval mode is a real test."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
            m.running_mean.normal_(0.0, 0.5)
            m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("act,ref_act,dim,depth,p,k,c,size", [
    ("gelu", nn.GELU, 32, 3, 2, 5, 3, 16),
    ("relu", nn.ReLU, 24, 2, 3, 3, 1, 12),
    ("gelu", nn.GELU, 16, 2, 4, 9, 3, 20),  # kernel larger than the 5x5 map: 'same' padding still holds
])
def test_matches_paper_reference(act, ref_act, dim, depth, p, k, c, size):
    model = ConvMixer(dim=dim, depth=depth, patch_size=p, kernel_size=k, act=act, num_classes=7, in_chans=c,
                      img_size=size)
    _randomise_norms(model)
    ref = reference_convmixer(dim, depth, k, p, 7, c, ref_act)
    src, dst = model.state_dict(), ref.state_dict()
    assert len(src) == len(dst)
    # copy by position (both follow the paper's order); shapes must agree one for one
    with torch.no_grad():
        for (ks, vs), (kd, vd) in zip(src.items(), dst.items()):
            assert vs.shape == vd.shape, (ks, kd)
            vd.copy_(vs)
    x = torch.randn(4, c, size, size)
    for train in (False, True):  # running statistics, then batch statistics
        model.train(train)
        ref.train(train)
        with torch.no_grad():
            diff = (model(x) - ref(x)).abs().max().item()
        assert diff < 1e-5, (train, diff)
    assert count_params(model) == count_params(ref)


@pytest.mark.parametrize("name,paper_m", [("convmixer_1536_20", 51.6), ("ConvMixer-768/32", 21.1)])
def test_param_counts_match_paper(name, paper_m):
    with torch.device("meta"):
        m = create_model(name)
    n = count_params(m) / 1e6
    assert abs(n - paper_m) / paper_m < 0.02, f"{name}: {n:.2f}M vs paper {paper_m}M"


def test_variants_follow_the_paper():
    with torch.device("meta"):
        big = create_model("ConvMixer-1536/20")
        mid = create_model("convmixer_768_32")
        small = create_model("ConvMixer-256/8")
    assert (big.dim, big.depth, big.patch_size, big.kernel_size, big.act) == (1536, 20, (7, 7), 9, "gelu")
    assert (mid.dim, mid.depth, mid.patch_size, mid.kernel_size, mid.act) == (768, 32, (7, 7), 7, "relu")
    assert isinstance(mid.blocks[0].dw_act, nn.ReLU) and isinstance(big.blocks[0].dw_act, nn.GELU)
    assert (small.dim, small.depth, small.patch_size, small.kernel_size) == (256, 8, (2, 2), 5)
    assert small.img_size == (32, 32) and small.grid_size == (16, 16)
    # depthwise: one k x k filter per channel; pointwise: 1x1 full mixing
    dw, pw = big.blocks[0].dw, big.blocks[0].pw
    assert dw.groups == 1536 and dw.weight.shape == (1536, 1, 9, 9) and pw.weight.shape == (1536, 1536, 1, 1)


@pytest.mark.parametrize("name", list_models("convmixer"))
def test_every_variant_forward_backward_small(name):
    with torch.device("meta"):
        full = create_model(name)
    p = full.patch_size[0]
    size = 4 * p  # a 4x4 patch grid
    # the two ImageNet-sized variants run with 2 layers here (same width, kernel, patch, activation)
    overrides = {} if name == "convmixer_256_8" else {"depth": 2}
    m = create_model(name, num_classes=5, img_size=size, **overrides)
    x = torch.randn(2, 3, size, size)
    feats = m.forward_features(x)
    assert feats.shape == (2, m.dim, 4, 4)
    logits = m.forward_head(feats)
    assert logits.shape == (2, 5)
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.dim)
    F.cross_entropy(logits, torch.tensor([0, 4])).backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in m.parameters())


def test_channels_last_and_other_sizes():
    m = create_model("convmixer_256_8", num_classes=10, in_chans=1, img_size=28, depth=2).eval()
    _randomise_norms(m)
    x = torch.randn(3, 1, 28, 28)
    ref = m(x)
    m_cl = m.to(memory_format=torch.channels_last)
    out = m_cl(x.contiguous(memory_format=torch.channels_last))
    assert (out - ref).abs().max() < 1e-5
    # fully convolutional: any multiple of the patch size runs (16x16 -> 8x8 map)
    assert m.forward_features(torch.randn(1, 1, 16, 16)).shape == (1, 256, 8, 8)


def test_analysis_accessors_and_classifier_reset():
    m = create_model("convmixer_256_8", num_classes=10, depth=3)
    assert m.patch_embed_weight.shape == (256, 3, 2, 2)
    assert m.patch_embed_weight is m.patch_embed.weight
    for layer in (0, 2, -1):
        assert m.depthwise_kernels(layer).shape == (256, 5, 5)
    # the accessor returns the live kernels: zeroing layer 1's kernels and bias removes that
    # layer's spatial branch, so its residual block reduces to BN(act(0)) + x
    with torch.no_grad():
        m.depthwise_kernels(1).zero_()
        m.blocks[1].dw.bias.zero_()
    m.eval()
    z = torch.randn(2, 256, 6, 6)
    blk = m.blocks[1]
    expected = blk.pw_norm(blk.pw_act(blk.pw(z + blk.dw_norm(torch.zeros_like(z)))))
    assert torch.allclose(blk(z), expected, atol=1e-6)
    m.reset_classifier(4)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 4) and torch.count_nonzero(m(x)) == 0
    m.reset_classifier(0)
    assert m(x).shape == (2, 256)
    assert m.no_weight_decay() == set()


def test_bad_configurations_raise_config_error():
    with pytest.raises(ConfigError, match="kernel_size=8 is even"):
        create_model("convmixer_256_8", kernel_size=8)
    with pytest.raises(ConfigError, match="larger than the image"):
        create_model("convmixer_1536_20", img_size=6)
    with pytest.raises(ConfigError, match="not divisible by the patch size 7"):
        create_model("convmixer_768_32", img_size=32)
    with pytest.raises(ConfigError, match="Did you mean: relu"):
        create_model("convmixer_256_8", act="rellu")
    with pytest.raises(ConfigError, match="depth"):
        create_model("convmixer_256_8", depth=0)
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("convmixer_512_8")
    with pytest.raises(ConfigError, match="no option"):
        create_model("convmixer_256_8", num_heads=4)
    m = create_model("convmixer_256_8", depth=1)
    with pytest.raises(ConfigError, match="in_chans=1"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ConfigError, match="not divisible by the patch size"):
        m(torch.randn(1, 3, 31, 31))
    with pytest.raises(ConfigError, match="out of range"):
        m.depthwise_kernels(1)


# ----------------------------------------------------------------------------- ablation switches
def _layer_input(dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, dim, 6, 6, generator=g)


def test_convmixer_residual_switch_removes_the_skip_connection():
    from vitlab.models.convmixer import ConvMixerLayer

    torch.manual_seed(0)
    on = ConvMixerLayer(8, 3, torch.nn.GELU).eval()
    off = ConvMixerLayer(8, 3, torch.nn.GELU, residual=False).eval()
    off.load_state_dict(on.state_dict())
    x = _layer_input()
    branch = on.dw_norm(on.dw_act(on.dw(x)))
    with torch.no_grad():
        torch.testing.assert_close(on(x), on.pw_norm(on.pw_act(on.pw(x + branch))))
        torch.testing.assert_close(off(x), on.pw_norm(on.pw_act(on.pw(branch))))


@pytest.mark.parametrize("norm", ["batch", "layer", "group", "none"])
def test_convmixer_norms_normalise_what_they_say(norm):
    from vitlab import create_model

    m = create_model("convmixer_256_8", num_classes=3, in_chans=1, img_size=8, dim=64, depth=2, norm=norm).train()
    assert m.norm == norm
    kinds = {type(mod).__name__ for mod in m.modules()}
    assert ("BatchNorm2d" in kinds) == (norm == "batch")
    x = torch.randn(4, 1, 8, 8) * 5 + 3
    y = m.stem(x)
    if norm == "layer":    # every position's channels: mean 0, variance 1
        torch.testing.assert_close(y.mean(1), torch.zeros_like(y.mean(1)), atol=1e-5, rtol=0)
        torch.testing.assert_close(y.var(1, unbiased=False), torch.ones_like(y.mean(1)), atol=1e-3, rtol=0)
    elif norm == "group":  # 32 groups of 2 channels over the image
        g = y.reshape(4, 32, -1)
        torch.testing.assert_close(g.mean(-1), torch.zeros(4, 32), atol=1e-5, rtol=0)
    elif norm == "batch":  # each channel over the batch and the image
        torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(64), atol=1e-5, rtol=0)
    else:
        assert torch.equal(y, m.patch_act(m.patch_embed(x)))


def test_convmixer_stochastic_depth_drops_the_residual_branch_per_sample():
    from vitlab import create_model
    from vitlab.train.config import TrainConfig

    m = create_model("convmixer_256_8", num_classes=3, in_chans=1, img_size=8, dim=16, depth=5,
                     **TrainConfig(drop_path=0.4).model_overrides())
    assert [b.drop_path.p for b in m.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    layer = m.blocks[-1]
    layer.drop_path.p = 0.5
    layer.train()
    x = torch.randn(400, 16, 4, 4)
    torch.manual_seed(0)
    with torch.no_grad():
        layer.dw_norm.eval(), layer.pw_norm.eval()        # fixed statistics, to read the branch back
        branch_in = layer.dw_norm(layer.dw_act(layer.dw(x)))
        seen = []                                         # the sum the pointwise conv saw
        h = layer.pw.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
        layer(x)
        h.remove()
    summed = seen[0]
    kept = torch.isclose(summed, x + 2 * branch_in, atol=1e-5).flatten(1).all(1)    # scaled by 1/keep
    dropped = torch.isclose(summed, x, atol=1e-6).flatten(1).all(1)
    assert bool((kept | dropped).all()) and 150 < int(dropped.sum()) < 250           # ~Binomial(400, 0.5)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.pw_norm(layer.pw_act(layer.pw(x + branch_in))))


def test_convmixer_switches_are_checked():
    from vitlab import create_model

    with pytest.raises(ConfigError, match="norm='lyer'.*layer"):
        create_model("convmixer_256_8", num_classes=3, in_chans=1, img_size=8, norm="lyer")
    with pytest.raises(ConfigError, match="residual=false"):
        create_model("convmixer_256_8", num_classes=3, in_chans=1, img_size=8, residual=False, drop_path_rate=0.1)
