"""WebDataset tar shards: write them from an image folder, train from them at any scale.

Writing (``vitlab data shard FOLDER OUT/ --shard-size 256MB``): every split of the folder
(``train/``, ``val/``, ``test/``, or a seeded held-out ``val`` of a plain class-folder tree) goes
to ``OUT/<split>-000000.tar, ...`` in a seeded random order (shards are read sequentially, so a
class-sorted order would give one-class batches), one sample per image: ``<key>.<ext>`` (the
original encoded bytes, or a JPEG re-encoded with its shorter side at ``max_side``) and
``<key>.cls`` (the class index); keys are ``<split><number>`` in the written order.
``OUT/index.json`` records the classes, the per-split and
per-shard counts, each shard's size and sha256, and channel statistics of a sample of the
training images.

Reading (``dataset=shards``, ``data_dir='OUT/train-{000000..000099}.tar'``):

- each rank reads its own shards (webdataset's ``split_by_node``: shards ``rank::world_size``),
  and each DataLoader worker its own part of those (``split_by_worker``); so there must be at
  least as many shards as ranks, and ideally ``ranks x workers`` or more;
- every epoch each rank visits its shards in a seeded order and mixes samples through a shuffle
  buffer (``shuffle_buffer`` samples, default 2000) seeded per (seed, epoch, rank, worker);
- every sample is decoded at the training size as image folders are (shorter side resized,
  centre cut out: aspect kept); the augmentation then runs on the batch;
- one epoch is ``ceil(n / batch_size)`` steps in one process (``floor`` with ``drop_last``); with
  several ranks, ``min over ranks of (the rank's samples // its batch share)``, so each rank may
  leave up to one local batch, plus what its shards hold beyond the smallest rank's, unused that
  epoch (shards of equal size keep this small); in one process the last, partial batch is split
  into ``accum_steps`` near-equal micro-batches, each weighted 1/accum_steps (exact without
  accumulation);
- a corrupt sample is reported by shard name and key; ``on_bad_image=skip`` goes on without it
  (the rest of the shard is still read), ``on_bad_image=error`` stops the run.

Resume position (saved in every checkpoint): the epoch, and for every rank and worker the number of
samples of its (deterministic) shuffled stream that were used in completed steps. A resumed run
skips exactly those, before decoding, and continues with the samples not yet seen in that epoch:
none is repeated and none lost. It is not bit-identical to an uninterrupted run: after the resume
the workers' streams interleave from worker 0 again, so the batches mix differently (the
augmentation and dropout streams are restored as for other data sets). The worker count of the
saved run is kept on resume; with another world size the epoch restarts from its beginning.

The validation (or test) shards are decoded once into memory at the training size.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import random
import re
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .stream import ThroughputProbe, _mp_context, _timed, auto_workers

INDEX = "index.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")


def parse_bytes(text) -> int:
    """'256MB', '1.5GB', '800k', 1000000 -> bytes (decimal units, as file managers show)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"--shard-size {text!r} is not a size; use e.g. 256MB, 1GB or 500000000")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)])


# ------------------------------------------------------------------------------------- writing
def _encoded(path: str, max_side: int | None) -> tuple[str, bytes]:
    ext = Path(path).suffix.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    data = Path(path).read_bytes()
    if not max_side:
        return ext, data
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if min(w, h) <= max_side:
                return ext, data
            s = max_side / min(w, h)
            im.draft("RGB", (round(w * s), round(h * s)))
            im = im.convert("RGB").resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            return "jpg", buf.getvalue()
    except Exception:  # kept as it is: reported by shard name and key when it is read
        return ext, data


def write_shards(folder, out, shard_size="256MB", max_count: int = 100_000, max_side: int | None = None,
                 val_fraction: float = 0.1, split_seed: int = 0, seed: int = 0, report=print) -> dict:
    """Write the image folder ``folder`` as WebDataset shards under ``out``; returns the index."""
    import webdataset as wds

    from .core import channel_stats, stratified_split
    from .imagefolder import decode_image, find_split_dirs, scan

    say = report or (lambda text: None)
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is not a folder: pass an image folder (FOLDER/<class>/<image>.jpg or "
                        f"FOLDER/train/<class>/...)")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise DataError(f"{out} already holds .tar shards: write into an empty folder")
    maxsize = parse_bytes(shard_size)
    dirs = find_split_dirs(root)
    splits: dict[str, list[tuple[str, int]]] = {}
    if dirs is None:
        classes, files = scan(root)
        labels = np.array([f[1] for f in files])
        tr, va = stratified_split(labels, val_fraction, split_seed)
        splits = {"train": [(files[i][0], files[i][1]) for i in tr], "val": [(files[i][0], files[i][1]) for i in va]}
    else:
        classes, files = scan(dirs["train"])
        splits["train"] = [(f[0], f[1]) for f in files]
        for name in ("val", "test"):
            if name in dirs:
                vclasses, vfiles = scan(dirs[name])
                extra = sorted(set(vclasses) - set(classes))
                if extra:
                    raise DataError(f"{dirs[name]} has classes {', '.join(extra)} that {dirs['train']} lacks")
                splits[name] = [(f[0], classes.index(vclasses[f[1]])) for f in vfiles]
    index = {"format": "vitlab-webdataset", "version": 1, "source": str(root), "classes": classes,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "max_side": max_side, "splits": {}}
    t0 = time.monotonic()
    for split, items in splits.items():
        order = np.random.default_rng([seed, len(items)]).permutation(len(items))
        counts: Counter = Counter()
        pattern = str(out / f"{split}-%06d.tar")
        last = time.monotonic()
        # a fixed integer mtime: byte-identical shards from the same folder and seed (and a fractional
        # one would cost every member a 1 KB pax header)
        with wds.ShardWriter(pattern, maxsize=float("inf"), maxcount=max_count, verbose=0, mtime=0) as sink:
            cur = 0
            for k, i in enumerate(order):
                path, label = items[i]
                ext, data = _encoded(path, max_side)
                sample = {"__key__": f"{split}{k:09d}", ext: data, "cls": str(label).encode()}
                # the size on disk: every member takes a 512-byte header and is padded to 512 bytes
                # (webdataset's own limit counts the payload only)
                size = sum(512 + -(-len(v) // 512) * 512 for key, v in sample.items() if key != "__key__")
                limit = max(maxsize - 10240, maxsize // 2)  # room for the tar end record
                if sink.tarstream is not None and sink.count and cur + size > limit:
                    sink.next_stream()
                    cur = 0
                sink.write(sample)
                cur += size
                counts[Path(sink.fname).name] += 1
                if report is not None and time.monotonic() - last >= 10:
                    last = time.monotonic()
                    say(f"  {split}: {k + 1:,}/{len(items):,} images written ({(k + 1) / (last - t0):,.0f}/s)")
        shards = [{"name": name, "count": n, "bytes": (out / name).stat().st_size,
                   "sha256": _sha256(out / name)} for name, n in sorted(counts.items())]
        index["splits"][split] = {"count": len(items), "shards": shards}
        say(f"{split}: {len(items):,} images in {len(shards)} shard(s) "
            f"{out}/{split}-{{000000..{len(shards) - 1:06d}}}.tar")
    # channel statistics and the most common size from a seeded sample of the training images
    train = splits["train"]
    pick = np.random.default_rng(seed).choice(len(train), size=min(500, len(train)), replace=False)
    arrays, sizes = [], Counter()
    for i in pick:
        r, orig = decode_image(train[i][0], (64, 64), "RGB", "center_crop", with_size=True)
        if not isinstance(r, Exception):
            arrays.append(r)
            sizes[orig] += 1
    if arrays:
        mean, std = channel_stats(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
        w, h = sizes.most_common(1)[0][0]
        index.update(mean=list(mean), std=list(std), common_size=[h, w])
    (out / INDEX).write_text(json.dumps(index, indent=1))
    say(f"index: {out / INDEX} ({len(classes)} classes, {time.monotonic() - t0:.1f} s)")
    return index


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_shards(folder) -> list[str]:
    """Names of the shards in ``folder`` whose size or sha256 differs from index.json."""
    folder = Path(folder)
    index = json.loads((folder / INDEX).read_text())
    bad = []
    for split in index["splits"].values():
        for s in split["shards"]:
            p = folder / s["name"]
            if not p.is_file() or p.stat().st_size != s["bytes"] or _sha256(p) != s["sha256"]:
                bad.append(s["name"])
    return bad


# ------------------------------------------------------------------------------------- reading
def expand_pattern(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    urls = [u for part in str(pattern).split("::") for u in braceexpand(part)]
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        raise DataError(f"shard {missing[0]} does not exist ({len(missing)} of {len(urls)} missing): pass the "
                        f"train shards' brace pattern, e.g. --data-dir 'OUT/train-{{000000..000099}}.tar'")
    return urls


def _decode_sample(sample, size_hw, mode, fit, on_bad, resample="bilinear"):
    """uint8 (C, H, W) tensor and label of one sample, or None for a corrupt one under 'skip'."""
    from .imagefolder import decode_image

    where = f"sample {sample.get('__key__')!r} in shard {Path(str(sample.get('__url__', '?'))).name}"
    try:
        ext = next(k for k in IMAGE_KEYS if k in sample)
        label = int(sample["cls"])
        arr = decode_image(io.BytesIO(sample[ext]), size_hw, mode, fit, resample=resample)
        if isinstance(arr, Exception):
            raise arr
    except Exception as e:  # a corrupt image, a missing or bad label: named, then skipped or fatal
        why = "no image" if isinstance(e, StopIteration) else f"{type(e).__name__}: {e}"
        if on_bad == "error":
            raise DataError(f"corrupt {where} ({why}): rewrite the shard, or pass on_bad_image=skip") from None
        warnings.warn(f"skipped corrupt {where} ({why})", stacklevel=2)
        return None
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous(), label


class ShardSet:
    """The training shards of a run: urls, per-shard counts, the decode settings."""

    lazy = True

    def __init__(self, urls, counts, size_hw, in_chans=3, on_bad_image="skip", shuffle_buffer=2000,
                 fit="center_crop", resample="bilinear"):
        self.urls, self.counts = list(urls), list(counts)
        self.size_hw = tuple(size_hw)
        self.in_chans = in_chans
        self.mode = "RGB" if in_chans == 3 else "L"
        self.on_bad_image = on_bad_image
        self.shuffle_buffer = int(shuffle_buffer)
        self.fit = fit
        self.resample = resample

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def images(self):
        raise DataError("a WebDataset shard set is streamed, not indexed: train on it (dataset=shards); evaluate on "
                        "its val/test shards (--split val or test)")

    labels = images

    def pipeline(self, seed: int, epoch: int, skip: list[int] | None = None, with_keys: bool = False,
                 shuffle: bool = True, by_node: bool = True):
        """The webdataset pipeline of one epoch for the calling rank and worker: an IterableDataset
        of (image, label, worker, seq[, key]) where seq counts the worker's shuffled raw samples."""
        import webdataset as wds
        from webdataset.filters import _shuffle
        from webdataset.utils import pytorch_worker_info

        size_hw, mode, fit, on_bad, buf = self.size_hw, self.mode, self.fit, self.on_bad_image, self.shuffle_buffer
        resample = getattr(self, "resample", "bilinear")

        def epoch_order(src):  # this rank's shards in a seeded order per epoch (the same on every run)
            urls = list(src)
            random.Random(seed * 1_000_003 + epoch).shuffle(urls)
            yield from urls

        def tar_error(exn):
            if on_bad == "error":
                raise DataError(f"unreadable shard data ({exn}): rewrite the shard, or pass on_bad_image=skip")
            warnings.warn(f"skipped unreadable shard data ({exn})")
            return True

        def mix(src):
            rank, _, worker, _ = pytorch_worker_info()
            if not shuffle:
                yield from src
                return
            rng = random.Random(((seed * 7919 + epoch) * 1009 + rank) * 101 + worker)
            yield from _shuffle(src, bufsize=buf, initial=buf, rng=rng)

        def decode(src):
            _, _, worker, _ = pytorch_worker_info()
            start = skip[worker] if skip else 0
            for seq, sample in enumerate(src):
                if seq < start:  # resume: samples used before, skipped before decoding
                    continue
                r = _decode_sample(sample, size_hw, mode, fit, on_bad, resample)
                if r is None:
                    continue
                yield (r[0], r[1], worker, seq) + ((sample["__key__"],) if with_keys else ())

        stages = [wds.SimpleShardList(self.urls)] + ([wds.split_by_node] if by_node else [])
        stages += [epoch_order] if shuffle else []
        return wds.DataPipeline(*stages, wds.split_by_worker, wds.tarfile_to_samples(handler=tar_error), mix, decode)

    def train_stream(self, **kw) -> "ShardTrainData":
        return ShardTrainData(self, **kw)


def _collate(items):
    cols = list(zip(*items))
    out = [torch.stack(cols[0]), torch.tensor(cols[1], dtype=torch.int64), torch.tensor(cols[2]),
           torch.tensor(cols[3])]
    return out + [list(cols[4])] if len(cols) > 4 else out


class ShardTrainData:
    """The engine's view of a shard set (see the module doc for the epoch length and the resume)."""

    def __init__(self, shards: ShardSet, *, batch_size, accum_steps, world_size, rank, seed, drop_last,
                 workers=None, report=None, chunk: int = 32):
        from webdataset.utils import pytorch_worker_info

        self.s = shards
        self.B, self.A, self.W, self.rank = int(batch_size), int(accum_steps), int(world_size), int(rank)
        self.seed, self.chunk = seed, chunk
        if len(shards.urls) < self.W:
            raise ConfigError(f"{len(shards.urls)} shard(s) for {self.W} processes: every rank needs its own shards; "
                              f"write more, smaller ones (vitlab data shard ... --shard-size SMALLER)")
        if tuple(pytorch_worker_info()[:2]) != (self.rank, self.W):
            raise ConfigError(f"webdataset sees rank/world {pytorch_worker_info()[:2]} but the run has "
                              f"{(self.rank, self.W)}: unset stray RANK/WORLD_SIZE variables")
        per_rank = [sum(shards.counts[r::self.W]) for r in range(self.W)]
        self.mine = per_rank[self.rank]
        self.n_train = sum(shards.counts)
        self.local = self.B // self.W
        if self.W == 1:
            self.steps_per_epoch = self.mine // self.B if drop_last else math.ceil(self.mine / self.B)
        else:
            self.steps_per_epoch = min(per_rank) // self.local
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size={self.B} is larger than the shard set ({min(per_rank)} samples on the "
                              f"smallest rank); use a smaller batch_size")
        self.workers = max(0, min(auto_workers(workers), len(shards.urls[self.rank::self.W])))
        self.probe = ThroughputProbe(report)
        self.report = report
        self.seen: list[int] = [0] * max(1, self.workers)
        self.cur_epoch = None
        self.restored = None
        self.last_keys: list = []
        self.keep_keys = False

    def describe(self) -> str:
        return (f"data: {self.n_train:,} training samples in {len(self.s.urls)} shards ({self.mine:,} on this rank), "
                f"{self.workers} worker(s), shuffle buffer {self.s.shuffle_buffer}, "
                f"{self.steps_per_epoch} steps per epoch")

    def position(self) -> dict:
        return {"epoch": self.cur_epoch, "workers": self.workers, "seen": list(self.seen)}

    def restore(self, positions) -> None:
        if not positions or len(positions) != self.W or positions[self.rank] is None:
            if positions:
                warnings.warn("the saved shard positions are for another number of processes: the epoch restarts "
                              "from its first sample")
            return
        pos = positions[self.rank]
        self.workers = int(pos["workers"])  # the saved worker split, so the skipped samples are the used ones
        self.restored = pos

    def _loader(self, epoch, skip):
        ds = self.s.pipeline(self.seed, epoch, skip, with_keys=self.keep_keys)
        return torch.utils.data.DataLoader(ds, batch_size=self.chunk, num_workers=self.workers, collate_fn=_collate,
                                           multiprocessing_context=_mp_context() if self.workers else None,
                                           prefetch_factor=4 if self.workers else None)

    def epoch(self, epoch: int, start: int):
        skip = None
        if start > 0 and self.restored and self.restored.get("epoch") == epoch:
            skip = list(self.restored["seen"])
        elif start > 0:
            warnings.warn(f"no shard position saved for epoch {epoch}: it restarts from its first sample")
        self.restored = None
        self.cur_epoch = epoch
        self.seen = list(skip) if skip else [0] * max(1, self.workers)
        counts = []
        for s in range(start, self.steps_per_epoch):
            last = s == self.steps_per_epoch - 1 and self.W == 1
            counts.append(self.mine - s * self.B if last and self.mine - s * self.B < self.B else self.local)
        for k, item in enumerate(_timed(self._steps(epoch, skip, counts), self.probe, [c * self.W for c in counts])):
            yield start + k, item, counts[k] * self.W

    def _steps(self, epoch, skip, counts):
        it = iter(self._loader(epoch, skip))
        buf: list = []
        have = 0
        wrapped = False
        for need in counts:
            while have < need:
                try:
                    chunk = next(it)
                except StopIteration:  # corrupt samples skipped: fill up from the epoch's start again
                    if wrapped:
                        raise DataError("the shard stream ran out of readable samples: check the shards") from None
                    wrapped = True
                    it = iter(self._loader(epoch, None))
                    continue
                except DataError:
                    raise
                except Exception as e:  # a worker's DataError arrives wrapped with its traceback
                    msg = str(e).strip().splitlines()
                    text = next((ln for ln in reversed(msg) if "DataError:" in ln), None)
                    if text:
                        raise DataError(text.split("DataError:", 1)[1].strip()) from None
                    raise
                buf.append(chunk)
                have += len(chunk[1])
            x, y, w, q = (torch.cat([c[i] for c in buf]) for i in range(4))
            keys = [k for c in buf for k in c[4]] if self.keep_keys else []
            rest = [x[need:], y[need:], w[need:], q[need:]] + ([keys[need:]] if self.keep_keys else [])
            buf, have = ([rest] if len(rest[1]) else []), len(rest[1])
            x, y, w, q = x[:need], y[:need], w[:need], q[:need]
            if not wrapped:
                for wi, qi in zip(w.tolist(), q.tolist()):
                    self.seen[wi] = max(self.seen[wi], qi + 1)
            self.last_keys = keys[:need]
            yield list(zip(torch.tensor_split(x, self.A), torch.tensor_split(y, self.A)))

    def close(self) -> None:
        pass


def load_shards(data_dir, in_chans=3, on_bad_image="skip", report=None, train_fraction=1.0, image_size=None,
                shuffle_buffer=2000, val_pattern=None, interpolation="bilinear"):
    """A DataBundle whose train is a :class:`ShardSet` and whose val (or test) shards are decoded
    into memory."""
    from . import DataBundle
    from .core import ImageDataset
    from .imagefolder import check_resample, parse_size

    if data_dir is None:
        raise DataError("dataset=shards needs the train shards: --data-dir 'OUT/train-{000000..000099}.tar' "
                        "(written by `vitlab data shard FOLDER OUT/`)")
    if float(train_fraction) < 1.0:
        raise ConfigError("train_fraction < 1 is not supported for shards; write a smaller shard set instead")
    check_resample(interpolation)
    urls = expand_pattern(data_dir)
    folder = Path(urls[0]).parent
    if not (folder / INDEX).is_file():
        raise DataError(f"no {INDEX} beside {urls[0]}: write the shards with `vitlab data shard FOLDER {folder}/`")
    index = json.loads((folder / INDEX).read_text())
    known = {s["name"]: s["count"] for split in index["splits"].values() for s in split["shards"]}
    names = [Path(u).name for u in urls]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DataError(f"shard {unknown[0]} is not in {folder / INDEX}: pass shards written together with it")
    size_hw = parse_size(image_size) or tuple(index.get("common_size") or (224, 224))
    train = ShardSet(urls, [known[n] for n in names], size_hw, in_chans, on_bad_image, shuffle_buffer,
                     resample=interpolation)
    say = report or (lambda text: None)
    say(f"shards: {len(train):,} training samples in {len(urls)} shard(s) of {folder}, decoded on the fly at "
        f"{size_hw[0]}x{size_hw[1]} (shorter side resized, centre-cropped: aspect kept)")
    val_name = "val" if "val" in index["splits"] else "test" if "test" in index["splits"] else None
    if val_pattern:
        vurls = expand_pattern(val_pattern)
    elif val_name:
        vurls = [str(folder / s["name"]) for s in index["splits"][val_name]["shards"]]
    else:
        raise DataError(f"{folder / INDEX} lists no val or test shards; pass data_options.val_pattern=...")
    vset = ShardSet(vurls, [known.get(Path(u).name, 0) for u in vurls], size_hw, in_chans, on_bad_image,
                    resample=interpolation)
    xs, ys = [], []
    say(f"  decoding {len(vset):,} {val_name or 'val'} samples into memory ...")
    for item in vset.pipeline(0, 0, shuffle=False, by_node=False):  # every rank evaluates on all of it
        xs.append(item[0])
        ys.append(item[1])
    if not xs:
        raise DataError(f"no readable sample in the {val_name} shards of {folder}")
    val = ImageDataset(torch.stack(xs), torch.tensor(ys))
    classes = list(index["classes"])
    # measured on RGB when the shards were written; grey runs take the channel mean
    mean, std = tuple(index.get("mean") or [0.5] * 3), tuple(index.get("std") or [0.25] * 3)
    if in_chans == 1:
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    meta = {"root": str(folder), "shards": len(urls), "lazy": True,
            "fit": f"shorter side resized to {min(size_hw)} and centre-cropped, aspect kept"}
    return DataBundle(name="shards", train=train, val=val, num_classes=len(classes), in_chans=in_chans,
                      native_size=size_hw, class_names=classes, mean=mean, std=std, meta=meta,
                      val_name=val_name or "val")
