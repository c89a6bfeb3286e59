"""vitlab export / predict: exported files compute vitlab's logits (checked here independently of
the export's own check), int8 keeps the fp32 predictions, and predict over folders is batched,
lazy, equal to eval, and survives a corrupt image."""
from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from vitlab.cli import main
from vitlab.deploy import Preprocess, export, iter_image_paths, predict_iter
from vitlab.errors import ConfigError
from vitlab.train import evaluate, load_model
from vitlab.train.api import _load_eval_data
from vitlab.train.config import TrainConfig
from vitlab.train.engine import fit

ort = pytest.importorskip("onnxruntime")

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def _run(tmp_path, model: str, img_size: int, name: str = "run", **model_kwargs):
    """A run directory of `model` after one optimizer step on small synthetic data."""
    return fit(TrainConfig(out=str(tmp_path), name=name, model=model, dataset="synthetic", img_size=img_size,
                           epochs=1, max_steps=1, batch_size=16, threads=1, tensorboard=False,
                           model_kwargs=model_kwargs,
                           data_options={"num_classes": 3, "img_size": img_size, "n_train": 16, "n_val": 24}),
               verbose=False).run_dir


def _val_inputs(run_dir, size=None):
    """The run's validation images preprocessed by hand: [0, 1], resized, normalised."""
    model, info = load_model(run_dir)
    val = _load_eval_data(info, None, None, None).val
    x = val.images.float() / 255
    if size is not None:
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(info["mean"]).view(1, -1, 1, 1)) / torch.tensor(info["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        return model, x, model(x)


def _onnx_logits(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])


VIT_OPTIONS = [
    {"global_pool": "token", "pos_embed": "learned"},
    {"global_pool": "avg", "pos_embed": "none"},
    {"global_pool": "token", "pos_embed": "learned_2d"},
    {"global_pool": "avg", "pos_embed": "sincos_1d"},
    {"global_pool": "token", "pos_embed": "sincos_2d"},
    {"global_pool": "avg", "pos_embed": "relative"},
    {"global_pool": "token", "pos_embed": "relative"},
]
FAMILIES = [("rsmall_vit_micro", 32, {}), ("cvt_tiny", 28, {}), ("convmixer_256_8", 32, {}),
            ("resnet_small", 32, {})]


@pytest.mark.parametrize("model, img_size, kwargs",
                         [("vit_nano_p2", 8, {**TINY, **o}) for o in VIT_OPTIONS] + FAMILIES,
                         ids=[f"vit-{o['global_pool']}-{o['pos_embed']}" for o in VIT_OPTIONS] + [f[0] for f in FAMILIES])
def test_onnx_export_computes_vitlabs_logits(tmp_path, model, img_size, kwargs):
    run_dir = _run(tmp_path, model, img_size, **kwargs)
    rep = export(run_dir, "onnx")
    out = tmp_path / "run" / "export-onnx"
    assert rep["file"] == str(out / "model.onnx") and rep["ok"]
    assert rep["max_abs_logit_diff"] < 1e-4 and rep["top1_agreement"] == 1.0 and rep["images"] == 24
    assert json.loads((out / "check.json").read_text())["max_abs_logit_diff"] == rep["max_abs_logit_diff"]
    # independently of the export's own check: ONNX Runtime on the images preprocessed by hand,
    # on another batch size than the export's example (the batch axis is dynamic)
    _, x, want = _val_inputs(run_dir)
    got = _onnx_logits(out / "model.onnx", x[:7])
    assert want.abs().max() > 0.05  # logits of a real size, so the difference below means something
    assert (got - want[:7]).abs().max() < 1e-4
    spec = json.loads((out / "preprocess.json").read_text())
    _, info = load_model(run_dir)
    assert spec["size"] == [img_size, img_size] and spec["channels"] == 3 and spec["crop"] == "center"
    assert spec["mean"] == pytest.approx(list(info["mean"])) and spec["std"] == pytest.approx(list(info["std"]))
    assert spec["class_names"] == list(info["class_names"])
    # the contract in preprocess.json gives the same inputs as the hand-made ones
    val_images = _load_eval_data(info, None, None, None).val.images
    assert torch.allclose(Preprocess(spec).batch(val_images), x, atol=1e-6)


@pytest.mark.parametrize("model, img_size, kwargs", [
    ("vit_nano_p2", 8, {**TINY, "pos_embed": "sincos_2d", "dynamic_img_size": True}),
    ("vit_nano_p2", 8, {**TINY, "pos_embed": "none", "global_pool": "avg", "dynamic_img_size": True}),
    ("rsmall_vit_micro", 32, {"pos_embed": "sincos_1d", "dynamic_img_size": True}),
    ("cvt_tiny", 28, {}), ("convmixer_256_8", 32, {}), ("resnet_small", 32, {}),
], ids=["vit-sincos_2d", "vit-none-avg", "hybrid-sincos_1d", "cvt", "convmixer", "resnet"])
def test_dynamic_image_size_export_runs_at_other_sizes(tmp_path, model, img_size, kwargs):
    run_dir = _run(tmp_path, model, img_size, **kwargs)
    rep = export(run_dir, "onnx", img_size="dynamic", batch=None)
    assert rep["dynamic_size"] and rep["other_size"]["size"] == [2 * img_size, 2 * img_size]
    assert rep["other_size"]["max_abs_logit_diff"] < 1e-4 and rep["ok"]
    # a third size, not square, checked here by hand
    h, w = (12, 20) if img_size == 8 else (img_size + 16, img_size + 32)
    model, x, _ = _val_inputs(run_dir, size=(h, w))
    with torch.no_grad():
        want = model(x)
    assert (_onnx_logits(rep["file"], x) - want).abs().max() < 1e-4


def test_learned_position_embeddings_export_at_a_chosen_fixed_size(tmp_path):
    run_dir = _run(tmp_path, "vit_nano_p2", 8, pos_embed="learned", dynamic_img_size=True, **TINY)
    with pytest.raises(ConfigError, match="export one file per size with --img-size S"):
        export(run_dir, "onnx", img_size="dynamic")
    rep = export(run_dir, "onnx", img_size=16, out=tmp_path / "e16")
    assert rep["size"] == [16, 16] and rep["max_abs_logit_diff"] < 1e-4
    model, x, _ = _val_inputs(run_dir, size=(16, 16))
    with torch.no_grad():
        assert (_onnx_logits(rep["file"], x) - model(x)).abs().max() < 1e-4
    fixed = _run(tmp_path, "vit_nano_p2", 8, name="fixed", **TINY)
    with pytest.raises(ConfigError, match=r"built for 8x8 images and cannot run at 16x16.*vitlab finetune RUN --img-size 16"):
        export(fixed, "onnx", img_size=16)


@pytest.mark.parametrize("fmt, model, img_size, kwargs", [
    ("torchscript", "vit_nano_p2", 8, {**TINY, "pos_embed": "relative", "global_pool": "avg"}),
    ("torchscript", "cvt_tiny", 28, {}),
    ("exported-program", "vit_nano_p2", 8, {**TINY, "pos_embed": "learned_2d"}),
    ("exported-program", "rsmall_vit_micro", 32, {}),
])
def test_torchscript_and_exported_program_files_compute_vitlabs_logits(tmp_path, fmt, model, img_size, kwargs):
    run_dir = _run(tmp_path, model, img_size, **kwargs)
    rep = export(run_dir, fmt, batch=5)
    assert rep["ok"] and rep["max_abs_logit_diff"] < 1e-4 and rep["top1_agreement"] == 1.0
    _, x, want = _val_inputs(run_dir)
    with torch.no_grad():
        if fmt == "torchscript":
            got = torch.jit.load(rep["file"])(x[:5])
        else:
            got = torch.export.load(rep["file"]).module()(x[:5])
    assert (got - want[:5]).abs().max() < 1e-4


def test_onnx_fixed_batch_file_and_the_dynamo_exporter(tmp_path):
    run_dir = _run(tmp_path, "convmixer_256_8", 32)
    rep = export(run_dir, "onnx", batch=4)  # 24 images: the check feeds it in chunks of 4
    sess = ort.InferenceSession(rep["file"], providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [4, 3, 32, 32] and rep["max_abs_logit_diff"] < 1e-4
    pytest.importorskip("onnxscript")
    rep = export(run_dir, "onnx", exporter="dynamo", out=tmp_path / "dynamo")
    assert rep["max_abs_logit_diff"] < 1e-4 and not (tmp_path / "dynamo" / "model.onnx.data").exists()


def test_export_bad_options_fail_with_one_clear_line(tmp_path, capsys):
    run_dir = _run(tmp_path, "vit_nano_p2", 8, **TINY)
    with pytest.raises(ConfigError, match="use --format onnx with --dtype int8"):
        export(run_dir, "torchscript", dtype="int8")
    with pytest.raises(ConfigError, match="'dynamic' or a positive batch size"):
        export(run_dir, "onnx", batch="0")
    with pytest.raises(ConfigError, match="built for 8x8 images only"):
        export(run_dir, "onnx", img_size="dynamic")
    assert main(["export", str(run_dir), "--check-images", "some"]) == 2
    assert "--check-images 'some' is not valid" in capsys.readouterr().err


@pytest.mark.slow
def test_int8_keeps_the_fp32_predictions_on_mnist(shared_data, tmp_path, capsys):
    run = fit(TrainConfig(out=str(tmp_path), name="mnist", model="vit_micro_p4", dataset="mnist",
                          data_dir=str(shared_data / "mnist"), img_size=28, epochs=3, train_fraction=0.3, warmup_steps=20,
                          batch_size=64, lr=3e-3, threads=1, tensorboard=False, model_kwargs=dict(TINY)),
              verbose=False)
    assert main(["export", str(run.run_dir), "--dtype", "int8", "--check-images", "all"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((run.run_dir / "export-onnx" / "check.json").read_text())
    q = rep["int8"]
    assert rep["images"] == 10000 and rep["accuracy_exported"] > 0.5  # far above chance (10%): a model that learned
    assert q["top1_agreement_with_fp32"] >= 0.99
    assert abs(q["accuracy_change"]) < 0.01 and q["bytes"] < rep["bytes"]
    assert re.search(rf"accuracy {100 * q['accuracy_fp32']:.2f}% -> {100 * q['accuracy_int8']:.2f}%", printed)
    # the recorded int8 accuracy is what the int8 file gives on the validation split, in batches of
    # the check's size (activations are quantised with one scale per batch)
    from vitlab.deploy.export import CHECK_BATCH

    _, x, _ = _val_inputs(run.run_dir)
    labels = _load_eval_data(load_model(run.run_dir)[1], None, None, None).val.labels
    got = torch.cat([_onnx_logits(q["file"], x[s:s + CHECK_BATCH]) for s in range(0, len(x), CHECK_BATCH)])
    assert float((got.argmax(1) == labels).float().mean()) == pytest.approx(q["accuracy_int8"])


# ---------------------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A trained digits run and its validation images as PNG files in class folders."""
    out = tmp_path_factory.mktemp("deploy")
    run = fit(TrainConfig(out=str(out), name="digits", epochs=3, batch_size=64, lr=3e-3, threads=1,
                          tensorboard=False, model_kwargs=dict(TINY)), verbose=False)
    _, info = load_model(run.run_dir)
    val = _load_eval_data(info, None, None, None).val
    folder = out / "images"
    for i, (img, label) in enumerate(zip(val.images, val.labels)):
        d = folder / info["class_names"][int(label)] / ("nested" if i % 3 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(d / f"{i:03d}.png")
    return run.run_dir, folder, len(val.labels)


def _accuracy(records, folder):
    right = [r["top"][0]["class"] == r["path"][len(str(folder)) + 1:].split("/")[0] for r in records]
    return sum(right) / len(right)


def test_predict_over_a_folder_gives_evals_accuracy(digits, tmp_path):
    run_dir, folder, n = digits
    ev = evaluate(run_dir, out=tmp_path, plot=False)
    records = list(predict_iter(run_dir, [folder], batch_size=16, topk=3))  # 179 images: 12 batches
    assert len(records) == n == ev["n"] and all("error" not in r and len(r["top"]) == 3 for r in records)
    assert _accuracy(records, folder) == pytest.approx(ev["accuracy"])
    # the exported file run by ONNX Runtime, with the preprocessing from preprocess.json
    onnx = export(run_dir, "onnx", check_images=32)["file"]
    by_ort = list(predict_iter(run_dir, [folder], batch_size=50, backend="onnxruntime"))
    assert [r["path"] for r in by_ort] == [r["path"] for r in records]
    assert _accuracy(by_ort, folder) == pytest.approx(ev["accuracy"], abs=1 / n)
    assert list(predict_iter(onnx, [folder / "3"], batch_size=8)) == list(predict_iter(run_dir, [folder / "3"],
                                                                                       backend="onnxruntime"))


def test_predict_command_runs_an_exported_file(digits, tmp_path, capsys):
    run_dir, folder, _ = digits
    onnx = export(run_dir, "onnx", out=tmp_path / "exp", check_images=16)["file"]
    assert main(["predict", str(run_dir), str(folder / "4"), "--onnx", onnx, "--format", "jsonl", "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = list(predict_iter(run_dir, [folder / "4"], topk=3))
    assert [json.loads(ln)["path"] for ln in lines] == [r["path"] for r in want]
    assert [json.loads(ln)["top"][0]["class"] for ln in lines] == [r["top"][0]["class"] for r in want]
    assert main(["predict", str(tmp_path), "x.png", "--backend", "onnxruntime"]) == 2
    assert "export the run first" in capsys.readouterr().err


def test_predict_is_a_lazy_generator_reading_one_batch_at_a_time(digits, monkeypatch):
    from vitlab.deploy import predict as pmod

    run_dir, folder, n = digits
    reads = []
    real = pmod.read_image
    monkeypatch.setattr(pmod, "read_image", lambda p, *a: reads.append(p) or real(p, *a))
    gen = predict_iter(run_dir, [folder], batch_size=10)
    assert reads == []  # nothing happens before the first record is asked for
    first = next(gen)
    assert len(reads) == 10 and first["path"] == reads[0]
    rest = list(gen)
    assert len(reads) == n and len(rest) == n - 1


def test_a_corrupt_image_is_named_and_the_rest_are_predicted(digits, tmp_path, capsys):
    run_dir, folder, _ = digits
    imgs = sorted(folder.glob("1/*.png"))[:5]
    d = tmp_path / "mixed"
    d.mkdir()
    for p in imgs:
        (d / p.name).write_bytes(p.read_bytes())
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (d / ".hidden.png").write_bytes(b"not an image either")  # hidden files are not images of the folder
    records = list(predict_iter(run_dir, [d], batch_size=4))
    bad = [r for r in records if "error" in r]
    assert len(records) == 6 and len(bad) == 1 and "corrupt.png" in bad[0]["error"]
    assert all(len(r["top"]) == 5 for r in records if r not in bad)
    assert main(["predict", str(run_dir), str(d), "--format", "csv", "--top-k", "2", "--batch-size", "4"]) == 1
    cap = capsys.readouterr()
    rows = cap.out.strip().splitlines()
    assert rows[0] == "path,class_1,prob_1,class_2,prob_2" and len(rows) == 6
    assert re.search(r"corrupt\.png.*\n.*1 of 6 images could not be read", cap.err)


def test_predict_takes_files_globs_and_folders_and_names_what_matches_nothing(digits, capsys):
    run_dir, folder, _ = digits
    one = sorted(folder.glob("7/*.png"))[0]
    paths = list(iter_image_paths([str(one), str(folder / "7"), str(folder / "**" / "0*.png"), "nope/*.png", "gone"]))
    # a folder: its files in name order, then its sub-folders' (recursively)
    sevens = sorted(map(str, (folder / "7").glob("*.png"))) + sorted(map(str, (folder / "7" / "nested").glob("*.png")))
    assert paths[0] == (str(one), None)
    assert paths[1:1 + len(sevens)] == [(s, None) for s in sevens]
    globbed = [p for p, e in paths[1 + len(sevens):-2]]
    assert globbed and all(re.search(r"/0\d\d\.png$", p) for p in globbed)
    assert paths[-2] == ("nope/*.png", "no file matches this pattern") and paths[-1] == ("gone", "no such file or folder")
    assert main(["predict", str(run_dir), str(one), "--format", "jsonl", "--top-k", "1"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["path"] == str(one) and len(rec["top"]) == 1 and 0 < rec["top"][0]["prob"] <= 1
