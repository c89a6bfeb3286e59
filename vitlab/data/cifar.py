"""CIFAR-10 and CIFAR-100 from the official "python version" pickles
(https://www.cs.toronto.edu/~kriz/cifar.html), as an extracted folder or the .tar.gz itself.

CIFAR-10: ``cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch``, ``batches.meta``.
CIFAR-100: ``cifar-100-python/`` with ``train``, ``test``, ``meta``. Each data file is a pickled
dict (written by Python 2, so keys are bytes): ``b'data'`` a uint8 (N, 3072) array, one row per
image as 1024 red, 1024 green, 1024 blue values of a 32x32 image in row-major order, and
``b'labels'`` (CIFAR-10) or ``b'fine_labels'``/``b'coarse_labels'`` (CIFAR-100).
"""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .core import bytes_digest, candidate_dirs, format_dirs

# MD5s: the archives' as published on the CIFAR page, the members' as published with torchvision.
SPECS = {
    "cifar10": dict(
        title="CIFAR-10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        train=[("data_batch_1", "c99cafc152244af753f735de768cd75f"),
               ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
               ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
               ("data_batch_4", "634d18415352ddfa80567beed471001a"),
               ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")],
        test=[("test_batch", "40351d587109b95175f43aff81a1287e")],
        meta=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        counts=(50000, 10000), num_classes=10,
    ),
    "cifar100": dict(
        title="CIFAR-100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=[("train", "16019d7e3df5f24257cddd939b257f8d")],
        test=[("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")],
        meta=("meta", "7973b15100ade9c7d40fb424638fde48"),
        counts=(50000, 10000), num_classes=100,
    ),
}

# Only what a pickled numpy array needs: loading a pickle can otherwise run arbitrary code.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core"):  # numpy >= 2 moved numpy.core to numpy._core
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise DataError(f"{where} is not a readable CIFAR python pickle ({type(e).__name__}: {e}); "
                        f"download the archive again and extract it") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} holds a {type(obj).__name__}, not the dict of a CIFAR batch: corrupt file")
    return obj


class _Source:
    """Reads members from the extracted folder or straight from the .tar.gz (no extraction)."""

    def __init__(self, spec, folder: Path | None = None, archive: Path | None = None):
        self.spec, self.folder, self.archive = spec, folder, archive
        self._tar = tarfile.open(archive, "r:gz") if archive else None

    def describe(self, member: str) -> str:
        if self.folder is not None:
            return str(self.folder / member)
        return f"{self.archive}:{self.spec['folder']}/{member}"

    def read(self, member: str) -> bytes:
        if self.folder is not None:
            path = self.folder / member
            if not path.is_file():
                raise DataError(f"{path} is missing: the {self.spec['title']} folder is incomplete; "
                                f"extract {self.spec['archive']} again")
            return path.read_bytes()
        try:
            f = self._tar.extractfile(f"{self.spec['folder']}/{member}")
        except KeyError:
            f = None
        if f is None:
            raise DataError(f"{self.archive} has no {self.spec['folder']}/{member}: not the official archive; "
                            f"download it again")
        return f.read()


def find_cifar(name: str, data_dir=None) -> tuple[Path | None, Path | None]:
    """(extracted folder, None) or (None, archive) where the loader would read `name` from,
    without reading any file (a study checks this before its first run); DataError naming
    where to put the files when neither is found."""
    spec = SPECS[name]
    dirs = candidate_dirs(name, data_dir)
    first_member = (spec["train"][0][0])
    for d in dirs:
        if (d / spec["folder"]).is_dir():
            return d / spec["folder"], None
        if (d / first_member).is_file() and (d / spec["meta"][0]).is_file():
            return d, None
        if (d / spec["archive"]).is_file():
            return None, d / spec["archive"]
    url = f"https://www.cs.toronto.edu/~kriz/{spec['archive']}"
    raise DataError(f"{spec['title']} not found (looked in {format_dirs(dirs)}). Download {url} and put the "
                    f"archive, or the {spec['folder']}/ folder extracted from it, in a folder passed with "
                    f"--data-dir DIR (or in $VITLAB_DATA/{name}/)")


def _locate(name: str, data_dir) -> _Source:
    folder, archive = find_cifar(name, data_dir)
    return _Source(SPECS[name], folder=folder, archive=archive)


def _batch(d: dict, where: str, label_key: bytes, num_classes: int):
    if b"data" not in d or label_key not in d:
        raise DataError(f"{where} lacks the {b'data'!r} / {label_key!r} entries of a CIFAR batch: corrupt file")
    x = np.asarray(d[b"data"])
    y = np.asarray(d[label_key])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(f"{where}: data is {x.dtype} {x.shape}; a CIFAR batch holds uint8 (N, 3072) rows "
                        f"(3 x 32 x 32): corrupt file")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"wrong count: {where} has {x.shape[0]} images but {y.shape[0] if y.ndim else 0} labels")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{where} has labels outside 0..{num_classes - 1}: corrupt file")
    return x, y.astype(np.int64)


def load_cifar(name: str, data_dir=None, verify: bool = True, label_mode: str = "fine"):
    """(train_x, train_y, val_x, val_y, class_names, meta); val is the official test set."""
    spec = SPECS[name]
    if name == "cifar100" and label_mode not in ("fine", "coarse"):
        raise ConfigError(f"label_mode must be 'fine' (100 classes) or 'coarse' (20 superclasses), got {label_mode!r}")
    src = _locate(name, data_dir)
    checks = []
    if verify and src.archive is not None:
        from .core import file_digest
        if file_digest(src.archive, "md5") != spec["archive_md5"]:
            raise DataError(f"{src.archive} fails its checksum (MD5 differs from the published "
                            f"{spec['archive_md5']}): corrupt or not the original; download it again "
                            f"(or pass verify=False to load a deliberately modified copy)")
        checks.append(f"{src.archive.name}: MD5 matches the published checksum")

    def read(member, md5):
        raw = src.read(member)
        if verify:
            if bytes_digest(raw, "md5") != md5:
                raise DataError(f"{src.describe(member)} fails its checksum (MD5 differs from the published {md5}): "
                                f"corrupt or not the original file; download the archive again (or pass "
                                f"verify=False to load a deliberately modified copy)")
            checks.append(f"{member}: MD5 matches the published checksum")
        return _unpickle(raw, src.describe(member))

    if name == "cifar10":
        label_key, n_cls, names_key = b"labels", 10, b"label_names"
    else:
        fine = label_mode == "fine"
        label_key = b"fine_labels" if fine else b"coarse_labels"
        n_cls = 100 if fine else 20
        names_key = b"fine_label_names" if fine else b"coarse_label_names"

    meta_d = read(*spec["meta"])
    names = meta_d.get(names_key)
    if not isinstance(names, (list, tuple)) or len(names) != n_cls:
        raise DataError(f"{src.describe(spec['meta'][0])} lacks {n_cls} {names_key.decode()}: corrupt file")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    splits = []
    for part, standard in zip(("train", "test"), spec["counts"]):
        xs, ys = [], []
        for member, md5 in spec[part]:
            x, y = _batch(read(member, md5), src.describe(member), label_key, n_cls)
            xs.append(x)
            ys.append(y)
        x, y = np.concatenate(xs), np.concatenate(ys)
        if verify and x.shape[0] != standard:
            raise DataError(f"wrong count: the {spec['title']} {part} files hold {x.shape[0]} images, the "
                            f"official set has {standard}; use the original files (or verify=False)")
        splits += [torch.from_numpy(x.reshape(-1, 3, 32, 32)), torch.from_numpy(y)]
    meta = {"source": str(src.folder or src.archive), "checksums": checks, "verified": verify}
    return (*splits, class_names, meta)
