"""The speed-table script's run history: each full run's ratios are kept, and the report shows
every run of the same vitlab code with its range and how many runs met each target."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "speed_table.py"


@pytest.fixture(scope="module")
def speed_table():
    spec = importlib.util.spec_from_file_location("speed_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(end, peak, vit_infer, cvt_train=None):
    rows = [dict(label="ViT-S/16", model="vit_s16", mode="infer", ratio=vit_infer, ours=1.0, peer=1.0)]
    if cvt_train is not None:
        rows.append(dict(label="CvT-13", model="cvt_13", mode="train", ratio=cvt_train, ours=1.0, peer=1.0))
    return dict(end=end, code="abc", peak_tflops=peak, rows=rows)


def test_spread_table_counts_runs_that_meet_each_target(speed_table):
    runs = [_run("2026-11-21 10:00 UTC", 1.5, 2.1, 1.4), _run("2026-11-21 11:00 UTC", 0.8, 1.9, 1.6),
            _run("2026-11-21 12:00 UTC", 1.7, 2.3)]
    lines = speed_table.spread_table(runs).splitlines()
    assert lines[0].startswith("| model | step | 10:00 (peak 1.50) | 11:00 (peak 0.80) | 12:00 (peak 1.70) |")
    vit = next(line for line in lines if line.startswith("| ViT-S/16 | infer"))
    cells = [c.strip() for c in vit.strip("|").split("|")]
    assert cells[2:5] == ["2.10x", "1.90x", "2.30x"]
    assert cells[5] == "1.90-2.30x"
    assert cells[6] == ">= 2x: met in 2 of 3"  # the ViT-S/16 inference target is 2x
    cvt = [c.strip() for c in next(line for line in lines if line.startswith("| CvT-13")).strip("|").split("|")]
    assert cvt[2:5] == ["1.40x", "1.60x", "-"]  # a run without the row shows a dash
    assert cvt[6] == ">= 1.5x: met in 1 of 2"


def test_code_fingerprint_follows_the_package_sources(speed_table, tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "models").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "models" / "b.py").write_text("y = 2\n")
    monkeypatch.setattr(speed_table, "PACKAGE", pkg)
    first = speed_table.code_fingerprint()
    assert speed_table.code_fingerprint() == first
    (pkg / "models" / "b.py").write_text('"""A docstring."""\n# a comment\ny = 2  # another\n')
    assert speed_table.code_fingerprint() == first  # prose is not code
    (pkg / "models" / "b.py").write_text("y = 3\n")
    second = speed_table.code_fingerprint()
    assert second != first
    (pkg / "csrc").mkdir()
    (pkg / "csrc" / "k.cpp").write_text("int f() { return 1; }\n")
    assert speed_table.code_fingerprint() != second  # the C++ kernels are code too
