"""`vitlab study NAME --preset cifar10`: every built-in study's grid on CIFAR-10 at 32 px, its
banner with the counted training compute, the one-line error when the files are missing, and
one tiny study run end to end on a generated stand-in for the CIFAR-10 archive."""
from __future__ import annotations

import csv
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from vitlab.errors import DataError
from vitlab.studies import study as S

STUDIES = ("data-scaling", "pooling", "pos-embed", "cvt-ablation", "convmixer-kernel", "convmixer-patch", "mpp",
           "cvt-conv-proj-stages", "mpp-targets", "optimizer", "model-scaling")
PRETRAIN = ("mpp-pretrain", "pretrain-")


def test_the_builtin_studies_are_the_ones_tested():
    S.get_study("pooling")  # registers the built-in studies
    assert set(S.STUDIES) >= set(STUDIES) and set(S.STUDIES) - {"tiny"} <= set(STUDIES)
    assert all(S.STUDIES[n].cifar10 for n in STUDIES)


@pytest.mark.parametrize("name", STUDIES)
def test_cifar10_preset_resolves_to_valid_runs_on_cifar10_at_32px(name, tmp_path):
    import torch

    from vitlab import create_model

    study = S.get_study(name)
    params, train = S.resolve_params(study, preset="cifar10")
    assert params["dataset"] == "cifar10" and params["img_size"] == 32 and params["seeds"] == [0, 1, 2]
    assert train == S.CIFAR10_TRAIN
    if name == "data-scaling":  # the data-scaling grid keeps the small preset's fractions
        assert params["fractions"] == study.params["fractions"]
    if "train_fraction" in params and name != "data-scaling":  # every study sees all of CIFAR-10
        assert params["train_fraction"] == 1.0
    specs = study.build(params)
    assert len({s.name for s in specs}) == len(specs) > 1
    for spec in specs:
        cfg = S.make_config(study, params, train, spec, tmp_path).validate()
        assert (cfg.dataset, cfg.img_size, cfg.pad_crop, cfg.hflip) == ("cifar10", 32, 4, True)
        assert cfg.epochs == (params["pretrain_epochs"] if spec.name.startswith(PRETRAIN) else params["epochs"])
        with torch.device("meta"):
            model = create_model(cfg.model, num_classes=10, in_chans=3, img_size=32, **cfg.model_overrides())
        assert model(torch.empty(2, 3, 32, 32, device="meta")).shape[-1] == 10 or cfg.objective == "mpp"
    # three seeds per arm (the pre-training runs are one per arm by design)
    sizes = S._group_sizes([dict(sp.columns) for sp in specs if not sp.name.startswith(PRETRAIN)])
    assert set(map(len, sizes.values())) == {3}


def test_cifar10_preset_models_are_the_documented_ones(tmp_path):
    def models(name):
        study = S.get_study(name)
        params, train = S.resolve_params(study, preset="cifar10")
        return {(c.model, c.model_overrides().get("patch_size"))
                for c in (S.make_config(study, params, train, sp, tmp_path) for sp in study.build(params))}

    for name in ("pooling", "pos-embed", "mpp", "mpp-targets"):  # ViT with 4x4 patches: 64 tokens at 32 px
        assert models(name) == {("vit_micro_p4", None)}
    assert models("cvt-ablation") == models("cvt-conv-proj-stages") == {("cvt_tiny", None)}
    study = S.get_study("convmixer-kernel")
    params, _ = S.resolve_params(study, preset="cifar10")
    assert (params["dim"], params["depth"], params["patch_size"], params["train_fraction"]) == (256, 8, 2, 1.0)
    assert params["epochs"] < study.paper["epochs"]  # the paper's CIFAR setting, fewer epochs
    assert {m for m, _ in models("data-scaling")} == {"vit_micro_p4", "rsmall_vit_micro", "resnet_small",
                                                       "cvt_tiny", "convmixer_256_8"}


def test_options_override_the_preset_and_a_preset_option_is_typed_by_its_value():
    study = S.get_study("pooling")  # img_size is not a small-preset option of pooling
    params, train = S.resolve_params(study, ["img_size=24", "epochs=3", "train.hflip=false"], preset="cifar10")
    assert (params["img_size"], params["epochs"], train["hflip"], train["pad_crop"]) == (24, 3, "false", 4)


def test_cifar10_banner_prints_what_it_runs_and_its_counted_compute(tmp_path):
    study = S.get_study("pos-embed")
    params, train = S.resolve_params(study, preset="cifar10")
    specs = study.build(params)
    flops = S.estimate_training_flops(study, params, train, 50_000, num_classes=10)
    # 15 runs x 3 x forward FLOPs x 30 epochs x 50,000 images (all of CIFAR-10's training set)
    per_run = [S.forward_flops_per_image({**S.make_config(study, params, train, sp, tmp_path).to_dict(),
                                          "num_classes": 10, "in_chans": 3}) for sp in specs]
    assert flops == pytest.approx(3 * params["epochs"] * 50_000 * sum(per_run))
    text = S.preset_banner(study, params, train, "cifar10")
    assert text.startswith("[pos-embed] cifar10 preset: ViT-micro/4")
    assert f"{len(specs)} runs" in text and "dataset=cifar10" in text
    assert f"{flops:.3g} training FLOPs (counted, 50,000 training images)" in text
    # the fractions count: data-scaling's estimate is that of 0.1 + 0.3 + 1.0 of the images per arm
    ds = S.get_study("data-scaling")
    p, t = S.resolve_params(ds, ["models=vit", "seeds=0"], preset="cifar10")
    one = S.resolve_params(ds, ["models=vit", "seeds=0", "fractions=1.0"], preset="cifar10")[0]
    assert S.estimate_training_flops(ds, p, t, 50_000, 10) == pytest.approx(
        1.4 * S.estimate_training_flops(ds, one, t, 50_000, 10))


def _empty_places(monkeypatch, tmp_path):
    """No CIFAR-10 where the loader looks ($VITLAB_DATA, ./data, ~/data all empty)."""
    for d in ("env", "cwd", "home"):
        (tmp_path / d).mkdir()
    monkeypatch.setenv("VITLAB_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "cwd")


def test_missing_cifar10_files_are_one_clear_error_before_the_first_run(tmp_path, monkeypatch):
    _empty_places(monkeypatch, tmp_path)

    def never(*a, **k):
        raise AssertionError("a run started without the data set's files")

    monkeypatch.setattr(S, "execute_run", never)
    lines = []
    with pytest.raises(DataError) as e:
        S.run_study("pos-embed", tmp_path / "out", preset="cifar10", log=lines.append)
    msg = str(e.value)
    assert "\n" not in msg
    assert "CIFAR-10" in msg and str(tmp_path / "env" / "cifar10") in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert "cifar-10-batches-py/" in msg and "train.data_dir=DIR" in msg
    assert lines and lines[0].startswith("[pos-embed] cifar10 preset:")  # what it would run, still printed
    # an explicit folder without the files names that folder
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match=r"CIFAR-10.*not found \(looked in .*mine"):
        S.run_study("pos-embed", tmp_path / "out", [f"train.data_dir={tmp_path / 'mine'}"], preset="cifar10",
                    log=lambda *_: None)
    with pytest.raises(DataError, match=r"looked in .*nowhere.*cifar-10-python\.tar\.gz"):
        S.run_study("pos-embed", tmp_path / "out", [f"train.data_dir={tmp_path / 'nowhere'}"], preset="cifar10",
                    log=lambda *_: None)


def test_cli_lists_the_cifar10_runs_without_files_and_refuses_to_run_without_them(tmp_path, monkeypatch, capsys):
    from vitlab.cli import main

    _empty_places(monkeypatch, tmp_path)
    assert main(["study", "cvt-conv-proj-stages", "--preset", "cifar10", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[cvt-conv-proj-stages] cifar10 preset:") and "training FLOPs" in out[1]
    assert sum(line.startswith(("none-s", "stage3-s", "stages2-3-s", "all-s")) for line in out) == 12
    assert main(["study", "cvt-conv-proj-stages", "--preset", "cifar10", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitlab study: error: study 'cvt-conv-proj-stages' trains on "
                                               "CIFAR-10, whose files are not found")
    assert not (tmp_path / "o" / "runs").exists()


def _fake_cifar10_archive(folder: Path, per_batch: int = 12, seed: int = 0) -> Path:
    """cifar-10-python.tar.gz laid out like the official one (random pixels, 12 images per batch)."""
    rng = np.random.default_rng(seed)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    members = {"batches.meta": {b"label_names": names}}
    for m in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        members[m] = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                      b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
    folder.mkdir(parents=True)
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
        for m, obj in members.items():
            raw = pickle.dumps(obj, protocol=4)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{m}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return folder


def test_cifar10_preset_runs_end_to_end_on_a_generated_archive(tmp_path, monkeypatch):
    _empty_places(monkeypatch, tmp_path)
    data = _fake_cifar10_archive(tmp_path / "cifar")
    out = tmp_path / "out"
    # shrunk: two arms, one seed, one epoch, a one-block ViT; the stand-in's checksums are not the
    # published ones, so verification is off
    rows = S.run_study("pos-embed", out, ["kinds=none,learned", "seeds=0", "epochs=1", "batch_size=20",
                                          "train.model_kwargs.depth=1", "train.model_kwargs.embed_dim=32",
                                          f"train.data_dir={data}", "train.data_options.verify=false"],
                       preset="cifar10", plot=False, log=lambda *_: None)
    assert [r["pos_embed"] for r in rows] == ["none", "learned"]
    arms = list(csv.DictReader(open(out / "table.csv")))
    assert [a["pos_embed"] for a in arms] == ["none", "learned"] and all(a["seeds"] == "1" for a in arms)
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert [int(r["train_images"]) for r in runs] == [60, 60]  # the archive's 5 x 12 training images
    assert "pos_embed" in (out / "table.md").read_text()
    cfg = yaml.safe_load((out / "runs" / "learned-s0" / "config.yaml").read_text())
    assert (cfg["dataset"], cfg["img_size"], cfg["model"], cfg["pad_crop"], cfg["hflip"]) == \
        ("cifar10", 32, "vit_micro_p4", 4, True)
    assert cfg["model_kwargs"] == {"pos_embed": "learned", "depth": 1, "embed_dim": 32}
