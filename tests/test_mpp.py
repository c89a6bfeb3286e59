"""Masked patch prediction: the corruption proportions, the three targets on hand-made
images, and that the objective trains the ViT, the [MASK] embedding and the head."""
from __future__ import annotations

import math

import pytest
import torch

from vitlab import ConfigError, create_model
from vitlab.studies.mpp import (KEPT_CLEAN, MASKED, RANDOMISED, UNCHANGED, MPPConfig, MPPHead, corrupt,
                                mpp_loss, mpp_targets)


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """|count - n p| within `sigmas` binomial standard deviations."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("rate", [0.5, 0.15])
def test_corruption_proportions(rate):
    B, N, D, draws = 32, 64, 8, 150
    g = torch.Generator().manual_seed(1)
    mask_token = torch.full((1, 1, D), 1000.0)  # far from every real token: unambiguous
    n_sel = round(rate * N)
    counts = torch.zeros(4, dtype=torch.long)
    per_position = torch.zeros(N)
    cross_image = 0
    for _ in range(draws):
        # distinct tokens, so a replacement can be traced to the token it was copied from
        tokens = torch.randn(B, N, D, generator=g)
        out, selected, kind = corrupt(tokens, mask_token, rate, 0.8, 0.1, generator=g)
        assert (selected.sum(1) == n_sel).all()            # the promised fraction of every image
        assert torch.equal(selected, kind != KEPT_CLEAN)
        per_position += selected.float().sum(0)
        counts += torch.bincount(kind.flatten(), minlength=4)
        # what each kind of token holds
        clean = (kind == KEPT_CLEAN) | (kind == UNCHANGED)
        assert torch.equal(out[clean], tokens[clean])
        assert (out[kind == MASKED] == 1000.0).all()
        rand = out[kind == RANDOMISED]  # (M, D): each equals some token of the batch
        same = (rand[:, None, :] == tokens.reshape(1, B * N, D)).all(-1)  # (M, B*N)
        assert (same.sum(1) == 1).all()
        src_image = same.float().argmax(1) // N
        own_image = torch.nonzero(kind == RANDOMISED)[:, 0]
        cross_image += int((src_image != own_image).sum())
    total_sel = draws * B * n_sel
    assert counts[MASKED] + counts[RANDOMISED] + counts[UNCHANGED] == total_sel
    assert _within(int(counts[MASKED]), total_sel, 0.8)
    assert _within(int(counts[RANDOMISED]), total_sel, 0.1)
    assert _within(int(counts[UNCHANGED]), total_sel, 0.1)
    # every position is equally likely to be selected (hypergeometric per image, here ~binomial)
    n_img = draws * B
    p = n_sel / N
    assert all(_within(int(c), n_img, p) for c in per_position)
    # random replacements come from the whole batch, not only the same image
    assert cross_image > 0.5 * counts[RANDOMISED]


def test_corruption_mix_is_an_option():
    tokens = torch.randn(16, 16, 4)
    _, selected, kind = corrupt(tokens, torch.zeros(1, 1, 4), 1.0, 0.0, 0.0, generator=torch.Generator().manual_seed(0))
    assert selected.all() and (kind == UNCHANGED).all()
    _, _, kind = corrupt(tokens, torch.zeros(1, 1, 4), 1.0, 1.0, 0.0)
    assert (kind == MASKED).all()
    with pytest.raises(ConfigError, match="sum"):
        MPPConfig(mask_prob=0.8, random_prob=0.3)
    with pytest.raises(ConfigError, match="color3bit"):
        MPPConfig(target="colour")


def _grey_image():
    """4x4 grey image, 2x2 patches; each patch has two intensity values with a hand-picked mean."""
    img = torch.zeros(1, 1, 4, 4)
    patches = {(0, 0): (0.0, 0.1), (0, 1): (0.2, 0.4), (1, 0): (0.55, 0.45), (1, 1): (0.9, 1.0)}
    for (r, c), (a, b) in patches.items():
        img[0, 0, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = torch.tensor([[a, b], [b, a]])
    return img


def test_color3bit_targets_grey_by_hand():
    # means 0.05, 0.3, 0.5, 0.95 -> 8 bins of width 1/8 -> levels 0, 2, 4, 7
    t = mpp_targets(_grey_image(), 2, "color3bit", bits=3)
    assert t.shape == (1, 4)
    assert t.tolist() == [[0, 2, 4, 7]]


def test_color3bit_targets_rgb_by_hand():
    # 4x4 RGB image, 2x2 patches; class = r_level * 64 + g_level * 8 + b_level
    img = torch.zeros(1, 3, 4, 4)
    colours = {0: (1.0, 0.0, 0.5), 1: (0.2, 0.7, 0.13), 2: (0.0, 0.0, 0.0), 3: (0.99, 0.99, 0.99)}
    for k, rgb in colours.items():
        r, c = divmod(k, 2)
        for ch in range(3):
            img[0, ch, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = rgb[ch]
    # make patch 1 non-uniform in red with the same mean 0.2: (0.1, 0.3)
    img[0, 0, 0, 2] = img[0, 0, 1, 3] = 0.1
    img[0, 0, 0, 3] = img[0, 0, 1, 2] = 0.3
    expected = [7 * 64 + 0 * 8 + 4,   # (1.0, 0.0, 0.5): levels 7, 0, 4
                1 * 64 + 5 * 8 + 1,   # (0.2, 0.7, 0.13): levels 1, 5, 1
                0,
                7 * 64 + 7 * 8 + 7]
    assert mpp_targets(img, 2, "color3bit").tolist() == [expected]
    head = MPPHead(16, 3, 2, MPPConfig())
    assert head.num_classes == 512 and head.head.out_features == 512


def test_patch4x4_targets_by_hand():
    # one grey 8x8 patch; the 4x4 downsized patch averages 2x2 blocks
    img = torch.zeros(1, 1, 8, 8)
    block_means = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 16 + 1 / 32  # bin centres
    for i in range(4):
        for j in range(4):
            m = block_means[i, j]
            img[0, 0, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = torch.tensor([[m - 0.01, m + 0.01], [m + 0.02, m - 0.02]])
    t = mpp_targets(img, 8, "patch4x4", bits=3)
    assert t.shape == (1, 1, 16)
    # level of block (i, j) = floor(mean * 8) = (4 i + j) // 2
    assert t[0, 0].tolist() == [(4 * i + j) // 2 for i in range(4) for j in range(4)]
    # RGB, two patches of 8x8 in a 8x16 image: 16 predictions of 512 colours each
    rgb = torch.rand(2, 3, 8, 16)
    t = mpp_targets(rgb, 8, "patch4x4")
    assert t.shape == (2, 2, 16) and t.min() >= 0 and t.max() < 512
    # independent check of one pixel: patch 1, downsized pixel (row 1, col 2)
    block = rgb[1, :, 2:4, 8 + 4:8 + 6].mean(dim=(1, 2))
    lv = (block * 8).floor().clamp(max=7).long()
    assert t[1, 1, 1 * 4 + 2].item() == lv[0] * 64 + lv[1] * 8 + lv[2]
    head = MPPHead(32, 3, 8, MPPConfig(target="patch4x4"))
    assert head(torch.zeros(5, 32)).shape == (5, 16, 512)


def test_l2_targets_are_the_flattened_patches():
    img = torch.rand(2, 3, 8, 12)
    norm = (img - 0.5) / 0.25
    t = mpp_targets(img, 4, "l2", images_normalized=norm)
    assert t.shape == (2, 6, 3 * 16)
    for b in range(2):
        for n in range(6):
            r, c = divmod(n, 3)
            assert torch.equal(t[b, n], norm[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(-1))


@pytest.mark.parametrize("target", ["color3bit", "patch4x4", "l2"])
def test_mpp_objective_trains_vit_mask_token_and_head(target):
    torch.manual_seed(0)
    model = create_model("vit_nano_p2", num_classes=3, in_chans=1, img_size=8, depth=2)
    head = MPPHead(model.embed_dim, 1, model.patch_size, MPPConfig(target=target, downsample=2))
    # images of one grey level each: a corrupted patch is predictable from the others
    pix = torch.rand(8, 1, 1, 1).expand(8, 1, 8, 8).contiguous()
    x = (pix - 0.5) / 0.5
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for step in range(40):
        loss, metrics = mpp_loss(model, head, x, pixel_mean=[0.5], pixel_std=[0.5], generator=g)
        if step == 0:
            first = loss.item()
            loss.backward()
            assert head.mask_token.grad.abs().sum() > 0
            assert model.patch_embed.proj.weight.grad.abs().sum() > 0
            assert model.head.weight.grad is None  # the classifier is not part of MPP
            opt.step()
            opt.zero_grad()
            continue
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert abs(metrics["mpp_frac_corrupted"] - 0.5) < 1e-6


def test_mpp_rejects_a_model_without_tokens():
    from vitlab.studies.mpp import check_mpp_model

    with pytest.raises(ConfigError, match="ViT"):
        check_mpp_model(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- through the engine
def _pretrain(tmp_path, *extra):
    from vitlab.cli import main

    rc = main(["pretrain", "--objective", "mpp", "--model", "vit_nano_p2", "--dataset", "digits", "--epochs", "1",
               "--batch-size", "128", "--out", str(tmp_path), "--name", "mpp", "progress=false", "tensorboard=false",
               "model_kwargs.depth=1", *extra])
    assert rc == 0
    return tmp_path / "mpp"


def test_pretrain_command_checkpoint_holds_a_plain_vit_plus_the_mpp_head(tmp_path):
    import json

    from vitlab.studies.mpp import strip_pretraining_heads
    from vitlab.train.checkpoint import load_model

    run = _pretrain(tmp_path, "--target", "patch4x4", "--mask-rate", "0.15")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["val_loss"] > 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= metrics[-1]["val_mpp_acc"] <= 1.0
    assert abs(metrics[-1]["train_mpp_frac_corrupted"] - round(0.15 * 16) / 16) < 1e-6  # 8x8 digits: 16 patches
    model, info = load_model(run)
    kw = info["config"]["objective_kwargs"]
    assert kw["target"] == "patch4x4" and len(kw["pixel_mean"]) == 1  # the data's statistics were recorded
    assert any(k.startswith("mpp_head.") for k in model.state_dict())
    plain = create_model("vit_nano_p2", num_classes=10, in_chans=1, img_size=8, depth=1)
    vit_sd = strip_pretraining_heads(model).state_dict()
    assert {k: v.shape for k, v in vit_sd.items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_mpp_checkpoint_fine_tunes_with_vitlab_finetune(tmp_path):
    from vitlab.train.api import finetune

    run = _pretrain(tmp_path)
    res = finetune(run, "digits", epochs=1, out=str(tmp_path), name="ft", progress=False, tensorboard=False,
                   verbose=False)
    assert res.summary["finished"] and res.summary["val_acc"] is not None


def test_pretrain_resumes_with_its_saved_objective_options(tmp_path):
    import json

    from vitlab.cli import main

    run = _pretrain(tmp_path, "--target", "l2", "max_steps=3")
    assert json.loads((run / "checkpoints" / "last.json").read_text())["step"] == 3
    assert not json.loads((run / "summary.json").read_text())["finished"]
    assert main(["pretrain", "--resume", str(run), "progress=false"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == -(-1618 // 128)  # 1 epoch of digits (10% held out), last partial batch used
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "val_mpp_mse" in metrics[-1]  # still the l2 target after the resume
