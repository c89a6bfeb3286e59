"""`vitlab models`: every registered variant with its parameters (and, with --flops, forward GFLOPs).

Importing torch and building ~30 models (on the meta device) costs about 3.5 s of CPU, counting
FLOPs by running each model's code about 8 s more on this 2-core CPU (48 s were seen on a busy
machine), so the table is cached per version of the
model code (a hash of vitlab/models/*.py and vitlab/flops.py, and torch's version): after the first
run the listing is read back without importing torch. GFLOPs are counted only on request (--flops)
and then kept in the same cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("models", help="list every model with its parameters (and forward GFLOPs with --flops)",
                       description="List every named model variant with its parameter count (1000 classes) "
                                   "and, with --flops, forward GFLOPs for one image at its default size. The "
                                   "table is cached ($VITLAB_CACHE_DIR, else ~/.cache/vitlab) until the model "
                                   "code changes.")
    p.add_argument("--family", default=None,
                   help="only this family: vit, hybrid, cvt, convmixer, resnet (default: every family)")
    p.add_argument("--flops", action="store_true",
                   help="also count forward GFLOPs by running each model under PyTorch's FLOP counter "
                        "(about 8 s of CPU here the first time, then cached) (default: off)")
    p.set_defaults(func=run)


def code_fingerprint() -> str:
    """Hash of the code the table depends on; any edit to it makes a new cache file."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.glob("*.py")) + [root.parent / "flops.py"]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    try:
        h.update(version("torch").encode())
    except PackageNotFoundError:  # pragma: no cover - torch is a dependency
        pass
    return h.hexdigest()[:16]


def cache_file() -> Path:
    base = os.environ.get("VITLAB_CACHE_DIR") or "~/.cache/vitlab"
    return Path(base).expanduser() / f"models-{code_fingerprint()}.json"


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, rows: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(rows, indent=0))
        tmp.replace(path)  # atomic: a concurrent `vitlab models` reads the old file or the new one
    except OSError:  # a read-only home only costs the next run its speed
        pass


def compute_rows(flops: bool, known: dict | None = None) -> dict:
    """name -> {family, aliases, img, params, flops}; reuses `known` rows (a cache) where complete."""
    import torch

    from ..flops import count_flops, count_params
    from .registry import create_model, get_spec, list_models

    known = known or {}
    rows = {}
    for name in list_models():
        row = dict(known.get(name) or {})
        if "params" not in row or (flops and row.get("flops") is None):
            spec = get_spec(name)
            with torch.device("meta"):  # shapes only: no memory, no init, counts in milliseconds
                model = create_model(name)
            row.update(family=spec.family, aliases=list(spec.aliases), img=spec.default_img_size,
                       params=count_params(model))
            if flops:
                row["flops"] = count_flops(model)
            del model
        rows[name] = row
    return rows


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    path = cache_file()
    rows = _read_cache(path)
    if not rows or any("params" not in r or (args.flops and r.get("flops") is None) for r in rows.values()):
        rows = compute_rows(args.flops, rows)
        _write_cache(path, rows)
    families = sorted({r["family"] for r in rows.values()})
    if args.family and args.family not in families:
        from ..errors import ConfigError

        raise ConfigError(f"no family {args.family!r}; choose one of: {', '.join(families)}")
    title = "vitlab models (1000 classes" + ("; GFLOPs = 2 x multiply-adds of one forward pass)" if args.flops
                                            else "; add --flops for forward GFLOPs)")
    table = Table(title=title)
    cols = ("name", "family", "aliases", "img", "params (M)") + (("GFLOPs",) if args.flops else ())
    for col in cols:
        table.add_column(col, justify="right" if col in ("img", "params (M)", "GFLOPs") else "left")
    for name in sorted(rows):
        r = rows[name]
        if args.family and r["family"] != args.family:
            continue
        cells = [name, r["family"], ", ".join(r["aliases"]), str(r["img"]), f"{r['params'] / 1e6:.1f}"]
        if args.flops:
            cells.append(f"{r['flops'] / 1e9:.2f}")
        table.add_row(*cells)
    Console().print(table)
    return 0
