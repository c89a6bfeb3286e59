"""Does a speed-table row depend on the rows run before it in the same process?

    python benchmarks/experiments/row_order.py [--after vit|allocator]

Times CvT-13 inference pairs (vitlab, then transformers, batch 32, bf16, as `vitlab bench`) in a
fresh process, counting each step's minor page faults; then runs the ViT-S/16 inference and training
rows (`--after vit`, as the speed table did before them until session 10) or turns on
`fast.tune_cpu_allocator` (`--after allocator`), and times the CvT-13 pairs again. On 2026-11-22 the
peer page-faulted about 200,000 times per step in the fresh process and not at all after the ViT-S/16
rows: glibc's heap, grown by the earlier rows, served its temporaries. Since then the speed table runs
each model's rows in a fresh process.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--after", choices=("vit", "allocator"), default="vit")
    ap.add_argument("--pairs", type=int, default=8)
    args = ap.parse_args(argv)

    from _pair import inference_steps

    from vitlab import bench
    from vitlab.models import fast

    peak = bench.matmul_peak(torch.device("cpu"), torch.bfloat16)  # as the speed table does first
    step_ours, step_peer = inference_steps("cvt_13")

    def timed(fn):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    def block(label: str) -> None:
        step_ours()
        step_peer()
        r = [(timed(step_ours), timed(step_peer)) for _ in range(args.pairs)]
        med = statistics.median
        print(f"{label}: vitlab {med(a[0] for a, _ in r) * 1e3:.0f} ms ({med(a[1] for a, _ in r):.0f} page faults), "
              f"peer {med(b[0] for _, b in r) * 1e3:.0f} ms ({med(b[1] for _, b in r):.0f} page faults), "
              f"median per-pair ratio {med(b[0] / a[0] for a, b in r):.2f}x", flush=True)

    block("fresh process")
    block("fresh process, again")
    if args.after == "vit":
        for mode in ("infer", "train"):
            bench.run_benchmark("vit_s16", mode=mode, steps=3, warmup=1, compare="transformers", peak=peak,
                                measure_memory=False)
        block("after the ViT-S/16 rows")
        block("after the ViT-S/16 rows, again")
    else:
        fast.tune_cpu_allocator()
        block("allocator tuned")
        block("allocator tuned, again")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
