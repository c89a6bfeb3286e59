"""Checkpoints: bit-identical resume (mid-epoch), atomic writes that survive a kill,
refusal of mismatched or corrupt checkpoints, and the run directory's contents."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from vitlab.errors import CheckpointError
from vitlab.models import create_model
from vitlab.train import checkpoint as ckpt
from vitlab.train.config import TrainConfig
from vitlab.train.engine import fit

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(out=str(tmp_path), epochs=2, batch_size=64, lr=3e-3, threads=1, tensorboard=False,
                model_kwargs=dict(TINY), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _weights(run_dir) -> dict:
    found = ckpt.resolve_checkpoint(run_dir)
    return load_file(str(found["weights"]))


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    # every random stream in play: dropout, stochastic depth, augmentation, label smoothing, EMA
    kw = dict(dropout=0.1, drop_path=0.1, pad_crop=1, label_smoothing=0.1, ema_decay=0.9)
    full = fit(tiny_cfg(tmp_path, name="full", **kw), verbose=False)
    # 26 steps per epoch (1,617 images: 25 batches of 64 and the last, partial one of 17, which is used):
    # stop after 30 optimizer steps, i.e. 4 steps into the second epoch
    part = fit(tiny_cfg(tmp_path, name="part", max_steps=30, **kw), verbose=False)
    assert part.summary["finished"] is False and part.summary["steps"] == 30
    state = ckpt.read_state(ckpt.resolve_checkpoint(part.run_dir)["state"])
    assert (state["epoch"], state["step_in_epoch"]) == (1, 4)
    rest = fit(TrainConfig(resume=str(part.run_dir)), verbose=False)
    assert rest.run_dir == part.run_dir and rest.summary["finished"] and rest.summary["steps"] == 52

    a, b = _weights(full.run_dir), _weights(rest.run_dir)
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    # the same losses after the resume point, and the same evaluations
    assert rest.step_losses == full.step_losses[30:]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows]  # noqa: E731
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(read(full.run_dir)) == strip(read(rest.run_dir))
    # and an interrupted run differs from a run with another seed (the check has teeth)
    other = fit(tiny_cfg(tmp_path, name="other", seed=1, epochs=1), verbose=False)
    assert not torch.equal(_weights(other.run_dir)["head.weight"], a["head.weight"])


def test_run_directory_contents(tmp_path):
    res = fit(tiny_cfg(tmp_path, name="r", epochs=2, tensorboard=True), verbose=False)
    d = res.run_dir
    for name in ("config.yaml", "metrics.jsonl", "steps.jsonl", "summary.json", "curves.png", "train.log",
                 "checkpoints/last.json", "checkpoints/best.safetensors"):
        assert (d / name).is_file(), name
    assert list(d.glob("events.out.tfevents.*"))
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"epoch", "step", "lr", "train_loss", "val_loss", "val_acc", "images_per_sec"} <= rows[0].keys()
    summary = json.loads((d / "summary.json").read_text())
    assert summary["val_acc"] == rows[-1]["val_acc"]
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert summary["epochs"] == 2 and summary["wall_s"] > 0 and summary["images_per_sec"] > 0
    model = create_model("vit_nano_p2", num_classes=10, img_size=8, in_chans=1, **TINY)
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    assert summary["flops"] > 0
    # load_model rebuilds the trained model with what analysis needs
    m, info = ckpt.load_model(d)
    assert info["img_size"] == 8 and info["in_chans"] == 1 and info["num_classes"] == 10
    assert info["class_names"] == [str(i) for i in range(10)] and len(info["mean"]) == 1
    assert info["config"]["model"] == "vit_nano_p2" and not m.training
    w = _weights(d)
    assert all(torch.equal(v, w[k]) for k, v in m.state_dict().items())


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = fit(tiny_cfg(tmp_path, name="a", epochs=1), verbose=False)
    good = _weights(run.run_dir)
    model, _ = ckpt.load_model(run.run_dir)
    # a second generation whose commit (the rename of last.json) is "killed"
    real_replace = os.replace

    def dying_replace(src, dst):
        if str(dst).endswith(ckpt.POINTER):
            raise KeyboardInterrupt("killed while committing")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dying_replace)
    zeros = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    state = ckpt.read_state(ckpt.resolve_checkpoint(run.run_dir)["state"])
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run.run_dir / "checkpoints", 999, zeros, {"config": state["config"]},
                             {k: v for k, v in state.items() if k != "format_version"})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    # the pointer still names the previous, complete generation, which loads unchanged
    again, _ = ckpt.load_model(run.run_dir)
    assert all(torch.equal(v, good[k]) for k, v in again.state_dict().items())
    assert not list((run.run_dir / "checkpoints").glob(".*.tmp"))
    # and the run can still be resumed from it
    fit(TrainConfig(resume=str(run.run_dir), epochs=2), verbose=False)


KILL_CHILD = textwrap.dedent("""
    import sys, torch
    from vitlab.train import checkpoint as ckpt
    d = sys.argv[1]
    for step in range(1, 10**6):
        w = {"w": torch.full((1_000_000,), float(step))}
        ckpt.save_checkpoint(d, step, w, {"config": {}}, {"step": step, "epoch": 0})
        print(step, flush=True)
""")


def test_sigkill_during_saves_leaves_a_complete_checkpoint(tmp_path):
    """Kill a process that writes checkpoints back to back at an arbitrary moment: the last
    committed generation loads whole (weights and state agree), and no torn file is used."""
    d = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # let a few generations commit, then kill mid-stream
            assert proc.stdout.readline()
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    found = ckpt.resolve_checkpoint(d)
    tensors, _ = ckpt.read_weights(found["weights"])
    step = ckpt.read_state(found["state"])["step"]
    assert step >= 3
    assert torch.equal(tensors["w"], torch.full((1_000_000,), float(step)))


def test_mismatched_checkpoint_is_refused_listing_differences(tmp_path):
    # stopped before its end (a finished run is not resumed at all: it is complete)
    run = fit(tiny_cfg(tmp_path, name="a", epochs=1, max_steps=10), verbose=False)
    other = create_model("vit_nano_p2", num_classes=5, img_size=16, in_chans=1, **TINY)
    tensors, meta = ckpt.read_weights(ckpt.resolve_checkpoint(run.run_dir)["weights"])
    with pytest.raises(CheckpointError) as e:
        ckpt.load_weights_into(other, ckpt.split_ema(tensors)[0], "a",
                               {"model": "vit_nano_p2", "img_size": 16, "num_classes": 5, "in_chans": 1},
                               meta["config"])
    msg = str(e.value)
    assert "img_size: checkpoint 8 vs model 16" in msg and "num_classes: checkpoint 10 vs model 5" in msg
    assert "shape of pos_embed: checkpoint (1, 17, 32) vs model (1, 65, 32)" in msg
    assert "shape of head.weight: checkpoint (10, 32) vs model (5, 32)" in msg
    # resuming with another architecture is refused the same way, naming what differs
    with pytest.raises(CheckpointError, match=r"model_kwargs.depth: checkpoint 2 vs model 3.*missing"):
        fit(TrainConfig(resume=str(run.run_dir), model_kwargs={**TINY, "depth": 3}), verbose=False)


def test_corrupt_files_are_named(tmp_path):
    run = fit(tiny_cfg(tmp_path, name="a", epochs=1), verbose=False)
    found = ckpt.resolve_checkpoint(run.run_dir)
    data = found["weights"].read_bytes()
    found["weights"].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{found['weights'].name}.*corrupt"):
        ckpt.load_model(run.run_dir)
    found["state"].write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=rf"{found['state'].name}.*corrupt"):
        fit(TrainConfig(resume=str(run.run_dir)), verbose=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.load_model(tmp_path)
