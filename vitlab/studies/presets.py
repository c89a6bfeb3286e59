"""The built-in studies: the seeds' experimental claims, each as a small grid of runs.

Defaults (the small preset) are sized for 2 CPU cores: scikit-learn's 8x8 digits (upsampled to
16 px where a model needs a larger token grid) where the arms separate there, Fashion-MNIST at
28 px (10% of its training set) where digits is at the ceiling (convmixer-kernel,
cvt-conv-proj-stages, model-scaling); models of 0.03-0.6 M parameters; a few epochs; three seeds
per arm. `--preset paper` starts from the paper's setting instead (`Study.paper`), printing it and
its counted training compute before it starts. `--preset cifar10` (`Study.cifar10`, see CIFAR10
below) runs the same grid on CIFAR-10 at 32 px with slightly larger models, for one consumer GPU:
it prints the same banner (compute counted on 50,000 images), trains every run with pad-and-crop
and flips, and stops in one line before the first run when the CIFAR-10 files are not in
train.data_dir=DIR or $VITLAB_DATA/cifar10/ (`--list` prints the runs without them). Every size
is an option: `vitlab study data-scaling --dataset mnist --epochs 30 img_size=28
fractions=0.01,0.1,1.0 vit=vit_micro_p4 ...`.
"""
from __future__ import annotations

from pathlib import Path

from .study import Claim, RunSpec, Study, register_study


# digits' default 10% validation split is 179 images (one image = 0.56 points): every study holds
# out 25% instead (449 images); data sets with an official test set ignore this
BASE = {"val_fraction": 0.25}

# `--preset cifar10` (Study.cifar10): every study's grid on CIFAR-10 at its native 32 px, three
# seeds, each study sized to a few GPU-hours at most (the banner prints its counted compute).
# Models a little larger than the small preset's: ViT-micro with 4x4 patches (64 tokens, 128
# wide, 6 deep), cvt_tiny (16/8/4 token grids), ConvMixer-256/8 with patch 2 (the ConvMixer
# paper's CIFAR setting, fewer epochs), the half-width ResNet-18 and the stride-4 hybrid.
# Every run also gets study.CIFAR10_TRAIN (pad-and-crop, flips); the files come from
# train.data_dir=DIR or $VITLAB_DATA/cifar10/, checked before the first run.
CIFAR10 = {"dataset": "cifar10", "img_size": 32, "seeds": [0, 1, 2]}


def _slug(v) -> str:
    return str(v).replace(".", "p").replace("-", "m").replace("/", "_")


def _model_fields(name: str, kwargs: dict) -> dict:
    return {"model": name, "model_kwargs": dict(kwargs)}


# ----------------------------------------------------------------------------- plots
def _mean_by(rows, x, series, y):
    """{series value: sorted [(x, mean y, std y)]} over rows that share (series, x) (the seeds);
    std is the sample standard deviation (0 for a single seed)."""
    import statistics

    acc: dict = {}
    for r in rows:
        if r.get(y) is None or r.get(x) is None:
            continue
        acc.setdefault(r.get(series) if series else "", {}).setdefault(r[x], []).append(float(r[y]))
    return {s: sorted((k, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in d.items())
            for s, d in acc.items()}


def line_plot(rows, path: Path, x: str, series: str | None, y: str = "val_acc", logx: bool = False,
              title: str = "", xlabel: str | None = None, ax=None):
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(5.5, 4))
    for s, pts in _mean_by(rows, x, series, y).items():
        # error bars: one standard deviation over the seeds
        ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts], marker="o",
                    capsize=3, label=str(s) if series else None)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    if own:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def bar_plot(rows, path: Path, label: str, y: str = "val_acc", title: str = "", group: str | None = None):
    import matplotlib.pyplot as plt

    pts = _mean_by(rows, label, group, y)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 4))
    width = 0.8 / max(len(pts), 1)
    labels = []
    for g in pts.values():
        for k, _, _ in g:
            if k not in labels:
                labels.append(k)
    for i, (g, vals) in enumerate(pts.items()):
        d = {k: (m, sd) for k, m, sd in vals}
        xs = [j + (i - (len(pts) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [100 * d.get(k, (float("nan"), 0.0))[0] for k in labels], width=width,
               yerr=[100 * d.get(k, (0.0, 0.0))[1] for k in labels], capsize=3, label=str(g) if group else None)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([str(k) for k in labels], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("validation accuracy (%)")
    vals = [100 * v for g in pts.values() for _, v, _ in g]
    if vals:
        ax.set_ylim(max(0.0, min(vals) - 10), min(100.0, max(vals) + 3))
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if group:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- data-scaling
DATA_SCALING_MODELS = {
    # family: (registered variant, size overrides) -- ~16 tokens each at 16 px
    "vit": ("vit_nano_p2", {"patch_size": 4}),
    "hybrid": ("rsmall_vit_micro", {"embed_dim": 64, "depth": 4, "num_heads": 4}),
    "resnet": ("resnet_small", {"width_factor": 0.25, "num_groups": 8}),
    "cvt": ("cvt_tiny", {}),
    "convmixer": ("convmixer_256_8", {"dim": 64, "depth": 4, "patch_size": 2, "kernel_size": 5}),
}


def _data_scaling_runs(p: dict) -> list[RunSpec]:
    runs = []
    for fam in p["models"]:
        name, kw = DATA_SCALING_MODELS[fam]
        name = p.get(fam) or name
        if p.get(fam):
            kw = {}
        for f in p["fractions"]:
            for seed in p["seeds"]:
                runs.append(RunSpec(f"{fam}-f{_slug(f)}-s{seed}",
                                    {**_model_fields(name, kw), "train_fraction": float(f), "seed": int(seed),
                                     "img_size": p["img_size"], "lr": p["lr"], "batch_size": p["batch_size"]},
                                    {"model": fam, "variant": name, "fraction": float(f), "seed": int(seed)}))
    return runs


def _data_scaling_plot(rows, p, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    line_plot(rows, path, "train_images", "model", logx=True, ax=axes[0], xlabel="training images",
              title="accuracy vs training-set size")
    rows_c = [dict(r, train_flops=r["train_gflops"] * 1e9) for r in rows]
    line_plot(rows_c, path, "train_flops", "model", logx=True, ax=axes[1], xlabel="training compute (FLOPs, counted)",
              title="accuracy vs training compute")
    fig.suptitle(f"data-scaling on {p['dataset']} ({p['epochs']} epochs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


register_study(Study(
    name="data-scaling",
    description="ViT, hybrid, BiT-style ResNet, CvT and ConvMixer trained on nested subsets of one data set: "
                "accuracy against training-set size and against counted training compute.",
    claim="ViT paper (Fig. 3-4): with little data ViT trails ResNets (less inductive bias) and overtakes them "
          "only with large data sets (JFT-300M); hybrids help at small compute.",
    params={"dataset": "digits", "epochs": 20, "fractions": [0.1, 0.3, 1.0], "seeds": [0, 1, 2],
            "models": list(DATA_SCALING_MODELS), "img_size": 16, "lr": 3e-3, "batch_size": 64,
            "vit": "", "hybrid": "", "resnet": "", "cvt": "", "convmixer": ""},
    claims=[Claim({"model": "resnet"}, {"model": "vit"}, "with little data ResNets beat ViT (ViT Fig. 3)",
                  pair_on=("fraction",)),
            Claim({"model": "hybrid"}, {"model": "vit"}, "hybrids beat ViT at small compute (ViT Fig. 5)",
                  pair_on=("fraction",))],
    paper={"dataset": "imagefolder", "epochs": 90, "fractions": [0.1, 0.3, 1.0], "img_size": 224, "lr": 1e-3,
           "batch_size": 4096, "models": ["vit", "hybrid", "resnet"], "vit": "vit_b16", "hybrid": "r50_vit_b16",
           "resnet": "resnet50_bit", "cvt": "cvt_13", "convmixer": "convmixer_768_32"},
    paper_cost="ViT paper Fig. 3: ImageNet-21k subsets (train.data_dir=...; the paper also uses JFT-300M), "
               "ViT-B/16, R50+ViT-B/16, BiT R50x1, 90 epochs at 224 px",
    paper_images=14_000_000,
    cifar10={**CIFAR10, "epochs": 30, "fractions": [0.1, 0.3, 1.0], "lr": 1e-3, "batch_size": 128,
             "vit": "vit_micro_p4", "hybrid": "rsmall_vit_micro", "resnet": "resnet_small", "cvt": "cvt_tiny",
             "convmixer": "convmixer_256_8"},
    cifar10_cost="ViT-micro/4, R-small+ViT-micro hybrid, half-width ResNet-18, CvT-tiny and ConvMixer-256/8 on "
                 "10%, 30% and 100% of CIFAR-10, 30 epochs at 32 px",
    base=BASE,
    build=_data_scaling_runs, plot=_data_scaling_plot,
))


# ----------------------------------------------------------------------------- pooling
def _pooling_runs(p):
    runs = []
    for pool in p["pools"]:
        for lr in p["lrs"]:
            for seed in p["seeds"]:
                gp = {"cls": "token", "gap": "avg", "map": "map"}[pool]
                runs.append(RunSpec(f"{pool}-lr{_slug(lr)}-s{seed}",
                                    {**_model_fields(p["model"], {"global_pool": gp}), "lr": float(lr),
                                     "seed": int(seed), "batch_size": p["batch_size"], "min_lr": 0.0},
                                    {"pool": pool, "lr": float(lr), "seed": int(seed)}))
    return runs


register_study(Study(
    name="pooling",
    description="Class token (CLS) against global average pooling (GAP) of the patch tokens, and big_vision's "
                "multi-head attention pooling (MAP) as the third arm, across a learning-rate sweep.",
    claim="ViT paper (Appendix D.3, Fig. 9): both work equally well, but need different learning rates; "
          "GAP with the CLS learning rate performs poorly.",
    params={"dataset": "digits", "epochs": 30, "model": "vit_nano_p2", "pools": ["cls", "gap", "map"],
            "lrs": [3e-4, 1e-3, 3e-3, 1e-2], "seeds": [0, 1, 2], "batch_size": 64},
    claims=[Claim({"pool": "cls"}, {"pool": "gap"}, "GAP at the CLS learning rate performs poorly (ViT Fig. 9)")],
    paper={"dataset": "imagefolder", "img_size": 224, "epochs": 90, "model": "vit_b16", "lrs": [1e-4, 3e-4, 1e-3, 3e-3],
           "batch_size": 4096},
    paper_cost="ViT paper Fig. 9: ViT-B/16 on ImageNet-1k (train.data_dir=...), 90 epochs per arm",
    paper_images=1_281_167,
    cifar10={**CIFAR10, "epochs": 30, "model": "vit_micro_p4", "lrs": [1e-4, 3e-4, 1e-3, 3e-3], "batch_size": 128},
    cifar10_cost="ViT-micro/4 (64 tokens) on CIFAR-10, 30 epochs per arm at 32 px",
    base=BASE,
    build=_pooling_runs,
    plot=lambda rows, p, path: line_plot(rows, path, "lr", "pool", logx=True, xlabel="learning rate",
                                         title=f"CLS vs GAP on {p['dataset']} ({p['epochs']} epochs)"),
))


# ----------------------------------------------------------------------------- pos-embed
def _pos_runs(p):
    return [RunSpec(f"{kind}-s{seed}",
                    {**_model_fields(p["model"], {"pos_embed": kind}), "seed": int(seed), "lr": p["lr"],
                     "batch_size": p["batch_size"]},
                    {"pos_embed": kind, "seed": int(seed)})
            for kind in p["kinds"] for seed in p["seeds"]]


register_study(Study(
    name="pos-embed",
    description="ViT without position embedding, with learned 1D, learned 2D (row/column), fixed 2D "
                "sinusoidal and relative position embeddings.",
    claim="ViT paper (Appendix D.4, Table 8): no position embedding is clearly worse; 1D, 2D and relative "
          "embeddings perform about the same.",
    params={"dataset": "digits", "epochs": 30, "model": "vit_nano_p2",
            "kinds": ["none", "learned", "learned_2d", "sincos_2d", "relative"], "seeds": [0, 1, 2], "lr": 3e-3,
            "batch_size": 64},
    claims=[Claim({"pos_embed": k}, {"pos_embed": "none"}, "no position embedding is clearly worse (ViT Table 8)")
            for k in ("learned", "learned_2d", "sincos_2d")],
    paper={"dataset": "imagefolder", "img_size": 224, "epochs": 90, "model": "vit_b16", "lr": 1e-3, "batch_size": 4096},
    paper_cost="ViT paper Table 8: ViT-B/16 on ImageNet-1k (train.data_dir=...), 90 epochs",
    paper_images=1_281_167,
    cifar10={**CIFAR10, "epochs": 30, "model": "vit_micro_p4", "lr": 1e-3, "batch_size": 128},
    cifar10_cost="ViT-micro/4 (an 8x8 token grid) on CIFAR-10, 30 epochs at 32 px",
    base=BASE,
    build=_pos_runs,
    plot=lambda rows, p, path: bar_plot(rows, path, "pos_embed",
                                        title=f"position embeddings on {p['dataset']} ({p['epochs']} epochs)"),
))


# ----------------------------------------------------------------------------- cvt-ablation
CVT_VARIANTS = {
    # name: (conv_embed, conv_proj, kv_stride, pos_embed)
    "cvt": (True, True, 2, "none"),
    "cvt+pos": (True, True, 2, "learned"),
    "no-conv-embed": (False, True, 2, "none"),
    "no-conv-embed+pos": (False, True, 2, "learned"),
    "no-conv-proj": (True, False, 2, "none"),
    "kv-stride-1": (True, True, 1, "none"),
}


def _cvt_runs(p):
    runs = []
    for v in p["variants"]:
        ce, cp, kv, pe = CVT_VARIANTS[v]
        for seed in p["seeds"]:
            runs.append(RunSpec(f"{v.replace('+', '-plus-')}-s{seed}",
                                {**_model_fields(p["model"], {"conv_embed": ce, "conv_proj": cp, "kv_stride": kv,
                                                              "pos_embed": pe}),
                                 "seed": int(seed), "img_size": p["img_size"], "lr": p["lr"],
                                 "batch_size": p["batch_size"]},
                                {"variant": v, "conv_embed": ce, "conv_proj": cp, "kv_stride": kv, "pos_embed": pe,
                                 "seed": int(seed)}))
    return runs


register_study(Study(
    name="cvt-ablation",
    description="CvT with and without its convolutional token embedding and convolutional projection, key/value "
                "stride 1 against 2, with and without a position embedding.",
    claim="CvT paper (Tables 5-7): with convolutional token embedding the position embedding can be removed "
          "without loss; removing the convolutional embedding hurts; convolutional projections help; kv stride 2 "
          "cuts FLOPs with little accuracy loss.",
    # Fashion-MNIST at 28 px (14/7/4 token grids), 5% of its training set, as cvt-conv-proj-stages:
    # on 8x8 digits (3 seeds, 2026-12-05) every variant scored 97.9-99.0%, a ceiling where only the
    # conv projection's 0.8 points stood out of the spread
    params={"dataset": "fashion-mnist", "epochs": 6, "model": "cvt_tiny", "variants": list(CVT_VARIANTS),
            "seeds": [0, 1, 2], "img_size": 28, "lr": 3e-3, "batch_size": 64, "train_fraction": 0.05},
    claims=[Claim({"variant": "cvt"}, {"variant": "no-conv-proj"}, "convolutional projection helps (CvT Table 7)",
                  pair_on=()),
            Claim({"variant": "cvt"}, {"variant": "no-conv-embed"}, "convolutional token embedding helps "
                  "(CvT Table 6)", pair_on=()),
            # "no loss" claims: supported when the difference is within the spread or favours `better`
            Claim({"variant": "cvt"}, {"variant": "cvt+pos"}, "with the conv embedding, dropping the position "
                  "embedding costs nothing (CvT Table 5)", pair_on=()),
            Claim({"variant": "cvt"}, {"variant": "kv-stride-1"}, "kv stride 2 costs little against stride 1, "
                  "at fewer FLOPs (CvT Table 7)", pair_on=())],
    paper={"dataset": "imagefolder", "epochs": 100, "model": "cvt_13", "img_size": 224, "lr": 2.5e-4,
           "batch_size": 256, "train_fraction": 1.0},
    paper_cost="CvT paper Tables 5-7: CvT-13 on ImageNet-1k (train.data_dir=...) at 224 px, 100 epochs (the "
               "paper trains 300)",
    paper_images=1_281_167,
    cifar10={**CIFAR10, "epochs": 30, "model": "cvt_tiny", "lr": 1e-3, "batch_size": 128, "train_fraction": 1.0},
    cifar10_cost="CvT-tiny (16/8/4 token grids) on all of CIFAR-10, 30 epochs at 32 px",
    base=BASE,
    build=_cvt_runs,
    plot=lambda rows, p, path: bar_plot(rows, path, "variant",
                                        title=f"CvT ablations on {p['dataset']} ({p['epochs']} epochs)"),
))


# ----------------------------------------------------------------------------- convmixer-kernel
def _convmixer_grid(p, field: str, values, prefix: str):
    """ConvMixer runs at the study's width and depth, `field` (kernel_size or patch_size) taking
    each of `values` and the other fixed at p[field's partner]."""
    fixed = {"dim": p["dim"], "depth": p["depth"]}
    other = "patch_size" if field == "kernel_size" else "kernel_size"
    return [RunSpec(f"{prefix}{v}-s{seed}",
                    {**_model_fields(p["model"], {**fixed, other: p[other], field: int(v)}),
                     "seed": int(seed), "lr": p["lr"], "batch_size": p["batch_size"], "img_size": p["img_size"]},
                    {field: int(v), **fixed, "seed": int(seed)})
            for v in values for seed in p["seeds"]]


register_study(Study(
    name="convmixer-kernel",
    description="ConvMixer at fixed width, depth and patch size with depthwise kernels 3, 5, 7 and 9.",
    claim="ConvMixer paper: larger depthwise kernels (mixing distant locations) improve accuracy (kernel 9 "
          "beats 3 on ImageNet by about 1.5 points at equal width and depth).",
    # Fashion-MNIST at 28 px (a 14x14 token grid), 5% of its 60,000 training images: on 8x8 digits
    # every kernel scored ~99% (a ceiling), so the arms did not separate. Sized from one measured
    # epoch (ConvMixer-64/4 on 6,000 images + the 10,000 test images: 55 s on 2 shared cores):
    # about 20 s per epoch here, 12 runs x 6 epochs ~ 25 min
    params={"dataset": "fashion-mnist", "epochs": 6, "model": "convmixer_256_8", "kernels": [3, 5, 7, 9],
            "dim": 48, "depth": 4, "patch_size": 2, "img_size": 28, "seeds": [0, 1, 2], "lr": 3e-3,
            "batch_size": 64, "train_fraction": 0.05},
    claims=[Claim({"kernel_size": 9}, {"kernel_size": 3}, "kernel 9 beats kernel 3 (ConvMixer Table 1)",
                  pair_on=())],
    paper={"dataset": "cifar10", "epochs": 200, "model": "convmixer_256_8", "kernels": [3, 5, 7, 9], "dim": 256,
           "depth": 8, "patch_size": 2, "img_size": 32, "lr": 1e-2, "batch_size": 512, "train_fraction": 1.0},
    paper_cost="ConvMixer paper's CIFAR-10 setting (ConvMixer-256/8, patch 2, 200 epochs; its ImageNet kernel "
               "ablation uses ConvMixer-1536/20 for 150 epochs)",
    paper_images=50_000,
    cifar10={**CIFAR10, "epochs": 25, "model": "convmixer_256_8", "dim": 256, "depth": 8, "patch_size": 2,
             "lr": 1e-2, "batch_size": 512, "train_fraction": 1.0},
    cifar10_cost="ConvMixer-256/8, patch 2 (the paper's CIFAR-10 model) on all of CIFAR-10, 25 epochs instead "
                 "of 200",
    base=BASE,
    build=lambda p: _convmixer_grid(p, "kernel_size", p["kernels"], "k"),
    plot=lambda rows, p, path: line_plot(rows, path, "kernel_size", None, xlabel="depthwise kernel size",
                                         title=f"ConvMixer-{p['dim']}/{p['depth']} on {p['dataset']}"),
))


# ----------------------------------------------------------------------------- convmixer-patch
register_study(Study(
    name="convmixer-patch",
    description="ConvMixer at fixed width, depth and kernel size with patch sizes 2, 4 and 7.",
    claim="ConvMixer paper: smaller patches (more, finer tokens, at more compute) give higher accuracy "
          "(ConvMixer-1536/20 and -768/32: patch 7 beats patch 14 on ImageNet by 2-3 points).",
    # Fashion-MNIST at 28 px like convmixer-kernel (token grids 14x14, 7x7 and 4x4); kernel 5 keeps
    # the receptive field comparable across the grids. Patch 2 costs about what convmixer-kernel's
    # k5 arm does (~45 s a run on 2 shared cores); the coarser patches cost less
    params={"dataset": "fashion-mnist", "epochs": 6, "model": "convmixer_256_8", "patches": [2, 4, 7],
            "dim": 48, "depth": 4, "kernel_size": 5, "img_size": 28, "seeds": [0, 1, 2], "lr": 3e-3,
            "batch_size": 64, "train_fraction": 0.05},
    claims=[Claim({"patch_size": 2}, {"patch_size": 7}, "patch 2 beats patch 7 (ConvMixer Table 1: finer patches "
                  "win)", pair_on=()),
            Claim({"patch_size": 4}, {"patch_size": 7}, "patch 4 beats patch 7", pair_on=())],
    paper={"dataset": "imagefolder", "epochs": 150, "model": "convmixer_1536_20", "patches": [7, 14], "dim": 1536,
           "depth": 20, "kernel_size": 9, "img_size": 224, "lr": 1e-2, "batch_size": 64, "train_fraction": 1.0},
    paper_cost="ConvMixer paper Table 1: ConvMixer-1536/20, kernel 9, patch 7 against 14 on ImageNet-1k "
               "(train.data_dir=...), 150 epochs",
    paper_images=1_281_167,
    cifar10={**CIFAR10, "epochs": 25, "model": "convmixer_256_8", "patches": [1, 2, 4], "dim": 256, "depth": 8,
             "kernel_size": 5, "lr": 1e-2, "batch_size": 512, "train_fraction": 1.0},
    cifar10_cost="ConvMixer-256/8, kernel 5, patches 1, 2 and 4 on all of CIFAR-10, 25 epochs",
    base=BASE,
    build=lambda p: _convmixer_grid(p, "patch_size", p["patches"], "p"),
    plot=lambda rows, p, path: line_plot(rows, path, "patch_size", None, xlabel="patch size",
                                         title=f"ConvMixer-{p['dim']}/{p['depth']}, kernel {p['kernel_size']}, "
                                               f"on {p['dataset']}"),
))


# ----------------------------------------------------------------------------- mpp
def _mpp_model(p) -> dict:
    """The MPP studies' ViT: the variant, with `patch_size` overridden when the preset sets one."""
    return _model_fields(p["model"], {"patch_size": int(p["patch_size"])} if p.get("patch_size") else {})


def _mpp_runs(p):
    model = _mpp_model(p)
    common = {"lr": p["lr"], "batch_size": p["batch_size"]}
    runs = [RunSpec("mpp-pretrain", {**model, **common, "objective": "mpp", "epochs": p["pretrain_epochs"],
                                     "objective_kwargs": {"target": p["target"], "mask_rate": p["mask_rate"]}},
                    {"init": "mpp-pretrain", "fraction": float(p.get("train_fraction", 1.0)), "seed": 0})]
    for f in p["fractions"]:
        for seed in p["seeds"]:
            cols = {"fraction": float(f), "seed": int(seed)}
            fields = {**model, **common, "train_fraction": float(f), "seed": int(seed)}
            runs.append(RunSpec(f"scratch-f{_slug(f)}-s{seed}", fields, {"init": "scratch", **cols}))
            runs.append(RunSpec(f"mpp-f{_slug(f)}-s{seed}", {**fields, "lr": p["finetune_lr"]},
                                {"init": "mpp", **cols}, init_from="mpp-pretrain"))
    return runs


def _mpp_plot(rows, p, path):
    line_plot([r for r in rows if r["init"] != "mpp-pretrain"], path, "train_images", "init", logx=True,
              xlabel="fine-tuning images",
              title=f"MPP ({p['target']}) vs from scratch on {p['dataset']}")


register_study(Study(
    name="mpp",
    description="A ViT trained from scratch against the same ViT pre-trained with masked patch prediction "
                "(on an unlabelled pool: train_fraction of the training set) and then fine-tuned, at several "
                "labelled fine-tuning set sizes.",
    claim="ViT paper (Sec. 4.6, App. B.1.2): MPP pre-training improves ViT-B/16 on ImageNet by 2% over training "
          "from scratch, but trails supervised pre-training by 4%.",
    # Fashion-MNIST at 16 px with 4x4 patches (16 tokens): pre-trained on 10% of its training set
    # (6,000 images, labels unused), fine-tuned on 1%, 3% and 10% (nested subsets of that pool). On
    # digits, fine-tuning on 136 images left training from scratch at 30% +- 12 (3 seeds)
    params={"dataset": "fashion-mnist", "epochs": 10, "pretrain_epochs": 10, "model": "vit_nano_p2", "patch_size": 4,
            "img_size": 16, "train_fraction": 0.1, "fractions": [0.01, 0.03, 0.1], "seeds": [0, 1, 2],
            "target": "color3bit", "mask_rate": 0.5, "lr": 3e-3, "finetune_lr": 3e-3, "batch_size": 64},
    claims=[Claim({"init": "mpp"}, {"init": "scratch"}, "MPP pre-training beats training from scratch "
                  "(ViT Sec. 4.6)", pair_on=("fraction",))],
    paper={"dataset": "imagefolder", "img_size": 224, "epochs": 20, "pretrain_epochs": 14, "model": "vit_b16",
           "patch_size": 0, "train_fraction": 1.0, "fractions": [0.1, 1.0], "lr": 1e-4, "finetune_lr": 3e-3,
           "batch_size": 4096},
    paper_cost="ViT paper Sec. 4.6: MPP pre-training of ViT-B/16 on JFT-300M for 1M steps (here ImageNet-21k via "
               "train.data_dir=..., 14 epochs), then fine-tuning",
    paper_images=14_000_000,
    cifar10={**CIFAR10, "epochs": 30, "pretrain_epochs": 30, "model": "vit_micro_p4", "patch_size": 0,
             "train_fraction": 1.0, "fractions": [0.1, 0.3, 1.0], "lr": 1e-3, "finetune_lr": 1e-3, "batch_size": 128},
    cifar10_cost="ViT-micro/4 MPP pre-training on all of CIFAR-10's training images (30 epochs), then fine-tuning "
                 "on 10%, 30% and 100% (30 epochs) against training from scratch",
    base=BASE,
    build=_mpp_runs, plot=_mpp_plot,
))


# ----------------------------------------------------------------------------- cvt-conv-proj-stages
# CvT Table 6: the convolutional projection (instead of a linear one) in no stage, the last stage,
# the last two, all three. Grid as data: label -> conv_proj per stage.
CONV_PROJ_STAGES = {
    "none": (False, False, False),
    "stage3": (False, False, True),
    "stages2-3": (False, True, True),
    "all": (True, True, True),
}


def _cvt_stage_runs(p):
    return [RunSpec(f"{v}-s{seed}",
                    {**_model_fields(p["model"], {"conv_proj": list(CONV_PROJ_STAGES[v])}), "seed": int(seed),
                     "img_size": p["img_size"], "lr": p["lr"], "batch_size": p["batch_size"]},
                    {"conv_proj": v, "stages_with_conv": sum(CONV_PROJ_STAGES[v]), "seed": int(seed)})
            for v in p["variants"] for seed in p["seeds"]]


register_study(Study(
    name="cvt-conv-proj-stages",
    description="CvT with the convolutional projection of queries/keys/values in no stage, stage 3, stages 2-3 "
                "or all stages (a linear projection elsewhere).",
    claim="CvT paper (Table 6): accuracy rises as more stages use the convolutional projection; all stages is best.",
    # Fashion-MNIST at 28 px (14/7/4 token grids in cvt_tiny): on digits CvT sits at ~99%
    params={"dataset": "fashion-mnist", "epochs": 6, "model": "cvt_tiny", "variants": list(CONV_PROJ_STAGES),
            "seeds": [0, 1, 2], "img_size": 28, "lr": 3e-3, "batch_size": 64, "train_fraction": 0.05},
    paper={"dataset": "imagefolder", "epochs": 100, "model": "cvt_13", "img_size": 224, "lr": 2.5e-4,
           "batch_size": 256, "train_fraction": 1.0},
    paper_cost="CvT paper Table 6: CvT-13 on ImageNet-1k (train.data_dir=...) at 224 px, 100 epochs (the paper "
               "trains 300)",
    paper_images=1_281_167,
    cifar10={**CIFAR10, "epochs": 30, "model": "cvt_tiny", "lr": 1e-3, "batch_size": 128, "train_fraction": 1.0},
    cifar10_cost="CvT-tiny (16/8/4 token grids) on all of CIFAR-10, 30 epochs at 32 px",
    claims=[Claim({"conv_proj": "all"}, {"conv_proj": "none"}, "conv projection in every stage beats none "
                  "(CvT Table 6)", pair_on=()),
            Claim({"conv_proj": "stages2-3"}, {"conv_proj": "stage3"}, "adding stage 2 helps (CvT Table 6)",
                  pair_on=())],
    base=BASE,
    build=_cvt_stage_runs,
    plot=lambda rows, p, path: line_plot(rows, path, "stages_with_conv", None,
                                         xlabel="stages with convolutional projection (from the last)",
                                         title=f"CvT conv projection per stage on {p['dataset']}"),
))


# ----------------------------------------------------------------------------- mpp-targets
def _mpp_target_runs(p):
    model = _mpp_model(p)
    common = {"lr": p["lr"], "batch_size": p["batch_size"]}
    ft = {**model, **common, "lr": p["finetune_lr"], "train_fraction": float(p["finetune_fraction"])}
    runs = []
    for seed in p["seeds"]:  # the baseline: the same fine-tuning set, from scratch
        runs.append(RunSpec(f"scratch-s{seed}", {**ft, "lr": p["lr"], "seed": int(seed)},
                            {"init": "scratch", "target": "-", "mask_rate": 0.0, "seed": int(seed)}))
    for target in p["targets"]:
        for rate in p["mask_rates"]:
            pre = f"pretrain-{target}-m{_slug(rate)}"
            runs.append(RunSpec(pre, {**model, **common, "objective": "mpp", "epochs": p["pretrain_epochs"],
                                      "objective_kwargs": {"target": target, "mask_rate": float(rate)}},
                                {"init": "mpp-pretrain", "target": target, "mask_rate": float(rate), "seed": 0}))
            for seed in p["seeds"]:
                runs.append(RunSpec(f"mpp-{target}-m{_slug(rate)}-s{seed}", {**ft, "seed": int(seed)},
                                    {"init": "mpp", "target": target, "mask_rate": float(rate), "seed": int(seed)},
                                    init_from=pre))
    return runs


def _mpp_targets_plot(rows, p, path):
    bar_plot([r for r in rows if r["init"] != "mpp-pretrain"], path, "target", group="mask_rate",
             title=f"MPP targets and mask rates on {p['dataset']} (fine-tuned on {p['finetune_fraction']:.0%})")


register_study(Study(
    name="mpp-targets",
    description="Masked patch prediction with each target (3-bit mean colour, 4x4 downsampled patch, full-patch "
                "L2) at several masking rates, each fine-tuned on a labelled subset; against training from scratch.",
    claim="ViT paper (App. B.1.2): the 3-bit mean colour target works best (4x4 downsampled about as well, L2 "
          "slightly worse); a 50% corruption rate is used (BERT's 15% also tried).",
    # as `mpp`: Fashion-MNIST at 16 px, 4x4 patches, pre-trained on a 10% pool, fine-tuned on 2% (1,200
    # images); on digits (136 fine-tuning images) the seeds spread over 5-23 points
    params={"dataset": "fashion-mnist", "epochs": 10, "pretrain_epochs": 10, "model": "vit_nano_p2", "patch_size": 4,
            "img_size": 16, "train_fraction": 0.1, "targets": ["color3bit", "patch4x4", "l2"], "mask_rates": [0.15, 0.5],
            "finetune_fraction": 0.02, "seeds": [0, 1, 2], "lr": 3e-3, "finetune_lr": 3e-3, "batch_size": 64},
    paper={"dataset": "imagefolder", "img_size": 224, "epochs": 20, "pretrain_epochs": 14, "model": "vit_b16", "lr": 1e-4,
           "finetune_lr": 3e-3, "batch_size": 4096, "finetune_fraction": 1.0, "patch_size": 0, "train_fraction": 1.0},
    paper_cost="ViT paper App. B.1.2: ViT-B/16 MPP on JFT-300M (here ImageNet-21k via train.data_dir=...), "
               "14 epochs per target and rate, then fine-tuning",
    paper_images=14_000_000,
    cifar10={**CIFAR10, "epochs": 30, "pretrain_epochs": 30, "model": "vit_micro_p4", "finetune_fraction": 0.1,
             "lr": 1e-3, "finetune_lr": 1e-3, "batch_size": 128, "patch_size": 0, "train_fraction": 1.0},
    cifar10_cost="ViT-micro/4 MPP pre-training on all of CIFAR-10 per target and mask rate (30 epochs), each "
                 "fine-tuned on 10% of it (30 epochs)",
    claims=[Claim({"target": "color3bit"}, {"target": "l2"}, "3-bit colour beats L2 (ViT App. B.1.2)",
                  pair_on=("mask_rate",)),
            Claim({"init": "mpp", "target": "color3bit", "mask_rate": 0.5}, {"init": "scratch"},
                  "MPP pre-training beats scratch (ViT Sec. 4.6)", pair_on=())],
    base=BASE,
    build=_mpp_target_runs, plot=_mpp_targets_plot,
))


# ----------------------------------------------------------------------------- optimizer
# ViT paper App. D.1 (Table 7): pre-training ResNets with Adam (weight decay 0.1) against SGD with
# momentum; each optimiser at its own learning rate (grid as data: name -> training fields)
OPTIMIZERS = {
    # the paper's "Adam with weight decay 0.1" is decoupled: its JAX code's Adam scales the decay by
    # the learning rate (AdamW). As an L2 term inside Adam, 0.1 held a ViT on digits at ~31%
    "adam": {"optimizer": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.999]},
    "sgd": {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4},
}


def _optimizer_runs(p):
    runs = []
    for fam in p["models"]:
        name, kw = DATA_SCALING_MODELS[fam]
        if p.get(fam):  # a registered variant at its own size (the paper preset's BiT R50x1)
            name, kw = p[fam], {}
        for opt in p["optimizers"]:
            lr = p[f"{opt}_lr"]
            for seed in p["seeds"]:
                runs.append(RunSpec(f"{fam}-{opt}-s{seed}",
                                    {**_model_fields(name, kw), **OPTIMIZERS[opt], "lr": float(lr), "seed": int(seed),
                                     "img_size": p["img_size"], "batch_size": p["batch_size"]},
                                    {"model": fam, "optimizer": opt, "lr": float(lr), "seed": int(seed)}))
    return runs


register_study(Study(
    name="optimizer",
    description="Pre-training with Adam (decoupled weight decay 0.1, the ViT paper's choice) against SGD with momentum 0.9, "
                "for a BiT-style ResNet and a ViT.",
    claim="ViT paper (App. D.1, Table 7): Adam pre-training of ResNets on JFT is slightly better than SGD.",
    # Fashion-MNIST at 16 px (16 tokens for the ViT, as data-scaling's models), 5% of its training set:
    # on digits the ResNet sat at 95-98% with either optimiser
    params={"dataset": "fashion-mnist", "epochs": 10, "models": ["resnet", "vit"], "optimizers": ["adam", "sgd"],
            "adam_lr": 3e-3, "sgd_lr": 3e-2, "seeds": [0, 1, 2], "img_size": 16, "batch_size": 64,
            "resnet": "", "vit": "", "train_fraction": 0.05},
    paper={"dataset": "imagefolder", "epochs": 90, "models": ["resnet"], "resnet": "resnet50_bit", "adam_lr": 1e-3,
           "sgd_lr": 0.1, "img_size": 224, "batch_size": 4096, "train_fraction": 1.0},
    paper_cost="ViT paper Table 7: BiT R50x1 pre-trained on JFT-300M (here ImageNet-21k via train.data_dir=...), "
               "90 epochs at 224 px",
    paper_images=14_000_000,
    cifar10={**CIFAR10, "epochs": 30, "resnet": "resnet_small", "vit": "vit_micro_p4", "adam_lr": 1e-3,
             "sgd_lr": 0.1, "batch_size": 128, "train_fraction": 1.0},
    cifar10_cost="half-width ResNet-18 and ViT-micro/4 on CIFAR-10, 30 epochs at 32 px per optimiser",
    claims=[Claim({"optimizer": "adam"}, {"optimizer": "sgd"}, "Adam pre-training beats SGD (ViT Table 7)",
                  pair_on=("model",))],
    base=BASE,
    build=_optimizer_runs,
    plot=lambda rows, p, path: bar_plot(rows, path, "model", group="optimizer",
                                        title=f"Adam vs SGD on {p['dataset']} ({p['epochs']} epochs)"),
))


# ----------------------------------------------------------------------------- model-scaling
# ViT paper Fig. 5: accuracy against pre-training compute for ViT, ResNet and hybrid families at
# several sizes. Grid as data: family -> [(size label, registered variant, size overrides)], sizes
# growing in width and depth together, ~16 tokens at 16 px for the transformers.
SCALING_SIZES = {
    "vit": [("S", "vit_nano_p2", {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}),
            ("M", "vit_nano_p2", {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4}),
            ("L", "vit_nano_p2", {"patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 4})],
    "resnet": [("S", "resnet_small", {"width_factor": 0.125, "num_groups": 4}),
               ("M", "resnet_small", {"width_factor": 0.25, "num_groups": 8}),
               ("L", "resnet_small", {"width_factor": 0.5, "num_groups": 8})],
    "hybrid": [("S", "rsmall_vit_micro", {"embed_dim": 32, "depth": 2, "num_heads": 2}),
               ("M", "rsmall_vit_micro", {"embed_dim": 64, "depth": 4, "num_heads": 4}),
               ("L", "rsmall_vit_micro", {"embed_dim": 128, "depth": 6, "num_heads": 4})],
}
PAPER_SCALING_SIZES = {
    "vit": [("B/32", "vit_b32", {}), ("B/16", "vit_b16", {}), ("L/16", "vit_l16", {})],
    "resnet": [("R50x1", "resnet50_bit", {}), ("R101x1", "resnet101_bit", {}), ("R152x2", "resnet152x2_bit", {})],
    "hybrid": [("R50+B/32", "r50_vit_b32", {}), ("R50+B/16", "r50_vit_b16", {}), ("R50+L/16", "r50_vit_l16", {})],
}


def _scaling_runs(p):
    table = PAPER_SCALING_SIZES if p["sizes"] == "paper" else SCALING_SIZES
    runs = []
    for fam in p["models"]:
        for i, (label, name, kw) in enumerate(table[fam]):
            for seed in p["seeds"]:
                runs.append(RunSpec(f"{fam}-{_slug(label)}-s{seed}",
                                    {**_model_fields(name, kw), "seed": int(seed), "img_size": p["img_size"],
                                     "lr": p["lr"], "batch_size": p["batch_size"]},
                                    {"model": fam, "size": label, "size_rank": i, "seed": int(seed)}))
    return runs


def _scaling_plot(rows, p, path):
    rows_c = [dict(r, train_flops=r["train_gflops"] * 1e9) for r in rows]
    line_plot(rows_c, path, "train_flops", "model", logx=True, xlabel="training compute (FLOPs, counted)",
              title=f"model scaling on {p['dataset']} ({p['epochs']} epochs)")


register_study(Study(
    name="model-scaling",
    description="ViT, BiT-style ResNet and hybrid (ResNet stem + ViT) at three sizes each: accuracy against "
                "counted training compute.",
    claim="ViT paper (Fig. 5): at equal compute ViT beats ResNets; hybrids beat ViT at small sizes, but the "
          "difference vanishes for larger models.",
    params={"dataset": "fashion-mnist", "epochs": 5, "models": list(SCALING_SIZES), "sizes": "small",
            "seeds": [0, 1, 2], "img_size": 16, "lr": 3e-3, "batch_size": 64, "train_fraction": 0.05},
    paper={"dataset": "imagefolder", "epochs": 90, "sizes": "paper", "img_size": 224, "lr": 1e-3,
           "batch_size": 4096, "train_fraction": 1.0},
    paper_cost="ViT paper Fig. 5: ViT-B/32, B/16, L/16, BiT R50x1, R101x1, R152x2 and R50+ViT hybrids pre-trained "
               "on JFT-300M (here ImageNet-21k via train.data_dir=...), 90 epochs at 224 px",
    paper_images=14_000_000,
    # the small preset's three sizes per family, at 32 px (64 tokens for the transformers)
    cifar10={**CIFAR10, "epochs": 30, "sizes": "small", "lr": 1e-3, "batch_size": 128, "train_fraction": 1.0},
    cifar10_cost="ViT, half-width-and-less ResNet-18 and hybrid at the small preset's three sizes each, on all "
                 "of CIFAR-10, 30 epochs at 32 px",
    claims=[Claim({"model": "hybrid"}, {"model": "vit"}, "hybrids beat ViT at the same size (vanishing as size "
                  "grows; ViT Fig. 5)", pair_on=("size_rank",))],
    base=BASE,
    build=_scaling_runs, plot=_scaling_plot,
))
