"""Start-up cost of the `vitlab` command: CPU seconds (user + system, the process and its children)
and wall seconds of `vitlab --help`, `vitlab --version` and `vitlab models` (with an empty model-table
cache, then with the cache the first run wrote), the median of --repeat runs each.

    python benchmarks/startup.py              # prints a Markdown table
    python benchmarks/startup.py --repeat 5

Runs `python -m vitlab` with this checkout first on PYTHONPATH. A benchmark, not a test: the goal
(`vitlab --help` under 1 s of CPU) is read off the table, nothing asserts a time.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(args: list[str], env: dict) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of `python -m vitlab ARGS`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vitlab", *args], env=env, cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="runs per command, the median shown (default: 3)")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env_cache = dict(env, VITLAB_CACHE_DIR=cache)
        cases = [("vitlab --help", ["--help"], None), ("vitlab --version", ["--version"], None),
                 ("vitlab models (no cache yet)", ["models"], "cold"), ("vitlab models (cached)", ["models"], None)]
        for label, cmd, cold in cases:
            runs = []
            for _ in range(args.repeat):
                if cold:  # every run starts with an empty cache
                    for f in Path(cache).glob("models-*.json"):
                        f.unlink()
                runs.append(timed(cmd, env_cache))
            rows.append((label, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)))
    print(f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; median of {args.repeat} runs\n")
    print("| command | CPU s (user + sys) | wall s |")
    print("|---|---:|---:|")
    for label, cpu, wall in rows:
        print(f"| `{label}` | {cpu:.2f} | {wall:.2f} |")


if __name__ == "__main__":
    main()
