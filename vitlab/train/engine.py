"""The training loop.

One optimizer step = one global batch: a seeded permutation of the training set per epoch
is cut into batches of `batch_size`, each split into `accum_steps` micro-batches and each
micro-batch into `world_size` equal shards, one per rank. Every rank computes the mean loss
of its shard; DDP averages gradients over ranks and the loss is divided by `accum_steps`, so
the update equals the one-process update on the whole global batch. The batches come from
`vitlab.data.stream` (in memory, lazily decoded folders or WebDataset shards); with
drop_last=false (the default) an epoch's last, partial batch is used too.

The position in the data is fully determined by (seed, epoch, step in epoch), and every
random stream (torch, numpy, python, the augmentation generator, per rank) is saved in the
checkpoint, so a resumed run continues bit for bit (on CPU, with a fixed seed, and the thread
count the run recorded).

Nothing is lost: the run directory is locked for the run's life (runlock.py); Ctrl-C, SIGTERM
and SIGUSR1 finish the step, save and stop (every rank at the same step); a non-finite loss or
gradient is caught before the update, so no checkpoint ever holds non-finite weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from . import checkpoint as ckpt
from . import distributed as D
from . import runlock
from .config import SESSION_FIELDS, TrainConfig, save_config
from .objectives import build_objective
from .optim import ModelEma, build_optimizer, lr_at
from .runlog import RunLog, plot_curves, plural, read_jsonl
from .runlog import dumps as json_dumps


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    history: list[dict] = field(default_factory=list)      # metrics.jsonl records of this run
    step_losses: list[float] = field(default_factory=list)  # global mean loss of every step (this session)
    rank: int = 0                                           # this process's rank (0 writes and reports)
    already_complete: bool = False                          # a --resume of a finished run: nothing was done


# ---------------------------------------------------------------------------- seeding / RNG
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training set in `epoch`: a pure function of (seed, epoch), the same
    on every rank, so the sampler position is just (epoch, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7_919 + 12_345)
    return torch.randperm(n, generator=g)


def rng_state(aug_gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
        "augment": aug_gen.get_state(),
    }


def set_rng_state(state: dict, aug_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    aug_gen.set_state(state["augment"])


# ---------------------------------------------------------------------------- helpers
class TrainingStopped(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint; `exit_status` is the shell's
    convention for that signal (128 + its number: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + int(signum)


class _GracefulStop:
    """Ctrl-C (SIGINT), SIGTERM (what SLURM, Kubernetes, preemptible cloud machines and
    `timeout` send) and SIGUSR1 (the usual pre-preemption warning on clusters) all ask the
    loop to finish the current optimizer step, save a checkpoint and stop, resumable. A second
    SIGINT or SIGTERM acts at once (the default action). Under torchrun the ranks agree on the
    step through a reduction of `signum` after every step (see `_agree`)."""

    NAMES = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self):
        import signal
        import threading

        self.signum = 0
        self._old: dict = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for name in self.NAMES:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        import signal

        if not self.signum:
            self.signum = int(signum)
        if signum != getattr(signal, "SIGUSR1", None):  # a repeated warning must not kill the run
            signal.signal(signum, self._old.get(signum) or signal.SIG_DFL)

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:  # pragma: no cover
        return f"signal {signum}"


def _agree(signum: int, bad: bool, info: D.DistInfo) -> tuple[int, bool]:
    """(signal asking to stop, non-finite step) as every rank sees them: a signal that reached
    one rank, or a non-finite loss on one rank's shard, stops or skips the step on all of them,
    so they save the same step and stay in lock step."""
    if not info.enabled:
        return signum, bad
    t = torch.tensor([signum, int(bad)], dtype=torch.int64, device=info.device)
    D.all_reduce_max(t, info)
    return int(t[0]), bool(t[1])


def _finite(t) -> bool:
    if hasattr(t, "full_tensor"):  # FSDP: a DTensor norm
        t = t.full_tensor()
    return bool(torch.isfinite(torch.as_tensor(t)).all())


def default_threads() -> int:
    """threads=0: torch's intra-op thread count for this process, which is every core (physical
    cores, as torch counts them at start-up) unless OMP_NUM_THREADS (torchrun sets 1 per process)
    or the program (torch.set_num_threads) said otherwise. Never the machine's load: float sums
    depend on the thread count, so a count that followed the load average would give the same
    command and seed different weights on a busy machine."""
    return max(1, torch.get_num_threads())


def _cpu_threads(cfg: TrainConfig, info: D.DistInfo, resumed: int | None) -> tuple[int | None, str]:
    """(CPU threads for this run, a note to log or ''). A resumed run continues with the count
    it recorded: the float reduction order, hence bit-identity with an uninterrupted run,
    depends on it; an explicit other count is honoured, with a note saying so."""
    if info.device.type != "cpu":
        return None, ""
    if resumed and cfg.threads and cfg.threads != int(resumed):
        return cfg.threads, (f"note: this run trained with {resumed} threads and continues with threads={cfg.threads}: "
                             f"float sums depend on the thread count, so the weights will differ (slightly) "
                             f"from an uninterrupted run; resume without threads= to keep {resumed}")
    if resumed and not cfg.threads:
        return int(resumed), ""
    return (cfg.threads or default_threads()), ""


def _check_classes(cfg: TrainConfig, bundle) -> None:
    """A classifier trained on one class learns nothing and scores 100% on its own validation
    split: refuse that unless asked for (objectives without labels, e.g. mpp, are not affected)."""
    if cfg.objective != "classification" or cfg.allow_single_class:
        return
    try:
        present = sorted({int(v) for v in torch.unique(bundle.train.labels).tolist()})
    except DataError:  # a streamed split (WebDataset shards) has no label tensor: its index lists the classes
        present = list(range(int(bundle.num_classes)))
    if len(present) < 2:
        names = list(bundle.class_names)
        which = f" ({names[present[0]]!r})" if present and present[0] < len(names) else ""
        where = f" in {cfg.data_dir}" if cfg.data_dir else ""
        raise DataError(f"dataset {bundle.name!r}{where} has images of only one class{which} to train on: a "
                        f"classifier learns nothing from it (and scores 100% on its own validation split); add a "
                        f"folder of images for at least one more class, or pass allow_single_class=true if "
                        f"this is intended")


def resolve_img_size(cfg: TrainConfig, bundle) -> int:
    if cfg.img_size is not None:
        return int(cfg.img_size)
    h, w = bundle.native_size
    if h != w:
        raise ConfigError(f"dataset {bundle.name!r} has non-square images ({h}x{w}); choose the training "
                          f"size with --img-size N")
    return int(h)


def merge_resume_config(saved: TrainConfig, given: TrainConfig) -> TrainConfig:
    """A resumed run keeps its saved config; fields the caller changed from the defaults
    override it (e.g. more epochs), and session fields always come from the caller."""
    defaults = TrainConfig()
    merged = dataclasses.replace(saved)
    for f in dataclasses.fields(TrainConfig):
        v = getattr(given, f.name)
        if f.name in SESSION_FIELDS or (f.name not in ("name", "out") and v != getattr(defaults, f.name)):
            setattr(merged, f.name, v)
    return merged


def file_decode_options(dataset: str, img_size, preprocessing: dict) -> dict:
    """Decode settings of the data sets read from image files (folders, shards): the run's resizing
    filter, and the size evaluation resizes to (img_size / crop_pct, so its centre crop keeps the
    full resolution; training resizes the whole image to img_size). Nothing for array data sets."""
    if dataset not in ("imagefolder", "shards"):
        return {}
    from ..data.augment import eval_scale_size

    options = {}
    if preprocessing.get("interpolation", "bilinear") != "bilinear":
        options["interpolation"] = preprocessing["interpolation"]
    if img_size:  # decode at the training size, not the files' own
        h, w = eval_scale_size(img_size, preprocessing.get("crop_pct", 1.0))
        options["image_size"] = h if h == w else [h, w]
    return options


def adopt_preprocessing(cfg: TrainConfig, pre: dict) -> tuple[TrainConfig, list[str]]:
    """`cfg` with the starting weights' preprocessing (Loaded.preprocessing: mean, std,
    interpolation, crop_pct, input_size) wherever the run leaves it unset, and the log line saying
    what was adopted. What the user set wins; the run's config records the result, so eval,
    predict, export and resume apply the same."""
    pre = pre or {}
    changes: dict = {}
    if cfg.interpolation is None and pre.get("interpolation") in ("bilinear", "bicubic", "nearest"):
        changes["interpolation"] = pre["interpolation"]
    crop = pre.get("crop_pct")
    if cfg.crop_pct is None and isinstance(crop, (int, float)) and 0 < crop <= 1:
        changes["crop_pct"] = float(crop)
    size = pre.get("input_size")
    if cfg.img_size is None and isinstance(size, int) and size > 0:
        changes["img_size"] = size
    if cfg.mean is None and pre.get("mean") and pre.get("std") and len(pre["mean"]) == len(pre["std"]):
        changes["mean"], changes["std"] = [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]]
    if not changes:
        return cfg, []
    said = []
    if "img_size" in changes:
        said.append(f"input {changes['img_size']} px (img_size=N or --img-size N changes it)")
    if "interpolation" in changes:
        said.append(f"{changes['interpolation']} resizing")
    if "crop_pct" in changes:
        said.append(f"evaluation crop_pct {changes['crop_pct']:g}")
    if "mean" in changes:
        said.append(f"mean {_rounded(changes['mean'])} std {_rounded(changes['std'])}")
    return dataclasses.replace(cfg, **changes), ["preprocessing of the starting weights: " + ", ".join(said)]


def _rounded(values) -> list[float]:
    return [round(float(v), 4) for v in values]


def apply_normalisation(cfg: TrainConfig, bundle):
    """The bundle normalised with cfg.mean/std when the run sets them (else the data's own)."""
    if cfg.mean is None:
        return bundle
    if len(cfg.mean) != bundle.in_chans:
        raise ConfigError(f"mean/std have {len(cfg.mean)} values but {bundle.name} is decoded with {bundle.in_chans} "
                          f"channel(s); give one value per channel (or data_options.in_chans={len(cfg.mean)})")
    return dataclasses.replace(bundle, mean=tuple(float(v) for v in cfg.mean), std=tuple(float(v) for v in cfg.std))


def load_data(cfg: TrainConfig, report=None):
    from ..data import load_dataset

    options = {**file_decode_options(cfg.dataset, cfg.img_size, cfg.preprocessing_kwargs()), **cfg.data_options}
    return load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                        on_bad_image=cfg.on_bad_image, train_fraction=cfg.train_fraction, report=report, **options)


def make_transforms(cfg: TrainConfig, bundle, img_size: int):
    from ..data import AugmentConfig, BatchTransform

    train_tf = BatchTransform(AugmentConfig(img_size=img_size, **cfg.augment_kwargs()), bundle.mean, bundle.std,
                              bundle.num_classes, train=True)
    eval_tf = BatchTransform(AugmentConfig(img_size=img_size, **cfg.preprocessing_kwargs()), bundle.mean, bundle.std,
                             bundle.num_classes, train=False)
    return train_tf, eval_tf


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_objective(model: nn.Module, objective, dataset, transform, device: torch.device,
                       batch_size: int, amp_dtype=None, info: D.DistInfo | None = None,
                       shard: bool = True) -> dict[str, float]:
    """Mean loss and metrics of `objective` over `dataset` (sharded over ranks and summed)."""
    info = info or D.DistInfo(device=device)
    was_training = model.training
    model.eval()
    n = len(dataset.labels)
    idx = torch.arange(n)
    if shard and info.enabled:
        idx = idx[info.rank::info.world_size]
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=device)
    names: list[str] = []
    for start in range(0, len(idx), batch_size):
        b = idx[start:start + batch_size]
        x, y = transform(dataset.images[b].to(device, non_blocking=True), dataset.labels[b].to(device))
        with _autocast(device, amp_dtype):
            loss, metrics = objective.loss(model, x, y)
        items = {"loss": loss, **metrics}
        for k, v in items.items():
            v = torch.as_tensor(v, device=device).detach().to(torch.float64)
            if k not in sums:
                sums[k] = torch.zeros((), dtype=torch.float64, device=device)
                names.append(k)
            sums[k] += v * len(b)
        count += len(b)
    if not names:  # an empty shard must still take part in the reduction
        _, m0 = objective.loss(model, *[t.to(device) for t in transform(dataset.images[:1], dataset.labels[:1])])
        names = ["loss", *m0]
        sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in names}
    if shard and info.enabled:
        packed = torch.stack([sums[k] for k in names] + [count])
        D.all_reduce_sum(packed, info)
        sums = dict(zip(names, packed[:-1]))
        count = packed[-1]
    model.train(was_training)
    return {k: float(sums[k] / count) for k in names}


def _meta(cfg: TrainConfig, bundle, step: int, epoch: int) -> dict:
    return {"config": cfg.to_dict(), "class_names": list(bundle.class_names), "mean": list(bundle.mean),
            "std": list(bundle.std), "step": step, "epoch": epoch, "dataset": bundle.name}


def _finished_run(cfg: TrainConfig, state: dict, run_dir: Path, info: D.DistInfo, verbose: bool) -> RunResult | None:
    """A resume of a run that already trained every epoch asked for: say so and change nothing
    (no log line, no rewritten summary). More epochs (epochs=N) continue it as usual. A run
    killed between its last checkpoint and its summary is not complete: it goes on (no steps
    left) and writes the summary."""
    spe = int(state.get("steps_per_epoch") or 0)
    step = int(state["step"])
    if not spe or step < cfg.epochs * spe:
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not summary.get("finished") or summary.get("steps") != step:
        return None
    if verbose and info.is_main:
        print(complete_message(run_dir, step, spe), flush=True)
    return RunResult(run_dir, summary, read_jsonl(run_dir / "metrics.jsonl"), [], info.rank, already_complete=True)


def complete_message(run_dir: Path, step: int, steps_per_epoch: int) -> str:
    done = step // steps_per_epoch
    return (f"run {run_dir} is complete: it trained {plural(done, 'epoch')} ({plural(step, 'step')}); nothing to do. "
            f"To train it longer, pass more epochs: vitlab train --resume {run_dir} epochs={done + 1}")


# ---------------------------------------------------------------------------- the loop
def fit(cfg: TrainConfig, model: nn.Module | None = None, bundle=None, verbose: bool = True,
        merge_resume: bool = True, notes: tuple[str, ...] | list[str] = ()) -> RunResult:
    """Train `cfg` (optionally starting from a prepared `model`, e.g. for fine-tuning, and/or
    an already loaded data bundle). Returns the run directory and its summary.

    With `cfg.resume` set, the run's saved config is used; `merge_resume` overrides it with the
    fields of `cfg` that differ from the defaults (the API), otherwise `cfg` is taken as the
    complete config (the CLI, which knows which options were given). `notes` are lines for the
    run's log after its first line (e.g. what fine-tuning changed in the model)."""
    info = D.init_distributed(cfg.device)
    threads = torch.get_num_threads()
    completed = False
    locks: list[runlock.RunLock] = []  # the run directory's lock, held until the run ends
    try:
        result = _fit(cfg, info, model, bundle, verbose, merge_resume, locks, notes)
        completed = True
        return result
    finally:
        for lock in locks:
            lock.release() if completed else lock.discard_if_empty()
        torch.set_num_threads(threads)  # the thread count is process state: leave it as found
        D.shutdown(info, completed)


def _locked_everywhere(claim, info: D.DistInfo, locks: list):
    """Run `claim()` (which locks a run directory and returns (lock, run_dir)) on rank 0 and give
    every rank its run directory, or its error: a refusal must stop all ranks, not leave the
    others waiting at the next collective."""
    run_dir, error = None, None
    if info.is_main:
        try:
            lock, run_dir = claim()
            locks.append(lock)
        except ConfigError as e:
            error = str(e)
    run_dir, error = D.broadcast_object((run_dir, error), info)
    if error:
        raise ConfigError(error)
    return run_dir


def _fit(cfg: TrainConfig, info: D.DistInfo, model: nn.Module | None, bundle, verbose: bool,
         merge_resume: bool, locks: list, notes=()) -> RunResult:
    wall0 = time.perf_counter()
    # ------------------------------------------------------------ resume: the saved config rules
    resume = None
    if cfg.resume:
        # lock first: a live run may be replacing the very checkpoint files read below
        resume_dir = runlock.run_dir_of(cfg.resume)
        if resume_dir.is_dir():
            _locked_everywhere(lambda: (runlock.acquire(resume_dir, "resume"), resume_dir), info, locks)
        found = ckpt.resolve_checkpoint(cfg.resume)
        if found["state"] is None:
            raise CheckpointError(f"{str(found['weights'])!r} has no training state beside it; resume needs a "
                                  f"run directory (runs/NAME) written by `vitlab train`")
        state = ckpt.read_state(found["state"])
        saved = TrainConfig.from_dict(state["config"], source=f"{found['state']} config")
        cfg = merge_resume_config(saved, cfg) if merge_resume else cfg
        resume = {"found": found, "state": state}
        cfg.validate(info.world_size)
        done = _finished_run(cfg, state, Path(found["run_dir"]), info, verbose)
        if done is not None:
            return done
    cfg.validate(info.world_size)
    source, pre_notes = None, []
    if cfg.init_from and not resume and model is None:
        # the starting weights are read before the data: their preprocessing (filter, crop, size,
        # normalisation) decides how the data is decoded
        from ..models.sources import read_init_source

        source = read_init_source(cfg.init_from, cfg.model)
        if source is not None:
            cfg, pre_notes = adopt_preprocessing(cfg, source.preprocessing)
            if "in_chans" not in cfg.data_options and cfg.dataset != "synthetic":
                # the data decoded with the weights' channels (grey <-> RGB), as finetune does, so the
                # patch projection keeps its meaning
                cfg = dataclasses.replace(cfg, data_options={**cfg.data_options, "in_chans": int(source.in_chans)})
    if not resume:
        # claimed and locked before the data loads: a second trainer on the same run is refused at
        # once; a directory this call made stays only if the run writes something into it
        def claim():
            lock = runlock.new_run_dir(Path(cfg.out), cfg.name, runlock.default_run_name(cfg.dataset, cfg.model))
            return lock, lock.run_dir

        run_dir = _locked_everywhere(claim, info, locks)
    threads, threads_note = _cpu_threads(cfg, info, resume["state"].get("threads") if resume else None)
    if threads:
        torch.set_num_threads(threads)

    # ------------------------------------------------------------ data, model, objective
    seed_everything(cfg.seed)
    bundle = apply_normalisation(cfg, bundle or load_data(cfg, report=print if verbose and info.is_main else None))
    _check_classes(cfg, bundle)
    img_size = resolve_img_size(cfg, bundle)
    cfg = dataclasses.replace(cfg, img_size=img_size, num_classes=int(bundle.num_classes),
                              in_chans=int(bundle.in_chans))
    objective = build_objective(cfg.objective, cfg.objective_kwargs)
    init_notes: list[str] = []
    if model is None:
        from ..models import create_model

        model = create_model(cfg.model, num_classes=cfg.num_classes, img_size=img_size, in_chans=cfg.in_chans,
                             **cfg.model_overrides())
        if cfg.init_from and not resume:  # starting weights from a run, file, folder or Hub id (never ignored)
            from ..models.sources import init_from_source

            init_notes = init_from_source(model, cfg.init_from, loaded=source) + pre_notes
        if hasattr(objective, "prepare_model"):
            model = objective.prepare_model(model) or model
    B, A, W = cfg.batch_size, cfg.accum_steps, info.world_size
    if resume and "drop_last" not in resume["state"]["config"]:
        cfg = dataclasses.replace(cfg, drop_last=True)  # a run from before the option dropped partial batches
    from ..data.stream import make_train_data

    train_data = make_train_data(bundle, batch_size=B, accum_steps=A, world_size=W, rank=info.rank, seed=cfg.seed,
                                 drop_last=cfg.drop_last, workers=cfg.workers, permutation=epoch_permutation,
                                 report=print if verbose and info.is_main else None)
    n_train, steps_per_epoch = train_data.n_train, train_data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total_steps)

    device = info.device
    amp_dtype = cfg.amp_dtype(device.type)
    if device.type == "cpu" and cfg.cpu_allocator == "tuned":
        from ..accel import ops as fast

        fast.tune_cpu_allocator()  # process-wide; a no-op where glibc is not the allocator
    raw = model.to(device)
    from .. import accel

    accel.accelerate(raw)  # the same function with the fastest kernels the hardware has (vitlab.accel)
    if device.type == "cpu" and amp_dtype == torch.bfloat16 and accel.caps.bf16_native("cpu"):
        # vitlab's CPU kernels where they build: GELU (forward and backward) on the bf16 activations
        # autocast produces, layer norms with bf16 weights, fused attention in evaluation
        accel.use_cpu_kernels(raw)
    # Rank streams differ (dropout, augmentation); the model's initial weights do not.
    if info.rank:
        torch.manual_seed(cfg.seed + info.rank)
    aug_gen = torch.Generator().manual_seed(cfg.seed * 7_919 + 104_729 * (info.rank + 1))

    if cfg.fsdp:
        if not info.enabled:
            raise ConfigError("fsdp=true shards the model over processes; start it with "
                              "`torchrun --nproc-per-node N -m vitlab train ...` (or drop fsdp)")
        D.wrap_fsdp(raw, info, amp_dtype)
    optimizer = build_optimizer(raw, cfg)
    # precision=fp16: scale the loss so small gradients survive fp16; the scaler skips a step whose
    # gradients overflowed and lowers the scale (disabled, it passes everything through unchanged)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEma(raw, cfg.ema_decay) if cfg.ema_decay > 0 and not cfg.fsdp else None
    if cfg.ema_decay > 0 and cfg.fsdp:
        raise ConfigError("ema_decay with fsdp=true is not supported; use DDP (fsdp=false) or ema_decay=0")

    # ------------------------------------------------------------ run directory
    start_step, best, prior_wall, sums = 0, None, 0.0, None
    if resume:
        run_dir = Path(resume["found"]["run_dir"])
    log = RunLog(run_dir, info.is_main, cfg.tensorboard, verbose=verbose)
    if threads_note:
        log.line(threads_note)
    if info.is_main and not resume:
        save_config(cfg, run_dir / "config.yaml")

    if resume:
        state = resume["state"]
        if int(state.get("steps_per_epoch", steps_per_epoch)) != steps_per_epoch:
            raise ConfigError(f"the run took {state['steps_per_epoch']} steps per epoch but this config takes "
                              f"{steps_per_epoch} (batch_size or data changed); resume with the run's own "
                              f"batch_size={state['config'].get('batch_size')} and data")
        tensors, meta = ckpt.read_weights(resume["found"]["weights"])
        weights, ema_w = ckpt.split_ema(tensors)
        ckpt_cfg = meta.get("config") or state["config"]
        cur = cfg.to_dict()
        if cfg.fsdp:
            D.load_full_state(raw, optimizer, weights, state["optimizer"], fsdp=True)
        else:
            ckpt.load_weights_into(raw, weights, str(resume["found"]["weights"]), cur, ckpt_cfg)
            try:
                optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"optimizer state in {str(resume['found']['state'])!r} does not match "
                                      f"optimizer={cfg.optimizer} ({e}); resume with the run's own optimizer") from None
        if ema is not None:
            if ema_w is None:
                raise CheckpointError("the checkpoint has no EMA weights but ema_decay > 0; resume with "
                                      "ema_decay=0 or start a new run")
            ema.load_state_dict(ema_w)
        if scaler.is_enabled() and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])  # fp16: continue at the loss scale it had reached
        start_step = int(state["step"])
        train_data.restore(state.get("data_position"))
        best = state.get("best")
        prior_wall = float(state.get("wall_s", 0.0))
        sums = state.get("sums")
        rngs = state["rng"]
        if len(rngs) == W:
            set_rng_state(rngs[info.rank], aug_gen)
        else:  # another world size: the data order is unchanged, the random streams restart
            log.line(f"note: resuming with {W} processes instead of {len(rngs)}; random streams reseeded")
            seed_everything(cfg.seed + 1_000 * start_step + info.rank)
        log.truncate_after(start_step)
        if info.is_main:  # only now that the checkpoint fits: record the config that continues it
            save_config(cfg, run_dir / "config.yaml")
        log.line(f"resuming {run_dir} at step {start_step} (epoch {start_step // steps_per_epoch + 1})")

    if cfg.fsdp:
        train_model = raw
    elif info.enabled:
        train_model = D.wrap_ddp(raw, info, getattr(objective, "find_unused_parameters", False))
    else:
        train_model = raw
    if cfg.compile:
        train_model = torch.compile(train_model)
    params = [p for p in raw.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in raw.parameters()) if not cfg.fsdp else None
    # float32 CPU training as one batch part per core (vitlab.accel.ops.train_in_streams), where it
    # computes the same gradient: one process, eager, a per-sample objective; the model's own
    # conditions (no batch norm, no random layers, ...) are checked per batch by train_streams_for
    from ..accel import ops as fast

    streams_ok = (cfg.train_streams == "auto" and device.type == "cpu" and not info.enabled and not cfg.fsdp
                  and not cfg.compile and amp_dtype is None and getattr(objective, "per_sample_mean", False))

    log.line(f"run {run_dir}: {cfg.model} on {cfg.dataset} ({n_train} train / {len(bundle.val.labels)} "
             f"{bundle.val_name}, "
             f"{cfg.num_classes} classes, {img_size}x{img_size}x{cfg.in_chans}), {plural(cfg.epochs, 'epoch')} x "
             f"{plural(steps_per_epoch, 'step')} of {B} images, {cfg.optimizer} lr {cfg.lr:g}, {W} process(es) on {device.type}"
             + (f" ({torch.get_num_threads()} CPU threads)" if device.type == "cpu" else "")
             + (f", {amp_dtype}".replace("torch.", "") if amp_dtype else ""))
    for note in notes:
        log.line(note)

    for note in init_notes:
        log.line(note)
    log.line(train_data.describe())
    train_tf, eval_tf = make_transforms(cfg, bundle, img_size)

    # running sums since the last evaluation (saved in checkpoints: mid-epoch resume keeps them)
    sums = sums or {"loss": 0.0, "steps": 0, "images": 0, "train_s": 0.0, "metrics": {}}
    pending_steps: list[tuple[int, float, torch.Tensor]] = []
    pending_metrics: dict[str, torch.Tensor] = {}  # summed over steps, kept on the device until a flush
    step_losses: list[float] = []
    history: list[dict] = []
    total_images, total_train_s = 0, 0.0
    step = start_step
    last_eval: dict = {}
    stop = False
    stop_signal = 0
    skipped = int(resume["state"].get("skipped_steps", 0)) if resume else 0  # non-finite steps (on_nonfinite=skip)
    skipped_in_a_row = 0
    from .progress import Progress

    progress = Progress(log, total_steps, step, B, cfg.progress)
    interrupt = _GracefulStop()

    def _diverged(what: str) -> TrainingDiverged:
        """The error that stops a diverged run: where, the likely cause, and that the last good
        checkpoint (never overwritten by non-finite weights) is what --resume and eval use."""
        progress.stop()
        last = ckpt.last_step(run_dir / "checkpoints")
        hints = [f"the learning rate lr={cfg.lr:g} is too high for this model (try lr={cfg.lr / 10:g})"]
        if cfg.grad_clip <= 0:
            hints.append("no gradient clipping (grad_clip=0; try grad_clip=1)")
        if amp_dtype is not None:
            hints.append(f"{str(amp_dtype).replace('torch.', '')} overflow (try precision=fp32)")
        kept = (f"the last good checkpoint (step {last}) is unchanged and is what --resume and eval use"
                if last is not None else "no checkpoint was written")
        msg = (f"training diverged: {what}. Likely cause: {' or '.join(hints)}, or non-finite input data. "
               f"Nothing was saved from this point: {kept}. Start again with a lower lr, or use "
               f"on_nonfinite=skip to skip such steps")
        log.line(msg, echo=False)  # the error itself reports it on the terminal
        log.close()
        return TrainingDiverged(msg)

    def flush_steps() -> None:
        """Global mean loss of the pending steps (one reduction), into steps.jsonl and the sums."""
        nonlocal pending_steps, pending_metrics
        for k, v in pending_metrics.items():
            sums["metrics"][k] = sums["metrics"].get(k, 0.0) + float(v)
        pending_metrics = {}
        if not pending_steps:
            return
        losses = torch.stack([t for _, _, t in pending_steps]).double()
        losses = D.all_reduce_sum(losses, info) / W
        values = losses.tolist()
        # a skipped (non-finite) step is logged with loss null and left out of the epoch's mean
        rows = [{"step": s, "lr": lr, "loss": v if math.isfinite(v) else None}
                for (s, lr, _), v in zip(pending_steps, values)]
        step_losses.extend(values)
        good = [v for v in values if math.isfinite(v)]
        sums["loss"] += float(sum(good))
        sums["steps"] += len(good)
        log.steps(rows)
        pending_steps = []

    def save(epoch_done: int) -> None:
        """Collective: every rank takes part (RNG gather, FSDP gathers); rank 0 writes."""
        flush_steps()
        rng = D.all_gather_object(rng_state(aug_gen), info)
        data_pos = D.all_gather_object(train_data.position(), info)
        weights = D.full_model_state(raw, cfg.fsdp)
        optim_sd = D.full_optim_state(raw, optimizer, cfg.fsdp)
        if info.is_main:
            state = {"step": step, "epoch": epoch_done, "step_in_epoch": step - epoch_done * steps_per_epoch,
                     "steps_per_epoch": steps_per_epoch, "optimizer": optim_sd,
                     "scheduler": {"step": step, "total_steps": total_steps, "warmup_steps": warmup,
                                   "schedule": cfg.schedule},
                     "rng": rng, "data_position": data_pos, "threads": threads, "config": cfg.to_dict(),
                     "best": best, "sums": sums, "skipped_steps": skipped,
                     "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "wall_s": prior_wall + time.perf_counter() - wall0}
            ckpt.save_checkpoint(run_dir / "checkpoints", step, weights, _meta(cfg, bundle, step, epoch_done), state,
                                 ema.state_dict() if ema is not None else None)
        D.barrier(info)

    def evaluate_and_log(epoch_done: int) -> None:
        nonlocal best, last_eval
        flush_steps()
        eval_model = ema.module if ema is not None else raw
        res = evaluate_objective(eval_model, objective, bundle.val, eval_tf, device, cfg.eval_batch_size, amp_dtype,
                                 info, shard=not cfg.fsdp)
        train_metrics = {}
        for k, v in sums["metrics"].items():
            t = D.all_reduce_sum(torch.tensor(v, dtype=torch.float64, device=device), info) / W
            train_metrics[f"train_{k}"] = float(t) / max(sums["steps"], 1)
        record = {"epoch": epoch_done, "step": step, "lr": optimizer.param_groups[0]["lr"],
                  "train_loss": sums["loss"] / max(sums["steps"], 1), **train_metrics,
                  "val_loss": res["loss"], **{f"val_{k}": v for k, v in res.items() if k != "loss"},
                  "images_per_sec": sums["images"] / sums["train_s"] if sums["train_s"] > 0 else None}
        if not math.isfinite(record["val_loss"]):
            history.append(record)
            log.metrics(record)
            raise _diverged(f"the evaluation after step {step} (epoch {epoch_done}) gave a non-finite validation "
                            f"loss ({record['val_loss']})")
        primary = getattr(objective, "primary_metric", None)
        score = record.get(f"val_{primary}") if primary else -record["val_loss"]
        improved = best is None or score > best["score"]
        if improved:
            best = {"score": score, "step": step, "epoch": epoch_done, "val_acc": record.get("val_acc"),
                    "val_loss": record["val_loss"]}
        history.append(record)
        last_eval = record
        log.metrics(record)
        acc = f" | val_acc {100 * record['val_acc']:.2f}%" if record.get("val_acc") is not None else ""
        ips = f" | {record['images_per_sec']:,.0f} img/s" if record["images_per_sec"] else ""
        log.line(f"epoch {epoch_done}/{cfg.epochs} step {step} | lr {record['lr']:.2e} | "
                 f"train_loss {record['train_loss']:.4f} | val_loss {record['val_loss']:.4f}{acc}{ips}")
        sums.update(loss=0.0, steps=0, images=0, train_s=0.0, metrics={})
        if improved:
            # under FSDP gathering the full weights is collective: every rank takes part
            weights = ema.state_dict() if ema is not None else D.full_model_state(raw, cfg.fsdp)
            if info.is_main:
                try:
                    ckpt.save_weights(run_dir / "checkpoints" / ckpt.BEST, weights,
                                      _meta(cfg, bundle, step, epoch_done))
                except Exception as e:
                    if not ckpt.write_failure(e):
                        raise
                    last = ckpt.last_step(run_dir / "checkpoints")
                    raise CheckpointError(f"could not write {ckpt.BEST} after step {step} ({ckpt.why(e)}); the last "
                                          f"checkpoint (step {last}) is intact: free space, then continue with "
                                          f"--resume {run_dir}") from None

    # ------------------------------------------------------------ epochs
    epoch = step // steps_per_epoch
    raw.train()
    train_model.train()
    try:
        while epoch < cfg.epochs and not stop:
            t0 = time.perf_counter()
            for s, parts, n_step in train_data.epoch(epoch, step - epoch * steps_per_epoch):
                lr = lr_at(step, base_lr=cfg.lr, min_lr=cfg.min_lr, total_steps=total_steps, warmup_steps=warmup,
                           schedule=cfg.schedule)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)  # lr_scale: layer_decay's per-layer factor
                step_loss = torch.zeros((), device=device)
                step_metrics: dict[str, torch.Tensor] = {}
                for m, (xb, yb) in enumerate(parts):
                    # uint8 goes to the device; the batch is augmented there
                    x, y = train_tf(xb.to(device, non_blocking=True), yb.to(device), generator=aug_gen)
                    sync = contextlib.nullcontext()
                    if m < A - 1 and info.enabled and not cfg.fsdp:
                        sync = train_model.no_sync()
                    n_streams = fast.train_streams_for(raw, x) if streams_ok else 1
                    if n_streams > 1:
                        loss, metrics = fast.train_in_streams(
                            lambda xp, yp: objective.loss(train_model, xp, yp), x, y, n_streams, params,
                            backward_scale=lambda part_loss: scaler.scale(part_loss / A))
                    else:
                        with sync:
                            with _autocast(device, amp_dtype):
                                loss, metrics = objective.loss(train_model, x, y)
                            scaler.scale(loss / A).backward()
                    step_loss += loss.detach().float() / A
                    for k, v in metrics.items():
                        step_metrics[k] = step_metrics.get(k, 0.0) + torch.as_tensor(v).detach().float() / A
                scaler.unscale_(optimizer)  # the true gradients, for clipping and the guard
                if cfg.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=device.type != "cpu" or None)
                else:
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                # Divergence guard, before the update: a non-finite loss or gradient never reaches the
                # weights, so the last checkpoint and the weights stay finite. (One host sync per step:
                # free on CPU, small next to a step on GPU.) Every rank must take the same decision.
                # (fp16: overflowing gradients are the scaler's business, it skips that step itself)
                local_bad = not (_finite(step_loss) and (scaler.is_enabled() or _finite(norm)))
                stop_signal, any_bad = _agree(interrupt.signum, local_bad, info)
                if any_bad:
                    optimizer.zero_grad(set_to_none=True)
                    pending_steps.append((step, lr, torch.full((), float("nan"), device=device)))
                    flush_steps()
                    skipped_in_a_row += 1
                    if cfg.on_nonfinite == "stop" or skipped_in_a_row >= steps_per_epoch:
                        what = (f"the loss or its gradient is not finite at step {step} (epoch {epoch + 1})"
                                if cfg.on_nonfinite == "stop" else
                                f"every step of a whole epoch ({skipped_in_a_row}) had a non-finite loss, up to "
                                f"step {step}")
                        raise _diverged(what)
                    skipped += 1
                    log.line(f"note: step {step} skipped: non-finite loss or gradient (on_nonfinite=skip; "
                             f"{skipped} skipped so far)")
                else:
                    skipped_in_a_row = 0
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(raw)
                    for k, v in step_metrics.items():
                        pending_metrics[k] = pending_metrics.get(k, 0.0) + v
                    pending_steps.append((step, lr, step_loss))
                step += 1
                sums["images"] += n_step
                total_images += n_step
                if len(pending_steps) >= 50:
                    flush_steps()
                progress.update(step, n_step, epoch + 1, step_loss)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                    dt = time.perf_counter() - t0
                    sums["train_s"] += dt
                    total_train_s += dt
                    save(epoch)
                    t0 = time.perf_counter()
                if cfg.max_steps and step >= cfg.max_steps:
                    stop = True
                    break
                if stop_signal:
                    stop = True
                    break
            dt = time.perf_counter() - t0
            sums["train_s"] += dt
            total_train_s += dt
            if step == (epoch + 1) * steps_per_epoch:
                epoch += 1
                if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                    evaluate_and_log(epoch)
                    save(epoch)
                elif stop:
                    save(epoch)
            elif stop:
                save(epoch)
    finally:
        interrupt.restore()
        train_data.close()
    progress.stop()
    flush_steps()
    if stop_signal and step < total_steps:
        msg = (f"stopped by {_signal_name(stop_signal)} at step {step} (epoch {step // steps_per_epoch + 1}): "
               f"checkpoint saved; continue with: vitlab train --resume {run_dir}")
        log.line(msg, echo=False)  # the exception carries it to the terminal (the CLI prints it)
        log.close()
        raise TrainingStopped(stop_signal, msg)

    if skipped:
        log.line(f"note: {skipped} of {step} steps were skipped: non-finite loss or gradient (on_nonfinite=skip)")

    # ------------------------------------------------------------ summary
    finished = step >= total_steps
    wall = prior_wall + time.perf_counter() - wall0
    flops = None
    if info.is_main and not cfg.fsdp:
        try:
            from ..flops import count_flops

            flops = count_flops(raw, img_size=img_size, in_chans=cfg.in_chans)
        except Exception as e:  # the count is informative only: never lose a finished run over it
            log.line(f"note: FLOPs not counted ({type(e).__name__}: {e})")
    final = last_eval or (read_jsonl(run_dir / "metrics.jsonl")[-1:] or [{}])[0]
    summary = {
        "finished": finished, "model": cfg.model, "dataset": cfg.dataset, "img_size": img_size,
        "epochs": step // steps_per_epoch, "steps": step, "val_acc": final.get("val_acc"),
        "val_loss": final.get("val_loss"), "best_val_acc": (best or {}).get("val_acc"),
        "best_step": (best or {}).get("step"), "wall_s": round(wall, 3),
        "images_per_sec": (total_images * 1.0 / total_train_s) if total_train_s > 0 else None,
        "params": n_params, "flops": flops, "world_size": W, "device": device.type,
        "run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoints"),
        "threads": torch.get_num_threads() if device.type == "cpu" else None, "skipped_steps": skipped,
    }
    if info.is_main:
        ckpt.atomic_write_text(run_dir / "summary.json", json_dumps(summary, indent=1))
        try:
            plot_curves(run_dir)
        except Exception as e:  # pragma: no cover - a plotting problem must not lose the run
            log.line(f"note: curves.png not written ({type(e).__name__}: {e})")
    log.close()
    return RunResult(run_dir, summary, history, step_losses, info.rank)
