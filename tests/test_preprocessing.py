"""Published weights' preprocessing (resizing filter, evaluation crop, input size, normalisation)
follows them into fine-tuning, `train init_from=`, eval, predict and every export (issue 23)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import vitlab
from vitlab import ConfigError
from vitlab.data import AugmentConfig, BatchTransform
from vitlab.data.augment import eval_resize, eval_scale_size

MEAN, STD = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
CROP = 0.875  # 16 px / 0.875 -> decoded at 18 px, the centre 16 px kept


def timm_folder(path: Path, interpolation="bicubic", crop_pct=CROP, size=16) -> Path:
    """A small ViT in timm's layout with timm's config.json (architecture + pretrained_cfg)."""
    ref = vitlab.create_model("vit_nano_p2", num_classes=6, img_size=size, in_chans=3, embed_dim=32, depth=2,
                              patch_size=4)
    g = torch.Generator().manual_seed(0)
    sd = {k.replace("pre_logits.0.", "pre_logits.fc."): torch.randn(v.shape, generator=g) * 0.2
          for k, v in ref.state_dict().items()}
    path.mkdir()
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architecture": "vit_nano_p2", "num_classes": 6,
        "model_args": {"img_size": size, "patch_size": 4, "embed_dim": 32, "depth": 2},
        "pretrained_cfg": {"mean": MEAN, "std": STD, "input_size": [3, size, size],
                           "interpolation": interpolation, "crop_pct": crop_pct}}))
    return path


def image_folder(root: Path, classes=3, per_class=4, side=40) -> Path:
    """Square RGB images with detail at every scale (so filters and crops change the pixels)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            arr[:, :, c] = np.linspace(0, 255, side, dtype=np.uint8)[None, :]
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    return root


def by_hand(path: Path, size: int, crop_pct: float, resample, mean, std) -> torch.Tensor:
    """timm's evaluation transform written out with PIL: resize to floor(size / crop_pct) with the
    filter, cut out the centre `size`, scale to [0, 1], normalise."""
    scaled = int(math.floor(size / crop_pct))
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB").resize((scaled, scaled), resample), dtype=np.float32) / 255
    top = (scaled - size) // 2
    arr = arr[top:top + size, top:top + size]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- the transforms
def test_eval_crop_keeps_the_centre_and_filters_differ():
    x = torch.rand(2, 3, 16, 16)
    # 8 px at crop_pct 0.5: resized to 16 (a no-op here), centre 8 cut out
    assert eval_scale_size(8, 0.5) == (16, 16) and eval_scale_size(224, 0.875) == (256, 256)
    assert torch.equal(eval_resize(x, (8, 8), "bilinear", 0.5), x[..., 4:12, 4:12])
    assert torch.equal(eval_resize(x, (16, 16), "bilinear", 1.0), x)
    up = {m: eval_resize(x, (24, 24), m) for m in ("bilinear", "bicubic", "nearest")}
    assert not torch.allclose(up["bilinear"], up["bicubic"]) and not torch.allclose(up["bilinear"], up["nearest"])
    assert up["bicubic"].min() >= 0 and up["bicubic"].max() <= 1  # overshoot clipped, as PIL's uint8 is
    tf = BatchTransform(AugmentConfig(img_size=8, crop_pct=0.5), [0.0] * 3, [1.0] * 3, 2, train=False)
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(tf(u8, torch.zeros(2))[0], u8[..., 4:12, 4:12].float() / 255)
    for bad in (dict(crop_pct=0.0), dict(crop_pct=1.2), dict(interpolation="lanczos")):
        with pytest.raises(ConfigError):
            AugmentConfig(img_size=8, **bad)


def test_decode_uses_the_filter_asked_for(tmp_path):
    from vitlab.data.imagefolder import decode_image

    image_folder(tmp_path / "f", classes=1, per_class=1)
    path = tmp_path / "f" / "class0" / "0.png"
    for name, flt in (("bicubic", Image.Resampling.BICUBIC), ("nearest", Image.Resampling.NEAREST)):
        with Image.open(path) as im:
            want = np.asarray(im.convert("RGB").resize((18, 18), flt))
        assert np.array_equal(decode_image(str(path), (18, 18), "RGB", resample=name), want)
    assert not np.array_equal(decode_image(str(path), (18, 18), "RGB", resample="bicubic"),
                              decode_image(str(path), (18, 18), "RGB"))


# ----------------------------------------------------------------------------- fine-tuning and after
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pre")
    weights = timm_folder(tmp / "timm_vit")
    data = image_folder(tmp / "data")
    # no --img-size: the weights' input size; no filter/crop/normalisation given: theirs
    run = vitlab.finetune(str(weights), "imagefolder", data_dir=str(data), model_name="vit_nano_p2", epochs=1,
                          batch_size=4, val_fraction=0.25, out=str(tmp),
                          name="ft", tensorboard=False, progress=False, verbose=False,
                          data_options={"cache": False})
    return tmp, weights, data, Path(run.run_dir)


def test_finetune_adopts_the_weights_preprocessing_and_says_so(finetuned):
    tmp, weights, data, run = finetuned
    _, info = vitlab.train.load_model(run)
    cfg = info["config"]
    assert (cfg["img_size"], cfg["interpolation"], cfg["crop_pct"]) == (16, "bicubic", CROP)
    assert info["mean"] == pytest.approx(MEAN) and info["std"] == pytest.approx(STD)
    log = (run / "train.log").read_text()
    assert "preprocessing of the starting weights: input 16 px" in log and "bicubic resizing" in log
    assert f"evaluation crop_pct {CROP:g}" in log


def test_predict_and_eval_apply_the_recorded_preprocessing(finetuned):
    tmp, weights, data, run = finetuned
    model, info = vitlab.train.load_model(run)
    model.eval()
    img = data / "class1" / "2.png"
    x = by_hand(img, 16, CROP, Image.Resampling.BICUBIC, MEAN, STD)
    with torch.no_grad():
        want = model(x).softmax(-1)[0]
    from vitlab.train.api import prediction_inputs

    got = prediction_inputs(info, [img])
    assert torch.allclose(got, x, atol=1e-5)
    # another filter or no crop gives other pixels: the check above can fail
    for crop, flt in ((1.0, Image.Resampling.BICUBIC), (CROP, Image.Resampling.BILINEAR)):
        assert (by_hand(img, 16, crop, flt, MEAN, STD) - x).abs().max() > 0.05
    top = vitlab.predict(run, [img], topk=3)[0]["top"]
    for t in top:
        assert t["prob"] == pytest.approx(float(want[t["index"]]), abs=1e-6)
    # eval over the held-out split: the mean loss of the same hand-made inputs
    res = vitlab.evaluate(run, plot=False, data_options={"cache": False})
    from vitlab.data import load_dataset

    val = load_dataset("imagefolder", str(data), image_size=18, interpolation="bicubic", cache=False).val
    tf = BatchTransform(AugmentConfig(img_size=16, interpolation="bicubic", crop_pct=CROP), MEAN, STD, 3, train=False)
    xv, yv = tf(val.images, val.labels)
    with torch.no_grad():
        assert F.cross_entropy(model(xv), yv).item() == pytest.approx(res["loss"], abs=1e-5)


def test_exports_carry_the_preprocessing(finetuned):
    tmp, weights, data, run = finetuned
    from vitlab.deploy.preprocess import spec_from_info
    from vitlab.models.publish import export_hf, export_timm

    model, info = vitlab.train.load_model(run)
    spec = spec_from_info(info)
    assert (spec["interpolation"], spec["crop_pct"]) == ("bicubic", CROP)
    timm_cfg = json.loads((export_timm(run, tmp / "timm_out") / "config.json").read_text())["pretrained_cfg"]
    assert (timm_cfg["interpolation"], timm_cfg["crop_pct"], timm_cfg["input_size"]) == ("bicubic", CROP, [3, 16, 16])
    hf_dir = export_hf(run, tmp / "hf_out")
    # transformers' own image processor, read from the exported folder, prepares an image exactly
    # as vitlab's evaluation does
    transformers = pytest.importorskip("transformers")
    proc = transformers.AutoImageProcessor.from_pretrained(str(hf_dir))
    img = data / "class2" / "1.png"
    with Image.open(img) as im:
        px = proc(images=im.convert("RGB"), return_tensors="pt")["pixel_values"]
    assert px.shape == (1, 3, 16, 16)
    assert torch.allclose(px, by_hand(img, 16, CROP, Image.Resampling.BICUBIC, MEAN, STD), atol=1e-5)


def test_what_the_user_sets_wins_over_the_weights(tmp_path):
    weights = timm_folder(tmp_path / "w")
    run = vitlab.finetune(str(weights), "digits", model_name="vit_nano_p2", img_size=8, epochs=1, max_steps=1,
                          out=str(tmp_path), name="own",
                          interpolation="bilinear", crop_pct=1.0, tensorboard=False, progress=False)
    _, info = vitlab.train.load_model(run.run_dir)
    cfg = info["config"]
    assert (cfg["img_size"], cfg["interpolation"], cfg["crop_pct"]) == (8, "bilinear", 1.0)
    assert info["mean"] == pytest.approx(MEAN)  # not set by the user: the weights'


def test_train_init_from_adopts_the_preprocessing_and_resumes_with_it(tmp_path):
    weights = timm_folder(tmp_path / "w", interpolation="nearest", crop_pct=0.9)
    run = vitlab.train(model="vit_nano_p2", model_kwargs={"embed_dim": 32, "depth": 2, "patch_size": 4},
                       dataset="digits", init_from=str(weights), epochs=2, max_steps=2, batch_size=64,
                       out=str(tmp_path), name="init", tensorboard=False, progress=False)
    _, info = vitlab.train.load_model(run.run_dir)
    c = info["config"]
    assert (c["img_size"], c["interpolation"], c["crop_pct"]) == (16, "nearest", 0.9)
    assert info["mean"] == pytest.approx(MEAN) and info["std"] == pytest.approx(STD)
    assert "preprocessing of the starting weights" in (Path(run.run_dir) / "train.log").read_text()
    # resuming keeps the weights' normalisation (recorded in the config), not the data's own
    again = vitlab.train(resume=str(run.run_dir), max_steps=4, progress=False)
    _, info2 = vitlab.train.load_model(again.run_dir)
    assert info2["mean"] == pytest.approx(MEAN) and info2["config"]["interpolation"] == "nearest"


def test_mean_and_std_of_the_wrong_length_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="1 channel"):
        vitlab.train(model="vit_nano_p2", dataset="digits", mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2], epochs=1,
                     out=str(tmp_path), name="bad", tensorboard=False, progress=False)
