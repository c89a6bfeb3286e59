"""Fashion-MNIST benchmark: test accuracy against wall time on this machine's CPU.

Trains one or more small models with `vitlab.train` on the 60,000 Fashion-MNIST training images
and evaluates each epoch on the official 10,000 test images (vitlab uses the official test set as
the validation split of MNIST-style data, so `val_acc` below *is* test accuracy; nothing is tuned
on it during a run: the accuracy reported is the last epoch's, not the best one).

Data: Debian's package (`apt-get install -y dataset-fashion-mnist`, files in
/usr/share/datasets/fashion-mnist/) or the four original IDX files in --data-dir.

    python benchmarks/fashion_mnist.py                        # the README's ViT (preset vit_gap, ~30 min)
    python benchmarks/fashion_mnist.py --models vit,convmixer # add a convolutional comparison
    python benchmarks/fashion_mnist.py --models vit epochs=4  # key=value overrides for every run
    python benchmarks/fashion_mnist.py --smoke                # 20 steps per model, checks the plumbing

Writes benchmarks/fashion_mnist_results.md (the table, per-epoch accuracy and elapsed time, the
command, the machine, the date) and benchmarks/fashion_mnist_accuracy.png (accuracy vs wall time),
and prints the Markdown table. Run directories go to runs/bench-fashion-mnist/.

Timing notes: elapsed time is wall-clock from the start of `train()` (data loading, evaluation and
checkpoint writing included) to the moment each epoch's test accuracy is written; images/s counts
training steps only. Training runs in bf16 autocast on the CPU with the explicit-matmul attention
kernel (on this CPU the fused SDPA kernel's bf16 backward is several times slower for 50-token
sequences; see --attention). A benchmark, not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Shared by every preset: the data, bf16 autocast, evaluation after every epoch.
COMMON = dict(dataset="fashion-mnist", precision="bf16", eval_every=1, eval_batch_size=1000, seed=0,
              optimizer="adamw", schedule="cosine", grad_clip=1.0, tensorboard=False, progress=False)

# Recipes. Light augmentation only (horizontal flips are label-preserving for clothes; a 2-pixel
# pad-and-crop for the longer recipes), label smoothing 0.1, AdamW with 1 warmup epoch then cosine decay, weight decay
# 0.05 (none on norms, biases, position embeddings and the class token: the engine's rule).
PRESETS: dict[str, dict] = {
    # ViT with 4x4 patches: 7x7 = 49 patch tokens + [class], width 128, 6 blocks, 4 heads (1.2M params)
    "vit": dict(model="vit_micro_p4", epochs=6, batch_size=128, lr=2e-3, min_lr=1e-5, warmup_epochs=0.5,
                weight_decay=0.05, hflip=True, label_smoothing=0.1),
    # the same ViT trained 2.5x longer (it still underfits after 6 epochs: train and test accuracy
    # stay level), with the 2-pixel pad-and-crop and a little stochastic depth for the longer run
    "vit_long": dict(model="vit_micro_p4", epochs=15, batch_size=128, lr=2e-3, min_lr=1e-5, warmup_epochs=1.0,
                     weight_decay=0.05, hflip=True, pad_crop=2, label_smoothing=0.1, drop_path=0.05),
    # the README's ViT: the same model and recipe with the "better plain ViT baseline" choices of
    # Beyer et al. (2022), fixed 2D sin-cos position embeddings and global average pooling instead
    # of the class token (both ViT-paper options; in a 4-epoch trial they learned faster: 84.3% vs
    # 83.8%), trained 25 epochs
    "vit_gap": dict(model="vit_micro_p4", model_kwargs={"global_pool": "avg", "pos_embed": "sincos_2d"},
                    epochs=25, batch_size=128, lr=2e-3, min_lr=1e-5, warmup_epochs=1.0, weight_decay=0.05,
                    hflip=True, pad_crop=2, label_smoothing=0.1, drop_path=0.05),
    # a narrower ViT (width 64): about 4x fewer FLOPs, for a faster, lower point on the curve
    "vit_w64": dict(model="vit_micro_p4", model_kwargs={"embed_dim": 64, "num_heads": 4}, epochs=10,
                    batch_size=128, lr=2e-3, min_lr=1e-5, warmup_epochs=1.0, weight_decay=0.05, hflip=True,
                    pad_crop=2, label_smoothing=0.1),
    # a small ConvMixer (patch 2 -> 14x14 grid, width 128, 6 depthwise-9x9/pointwise blocks) for comparison
    "convmixer": dict(model="convmixer_256_8", model_kwargs={"dim": 128, "depth": 6, "patch_size": 2,
                                                             "kernel_size": 9},
                      epochs=6, batch_size=128, lr=4e-3, min_lr=1e-5, warmup_epochs=0.5, weight_decay=0.05,
                      hflip=True, pad_crop=2, label_smoothing=0.1),
}


def machine_description() -> dict:
    import torch

    from vitlab.bench import cpu_model_name

    try:
        load = os.getloadavg()
    except (AttributeError, OSError):
        load = None
    return {"cpu": cpu_model_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "gpu": "none used (device=cpu)", "loadavg": load}


class EpochClock:
    """Wall time at which each evaluation record appears in a run's metrics.jsonl.

    The engine writes one JSON line per evaluation; polling the file from a thread gives the
    elapsed wall time (since `start`) of every epoch's test accuracy without touching the engine."""

    def __init__(self, out: Path, start: float, period: float = 0.2):
        self.out, self.start, self.period = out, start, period
        self.seen: dict[Path, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._poll()
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        now = time.perf_counter() - self.start
        for path in self.out.glob("*/metrics.jsonl"):
            try:
                n = sum(1 for ln in path.read_text().splitlines() if ln.strip())
            except OSError:
                continue
            times = self.seen.setdefault(path.parent, [])
            times.extend([now] * (n - len(times)))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._poll()


def run_one(name: str, preset: dict, overrides: list[str], args) -> dict:
    from vitlab.train import TrainConfig, apply_overrides, train

    fields = {**COMMON, **preset, "out": str(args.out),
              "name": f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", "threads": args.threads}
    if args.data_dir:
        fields["data_dir"] = args.data_dir
    if args.smoke:
        fields.update(max_steps=20, epochs=1)
    cfg = apply_overrides(TrainConfig.from_dict(fields, source=f"preset {name}"), overrides)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"\n=== {name}: {cfg.model} {cfg.model_kwargs or ''} {cfg.epochs} epochs, batch {cfg.batch_size}, "
          f"lr {cfg.lr:g}, {cfg.precision}, threads {args.threads or 'auto'}", flush=True)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    with EpochClock(out, t0) as clock:
        result = train(cfg)
    wall = time.perf_counter() - t0
    times = clock.seen.get(Path(result.run_dir), [])
    s = result.summary
    curve = []
    train_s = 0.0
    for i, rec in enumerate(result.history):
        n_img = (rec["step"] - (result.history[i - 1]["step"] if i else 0)) * cfg.batch_size
        if rec.get("images_per_sec"):
            train_s += n_img / rec["images_per_sec"]
        curve.append({"epoch": rec["epoch"], "elapsed_s": round(times[i], 1) if i < len(times) else None,
                      "train_s": round(train_s, 1), "test_acc": rec.get("val_acc"), "test_loss": rec.get("val_loss"),
                      "train_loss": rec.get("train_loss")})
    return {"name": name, "model": cfg.model, "model_kwargs": cfg.model_kwargs, "params": s.get("params"),
            "epochs": s.get("epochs"), "wall_s": round(wall, 1), "images_per_sec": s.get("images_per_sec"),
            "test_acc": s.get("val_acc"), "best_test_acc": s.get("best_val_acc"), "curve": curve,
            "run_dir": str(result.run_dir), "loadavg_start": load0,
            "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "threads": args.threads or _threads_used(Path(result.run_dir)),
            "config": {k: v for k, v in cfg.to_dict().items() if k in preset or k in overrides_keys(overrides)}}


def _threads_used(run_dir: Path) -> int | None:
    """The thread count the engine chose (its first log line says '(N threads)')."""
    import re

    try:
        m = re.search(r"\((\d+) threads\)", (run_dir / "train.log").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def overrides_keys(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].split(".", 1)[0] for o in overrides}


def _label(r: dict) -> str:
    kw = r["model_kwargs"]
    return r["model"] + (" (" + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")" if kw else "")


def table(results: list[dict]) -> str:
    lines = ["| model | params | epochs | wall time | images/s (train) | test accuracy |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        acc = f"{100 * r['test_acc']:.2f}%" if r["test_acc"] is not None else "n/a"
        ips = f"{r['images_per_sec']:,.0f}" if r["images_per_sec"] else "n/a"
        params = f"{r['params'] / 1e6:.2f}M" if r["params"] else "n/a"
        m, sec = divmod(r["wall_s"], 60)
        lines.append(f"| {_label(r)} | {params} | {r['epochs']} | {int(m)} min {sec:.0f} s | {ips} | {acc} |")
    return "\n".join(lines)


def curve_table(r: dict) -> str:
    lines = [f"**{_label(r)}** (run directory `{r['run_dir']}`)", "",
             "| epoch | elapsed (s) | training only (s) | test accuracy | test loss |", "|---:|---:|---:|---:|---:|"]
    for c in r["curve"]:
        acc = f"{100 * c['test_acc']:.2f}%" if c["test_acc"] is not None else "n/a"
        lines.append(f"| {c['epoch']} | {c['elapsed_s']} | {c['train_s']} | {acc} | {c['test_loss']:.4f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in results:
        pts = [(c["elapsed_s"] / 60, 100 * c["test_acc"]) for c in r["curve"]
               if c["elapsed_s"] is not None and c["test_acc"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=_label(r))
    ax.axhline(90, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("wall time (min, 2 CPU cores)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST: test accuracy vs wall time", fontsize=10)
    lo = min([100 * c["test_acc"] for r in results for c in r["curve"] if c["test_acc"] is not None] + [85.0])
    ax.set_ylim(max(lo - 1, 0), 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: list[dict], machine: dict, command: str, args, path: Path, png: Path | None) -> None:
    date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    loads = ", ".join(f"{r['name']}: {r['loadavg_start']:.1f} -> {r['loadavg_end']:.1f}" for r in results
                      if r["loadavg_start"] is not None)
    threads = ", ".join(f"{r['name']} {r['threads']}" for r in results)
    parts = [
        "# Fashion-MNIST benchmark: test accuracy vs wall time", "",
        f"Command (from the repository root): `{command}`", "",
        f"Machine: {machine['cpu']}, {machine['cores']} CPU cores, no GPU; torch {machine['torch']}, "
        f"Python {machine['python']}; torch threads used: {threads}; "
        f"bf16 autocast. Date: {date}.", "",
        f"Load average (1 min) at the start and end of each run: {loads or 'n/a'}. A load above the core "
        f"count means other processes shared the CPU and the times are pessimistic.", "",
        "Data: Fashion-MNIST, 60,000 training images, evaluated on the official 10,000 test images after "
        "every epoch; the accuracy reported is the last epoch's (no selection on the test set). Wall time "
        "is end to end (data loading, evaluation, checkpoints included); images/s counts training steps only.",
        "", table(results), "",
    ]
    if png is not None:
        parts += [f"![accuracy vs wall time]({png.name})", ""]
    parts += ["## Per epoch", ""]
    for r in results:
        parts += [curve_table(r), "", "Recipe: `" + json.dumps(r["config"]) + "`", ""]
    path.write_text("\n".join(parts))
    path.with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine, "date": date,
                                                     "results": results}, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="presets: " + ", ".join(PRESETS))
    p.add_argument("--models", default="vit_gap", help=f"comma-separated presets ({', '.join(PRESETS)}); default vit_gap")
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files (default: the standard places, "
                                      "e.g. /usr/share/datasets/fashion-mnist)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0: the engine's choice, all cores on an idle machine and one "
                        "per free core on a busy one, where spinning intra-op threads would slow it many times)")
    p.add_argument("--attention", choices=("matmul", "sdpa", "auto"), default="matmul",
                   help="attention kernel in training (default matmul: faster than fused SDPA's bf16 backward "
                        "on CPU for short sequences)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-fashion-mnist", help="run directories")
    p.add_argument("--report", type=Path, default=HERE / "fashion_mnist_results.md",
                   help="Markdown report (a .json with the raw numbers is written beside it)")
    p.add_argument("--plot", type=Path, default=HERE / "fashion_mnist_accuracy.png", help="accuracy-vs-time plot")
    p.add_argument("--smoke", action="store_true", help="20 steps per model (checks the plumbing; no report)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig overrides for every run")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must be key=value, got {' '.join(bad)}")

    from vitlab.data import load_dataset
    from vitlab.errors import VitlabError
    from vitlab.accel import ops as fast

    fast.set_attention_kernel(args.attention)
    try:  # fail early, in one line, when the data is missing
        load_dataset("fashion-mnist", args.data_dir)
    except VitlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    machine = machine_description()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])
    results = [run_one(n, PRESETS[n], args.overrides, args) for n in names]

    print("\n" + table(results))
    if args.smoke:
        return 0
    png = plot(results, args.plot)
    write_report(results, machine, command, args, args.report, png)
    print(f"\nreport: {args.report}\nplot:   {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
