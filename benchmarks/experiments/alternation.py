"""Does timing vitlab and the peer alternately (as the speed table does) slow either of them?

    python benchmarks/experiments/alternation.py [--model vit_s16] [--rounds 6] [--steps 5]

The speed table times one vitlab step, then one peer step, and so on, in one process, and takes the
median of the per-pair ratios. That cancels the speed changes of this shared machine, but it could
also bias the ratio: the peer's step might leave the C heap, the caches or the page tables in a state
that costs vitlab's next step (or the other way round), which a user running only one of them would
never pay. Each round here times `--steps` consecutive steps of each alone (after one untimed step)
and `--steps` alternating pairs, and counts the minor page faults of vitlab's steps; printed: the
medians alone and alternating, and the per-round ratio both ways. Batch 32, 224 px, bf16 inference,
the peer from `transformers` (as `vitlab bench --compare transformers`).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_s16")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)

    from _pair import inference_steps

    step_ours, step_peer = inference_steps(args.model)
    for _ in range(2):
        step_ours()
        step_peer()

    def timed(fn):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    n = args.steps
    alone_o, alt_o, alone_p, alt_p, faults_alone, faults_alt = [], [], [], [], [], []
    for r in range(args.rounds):
        o = [timed(step_ours) for _ in range(n + 1)][1:]
        p = [timed(step_peer)[0] for _ in range(n + 1)][1:]
        pairs = [(timed(step_ours), timed(step_peer)[0]) for _ in range(n)]
        alone_o += [t for t, _ in o]
        faults_alone += [f for _, f in o]
        alone_p += p
        alt_o += [t for (t, _), _ in pairs]
        faults_alt += [f for (_, f), _ in pairs]
        alt_p += [t for _, t in pairs]
        mo, mp = statistics.median(t for t, _ in o), statistics.median(p)
        ratio_alt = statistics.median(tp / to for (to, _), tp in pairs)
        print(f"round {r}: vitlab alone {mo * 1e3:.0f} ms, alternating {statistics.median(alt_o[-n:]) * 1e3:.0f} ms; "
              f"peer alone {mp * 1e3:.0f} ms, alternating {statistics.median(alt_p[-n:]) * 1e3:.0f} ms; "
              f"ratio from the blocks alone {mp / mo:.2f}x, median per-pair ratio alternating {ratio_alt:.2f}x",
              flush=True)
    med = statistics.median
    print(f"vitlab: alone {med(alone_o) * 1e3:.1f} ms ({med(faults_alone):.0f} page faults per step), "
          f"alternating {med(alt_o) * 1e3:.1f} ms ({med(faults_alt):.0f})")
    print(f"peer:   alone {med(alone_p) * 1e3:.1f} ms, alternating {med(alt_p) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
