"""Two versions of vitlab's CPU kernels, timed against each other: CvT's depthwise q/k/v projections.

    git show 282cbfa:vitlab/csrc/cpu_kernels.cpp > /tmp/cpu_kernels_old.cpp
    python benchmarks/experiments/kernel_builds.py /tmp/cpu_kernels_old.cpp vitlab/csrc/cpu_kernels.cpp [--rounds 60]

Builds each source as its own extension (the flags vitlab uses; cached by the source's hash), then
times `dwconv_qkv_bf16` (the block's layer norm + the three 3x3 depthwise projections) at CvT-13's
stage shapes for one inference stream (16 images, one thread), plus k/v at stride 1 (the
`kv_stride=1` ablation), as single calls in shuffled order. Prints each version's median, the
median per-round speed-up against the first, and whether the outputs are bit-identical to the first's.
Session 10 used it for the q and k/v loops merged into one row routine (docs/speed.md).
"""
from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import time
from pathlib import Path

import torch

SHAPES = [  # (prefix tokens, map side, width, k/v stride)
    (0, 56, 64, 2),    # CvT-13 stage 1
    (0, 28, 192, 2),   # stage 2
    (1, 14, 384, 2),   # stage 3 (class token)
    (0, 28, 192, 1),   # stage 2 with k/v at stride 1
]


def build(path: str):
    from torch.utils.cpp_extension import load

    tag = hashlib.sha1(Path(path).read_bytes()).hexdigest()[:10]
    return load(f"vitlab_kernel_build_{tag}", [path], extra_cflags=["-O3", "-march=sapphirerapids", "-fopenmp"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="+", help="cpu_kernels.cpp versions; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args(argv)
    mods = [build(p) for p in args.sources]
    torch.set_num_threads(1)
    rng = random.Random(0)
    for p, side, C, s in SHAPES:
        g = torch.Generator().manual_seed(side * C + s)
        x = torch.randn(16, p + side * side, C, generator=g).bfloat16()
        wt, bt = torch.randn(3, 9, C, generator=g) * 0.3, torch.randn(3, C, generator=g)
        lw, lb = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)

        call_args = (x, p, side, side, wt, bt, s, True, lw, lb, 1e-5)
        outs = [m.dwconv_qkv_bf16(*call_args) for m in mods]
        same = [all(torch.equal(a, b) for a, b in zip(o, outs[0])) for o in outs]
        times: list[list[float]] = [[] for _ in mods]
        for _ in range(args.rounds):
            order = list(range(len(mods)))
            rng.shuffle(order)
            for i in order:
                t = time.perf_counter()
                mods[i].dwconv_qkv_bf16(*call_args)
                times[i].append(time.perf_counter() - t)
        ms = [f"{statistics.median(t) * 1e3:.3f}" for t in times]
        up = [f"{statistics.median([b / a for b, a in zip(times[0], t)]):.3f}x" for t in times]
        print(f"{side}x{side}, width {C}, k/v stride {s}: ms {ms}, speed-up vs the first {up}, bit-identical {same}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
