"""The default run (`vitlab train` with no arguments) on this machine, as one row of the README's
table "default run on each CPU measured".

    python benchmarks/default_run.py            # prints the table header and this machine's row
    python benchmarks/default_run.py --row-only

Runs `python -m vitlab train --out TMP` with this checkout first on PYTHONPATH (the run directory
goes to a temporary folder and is deleted), reads the final and best validation accuracy and the
training seconds from its last lines, and times the whole command (wall seconds, as
`/usr/bin/time vitlab train` would). A benchmark, not a test: the accuracy check (>= 95%) is
tests/test_train_default.py's.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("| CPU | torch threads | torch | final val acc | best val acc | training (s) | whole command (s) | date |\n"
          "|---|---:|---|---:|---:|---:|---:|---|")
RESULT = re.compile(r"validation accuracy (?P<acc>[\d.]+)% \(best (?P<best>[\d.]+)%\) after (?P<epochs>\d+) "
                    r"epochs? in (?P<secs>[\d.]+) s")


def cpu_label() -> str:
    """'2-core AMD EPYC (Zen 4, AVX-512 BF16, no AMX)': the name lscpu shows, the core count, and
    the product units that set the speed (AMX tiles, AVX-512 BF16, else AVX2)."""
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    traits = []
    family = info.get("cpu family")
    if info.get("vendor_id") == "AuthenticAMD" and family == "25":  # family 19h: Zen 3 and Zen 4
        traits.append("Zen 4" if "avx512f" in flags else "Zen 3")
    elif info.get("vendor_id") == "AuthenticAMD" and family == "26":
        traits.append("Zen 5")
    if "avx512_bf16" in flags:
        traits.append("AVX-512 BF16")
    elif "avx512f" in flags:
        traits.append("AVX-512")
    elif "avx2" in flags:
        traits.append("AVX2 only")
    traits.append("AMX" if "amx_bf16" in flags else "no AMX")
    return f"{os.cpu_count()}-core {name} ({', '.join(traits)})"


THREADS = re.compile(r"\((\d+) (?:CPU )?threads?\)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row-only", action="store_true", help="print only this machine's row (default: off)")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "vitlab", "train", "--out", out], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
    m = RESULT.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        sys.exit(f"vitlab train failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    from importlib.metadata import version

    threads = THREADS.search(proc.stdout)  # the run's first line says how many threads torch used
    row = (f"| {cpu_label()} | {threads[1] if threads else '?'} | {version('torch')} | {m['acc']}% | {m['best']}% | {float(m['secs']):.1f} | "
           f"{wall:.1f} | {time.strftime('%Y-%m-%d', time.gmtime())} |")
    print(row if args.row_only else f"{HEADER}\n{row}")


if __name__ == "__main__":
    main()
