"""Data pipeline benchmark: resident memory, time to the first training step and loader images/s of
(a) today's decode-everything path, (a') the in-memory path at the training size, (b) the lazy
image folder and (c) WebDataset shards, on a generated folder of JPEGs of mixed sizes and aspect
ratios, at 64 px and batch 128.

    python benchmarks/data_pipeline.py --count 10000 --work /tmp/vitlab-data-bench [--markdown]

Each path runs in a fresh process (its peak RSS is its own; DataLoader workers are reported
apart as the largest worker's peak). Time to the first step counts from the start of loading to
the end of the first optimizer step of a small ViT (vit_nano_p2 layout, patch 8, 64 px).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# (W, H) of the generated photos and how often each occurs: landscape and portrait photos, squares,
# a few large ones; the most common (320x240) is what today's path decodes everything at.
SIZES = [((320, 240), 30), ((240, 320), 15), ((500, 333), 15), ((333, 500), 10), ((256, 256), 15),
         ((640, 480), 10), ((800, 600), 5)]


def _make_one(args):
    i, root, classes = args
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    weights = np.array([w for _, w in SIZES], float)
    (w, h) = SIZES[rng.choice(len(SIZES), p=weights / weights.sum())][0]
    c = i % classes
    # smooth, class-tinted content (a JPEG of pure noise would be many times larger than a photo)
    small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
    small[..., c % 3] = np.clip(small[..., c % 3].astype(int) + 80, 0, 255)
    im = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    path = Path(root) / f"class{c:02d}" / f"{i:07d}.jpg"
    im.save(path, "JPEG", quality=85)


def generate(root: Path, count: int, classes: int = 10) -> float:
    from multiprocessing import Pool

    t0 = time.perf_counter()
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    done = sum(1 for _ in root.glob("class*/*.jpg"))
    if done == count:
        return 0.0
    with Pool(os.cpu_count()) as pool:
        pool.map(_make_one, [(i, str(root), classes) for i in range(count)], chunksize=64)
    return time.perf_counter() - t0


def _peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


def measure(mode: str, data: str, batches: int, img: int = 64, batch: int = 128) -> dict:
    """One path, in this process: load, first step, loader throughput."""
    import torch

    from vitlab.data import AugmentConfig, BatchTransform, load_dataset
    from vitlab.data.stream import make_train_data
    from vitlab.models import create_model

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    if mode == "today":  # decode every image at the folder's most common size (the path before this change)
        bundle = load_dataset("imagefolder", data, val_fraction=0.05, lazy=False, cache=False, fit="squash")
    elif mode == "memory":  # decode every image at the training size (the in-memory fast path now)
        bundle = load_dataset("imagefolder", data, val_fraction=0.05, lazy=False, cache=False, image_size=img)
    elif mode == "lazy":
        bundle = load_dataset("imagefolder", data, val_fraction=0.05, lazy=True, image_size=img)
    else:
        bundle = load_dataset("shards", data, image_size=img)
    t_loaded = time.perf_counter() - t0
    stream = make_train_data(bundle, batch_size=batch, accum_steps=1, world_size=1, rank=0, seed=0,
                             permutation=lambda n, s, e: torch.randperm(n, generator=torch.Generator().manual_seed(e)))
    tf = BatchTransform(AugmentConfig(img_size=img, random_resized_crop=True, hflip=True), bundle.mean, bundle.std,
                        bundle.num_classes, train=True)
    model = create_model("vit_nano_p2", num_classes=bundle.num_classes, img_size=img, in_chans=3, patch_size=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    it = stream.epoch(0, 0)
    _, parts, n = next(it)
    x, y = tf(*parts[0])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    t_first = time.perf_counter() - t0
    # the loader alone: the next batches as fast as it gives them, after those its workers
    # prefetched during the first step (4 per worker)
    for _ in range(4 * getattr(stream, "workers", 0)):
        next(it, None)
    t1 = time.perf_counter()
    images = 0
    for k, (_, parts, n) in enumerate(it):
        images += n
        if k + 1 >= batches:
            break
    loader_ips = images / (time.perf_counter() - t1)
    # the model alone on one batch, for comparison
    t2 = time.perf_counter()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model_ips = 3 * len(y) / (time.perf_counter() - t2)
    out = {"mode": mode, "train_images": len(bundle.train), "load_s": round(t_loaded, 2),
           "first_step_s": round(t_first, 2), "loader_img_s": round(loader_ips), "model_img_s": round(model_ips),
           "workers": getattr(stream, "workers", 0), "peak_rss_mb": round(_peak_mb())}
    stream.close()
    del it
    out["worker_peak_rss_mb"] = round(_peak_mb(resource.RUSAGE_CHILDREN))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=100_000, help="JPEGs to generate (default 100000)")
    p.add_argument("--work", default="/tmp/vitlab-data-bench", help="folder for the images and shards")
    p.add_argument("--batches", type=int, default=20, help="batches timed for the loader's images/s")
    p.add_argument("--shard-size", default="32MB", help="shard size (default 32MB: several shards, one per worker)")
    p.add_argument("--modes", default="today,memory,lazy,shards")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one mode in this process
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.data, args.batches)))
        return 0
    work = Path(args.work)
    folder = work / f"jpegs-{args.count}"
    gen_s = generate(folder, args.count)
    print(f"generated {args.count:,} JPEGs in {folder} ({gen_s:.0f} s)", flush=True)
    shards = work / f"shards-{args.count}"
    shard_s = 0.0
    if not (shards / "index.json").is_file():
        from vitlab.data.shards import write_shards

        t = time.perf_counter()
        write_shards(folder, shards, shard_size=args.shard_size)
        shard_s = time.perf_counter() - t
    index = json.loads((shards / "index.json").read_text())
    n = len(index["splits"]["train"]["shards"])
    pattern = str(shards / f"train-{{000000..{n - 1:06d}}}.tar")
    print(f"shards: {n} train shard(s) ({shard_s:.0f} s to write)", flush=True)
    rows = []
    for mode in args.modes.split(","):
        data = pattern if mode == "shards" else str(folder)
        cmd = [sys.executable, __file__, "--one", mode, "--data", data, "--batches", str(args.batches)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = {"today": "(a) decode everything, most common size (before)",
             "memory": "(a') decode everything at 64 px (in-memory path now)",
             "lazy": "(b) lazy folder, loader workers", "shards": "(c) WebDataset shards, loader workers"}
    print("\n| path | peak RSS main (MB) | largest worker RSS (MB) | time to first step (s) | loader img/s | "
          "model img/s | workers |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {names[r['mode']]} | {r['peak_rss_mb']:,} | {r['worker_peak_rss_mb']:,} | {r['first_step_s']} | "
              f"{r['loader_img_s']:,} | {r['model_img_s']:,} | {r['workers']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
