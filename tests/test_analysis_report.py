"""`vitlab analyze` end to end on runs written by the training engine: every file is written,
analysis.json holds the numbers, and report.html embeds every figure as a PNG that decodes."""
from __future__ import annotations

import base64
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from vitlab.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(out: Path, name: str, **kw) -> Path:
    from vitlab.train.config import TrainConfig
    from vitlab.train.engine import fit

    cfg = TrainConfig(out=str(out), name=name, epochs=1, tensorboard=False, progress=False, **kw)
    return Path(fit(cfg, verbose=False).run_dir)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """The default digits run (vit_nano_p2), one epoch of 12 steps."""
    return _train(tmp_path_factory.mktemp("runs"), "digits", model="vit_nano_p2", dataset="digits",
                  batch_size=128)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []
        self.captions = 0
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))
        if tag == "figcaption":
            self.captions += 1


def check_report(out: Path) -> dict:
    """Every figure listed in analysis.json is a file and an embedded PNG data URI that decodes."""
    from PIL import Image

    analysis = json.loads((out / "analysis.json").read_text())
    files = [f["file"] for f in analysis["figures"]]
    assert files, "no figures"
    for f in files:
        assert (out / f).stat().st_size > 1000
    parser = _Images()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    assert len(parser.srcs) == len(files) == parser.captions
    for src in parser.srcs:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), src[:40]
        raw = base64.b64decode(src[len(prefix):], validate=True)
        assert raw.startswith(PNG_MAGIC) and len(raw) > 1000
        img = Image.open(io.BytesIO(raw))
        img.load()
        assert img.size[0] > 50 and img.size[1] > 50
    return analysis


def test_analyze_default_digits_run(digits_run, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", str(digits_run), "--images", "24", "--out", str(out), "--batch-size", "10"]) == 0
    assert "report.html" in capsys.readouterr().out
    for name in ("analysis.json", "report.html", "attention_distance.png", "attention_rollout.png",
                 "pos_embed_similarity.png", "filter_components.png", "training_curves.png"):
        assert (out / name).is_file(), name
    a = check_report(out)
    assert a["num_images"] == 24 and a["image_size"] == [8, 8]
    d = np.array(a["attention_distance"]["pixels_per_layer_per_head"])
    assert d.shape == (4, 4)  # vit_nano_p2: 4 blocks x 4 heads
    # 4x4 grid of 2 px patches: centres 1..7 px, so no distance exceeds the corner-to-corner 6*sqrt(2)
    assert (d > 0).all() and (d < 6 * math.sqrt(2)).all()
    assert np.array(a["pos_embed_similarity"]["cosine_similarity"]).shape == (4, 4, 4, 4)
    assert np.array(a["attention_rollout"]["maps"]).shape == (8, 4, 4)
    ratio = np.array(a["filter_components"]["explained_variance_ratio"])
    assert ratio.shape == (4,) and ratio.sum() == pytest.approx(1.0, abs=1e-4)  # 1 channel x 2 x 2: all 4 kept
    assert a["run"]["config"]["model"] == "vit_nano_p2" and "val_acc" in a["run"]["summary"]
    html = (out / "report.html").read_text()
    assert "Configuration" in html and "Metrics" in html


def test_analyze_checkpoint_file_default_out(digits_run):
    ckpt = sorted((digits_run / "checkpoints").glob("step-*.safetensors"))[-1]
    assert main(["analyze", str(ckpt), "--images", "5"]) == 0
    out = digits_run / "analysis"
    assert json.loads((out / "analysis.json").read_text())["num_images"] == 5
    check_report(out)


def test_analyze_cvt_and_convmixer_runs(tmp_path):
    data = dict(dataset="synthetic", batch_size=16, max_steps=1,
                data_options=dict(num_classes=3, img_size=16, in_chans=3, n_train=48, n_val=12))
    cvt = _train(tmp_path, "cvt", model="cvt_tiny", **data)
    out = tmp_path / "cvt_out"
    assert main(["analyze", str(cvt), "--images", "6", "--out", str(out)]) == 0
    a = check_report(out)
    assert a["attention_distance"]["stage"] == [0, 1, 2, 2]
    grids = a["attention_distance"]["grids"]
    assert grids[0]["q_grid"] == [8, 8] and grids[0]["kv_grid"] == [4, 4]
    assert "last_block_attention" in a and "attention_rollout" in a["skipped"]
    assert "pos_embed_similarity" in a["skipped"] and "no absolute position" in a["skipped"]["pos_embed_similarity"]

    cm = _train(tmp_path, "cm", model="convmixer_256_8", model_kwargs=dict(dim=32, depth=3), **data)
    out = tmp_path / "cm_out"
    assert main(["analyze", str(cm), "--images", "4", "--out", str(out)]) == 0
    a = check_report(out)
    assert {f["name"] for f in a["figures"]} >= {"convmixer_patch_filters", "convmixer_depthwise_kernels",
                                                  "filter_components"}
    assert a["convmixer_depthwise_kernels"]["layers"] == [0, 1, 2]
    assert np.array(a["convmixer_depthwise_kernels"]["kernels"]["0"]).shape == (32, 5, 5)
    assert "attention_distance" in a["skipped"]


@pytest.mark.slow
def test_analyze_rgb_flowers_run(shared_data, tmp_path):
    run = _train(tmp_path, "flowers", model="vit_nano_p2", dataset="imagefolder",
                 data_dir=str(shared_data / "flowers5"), data_options=dict(image_size=16), img_size=16,
                 batch_size=128, max_steps=1)
    out = tmp_path / "out"
    assert main(["analyze", str(run), "--images", "12", "--out", str(out)]) == 0
    a = check_report(out)
    assert a["image_size"] == [16, 16] and a["model"]["grid_size"] == [8, 8]
    comps = np.array(a["filter_components"]["components"])
    assert comps.shape == (12, 3, 2, 2)  # RGB 2x2 patches: 12 dimensions
    flat = comps.reshape(12, -1)
    assert flat @ flat.T == pytest.approx(np.eye(12), abs=1e-3)


def test_analyze_bad_input_is_one_line(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert main(["analyze", str(tmp_path), "--images", "0"]) == 2
    assert "--images" in capsys.readouterr().err
