"""The built-in studies: the seeds' experimental claims, each as a small grid of runs.

Defaults are sized for 2 CPU cores (scikit-learn's 8x8 digits, upsampled to 16 px where a
model needs a larger token grid; models of 0.03-0.6 M parameters; a few epochs), and every
size is an option: `vitlab study data-scaling --dataset mnist --epochs 30 img_size=28
fractions=0.01,0.1,1.0 vit=vit_micro_p4 ...`.
"""
from __future__ import annotations

from pathlib import Path

from .study import Claim, RunSpec, Study, register_study


# digits' default 10% validation split is 179 images (one image = 0.56 points): every study holds
# out 25% instead (449 images); data sets with an official test set ignore this
BASE = {"val_fraction": 0.25}


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
    base=BASE,
    build=_data_scaling_runs, plot=_data_scaling_plot,
))


# ----------------------------------------------------------------------------- pooling
def _pooling_runs(p):
    runs = []
    for pool in p["pools"]:
        for lr in p["lrs"]:
            for seed in p["seeds"]:
                gp = {"cls": "token", "gap": "avg"}[pool]
                runs.append(RunSpec(f"{pool}-lr{_slug(lr)}-s{seed}",
                                    {**_model_fields(p["model"], {"global_pool": gp}), "lr": float(lr),
                                     "seed": int(seed), "batch_size": p["batch_size"], "min_lr": 0.0},
                                    {"pool": pool, "lr": float(lr), "seed": int(seed)}))
    return runs


register_study(Study(
    name="pooling",
    description="Class token (CLS) against global average pooling (GAP) of the patch tokens, across a "
                "learning-rate sweep.",
    claim="ViT paper (Appendix D.3, Fig. 9): both work equally well, but need different learning rates; "
          "GAP with the CLS learning rate performs poorly.",
    params={"dataset": "digits", "epochs": 30, "model": "vit_nano_p2", "pools": ["cls", "gap"],
            "lrs": [3e-4, 1e-3, 3e-3, 1e-2], "seeds": [0, 1, 2], "batch_size": 64},
    claims=[Claim({"pool": "cls"}, {"pool": "gap"}, "GAP at the CLS learning rate performs poorly (ViT Fig. 9)")],
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
    params={"dataset": "digits", "epochs": 20, "model": "cvt_tiny", "variants": list(CVT_VARIANTS),
            "seeds": [0, 1, 2], "img_size": 16, "lr": 3e-3, "batch_size": 64},
    claims=[Claim({"variant": "cvt"}, {"variant": "no-conv-proj"}, "convolutional projection helps (CvT Table 7)",
                  pair_on=()),
            Claim({"variant": "cvt"}, {"variant": "no-conv-embed"}, "convolutional token embedding helps "
                  "(CvT Table 6)", pair_on=())],
    base=BASE,
    build=_cvt_runs,
    plot=lambda rows, p, path: bar_plot(rows, path, "variant",
                                        title=f"CvT ablations on {p['dataset']} ({p['epochs']} epochs)"),
))


# ----------------------------------------------------------------------------- convmixer-kernel
def _convmixer_runs(p):
    return [RunSpec(f"k{k}-s{seed}",
                    {**_model_fields(p["model"], {"dim": p["dim"], "depth": p["depth"], "patch_size": p["patch_size"],
                                                  "kernel_size": int(k)}),
                     "seed": int(seed), "lr": p["lr"], "batch_size": p["batch_size"], "img_size": p["img_size"]},
                    {"kernel_size": int(k), "dim": p["dim"], "depth": p["depth"], "seed": int(seed)})
            for k in p["kernels"] for seed in p["seeds"]]


register_study(Study(
    name="convmixer-kernel",
    description="ConvMixer at fixed width, depth and patch size with depthwise kernels 3, 5, 7 and 9.",
    claim="ConvMixer paper: larger depthwise kernels (mixing distant locations) improve accuracy (kernel 9 "
          "beats 3 on ImageNet by about 1.5 points at equal width and depth).",
    params={"dataset": "digits", "epochs": 20, "model": "convmixer_256_8", "kernels": [3, 5, 7, 9], "dim": 64,
            "depth": 4, "patch_size": 1, "img_size": 8, "seeds": [0, 1, 2], "lr": 3e-3, "batch_size": 64},
    claims=[Claim({"kernel_size": 9}, {"kernel_size": 3}, "kernel 9 beats kernel 3 (ConvMixer Table 1)",
                  pair_on=())],
    base=BASE,
    build=_convmixer_runs,
    plot=lambda rows, p, path: line_plot(rows, path, "kernel_size", None, xlabel="depthwise kernel size",
                                         title=f"ConvMixer-{p['dim']}/{p['depth']} on {p['dataset']}"),
))


# ----------------------------------------------------------------------------- mpp
def _mpp_runs(p):
    model = _model_fields(p["model"], {})
    common = {"lr": p["lr"], "batch_size": p["batch_size"]}
    runs = [RunSpec("mpp-pretrain", {**model, **common, "objective": "mpp", "epochs": p["pretrain_epochs"],
                                     "objective_kwargs": {"target": p["target"], "mask_rate": p["mask_rate"]}},
                    {"init": "mpp-pretrain", "fraction": 1.0, "seed": 0})]
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
                "(on the whole training set, without labels) and then fine-tuned, at several fine-tuning set sizes.",
    claim="ViT paper (Sec. 4.6, App. B.1.2): MPP pre-training improves ViT-B/16 on ImageNet by 2% over training "
          "from scratch, but trails supervised pre-training by 4%.",
    params={"dataset": "digits", "epochs": 20, "pretrain_epochs": 30, "model": "vit_nano_p2",
            "fractions": [0.1, 0.3, 1.0], "seeds": [0, 1, 2], "target": "color3bit", "mask_rate": 0.5, "lr": 3e-3,
            "finetune_lr": 3e-3, "batch_size": 64},
    claims=[Claim({"init": "mpp"}, {"init": "scratch"}, "MPP pre-training beats training from scratch "
                  "(ViT Sec. 4.6)", pair_on=("fraction",))],
    base=BASE,
    build=_mpp_runs, plot=_mpp_plot,
))
