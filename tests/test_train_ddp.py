"""DDP and FSDP under torchrun: 2 gloo processes on CPU train like one process with the same
global batch (the same loss at every step, the same final weights); rank 0 alone writes; an
interrupted FSDP run resumes onto the same curve."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitlab.train import checkpoint as ckpt
from vitlab.train.config import apply_overrides, TrainConfig
from vitlab.train.engine import fit

REPO = Path(__file__).resolve().parents[1]
COMMON = ["epochs=2", "batch_size=32", "accum_steps=2", "max_steps=16", "lr=5e-3", "warmup_steps=2", "precision=fp32",
          "model_kwargs.depth=2", "model_kwargs.embed_dim=32", "model_kwargs.num_heads=2",
          "tensorboard=false", "threads=1", "checkpoint_every=5"]


def _torchrun(tmp_path: Path, name: str, extra: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vitlab", "train", "--out", str(tmp_path), "--name", name, *COMMON, *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    proc = _torchrun(tmp_path, "ddp", [])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one process, the same global batch (2 x 2 micro-batches of 8 per step there, 2 of 16 here)
    single = fit(apply_overrides(TrainConfig(out=str(tmp_path), name="one"), COMMON), verbose=False)

    ddp_dir = tmp_path / "ddp"
    ddp_losses = [json.loads(x)["loss"] for x in (ddp_dir / "steps.jsonl").read_text().splitlines()]
    assert len(ddp_losses) == len(single.step_losses) == 16
    assert ddp_losses == pytest.approx(single.step_losses, abs=1e-5)
    # the curve moves by far more than the tolerance (the comparison has teeth)
    assert max(single.step_losses) - min(single.step_losses) > 0.02
    a = load_file(str(ckpt.resolve_checkpoint(ddp_dir)["weights"]))
    b = load_file(str(ckpt.resolve_checkpoint(single.run_dir)["weights"]))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-4, rtol=1e-3), k
    # rank 0 alone printed the result and wrote the run directory (one metrics line per evaluation)
    assert proc.stdout.count("trained vit_nano_p2 on digits") == 1
    summary = json.loads((ddp_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 16
    assert sorted(d.name for d in tmp_path.iterdir()) == ["ddp", "one"]

    # FSDP (fsdp=true), interrupted after 8 steps and resumed under torchrun: the same curve
    proc = _torchrun(tmp_path, "fsdp", ["fsdp=true", "max_steps=8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped at step 8" in proc.stdout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vitlab", "train", "--resume", str(tmp_path / "fsdp"), "max_steps=16"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fsdp_losses = [json.loads(x)["loss"] for x in (tmp_path / "fsdp" / "steps.jsonl").read_text().splitlines()]
    assert fsdp_losses == pytest.approx(single.step_losses, abs=1e-5)
    c = load_file(str(ckpt.resolve_checkpoint(tmp_path / "fsdp")["weights"]))
    for k in a:
        assert torch.allclose(a[k], c[k], atol=2e-4, rtol=1e-3), k
