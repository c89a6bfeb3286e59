"""TrainConfig: typed key=value overrides, YAML files, clear errors; the learning-rate
schedule; which parameters get weight decay."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vitlab.errors import ConfigError
from vitlab.models import create_model
from vitlab.train.config import TrainConfig, apply_overrides, load_config, save_config
from vitlab.train.optim import build_optimizer, lr_at, param_groups

REPO = Path(__file__).resolve().parents[1]


def test_overrides_are_typed_by_the_dataclass():
    cfg = apply_overrides(TrainConfig(), ["epochs=5", "lr=1e-3", "betas=[0.9,0.95]", "hflip=true",
                                          "model_kwargs.pos_embed=sincos_2d", "model_kwargs.depth=2",
                                          "drop_path=0.1", "dropout=null", "randaugment=[2,9]", "name=123",
                                          "rrc_scale=0.5,1"])
    assert cfg.epochs == 5 and isinstance(cfg.epochs, int)
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)  # YAML 1.1 would read '1e-3' as text
    assert cfg.betas == (0.9, 0.95)
    assert cfg.hflip is True
    assert cfg.model_kwargs == {"pos_embed": "sincos_2d", "depth": 2}
    assert cfg.drop_path == 0.1 and cfg.dropout is None
    assert cfg.randaugment == (2, 9.0)
    assert cfg.name == "123"
    assert cfg.rrc_scale == (0.5, 1.0)
    assert cfg.model_overrides() == {"pos_embed": "sincos_2d", "depth": 2, "drop_path_rate": 0.1}
    # the original is untouched
    assert TrainConfig().model_kwargs == {}


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown option 'epoch'.*Did you mean: epochs"):
        apply_overrides(TrainConfig(), ["epoch=3"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides(TrainConfig(), ["epochs"])
    with pytest.raises(ConfigError, match="is not a mapping"):
        apply_overrides(TrainConfig(), ["epochs.x=3"])


@pytest.mark.parametrize("item", ["epochs=abc", "lr=fast", "hflip=maybe", "betas=[0.9]", "epochs=2.5"])
def test_badly_typed_values_are_config_errors(item):
    with pytest.raises(ConfigError):
        apply_overrides(TrainConfig(), [item])


@pytest.mark.parametrize("changes, world, pattern", [
    ({"batch_size": 100, "accum_steps": 3}, 1, r"not divisible by world size \(1\) x accum_steps \(3\) = 3"),
    ({"batch_size": 64}, 3, r"multiple of 3"),
    ({"lr": -0.1}, 1, "lr=-0.1 must be a positive number"),
    ({"lr": 1e-3, "min_lr": 1e-2}, 1, "min_lr"),
    ({"epochs": 0}, 1, "epochs=0 must be at least 1"),
    ({"optimizer": "adamm"}, 1, "Did you mean: adam"),
    ({"ema_decay": 1.0}, 1, "ema_decay"),
    ({"device": "gpu0"}, 1, "not a device"),
])
def test_impossible_values_fail_validation(changes, world, pattern):
    cfg = apply_overrides(TrainConfig(), changes)
    with pytest.raises(ConfigError, match=pattern):
        cfg.validate(world_size=world)


def test_yaml_round_trip_and_unknown_key_in_file(tmp_path):
    cfg = apply_overrides(TrainConfig(), ["epochs=7", "betas=[0.8,0.9]", "model_kwargs.depth=3", "randaugment=[2,9]"])
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back == cfg
    (tmp_path / "bad.yaml").write_text("epochs: 3\nwarmup_epoch: 1\n")
    with pytest.raises(ConfigError, match=r"warmup_epoch.*bad.yaml.*Did you mean: warmup_epochs"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load_and_validate():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        load_config(f).validate()


# ---------------------------------------------------------------------------- schedule
def test_warmup_then_cosine_values():
    base, low, total, warm = 1e-3, 1e-5, 100, 10
    lrs = [lr_at(s, base_lr=base, min_lr=low, total_steps=total, warmup_steps=warm) for s in range(total)]
    # linear warmup: base * (s + 1) / warm, reaching base at the last warmup step
    assert lrs[:warm] == pytest.approx([base * (s + 1) / warm for s in range(warm)])
    # cosine from base (first step after warmup) towards min_lr over the remaining 90 steps
    assert lrs[warm] == pytest.approx(base)
    assert lrs[warm + 45] == pytest.approx((base + low) / 2)  # half-way point of a cosine
    assert lrs[warm + 30] == pytest.approx(low + (base - low) * 0.75)  # t = 1/3: (1 + cos(pi/3)) / 2 = 3/4
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert lr_at(total, base_lr=base, min_lr=low, total_steps=total, warmup_steps=warm) == pytest.approx(low)


def test_linear_and_constant_schedules():
    kw = dict(base_lr=2.0, min_lr=0.0, total_steps=12, warmup_steps=2)
    assert lr_at(2 + 5, schedule="linear", **kw) == pytest.approx(2.0 * (1 - 5 / 10))
    assert lr_at(9, schedule="constant", **kw) == 2.0
    assert lr_at(0, schedule="linear", **{**kw, "warmup_steps": 0}) == 2.0


# ---------------------------------------------------------------------------- weight decay
def _tiny_vit():
    return create_model("vit_nano_p2", num_classes=10, img_size=8, in_chans=1, depth=2)


def test_no_weight_decay_on_norms_biases_positions_and_class_token():
    model = _tiny_vit()
    groups = {g["weight_decay"]: set(g["param_names"]) for g in param_groups(model, 0.1)}
    decay, no_decay = groups[0.1], groups[0.0]
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "head.bias", "patch_embed.proj.bias",
            "blocks.0.norm1.weight", "blocks.1.attn.qkv.bias"} <= no_decay
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "head.weight"} <= decay
    assert not decay & no_decay
    assert decay | no_decay == {n for n, _ in model.named_parameters()}


def test_decoupled_decay_shrinks_only_the_decayed_group():
    """With zero gradients AdamW's update is just w <- w * (1 - lr * wd) on the decayed group."""
    model = _tiny_vit()
    cfg = TrainConfig(lr=0.1, weight_decay=0.5)
    opt = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"] * (1 - 0.1 * 0.5))
    for name in ("pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"):
        assert torch.equal(after[name], before[name]), name


def test_sgd_and_adam_options():
    model = _tiny_vit()
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    adam = build_optimizer(model, TrainConfig(optimizer="adam", betas=(0.9, 0.999)))
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["betas"] == (0.9, 0.999)
    assert math.isclose(adam.param_groups[0]["weight_decay"], TrainConfig().weight_decay)


def test_digits_config_is_the_default_run():
    """`vitlab train` with no arguments and configs/digits.yaml are the same recipe."""
    assert load_config(REPO / "configs" / "digits.yaml") == TrainConfig()
