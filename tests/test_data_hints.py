"""A missing data set says where its files come from, whichever way the folder was named."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vitlab.cli import main
from vitlab.data import load_dataset
from vitlab.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
APT = "apt-get install -y dataset-fashion-mnist"


@pytest.fixture
def no_data_anywhere(tmp_path, monkeypatch):
    """No VITLAB_DATA, an empty working folder and home: only the system places remain."""
    monkeypatch.delenv("VITLAB_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _error_of(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_fashion_mnist_config_without_the_data_gives_the_apt_hint(no_data_anywhere, capsys):
    config = ROOT / "configs" / "fashion_mnist.yaml"
    argv = ["train", "--config", str(config)]
    if Path(yaml.safe_load(config.read_text())["data_dir"]).is_dir():  # the data is installed here: name
        argv.append(f"data_dir={no_data_anywhere / 'missing'}")      # a missing folder the same way
    err = _error_of(argv, capsys)
    assert "does not exist" in err and APT in err


def test_dataset_flag_without_the_data_gives_the_same_hint(no_data_anywhere, capsys):
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST is installed in /usr/share/datasets: nothing is missing")
    err = _error_of(["train", "--dataset", "fashion-mnist"], capsys)
    assert "files not found" in err and APT in err


@pytest.mark.parametrize("name,hint", [("fashion-mnist", APT), ("mnist", "yann.lecun.com"),
                                       ("cifar10", "cifar-10-python.tar.gz")])
def test_missing_data_dir_names_where_the_files_come_from(tmp_path, name, hint):
    with pytest.raises(DataError, match="does not exist") as e:
        load_dataset(name, tmp_path / "missing")
    assert hint in str(e.value)
