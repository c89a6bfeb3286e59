"""What AMX tile operations cost on this CPU (one core, data in L1): the microbenchmark behind
docs/speed.md's account of vitlab's attention kernel.

    python benchmarks/experiments/amx_tiles.py

Builds `amx_tiles.cpp` (g++ and an AMX CPU; a few seconds), then prints the median of 5 timings of:
a 16x16x32 bf16 tile product alone, a 1 KB tile load, a 1 KB tile store, and a 2x2 block of output
tiles (zero, loads, products, stores) with 2 k-steps (Q K^T with 64-wide heads) and with 12 (a
linear layer with K = 384), per product. At 16 cycles per product, one core's AMX peak is
16384 FLOP / 16 cycles.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from torch.utils.cpp_extension import load


def main():
    mod = load("vitlab_amx_tiles", [str(Path(__file__).with_name("amx_tiles.cpp"))],
               extra_cflags=["-O3", "-march=sapphirerapids"])
    rows = [("tile product (tdpbf16ps) alone", 0, 1), ("1 KB tile load (L1)", 1, 1), ("1 KB tile store (L1)", 2, 1),
            ("2x2 output block, 2 k-steps (Q K^T, d = 64), per product", 3, 2),
            ("2x2 output block, 12 k-steps (linear, K = 384), per product", 3, 12),
            ("the same, next step's loads issued as their tiles free up, 2 k-steps", 4, 2),
            ("the same, next step's loads issued as their tiles free up, 12 k-steps", 4, 12)]
    print("| operation | ns (median of 5) | TFLOP/s per core at this rate |\n|---|---|---|")
    for name, kind, ks in rows:
        ns = statistics.median(mod.tile_ns(kind, ks, 200000 // ks) for _ in range(5))
        tf = f"{16384 / ns / 1e3:.2f}" if kind in (0, 3, 4) else "-"
        print(f"| {name} | {ns:.2f} | {tf} |")


if __name__ == "__main__":
    main()
