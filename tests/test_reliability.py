"""Reliability (issue 22): nothing lost, ever.

One writer per run directory (a second trainer, or a --resume of a live run, is refused naming
the other process; unnamed runs get distinct directories atomically); SIGTERM / SIGUSR1 save a
checkpoint and the resumed run ends bit-identical to an uninterrupted one (also under 2-process
torchrun, the signal reaching one rank only); divergence is caught before it reaches the weights
and every JSON output stays valid; images decode as shown (16-bit, transparency, CMYK, EXIF
rotation); steps.jsonl after a resume equals the uninterrupted run's row for row; the thread
count never follows the machine's load; a finished run is not touched by --resume; and every
bad input of benchmarks/bad_inputs.py (the docs/reliability.md table) gets one clear line.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vitlab.cli import main
from vitlab.errors import ConfigError, TrainingDiverged
from vitlab.train import checkpoint as ckpt
from vitlab.train import distributed as D
from vitlab.train import runlock
from vitlab.train.config import TrainConfig
from vitlab.train.engine import _cpu_threads, default_threads, fit

REPO = Path(__file__).resolve().parents[1]
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}
TINY_ARGS = [f"model_kwargs.{k}={v}" for k, v in TINY.items()]


def _load_script():
    spec = importlib.util.spec_from_file_location("bad_inputs", REPO / "benchmarks" / "bad_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bad_inputs"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


BAD = _load_script()


def tiny_cfg(out, **kw) -> TrainConfig:
    base = dict(out=str(out), epochs=2, threads=1, tensorboard=False, progress=False, model_kwargs=dict(TINY))
    base.update(kw)
    return TrainConfig(**base)


def _env() -> dict:
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None)
    return env


def _weights(run_dir) -> dict:
    return load_file(str(ckpt.resolve_checkpoint(run_dir)["weights"]))


def _same_weights(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _rows(path: Path) -> list[dict]:
    """JSON lines parsed strictly: a bare NaN/Infinity (not JSON) fails."""
    def refuse(c):
        raise ValueError(f"{path.name} holds {c}, which is not JSON")
    return [json.loads(ln, parse_constant=refuse) for ln in path.read_text().splitlines() if ln.strip()]


def _json(path: Path):
    """A whole JSON file parsed strictly."""
    def refuse(c):
        raise ValueError(f"{path.name} holds {c}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def _strip_speed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows]


# ---------------------------------------------------------------------------- one writer per run
def _wait_for_lock(run_dir: Path, pid: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if json.loads((run_dir / runlock.LOCK_NAME).read_text() or "{}").get("pid") == pid:
                return
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            raise AssertionError(f"the trainer ended before it locked its run: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("the trainer never locked its run directory")


@pytest.mark.slow
def test_a_second_trainer_and_a_resume_of_a_live_run_are_refused(tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["train", "--out", str(out), "--name", "x", "epochs=6", "threads=1", "progress=false",
            "tensorboard=false", *TINY_ARGS]
    first = subprocess.Popen([sys.executable, "-m", "vitlab", *args], cwd=tmp_path, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = out / "x"
    try:
        _wait_for_lock(run, first.pid, first)
        # the same --out/--name with another seed: refused, naming the live trainer
        assert main(args + ["--seed", "1"]) == 2
        err = capsys.readouterr().err
        assert f"in use by process {first.pid}" in err and "vitlab train --out" in err
        # --resume of the live run: refused before any checkpoint file is read (CLI and API)
        assert main(["train", "--resume", str(run)]) == 2
        assert f"cannot resume {str(run)!r}: it is in use by process {first.pid}" in capsys.readouterr().err
        with pytest.raises(ConfigError, match=f"in use by process {first.pid}"):
            fit(TrainConfig(resume=str(run)), verbose=False)
        assert first.poll() is None, "the first trainer must still be running for this test to mean anything"
    finally:
        stdout, stderr = first.communicate(timeout=300)
    # the first run is intact: one row per step and per epoch, its own seed, exit 0
    assert first.returncode == 0, stderr
    assert [r["step"] for r in _rows(run / "steps.jsonl")] == list(range(156))
    assert [r["epoch"] for r in _rows(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert _json(run / "summary.json")["finished"] is True
    assert "seed: 0" in (run / "config.yaml").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["x"]
    # and the lock went with the process: the run can be resumed (here: it is complete)
    assert main(["train", "--resume", str(run)]) == 0


def test_unnamed_runs_started_together_get_distinct_directories(tmp_path):
    # eight trainers claiming a name in the same second (threads: flock and mkdir are per call)
    from concurrent.futures import ThreadPoolExecutor

    base = "digits-vit_nano_p2-20261205-120000"
    with ThreadPoolExecutor(8) as pool:
        locks = list(pool.map(lambda _: runlock.new_run_dir(tmp_path, None, base), range(8)))
    names = sorted(lock.run_dir.name for lock in locks)
    assert names == sorted([base] + [f"{base}-{i}" for i in range(1, 8)])
    # a held lock is exclusive, also within one process (flock is per open file)
    with pytest.raises(ConfigError, match=f"in use by process {os.getpid()}"):
        runlock.acquire(locks[0].run_dir)
    for lock in locks:
        lock.release()
    runlock.acquire(locks[0].run_dir).release()


# ---------------------------------------------------------------------------- signals
DRIVER = """
import os, signal, sys
import vitlab.train.engine as E
from vitlab.cli import main

sig, at, rank = getattr(signal, sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
real = E.lr_at

def lr_at(step, **kw):  # the signal arrives while step `at` runs (on one rank only under torchrun)
    if step == at and int(os.environ.get("RANK", "0")) == rank:
        os.kill(os.getpid(), sig)
    return real(step, **kw)

E.lr_at = lr_at
sys.exit(main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return fit(tiny_cfg(out, name="full"), verbose=False)


@pytest.mark.slow
@pytest.mark.parametrize("signame, status", [("SIGTERM", 143), ("SIGUSR1", 138)])
def test_a_signal_saves_and_the_resumed_run_is_bit_identical(tmp_path, uninterrupted, signame, status):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = tmp_path / "sig"
    args = ["train", "--out", str(tmp_path), "--name", "sig", "epochs=2", "threads=1", "tensorboard=false",
            "progress=false", *TINY_ARGS]
    proc = subprocess.run([sys.executable, str(driver), signame, "30", "0", *args], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    # the step under way is finished (30 -> 31), saved, and the way on is printed; exit 128 + signal
    assert proc.returncode == status, proc.stderr
    assert f"stopped by {signame} at step 31 (epoch 2): checkpoint saved; continue with: vitlab train --resume" \
        in proc.stderr
    assert ckpt.last_step(run / "checkpoints") == 31
    assert [r["step"] for r in _rows(run / "steps.jsonl")] == list(range(31))

    rest = fit(TrainConfig(resume=str(run)), verbose=False)
    assert rest.summary["finished"] and rest.summary["steps"] == 52
    assert not _same_weights(_weights(uninterrupted.run_dir), _weights(run))
    # the logs too, row for row: no step twice, none missing
    assert _rows(run / "steps.jsonl") == _rows(uninterrupted.run_dir / "steps.jsonl")
    assert _strip_speed(_rows(run / "metrics.jsonl")) == _strip_speed(_rows(uninterrupted.run_dir / "metrics.jsonl"))


@pytest.mark.slow
def test_sigterm_on_one_torchrun_rank_stops_every_rank_at_the_same_step(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    common = ["epochs=2", "batch_size=32", "max_steps=12", "lr=5e-3", "warmup_steps=2", "precision=fp32",
              "tensorboard=false", "threads=1", "progress=false", *TINY_ARGS]
    env = {**_env(), "OMP_NUM_THREADS": "1"}

    def torchrun(script: list[str], *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script, *args]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)

    # SIGTERM reaches rank 1 only (not the rank that writes) during step 5
    proc = torchrun([str(driver), "SIGTERM", "5", "1"], "train", "--out", str(tmp_path), "--name", "cut", *common)
    assert proc.returncode != 0  # each rank exits with 143; torchrun reports the failure
    assert "stopped by SIGTERM at step 6" in proc.stdout + proc.stderr
    assert ckpt.last_step(tmp_path / "cut" / "checkpoints") == 6
    state = ckpt.read_state(ckpt.resolve_checkpoint(tmp_path / "cut")["state"])
    assert len(state["rng"]) == 2  # both ranks took part in the save
    proc = torchrun(["-m", "vitlab"], "train", "--resume", str(tmp_path / "cut"), "max_steps=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun(["-m", "vitlab"], "train", "--out", str(tmp_path), "--name", "whole", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not _same_weights(_weights(tmp_path / "whole"), _weights(tmp_path / "cut"))
    assert _rows(tmp_path / "cut" / "steps.jsonl") == _rows(tmp_path / "whole" / "steps.jsonl")


# ---------------------------------------------------------------------------- divergence
def test_divergence_stops_before_the_weights_and_keeps_the_last_good_checkpoint(tmp_path):
    part = fit(tiny_cfg(tmp_path, name="d", max_steps=26), verbose=False)  # one epoch: 26 steps
    files = {p: p.read_bytes() for p in (part.run_dir / "checkpoints").iterdir()}
    with pytest.raises(TrainingDiverged, match=r"not finite at step 2\d .*lr=1e\+06 is too high.*"
                                               r"last good checkpoint \(step 26\) is unchanged"):
        fit(TrainConfig(resume=str(part.run_dir), lr=1e6), verbose=False)
    # nothing after the divergence was saved: the checkpoint --resume and eval use is the good one
    assert {p: p.read_bytes() for p in (part.run_dir / "checkpoints").iterdir()} == files
    model, info = ckpt.load_model(part.run_dir)
    assert info["step"] == 26 and all(torch.isfinite(p).all() for p in model.parameters())
    # every JSON output is JSON (the non-finite step is logged with loss null)
    rows = _rows(part.run_dir / "steps.jsonl")
    assert rows[-1]["loss"] is None and all(r["loss"] is not None for r in rows[:-1])
    _rows(part.run_dir / "metrics.jsonl")
    _json(part.run_dir / "summary.json")


def test_on_nonfinite_skip_counts_skipped_steps_and_keeps_weights_finite(tmp_path, monkeypatch):
    import vitlab.train.engine as E

    real = E.build_objective
    calls = {"n": 0}

    def with_bad_batches(*a, **k):  # the 4th and 8th training batches give a NaN loss (e.g. an overflow)
        obj = real(*a, **k)
        loss = obj.loss

        def bad_loss(model, x, y):
            out, metrics = loss(model, x, y)
            if model.training:
                calls["n"] += 1
                if calls["n"] in (4, 8):
                    out = out * float("nan")
            return out, metrics
        obj.loss = bad_loss
        return obj

    monkeypatch.setattr(E, "build_objective", with_bad_batches)
    r = fit(tiny_cfg(tmp_path, name="s", epochs=1, on_nonfinite="skip"), verbose=False)
    summary = _json(r.run_dir / "summary.json")
    rows = _rows(r.run_dir / "steps.jsonl")
    assert [x["step"] for x in rows if x["loss"] is None] == [3, 7]
    assert summary["skipped_steps"] == 2 and summary["steps"] == 26 and summary["finished"]
    assert all(torch.isfinite(t).all() for t in _weights(r.run_dir).values())
    assert "note: 2 of 26 steps were skipped" in (r.run_dir / "train.log").read_text()
    # the epoch's mean loss leaves the skipped steps out (it is a number, not NaN/null)
    assert _rows(r.run_dir / "metrics.jsonl")[0]["train_loss"] == pytest.approx(
        np.mean([x["loss"] for x in rows if x["loss"] is not None]))
    with pytest.raises(ConfigError, match="on_nonfinite='ignore' is not valid"):
        TrainConfig(on_nonfinite="ignore").validate()


def test_json_outputs_write_null_for_nan(tmp_path):
    from vitlab.train.runlog import RunLog, dumps

    log = RunLog(tmp_path, True, tensorboard=False, verbose=False)
    log.metrics({"epoch": 1, "step": 3, "val_loss": float("nan"), "val_acc": float("inf")})
    assert _rows(tmp_path / "metrics.jsonl") == [{"epoch": 1, "step": 3, "val_loss": None, "val_acc": None}]
    assert dumps({"a": [float("-inf"), 1.5]}) == '{"a": [null, 1.5]}'


def test_broken_weights_are_refused_by_eval_and_predict(tmp_path):
    from vitlab.train.api import evaluate, predict
    from vitlab.errors import CheckpointError
    from PIL import Image

    r = fit(tiny_cfg(tmp_path, name="b", epochs=1, max_steps=3), verbose=False)
    path = ckpt.resolve_checkpoint(r.run_dir)["weights"]
    tensors, meta = ckpt.read_weights(path)
    tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()}
    ckpt.save_weights(path, tensors, meta)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(CheckpointError, match="outputs NaN/inf"):
        predict(r.run_dir, [tmp_path / "x.png"])
    with pytest.raises(CheckpointError, match="outputs NaN/inf"):
        evaluate(r.run_dir, out=tmp_path / "ev", plot=False)


# ---------------------------------------------------------------------------- images
def test_images_decode_as_shown_in_training_and_predict(tmp_path):
    from PIL import Image

    from vitlab.data.imagefolder import _decode
    from vitlab.train.api import _read_image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    BAD.png16(tmp_path / "g16.png", grey)
    rgb = rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16)
    BAD.png16(tmp_path / "rgb16.png", rgb)
    want_grey = np.round(grey / 257.0)
    for got in (_decode(str(tmp_path / "g16.png"), (8, 8), "L", "squash")[..., 0],
                _read_image(tmp_path / "g16.png", 1)[0].numpy()):
        assert np.abs(got.astype(float) - want_grey).max() <= 0.5  # not 255 everywhere
    got = _decode(str(tmp_path / "g16.png"), (8, 8), "RGB", "squash")
    assert np.abs(got.astype(float) - want_grey[..., None]).max() <= 0.5
    got = _read_image(tmp_path / "rgb16.png", 3).permute(1, 2, 0).numpy().astype(float)
    assert np.abs(got - rgb / 257.0).max() <= 1.0  # PIL keeps the high byte

    # a palette image whose colour 0 (red) is transparent: white where transparent, as a viewer shows it
    p = Image.new("P", (4, 4), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.save(tmp_path / "pal.png", transparency=0)
    got = _decode(str(tmp_path / "pal.png"), (4, 4), "RGB", "squash")
    assert got[0, 0].tolist() == [0, 0, 255] and got[1, 1].tolist() == [255, 255, 255]

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert _read_image(tmp_path / "cmyk.jpg", 3)[:, 0, 0].tolist() == pytest.approx([255, 0, 0], abs=2)

    # a photo stored sideways (8 wide, 4 high, left half red) with EXIF orientation 6 (rotate 90 clockwise)
    a = np.zeros((4, 8, 3), np.uint8)
    a[:, :4] = [255, 0, 0]
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.png", exif=exif)
    got = _decode(str(tmp_path / "rot.png"), (8, 4), "RGB", "squash")  # shown 4 wide, 8 high: red on top
    assert got.shape == (8, 4, 3) and got[0, 0].tolist() == [255, 0, 0] and got[-1, 0].tolist() == [0, 0, 0]
    assert _read_image(tmp_path / "rot.png", 3).shape == (3, 8, 4)


# ---------------------------------------------------------------------------- steps.jsonl after a resume
def test_steps_log_after_a_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    part = fit(tiny_cfg(tmp_path, name="p", max_steps=30), verbose=False)
    # a session killed after it flushed rows past its last checkpoint (step 30) leaves them behind
    full_rows = _rows(uninterrupted.run_dir / "steps.jsonl")
    with open(part.run_dir / "steps.jsonl", "a") as f:
        for r in full_rows[30:44]:
            f.write(json.dumps(r) + "\n")
    fit(TrainConfig(resume=str(part.run_dir)), verbose=False)
    assert _rows(part.run_dir / "steps.jsonl") == full_rows


# ---------------------------------------------------------------------------- threads
def _cores() -> tuple[int, int]:
    """(physical cores, logical CPUs) this process may run on, from the kernel's topology."""
    cpus = os.sched_getaffinity(0)
    try:
        cores = {tuple(Path(f"/sys/devices/system/cpu/cpu{c}/topology/{f}").read_text().strip()
                       for f in ("physical_package_id", "core_id")) for c in cpus}
    except OSError:
        pytest.skip("no CPU topology in /sys")
    return len(cores), len(cpus)


def test_default_thread_count_is_every_core_whatever_the_load(tmp_path):
    # a fresh process (as `vitlab train` is), on an idle and on a very busy machine
    code = ("import os, sys; load = float(sys.argv[1]); os.getloadavg = lambda: (load, load, load); "
            "from vitlab.train.engine import _cpu_threads; from vitlab.train import distributed as D; "
            "from vitlab.train.config import TrainConfig; print(_cpu_threads(TrainConfig(), D.DistInfo(), None)[0])")
    env = _env()
    env.pop("OMP_NUM_THREADS", None)
    got = {load: int(subprocess.run([sys.executable, "-c", code, str(load)], env=env, capture_output=True,
                                    text=True, check=True, cwd=tmp_path).stdout)
           for load in (0.0, 50.0)}
    physical, logical = _cores()
    assert len(set(got.values())) == 1, got
    assert physical <= got[0.0] <= logical, (got, physical, logical)


def test_thread_count_follows_the_settings_and_the_recorded_count(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    torch.set_num_threads(2)  # what OMP_NUM_THREADS or the program set: taken as it is
    try:
        assert default_threads() == 2
        assert _cpu_threads(TrainConfig(), D.DistInfo(), None) == (2, "")
        assert _cpu_threads(TrainConfig(threads=3), D.DistInfo(), None) == (3, "")
        # a resumed run keeps its recorded count; another explicit count is honoured, with the reason it differs
        assert _cpu_threads(TrainConfig(), D.DistInfo(), 3) == (3, "")
        threads, note = _cpu_threads(TrainConfig(threads=2), D.DistInfo(), 3)
        assert threads == 2 and "weights will differ" in note
    finally:
        torch.set_num_threads(1)


@pytest.mark.slow
def test_same_command_under_different_load_gives_the_same_weights(tmp_path, monkeypatch):
    runs = []
    torch.set_num_threads(2)  # as in a fresh process on 2 cores (a load heuristic would then pick 1 or 2)
    try:
        for load in (0.0, 40.0):  # an idle machine, then a very busy one
            monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
            runs.append(fit(tiny_cfg(tmp_path, name=f"load{int(load)}", threads=0, epochs=1, max_steps=6),
                            verbose=False))
    finally:
        torch.set_num_threads(1)
    assert not _same_weights(_weights(runs[0].run_dir), _weights(runs[1].run_dir))
    assert runs[0].summary["threads"] == runs[1].summary["threads"] == 2
    # the count is recorded, and a resume continues with it (here one the default would not pick)
    part = fit(tiny_cfg(tmp_path, name="one", threads=1, epochs=1, max_steps=5), verbose=False)
    assert ckpt.read_state(ckpt.resolve_checkpoint(part.run_dir)["state"])["threads"] == 1
    rest = fit(TrainConfig(resume=str(part.run_dir), max_steps=10), verbose=False)
    assert rest.summary["threads"] == 1


# ---------------------------------------------------------------------------- finished runs
def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    r = fit(tiny_cfg(tmp_path, name="done", epochs=1), verbose=False)

    def snapshot():
        # every file of the run (the lock file is the lock's, rewritten by whoever takes it)
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in r.run_dir.rglob("*")
                if p.is_file() and p.name != runlock.LOCK_NAME}

    before = snapshot()
    assert main(["train", "--resume", str(r.run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"run {r.run_dir} is complete: it trained 1 epoch (26 steps); nothing to do" in out
    assert "resuming" not in out
    assert snapshot() == before
    # asking for more epochs continues it
    assert main(["train", "--resume", str(r.run_dir), "epochs=2", "--quiet"]) == 0
    assert [x["epoch"] for x in _rows(r.run_dir / "metrics.jsonl")] == [1, 2]


def test_one_class_is_refused_unless_allowed(tmp_path):
    from PIL import Image

    (tmp_path / "data" / "cat").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(tmp_path / "data" / "cat" / f"{i}.png")
    cfg = tiny_cfg(tmp_path / "runs", dataset="imagefolder", data_dir=str(tmp_path / "data"), epochs=1, batch_size=8,
                   data_options={"cache": False})
    with pytest.raises(Exception, match="only one class \\('cat'\\).*allow_single_class=true"):
        fit(cfg, verbose=False)
    assert list((tmp_path / "runs").iterdir()) == []  # no run directory left behind
    r = fit(cfg.replace(allow_single_class=True), verbose=False)
    assert r.summary["finished"]


# ---------------------------------------------------------------------------- every bad input: one line
@pytest.fixture(scope="module")
def bad_ctx(tmp_path_factory):
    return BAD.Ctx(tmp_path_factory.mktemp("bad-inputs"))


@pytest.mark.parametrize("case", BAD.CASES, ids=[c.input[:60] for c in BAD.CASES])
def test_bad_input_gets_one_clear_line(case, bad_ctx, monkeypatch):
    monkeypatch.chdir(bad_ctx.root)
    row = BAD.run_case(case, bad_ctx)
    assert not row["traceback"], row["message"]
    assert row["ok"], f"expected {case.expect!r}, got: {row['message']}"


def test_the_table_in_docs_lists_every_case_without_a_traceback():
    # docs/reliability.md is generated by benchmarks/bad_inputs.py: regenerate it when a case is added
    table = (REPO / "docs" / "reliability.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| input")]
    assert len(rows) == len(BAD.CASES)
    for case, row in zip(BAD.CASES, rows):
        assert row.startswith(f"| {BAD._md(case.input)} |")
        assert row.endswith("| no | yes |"), row
    assert f"{len(BAD.CASES)} cases, 0 tracebacks, 0 wrong results" in table
