"""How unevenly the two inference streams finish, and whether pinning them to cores helps.

    python benchmarks/experiments/stream_balance.py [--models vit_s16 cvt_13] [--forwards 20] [--rounds 30]

vitlab's CPU inference runs the batch as one part per core (`fast.run_in_streams`), and the forward
ends when the slower part does. Two measurements behind docs/speed.md's "Tried in session 9":

1. imbalance: each part's own time in `--forwards` forwards, and how much a perfect split (both parts
   ending together) would have saved: the most that re-sizing the parts could give.
2. pinning: stream threads pinned one per core (`sched_setaffinity`) against the default unpinned
   threads, alternating forward by forward in shuffled order; prints the median per-round ratio
   (> 1: pinned is faster).

Nothing in vitlab changes: the script times the parts through `run_in_streams`'s `forward`
argument, and builds its own pair of stream pools for the A/B. Batch 32, 224 px, bf16.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def imbalance(model, x, forwards: int) -> list[float]:
    """Per forward: the fraction of the forward's time a perfect split of the parts would save."""
    from vitlab.accel import ops as fast

    real = fast.run_in_streams
    seconds: list[float] = []
    lock = threading.Lock()

    def timed_run(forward, batch, n):
        def part(p):
            t = time.perf_counter()
            out = forward(p)
            with lock:
                seconds.append(time.perf_counter() - t)
            return out
        return real(part, batch, n)

    fast.run_in_streams = timed_run
    try:
        saved = []
        with torch.inference_mode():
            model(x)
            for _ in range(forwards):
                seconds.clear()
                model(x)
                slowest = max(seconds)
                saved.append(1 - statistics.mean(seconds) / slowest)  # equal work, both done together
    finally:
        fast.run_in_streams = real
    return saved


def stream_pool(pin: bool, n: int) -> ThreadPoolExecutor:
    """n stream threads with one intra-op thread each, as `fast._stream_pool` makes them; `pin`:
    thread k bound to the k-th CPU this process may use."""
    from vitlab.accel import ops as fast

    cpus = sorted(os.sched_getaffinity(0))
    pool = ThreadPoolExecutor(n, thread_name_prefix="stream-ab")
    ready, ids, lock = threading.Barrier(n), iter(range(n)), threading.Lock()
    main_threads = torch.get_num_threads()

    def setup():
        torch.set_num_threads(1)
        fast._STREAM_THREAD.active = True
        with lock:
            k = next(ids)
        if pin:
            os.sched_setaffinity(0, {cpus[k % len(cpus)]})  # 0: the calling thread, on Linux
        ready.wait()
    for f in [pool.submit(setup) for _ in range(n)]:
        f.result()
    torch.set_num_threads(main_threads)
    return pool


def pinning(model, x, rounds: int, n: int = 2) -> list[float]:
    from vitlab.accel import ops as fast

    pools = {False: stream_pool(False, n), True: stream_pool(True, n)}
    saved = dict(fast._STREAMS)
    fast._STREAMS["n"] = n
    rng, ratios = random.Random(0), []
    try:
        with torch.inference_mode():
            for pin in (False, True):
                fast._STREAMS["pool"] = pools[pin]
                model(x)
            for _ in range(rounds):
                t = {}
                order = [False, True]
                rng.shuffle(order)
                for pin in order:
                    fast._STREAMS["pool"] = pools[pin]
                    s = time.perf_counter()
                    model(x)
                    t[pin] = time.perf_counter() - s
                ratios.append(t[False] / t[True])
    finally:
        fast._STREAMS.update(saved)
        for p in pools.values():
            p.shutdown()
    return ratios


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_s16", "cvt_13"])
    ap.add_argument("--forwards", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    from vitlab.accel import ops as fast
    from vitlab.models import create_model

    if torch.get_num_threads() != 2:
        print(f"note: {torch.get_num_threads()} intra-op threads; these measurements were made with 2 streams on 2 cores")
    x = torch.randn(32, 3, 224, 224)
    print("| model | streams | a perfect split would save (mean / max) | pinned / unpinned speed (median per round, quartiles) |")
    print("|---|---|---|---|")
    for name in args.models:
        model = fast.optimize_for_inference(create_model(name))
        n = fast.auto_inference_streams()
        if n < 2:
            print(f"| {name} | 1 | streams are off on this CPU | - |")
            continue
        saved = imbalance(model, x, args.forwards)
        ratios = pinning(model, x, args.rounds, n)
        q = statistics.quantiles(ratios, n=4)
        print(f"| {name} | {n} | {100 * statistics.mean(saved):.1f}% / {100 * max(saved):.1f}% | "
              f"{statistics.median(ratios):.3f}x ({q[0]:.2f}-{q[2]:.2f}) |")


if __name__ == "__main__":
    main()
