"""torch.compile with inductor's freezing against vitlab's eager inference, alternating.

    python benchmarks/experiments/inductor_freezing.py [--models vit_s16 cvt_13] [--rounds 30]

Freezing turns the parameters into constants, pre-packs the linear weights for oneDNN and fuses
the element-wise chains (layer norm, GELU, residual adds) into generated C++: the compiler's
best offer for CPU inference. Both sides start from the same `optimize_for_inference` model
(bf16 weights, batch 32, 224 px); vitlab's own fast paths step aside under compilation. Prints
the compile time and the median of per-round eager / compiled ratios (> 1: compiled is faster).
An experiment behind docs/speed.md, not a vitlab default.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_s16", "cvt_13"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vitlab.bench import time_alternating
    from vitlab.accel import ops as fast
    from vitlab.models import create_model

    x = torch.randn(32, 3, 224, 224)
    print("| model | compile (s) | eager (ms) | frozen (ms) | median eager / frozen | quartiles |\n|---|---|---|---|---|---|")
    for name in args.models:
        eager = fast.optimize_for_inference(create_model(name))
        frozen = fast.optimize_for_inference(create_model(name))
        frozen.load_state_dict(eager.state_dict())
        t = time.perf_counter()
        compiled = torch.compile(frozen, options={"freezing": True})
        with torch.no_grad():
            compiled(x)
        compile_s = time.perf_counter() - t
        with torch.no_grad():  # alternating call by call: slow phases of the machine hit both alike
            times = time_alternating({0: lambda: eager(x), 1: lambda: compiled(x)}, args.rounds, warmup=1)
        ratios = [a / b for a, b in zip(times[0], times[1])]
        q = statistics.quantiles(ratios, n=4)
        print(f"| {name} | {compile_s:.1f} | {statistics.median(times[0]) * 1e3:.1f} | "
              f"{statistics.median(times[1]) * 1e3:.1f} | {statistics.median(ratios):.3f}x | "
              f"{q[0]:.3f}-{q[2]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
