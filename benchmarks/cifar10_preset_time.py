"""Seconds per epoch of the `--preset cifar10` studies' models, measured on this machine.

Writes a CIFAR-10-sized stand-in (50,000 + 10,000 random 32x32 images in the official python
layout; the throughput does not depend on the pixels) and trains a few runs of the studies'
own cifar10 grids for 2 epochs each through the study code path (make_config, execute_run),
then prints each run's images/s (epoch 2, warm) and its wall time per epoch (training plus the
10,000-image evaluation). The study totals follow from these by epochs x runs.

    python benchmarks/cifar10_preset_time.py [--out DIR] [--epochs 2] [--only NAME,...]
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# (study, run) pairs: one run per architecture the cifar10 presets train, the costliest variant
RUNS = [("pos-embed", "learned-s0"), ("data-scaling", "hybrid-f1p0-s0"), ("data-scaling", "resnet-f1p0-s0"),
        ("data-scaling", "cvt-f1p0-s0"), ("data-scaling", "convmixer-f1p0-s0"), ("convmixer-kernel", "k9-s0"),
        ("cvt-ablation", "kv-stride-1-s0"), ("mpp", "mpp-pretrain"), ("pooling", "map-lr0p001-s0")]


def write_fake_cifar10(root: Path, n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=4))
    per = n_train // 5
    for member, n in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", n_test)]:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (folder / member).write_bytes(pickle.dumps(d, protocol=4))
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for the runs and results.json (default: a temp folder)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated run names to keep (default: all)")
    ap.add_argument("--images", type=int, default=50_000, help="training images of the stand-in (default: 50000)")
    args = ap.parse_args(argv)
    from vitlab.studies import study as S

    out = Path(args.out or tempfile.mkdtemp())
    data = write_fake_cifar10(Path(tempfile.mkdtemp()) / "cifar10", args.images, args.images // 5)
    train = {"data_dir": str(data), "data_options.verify": "false"}
    results = []
    only = set(filter(None, args.only.split(",")))
    for name, run in RUNS:
        if only and run not in only:
            continue
        study = S.get_study(name)
        sizes = [f"epochs={args.epochs}"] + ([f"pretrain_epochs={args.epochs}"] if "pretrain_epochs" in study.params
                                             else [])
        params, tr = S.resolve_params(study, sizes, preset="cifar10")
        tr.update(train)
        specs = {s.name: s for s in study.build(params)}
        spec = specs[run]
        t0 = time.perf_counter()
        summary = S.execute_run(study, params, tr, spec, out / name, log=lambda *a: None)
        wall = time.perf_counter() - t0
        metrics = [json.loads(x) for x in (out / name / "runs" / run / "metrics.jsonl").read_text().splitlines()
                   if x.strip()]
        cfg = S.make_config(study, params, tr, spec, out / name)
        row = {"study": name, "run": run, "model": cfg.model, "model_kwargs": cfg.model_kwargs,
               "batch_size": cfg.batch_size, "objective": cfg.objective, "epochs": args.epochs,
               "images_per_sec": [m.get("images_per_sec") for m in metrics if "images_per_sec" in m],
               "run_wall_s": round(wall, 2), "summary_wall_s": summary.get("wall_s"),
               "params": summary.get("params")}
        results.append(row)
        print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
