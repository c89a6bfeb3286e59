"""Data that need not fit in memory: WebDataset shards (every sample once per epoch over ranks x
workers, resume, corrupt samples), lazy image folders (same tensors as the cached path), aspect
ratio kept, splits named as on disk, the last partial batch used, progress lines."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import load_dataset
from vitlab.data.shards import ShardSet, expand_pattern, load_shards, write_shards
from vitlab.data.stream import IndexedTrainData, make_train_data
from vitlab.errors import DataError


def make_folder(root: Path, classes=("a", "b", "c"), n=12, seed=0, sizes=((12, 16), (16, 12), (14, 14))):
    """Class folders of random PNGs of mixed sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{c}{i}.png")
    return root


def shard_folder(tmp_path, n=12, shard_size="6kB", **kw) -> tuple[Path, dict]:
    src = make_folder(tmp_path / "src", n=n)
    out = tmp_path / "shards"
    index = write_shards(src, out, shard_size=shard_size, report=None, **kw)
    return out, index


def all_train_keys(out: Path) -> list[str]:
    keys = []
    for p in sorted(out.glob("train-*.tar")):
        with tarfile.open(p) as t:
            keys += [m.name.split(".")[0] for m in t.getmembers() if m.name.endswith(".cls")]
    return keys


def pattern(out: Path, index: dict) -> str:
    n = len(index["splits"]["train"]["shards"])
    return str(out / f"train-{{000000..{n - 1:06d}}}.tar")


# ----------------------------------------------------------------------------------------- shards

def test_shard_index_counts_and_checksums(tmp_path):
    out, index = shard_folder(tmp_path)
    train = index["splits"]["train"]
    assert train["count"] == sum(s["count"] for s in train["shards"]) == len(all_train_keys(out))
    assert index["splits"]["val"]["count"] + train["count"] == 36 and index["classes"] == ["a", "b", "c"]
    assert len(train["shards"]) >= 4  # small shards: several per split
    for s in train["shards"]:
        assert (out / s["name"]).stat().st_size == s["bytes"] <= 6000 + 10240  # size limit + tar end record
    from vitlab.cli import main

    assert main(["data", "verify", str(out)]) == 0
    (out / train["shards"][1]["name"]).write_bytes(b"x" * 100)
    assert main(["data", "verify", str(out)]) == 2  # one line naming the shard, exit status 2
    # the command line writes the same shards (same seed: the same order)
    assert main(["data", "shard", str(tmp_path / "src"), str(tmp_path / "again"), "--shard-size", "6kB"]) == 0
    again = json.loads((tmp_path / "again" / "index.json").read_text())
    assert [s["sha256"] for s in again["splits"]["val"]["shards"]] == \
        [s["sha256"] for s in index["splits"]["val"]["shards"]]
    with pytest.raises(DataError, match="already holds .tar shards"):
        write_shards(tmp_path / "src", tmp_path / "again", report=None)


def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(tmp_path, monkeypatch):
    out, index = shard_folder(tmp_path)
    urls = expand_pattern(pattern(out, index))
    assert len(urls) >= 4
    ss = ShardSet(urls, [s["count"] for s in index["splits"]["train"]["shards"]], (8, 8), shuffle_buffer=5)
    expected = sorted(all_train_keys(out))
    orders = []
    for epoch in (0, 1):
        seen, per = [], {}
        for rank in (0, 1):
            for worker in (0, 1):
                # webdataset's split_by_node / split_by_worker read these (as under torchrun + DataLoader)
                monkeypatch.setenv("RANK", str(rank))
                monkeypatch.setenv("WORLD_SIZE", "2")
                monkeypatch.setenv("WORKER", str(worker))
                monkeypatch.setenv("NUM_WORKERS", "2")
                keys = [item[4] for item in ss.pipeline(seed=3, epoch=epoch, with_keys=True)]
                assert keys, (rank, worker)  # every rank and worker has work
                per[rank, worker] = keys
                seen += keys
        assert sorted(seen) == expected  # every sample exactly once: none missing, none twice
        orders.append(per)
    assert orders[0] != orders[1]  # the order changes with the epoch (shard order, shuffle buffer)
    # the same (seed, epoch, rank, worker) always gives the same stream: the basis of the resume
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORKER", "0")
    assert [i[4] for i in ss.pipeline(seed=3, epoch=1, with_keys=True)] == orders[1][1, 0]


def test_shard_resume_mid_epoch_continues_with_the_unseen_samples(tmp_path):
    out, index = shard_folder(tmp_path)
    bundle = load_shards(pattern(out, index), image_size=8, shuffle_buffer=6)
    kw = dict(batch_size=6, accum_steps=1, world_size=1, rank=0, seed=0, drop_last=False, workers=2)
    first = make_train_data(bundle, **kw)
    first.keep_keys = True
    n = first.mine
    assert first.steps_per_epoch == -(-n // 6)  # the last partial batch is a step too
    done = []
    for s, parts, count in first.epoch(0, 0):
        done += first.last_keys
        assert count == len(first.last_keys) == sum(len(y) for _, y in parts)
        if s == 2:
            break
    pos = first.position()
    assert pos["epoch"] == 0 and sum(pos["seen"]) >= len(done)
    again = make_train_data(bundle, **kw)
    again.keep_keys = True
    again.restore([json.loads(json.dumps(pos))])  # as saved in the checkpoint
    rest = []
    steps = []
    for s, parts, _ in again.epoch(0, 3):
        rest += again.last_keys
        steps.append(s)
    assert steps == list(range(3, first.steps_per_epoch))
    assert not set(done) & set(rest)  # nothing repeated
    assert sorted(done + rest) == sorted(all_train_keys(out))  # nothing lost


def _corrupt_one(out: Path) -> tuple[str, str]:
    """Replace one image inside a train shard by garbage; (shard name, key)."""
    shard = sorted(out.glob("train-*.tar"))[1]
    with tarfile.open(shard) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(shard, "w") as t:
        for m, data in members:
            if m.name == victim:
                data = b"\x89PNG not really" + bytes(200)
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    return shard.name, victim.split(".")[0]


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_corrupt_sample_named_by_shard_and_key(tmp_path, policy):
    out, index = shard_folder(tmp_path)
    name, key = _corrupt_one(out)
    urls = expand_pattern(pattern(out, index))
    ss = ShardSet(urls, [1] * len(urls), (8, 8), on_bad_image=policy)
    if policy == "error":
        with pytest.raises(DataError, match=rf"corrupt sample '{key}' in shard {name}.*on_bad_image=skip"):
            list(ss.pipeline(0, 0, shuffle=False))
        return
    with pytest.warns(UserWarning, match=rf"skipped corrupt sample '{key}' in shard {name}") as rec:
        keys = [item[4] for item in ss.pipeline(0, 0, shuffle=False, with_keys=True)]
    assert len([w for w in rec if "skipped corrupt" in str(w.message)]) == 1
    assert sorted(keys) == sorted(k for k in all_train_keys(out) if k != key)  # nothing else lost


def test_training_from_shards_end_to_end(tmp_path):
    from vitlab.train.config import TrainConfig
    from vitlab.train.engine import fit

    out, index = shard_folder(tmp_path)
    cfg = TrainConfig(dataset="shards", data_dir=pattern(out, index), img_size=8, epochs=2, batch_size=8,
                      out=str(tmp_path / "runs"), name="sh", threads=1, tensorboard=False, progress=False, workers=1,
                      model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2})
    r = fit(cfg, verbose=False)
    n = index["splits"]["train"]["count"]
    assert r.summary["finished"] and r.summary["steps"] == 2 * -(-n // 8)
    assert r.history[-1]["val_acc"] is not None


# ---------------------------------------------------------------------------- folders: aspect, lazy

def test_aspect_ratio_kept_not_squashed(tmp_path):
    # a 200x100 (W x H) picture: red | green (the middle half) | blue; and a 100x200 portrait one:
    # red on top, green middle, blue at the bottom. A centre crop of either keeps only green.
    land = np.zeros((100, 200, 3), np.uint8)
    land[:, :50, 0], land[:, 50:150, 1], land[:, 150:, 2] = 255, 255, 255
    port = np.ascontiguousarray(land.transpose(1, 0, 2))
    for c, a in (("x", land), ("y", port)):
        (tmp_path / "f" / "train" / c).mkdir(parents=True)
        (tmp_path / "f" / "val" / c).mkdir(parents=True)
        for split in ("train", "val"):
            Image.fromarray(a).save(tmp_path / "f" / split / c / "img.png")
    b = load_dataset("imagefolder", tmp_path / "f", image_size=20, cache=False)
    for x in (b.train.images, b.val.images):
        assert x.shape == (2, 3, 20, 20)
        inner = x[:, :, 1:-1, 1:-1]  # the resampling filter blends the outermost row/column a little
        assert (inner[:, 1] == 255).all() and (inner[:, 0] == 0).all() and (inner[:, 2] == 0).all()
        assert x[:, 1].float().mean() > 245 and x[:, [0, 2]].float().mean() < 5
    assert "centre-cropped" in b.meta["fit"] and "2 portrait, 2 landscape" in b.meta["fit"]
    lazy = load_dataset("imagefolder", tmp_path / "f", image_size=20, lazy=True)
    assert torch.equal(lazy.train.images[torch.arange(2)], b.train.images)
    # the check has teeth: squashing shows the red and blue bands
    sq = load_dataset("imagefolder", tmp_path / "f", image_size=20, fit="squash", cache=False)
    assert (sq.train.images[0, 0, :, :3] > 200).all() and "aspect NOT kept" in sq.meta["fit"]


def test_lazy_folder_gives_the_cached_tensors(tmp_path):
    make_folder(tmp_path / "f", n=10)
    cached = load_dataset("imagefolder", tmp_path / "f", image_size=12, val_fraction=0.2, cache=False)
    lazy = load_dataset("imagefolder", tmp_path / "f", image_size=12, val_fraction=0.2, memory_budget_mb=0)
    assert lazy.meta["lazy"] and not cached.meta["lazy"]
    assert torch.equal(lazy.train.labels, cached.train.labels) and torch.equal(lazy.val.labels, cached.val.labels)
    assert torch.equal(lazy.val.images[torch.arange(len(lazy.val))], cached.val.images)
    # through DataLoader worker processes, batch by batch, in the same order as the in-memory path
    kw = dict(batch_size=8, accum_steps=1, world_size=1, rank=0, seed=0, drop_last=False,
              permutation=lambda n, seed, epoch: torch.randperm(n, generator=torch.Generator().manual_seed(epoch)))
    mem = list(make_train_data(cached, **kw).epoch(0, 0))
    lz = make_train_data(lazy, workers=2, **kw)
    got = list(lz.epoch(0, 0))
    lz.close()
    assert len(got) == len(mem) == -(-len(cached.train) // 8)
    for (s1, p1, n1), (s2, p2, n2) in zip(mem, got):
        assert (s1, n1) == (s2, n2)
        assert torch.equal(p1[0][0], p2[0][0]) and torch.equal(p1[0][1], p2[0][1])


# --------------------------------------------------------------------------------- partial batches

def _perm(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100 + epoch))


class _Set:
    def __init__(self, n):
        self.labels = torch.arange(n)
        self.images = torch.arange(n).view(n, 1, 1, 1).to(torch.uint8)


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 2)])
def test_last_partial_batch_is_used(world, accum):
    n, B = 245, 64  # the fine-tuning case: 53 images were dropped every epoch
    seen = []
    for rank in range(world):
        d = IndexedTrainData(_Set(n), batch_size=B, accum_steps=accum, world_size=world, rank=rank, seed=0,
                             drop_last=False, permutation=_perm)
        assert d.steps_per_epoch == 4
        steps = list(d.epoch(0, 0))
        assert [c for _, _, c in steps] == [64, 64, 64, 56 if world * accum == 4 else 53]
        sizes = {len(y) for _, parts, _ in steps[-1:] for _, y in parts}
        assert len(sizes) == 1  # equal micro-batches on every rank
        seen += [int(i) for _, parts, _ in steps for _, y in parts for i in y]
    assert set(seen) == set(range(n))  # every image, every epoch
    assert len(seen) - n == (3 if world * accum == 4 else 0)  # topped up by the epoch's first images only
    dropped = IndexedTrainData(_Set(n), batch_size=B, accum_steps=1, world_size=1, rank=0, seed=0, drop_last=True,
                               permutation=_perm)
    assert dropped.steps_per_epoch == 3


# ----------------------------------------------------------------------------- splits as on disk

def test_split_test_evaluates_the_test_folder(tmp_path):
    from vitlab.cli import main
    from vitlab.train.api import evaluate
    from vitlab.train.config import TrainConfig
    from vitlab.train.engine import fit

    root = tmp_path / "d"
    make_folder(root / "train", classes=("a", "b"), n=8, sizes=((8, 8),))
    make_folder(root / "val", classes=("a", "b"), n=3, seed=1, sizes=((8, 8),))
    make_folder(root / "test", classes=("a", "b"), n=5, seed=2, sizes=((8, 8),))
    b = load_dataset("imagefolder", root, cache=False)
    assert (len(b.train), len(b.val), len(b.test), b.val_name) == (16, 6, 10, "val")
    r = fit(TrainConfig(dataset="imagefolder", data_dir=str(root), epochs=1, batch_size=8, out=str(tmp_path / "runs"),
                        name="t", threads=1, tensorboard=False, progress=False,
                        model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2}), verbose=False)
    res = evaluate(r.run_dir, split="test", plot=False)
    assert res["split"] == "test" and res["n"] == 10
    assert Path(res["json"]).parent.name == "eval-imagefolder-test"
    assert evaluate(r.run_dir, plot=False)["n"] == 6  # default: the held-out val/
    assert main(["eval", str(r.run_dir), "--split", "test", "--json"]) == 0
    # train/ + test/ only: the held-out split is called test, in the log too
    import shutil

    shutil.rmtree(root / "val")
    b2 = load_dataset("imagefolder", root, cache=False)
    assert b2.val_name == "test" and len(b2.val) == 10 and b2.test is None
    with pytest.raises(DataError, match="no 'val' split .*use --split test"):
        b2.split("val")
    r2 = fit(TrainConfig(dataset="imagefolder", data_dir=str(root), epochs=1, batch_size=8,
                         out=str(tmp_path / "runs"), name="t2", threads=1, tensorboard=False, progress=False,
                         model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2}), verbose=False)
    assert "16 train / 10 test" in (r2.run_dir / "train.log").read_text()
    assert evaluate(r2.run_dir, plot=False)["split"] == "test"


# ---------------------------------------------------------------------------------------- progress

def test_plain_progress_lines_outside_a_terminal(monkeypatch):
    from vitlab.train import progress as P

    lines = []

    class Log:
        verbose = True

        def line(self, text):
            lines.append(text)

        def start_bar(self, *a):
            raise AssertionError("no bar outside a terminal")

        def stop_bar(self):
            pass

    monkeypatch.setattr(P, "progress_allowed", lambda: False)
    p = P.Progress(Log(), total_steps=10, start_step=0, batch_size=4, allowed=True, every_s=0.0)
    for s in range(1, 4):
        p.update(s, 4, 1, torch.tensor(0.5))
    assert len(lines) == 3 and lines[-1].startswith("step 3/10 (30%) | epoch 1 | loss 0.5000 |")
    assert "img/s | ETA" in lines[-1]
    quiet = P.Progress(Log(), 10, 0, 4, allowed=False, every_s=0.0)
    quiet.update(1, 4, 1, torch.tensor(0.5))
    assert len(lines) == 3


# ------------------------------------------------------------------------- 2 gloo processes on shards

@pytest.mark.slow
def test_two_gloo_processes_train_on_their_own_shards(tmp_path):
    import os
    import subprocess
    import sys

    from vitlab.train import checkpoint as ckpt

    out, index = shard_folder(tmp_path, n=16, shard_size="12kB")
    n_shards = len(index["splits"]["train"]["shards"])
    assert n_shards >= 4
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vitlab",
           "train", "--dataset", "shards", "--data-dir", pattern(out, index), "--img-size", "8", "--out",
           str(tmp_path / "runs"), "--name", "ddp", "epochs=2", "batch_size=8", "workers=1", "threads=1",
           "tensorboard=false", "model_kwargs.depth=1", "model_kwargs.embed_dim=16", "model_kwargs.num_heads=2",
           "max_steps=3"]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = ckpt.read_state(ckpt.resolve_checkpoint(tmp_path / "runs" / "ddp")["state"])
    pos = state["data_position"]
    # each rank kept its own position: 3 steps x 4 samples per rank
    assert len(pos) == 2 and all(p["epoch"] == 0 and sum(p["seen"]) >= 12 for p in pos)
    resume = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vitlab",
              "train", "--resume", str(tmp_path / "runs" / "ddp")]
    proc = subprocess.run(resume, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "ddp" / "summary.json").read_text())
    assert summary["finished"] and summary["world_size"] == 2
