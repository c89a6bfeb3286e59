"""MNIST and Fashion-MNIST from their original IDX files (gzipped or not).

IDX layout (LeCun et al.): a big-endian 32-bit magic number whose third byte is the element
type (0x08 = unsigned byte) and fourth byte the number of dimensions, then one big-endian 32-bit
size per dimension, then the data. Image files have magic 2051 (0x00000803: uint8, 3 dims
N x 28 x 28) and label files 2049 (0x00000801: uint8, 1 dim N).
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .core import bytes_digest, candidate_dirs, format_dirs

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}

# Reference checksums. A file passes when its .gz bytes match one of the published digests of the
# .gz, or when its uncompressed bytes match the content SHA-256 (a re-gzipped copy, such as the
# ones in ../shared/data/mnist or Debian's package, has other .gz bytes but the same content).
_REF = "the reference copy's SHA256SUMS"
_LECUN = "the original file's published MD5"
_ZALANDO = "the MD5 published by zalandoresearch/fashion-mnist"
_DEBIAN = "Debian's dataset-fashion-mnist package"
KNOWN = {
    "mnist": {
        "train-images-idx3-ubyte": {
            # SHA-256 of the reference copy (../shared/data/mnist.SHA256SUMS); MD5 of the original
            # yann.lecun.com file, as published with torchvision's MNIST loader.
            "gz": [("sha256", "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971", _REF),
                   ("md5", "f68b3c2dcbeaaa9fbdd348bbdeb94873", _LECUN)],
            "raw_sha256": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        },
        "train-labels-idx1-ubyte": {
            "gz": [("sha256", "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203", _REF),
                   ("md5", "d53e105ee54ea40749a09fcbcd1e9432", _LECUN)],
            "raw_sha256": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        },
        "t10k-images-idx3-ubyte": {
            "gz": [("sha256", "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be", _REF),
                   ("md5", "9fb629c4189551a2d022fa330f9573f3", _LECUN)],
            "raw_sha256": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        },
        "t10k-labels-idx1-ubyte": {
            "gz": [("sha256", "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b", _REF),
                   ("md5", "ec29112dd5afa0611ce80d1b7f02629c", _LECUN)],
            "raw_sha256": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    },
    "fashion-mnist": {
        # "md5": published in github.com/zalandoresearch/fashion-mnist's README. Debian's
        # dataset-fashion-mnist (0.0~git20200523.55506a9-1) re-gzips the same files: its .gz
        # SHA-256 and the uncompressed content SHA-256 are the other two values.
        "train-images-idx3-ubyte": {
            "gz": [("md5", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", _ZALANDO),
                   ("md5", "cf8536b0aa1a6ac5fa3f23001093305c", _DEBIAN)],
            "raw_sha256": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        },
        "train-labels-idx1-ubyte": {
            "gz": [("md5", "25c81989df183df01b3e8a0aad5dffbe", _ZALANDO),
                   ("md5", "10bea18fdb374794d4bb42e356e600c9", _DEBIAN)],
            "raw_sha256": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        },
        "t10k-images-idx3-ubyte": {
            "gz": [("md5", "bef4ecab320f06d8554ea6380940ec79", _ZALANDO),
                   ("md5", "f78720b4224f21cce2f2ccf2d7a94c9a", _DEBIAN)],
            "raw_sha256": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        },
        "t10k-labels-idx1-ubyte": {
            "gz": [("md5", "bb300cfdad3c16e7a12a480ee83cd310", _ZALANDO),
                   ("md5", "0d30e22e447f3c33dab9ed536400ac01", _DEBIAN)],
            "raw_sha256": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
    },
}

SPECS = {
    "mnist": dict(
        title="MNIST",
        defaults=["/usr/share/datasets/mnist"],
        class_names=[str(i) for i in range(10)],
        counts=(60000, 10000),
        get=("download the four files from http://yann.lecun.com/exdb/mnist/ "
             "(or a mirror such as https://ossci-datasets.s3.amazonaws.com/mnist/)"),
    ),
    "fashion-mnist": dict(
        title="Fashion-MNIST",
        defaults=["/usr/share/datasets/fashion-mnist"],
        class_names=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
        counts=(60000, 10000),
        get=("install them with `sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu: "
             "/usr/share/datasets/fashion-mnist/) or download them from "
             "https://github.com/zalandoresearch/fashion-mnist (data/fashion/)"),
    ),
}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; check the file's permissions") from None
    if path.suffix == ".gz":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path} is not a valid gzip file ({e}): the download is corrupt or "
                            f"truncated; download it again") from None
    return raw


def parse_idx(data: bytes, path: Path | str, expect_magic: int | None = None) -> np.ndarray:
    """Parse IDX bytes into a uint8 array, checking magic number, header and exact data length."""
    if len(data) < 4:
        raise DataError(f"{path} is truncated: {len(data)} bytes, too short for an IDX header; download it again")
    (magic,) = struct.unpack(">I", data[:4])
    if expect_magic is not None and magic != expect_magic:
        kind = "images" if expect_magic == IMAGES_MAGIC else "labels"
        raise DataError(f"{path} has bad magic number {magic} (0x{magic:08x}); IDX {kind} files start with "
                        f"{expect_magic} (0x{expect_magic:08x}): the file is corrupt or not an IDX {kind} file")
    if magic >> 16 != 0 or (magic >> 8) & 0xFF != 0x08:
        raise DataError(f"{path} has bad magic number {magic} (0x{magic:08x}): not an IDX file of unsigned bytes")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path} is truncated: its IDX header (ndim={ndim}) is incomplete; download it again")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    have = len(data) - header
    if have < expected:
        raise DataError(f"{path} is truncated: its header says {' x '.join(map(str, dims))} = {expected} bytes "
                        f"of data but only {have} follow; download the file again")
    if have > expected:
        raise DataError(f"{path} has {have - expected} bytes after the {' x '.join(map(str, dims))} values its "
                        f"header announces: wrong count in the header or a corrupt file; download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: Path | str, expect_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (``.gz`` or not) as a uint8 array."""
    path = Path(path)
    return parse_idx(_read_bytes(path), path, expect_magic)


def _find_file(folder: Path, stem: str) -> Path | None:
    # The original names, gzipped or not, and the dotted form some unpackers produce
    # (train-images.idx3-ubyte).
    dotted = stem.replace("-idx", ".idx")
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        p = folder / name
        if p.is_file():
            return p
    return None


def locate(name: str, data_dir=None) -> dict[str, Path]:
    spec = SPECS[name]
    dirs = candidate_dirs(name, data_dir, spec["defaults"], how_to_get=spec["get"])
    partial = []
    for d in dirs:
        if not d.is_dir():
            continue
        found = {k: _find_file(d, s) for k, s in STEMS.items()}
        if all(found.values()):
            return found
        if any(found.values()):
            partial.append((d, [STEMS[k] + ".gz" for k, v in found.items() if v is None]))
    need = ", ".join(s + ".gz" for s in STEMS.values())
    msg = f"{spec['title']} files not found (looked in {format_dirs(dirs)})."
    for d, missing in partial:
        msg += f" {d} lacks {', '.join(missing)}."
    msg += (f" Put {need} (gzipped or not) in one folder and pass it with --data-dir DIR "
            f"(or set VITLAB_DATA to a folder with a {name}/ sub-folder); to get them, {spec['get']}")
    raise DataError(msg)


def _verify(name: str, path: Path, stem: str, content: bytes) -> str:
    ref = KNOWN[name][stem]
    if path.suffix == ".gz":
        file_bytes = path.read_bytes()
        for algo, hexd, source in ref["gz"]:
            if bytes_digest(file_bytes, algo) == hexd:
                return f"{path.name}: {algo.upper()} matches {source}"
    if bytes_digest(content, "sha256") == ref["raw_sha256"]:
        return f"{path.name}: SHA-256 of the uncompressed content matches the original's"
    raise DataError(f"{path} fails its checksum: neither the file nor its uncompressed content matches the "
                    f"published {SPECS[name]['title']} checksums, so it is corrupt or not the original file; "
                    f"download it again (or pass verify=False to load a deliberately modified copy)")


def load_idx_dataset(name: str, data_dir=None, verify: bool = True):
    """(train_images, train_labels, val_images, val_labels, meta) of MNIST / Fashion-MNIST.

    Always checked: magic numbers, header sizes against the data length, images and labels of
    equal count, 28x28 images, labels in 0..9. With ``verify`` (default) also the standard counts
    (60,000 / 10,000) and the reference checksums.
    """
    spec = SPECS[name]
    files = locate(name, data_dir)
    arrays, checks = {}, []
    for key, path in files.items():
        content = _read_bytes(path)
        magic = IMAGES_MAGIC if key.endswith("images") else LABELS_MAGIC
        arr = parse_idx(content, path, magic)
        want_ndim = 3 if magic == IMAGES_MAGIC else 1
        if arr.ndim != want_ndim:
            raise DataError(f"{path} has {arr.ndim} dimensions {arr.shape}, expected {want_ndim}: corrupt header")
        if magic == IMAGES_MAGIC and arr.shape[1:] != (28, 28):
            raise DataError(f"{path} holds {arr.shape[1]}x{arr.shape[2]} images; {spec['title']} images are 28x28")
        arrays[key] = (arr, path, content)
    for split, standard in zip(("train", "val"), spec["counts"]):
        (x, xp, _), (y, yp, _) = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.shape[0] != y.shape[0]:
            raise DataError(f"wrong count: {xp} has {x.shape[0]} images but {yp} has {y.shape[0]} labels; "
                            f"the two files must come from the same release")
        if y.size and y.max() > 9:
            raise DataError(f"{yp} has label {int(y.max())}; {spec['title']} labels are 0..9: the file is corrupt")
        if verify and x.shape[0] != standard:
            raise DataError(f"wrong count: {xp} has {x.shape[0]} images; the standard {spec['title']} "
                            f"{'training' if split == 'train' else 'test'} set has {standard}. Use the original "
                            f"files, or pass verify=False to load a modified copy")
    if verify:
        for key, (arr, path, content) in arrays.items():
            checks.append(_verify(name, path, STEMS[key], content))
    out = []
    for split in ("train", "val"):
        x = torch.from_numpy(arrays[f"{split}_images"][0].copy()).unsqueeze(1)
        y = torch.from_numpy(arrays[f"{split}_labels"][0].astype(np.int64))
        out += [x, y]
    meta = {"files": {k: str(v) for k, v in files.items()}, "checksums": checks, "verified": verify}
    return (*out, meta)
