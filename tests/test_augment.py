"""BatchTransform: shapes, dtypes and normalisation; flips, pad-and-crop, mixup, cutmix and label
smoothing checked against independent computations; reproducibility from a seed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitlab.data import AugmentConfig, BatchTransform
from vitlab.errors import ConfigError

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def batch(b=8, c=3, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=g), torch.arange(b) % 5


def norm(x_uint8):
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x_uint8.float() / 255 - m) / s


def test_eval_transform_normalises_resizes_and_is_deterministic():
    x, y = batch()
    same = BatchTransform(AugmentConfig(16), MEAN, STD, 5, train=False)
    out, t = same(x, y)
    assert out.dtype == torch.float32 and t.dtype == torch.int64 and torch.equal(t, y)
    torch.testing.assert_close(out, norm(x), rtol=0, atol=1e-6)
    up = BatchTransform(AugmentConfig(24), MEAN, STD, 5, train=False)
    state = torch.get_rng_state()
    a, _ = up(x, y)
    b, _ = up(x, y)
    assert a.shape == (8, 3, 24, 24) and torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())  # eval draws no random numbers
    # A constant image stays that constant through the resize (values, not just shapes).
    const = torch.full((1, 3, 16, 16), 200, dtype=torch.uint8)
    torch.testing.assert_close(up(const, y[:1])[0], norm(const)[..., :1, :1].expand(1, 3, 24, 24))
    # Shrinking is antialiased: a 1-pixel checkerboard averages to grey instead of aliasing.
    checker = ((torch.arange(16).view(16, 1) + torch.arange(16)) % 2 * 255).to(torch.uint8).expand(1, 3, 16, 16)
    down = BatchTransform(AugmentConfig(4), MEAN, STD, 5, train=False)(checker, y[:1])[0]
    grey = norm(torch.full((1, 3, 1, 1), 127.5))
    torch.testing.assert_close(down, grey.expand(1, 3, 4, 4), atol=0.05, rtol=0)


def test_train_without_augmentation_is_plain_normalisation():
    x, y = batch()
    out, t = BatchTransform(AugmentConfig(16), MEAN, STD, 5, train=True)(x, y)
    torch.testing.assert_close(out, norm(x), rtol=0, atol=1e-6)
    assert t.dtype == torch.int64 and torch.equal(t, y)


def test_hflip_gives_each_image_or_its_mirror():
    x, y = batch(b=32)
    out, _ = BatchTransform(AugmentConfig(16, hflip=True), MEAN, STD, 5, True)(x, y, torch.Generator().manual_seed(1))
    ref = norm(x)
    same = (out - ref).abs().flatten(1).amax(1) < 1e-5
    mirrored = (out - ref.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()


def test_pad_crop_is_a_window_of_the_zero_padded_image():
    x, y = batch(b=12, h=8, w=8)
    p = 2
    out, _ = BatchTransform(AugmentConfig(8, pad_crop=p), MEAN, STD, 5, True)(x, y, torch.Generator().manual_seed(3))
    padded = F.pad(x.float() / 255, (p, p, p, p))  # zero padding before normalisation (black border)
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    offsets = set()
    for i in range(12):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.allclose(out[i], (padded[i, :, dy:dy + 8, dx:dx + 8] - m) / s, atol=1e-5)]
        assert hits, f"image {i} is not a crop of its padded input"
        offsets.add(hits[0])
    assert len(offsets) > 3  # offsets vary across the batch


@pytest.mark.parametrize("c", [3, 1])
def test_random_resized_crop_and_randaugment_shapes_and_range(c):
    x, y = batch(b=8, c=c, h=20, w=20)
    mean, std = MEAN[:c], STD[:c]
    cfg = AugmentConfig(12, random_resized_crop=True, rrc_scale=(0.3, 1.0), hflip=True, randaugment=(2, 9),
                        randaugment_group=4)
    for seed in range(3):  # several op draws (grey images leave out the RGB-only 'color' op)
        out, t = BatchTransform(cfg, mean, std, 5, True)(x, y, torch.Generator().manual_seed(seed))
        assert out.shape == (8, c, 12, 12) and out.dtype == torch.float32 and t.dtype == torch.int64
        m, s = torch.tensor(mean).view(1, c, 1, 1), torch.tensor(std).view(1, c, 1, 1)
        # pixels stay in [0, 1] before normalising
        assert bool(((out >= -m / s - 1e-5) & (out <= (1 - m) / s + 1e-5)).all())
    plain = BatchTransform(AugmentConfig(12), mean, std, 5, True)(x, y)[0]
    assert not torch.allclose(out, plain, atol=1e-3)


def test_mixup_targets_are_the_convex_combination():
    x, y = batch(b=6)
    y = torch.tensor([0, 1, 2, 3, 4, 1])  # every image's partner (reversed batch) has another label
    eps, k = 0.1, 5
    tr = BatchTransform(AugmentConfig(16, mixup_alpha=0.4, label_smoothing=eps), MEAN, STD, k, True)
    out, t = tr(x, y, torch.Generator().manual_seed(7))
    assert t.shape == (6, k) and t.dtype == torch.float32
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    smooth = F.one_hot(y, k).float() * (1 - eps) + eps / k
    lam = ((t[0, y[0]] - smooth[5, y[0]]) / (smooth[0, y[0]] - smooth[5, y[0]])).item()
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(t, lam * smooth + (1 - lam) * smooth.flip(0))
    torch.testing.assert_close(out, lam * norm(x) + (1 - lam) * norm(x).flip(0), atol=1e-5, rtol=0)


def test_cutmix_area_equals_label_weight():
    b, k = 6, 6
    # Constant images with distinct values: each pixel tells which image it came from.
    x = torch.arange(b, dtype=torch.uint8).mul(40).view(b, 1, 1, 1).expand(b, 3, 16, 16).contiguous()
    y = torch.arange(b)
    tr = BatchTransform(AugmentConfig(16, cutmix_alpha=1.0), MEAN, STD, k, True)
    seen_partial = False
    for seed in range(6):
        out, t = tr(x, y, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(t.sum(1), torch.ones(b))
        ref = norm(x)
        for i in range(b):
            from_partner = ((out[i] - ref[b - 1 - i]).abs().amax(0) < 1e-5).float().mean().item()
            from_self = ((out[i] - ref[i]).abs().amax(0) < 1e-5).float().mean().item()
            assert from_self + from_partner == pytest.approx(1.0)
            assert t[i, y[i]].item() == pytest.approx(from_self, abs=1e-6)
            assert t[i, y[b - 1 - i]].item() == pytest.approx(from_partner, abs=1e-6)
            seen_partial |= 0 < from_partner < 1
    assert seen_partial


def test_label_smoothing_alone():
    x, y = batch()
    _, t = BatchTransform(AugmentConfig(16, label_smoothing=0.2), MEAN, STD, 5, True)(x, y)
    expected = torch.full((8, 5), 0.2 / 5)
    expected[torch.arange(8), y] = 0.8 + 0.2 / 5
    torch.testing.assert_close(t, expected)
    # Eval keeps hard labels whatever the training config says.
    _, te = BatchTransform(AugmentConfig(16, label_smoothing=0.2, mixup_alpha=1.0), MEAN, STD, 5, False)(x, y)
    assert te.dtype == torch.int64


def test_reproducible_from_generator_or_global_rng():
    x, y = batch(b=8, h=20, w=20)
    cfg = AugmentConfig(16, random_resized_crop=True, hflip=True, randaugment=(2, 9), mixup_alpha=0.8,
                        cutmix_alpha=1.0, label_smoothing=0.1, randaugment_group=4)
    tr = BatchTransform(cfg, MEAN, STD, 5, True)
    state = torch.get_rng_state()
    a = tr(x, y, torch.Generator().manual_seed(123))
    b = tr(x, y, torch.Generator().manual_seed(123))
    c = tr(x, y, torch.Generator().manual_seed(124))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert torch.equal(state, torch.get_rng_state())  # a generator leaves the global RNG alone
    # Without a generator: one draw from the global RNG, so restoring its state replays the batch.
    torch.manual_seed(5)
    d = tr(x, y)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    torch.randint(0, 2**63 - 1, (1,))
    assert torch.equal(after, torch.get_rng_state())
    torch.manual_seed(5)
    e = tr(x, y)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


def test_config_validation():
    with pytest.raises(ConfigError, match="randaugment"):
        AugmentConfig(32, randaugment=(2, 40))
    with pytest.raises(ConfigError, match="label_smoothing"):
        AugmentConfig(32, label_smoothing=1.0)
    with pytest.raises(ConfigError, match="rrc_scale"):
        AugmentConfig(32, rrc_scale=(0.5, 0.1))
    with pytest.raises(ConfigError, match="unknown augmentation option.*Did you mean: mixup_alpha"):
        AugmentConfig.from_dict({"img_size": 32, "mixup": 0.2})
    cfg = AugmentConfig.from_dict({"img_size": [32, 24], "randaugment": [2, 9], "rrc_scale": [0.08, 1]})
    assert cfg.img_size == (32, 24) and cfg.randaugment == (2, 9.0)
    with pytest.raises(ConfigError, match="channels"):
        BatchTransform(AugmentConfig(8), (0.5,), (0.5,), 10, True)(batch()[0], batch()[1])
