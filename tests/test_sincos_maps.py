"""The per-dimension maps of the 2D sinusoidal position embedding over the image (slides, 002):
the sincos_2d table reshaped, one channel per map; drawn in `vitlab analyze` for sincos models."""
from __future__ import annotations


import pytest
import torch

from vitlab.analysis import sincos_dimension_maps
from vitlab.analysis.embeddings import model_sincos_dimension_maps
from vitlab.errors import ConfigError
from vitlab.models import create_model
from vitlab.models.layers import sincos_2d


def test_maps_are_the_sincos_table_reshaped_and_follow_the_formula():
    grid, dim = (3, 5), 16
    dims = [0, 1, 6, 8, 9, 15]
    maps = sincos_dimension_maps(grid, dim, dims=dims)
    assert maps.shape == (6, 3, 5)
    table = sincos_2d(grid, dim)
    for k, d in enumerate(dims):
        for r in range(3):
            for c in range(5):
                assert maps[k, r, c] == table[r * 5 + c, d]      # raster order: patch (row r, column c)
    # the formula itself: column channels vary along x only, row channels along y only
    omega = lambda i: 1.0 / 10000 ** (4 * i / dim)  # noqa: E731  (channel pair i of a half)
    xs = torch.arange(5.0)
    torch.testing.assert_close(maps[0], torch.sin(xs * omega(0)).expand(3, 5))
    torch.testing.assert_close(maps[2], torch.sin(xs * omega(3)).expand(3, 5))
    ys = torch.arange(3.0).view(3, 1)
    torch.testing.assert_close(maps[4], torch.cos(ys * omega(0)).expand(3, 5))   # dim 9 = half + 1: cos of y
    torch.testing.assert_close(maps[5], torch.cos(ys * omega(3)).expand(3, 5))
    with pytest.raises(ConfigError, match="out of range"):
        sincos_dimension_maps(grid, dim, dims=[16])


def test_model_maps_are_the_models_own_embedding():
    m = create_model("vit_nano_p2", num_classes=3, img_size=8, in_chans=1, pos_embed="sincos_2d")
    maps, dims = model_sincos_dimension_maps(m)
    gh, gw = m.grid_size
    assert maps.shape == (len(dims), gh, gw) and len(dims) == 8 and max(dims) < m.embed_dim
    torch.testing.assert_close(maps, sincos_dimension_maps((gh, gw), m.embed_dim, dims))
    with pytest.raises(ConfigError, match="sincos_2d"):
        model_sincos_dimension_maps(create_model("vit_nano_p2", num_classes=3, img_size=8, in_chans=1))


def test_analyze_draws_the_maps_for_sincos_models_only(tmp_path):
    from vitlab.analysis import analyze_model

    imgs = torch.rand(4, 1, 8, 8)
    sincos = create_model("vit_nano_p2", num_classes=3, img_size=8, in_chans=1, pos_embed="sincos_2d").eval()
    res = analyze_model(sincos, imgs, tmp_path / "a")
    assert "sincos_dimensions" in [f["name"] for f in res["figures"]]
    assert (tmp_path / "a" / "sincos_dimensions.png").read_bytes()[:4] == b"\x89PNG"
    learned = create_model("vit_nano_p2", num_classes=3, img_size=8, in_chans=1).eval()
    res = analyze_model(learned, imgs, tmp_path / "b")
    assert "sincos_dimensions" not in [f["name"] for f in res["figures"]]
