"""Any folder of class sub-folders of images (``root/<class>/<image>``), decoded once into memory.

If ``root`` has ``train/`` and ``val/`` and/or ``test/`` sub-folders, each is such a folder and
they are the splits, named as on disk; otherwise the caller holds out a seeded stratified
``val_fraction``. Every image is decoded with PIL, converted to RGB (or grey with ``in_chans=1``)
and brought to one fixed size (``image_size``: the training size; by default the most common size
in the folder) without distorting it: the shorter side is resized, then the centre is cropped
(``fit='center_crop'``, the default; ``fit='squash'`` resizes both sides and is opt-in). Small sets
become a single uint8 tensor the training loop indexes and augments in batches; sets whose decoded
size exceeds a budget are decoded on the fly instead (:mod:`vitlab.data.lazy`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
CACHE_VERSION = 3  # 2: 16-bit, transparent and EXIF-rotated images decoded as shown (see to_mode); 3: records the shapes of the originals
MAX_LISTED_WARNINGS = 20


def _visible(entries):
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def scan(root: Path) -> tuple[list[str], list[tuple[str, int, int, int]]]:
    """(class_names, [(path, label, size, mtime_ns)]) of one class-folder tree. Hidden files
    (.DS_Store, ...) and files without an image extension are ignored."""
    classes, files = [], []
    with os.scandir(root) as it:
        class_dirs = [e for e in _visible(it) if e.is_dir()]
    if not class_dirs:
        raise DataError(f"{root} has no class sub-folders: put the images in {root}/<class name>/<image>.jpg "
                        f"(one sub-folder per class)")
    for e in class_dirs:
        with os.scandir(e.path) as it:
            imgs = [f for f in _visible(it) if f.is_file() and Path(f.name).suffix.lower() in IMAGE_EXTENSIONS]
        if not imgs:
            raise DataError(f"class folder {e.path} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
                            f"add images or remove the folder")
        label = len(classes)
        classes.append(e.name)
        for f in imgs:
            st = f.stat()
            files.append((f.path, label, st.st_size, st.st_mtime_ns))
    return classes, files


_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees (width and height swap)


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a damaged EXIF block: show the pixels as stored
        return 1


# how images are resized (PIL's filters; the published weights name theirs: timm's `interpolation`,
# Hugging Face's `resample`)
RESAMPLE = ("bilinear", "bicubic", "nearest")


def check_resample(resample: str) -> None:
    if resample not in RESAMPLE:
        raise ConfigError(f"interpolation must be one of {', '.join(RESAMPLE)}, got {resample!r}")


def check_fit(fit: str) -> None:
    if fit not in ("squash", "center_crop"):
        raise ConfigError(f"fit must be 'center_crop' (shorter side resized, centre cut out: aspect kept) or "
                          f"'squash' (both sides resized: aspect not kept), got {fit!r}")


def _header_size(path: str):
    from PIL import Image
    try:
        with Image.open(path) as im:
            w, h = im.size  # PIL reads only the header here
            # the size the image is shown at: a photo taken upright is stored sideways + an EXIF tag
            return (h, w) if _orientation(im) in _SWAPS_SIDES else (w, h)
    except Exception as e:  # any failure to identify the file makes it a bad image
        return e


def to_mode(im, mode: str):
    """`im` (any mode PIL opens) as an 8-bit 'RGB' or 'L' image with the values it shows:

    - EXIF orientation applied (phone photos are stored sideways with a rotation tag);
    - 16-bit grey ('I;16*', and 'I' as PIL opens 16-bit PNG/PGM/TIFF) scaled 0..65535 -> 0..255
      (PIL's own convert clips every value above 255, which made such images solid white);
      16-bit RGB PNGs PIL already reduces to 8 bits correctly;
    - transparency (RGBA, LA, PA, palette with a transparent colour) composited onto white,
      as a viewer shows it, instead of exposing whatever colour the transparent pixels hold;
    - CMYK, YCbCr, LAB, palette and 1-bit images through PIL's conversions.
    """
    from PIL import Image, ImageOps

    if _orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.float64)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)  # 65535 / 257 = 255 exactly
        im = Image.fromarray(arr, mode="L")
    elif im.mode == "F":  # float images: PIL clips to 0..255, as for 8-bit values
        im = im.convert("L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == mode else im.convert(mode)


def decode_image(path, size_hw: tuple[int, int], mode: str, fit: str = "center_crop", with_size: bool = False,
                 resample: str = "bilinear"):
    """uint8 (H, W, C) array of one image (a path or a binary file object), or the exception that
    made it unreadable. ``fit='center_crop'``: the shorter side is resized to the target's and the
    centre cut out, so nothing is squashed. ``with_size``: also return the original (W, H).
    ``resample``: the resizing filter (bilinear, bicubic or nearest)."""
    from PIL import Image, ImageOps
    h, w = size_hw
    method = Image.Resampling[resample.upper()]
    orig = None
    try:
        with Image.open(path) as im:
            orig = im.size
            # JPEG draft mode decodes at 1/2, 1/4, 1/8 scale when the target is that much smaller:
            # far less work for large photos, same result after the final resize.
            turned = _orientation(im) in _SWAPS_SIDES
            im.draft("RGB" if mode == "RGB" else "L", (h, w) if turned else (w, h))
            im = to_mode(im, mode)
            if im.size != (w, h):
                if fit == "center_crop":
                    im = ImageOps.fit(im, (w, h), method=method)
                else:
                    im = im.resize((w, h), method)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # truncated data, bad markers, unsupported variants...: a bad image
        return (e, orig) if with_size else e
    arr = arr if arr.ndim == 3 else arr[:, :, None]
    return (arr, orig) if with_size else arr


_decode = decode_image


def _workers() -> int:
    # PIL releases the GIL while decoding and resizing, so threads scale with cores; a few
    # more threads than cores hide the file reads.
    return max(2, min(16, 2 * (os.cpu_count() or 1)))


def _cache_dir(root: Path) -> Path | None:
    """$VITLAB_CACHE_DIR, else ~/.cache/vitlab, else <root>/.vitlab_cache: the first writable."""
    options = []
    if os.environ.get("VITLAB_CACHE_DIR"):
        options.append(Path(os.environ["VITLAB_CACHE_DIR"]).expanduser())
    options += [Path.home() / ".cache" / "vitlab", root / ".vitlab_cache"]
    for d in options:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK):
            return d
    return None


def _cache_key(root: Path, files, size_hw, mode, fit, resample="bilinear") -> str:
    # Keyed by every file's path, size and modification time (plus the decode settings), so any
    # added, removed, replaced or touched image invalidates the cache.
    h = hashlib.sha256()
    # (the default filter keeps the key it had before the filter was an option: old caches stay valid)
    settings = [CACHE_VERSION, str(root.resolve()), size_hw, mode, fit] + ([resample] if resample != "bilinear" else [])
    h.update(json.dumps(settings).encode())
    for path, label, size, mtime in files:
        h.update(f"{path}\0{label}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:32]


def parse_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size_hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size_hw) != 2 or min(size_hw) < 1:
        raise ConfigError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return (int(size_hw[0]), int(size_hw[1]))


def most_common_size(root: Path, paths: list[str], bad: dict) -> tuple[int, int]:
    """(H, W) most frequent among the images' headers (read only, cheap); unreadable ones go to ``bad``."""
    with ThreadPoolExecutor(_workers()) as pool:
        sizes = list(pool.map(_header_size, paths))
    for p, s in zip(paths, sizes):
        if isinstance(s, Exception):
            bad[p] = f"{type(s).__name__}: {s}"
    counts = Counter(s for s in sizes if not isinstance(s, Exception))
    if not counts:
        raise DataError(f"no readable image in {root}: every file failed to open (first: {next(iter(bad))})")
    w, h = counts.most_common(1)[0][0]
    return (h, w)


def decode_tree(root: Path, image_size=None, in_chans: int = 3, fit: str = "center_crop", cache: bool = True,
                report=None, resample: str = "bilinear"):
    """Decode one class-folder tree. Returns (images uint8 (N,C,H,W), labels, class_names,
    bad: list[(path, reason)], from_cache: bool).

    Decoding thousands of JPEGs costs seconds each run; the decoded array is cached as an
    uncompressed .npz (loads at disk speed) keyed by the files' sizes and mtimes, so a second
    load of an unchanged folder is close to instant. ``report(text)`` hears about the progress.
    """
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans must be 1 (grey) or 3 (RGB) for imagefolder, got {in_chans}")
    check_fit(fit)
    check_resample(resample)
    mode = "RGB" if in_chans == 3 else "L"
    classes, files = scan(root)
    bad: dict[str, str] = {}
    paths = [f[0] for f in files]
    size_hw = parse_size(image_size)

    key = _cache_key(root, files, size_hw or "most-common", mode, fit, resample)
    cdir = _cache_dir(root) if cache else None
    cfile = cdir / f"imagefolder-{key}.npz" if cdir else None
    if cfile is not None and cfile.is_file():
        try:
            with np.load(cfile, allow_pickle=False) as z:
                images = torch.from_numpy(z["images"])
                labels = torch.from_numpy(z["labels"])
                bad_list = [tuple(x) for x in json.loads(str(z["bad"]))]
                shapes = json.loads(str(z["shapes"])) if "shapes" in z else {}
            return images, labels, classes, bad_list, True, shapes

        except Exception:  # an unreadable cache (interrupted write, old format) is rebuilt
            pass

    if size_hw is None:
        # The most common size: read the headers only (cheap), the full decode comes once.
        size_hw = most_common_size(root, paths, bad)

    h, w = size_hw
    out = np.empty((len(files), h, w, in_chans), dtype=np.uint8)
    ok = np.zeros(len(files), dtype=bool)
    orig = [None] * len(files)
    done = [0]
    t0 = time.monotonic()
    last = [t0]

    def work(i):
        p = paths[i]
        if p in bad:
            return
        r, orig[i] = _decode(p, size_hw, mode, fit, with_size=True, resample=resample)
        if isinstance(r, Exception):
            bad[p] = f"{type(r).__name__}: {r}"
        else:
            out[i] = r
            ok[i] = True
        done[0] += 1
        now = time.monotonic()
        if report is not None and now - last[0] >= 10:  # the decoding phase, as it happens
            last[0] = now
            report(f"  decoding {root}: {done[0]:,}/{len(files):,} images ({done[0] / (now - t0):,.0f}/s)")

    if report is not None:
        report(f"decoding {len(files):,} images of {root} to {h}x{w} ...")
    with ThreadPoolExecutor(_workers()) as pool:
        list(pool.map(work, range(len(files))))
    shapes = shape_counts([o for o, k in zip(orig, ok) if k], size_hw)
    images = torch.from_numpy(out[ok]).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([f[1] for f in files], dtype=torch.int64)[torch.from_numpy(ok)]
    bad_list = sorted(bad.items())

    if cfile is not None:
        # Written to a temporary file and renamed, so an interrupted run never leaves a half cache.
        try:
            fd, tmp = tempfile.mkstemp(dir=cdir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=images.numpy(), labels=labels.numpy(), bad=np.array(json.dumps(bad_list)),
                         shapes=np.array(json.dumps(shapes)))
            os.replace(tmp, cfile)
        except OSError:
            try:
                os.unlink(tmp)
            except (OSError, UnboundLocalError):
                pass
    return images, labels, classes, bad_list, False, shapes


def shape_counts(sizes, size_hw) -> dict:
    """How many images kept their shape, were portrait or landscape relative to the target: what
    the user is told was done to them."""
    h, w = size_hw
    out = {"same": 0, "resized": 0, "portrait": 0, "landscape": 0}
    target = w / h
    for s in sizes:
        if s is None:
            continue
        iw, ih = s
        if (iw, ih) == (w, h):
            out["same"] += 1
            continue
        out["resized"] += 1
        a = iw / ih
        if a < target * 0.99:
            out["portrait"] += 1
        elif a > target * 1.01:
            out["landscape"] += 1
    return out


def describe_fit(shapes: dict, size_hw, fit: str) -> str:
    """One line on what was done to the images (the user should never have to guess)."""
    h, w = size_hw
    if not shapes or not shapes.get("resized"):
        return f"images kept at {h}x{w}"
    other = []
    if shapes.get("portrait"):
        other.append(f"{shapes['portrait']:,} portrait")
    if shapes.get("landscape"):
        other.append(f"{shapes['landscape']:,} landscape")
    if fit == "squash":
        how = f"resized to {h}x{w} (both sides: aspect NOT kept, fit=squash)"
    else:
        how = f"resized (shorter side {min(h, w)}) and centre-cropped to {h}x{w} (aspect kept)"
    return f"{shapes['resized']:,} images {how}" + (f"; {', '.join(other)} (relative to {h}x{w})" if other else "")


def report_bad(bad: list[tuple[str, str]], on_bad_image: str) -> None:
    """Apply the user's policy to unreadable images: DataError on the first, or one warning per
    file (up to 20, then a count) and a total."""
    if not bad:
        return
    if on_bad_image == "error":
        path, why = bad[0]
        more = f" ({len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise DataError(f"cannot decode image {path} ({why}){more}: remove or replace the file, or pass "
                        f"on_bad_image='skip' (data.on_bad_image=skip) to skip unreadable images")
    for path, why in bad[:MAX_LISTED_WARNINGS]:
        warnings.warn(f"skipped unreadable image {path} ({why})", stacklevel=3)
    extra = len(bad) - MAX_LISTED_WARNINGS
    warnings.warn(f"skipped {len(bad)} unreadable image file(s)" + (f" ({extra} not listed)" if extra > 0 else ""),
                  stacklevel=3)


def find_split_dirs(root: Path) -> dict[str, Path] | None:
    """{'train': ..., 'val': ..., 'test': ...} of the split folders present on disk (train and at
    least one of val/test), or None for a plain class-folder tree."""
    train = root / "train"
    found = {name: root / name for name in ("val", "test") if (root / name).is_dir()}
    if not train.is_dir() or not found:
        return None
    return {"train": train, **found}
