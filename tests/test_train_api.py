"""evaluate / finetune / predict: the Python API behind `vitlab eval|finetune|predict`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitlab.errors import ConfigError, DataError
from vitlab.train import evaluate, finetune, load_model, predict
from vitlab.train.config import TrainConfig
from vitlab.train.engine import fit

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return fit(TrainConfig(out=str(out), name="digits", epochs=3, batch_size=64, lr=3e-3, threads=1,
                           tensorboard=False, model_kwargs=dict(TINY)), verbose=False)


def test_evaluate_matches_an_independent_computation(digits_run, tmp_path):
    from vitlab.data import load_dataset

    r = evaluate(digits_run.run_dir, out=tmp_path)
    # independent: the model, the digits held-out split and the normalisation by hand
    model, info = load_model(digits_run.run_dir)
    data = load_dataset("digits", val_fraction=0.1, split_seed=0).val
    x = data.images.float() / 255
    x = (x - torch.tensor(info["mean"]).view(1, -1, 1, 1)) / torch.tensor(info["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model(x)
    assert r["n"] == len(data.labels) == 179
    assert r["accuracy"] == pytest.approx(float((logits.argmax(1) == data.labels).float().mean()))
    assert r["loss"] == pytest.approx(float(F.cross_entropy(logits, data.labels)), rel=1e-5)
    cm = torch.tensor(r["confusion_matrix"])
    assert cm.sum() == 179 and cm.trace() / 179 == pytest.approx(r["accuracy"])
    assert r["per_class_accuracy"]["0"] == pytest.approx(float(cm[0, 0] / cm[0].sum()))
    assert Path(r["confusion_png"]).stat().st_size > 1000
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == r["accuracy"]
    # the run's own accuracy is what evaluate reports for the last checkpoint
    assert r["accuracy"] == pytest.approx(digits_run.summary["val_acc"])


def test_finetune_changes_grid_and_head_and_trains(digits_run, tmp_path):
    base, _ = load_model(digits_run.run_dir)
    # digits 8x8 -> 16x16: the 4x4 grid of 2x2 patches becomes 8x8; 10 classes -> 4
    res = finetune(digits_run.run_dir, "synthetic", img_size=16, out=str(tmp_path), name="ft", epochs=4,
                   data_options={"num_classes": 4, "img_size": 16, "n_train": 512, "n_val": 128},
                   threads=1, tensorboard=False, lr=0.05, warmup_epochs=0.5, verbose=False)
    model, info = load_model(res.run_dir)
    assert info["img_size"] == 16 and info["num_classes"] == 4 and info["in_chans"] == 1
    assert model.grid_size == (8, 8) and model.pos_embed.shape == (1, 1 + 64, 32)
    assert model.head.weight.shape == (4, 32)
    cfg = info["config"]
    assert cfg["optimizer"] == "sgd" and cfg["momentum"] == 0.9 and cfg["weight_decay"] == 0.0
    assert cfg["init_from"].endswith(".safetensors")
    # the body started from the digits weights and was trained
    moved = (model.blocks[0].attn.qkv.weight - base.blocks[0].attn.qkv.weight).abs().max()
    assert 0 < moved < base.blocks[0].attn.qkv.weight.abs().max()
    assert res.history[-1]["val_loss"] < res.history[0]["val_loss"]
    assert res.summary["val_acc"] > 0.5  # 4 classes: chance is 0.25


def test_finetune_head_starts_at_zero(digits_run, tmp_path, monkeypatch):
    """The new head is zero-initialised and the position table is resampled before training."""
    import vitlab.train.api as api

    seen = {}

    def fake_fit(cfg, model=None, bundle=None, verbose=True, **kwargs):
        seen.update(head=model.head.weight.detach().clone(), pos=model.pos_embed.detach().clone(), cfg=cfg)
        return None

    monkeypatch.setattr(api, "fit", fake_fit)
    finetune(digits_run.run_dir, "synthetic", img_size=16, threads=1,
             data_options={"num_classes": 3, "img_size": 16, "n_train": 64, "n_val": 16})
    base, _ = load_model(digits_run.run_dir)
    assert torch.count_nonzero(seen["head"]) == 0 and seen["head"].shape == (3, 32)
    # the class token's position is kept; the 4x4 grid of positions is interpolated to 8x8
    assert torch.equal(seen["pos"][:, :1], base.pos_embed[:, :1])
    grid = base.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    assert seen["pos"].shape == (1, 65, 32)
    want = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, 32)
    assert torch.allclose(seen["pos"][:, 1:], want, atol=1e-6)


def test_predict_on_real_flower_images(shared_data, tmp_path):
    flowers = shared_data / "flowers5"
    run = fit(TrainConfig(out=str(tmp_path), name="flowers", dataset="imagefolder", data_dir=str(flowers),
                          data_options={"image_size": 16, "cache": False}, epochs=1, batch_size=128, threads=1,
                          tensorboard=False, model_kwargs=dict(TINY), img_size=16), verbose=False)
    rose = sorted((flowers / "rose").glob("*.jpg"))[0]
    daisy = sorted((flowers / "daisy").glob("*.jpg"))[0]
    out = predict(run.run_dir, [rose, daisy], topk=3)
    assert [o["image"] for o in out] == [str(rose), str(daisy)]
    names = {"daisy", "dandelion", "rose", "sunflower", "tulip"}
    for o in out:
        probs = [t["prob"] for t in o["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert {t["class"] for t in o["top"]} <= names
    # the same numbers as the model on the training preprocessing (shorter side resized, centre
    # cut out, by the decoder image folders use), normalised by hand
    from vitlab.data.imagefolder import decode_image

    model, info = load_model(run.run_dir)
    arr = decode_image(str(rose), (16, 16), "RGB", "center_crop")
    assert Image.open(rose).size != (16, 16) and arr.shape == (16, 16, 3)
    x = torch.from_numpy(arr.copy()).float().permute(2, 0, 1)[None] / 255
    x = (x - torch.tensor(info["mean"]).view(1, 3, 1, 1)) / torch.tensor(info["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        p = model(x).softmax(-1)[0]
    top = p.topk(3)
    assert [info["class_names"][i] for i in top.indices] == [t["class"] for t in out[0]["top"]]
    assert top.values.tolist() == pytest.approx([t["prob"] for t in out[0]["top"]], abs=1e-5)


def test_predict_bad_image_names_the_file(digits_run, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png"):
        predict(digits_run.run_dir, [bad])
    with pytest.raises(DataError, match="missing.jpg"):
        predict(digits_run.run_dir, [tmp_path / "missing.jpg"])
    good = tmp_path / "seven.png"
    Image.new("L", (8, 8), 0).save(good)
    (res,) = predict(digits_run.run_dir, [good], topk=20)
    assert len(res["top"]) == 10 and sum(t["prob"] for t in res["top"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("setting, tuned", [("tuned", True), ("system", False)])
def test_training_on_cpu_tunes_the_allocator_unless_told_not_to(tmp_path, monkeypatch, setting, tuned):
    from vitlab.accel import ops as fast

    calls = []
    monkeypatch.setattr(fast, "tune_cpu_allocator", lambda *a, **k: calls.append(a) or True)
    fit(TrainConfig(out=str(tmp_path), name="alloc", epochs=1, max_steps=1, batch_size=64, threads=1,
                    tensorboard=False, progress=False, cpu_allocator=setting), verbose=False)
    assert bool(calls) == tuned


def test_a_wrong_allocator_setting_names_the_choices():
    with pytest.raises(ConfigError, match="cpu_allocator.*tuned.*system"):
        TrainConfig(cpu_allocator="jemalloc").validate()


def test_float32_cpu_training_runs_in_streams_unless_told_not_to(tmp_path, monkeypatch):
    from vitlab.accel import ops as fast

    calls, real = [], fast.train_in_streams

    def counting(loss_fn, x, y, n, params, **kw):
        calls.append(n)
        return real(loss_fn, x, y, n, params, **kw)
    monkeypatch.setattr(fast, "train_in_streams", counting)
    # the default model is far below the work a stream needs to pay (test_fastpaths checks that
    # bound); here the trainer's wiring is checked, so the bound is lifted
    monkeypatch.setattr(fast, "MIN_TRAIN_STREAM_FLOPS", 0)
    losses = {}
    for setting in ("auto", "off"):
        calls.clear()
        res = fit(TrainConfig(out=str(tmp_path), name=f"streams-{setting}", epochs=1, max_steps=2, batch_size=32,
                              threads=2, drop_path=0.0, dropout=0.0, tensorboard=False, progress=False,
                              train_streams=setting), verbose=False)
        assert calls == ([2, 2] if setting == "auto" else [])
        losses[setting] = res.step_losses
    # the same batches, the same gradient up to float32 rounding: the same losses
    assert len(losses["auto"]) == len(losses["off"]) == 2
    assert losses["auto"] == pytest.approx(losses["off"], rel=1e-4)


def test_training_streams_stay_off_where_the_model_draws_random_numbers(tmp_path, monkeypatch):
    from vitlab.accel import ops as fast

    calls = []
    monkeypatch.setattr(fast, "train_in_streams", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(fast, "MIN_TRAIN_STREAM_FLOPS", 0)
    fit(TrainConfig(out=str(tmp_path), name="streams-droppath", epochs=1, max_steps=1, batch_size=32, threads=2,
                    drop_path=0.1, tensorboard=False, progress=False), verbose=False)
    assert calls == []
    with pytest.raises(ConfigError, match="train_streams.*auto.*off"):
        TrainConfig(train_streams="always").validate()
