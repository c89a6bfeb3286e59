"""Checkpoints: weights in safetensors, training state in a torch file, written atomically.

Layout of `runs/<name>/checkpoints/`:

    step-00000120.safetensors    model weights (+ `ema.`-prefixed EMA weights), with the
                                 resolved config, class names, mean/std in its metadata
    step-00000120.state.pt       optimizer, schedule position, sampler position (epoch,
                                 step in epoch), RNG states of every rank, running sums
    last.json                    {"step": 120, "weights": ..., "state": ...}: the commit point
    best.safetensors             weights of the best evaluation so far (self-contained)

Every file is written to a temporary file in the same directory, fsynced, renamed over its
final name with `os.replace` (atomic on POSIX) and the directory fsynced. A new generation is
committed by replacing `last.json` only after both of its files are durable, and the old
generation is deleted after that, so a kill at any moment leaves `last.json` pointing at a
complete checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import CheckpointError

FORMAT = 1
POINTER = "last.json"
BEST = "best.safetensors"
EMA_PREFIX = "ema."


# ---------------------------------------------------------------------------- atomic files
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block finishes, make its contents
    durable and move them over `path` in one step. On error the temporary file is removed
    and `path` keeps its old contents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; a run directory shared with a group must be readable like
        # any other file its owner writes: the permissions the umask gives a new file
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ---------------------------------------------------------------------------- weights
def _cpu_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage (safetensors refuses aliases)."""
    out, seen = {}, set()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[k] = t
    return out


def save_weights(path: str | Path, weights: dict[str, torch.Tensor], meta: dict[str, Any],
                 ema: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights (and EMA weights under `ema.`) to a safetensors file, atomically; `meta`
    (JSON-able) goes into its header so the file alone rebuilds the model."""
    from safetensors.torch import save_file

    tensors = dict(weights)
    if ema is not None:
        tensors.update({EMA_PREFIX + k: v for k, v in ema.items()})
    tensors = _cpu_tensors(tensors)
    metadata = {"format": "pt", "vitlab": json.dumps({"format_version": FORMAT, **meta}, default=_json_default)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _json_default(o):
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def read_weights(path: str | Path, map_location: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, vitlab metadata) of a safetensors checkpoint; CheckpointError if unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist; pass a run directory "
                              f"(runs/NAME) or a .safetensors file")
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        other = ("the run's last one: pass the run directory without --best" if path.name == BEST
                 else "best.safetensors")
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or not a safetensors file "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}); "
                              f"use another checkpoint (e.g. {other}) or retrain") from None
    try:
        info = json.loads(meta["vitlab"]) if "vitlab" in meta else {}
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint file {str(path)!r} has a damaged vitlab header; "
                              f"use another checkpoint") from None
    return tensors, info


def split_ema(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict | None]:
    model = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
    ema = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    return model, (ema or None)


# ---------------------------------------------------------------------------- state
def save_state(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_state(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {str(path)!r} is missing; the run cannot be resumed from it "
                              f"(its weights can still be evaluated or fine-tuned)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "unsupported global" in str(e).lower():
            # torch's safe loader met a Python object other than tensors and plain containers:
            # refused, never executed (a crafted state file can run code when unpickled)
            raise CheckpointError(f"training state {str(path)!r} was refused as unsafe: it holds Python objects "
                                  f"other than tensors and plain data, which vitlab never unpickles; resume only "
                                  f"runs written by vitlab (or start again)") from None
        raise CheckpointError(f"training state {str(path)!r} is corrupt ({type(e).__name__}); "
                              f"resume from another run or start again") from None
    except Exception as e:
        raise CheckpointError(f"training state {str(path)!r} is corrupt ({type(e).__name__}); "
                              f"resume from another run or start again") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT:
        raise CheckpointError(f"training state {str(path)!r} is not a vitlab training state (format {FORMAT})")
    return state


# ---------------------------------------------------------------------------- generations
def save_checkpoint(ckpt_dir: str | Path, step: int, weights: dict, meta: dict, state: dict,
                    ema: dict | None = None) -> Path:
    """Write generation `step` (weights + state), commit it via last.json, drop older ones."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stem = f"step-{step:08d}"
    weights_path = ckpt_dir / f"{stem}.safetensors"
    state_path = ckpt_dir / f"{stem}.state.pt"
    pointer = {"step": step, "epoch": state.get("epoch"), "weights": weights_path.name, "state": state_path.name}
    previous = last_step(ckpt_dir)
    try:
        save_weights(weights_path, weights, meta, ema)
        save_state(state_path, {"format_version": FORMAT, **state})
        atomic_write_text(ckpt_dir / POINTER, json.dumps(pointer, indent=1))
    except Exception as e:
        if not write_failure(e):
            raise
        if previous != step:  # the uncommitted generation's files only take space
            for p in (weights_path, state_path):
                with contextlib.suppress(OSError):
                    p.unlink()
        kept = (f"the previous checkpoint (step {previous}) is intact" if previous is not None
                else "no earlier checkpoint exists")
        raise CheckpointError(f"could not write the checkpoint of step {step} in {str(ckpt_dir)!r} "
                              f"({why(e)}); {kept}: free space (or fix the folder), then continue with "
                              f"--resume {ckpt_dir.parent}") from None
    # only now is the new generation the last good one: remove everything else
    for p in ckpt_dir.iterdir():
        stale = (p.name.startswith("step-") and p.name not in (weights_path.name, state_path.name)) or \
                (p.name.startswith(".") and p.name.endswith(".tmp"))
        if stale:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return weights_path


def write_failure(e: BaseException) -> bool:
    """An error of writing a file (disk full, quota, permissions, I/O), from Python or from
    safetensors (which reports it as its own error type)."""
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


def why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    for known in ("No space left on device", "Disk quota exceeded", "Permission denied", "Read-only file system"):
        if known in text:
            return known
    return f"{type(e).__name__}: {text.splitlines()[0] if text else 'write failed'}"


def read_pointer(ckpt_dir: Path) -> dict:
    path = ckpt_dir / POINTER
    try:
        pointer = json.loads(path.read_text())
        return {"step": int(pointer["step"]), "weights": ckpt_dir / pointer["weights"],
                "state": ckpt_dir / pointer["state"], "epoch": pointer.get("epoch")}
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint pointer {str(path)!r} is corrupt; pass a .safetensors file "
                              f"from {str(ckpt_dir)!r} instead") from None


def last_step(ckpt_dir: Path) -> int | None:
    """The step of the run's committed checkpoint, or None when it has none (or it is unreadable)."""
    try:
        return read_pointer(Path(ckpt_dir))["step"] if (Path(ckpt_dir) / POINTER).is_file() else None
    except CheckpointError:
        return None


def resolve_checkpoint(path: str | Path, which: str = "last") -> dict:
    """Find weights (and training state) from a run directory, its checkpoints/ folder, a
    last.json pointer or a .safetensors file. Returns {'weights', 'state' (or None), 'run_dir'}."""
    p = Path(path)
    if p.is_file():
        if p.name == POINTER:
            ptr = read_pointer(p.parent)
            return {"weights": ptr["weights"], "state": ptr["state"], "run_dir": p.parent.parent}
        if p.suffix == ".safetensors":
            state = p.with_name(p.name[: -len(".safetensors")] + ".state.pt")
            run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
            return {"weights": p, "state": state if state.is_file() else None, "run_dir": run_dir}
        raise CheckpointError(f"{str(p)!r} is not a checkpoint; pass a run directory (runs/NAME) "
                              f"or a .safetensors file")
    if p.is_dir():
        ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        run_dir = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else ckpt_dir
        if which == "best" and (ckpt_dir / BEST).is_file():
            return {"weights": ckpt_dir / BEST, "state": None, "run_dir": run_dir}
        if (ckpt_dir / POINTER).is_file():
            ptr = read_pointer(ckpt_dir)
            return {"weights": ptr["weights"], "state": ptr["state"], "run_dir": run_dir}
        raise CheckpointError(f"no checkpoint in {str(p)!r} (no checkpoints/{POINTER}); pass the directory "
                              f"of a run that saved one, or a .safetensors file")
    raise CheckpointError(f"checkpoint {str(p)!r} does not exist; pass a run directory (runs/NAME) "
                          f"or a .safetensors file")


# ---------------------------------------------------------------------------- loading
ARCH_FIELDS = ("model", "img_size", "num_classes", "in_chans")


def describe_mismatch(model_sd: dict[str, torch.Tensor], ckpt_sd: dict[str, torch.Tensor],
                      model_cfg: dict | None = None, ckpt_cfg: dict | None = None, limit: int = 8) -> list[str]:
    """Human-readable differences between a model's state dict and a checkpoint's."""
    diffs = []
    if model_cfg is not None and ckpt_cfg is not None:
        for k in ARCH_FIELDS:
            if k in ckpt_cfg and ckpt_cfg.get(k) != model_cfg.get(k):
                diffs.append(f"{k}: checkpoint {ckpt_cfg.get(k)!r} vs model {model_cfg.get(k)!r}")
        mk, ck = model_cfg.get("model_kwargs") or {}, ckpt_cfg.get("model_kwargs") or {}
        for k in sorted(set(mk) | set(ck)):
            if "drop" not in k and mk.get(k) != ck.get(k):
                diffs.append(f"model_kwargs.{k}: checkpoint {ck.get(k)!r} vs model {mk.get(k)!r}")
    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    shapes = [k for k in model_sd if k in ckpt_sd and tuple(model_sd[k].shape) != tuple(ckpt_sd[k].shape)]
    for k in shapes[:limit]:
        diffs.append(f"shape of {k}: checkpoint {tuple(ckpt_sd[k].shape)} vs model {tuple(model_sd[k].shape)}")
    if len(shapes) > limit:
        diffs.append(f"... and {len(shapes) - limit} more shape differences")
    if missing:
        more = f" (+{len(missing) - limit} more)" if len(missing) > limit else ""
        diffs.append(f"{len(missing)} tensors missing from the checkpoint: {', '.join(missing[:limit])}{more}")
    if unexpected:
        more = f" (+{len(unexpected) - limit} more)" if len(unexpected) > limit else ""
        diffs.append(f"{len(unexpected)} tensors the model does not have: {', '.join(unexpected[:limit])}{more}")
    return diffs


def load_weights_into(model: nn.Module, weights: dict[str, torch.Tensor], source: str = "checkpoint",
                      model_cfg: dict | None = None, ckpt_cfg: dict | None = None) -> None:
    """Strict load; CheckpointError listing every difference when the checkpoint is from
    another model or shape."""
    sd = model.state_dict()
    shape_ok = set(sd) == set(weights) and all(tuple(sd[k].shape) == tuple(weights[k].shape) for k in sd)
    name_ok = not (model_cfg and ckpt_cfg and ckpt_cfg.get("model") not in (None, model_cfg.get("model")))
    if not (shape_ok and name_ok):
        diffs = describe_mismatch(sd, weights, model_cfg, ckpt_cfg)
        raise CheckpointError(f"checkpoint {source!r} does not match the model: {'; '.join(diffs)}. "
                              f"Use the model and image size the checkpoint was trained with, or "
                              f"`vitlab finetune` to adapt it")
    with torch.no_grad():
        for k, v in sd.items():
            v.copy_(weights[k].to(v.dtype))


def build_model_from_config(cfg: dict) -> nn.Module:
    """The model a run trains, rebuilt from its resolved config."""
    from ..models import create_model
    from .config import TrainConfig
    from .objectives import build_objective

    tc = TrainConfig.from_dict({k: v for k, v in cfg.items()}, source="checkpoint config")
    model = create_model(tc.model, num_classes=tc.num_classes, img_size=tc.img_size, in_chans=tc.in_chans,
                         **tc.model_overrides())
    objective = build_objective(tc.objective, tc.objective_kwargs)
    if hasattr(objective, "prepare_model"):
        model = objective.prepare_model(model) or model
    return model


def load_model(run_dir_or_checkpoint: str | Path, map_location: str = "cpu", which: str = "last",
               ema: bool | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a trained model from a run directory or a .safetensors checkpoint.

    Returns (model in eval mode, info) where info has 'config' (the resolved TrainConfig
    dict), 'class_names', 'mean', 'std', 'img_size', 'in_chans', 'num_classes', 'step',
    'epoch', 'checkpoint' (path) and 'run_dir'. `which` picks 'last' or 'best' in a run
    directory; `ema` picks the EMA weights (default: when the checkpoint has them, since
    they are the ones evaluated).
    """
    from ..errors import check_choice

    check_choice("which", which, ("last", "best"))
    found = resolve_checkpoint(run_dir_or_checkpoint, which)
    tensors, meta = read_weights(found["weights"], map_location="cpu")
    cfg = meta.get("config")
    if not cfg:
        raise CheckpointError(f"{str(found['weights'])!r} has no vitlab config in its header; it was not "
                              f"written by vitlab (load it with safetensors and create_model instead)")
    weights, ema_weights = split_ema(tensors)
    use_ema = ema_weights is not None if ema is None else ema
    if use_ema and ema_weights is None:
        raise CheckpointError(f"{str(found['weights'])!r} has no EMA weights (the run had ema_decay=0)")
    model = build_model_from_config(cfg)
    load_weights_into(model, ema_weights if use_ema else weights, str(found["weights"]), cfg, cfg)
    model.to(map_location).eval()
    info = {
        "config": cfg,
        "class_names": meta.get("class_names"),
        "mean": tuple(meta.get("mean") or ()),
        "std": tuple(meta.get("std") or ()),
        "img_size": cfg.get("img_size"),
        "in_chans": cfg.get("in_chans"),
        "num_classes": cfg.get("num_classes"),
        "step": meta.get("step"),
        "epoch": meta.get("epoch"),
        "ema": use_ema,
        "checkpoint": str(found["weights"]),
        "run_dir": str(found["run_dir"]),
    }
    return model, info
