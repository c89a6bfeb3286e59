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
checkpoint, so a resumed run continues bit for bit (on CPU, with a fixed seed).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from . import checkpoint as ckpt
from . import distributed as D
from .config import SESSION_FIELDS, TrainConfig, save_config
from .objectives import build_objective
from .optim import ModelEma, build_optimizer, lr_at
from .runlog import RunLog, plot_curves, read_jsonl


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    history: list[dict] = field(default_factory=list)      # metrics.jsonl records of this run
    step_losses: list[float] = field(default_factory=list)  # global mean loss of every step (this session)
    rank: int = 0                                           # this process's rank (0 writes and reports)


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
class _GracefulInterrupt:
    """The first Ctrl-C finishes the current optimizer step, saves a checkpoint and stops
    (resumable); a second one interrupts at once. One process only: under torchrun the
    ranks could stop at different steps."""

    def __init__(self, enabled: bool):
        import signal
        import threading

        self.requested = False
        self._old = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        import signal

        self.requested = True
        signal.signal(signal.SIGINT, self._old or signal.default_int_handler)

    def restore(self) -> None:
        import signal

        if self._old is not None and not self.requested:
            signal.signal(signal.SIGINT, self._old)
        self._old = None


def _cpu_threads(cfg: TrainConfig, info: D.DistInfo, resumed: int | None) -> int | None:
    """CPU threads for this run. threads=0 (auto) keeps torch's default unless the machine is
    already busy (1-minute load average): intra-op threads that must wait for a busy core spin
    and slow small models down many times over, so then one thread per free core. A resumed
    run reuses the count it started with (the float reduction order, hence bit-identity,
    can depend on it)."""
    if cfg.threads:
        return cfg.threads
    if info.device.type != "cpu":
        return None
    if resumed:
        return int(resumed)
    n = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - platforms without getloadavg
        return n
    free = max(1, int((os.cpu_count() or n) - load + 0.5))
    return min(n, free)


def _unique_run_dir(out: Path, name: str | None, cfg: TrainConfig) -> Path:
    if name:
        run_dir = out / name
        if (run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; continue it with "
                              f"--resume {run_dir} or choose another name (name=...)")
        return run_dir
    base = f"{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, i = out / base, 1
    while run_dir.exists():
        run_dir = out / f"{base}-{i}"
        i += 1
    return run_dir


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


def load_data(cfg: TrainConfig, report=None):
    from ..data import load_dataset

    options = dict(cfg.data_options)
    if cfg.dataset in ("imagefolder", "shards") and cfg.img_size and "image_size" not in options:
        options["image_size"] = int(cfg.img_size)  # decode at the training size, not the files' own
    return load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                        on_bad_image=cfg.on_bad_image, train_fraction=cfg.train_fraction, report=report, **options)


def make_transforms(cfg: TrainConfig, bundle, img_size: int):
    from ..data import AugmentConfig, BatchTransform

    train_tf = BatchTransform(AugmentConfig(img_size=img_size, **cfg.augment_kwargs()), bundle.mean, bundle.std,
                              bundle.num_classes, train=True)
    eval_tf = BatchTransform(AugmentConfig(img_size=img_size), bundle.mean, bundle.std, bundle.num_classes,
                             train=False)
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


# ---------------------------------------------------------------------------- the loop
def fit(cfg: TrainConfig, model: nn.Module | None = None, bundle=None, verbose: bool = True,
        merge_resume: bool = True) -> RunResult:
    """Train `cfg` (optionally starting from a prepared `model`, e.g. for fine-tuning, and/or
    an already loaded data bundle). Returns the run directory and its summary.

    With `cfg.resume` set, the run's saved config is used; `merge_resume` overrides it with the
    fields of `cfg` that differ from the defaults (the API), otherwise `cfg` is taken as the
    complete config (the CLI, which knows which options were given)."""
    info = D.init_distributed(cfg.device)
    threads = torch.get_num_threads()
    completed = False
    try:
        result = _fit(cfg, info, model, bundle, verbose, merge_resume)
        completed = True
        return result
    finally:
        torch.set_num_threads(threads)  # the thread count is process state: leave it as found
        D.shutdown(info, completed)


def _fit(cfg: TrainConfig, info: D.DistInfo, model: nn.Module | None, bundle, verbose: bool,
         merge_resume: bool) -> RunResult:
    wall0 = time.perf_counter()
    # ------------------------------------------------------------ resume: the saved config rules
    resume = None
    if cfg.resume:
        found = ckpt.resolve_checkpoint(cfg.resume)
        if found["state"] is None:
            raise CheckpointError(f"{str(found['weights'])!r} has no training state beside it; resume needs a "
                                  f"run directory (runs/NAME) written by `vitlab train`")
        state = ckpt.read_state(found["state"])
        saved = TrainConfig.from_dict(state["config"], source=f"{found['state']} config")
        cfg = merge_resume_config(saved, cfg) if merge_resume else cfg
        resume = {"found": found, "state": state}
    cfg.validate(info.world_size)
    threads = _cpu_threads(cfg, info, resume["state"].get("threads") if resume else None)
    if threads:
        torch.set_num_threads(threads)

    # ------------------------------------------------------------ data, model, objective
    seed_everything(cfg.seed)
    bundle = bundle or load_data(cfg, report=print if verbose and info.is_main else None)
    img_size = resolve_img_size(cfg, bundle)
    cfg = dataclasses.replace(cfg, img_size=img_size, num_classes=int(bundle.num_classes),
                              in_chans=int(bundle.in_chans))
    objective = build_objective(cfg.objective, cfg.objective_kwargs)
    if model is None:
        from ..models import create_model

        model = create_model(cfg.model, num_classes=cfg.num_classes, img_size=img_size, in_chans=cfg.in_chans,
                             **cfg.model_overrides())
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
    ema = ModelEma(raw, cfg.ema_decay) if cfg.ema_decay > 0 and not cfg.fsdp else None
    if cfg.ema_decay > 0 and cfg.fsdp:
        raise ConfigError("ema_decay with fsdp=true is not supported; use DDP (fsdp=false) or ema_decay=0")

    # ------------------------------------------------------------ run directory
    start_step, best, prior_wall, sums = 0, None, 0.0, None
    if resume:
        run_dir = Path(resume["found"]["run_dir"])
    else:
        run_dir = D.broadcast_object(_unique_run_dir(Path(cfg.out), cfg.name, cfg) if info.is_main else None, info)
    log = RunLog(run_dir, info.is_main, cfg.tensorboard, verbose=verbose)
    if info.is_main and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
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

    log.line(f"run {run_dir}: {cfg.model} on {cfg.dataset} ({n_train} train / {len(bundle.val.labels)} "
             f"{bundle.val_name}, "
             f"{cfg.num_classes} classes, {img_size}x{img_size}x{cfg.in_chans}), {cfg.epochs} epochs x "
             f"{steps_per_epoch} steps of {B} images, {cfg.optimizer} lr {cfg.lr:g}, {W} process(es) on {device.type}"
             + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
             + (f", {amp_dtype}".replace("torch.", "") if amp_dtype else ""))

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
    from .progress import Progress

    progress = Progress(log, total_steps, step, B, cfg.progress)
    interrupt = _GracefulInterrupt(enabled=not info.enabled)

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
        rows = [{"step": s, "lr": lr, "loss": float(v)} for (s, lr, _), v in zip(pending_steps, losses.tolist())]
        step_losses.extend(r["loss"] for r in rows)
        sums["loss"] += float(losses.sum())
        sums["steps"] += len(rows)
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
                     "best": best, "sums": sums,
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
                ckpt.save_weights(run_dir / "checkpoints" / ckpt.BEST, weights, _meta(cfg, bundle, step, epoch_done))

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
                    g["lr"] = lr
                step_loss = torch.zeros((), device=device)
                for m, (xb, yb) in enumerate(parts):
                    # uint8 goes to the device; the batch is augmented there
                    x, y = train_tf(xb.to(device, non_blocking=True), yb.to(device), generator=aug_gen)
                    sync = contextlib.nullcontext()
                    if m < A - 1 and info.enabled and not cfg.fsdp:
                        sync = train_model.no_sync()
                    with sync:
                        with _autocast(device, amp_dtype):
                            loss, metrics = objective.loss(train_model, x, y)
                        (loss / A).backward()
                    step_loss += loss.detach().float() / A
                    for k, v in metrics.items():
                        pending_metrics[k] = pending_metrics.get(k, 0.0) + torch.as_tensor(v).detach().float() / A
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=device.type != "cpu" or None)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(raw)
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
                if interrupt.requested:
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
    if interrupt.requested:
        log.line(f"interrupted at step {step}: checkpoint saved; continue with --resume {run_dir}")
        log.close()
        raise KeyboardInterrupt

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
    }
    if info.is_main:
        ckpt.atomic_write_text(run_dir / "summary.json", __import__("json").dumps(summary, indent=1))
        try:
            plot_curves(run_dir)
        except Exception as e:  # pragma: no cover - a plotting problem must not lose the run
            log.line(f"note: curves.png not written ({type(e).__name__}: {e})")
    log.close()
    return RunResult(run_dir, summary, history, step_losses, info.rank)
