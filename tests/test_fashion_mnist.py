"""Fashion-MNIST offline: Debian's dataset-fashion-mnist package (skipped where it is not installed), torchvision's
folder layout (idx files made here), --image_size, the stratified --subset, and both scripts end to end."""
import gzip
import json
import os

import numpy as np
import pytest

from plumbing import datasets
from conftest import run_script
from plumbing.datasets import FASHION_MNIST_SYSTEM, DataError, load_dataset, subset, targets_of

installed = pytest.mark.skipif(
    not all(os.path.isfile(os.path.join(FASHION_MNIST_SYSTEM, f"{s}.gz")) for s in datasets._IDX_STEMS),
    reason=f"Debian's dataset-fashion-mnist is not installed ({FASHION_MNIST_SYSTEM}); "
           f"apt-get install dataset-fashion-mnist")


def _write_idx(path, array, gz):
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open(path + ".gz", "wb") if gz else open(path, "wb")) as f:
        f.write(data)


def _torchvision_layout(root, n_train=60, n_test=20, gz=False):
    """<root>/FashionMNIST/raw/ with small idx files: 10 classes, image i of class i % 10 filled with i % 256."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.stack([np.full((28, 28), i % 256) for i in range(n)])
        _write_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), images, gz)
        _write_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), np.arange(n) % 10, gz)
    return raw


@installed
def test_the_package_folder_and_the_default_data_find_the_installed_files():
    train, info = load_dataset("fashion_mnist", FASHION_MNIST_SYSTEM, train=True)
    test, _ = load_dataset("fashion_mnist", "./data", train=False)  # the default --data falls back to the package
    assert (len(train), len(test)) == (60000, 10000)
    assert (info.in_channels, info.num_classes, info.image_size) == (1, 10, 28)
    assert np.bincount(targets_of(test)).tolist() == [1000] * 10
    x = test.tensors[0]
    assert x.shape == (10000, 1, 28, 28)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05  # normalized with the set's own stats


@pytest.mark.parametrize("gz", [False, True])
def test_torchvision_layout_gzipped_or_not_and_image_size(tmp_path, gz):
    _torchvision_layout(str(tmp_path), gz=gz)
    before = sorted(os.listdir(tmp_path / "FashionMNIST" / "raw"))
    train, info = load_dataset("fashion_mnist", str(tmp_path), train=True, augment=False, image_size=14)
    test, _ = load_dataset("fashion_mnist", str(tmp_path), train=False)
    assert (len(train), len(test), info.image_size) == (60, 20, 14)
    x, y = train[13]
    assert tuple(x.shape) == (1, 14, 14) and int(y) == 3
    assert float(x.max() - x.min()) < 1e-5  # a flat image stays flat through the area resize
    assert abs(float(x[0, 0, 0]) - (13 / 255 - 0.2860) / 0.3530) < 1e-5
    assert sorted(os.listdir(tmp_path / "FashionMNIST" / "raw")) == before  # nothing unpacked or written


def test_augmented_training_images_keep_their_shape(tmp_path):
    _torchvision_layout(str(tmp_path))
    train, _ = load_dataset("fashion_mnist", str(tmp_path), train=True, cutout=4)
    assert all(tuple(train[i][0].shape) == (1, 28, 28) for i in range(10))


def test_no_files_is_one_line_naming_the_package_and_the_folder(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise RuntimeError("offline")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", str(tmp_path), train=True)
    msg = str(e.value)
    assert "\n" not in msg and "dataset-fashion-mnist" in msg and FASHION_MNIST_SYSTEM in msg
    assert os.path.join(str(tmp_path), "FashionMNIST", "raw") in msg


def test_a_truncated_idx_file_is_a_data_error(tmp_path):
    raw = _torchvision_layout(str(tmp_path))
    path = os.path.join(raw, "t10k-images-idx3-ubyte")
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion_mnist", str(tmp_path), train=False)


def test_subset_is_stratified_seeded_and_checked(tmp_path):
    _torchvision_layout(str(tmp_path), n_train=200)
    train, _ = load_dataset("fashion_mnist", str(tmp_path), train=True)
    a, b, c = subset(train, 50, 0), subset(train, 50, 0), subset(train, 50, 1)
    assert np.bincount(targets_of(a)).tolist() == [5] * 10
    assert a.indices == b.indices and a.indices != c.indices
    assert subset(train, None) is train
    for bad in (5, 200):
        with pytest.raises(DataError, match="--subset"):
            subset(train, bad)


@pytest.mark.slow
def test_both_scripts_record_subset_and_image_size(tmp_path):
    _torchvision_layout(str(tmp_path / "data"), n_train=200, n_test=40, gz=True)
    common = ["--dataset", "fashion_mnist", "--data", str(tmp_path / "data"), "--subset", "100", "--image_size", "8",
              "--epochs", "1", "--log_dir", str(tmp_path), "--wandb", "disabled", "--threads", "1"]
    res = run_script("train_search.py", "--space", "nb201", "--init_channels", "4", "--layers", "1",
                     "--run_name", "s", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.load(open(tmp_path / "s" / "genotype.json"))["meta"]
    assert (meta["subset"], meta["subset_seed"], meta["image_size"], meta["dataset"]) == (100, 0, 8, "fashion_mnist")
    assert json.load(open(tmp_path / "s" / "args.json"))["subset"] == 100
    res = run_script("train.py", "--genotype", str(tmp_path / "s" / "genotype.json"), "--init_channels", "4",
                     "--layers", "1", "--batch_size", "32", "--run_name", "t", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.load(open(tmp_path / "t" / "args.json"))["subset"] == 100
    summary = json.load(open(tmp_path / "t" / "summary.json"))
    assert 0 <= summary["test_acc"] <= 100 and summary["energy_mj"] > 0
