"""`vitlab train|eval|finetune|predict` on the command line: bad options fail with one clear
line (exit 2, no traceback); a real run prints its accuracy and where it is."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vitlab.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["epochs=1", "model_kwargs.depth=1", "model_kwargs.embed_dim=32", "model_kwargs.num_heads=2",
        "tensorboard=false", "threads=1"]


def _fails_cleanly(capsys, argv, pattern):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def test_unknown_dataset(capsys, tmp_path):
    _fails_cleanly(capsys, ["train", "--dataset", "mnits", "--out", str(tmp_path), *FAST],
                   r"vitlab train: error: unknown dataset 'mnits'.*Did you mean: mnist")


def test_missing_data(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _fails_cleanly(capsys, ["train", "--dataset", "mnist", "--data-dir", str(empty), "--out", str(tmp_path),
                                   *FAST], r"train-images-idx3-ubyte")
    assert str(empty) in line
    assert not list(tmp_path.glob("mnist-*"))  # nothing half-made left behind


def test_impossible_batch_size(capsys, tmp_path):
    _fails_cleanly(capsys, ["train", "--batch-size", "63", "accum_steps=2", "--out", str(tmp_path), *FAST],
                   r"batch_size=63 is not divisible by .* = 2.*multiple of 2")
    _fails_cleanly(capsys, ["train", "--batch-size", "4096", "--out", str(tmp_path), *FAST],
                   r"batch_size=4096 is larger than the training set \(1618 images\)")


def test_unknown_key_and_bad_value(capsys, tmp_path):
    _fails_cleanly(capsys, ["train", "epoch=3", "--out", str(tmp_path)], r"unknown option 'epoch'.*Did you mean: epochs")
    _fails_cleanly(capsys, ["train", "lr=-1", "--out", str(tmp_path), *FAST], r"lr=-1.0 must be a positive number")
    _fails_cleanly(capsys, ["train", "--model", "vit_nano", "--out", str(tmp_path), *FAST], r"unknown model 'vit_nano'")
    _fails_cleanly(capsys, ["train", "--config", str(tmp_path / "nope.yaml")], r"nope.yaml.*not found")


def test_eval_and_predict_bad_inputs(capsys, tmp_path):
    _fails_cleanly(capsys, ["eval", str(tmp_path / "no-run")], r"does not exist")
    _fails_cleanly(capsys, ["predict", str(tmp_path), "x.png"], r"no checkpoint in")


def test_help_documents_every_option():
    from vitlab.train.config import TrainConfig
    import dataclasses

    out = subprocess.run([sys.executable, "-m", "vitlab", "train", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120).stdout
    for f in dataclasses.fields(TrainConfig):
        assert re.search(rf"^\s+{f.name}\s", out, re.M), f.name
    for flag in ("--model", "--dataset", "--data-dir", "--epochs", "--batch-size", "--lr", "--img-size", "--out",
                 "--resume", "--config"):
        assert flag in out


@pytest.mark.slow
def test_train_then_eval_finetune_predict_from_the_command_line(tmp_path):
    env = {**os.environ, "CI": "true"}

    def run(*args):
        p = subprocess.run([sys.executable, "-m", "vitlab", *args], capture_output=True, text=True, cwd=tmp_path,
                           env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout

    out = run("train", "--name", "cli", "--epochs", "2", *FAST[1:])
    m = re.search(r"trained vit_nano_p2 on digits: validation accuracy ([\d.]+)% .* after 2 epochs", out)
    assert m, out
    run_dir = tmp_path / "runs" / "cli"
    assert "run: runs/cli" in out or str(run_dir) in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert float(m.group(1)) == pytest.approx(100 * summary["val_acc"], abs=0.01)
    # log lines a person can read, one per evaluation
    assert len(re.findall(r"^epoch \d/2 step \d+ \| lr .* val_acc [\d.]+%", out, re.M)) == 2

    ev = json.loads(run("eval", "runs/cli", "--json"))
    assert ev["accuracy"] == pytest.approx(summary["val_acc"])
    from PIL import Image

    Image.new("L", (8, 8), 255).save(tmp_path / "white.png")
    pred = run("predict", "runs/cli", "white.png", "--topk", "2")
    assert re.match(r"white.png: \d \d+\.\d%, \d \d+\.\d%", pred.strip()), pred
    ft = run("finetune", "runs/cli", "--dataset", "digits", "--img-size", "16", "--epochs", "1", "--name", "ft",
             "threads=1", "tensorboard=false")
    assert "fine-tuned vit_nano_p2 on digits" in ft
    cfg = (tmp_path / "runs" / "ft" / "config.yaml").read_text()
    assert "img_size: 16" in cfg and "optimizer: sgd" in cfg
