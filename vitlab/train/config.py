"""The training configuration: one dataclass, YAML files and `key=value` overrides.

Every option a run depends on lives in `TrainConfig`; the resolved config is written to the
run directory (`config.yaml`) and into every checkpoint, so a run can be resumed, evaluated
or fine-tuned from its directory alone. Defaults follow the paper where it speaks (Adam
betas 0.9/0.999, gradient clipping at global norm 1, linear warmup then cosine decay) and
are tuned for the small CPU models elsewhere (the default run: a ViT on 8x8 digits).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, check_choice, did_you_mean

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant", "onecycle")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# Fields that steer one invocation rather than define the run: never taken from a saved
# config when resuming (a resumed run must not stop again at the old `max_steps`).
SESSION_FIELDS = ("resume", "max_steps", "progress", "device", "compile", "threads")


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- model
    model: str = "vit_nano_p2"
    model_kwargs: dict[str, Any] = field(default_factory=dict)   # constructor overrides (create_model)
    drop_path: float | None = None     # stochastic depth rate (-> drop_path_rate); None: the variant's
    dropout: float | None = None       # dropout rate (-> drop_rate); None: the variant's
    # ---------------------------------------------------------------- data
    dataset: str = "digits"
    data_dir: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)  # extra load_dataset(**options)
    val_fraction: float = 0.1
    split_seed: int = 0
    train_fraction: float = 1.0
    on_bad_image: str = "skip"         # also: a corrupt sample in a WebDataset shard
    allow_single_class: bool = False   # a classification set with one class is an error unless set
    drop_last: bool = False            # drop each epoch's last partial batch (false: every image is used)
    workers: int | None = None         # data loader worker processes (lazy folders, shards); None: from the cores
    img_size: int | None = None        # None: the data's native size
    num_classes: int | None = None     # filled in from the data (recorded for checkpoints)
    in_chans: int | None = None        # filled in from the data
    # ---------------------------------------------------------------- augmentation (AugmentConfig)
    random_resized_crop: bool = False
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    pad_crop: int = 0
    hflip: bool = False
    randaugment: tuple[int, float] | None = None   # (N ops, magnitude M), e.g. [2, 9]
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0
    random_erasing: float = 0.0        # probability an image gets one random rectangle erased (noise)
    # ---------------------------------------------------------------- preprocessing (published weights carry theirs)
    interpolation: str | None = None   # resizing filter: bilinear, bicubic, nearest; None: the weights' own, else bilinear
    crop_pct: float | None = None      # eval centre crop (timm's crop_pct); None: the weights' own, else 1.0 (no crop)
    mean: list[float] | None = None    # normalisation per channel; None: the weights' own, else measured on the data
    std: list[float] | None = None
    # ---------------------------------------------------------------- optimisation
    epochs: int = 30
    batch_size: int = 64               # global: summed over processes and accumulation steps
    eval_batch_size: int = 512
    lr: float = 3e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9              # SGD only
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None    # overrides warmup_epochs when set
    schedule: str = "cosine"
    layer_decay: float | None = None   # fine-tuning: block i's lr x layer_decay ** (depth - i); None: off
    grad_clip: float = 1.0             # global-norm clipping; 0 = off
    on_nonfinite: str = "stop"         # a NaN/inf loss or gradient: stop (the run diverged) or skip the step
    accum_steps: int = 1
    ema_decay: float = 0.0             # EMA of weights; 0 = off
    precision: str = "auto"            # auto: bf16 on GPUs with native bf16 (sm80+), fp32 elsewhere
    compile: bool = False
    cpu_allocator: str = "tuned"       # tuned: keep freed memory for reuse (fast.tune_cpu_allocator); system
    train_streams: str = "auto"        # auto: float32 CPU training as one batch part per core where that computes the same; off
    seed: int = 0
    objective: str = "classification"
    objective_kwargs: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None       # weights this run started from (fine-tuning), for the record
    # ---------------------------------------------------------------- run
    eval_every: int = 1                # epochs between evaluations (the last epoch is always evaluated)
    checkpoint_every: int = 0          # optimizer steps between extra checkpoints; 0 = at evaluations only
    out: str = "runs"
    name: str | None = None            # run directory name; None: <dataset>-<model>-<time>
    resume: str | None = None          # run directory (or checkpoint) to continue
    max_steps: int | None = None       # stop (with a checkpoint) after this many optimizer steps
    fsdp: bool = False
    device: str = "auto"
    threads: int = 0                   # CPU threads for torch (0: torch's count, every core unless OMP_NUM_THREADS says otherwise)
    tensorboard: bool = True
    progress: bool = True              # progress bar (still off when not a terminal or CI=true)

    # ---------------------------------------------------------------- helpers
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source} must be a mapping of option: value, got {type(d).__name__}")
        cfg = cls()
        for key, value in d.items():
            _set_field(cfg, str(key), value, source, parsed=True)
        return cfg

    def replace(self, **changes) -> "TrainConfig":
        cfg = dataclasses.replace(self)
        for k, v in changes.items():
            _set_field(cfg, k, v, "argument", parsed=True)
        return cfg

    def amp_dtype(self, device_type: str):
        import torch

        from ..accel import caps

        precision = self.precision
        if precision == "auto":
            # bf16 autocast where it runs natively on a GPU (CUDA sm80+). On CPUs, float32: even with
            # native bf16 (AVX-512 BF16, AMX), autocast's per-op casts cost more than they save for the
            # small models CPU users train (precision=bf16 asks for it; vitlab then uses its bf16 kernels)
            precision = "bf16" if device_type == "cuda" and caps.bf16_native("cuda") else "fp32"
        elif precision == "bf16":
            caps.warn_emulated_bf16("training with precision=bf16", device_type)
        elif precision == "fp16":
            # fp16 needs a gradient scaler and fast fp16 kernels: a CUDA feature (CPU autocast to fp16
            # is slow or missing); never silently train in another precision than asked
            if device_type != "cuda":
                raise ConfigError(f"precision=fp16 needs a CUDA GPU (device is {device_type}); use precision=bf16 "
                                  f"or precision=fp32 here")
            return torch.float16
        return torch.bfloat16 if precision == "bf16" else None

    def augment_kwargs(self) -> dict[str, Any]:
        return dict(random_resized_crop=self.random_resized_crop, rrc_scale=tuple(self.rrc_scale),
                    pad_crop=self.pad_crop, hflip=self.hflip, randaugment=self.randaugment,
                    mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
                    label_smoothing=self.label_smoothing, random_erasing=self.random_erasing,
                    **self.preprocessing_kwargs())

    def preprocessing_kwargs(self) -> dict[str, Any]:
        """interpolation and crop_pct as the transforms use them (unset: bilinear, no crop)."""
        return dict(interpolation=self.interpolation or "bilinear",
                    crop_pct=1.0 if self.crop_pct is None else float(self.crop_pct))

    def model_overrides(self) -> dict[str, Any]:
        kw = dict(self.model_kwargs)
        if self.drop_path is not None:
            kw["drop_path_rate"] = self.drop_path
        if self.dropout is not None:
            kw["drop_rate"] = self.dropout
        return kw

    def validate(self, world_size: int = 1) -> "TrainConfig":
        """Raise ConfigError for an impossible value, naming the fix."""
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        # a TrainConfig built directly (TrainConfig(epochs='abc')) skips the typing that YAML and
        # key=value go through: type every field here, so a wrong type is one clear error
        # (and a number given as text, lr='1e-3', is taken as the number)
        hints = field_types()
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not _has_type(v, hints[f.name]):  # values of the right type are kept as they are
                setattr(self, f.name, _coerce(v, hints[f.name], f.name, parsed=True))

        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("cpu_allocator", self.cpu_allocator, ("tuned", "system"))
        check_choice("train_streams", self.train_streams, ("auto", "off"))
        check_choice("on_bad_image", self.on_bad_image, ("skip", "error"))
        check_choice("on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        for name in ("epochs", "batch_size", "eval_batch_size", "accum_steps", "eval_every"):
            v = getattr(self, name)
            need(v >= 1, f"{name}={v} must be at least 1")
        for name in ("lr",):
            v = getattr(self, name)
            need(math.isfinite(v) and v > 0, f"lr={v} must be a positive number, e.g. lr=1e-3")
        need(math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr,
             f"min_lr={self.min_lr} must be between 0 and lr={self.lr}")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay={self.weight_decay} must be >= 0")
        need(self.warmup_epochs >= 0, f"warmup_epochs={self.warmup_epochs} must be >= 0")
        need(self.warmup_steps is None or self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        need(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 turns clipping off)")
        need(0 <= self.ema_decay < 1, f"ema_decay={self.ema_decay} must be in [0, 1) (0 turns EMA off)")
        need(0 <= self.momentum < 1, f"momentum={self.momentum} must be in [0, 1)")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas={list(self.betas)} must be two numbers in [0, 1), e.g. betas=[0.9,0.999]")
        need(0 <= self.label_smoothing < 1, f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        need(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "mixup_alpha and cutmix_alpha must be >= 0")
        need(0 <= self.random_erasing <= 1, f"random_erasing={self.random_erasing} must be a probability in [0, 1]")
        need(self.layer_decay is None or 0 < self.layer_decay <= 1,
             f"layer_decay={self.layer_decay} must be in (0, 1], e.g. layer_decay=0.75 (null: off)")
        need(self.pad_crop >= 0, f"pad_crop={self.pad_crop} must be >= 0")
        if self.interpolation is not None:
            check_choice("interpolation", self.interpolation, ("bilinear", "bicubic", "nearest"))
        need((self.mean is None) == (self.std is None), "set mean and std together (or neither: measured on the data)")
        if self.mean is not None:
            need(len(self.mean) == len(self.std) and len(self.mean) >= 1,
                 f"mean {list(self.mean)} and std {list(self.std)} need one value per channel each")
            need(all(math.isfinite(v) for v in self.mean) and all(math.isfinite(v) and v > 0 for v in self.std),
                 f"std {list(self.std)} must be positive and mean {list(self.mean)} finite")
        need(self.crop_pct is None or 0 < self.crop_pct <= 1,
             f"crop_pct={self.crop_pct} must be in (0, 1], e.g. crop_pct=0.9 (1: no crop; null: the weights' own)")
        need(0 < self.val_fraction < 1, f"val_fraction={self.val_fraction} must be in (0, 1)")
        need(0 < self.train_fraction <= 1, f"train_fraction={self.train_fraction} must be in (0, 1]")
        need(self.img_size is None or self.img_size >= 1, f"img_size={self.img_size} must be a positive integer")
        need(self.threads >= 0, f"threads={self.threads} must be >= 0 (0: every core)")
        need(self.workers is None or self.workers >= 0, f"workers={self.workers} must be >= 0 (0: no worker "
             f"processes; null: chosen from the cores)")
        need(self.checkpoint_every >= 0, f"checkpoint_every={self.checkpoint_every} must be >= 0")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps={self.max_steps} must be at least 1")
        for name in ("drop_path", "dropout"):
            v = getattr(self, name)
            need(v is None or 0 <= v < 1, f"{name}={v} must be in [0, 1)")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith(("cuda", "mps")),
             f"device={self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        per = world_size * self.accum_steps
        if self.batch_size % per:
            lo = max(per, self.batch_size // per * per)
            raise ConfigError(
                f"batch_size={self.batch_size} is not divisible by world size ({world_size}) x accum_steps "
                f"({self.accum_steps}) = {per}; the global batch is split evenly over both. "
                f"Use a multiple of {per}, e.g. batch_size={lo} or {lo + per}.")
        return self


# ---------------------------------------------------------------------------- field typing
_HINTS: dict[str, Any] | None = None


def field_types() -> dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(TrainConfig)
    return _HINTS




def _has_type(value, tp) -> bool:
    """Whether `value` already is of field type `tp` (ints count as floats, never bools as numbers)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(tp)
        return isinstance(value, tuple) and len(value) == len(args) and all(map(_has_type, value, args))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True


def _parse_scalar(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(value, tp, key: str, parsed: bool):
    """Convert `value` (a YAML value, or the raw text of an override) to the field type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{key}={value!r} is not a valid {_type_name(tp)}; give {key} a value of that type "
                      f"(`vitlab train --help` lists every option with its type and default)")
    if tp is Any:
        return _parse_scalar(value) if not parsed and isinstance(value, str) else value
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            return None
        for a in non_none:
            try:
                return _coerce(value, a, key, parsed)
            except ConfigError:
                continue
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads '1e-3' as text: parse it as the number it is
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is tuple:
        if isinstance(value, str):
            v = _parse_scalar(value if value.strip().startswith("[") else f"[{value}]")
        else:
            v = value
        if not isinstance(v, (list, tuple)) or len(v) != len(args):
            raise ConfigError(f"{key} needs {len(args)} values, e.g. {key}=[{', '.join('x' * len(args))}]; "
                              f"got {value!r}")
        return tuple(_coerce(x, a, key, True) for x, a in zip(v, args))
    if origin is list:
        v = value
        if isinstance(value, str):
            v = _parse_scalar(value if value.strip().startswith("[") else f"[{value}]")
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{key} needs a list, e.g. {key}=[0.5,0.5,0.5]; got {value!r}")
        return [_coerce(x, args[0], key, True) for x in v]
    if origin is dict or tp is dict:
        v = _parse_scalar(value) if isinstance(value, str) else value
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise bad
        return dict(v)
    return value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _set_field(cfg: TrainConfig, key: str, value, source: str, parsed: bool) -> None:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    head, _, rest = key.partition(".")
    if head not in names:
        raise ConfigError(f"unknown option {key!r} in {source}.{did_you_mean(head, names)} "
                          f"See `vitlab train --help` for every option.")
    tp = field_types()[head]
    if rest:  # dotted key into a dict field: model_kwargs.drop_path_rate=0.1
        if not (typing.get_origin(tp) is dict):
            raise ConfigError(f"{head!r} is not a mapping, so {key!r} is not an option; use {head}=VALUE")
        d = dict(getattr(cfg, head))
        d[rest] = _parse_scalar(value) if (not parsed and isinstance(value, str)) else value
        setattr(cfg, head, d)
        return
    setattr(cfg, head, _coerce(value, tp, key, parsed))


def apply_overrides(cfg: TrainConfig, overrides: list[str] | dict[str, Any]) -> TrainConfig:
    """Apply `key=value` strings (typed by the dataclass; dotted keys set dict entries)."""
    cfg = dataclasses.replace(cfg, model_kwargs=dict(cfg.model_kwargs), data_options=dict(cfg.data_options),
                              objective_kwargs=dict(cfg.objective_kwargs))
    if isinstance(overrides, dict):
        for k, v in overrides.items():
            _set_field(cfg, k, v, "overrides", parsed=True)
        return cfg
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. epochs=10)")
        key, value = item.split("=", 1)
        _set_field(cfg, key.strip(), value.strip(), "overrides", parsed=False)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass an existing YAML file "
                          f"(see configs/ for examples)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a text file (not UTF-8); pass a YAML file of "
                          f"option: value lines (see configs/)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    cfg = TrainConfig.from_dict(data, source=str(path))
    return apply_overrides(cfg, overrides or [])


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


FIELD_HELP = {
    "model": "model variant (`vitlab models` lists them)",
    "model_kwargs": "constructor overrides, e.g. model_kwargs.pos_embed=sincos_2d",
    "drop_path": "stochastic depth rate (null: the variant's)",
    "dropout": "dropout rate (null: the variant's)",
    "dataset": "digits, mnist, fashion-mnist, cifar10, cifar100, imagefolder, shards, synthetic",
    "data_dir": "folder with the data set's files",
    "data_options": "extra loader options, e.g. data_options.image_size=64",
    "val_fraction": "held-out fraction for data sets without an official test split",
    "split_seed": "seed of that held-out split",
    "train_fraction": "use a seeded stratified fraction of the training set",
    "on_bad_image": "skip or error: what an unreadable image file (or corrupt shard sample) does",
    "allow_single_class": "train a classifier on a data set with one class (an error otherwise: it learns nothing)",
    "drop_last": "drop each epoch's last partial batch (false: it is used, so every image is seen)",
    "workers": "data loader worker processes for lazy folders and shards (null: chosen from the cores)",
    "img_size": "training resolution (null: the data's native size)",
    "num_classes": "set from the data",
    "in_chans": "set from the data",
    "random_resized_crop": "random resized crop (Inception-style)",
    "rrc_scale": "area range of the random resized crop",
    "pad_crop": "zero-pad by N pixels and random-crop back (CIFAR recipe)",
    "hflip": "random horizontal flips",
    "randaugment": "RandAugment [N, M], e.g. [2, 9]",
    "mixup_alpha": "mixup Beta(alpha, alpha); 0 = off",
    "cutmix_alpha": "cutmix Beta(alpha, alpha); 0 = off",
    "label_smoothing": "label smoothing epsilon",
    "random_erasing": "probability that an image gets one random rectangle (2-33% of its area) replaced by "
                      "noise (Zhong et al.; ConvMixer recipe); 0 = off",
    "interpolation": "resizing filter: bilinear, bicubic or nearest (null: the starting weights' own, else bilinear)",
    "crop_pct": "evaluation crop: resize to img_size / crop_pct, cut out the centre img_size (null: the starting "
                "weights' own, else 1 = no crop)",
    "mean": "normalisation mean per channel, e.g. [0.5,0.5,0.5] (null: the starting weights' own, else measured "
            "on the training data)",
    "std": "normalisation std per channel (set with mean)",
    "epochs": "passes over the training set",
    "batch_size": "global batch (over all processes and accumulation steps)",
    "eval_batch_size": "batch size for evaluation",
    "lr": "peak learning rate (after warmup)",
    "min_lr": "learning rate at the end of the decay",
    "weight_decay": "decoupled (adamw) or L2 (adam, sgd); never on norms, biases, positions, class token",
    "optimizer": "adamw, adam or sgd",
    "betas": "Adam betas",
    "momentum": "SGD momentum",
    "warmup_epochs": "linear warmup length in epochs",
    "warmup_steps": "linear warmup length in steps (overrides warmup_epochs)",
    "schedule": "cosine, linear or constant decay after warmup (per step); onecycle: from lr/25 up to lr over "
                "the warmup (30% of the steps if 0) then down to min_lr, cosine both ways",
    "layer_decay": "layer-wise lr decay for fine-tuning ViTs: block i trains at lr x layer_decay ** (depth - i), "
                   "the head at lr (e.g. 0.75; null: off)",
    "grad_clip": "clip the global gradient norm (0 = off)",
    "on_nonfinite": "a NaN/inf loss or gradient: stop (diverged; the last good checkpoint is kept) or skip the step",
    "accum_steps": "gradient accumulation steps per optimizer step",
    "ema_decay": "EMA of weights (0 = off); evaluation then uses the EMA",
    "precision": "auto (bf16 on GPUs with native bf16, sm80+; fp32 on CPU), bf16 (autocast), fp16 (autocast with "
                 "a gradient scaler; CUDA only) or fp32",
    "compile": "torch.compile the model",
    "cpu_allocator": "on CPU: tuned (glibc keeps freed tensor memory for reuse instead of fresh, page-faulting "
                     "mmaps: ConvMixer-768/32 bf16 training 2.4x faster) or system (glibc as it is)",
    "train_streams": "on CPU with 2-4 threads: auto (float32 training runs each core's part of the batch, forward "
                     "and backward, on its own core, gradients summed in a fixed order; only where that computes "
                     "the same: no batch norm, dropout or drop path, a per-sample objective, no DDP) or off",
    "seed": "seed of initialisation, data order and augmentation",
    "objective": "training objective (classification; others register themselves)",
    "objective_kwargs": "options of the objective",
    "init_from": "weights to start from: a run, checkpoint, HF/timm folder or file, .npz, hf-hub:ORG/NAME, timm/NAME.TAG or a published tag (vitlab.models.registry.PUBLISHED)",
    "eval_every": "epochs between evaluations",
    "checkpoint_every": "optimizer steps between extra checkpoints (0: at evaluations)",
    "out": "parent folder of run directories",
    "name": "run directory name (default <dataset>-<model>-<time>)",
    "resume": "run directory to continue",
    "max_steps": "stop with a checkpoint after this many optimizer steps",
    "fsdp": "shard parameters with FSDP (under torchrun)",
    "device": "auto, cpu, cuda, cuda:N",
    "threads": "CPU threads for torch (0: every core, as torch counts them, or OMP_NUM_THREADS; never the load; "
               "a resumed run keeps its count)",
    "tensorboard": "write TensorBoard event files",
    "progress": "progress bar (off anyway when not a terminal or CI=true)",
}


def describe_fields() -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) of every option, for --help."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, tuple):
            default = list(default)
        out.append((f.name, _type_name(field_types()[f.name]), json_like(default), FIELD_HELP.get(f.name, "")))
    return out


def json_like(v) -> str:
    import json

    return json.dumps(v)
