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

import vitlab
from vitlab import ConfigError
from vitlab.studies import study as S

# the mpp study exercises every kind of run: pre-training (objective mpp), training from
# scratch, and fine-tuning from the pre-trained run of the same study
TINY = ["pretrain_epochs=1", "train_fraction=1.0", "fractions=0.3", "seeds=0", "train.batch_size=128", "train.warmup_epochs=0",
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
    table = list(csv.DictReader(open(tmp_path / "a" / "runs.csv")))
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
    params, train = S.resolve_params(study, ["lrs=1e-3,3e-3", "seeds=0", "train.weight_decay=0.1"], epochs=3)
    assert params["lrs"] == [1e-3, 3e-3] and params["epochs"] == 3 and train == {"weight_decay": "0.1"}
    runs = study.build(params)
    assert [r.columns["pool"] for r in runs] == ["cls", "cls", "gap", "gap", "map", "map"]
    assert {r.overrides["model_kwargs"]["global_pool"] for r in runs} == {"token", "avg", "map"}
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

    for name, preset in [(n, p) for n in ("data-scaling", "pooling", "pos-embed", "cvt-ablation", "convmixer-kernel",
                                          "mpp", "cvt-conv-proj-stages", "mpp-targets", "optimizer", "model-scaling")
                         for p in ("small", "paper")]:
        study = S.get_study(name)
        params, train = S.resolve_params(study, preset=preset)
        specs = study.build(params)
        assert len({s.name for s in specs}) == len(specs) > 1
        for spec in specs:
            cfg = S.make_config(study, params, train, spec, tmp_path).validate()
            with torch.device("meta"):
                create_model(cfg.model, num_classes=10, in_chans=1, img_size=cfg.img_size or 8,
                             **cfg.model_overrides())
            assert cfg.seed in params["seeds"] or spec.name.startswith(("mpp-pretrain", "pretrain-"))
        if preset == "small":   # every arm has the default three seeds
            assert all(len(n) == 3 for n in S._group_sizes(
                [{**sp.columns} for sp in specs if not sp.name.startswith(("mpp-pretrain", "pretrain-"))]).values())


def test_markdown_and_csv_tables():
    rows = [{"run": "a", "x": 1, "val_acc": 0.5, "_wall_s": 3.0}, {"run": "b", "x": 2, "val_acc": None}]
    assert S.to_csv(rows) == "run,x,val_acc\na,1,0.5\nb,2,\n"
    md = S.to_markdown(rows).splitlines()
    assert md[0] == "| run | x | val_acc |" and md[3] == "| b | 2 | - |"


def test_seeds_make_arms_with_mean_std_spread_and_verdict(tmp_path, monkeypatch):
    """2 arms x 2 seeds: table.csv has one row per arm whose mean/std/spread are those of the
    runs' own summaries, and the verdict compares the claimed difference with the spread."""
    import statistics

    def build(p):
        return [S.RunSpec(f"{pe}-s{seed}", {"model": "vit_nano_p2", "model_kwargs": {"pos_embed": pe, "depth": 1,
                                                                                    "embed_dim": 16, "num_heads": 2},
                                            "seed": seed, "batch_size": 128, "warmup_epochs": 0,
                                            "train_fraction": 0.3, "lr": 3e-3},
                          {"pos_embed": pe, "seed": seed})
                for pe in ("learned", "none") for seed in p["seeds"]]

    study = S.Study("tiny", "two arms", "learned beats none", {"dataset": "digits", "epochs": 1, "seeds": [0, 1]},
                    build, plot=lambda rows, p, path: None, base={"val_fraction": 0.25},
                    claims=[S.Claim({"pos_embed": "learned"}, {"pos_embed": "none"}, "learned beats none")])
    monkeypatch.setitem(S.STUDIES, "tiny", study)
    S.run_study("tiny", tmp_path, plot=False, log=lambda *_: None)
    arms = {r["pos_embed"]: r for r in csv.DictReader(open(tmp_path / "table.csv"))}
    assert set(arms) == {"learned", "none"}
    stats = {}
    for pe, arm in arms.items():
        accs = [json.loads((tmp_path / "runs" / f"{pe}-s{s}" / "summary.json").read_text())["val_acc"]
                for s in (0, 1)]
        assert int(arm["seeds"]) == 2
        assert float(arm["val_acc_mean"]) == pytest.approx((accs[0] + accs[1]) / 2, abs=1e-4)
        # sample standard deviation of two values = |a - b| / sqrt(2)
        assert float(arm["val_acc_std"]) == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5, abs=1e-4)
        assert float(arm["val_acc_spread"]) == pytest.approx(abs(accs[0] - accs[1]), abs=1e-4)
        stats[pe] = (statistics.fmean(accs), statistics.stdev(accs))
    diff = stats["learned"][0] - stats["none"][0]
    noise = (stats["learned"][1] ** 2 + stats["none"][1] ** 2) ** 0.5
    expected = "within the spread" if abs(diff) <= noise else "holds" if diff > 0 else "reversed"
    assert arms["learned"]["verdict"].startswith("vs pos_embed=none: " + expected)
    assert arms["none"]["verdict"] == ""
    runs = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert len(runs) == 4
    md = (tmp_path / "table.md").read_text()
    assert "## arms (mean ± std over seeds)" in md and "learned beats none" in md


def test_verdicts_pair_arms_and_compare_with_the_noise():
    rows = [{"run": f"{m}-{f}-{s}", "model": m, "fraction": f, "seed": s, "val_acc": v}
            for m, f, vals in [("resnet", 0.1, [0.90, 0.92]), ("vit", 0.1, [0.50, 0.52]),
                               ("resnet", 1.0, [0.95, 0.99]), ("vit", 1.0, [0.96, 0.98])]
            for s, v in enumerate(vals)]
    arms = S.aggregate_arms(rows)
    assert [(a["model"], a["fraction"], a["val_acc_mean"]) for a in arms] == \
        [("resnet", 0.1, 0.91), ("vit", 0.1, 0.51), ("resnet", 1.0, 0.97), ("vit", 1.0, 0.97)]
    v = S.judge_claims(arms, [S.Claim({"model": "resnet"}, {"model": "vit"}, "resnet wins")])
    assert [(x["at"], x["verdict"]) for x in v] == [("fraction=0.1", "holds (beyond the spread)"),
                                                    ("fraction=1.0", "within the spread")]
    assert v[0]["noise"] == pytest.approx((2 * 0.01414 ** 2) ** 0.5, abs=1e-3)
    rev = S.judge_claims(arms, [S.Claim({"model": "vit"}, {"model": "resnet"}, "vit wins")])
    assert rev[0]["verdict"] == "reversed (beyond the spread)"


def test_plots_draw_one_std_error_bars(tmp_path):
    import matplotlib.pyplot as plt

    from vitlab.studies.presets import bar_plot, line_plot

    rows = [{"lr": 0.1, "pool": "cls", "val_acc": 0.5}, {"lr": 0.1, "pool": "cls", "val_acc": 0.7}]
    fig, ax = plt.subplots()
    line_plot(rows, tmp_path / "l.png", "lr", "pool", ax=ax)
    (bars,) = ax.containers
    seg = bars.lines[2][0].get_segments()[0]          # the error bar's vertical segment, in percent
    assert seg[0][1] == pytest.approx(60 - 14.142, abs=1e-2) and seg[1][1] == pytest.approx(60 + 14.142, abs=1e-2)
    plt.close(fig)
    bar_plot(rows, tmp_path / "b.png", "pool")
    assert (tmp_path / "b.png").stat().st_size > 0


def _arms(name, preset="small", overrides=None):
    study = S.get_study(name)
    params, _ = S.resolve_params(study, overrides, preset=preset)
    return study, params, study.build(params)


def test_cvt_conv_proj_stages_grid():
    study, params, specs = _arms("cvt-conv-proj-stages")
    arms = {s.columns["conv_proj"]: s.overrides["model_kwargs"]["conv_proj"] for s in specs}
    assert arms == {"none": [False, False, False], "stage3": [False, False, True],
                    "stages2-3": [False, True, True], "all": [True, True, True]}
    assert len(specs) == 4 * 3 and params["dataset"] == "fashion-mnist"
    cfg = S.make_config(study, params, {}, specs[0], S.Path("/tmp"))
    assert cfg.train_fraction == 0.05 and cfg.img_size == 28


def test_mpp_targets_grid_pretrains_once_per_target_and_rate():
    _, params, specs = _arms("mpp-targets", overrides=["targets=color3bit,l2", "mask_rates=0.15,0.5", "seeds=0,1"])
    pre = [s for s in specs if s.overrides.get("objective") == "mpp"]
    assert sorted((s.overrides["objective_kwargs"]["target"], s.overrides["objective_kwargs"]["mask_rate"])
                  for s in pre) == [("color3bit", 0.15), ("color3bit", 0.5), ("l2", 0.15), ("l2", 0.5)]
    ft = [s for s in specs if s.init_from]
    slug = {0.15: "0p15", 0.5: "0p5"}
    assert len(ft) == 4 * 2 and all(s.init_from == f"pretrain-{s.columns['target']}-m{slug[s.columns['mask_rate']]}"
                                    for s in ft)
    names = [s.name for s in specs]
    assert all(names.index(s.init_from) < names.index(s.name) for s in ft)   # pre-training runs first
    assert [s.name for s in specs if s.columns["init"] == "scratch"] == ["scratch-s0", "scratch-s1"]
    # fine-tuned on the labelled subset; pre-trained on the (larger) unlabelled pool, the study's train_fraction
    assert all(s.overrides["train_fraction"] == params["finetune_fraction"] for s in ft)
    assert all("train_fraction" not in s.overrides for s in pre) and params["train_fraction"] > params["finetune_fraction"]


def test_optimizer_grid_pairs_adam_wd01_with_sgd_momentum():
    _, params, specs = _arms("optimizer")
    by = {(s.columns["model"], s.columns["optimizer"]) for s in specs}
    assert by == {("resnet", "adam"), ("resnet", "sgd"), ("vit", "adam"), ("vit", "sgd")}
    adam = next(s for s in specs if s.columns["optimizer"] == "adam").overrides
    sgd = next(s for s in specs if s.columns["optimizer"] == "sgd").overrides
    assert (adam["optimizer"], adam["weight_decay"]) == ("adamw", 0.1)  # decoupled, as the paper's JAX Adam
    assert (sgd["optimizer"], sgd["momentum"]) == ("sgd", 0.9)
    _, _, paper = _arms("optimizer", "paper")
    assert {s.overrides["model"] for s in paper} == {"resnet50_bit"}


def test_model_scaling_grid_grows_each_family():
    import torch

    from vitlab import create_model
    from vitlab.flops import count_params

    study, params, specs = _arms("model-scaling", overrides=["seeds=0"])
    assert [(s.columns["model"], s.columns["size"]) for s in specs] == \
        [(f, z) for f in ("vit", "resnet", "hybrid") for z in ("S", "M", "L")]
    for fam in ("vit", "resnet", "hybrid"):
        sizes = []
        for s in specs:
            if s.columns["model"] == fam:
                cfg = S.make_config(study, params, {}, s, S.Path("/tmp")).validate()
                with torch.device("meta"):
                    sizes.append(count_params(create_model(cfg.model, num_classes=10, in_chans=1, img_size=16,
                                                           **cfg.model_overrides())))
        assert sizes == sorted(sizes) and sizes[-1] > 4 * sizes[0], (fam, sizes)
    _, _, paper = _arms("model-scaling", "paper")
    assert {s.overrides["model"] for s in paper} >= {"vit_l16", "resnet152x2_bit", "r50_vit_l16"}


def test_paper_preset_prints_its_setting_and_cost_before_starting(tmp_path, monkeypatch):
    study = S.get_study("convmixer-kernel")
    params, train = S.resolve_params(study, preset="paper")
    assert (params["dataset"], params["dim"], params["epochs"]) == ("cifar10", 256, 200)
    flops = S.estimate_training_flops(study, params, train, 50_000)
    # 12 runs x 3 x forward FLOPs x 200 epochs x 50,000 images
    cfg = S.make_config(study, params, train, study.build(params)[0], tmp_path)
    fwd = S.forward_flops_per_image({**cfg.to_dict(), "num_classes": 1000, "in_chans": 3})
    assert flops == pytest.approx(3 * 200 * 50_000 * sum(
        S.forward_flops_per_image({**S.make_config(study, params, train, sp, tmp_path).to_dict(),
                                   "num_classes": 1000, "in_chans": 3}) for sp in study.build(params)))
    assert fwd > 0
    lines = []

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "execute_run", stop)
    # (the paper's CIFAR-10 files are not here: the check that stops a study before its first run
    # without them is tested in test_study_presets.py)
    monkeypatch.setattr(S, "check_data_files", lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        S.run_study("convmixer-kernel", tmp_path, preset="paper", log=lines.append)
    assert "paper preset: ConvMixer paper's CIFAR-10 setting" in lines[0]
    assert f"{flops:.3g} training FLOPs" in lines[0] and "GPU-hours" in lines[0]
    with pytest.raises(ConfigError, match="preset"):
        S.resolve_params(study, preset="huge")


def test_every_study_plots_its_arms_from_per_seed_rows(tmp_path):
    """Each study's plot draws from rows shaped like collect_row's (synthetic accuracies)."""
    import random

    rng = random.Random(0)
    S.get_study("pooling")  # registers the built-in studies
    assert len(S.STUDIES) >= 10
    for name in sorted(S.STUDIES):
        study = S.get_study(name)
        params, _ = S.resolve_params(study)
        rows = [{"run": sp.name, **sp.columns, "train_images": 100, "images_seen": 1000, "train_gflops": 1.5 + i,
                 "val_acc": None if "pretrain" in sp.name else rng.uniform(0.5, 0.9)}
                for i, sp in enumerate(study.build(params))]
        study.plot(rows, params, tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000, name
        arms = S.aggregate_arms(rows)
        assert sum(a["seeds"] for a in arms) == len(rows)


def test_convmixer_patch_study_varies_only_the_patch_size(tmp_path):
    """Each arm builds a ConvMixer whose patch embedding has the arm's patch size (and token grid),
    everything else equal; the claim compares the finest with the coarsest patch."""
    study = S.get_study("convmixer-patch")
    params, train = S.resolve_params(study)
    specs = study.build(params)
    assert sorted({s.columns["patch_size"] for s in specs}) == [2, 4, 7]
    assert len(specs) == 3 * len(params["seeds"])
    shapes = {}
    for spec in specs:
        cfg = S.make_config(study, params, train, spec, tmp_path)
        cfg.validate()
        model = vitlab.create_model(cfg.model, num_classes=10, img_size=cfg.img_size, in_chans=1, **cfg.model_overrides())
        kw = {k: v for k, v in cfg.model_kwargs.items() if k != "patch_size"}
        shapes.setdefault(spec.columns["patch_size"], (tuple(model.patch_embed.weight.shape), json.dumps(kw, sort_keys=True)))
    assert {p: s[0][-1] for p, s in shapes.items()} == {2: 2, 4: 4, 7: 7}
    assert len({s[1] for s in shapes.values()}) == 1  # the same width, depth and kernel in every arm
    assert study.claims and study.claims[0].better == {"patch_size": 2} and study.claims[0].worse == {"patch_size": 7}
