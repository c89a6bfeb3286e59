"""Data loaders: real MNIST and flowers5 from ../shared/data, and faithfully generated IDX, CIFAR
pickle and image-folder files, read back exactly or rejected with the promised message."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import list_datasets, load_dataset
from vitlab.data.idx import read_idx
from vitlab.errors import ConfigError, DataError

FLOWER_COUNTS = {"daisy": 764, "dandelion": 1052, "rose": 784, "sunflower": 733, "tulip": 984}  # shared/README.md


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Decoded image-folder caches go to a per-session temporary folder, not ~/.cache.
    monkeypatch.setenv("VITLAB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "vitlab-cache"))


# ----------------------------------------------------------------------------------- writers
# Independent writers of the on-disk formats (from the format descriptions, not from the loader).

def write_idx(path: Path, arr: np.ndarray, magic: int | None = None, count: int | None = None, cut: int = 0):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | arr.ndim
    dims = list(arr.shape)
    if count is not None:
        dims[0] = count
    data = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + arr.tobytes()
    if cut:
        data = data[:-cut]
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def make_idx_dir(root: Path, n_train=30, n_val=12, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_val, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_val) % 10)[::-1].astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        write_idx(root / (stem + (".gz" if gz else "")), arr)
    return arrays


# ----------------------------------------------------------------------------------- registry

def test_list_and_unknown_dataset():
    names = {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic"}
    assert names <= set(list_datasets())
    with pytest.raises(DataError, match=r"unknown dataset 'mnsit'.*Did you mean: mnist"):
        load_dataset("mnsit")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", "/nonexistent/vitlab-data")
    with pytest.raises(ConfigError, match="unknown option.*image_siz.*Did you mean: image_size"):
        load_dataset("imagefolder", ".", image_siz=32)
    with pytest.raises(ConfigError, match="on_bad_image"):
        load_dataset("digits", on_bad_image="ignore")


# ----------------------------------------------------------------------------------- digits

def test_digits_values_and_stratified_split():
    from sklearn.datasets import load_digits

    d = load_digits()
    b = load_dataset("digits", val_fraction=0.2, split_seed=3)
    assert (b.num_classes, b.in_chans, b.native_size) == (10, 1, (8, 8))
    assert len(b.train) + len(b.val) == len(d.target)
    # Every sklearn image appears, scaled 0..16 -> 0..255.
    expected = np.rint(d.images * 255.0 / 16.0).astype(np.uint8)
    got = torch.cat([b.train.images, b.val.images])[:, 0].numpy()
    key = lambda a: sorted(x.tobytes() for x in a)  # noqa: E731
    assert key(got) == key(expected)
    assert got.max() == 255
    # Stratified: round(0.2 * n_c) of each class in val.
    per_class = np.bincount(d.target, minlength=10)
    assert np.array_equal(np.bincount(b.val.labels.numpy(), minlength=10), np.rint(0.2 * per_class).astype(int))
    # Deterministic per seed, different across seeds.
    again = load_dataset("digits", val_fraction=0.2, split_seed=3)
    other = load_dataset("digits", val_fraction=0.2, split_seed=4)
    assert torch.equal(again.val.images, b.val.images)
    assert not torch.equal(other.val.images, b.val.images)
    # mean/std are those of the train images.
    x = b.train.images.double() / 255
    assert b.mean[0] == pytest.approx(x.mean().item(), abs=1e-9)
    assert b.std[0] == pytest.approx(x.std(unbiased=False).item(), abs=1e-9)


# ----------------------------------------------------------------------------------- MNIST (real)

_REAL = {}


def _real_mnist(shared: Path):
    if "b" not in _REAL:
        _REAL["b"] = load_dataset("mnist", shared / "mnist")
    return _REAL["b"]


def test_real_mnist(shared_data):
    b = _real_mnist(shared_data)
    assert (len(b.train), len(b.val)) == (60000, 10000)
    assert b.train.images.shape == (60000, 1, 28, 28) and b.train.images.dtype == torch.uint8
    assert len(b.meta["checksums"]) == 4 and b.meta["verified"]
    # Independent parse of the files: magic numbers, header sizes, pixel values.
    raw = gzip.decompress((shared_data / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert struct.unpack(">IIII", raw[:16]) == (2051, 10000, 28, 28)
    assert np.array_equal(np.frombuffer(raw, np.uint8, offset=16).reshape(10000, 28, 28), b.val.images[:, 0].numpy())
    lab = gzip.decompress((shared_data / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes())
    assert struct.unpack(">II", lab[:8]) == (2049, 60000)
    assert b.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's well-known first labels
    assert torch.bincount(b.train.labels).tolist()[:3] == [5923, 6742, 5958]  # published class counts
    assert b.mean[0] == pytest.approx(0.1307, abs=1e-4) and b.std[0] == pytest.approx(0.3081, abs=1e-4)
    # The .gz SHA-256 values checked are the ones in the reference SHA256SUMS file.
    sums = dict(line.split()[::-1] for line in (shared_data / "mnist.SHA256SUMS").read_text().splitlines())
    from vitlab.data.core import file_digest
    for name, digest in sums.items():
        assert file_digest(shared_data / "mnist" / name) == digest


def test_real_mnist_uncompressed_and_corrupted(shared_data, tmp_path):
    src = shared_data / "mnist"
    # train images uncompressed (verified through the content checksum), others linked.
    raw_images = gzip.decompress((src / "train-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw_images)
    for name in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        os.symlink(src / name, tmp_path / name)
    # One test label changed (still a valid IDX file, label in range): only the checksum can tell.
    lab = bytearray(gzip.decompress((src / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    lab[8] = (lab[8] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(lab)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz fails its checksum.*download it again"):
        load_dataset("mnist", tmp_path)
    b = load_dataset("mnist", tmp_path, verify=False)
    assert b.val.labels[0].item() == lab[8]
    assert torch.equal(b.train.images, _real_mnist(shared_data).train.images)


# ----------------------------------------------------------------------------------- IDX (generated)

@pytest.mark.parametrize("gz", [True, False])
def test_generated_idx_read_back(tmp_path, gz):
    arrays = make_idx_dir(tmp_path, gz=gz)
    b = load_dataset("mnist", tmp_path, verify=False)
    assert np.array_equal(b.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(b.val.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(b.val.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert b.val.labels.dtype == torch.int64 and b.class_names[3] == "3"
    assert read_idx(tmp_path / ("train-labels-idx1-ubyte" + (".gz" if gz else ""))).tolist() == \
        arrays["train-labels-idx1-ubyte"].tolist()
    # data_dir may also be the parent of a mnist/ folder; in_chans=3 repeats the grey channel.
    parent = tmp_path.parent / (tmp_path.name + "-parent")
    parent.mkdir()
    os.symlink(tmp_path, parent / "mnist")
    rgb = load_dataset("mnist", parent, verify=False, in_chans=3)
    assert rgb.in_chans == 3 and torch.equal(rgb.train.images[:, 2], b.train.images[:, 0])
    # With verification on, a non-standard copy is refused (count before checksum).
    with pytest.raises(DataError, match="wrong count.*has 30 images.*60000.*verify=False"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("case,match", [
    ("bad_magic", r"train-images-idx3-ubyte\.gz has bad magic number 2049"),
    ("truncated", r"t10k-images-idx3-ubyte\.gz is truncated: its header says 12 x 28 x 28 = 9408 bytes"),
    ("count_header", r"train-labels-idx1-ubyte\.gz is truncated: its header says 31 = 31 bytes"),
    ("count_mismatch",
     r"wrong count: .*t10k-images-idx3-ubyte\.gz has 12 images but .*t10k-labels-idx1-ubyte\.gz has 11"),
    ("label_range", r"train-labels-idx1-ubyte\.gz has label 12"),
    ("bad_gzip", r"train-images-idx3-ubyte\.gz is not a valid gzip file"),
    ("trailing", r"t10k-labels-idx1-ubyte\.gz has 1 bytes after"),
])
def test_corrupt_idx_rejected(tmp_path, case, match):
    arrays = make_idx_dir(tmp_path)
    p = lambda stem: tmp_path / (stem + ".gz")  # noqa: E731
    if case == "bad_magic":
        write_idx(p("train-images-idx3-ubyte"), arrays["train-images-idx3-ubyte"], magic=2049)
    elif case == "truncated":
        write_idx(p("t10k-images-idx3-ubyte"), arrays["t10k-images-idx3-ubyte"], cut=100)
    elif case == "count_header":
        write_idx(p("train-labels-idx1-ubyte"), arrays["train-labels-idx1-ubyte"], count=31)
    elif case == "count_mismatch":
        write_idx(p("t10k-labels-idx1-ubyte"), arrays["t10k-labels-idx1-ubyte"][:11])
    elif case == "label_range":
        lab = arrays["train-labels-idx1-ubyte"].copy()
        lab[5] = 12
        write_idx(p("train-labels-idx1-ubyte"), lab)
    elif case == "bad_gzip":
        data = p("train-images-idx3-ubyte").read_bytes()
        p("train-images-idx3-ubyte").write_bytes(data[: len(data) // 2])
    elif case == "trailing":
        raw = gzip.decompress(p("t10k-labels-idx1-ubyte").read_bytes()) + b"\x00"
        p("t10k-labels-idx1-ubyte").write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=match):
        load_dataset("mnist", tmp_path, verify=False)


def test_missing_idx_files_message(tmp_path, monkeypatch):
    make_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"MNIST files not found.*lacks t10k-labels-idx1-ubyte\.gz.*--data-dir"):
        load_dataset("mnist", tmp_path, verify=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"Fashion-MNIST files not found.*apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", empty)
    # Without data_dir the loader looks in $VITLAB_DATA/<name>.
    monkeypatch.setenv("VITLAB_DATA", str(tmp_path / "root"))
    make_idx_dir(tmp_path / "root" / "fashion-mnist", n_train=20, n_val=10)
    b = load_dataset("fashion-mnist", verify=False)
    assert len(b.train) == 20 and b.class_names[0] == "T-shirt/top"


def test_real_fashion_mnist_if_installed():
    root = Path("/usr/share/datasets/fashion-mnist")
    if not root.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
    b = load_dataset("fashion-mnist", root)
    assert torch.bincount(b.train.labels).tolist() == [6000] * 10  # balanced, as published
    assert torch.bincount(b.val.labels).tolist() == [1000] * 10


# ----------------------------------------------------------------------------------- CIFAR (generated)

class _Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2's cPickle wrote the official files (protocol 2): every
    string as a STRING opcode (Python 3 with encoding='bytes' reads them back as bytes), numpy
    arrays through numpy.core.multiarray._reconstruct."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        if isinstance(obj, str):  # Python 2 had no separate text type in these files
            obj = obj.encode("latin1")
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def _cifar_dump(path: Path, obj):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def make_cifar10(root: Path, per_batch=8, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _cifar_dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    batches = {}
    for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        _cifar_dump(folder / member, {b"batch_label": member.encode(), b"labels": labels, b"data": data,
                                      b"filenames": [b"x.png"] * per_batch})
        batches[member] = (data, labels)
    return folder, batches


def test_cifar10_generated_folder_and_archive(tmp_path):
    folder, batches = make_cifar10(tmp_path / "a")
    b = load_dataset("cifar10", tmp_path / "a", verify=False)
    assert b.train.images.shape == (40, 3, 32, 32) and b.val.images.shape == (8, 3, 32, 32)
    assert b.class_names[0] == "airplane" and b.num_classes == 10
    data, labels = batches["data_batch_2"]
    img = b.train.images[8 + 3]
    # Row layout: 1024 red, then green, then blue values, each 32x32 row-major.
    assert np.array_equal(img[0].numpy(), data[3, :1024].reshape(32, 32))
    assert np.array_equal(img[2].numpy(), data[3, 2048:].reshape(32, 32))
    assert b.train.labels[8 + 3].item() == labels[3]
    assert b.val.labels.tolist() == batches["test_batch"][1]
    # The .tar.gz itself (read without extracting).
    arch = tmp_path / "b"
    arch.mkdir()
    with tarfile.open(arch / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    b2 = load_dataset("cifar10", arch, verify=False)
    assert torch.equal(b2.train.images, b.train.images) and torch.equal(b2.val.labels, b.val.labels)
    # Not the official files: refused with verification on.
    with pytest.raises(DataError, match=r"batches\.meta fails its checksum"):
        load_dataset("cifar10", tmp_path / "a")
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz fails its checksum"):
        load_dataset("cifar10", arch)


def test_cifar_corrupt_and_missing(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    with open(folder / "data_batch_3", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d[b"labels"] = d[b"labels"][:-1]
    _cifar_dump(folder / "data_batch_3", d)
    with pytest.raises(DataError, match=r"wrong count: .*data_batch_3 has 8 images but 7 labels"):
        load_dataset("cifar10", tmp_path, verify=False)
    # A pickle that would run code is refused, not executed.
    (folder / "data_batch_3").write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    with pytest.raises(DataError, match=r"data_batch_3 is not a readable CIFAR python pickle"):
        load_dataset("cifar10", tmp_path, verify=False)
    assert not (tmp_path / "pwned").exists()
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3 is missing"):
        load_dataset("cifar10", tmp_path, verify=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"CIFAR-100 not found.*"
                                         r"https://www\.cs\.toronto\.edu/~kriz/cifar-100-python\.tar\.gz"
                                         r".*cifar-100-python/ folder"):
        load_dataset("cifar100", empty)


def test_cifar100_fine_and_coarse(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _cifar_dump(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                  b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    for member, n in (("train", 30), ("test", 10)):
        fine = [int(v) for v in rng.integers(0, 100, n)]
        _cifar_dump(folder / member, {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                      b"fine_labels": fine, b"coarse_labels": [v // 5 for v in fine],
                                      b"filenames": [b"x"] * n, b"batch_label": member.encode()})
    fine = load_dataset("cifar100", tmp_path, verify=False)
    coarse = load_dataset("cifar100", tmp_path, verify=False, label_mode="coarse")
    assert fine.num_classes == 100 and coarse.num_classes == 20 and coarse.class_names[19] == "c19"
    assert torch.equal(coarse.train.labels, fine.train.labels // 5)
    assert torch.equal(coarse.train.images, fine.train.images)


# ----------------------------------------------------------------------------------- imagefolder

_FLOWERS = {}


def _flowers(shared: Path):
    if "b" not in _FLOWERS:
        _FLOWERS["b"] = load_dataset("imagefolder", shared / "flowers5", cache=False)
    return _FLOWERS["b"]


def test_flowers5_imagefolder(shared_data):
    b = _flowers(shared_data)
    assert b.class_names == sorted(FLOWER_COUNTS) and b.num_classes == 5
    assert b.native_size == (128, 128) and b.train.images.shape[1:] == (3, 128, 128)
    assert b.meta["skipped"] == []  # .DS_Store is not an image and is not reported
    counts = torch.bincount(torch.cat([b.train.labels, b.val.labels]), minlength=5).tolist()
    assert counts == [FLOWER_COUNTS[c] for c in b.class_names]
    assert torch.bincount(b.val.labels, minlength=5).tolist() == [round(0.1 * FLOWER_COUNTS[c]) for c in b.class_names]
    # Pixel values: every val image is the PIL decode of one file of its class.
    cls = b.val.labels[0].item()
    decoded = {np.asarray(Image.open(p).convert("RGB")).tobytes()
               for p in sorted((shared_data / "flowers5" / b.class_names[cls]).glob("*.jpg"))}
    assert b.val.images[0].permute(1, 2, 0).numpy().tobytes() in decoded


def test_flowers5_split_is_seeded_and_cached(shared_data):
    root = shared_data / "flowers5"
    first = load_dataset("imagefolder", root, image_size=32, split_seed=0)
    again = load_dataset("imagefolder", root, image_size=32, split_seed=0)
    other = load_dataset("imagefolder", root, image_size=32, split_seed=1)
    assert again.meta["from_cache"]
    assert torch.equal(first.val.images, again.val.images) and torch.equal(first.train.labels, again.train.labels)
    assert not torch.equal(first.val.images, other.val.images)
    assert torch.equal(torch.bincount(first.val.labels), torch.bincount(other.val.labels))  # both stratified
    assert first.train.images.shape[1:] == (3, 32, 32)


def make_folder(root: Path, classes=("cat", "dog"), n=6, size=(10, 12), seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{i}.png")
            arrays[f"{c}/{i}.png"] = a
    return arrays


def test_imagefolder_values_sizes_and_cache(tmp_path):
    arrays = make_folder(tmp_path / "f")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "f" / "dog" / "big.png")  # another size
    (tmp_path / "f" / "dog" / "notes.txt").write_text("not an image")
    b = load_dataset("imagefolder", tmp_path / "f", val_fraction=0.25)
    assert b.native_size == (10, 12)  # the most common size
    stored = {x.permute(1, 2, 0).numpy().tobytes() for x in torch.cat([b.train.images, b.val.images])}
    assert all(a.tobytes() in stored for a in arrays.values())  # PNG is lossless: exact values
    assert len(b.train) + len(b.val) == 13 and b.class_names == ["cat", "dog"]
    assert not b.meta["from_cache"]
    again = load_dataset("imagefolder", tmp_path / "f", val_fraction=0.25)
    assert again.meta["from_cache"] and torch.equal(again.train.images, b.train.images)
    # Replacing a file invalidates the cache.
    Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(tmp_path / "f" / "cat" / "extra.png")
    third = load_dataset("imagefolder", tmp_path / "f", val_fraction=0.25)
    assert not third.meta["from_cache"] and len(third.train) + len(third.val) == 14
    grey = load_dataset("imagefolder", tmp_path / "f", image_size=(5, 6), in_chans=1, cache=False)
    assert grey.train.images.shape[1:] == (1, 5, 6)


def test_imagefolder_bad_images(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "cat" / "garbage.jpg").write_bytes(os.urandom(300))
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, "JPEG")
    (tmp_path / "dog" / "truncated.jpg").write_bytes(good.getvalue()[:400])
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with pytest.warns(UserWarning) as rec:
        b = load_dataset("imagefolder", tmp_path, val_fraction=0.25, cache=False)
    text = "\n".join(str(w.message) for w in rec)
    assert str(tmp_path / "cat" / "garbage.jpg") in text and str(tmp_path / "dog" / "truncated.jpg") in text
    assert "skipped 2 unreadable image file(s)" in text
    assert len(b.train) + len(b.val) == 12
    bad = [str(tmp_path / "cat" / "garbage.jpg"), str(tmp_path / "dog" / "truncated.jpg")]
    assert sorted(b.meta["skipped"]) == sorted(bad)
    with pytest.raises(DataError, match=r"cannot decode image .*cat/garbage\.jpg.*on_bad_image='skip'"):
        load_dataset("imagefolder", tmp_path, on_bad_image="error", cache=False)
    # The policy applies to cached results too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dataset("imagefolder", tmp_path, val_fraction=0.25)  # writes the cache
    with pytest.raises(DataError, match=r"garbage\.jpg"):
        load_dataset("imagefolder", tmp_path, val_fraction=0.25, on_bad_image="error")


def test_imagefolder_errors_and_train_val_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class sub-folders"):
        load_dataset("imagefolder", tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "x.txt").write_text("x")
    with pytest.raises(DataError, match=r"class folder .*noimg/a has no image files"):
        load_dataset("imagefolder", tmp_path / "noimg")
    with pytest.raises(DataError, match="imagefolder needs a folder"):
        load_dataset("imagefolder")
    make_folder(tmp_path / "s" / "train", classes=("a", "b", "c"), n=4)
    make_folder(tmp_path / "s" / "val", classes=("b", "c"), n=2, seed=1)
    b = load_dataset("imagefolder", tmp_path / "s", cache=False)
    assert (len(b.train), len(b.val), b.class_names) == (12, 4, ["a", "b", "c"])
    assert sorted(b.val.labels.tolist()) == [1, 1, 2, 2]  # val's own order remapped to train's classes
    make_folder(tmp_path / "s" / "val", classes=("zebra",), n=1)
    with pytest.raises(DataError, match="classes zebra that .*train lacks"):
        load_dataset("imagefolder", tmp_path / "s", cache=False)


# ----------------------------------------------------------------------------------- subsets, synthetic

def test_train_fraction_nested_and_stratified():
    full = load_dataset("synthetic", n_train=600, n_val=50, img_size=8, split_seed=5)
    keys = lambda ds: {x.numpy().tobytes() for x in ds.images}  # noqa: E731
    subsets = {f: load_dataset("synthetic", n_train=600, n_val=50, img_size=8, split_seed=5, train_fraction=f)
               for f in (0.1, 0.3)}
    assert len(keys(full.train)) == 600  # images are distinct, so sets identify samples
    assert keys(subsets[0.1].train) < keys(subsets[0.3].train) < keys(full.train)
    assert torch.bincount(subsets[0.1].train.labels).tolist() == [6] * 10
    assert torch.bincount(subsets[0.3].train.labels).tolist() == [18] * 10
    assert subsets[0.1].mean == full.mean and torch.equal(subsets[0.1].val.images, full.val.images)
    with pytest.raises(ConfigError, match="train_fraction"):
        load_dataset("digits", train_fraction=0.0)


def test_synthetic_is_learnable_and_seeded():
    b = load_dataset("synthetic", num_classes=4, img_size=16, in_chans=3, n_train=400, n_val=200)
    assert b.train.images.shape == (400, 3, 16, 16) and b.num_classes == 4
    assert torch.equal(b.train.images, load_dataset("synthetic", num_classes=4, img_size=16, n_train=400,
                                                    n_val=200).train.images)
    # A nearest-class-mean classifier far above chance proves there is class structure to learn.
    x, y = b.train.images.flatten(1).float(), b.train.labels
    centroids = torch.stack([x[y == c].mean(0) for c in range(4)])
    pred = torch.cdist(b.val.images.flatten(1).float(), centroids).argmin(1)
    assert (pred == b.val.labels).float().mean() > 0.8


def test_dataset_protocol():
    b = load_dataset("synthetic", n_train=10, n_val=5, img_size=4)
    img, label = b.train[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 4, 4) and isinstance(label, int)
    sub = b.train.subset([4, 1])
    assert len(sub) == 2 and torch.equal(sub.images[0], b.train.images[4]) and sub.labels[1] == b.train.labels[1]
    loader = torch.utils.data.DataLoader(b.train, batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 4, 4) and yb.dtype == torch.int64
