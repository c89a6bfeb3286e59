"""The README's main command: `vitlab train` with no arguments reaches >= 95% validation
accuracy on digits (its speed is measured in benchmarks, not asserted here)."""
from __future__ import annotations

import json
import re

import pytest

from vitlab.cli import main


@pytest.mark.slow
def test_default_run_reaches_95_percent_on_digits(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", "true")
    assert main(["train", "--quiet"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"trained vit_nano_p2 on digits: validation accuracy ([\d.]+)% .* after 30 epochs", out)
    assert m, out
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["val_acc"] >= 0.95
    assert float(m.group(1)) == pytest.approx(100 * summary["val_acc"], abs=0.01)
    assert f"run: runs/{run_dir.name}" in out
