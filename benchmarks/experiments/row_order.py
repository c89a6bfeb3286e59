"""Does a speed-table row depend on the rows run before it in the same process?

    python benchmarks/experiments/row_order.py [--model cvt_13|convmixer_768_32|...] [--after vit|allocator]

Times inference pairs of one model (vitlab, then the speed table's peer, batch 32, bf16, as `vitlab
bench`) in a fresh process, counting each step's minor page faults and kernel (system) time, with the
state of glibc's main heap before each block (`mallinfo2`); then runs the ViT-S/16 inference and
training rows (`--after vit`, as the speed table did before them until session 10) or turns on
`fast.tune_cpu_allocator` (`--after allocator`), and times the pairs again.

On 2026-11-22 `transformers`' CvT-13 page-faulted about 200,000 times per step in the fresh process
and not at all after the ViT-S/16 rows: glibc's heap, grown by the earlier rows, served its
temporaries. Since then the speed table runs each model's rows in a fresh process. The paper's
ConvMixer-768/32 (`--model convmixer_768_32`) page-faulted 2.8 million times per step fresh (5.7 s, 5 s
of it in the kernel); after the ViT-S/16 training row the heap was 2.3 GB with 2.1 GB of it free (held
below live blocks, so glibc cannot give it back), its 50 MB activations were cut from that free memory
instead of fresh mmaps, and the step took 2.8 s with no page fault.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch


def heap_state() -> str:
    """glibc's main heap: its size, the free memory in it, and the blocks served by mmap."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Mallinfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):
        return "heap state unknown (not glibc 2.33+)"
    mb = 1 << 20
    return (f"heap {m.arena / mb:.0f} MB, {m.fordblks / mb:.0f} MB of it free ({m.keepcost / mb:.0f} MB at the top, "
            f"which glibc can give back); {m.hblkhd / mb:.0f} MB in {m.hblks} mmap'd blocks")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cvt_13")
    ap.add_argument("--after", choices=("vit", "allocator"), default="vit")
    ap.add_argument("--pairs", type=int, default=8)
    args = ap.parse_args(argv)

    from _pair import inference_steps

    from vitlab import bench
    from vitlab.accel import ops as fast

    peak = bench.matmul_peak(torch.device("cpu"), torch.bfloat16)  # as the speed table does first
    step_ours, step_peer = inference_steps(args.model)

    def timed(fn):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter() - t, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime

    def side(r) -> str:
        med = statistics.median
        return (f"{med(x[0] for x in r) * 1e3:.0f} ms ({med(x[1] for x in r):.0f} page faults, "
                f"{med(x[2] for x in r):.2f} s in the kernel)")

    def block(label: str) -> None:
        print(f"{label}: {heap_state()}", flush=True)
        step_ours()
        step_peer()
        r = [(timed(step_ours), timed(step_peer)) for _ in range(args.pairs)]
        print(f"    vitlab {side([a for a, _ in r])}, peer {side([b for _, b in r])}, median per-pair ratio "
              f"{statistics.median(b[0] / a[0] for a, b in r):.2f}x", flush=True)

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
