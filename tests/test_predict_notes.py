"""`vitlab predict` says what it did to an image unlike the training data."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitlab.data.inputs import describe_input_conversion


def _photo(path, w=240, h=180):
    """A colour picture: red-to-blue gradient."""
    x = np.zeros((h, w, 3), np.uint8)
    x[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    x[..., 2] = 255 - x[..., 0]
    Image.fromarray(x).save(path)
    return path


def test_colour_photo_for_a_grey_8x8_model(tmp_path):
    note = describe_input_conversion(_photo(tmp_path / "photo.jpg"), 8, 1)
    assert note == "note: photo.jpg is 240x180 RGB; converted to 1-channel (grey) 8x8 as the model was trained on"


@pytest.mark.parametrize("mode,size,img_size,in_chans,noted", [
    ("L", (8, 8), 8, 1, False),            # like the training data
    ("L", (16, 16), 8, 1, False),          # 2x: not a large resize
    ("L", (32, 32), 8, 1, True),           # 4x
    ("L", (8, 8), 64, 1, True),            # 8x up
    ("L", (32, 32), 32, 3, True),          # grey for a colour model
    ("RGB-grey", (8, 8), 8, 1, False),     # an RGB file whose pixels are grey loses nothing
    ("RGB", (40, 30), 32, 3, False),
    ("RGB", (240, 180), (16, 24), 3, True),
])
def test_when_a_note_is_given(tmp_path, mode, size, img_size, in_chans, noted):
    path = tmp_path / "im.png"
    if mode == "RGB":
        _photo(path, *size)
    else:
        grey = Image.fromarray(np.arange(size[0] * size[1], dtype=np.uint8).reshape(size[1], size[0]) * 3)
        (grey.convert("RGB") if mode == "RGB-grey" else grey).save(path)
    note = describe_input_conversion(path, img_size, in_chans)
    assert (note is not None) == noted, note
    if noted:
        th, tw = (img_size, img_size) if isinstance(img_size, int) else img_size
        assert f"is {size[0]}x{size[1]} " in note and f"{in_chans}-channel" in note and f" {tw}x{th} " in note


def test_unreadable_file_gives_no_note(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert describe_input_conversion(bad, 8, 1) is None


def test_predict_cli_prints_the_note(tmp_path, capsys):
    from vitlab.cli import main
    from vitlab.train.config import TrainConfig
    from vitlab.train.engine import fit

    run = fit(TrainConfig(out=str(tmp_path), name="digits", epochs=1, batch_size=128, threads=1, tensorboard=False,
                          model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2}), verbose=False)
    photo = _photo(tmp_path / "photo.jpg")
    digit = tmp_path / "digit.png"
    Image.new("L", (8, 8), 0).save(digit)
    assert main(["predict", str(run.run_dir), str(photo), str(digit), "--topk", "2"]) == 0
    out, err = capsys.readouterr()
    assert err.strip() == ("note: photo.jpg is 240x180 RGB; converted to 1-channel (grey) 8x8 as the model was "
                           "trained on")
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{photo}: ") and lines[1].startswith(f"{digit}: ")
