"""Recipe options of the ConvMixer and fine-tuning papers: random erasing, the one-cycle
schedule, layer-wise learning-rate decay, fp16 with a gradient scaler."""
from __future__ import annotations

import math

import pytest
import torch

from vitlab.data.augment import AugmentConfig, BatchTransform, random_erase
from vitlab.errors import ConfigError
from vitlab.models import create_model
from vitlab.train.config import TrainConfig, apply_overrides
from vitlab.train.optim import build_optimizer, layer_decay_groups, lr_at


def test_random_erasing_replaces_one_rectangle_per_image_with_unit_noise():
    torch.manual_seed(0)
    x = torch.full((2000, 1, 16, 16), 7.0)            # a value the N(0, 1) noise never takes
    out = random_erase(x, 1.0)
    erased = out != 7.0
    frac = erased.float().mean(dim=(1, 2, 3))
    assert bool((frac > 0).all())                                   # p=1: every image
    assert float(frac.min()) >= 0.015 and float(frac.max()) <= 0.4  # area in [2%, 33%] up to rounding
    assert float(frac.mean()) == pytest.approx((0.02 + 1 / 3) / 2, abs=0.03)  # U(0.02, 1/3), clipped
    for m in erased[:50, 0]:                                        # one axis-aligned rectangle each
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert int(m.sum()) == len(rows) * len(cols)
        assert int(rows[-1] - rows[0]) + 1 == len(rows) and int(cols[-1] - cols[0]) + 1 == len(cols)
    vals = out[erased]
    assert float(vals.mean()) == pytest.approx(0.0, abs=0.02) and float(vals.std()) == pytest.approx(1.0, abs=0.02)
    half = random_erase(x, 0.5)
    hit = (half != 7.0).flatten(1).any(1).float().mean()
    assert abs(float(hit) - 0.5) < 4 * math.sqrt(0.25 / 2000)      # Binomial(2000, 0.5) within 4 sigma


def test_random_erasing_in_the_batch_transform_is_seeded_and_off_by_default():
    imgs = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    labels = torch.zeros(64, dtype=torch.long)
    plain = BatchTransform(AugmentConfig(img_size=8), [0.5], [0.25], 10, train=True)
    erasing = BatchTransform(AugmentConfig(img_size=8, random_erasing=1.0), [0.5], [0.25], 10, train=True)
    a, _ = plain(imgs, labels, generator=torch.Generator().manual_seed(1))
    b, _ = erasing(imgs, labels, generator=torch.Generator().manual_seed(1))
    c, _ = erasing(imgs, labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, (imgs.float() / 255 - 0.5) / 0.25)
    assert torch.equal(b, c)                                        # the same generator, the same boxes
    assert bool(((a != b).flatten(1).any(1)).all())
    assert TrainConfig(random_erasing=0.25).augment_kwargs()["random_erasing"] == 0.25
    with pytest.raises(ConfigError, match="random_erasing"):
        TrainConfig(random_erasing=1.5).validate()


def test_onecycle_warms_up_to_the_peak_then_anneals_as_torch_onecyclelr():
    total, rise, base, low = 100, 30, 0.1, 1e-6
    ours = [lr_at(s, base_lr=base, min_lr=low, total_steps=total, warmup_steps=rise, schedule="onecycle")
            for s in range(total)]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=base, total_steps=total, pct_start=rise / total,
                                                div_factor=25, final_div_factor=base / 25 / low,
                                                cycle_momentum=False)
    ref = []
    for _ in range(total):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert ours == pytest.approx(ref, rel=1e-6)
    assert ours[0] == pytest.approx(base / 25) and max(ours) == pytest.approx(base) and ours.index(base) == rise - 1
    assert all(a < b for a, b in zip(ours[:rise - 1], ours[1:rise]))          # rising to the peak
    assert all(a > b for a, b in zip(ours[rise - 1:-1], ours[rise:]))         # then falling
    assert ours[-1] == pytest.approx(low)
    # no warmup given: the rise takes 30% of the steps
    no_wu = [lr_at(s, base_lr=base, min_lr=low, total_steps=total, warmup_steps=0, schedule="onecycle")
             for s in range(total)]
    assert no_wu.index(max(no_wu)) == 29
    TrainConfig(schedule="onecycle").validate()


def test_layer_decay_gives_each_vit_block_its_own_lr():
    model = create_model("vit_nano_p2", num_classes=10, img_size=8, in_chans=1)
    depth, d = len(model.blocks), 0.5
    cfg = TrainConfig(layer_decay=d, lr=1.0).validate()
    opt = build_optimizer(model, cfg)
    scale = {}
    for g in opt.param_groups:
        for n in g["param_names"]:
            scale[n] = g["lr_scale"]
    assert set(scale) == {n for n, _ in model.named_parameters()}             # every parameter, once
    assert sum(len(g["params"]) for g in opt.param_groups) == len(scale)
    assert scale["head.weight"] == 1.0 and scale["norm.weight"] == 1.0
    for i in range(depth):
        assert scale[f"blocks.{i}.attn.qkv.weight"] == d ** (depth - i)
    assert scale["patch_embed.proj.weight"] == scale["cls_token"] == scale["pos_embed"] == d ** (depth + 1)
    # weight decay is still only on the weight matrices
    wd = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    assert wd["blocks.0.attn.qkv.weight"] == cfg.weight_decay and wd["blocks.0.norm1.weight"] == 0.0
    # off by default: the two plain groups
    assert [g.get("lr_scale") for g in build_optimizer(model, TrainConfig()).param_groups] == [None, None]
    with pytest.raises(ConfigError, match="layer_decay"):
        layer_decay_groups(create_model("resnet_small", num_classes=10, in_chans=1), 0.05, 0.75)
    with pytest.raises(ConfigError, match="layer_decay"):
        TrainConfig(layer_decay=1.5).validate()


def test_layer_decay_scales_the_update_of_each_layer_in_training(tmp_path):
    """One plain-SGD step through the engine: the embedding moves by lr x decay^(depth+1) x grad."""
    from vitlab.train.engine import fit

    cfg = apply_overrides(TrainConfig(progress=False, tensorboard=False), dict(
        model="vit_nano_p2", model_kwargs={"depth": 2, "embed_dim": 16, "num_heads": 2}, epochs=1, max_steps=1,
        optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=0.1, min_lr=0.0, warmup_steps=0, schedule="constant",
        grad_clip=0.0, layer_decay=0.5, out=str(tmp_path), name="ld", device="cpu"))
    torch.manual_seed(0)
    model = create_model("vit_nano_p2", num_classes=10, img_size=8, in_chans=1, depth=2, embed_dim=16, num_heads=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    hooks = [p.register_hook(lambda g, n=n: grads.__setitem__(n, g.clone())) for n, p in model.named_parameters()]
    fit(cfg, model=model, verbose=False)
    for h in hooks:
        h.remove()
    after = dict(model.named_parameters())
    for name, s in (("head.weight", 1.0), ("blocks.1.mlp.fc1.weight", 0.5), ("blocks.0.mlp.fc1.weight", 0.25),
                    ("patch_embed.proj.weight", 0.125)):
        step = before[name] - after[name].detach()
        assert torch.allclose(step, 0.1 * s * grads[name], atol=1e-6), name


def test_fp16_is_a_clear_error_without_cuda(tmp_path):
    cfg = TrainConfig(precision="fp16").validate()
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        cfg.amp_dtype("cpu")
    if not torch.cuda.is_available():
        from vitlab.train.engine import fit

        with pytest.raises(ConfigError, match="precision=fp16 needs a CUDA GPU.*precision=bf16"):
            fit(TrainConfig(precision="fp16", device="cpu", epochs=1, out=str(tmp_path), progress=False,
                            tensorboard=False), verbose=False)
    else:
        assert cfg.amp_dtype("cuda") == torch.float16


def test_fp16_training_goes_through_the_grad_scaler_and_checkpoints_it(tmp_path, monkeypatch):
    """The scaler's wiring, run on CPU by forcing the fp16 autocast dtype (real runs need CUDA): the
    loss is scaled, the steps train, and the loss scale is saved and restored on resume."""
    import json

    from vitlab.train import engine

    monkeypatch.setattr(TrainConfig, "amp_dtype", lambda self, device_type: torch.float16)
    scales = []
    real_scale = torch.amp.GradScaler.scale

    def spy(self, outputs):
        scales.append(self.get_scale())
        return real_scale(self, outputs)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", spy)
    cfg = apply_overrides(TrainConfig(progress=False, tensorboard=False), dict(
        model="vit_nano_p2", model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2}, epochs=2, batch_size=256,
        train_fraction=0.3, warmup_steps=0, precision="fp16", out=str(tmp_path), name="fp16", device="cpu",
        max_steps=2))
    engine.fit(cfg, verbose=False)
    assert scales and scales[0] == 65536.0                       # torch's initial loss scale
    from vitlab.train.checkpoint import read_state

    ckpts = tmp_path / "fp16" / "checkpoints"
    state_path = ckpts / json.loads((ckpts / "last.json").read_text())["state"]
    state = read_state(state_path)
    assert state["grad_scaler"]["scale"] in (65536.0, 32768.0, 16384.0)  # halved per overflowing step, at most
    state["grad_scaler"]["scale"] = 1024.0     # a scale the run could not start from: resume must restore it
    torch.save(state, state_path)
    scales.clear()
    engine.fit(apply_overrides(cfg, {"resume": str(tmp_path / "fp16"), "max_steps": None}), verbose=False)
    assert scales[0] == 1024.0
