"""How the vitlab / transformers ratio depends on the state of this shared machine.

    python benchmarks/experiments/machine_state.py [--model vit_s16] [--pairs 60]

The speed table's inference ratios move from run to run (ViT-S/16: 1.6-2.2x on unchanged code).
Before every alternating (vitlab, peer) pair of inference steps this script measures the machine's
bf16 matrix-product speed on both cores (a (3152 x 384) x (384 x 1536) product per core: one
inference stream's fc1, 8-10 ms), then prints the pairs sorted into thirds by that speed: the median
speed of each third, vitlab's and the peer's median step time in it, and the median per-pair ratio.
If the ratio falls as the product speed falls, the spread between runs is the machine's, and which
state a run catches decides whether it shows 2x. Batch 32, 224 px, bf16, the peer from
`transformers` (as `vitlab bench --compare transformers`).
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_s16")
    ap.add_argument("--pairs", type=int, default=60)
    args = ap.parse_args(argv)

    from _pair import inference_steps

    step_ours, step_peer = inference_steps(args.model)

    # the probe: one product per core, each in its own single-threaded thread (as vitlab's streams)
    a = torch.randn(3152, 384).bfloat16()
    w = torch.randn(1536, 384).bfloat16()
    flop = 2 * a.shape[0] * a.shape[1] * w.shape[0]
    pool = ThreadPoolExecutor(2)
    main_threads = torch.get_num_threads()
    ready = threading.Barrier(2)

    def setup(_):
        torch.set_num_threads(1)  # this pool thread's products run on one core (as a vitlab stream)
        ready.wait()  # both threads of the pool, each set up once
    list(pool.map(setup, range(2)))
    # set_num_threads also sets process-wide state (MKL's thread count, used by the peer's float32
    # products): back to the default, as vitlab's stream pool does; the pool threads keep one
    torch.set_num_threads(main_threads)

    def one_core(_):
        F.linear(a, w)  # warm (weights packed, pages touched)
        t = time.perf_counter()
        F.linear(a, w)
        return time.perf_counter() - t

    def probe() -> float:
        return sum(flop / t for t in pool.map(one_core, range(2))) / 1e12  # TFLOP/s of both cores

    for _ in range(2):
        step_ours()
        step_peer()
    rows = []
    for i in range(args.pairs):
        speed = probe()
        t = time.perf_counter()
        step_ours()
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        step_peer()
        t_peer = time.perf_counter() - t
        rows.append((speed, t_ours, t_peer))
        if (i + 1) % 10 == 0:
            print(f"  {i + 1} pairs", flush=True)
    rows.sort()
    k = len(rows) // 3
    med = statistics.median
    print("| pairs by product speed | product TFLOP/s (2 cores) | vitlab ms | peer ms | median per-pair ratio |")
    print("|---|---|---|---|---|")
    for name, part in (("slowest third", rows[:k]), ("middle third", rows[k:2 * k]), ("fastest third", rows[2 * k:])):
        print(f"| {name} | {med(r[0] for r in part):.2f} | {1e3 * med(r[1] for r in part):.0f} | "
              f"{1e3 * med(r[2] for r in part):.0f} | {med(r[2] / r[1] for r in part):.2f}x |")
    print(f"all {len(rows)} pairs: median per-pair ratio {med(r[2] / r[1] for r in rows):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
