"""Fine-tuning at a new resolution says in the run's log what it resampled."""
from __future__ import annotations

import pytest

from vitlab.train.api import describe_resampling, finetune
from vitlab.train.config import TrainConfig
from vitlab.train.engine import fit

TINY = {"depth": 1, "embed_dim": 16, "num_heads": 2}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return fit(TrainConfig(out=str(out), name="digits", epochs=1, batch_size=128, threads=1, tensorboard=False,
                           model_kwargs=dict(TINY)), verbose=False)


def _finetune(run, tmp_path, img_size):
    return finetune(run.run_dir, "synthetic", img_size=img_size, out=str(tmp_path), name=f"ft{img_size}", epochs=1,
                    data_options={"num_classes": 3, "img_size": img_size, "n_train": 64, "n_val": 32},
                    threads=1, tensorboard=False, verbose=True)


def test_new_resolution_logs_the_resampled_position_embeddings(digits_run, tmp_path, capsys):
    res = _finetune(digits_run, tmp_path, 16)
    # vit_nano_p2 on 8x8 digits: 2x2 patches, a 4x4 grid + class token = 17 positions of width 16
    line = "fine-tuning at 16x16 px (trained at 8x8), patch grid 4x4 -> 8x8: resampled pos_embed 1x17x16 -> 1x65x16"
    log = (res.run_dir / "train.log").read_text()
    assert line in log
    assert line in capsys.readouterr().out
    # said once, among the notes right after the run's first line (after what was loaded)
    lines = log.splitlines()
    assert lines[0].split(" ", 1)[1].startswith("run ") and "finetune: loaded" in lines[1] and line in lines[2]
    assert log.count(line) == 1


def test_same_resolution_logs_nothing_about_resampling(digits_run, tmp_path):
    res = _finetune(digits_run, tmp_path, 8)
    assert "resampl" not in (res.run_dir / "train.log").read_text()


def test_describe_resampling_without_position_embeddings():
    shapes = {"stem.weight": (8, 3, 3, 3), "head.weight": (10, 8)}
    assert describe_resampling(shapes, {**shapes, "head.weight": (3, 8)}, 32, 64) == [
        "fine-tuning at 64x64 px (trained at 32x32): no position embedding to resample"]
    assert describe_resampling(shapes, shapes, 32, (32, 32)) == []
