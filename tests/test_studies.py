"""`vitlab study`: an interrupted study resumes (finished runs are not redone, a half-finished
run continues from its checkpoint) and ends with the same table as an uninterrupted one;
MPP pre-training feeds fine-tuning; options are checked."""
from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from vitlab import ConfigError
from vitlab.studies import study as S

# the mpp study exercises every kind of run: pre-training (objective mpp), training from
# scratch, and fine-tuning from the pre-trained run of the same study
TINY = ["pretrain_epochs=1", "fractions=0.3", "train.batch_size=128", "train.warmup_epochs=0",
        "train.model_kwargs.depth=1",
        "train.model_kwargs.embed_dim=32", "train.model_kwargs.num_heads=2"]


def _run(out, **kw):
    return S.run_study("mpp", out, TINY, dataset="digits", epochs=2, plot=False, log=lambda *_: None, **kw)


def test_interrupted_study_resumes_to_the_same_table(tmp_path, monkeypatch):
    reference = _run(tmp_path / "a")
    assert [r["run"] for r in reference] == ["mpp-pretrain", "scratch-f0p3-s0", "mpp-f0p3-s0"]
    ref_csv = (tmp_path / "a" / "table.csv").read_text()

    real = S.train_run
    calls = []

    # session 1: killed before the second run starts
    def killed_at_second(cfg, **kw):
        calls.append(cfg.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, **kw)

    monkeypatch.setattr(S, "train_run", killed_at_second)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b")
    assert S.read_summary(tmp_path / "b" / "runs" / "mpp-pretrain") is not None

    # session 2: the second run is killed half-way (after 2 of its 4 steps, with a checkpoint)
    calls.clear()

    def killed_half_way(cfg, **kw):
        calls.append((cfg.name, cfg.resume))
        if len(calls) == 1:
            return real(dataclasses.replace(cfg, max_steps=2), **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "train_run", killed_half_way)
    with pytest.raises(S.StudyIncomplete):
        _run(tmp_path / "b")
    assert calls == [("scratch-f0p3-s0", None)]  # the finished pre-training was not redone
    half = tmp_path / "b" / "runs" / "scratch-f0p3-s0"
    assert json.loads((half / "checkpoints" / "last.json").read_text())["step"] == 2

    # session 3: the half-finished run resumes from its checkpoint, the last one trains
    calls.clear()

    def recording(cfg, **kw):
        calls.append((cfg.name, cfg.resume))
        return real(cfg, **kw)

    monkeypatch.setattr(S, "train_run", recording)
    rows = _run(tmp_path / "b")
    assert calls == [("scratch-f0p3-s0", str(half)), ("mpp-f0p3-s0", None)]
    assert (tmp_path / "b" / "table.csv").read_text() == ref_csv
    assert rows == reference

    # a fourth invocation trains nothing and writes the same table again
    calls.clear()
    _run(tmp_path / "b")
    assert calls == []
    assert (tmp_path / "b" / "table.csv").read_text() == ref_csv

    # what the table says
    table = list(csv.DictReader(open(tmp_path / "a" / "table.csv")))
    by = {r["run"]: r for r in table}
    n_full = 1797 - sum(round(0.25 * n) for n in np.bincount(load_digits().target))  # 25% held out per class
    assert int(by["mpp-pretrain"]["train_images"]) == n_full
    n_sub = int(by["scratch-f0p3-s0"]["train_images"])
    assert n_sub == int(by["mpp-f0p3-s0"]["train_images"])
    assert abs(n_sub - 0.3 * n_full) <= 10                          # 30% of every class
    assert by["mpp-pretrain"]["val_acc"] == ""                      # MPP has no classification accuracy
    assert 0.0 <= float(by["mpp-f0p3-s0"]["val_acc"]) <= 1.0
    # training compute = 3 x forward FLOPs x images seen (2 epochs of every image: the last partial
    # batch of 128 is used too)
    seen = 2 * n_sub
    assert int(by["scratch-f0p3-s0"]["images_seen"]) == seen
    fwd = float(by["scratch-f0p3-s0"]["fwd_mflops_per_image"]) * 1e6
    assert float(by["scratch-f0p3-s0"]["train_gflops"]) == pytest.approx(3 * fwd * seen / 1e9, rel=1e-3)
    # the fine-tuned run really started from the pre-trained ViT (not from scratch)
    cfg = (tmp_path / "a" / "runs" / "mpp-f0p3-s0" / "config.yaml").read_text()
    assert "init_from:" in cfg and "mpp-pretrain" in cfg
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert len(meta["sessions"]) == 2 and "CPU" in meta["machine"]


def test_options_are_checked():
    study = S.get_study("pooling")
    params, train = S.resolve_params(study, ["lrs=1e-3,3e-3", "train.weight_decay=0.1"], epochs=3)
    assert params["lrs"] == [1e-3, 3e-3] and params["epochs"] == 3 and train == {"weight_decay": "0.1"}
    runs = study.build(params)
    assert [r.columns["pool"] for r in runs] == ["cls", "cls", "gap", "gap"]
    assert {r.overrides["model_kwargs"]["global_pool"] for r in runs} == {"token", "avg"}
    with pytest.raises(ConfigError, match="lrs"):
        S.resolve_params(study, ["lr=1e-3"])
    with pytest.raises(ConfigError, match="integer"):
        S.resolve_params(S.get_study("convmixer-kernel"), ["kernels=3,five"])
    with pytest.raises(ConfigError, match="data-scaling"):
        S.get_study("data_scaling")


def test_every_builtin_study_builds_valid_configs(tmp_path):
    """Every run of every preset makes a valid TrainConfig and a model that builds."""
    import torch

    from vitlab import create_model

    for name in ("data-scaling", "pooling", "pos-embed", "cvt-ablation", "convmixer-kernel", "mpp"):
        study = S.get_study(name)
        params, train = S.resolve_params(study)
        specs = study.build(params)
        assert len({s.name for s in specs}) == len(specs) > 1
        for spec in specs:
            cfg = S.make_config(study, params, train, spec, tmp_path).validate()
            with torch.device("meta"):
                create_model(cfg.model, num_classes=10, in_chans=1, img_size=cfg.img_size or 8,
                             **cfg.model_overrides())


def test_markdown_and_csv_tables():
    rows = [{"run": "a", "x": 1, "val_acc": 0.5, "_wall_s": 3.0}, {"run": "b", "x": 2, "val_acc": None}]
    assert S.to_csv(rows) == "run,x,val_acc\na,1,0.5\nb,2,\n"
    md = S.to_markdown(rows).splitlines()
    assert md[0] == "| run | x | val_acc |" and md[3] == "| b | 2 | - |"
