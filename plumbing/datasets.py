"""Data sets for both scripts: torchvision's CIFARs, (Fashion-)MNIST read from their idx files, a user's
ImageFolder, ImageNet, and the embedded default, scikit-learn's `digits` (8x8 grey images, 1,797 of them, no
download).

Fashion-MNIST works offline from Debian's `dataset-fashion-mnist` package (`FASHION_MNIST_SYSTEM`), which the
default `--data` falls back to, or from torchvision's layout (`<data>/FashionMNIST/raw/`); the idx files are read
as they are (gzipped or not), so nothing is unpacked or written. `--image_size` resizes the MNISTs once at load
time (area averaging); `subset()` draws a stratified, seeded part of a training split.

`digits` has a fixed, stratified split (`DIGITS_TEST_FRACTION` = 20 %, `random_state=0`): 1,437 training images
(the only ones a search sees) and 360 test images (what `train.py` reports on).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from plumbing import distributed
from plumbing.cliargs import CLIError

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DEFAULT_DATA = "./data"
FASHION_MNIST_SYSTEM = "/usr/share/datasets/fashion-mnist"  # Debian: apt-get install dataset-fashion-mnist


@dataclass(frozen=True)
class DataInfo:
    """What the networks need to know about a data set: they build their stem and head from it."""
    in_channels: int
    num_classes: int
    image_size: int


class DataError(CLIError):
    """A data set that cannot be loaded; the message says where to put the files."""


class Cutout:
    """Zero a random square of side `length` (clipped at the borders) in a CxHxW tensor (DeVries & Taylor)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        y, x = np.random.randint(h), np.random.randint(w)
        y1, y2 = max(0, y - self.length // 2), min(h, y + self.length // 2)
        x1, x2 = max(0, x - self.length // 2), min(w, x + self.length // 2)
        img = img.clone()
        img[..., y1:y2, x1:x2] = 0.0
        return img


class TransformedTensors(Dataset):
    """A tensor data set with a per-sample transform (digits' cutout)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform=None) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        img = self.x[i]
        return (self.transform(img) if self.transform else img), self.y[i]


def _digits(train: bool, cutout: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=DIGITS_TEST_FRACTION,
                                              random_state=DIGITS_SPLIT_SEED, stratify=d.target)
    x, y = (x_tr, y_tr) if train else (x_te, y_te)
    x, y = torch.from_numpy(x).unsqueeze(1).contiguous(), torch.from_numpy(y).long()
    if train and cutout > 0:
        return TransformedTensors(x, y, Cutout(cutout))
    return TensorDataset(x, y)


_TV = {  # name: (torchvision class, mean, std, channels, classes, size, folder it creates)
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 3, 10, 32, "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 3, 100, 32, "cifar-100-python"),
    "mnist": ("MNIST", (0.1307,), (0.3081,), 1, 10, 28, "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", (0.2860,), (0.3530,), 1, 10, 28, "FashionMNIST/raw"),
}

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "imagenet")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _torchvision(name: str, root: str, train: bool, augment: bool, cutout: int):
    import torchvision
    import torchvision.transforms as T
    cls, mean, std, _, _, size, folder = _TV[name]
    steps = []
    if train and augment:
        steps += [T.RandomCrop(size, padding=4)] + ([T.RandomHorizontalFlip()] if name.startswith("cifar") else [])
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if train and cutout > 0:
        steps.append(Cutout(cutout))
    try:
        return getattr(torchvision.datasets, cls)(root=root, train=train, download=True, transform=T.Compose(steps))
    except (RuntimeError, OSError) as e:  # URLError is an OSError
        raise DataError(f"{name} is not in {os.path.abspath(root)} and could not be downloaded ({type(e).__name__}); "
                        f"download it once online, or put its files in {os.path.join(root, folder)}") from None


def _idx_array(path: str, dims: int) -> np.ndarray:
    """The array in an idx file (gzipped or not) of `dims` dimensions, unsigned bytes; DataError if it is not one."""
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"unreadable idx file {path} ({type(e).__name__}); reinstall or download it again") from None
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
    if magic != 0x800 + dims:  # 0x08: unsigned byte, then the number of dimensions
        raise DataError(f"{path} is not an idx file of {dims}-d unsigned bytes; reinstall or download it again")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    start, count = 4 + 4 * dims, int(np.prod(shape))
    if len(data) != start + count:
        raise DataError(f"{path} holds {len(data) - start} bytes of data, its header says {count}: truncated?")
    return np.frombuffer(data, np.uint8, count, start).reshape(shape)


def idx_folder(name: str, root: str) -> Optional[str]:
    """The folder holding the four idx files of `name` (mnist, fashion_mnist): `root`, torchvision's
    `root/<Class>/raw`, and, for Fashion-MNIST under the default `--data`, Debian's package folder."""
    folder = _TV[name][6]
    candidates = [root, os.path.join(root, folder)]
    if name == "fashion_mnist" and os.path.normpath(root) == os.path.normpath(DEFAULT_DATA):
        candidates.append(FASHION_MNIST_SYSTEM)
    for c in candidates:
        if all(_idx_file(c, stem) for stem in _IDX_STEMS):
            return c
    return None


_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


def _idx_file(folder: str, stem: str) -> Optional[str]:
    for path in (os.path.join(folder, stem), os.path.join(folder, stem + ".gz")):
        if os.path.isfile(path):
            return path
    return None


class RandomShift:
    """Pad by `padding` with `fill`, then crop back to the original size at a random offset (RandomCrop on a
    tensor: torchvision's padded crop of the MNISTs, without a trip through PIL)."""

    def __init__(self, padding: int, fill: float) -> None:
        self.padding, self.fill = padding, fill

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        p = self.padding
        h, w = img.shape[-2:]
        y, x = np.random.randint(2 * p + 1), np.random.randint(2 * p + 1)
        padded = torch.nn.functional.pad(img, (p, p, p, p), value=self.fill)
        return padded[..., y:y + h, x:x + w]


def _mnist(name: str, root: str, train: bool, augment: bool, cutout: int, image_size: Optional[int]):
    """(Fashion-)MNIST from its idx files as one tensor, normalized and resized once; augmentation (padded random
    crop, cutout) per sample. Downloads through torchvision only when no local copy is found."""
    _, mean, std, _, _, size, folder = _TV[name]
    where = idx_folder(name, root)
    if where is None:
        where = _download(name, root)
    split = "train" if train else "t10k"
    images = _idx_array(_idx_file(where, f"{split}-images-idx3-ubyte"), 3)
    labels = _idx_array(_idx_file(where, f"{split}-labels-idx1-ubyte"), 1)
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} {split} images but {len(labels)} labels; reinstall the files")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    size = image_size or size
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area" if size < x.shape[-1] else "bilinear")
    x = ((x - mean[0]) / std[0]).contiguous()
    y = torch.from_numpy(labels.astype(np.int64))
    steps = []
    if train and augment:
        steps.append(RandomShift(max(1, round(4 * size / 28)), -mean[0] / std[0]))
    if train and cutout > 0:
        steps.append(Cutout(cutout))
    if not steps:
        return TensorDataset(x, y)
    from torchvision.transforms import Compose
    return TransformedTensors(x, y, Compose(steps))


def _download(name: str, root: str) -> str:
    """torchvision's download of an MNIST into `root` (online only); a DataError naming the offline routes."""
    import torchvision
    cls, folder = _TV[name][0], _TV[name][6]
    try:
        getattr(torchvision.datasets, cls)(root=root, train=True, download=True)
    except (RuntimeError, OSError) as e:  # URLError is an OSError
        system = name == "fashion_mnist" and os.path.normpath(root) == os.path.normpath(DEFAULT_DATA)
        raise DataError(f"{name}: no idx files in {root} or {os.path.join(root, folder)}"
                        + (f" or {FASHION_MNIST_SYSTEM}" if system else "")
                        + f", and the download failed ({type(e).__name__}); "
                        + ("install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist puts them "
                           f"in {FASHION_MNIST_SYSTEM}: --data {FASHION_MNIST_SYSTEM}), or " if name == "fashion_mnist"
                           else "")
                        + f"put the four *-ubyte.gz files in {os.path.join(root, folder)}") from None
    return os.path.join(root, folder)


def _image_folder(root: str, split: str, train: bool, size: int, augment: bool, cutout: int, imagenet: bool):
    import torchvision
    import torchvision.transforms as T
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"no folder {folder}: put images in {root}/train/<class>/ and {root}/val/<class>/")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if imagenet and train and augment:
        steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
                 T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)]
    elif imagenet:
        steps = [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
    elif train and augment:
        steps = [T.Resize((size, size)), T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize((size, size))]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if train and cutout > 0:
        steps.append(Cutout(cutout))
    try:
        ds = torchvision.datasets.ImageFolder(folder, transform=T.Compose(steps), loader=_load_image)
    except (FileNotFoundError, RuntimeError, OSError) as e:
        raise DataError(f"{folder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if train and len(ds.classes) < 2:
        raise DataError(f"{folder} holds {len(ds.classes)} class folder(s): a classifier needs at least two "
                        f"(one sub-folder per class)")
    return ds


def _load_image(path: str):
    """An RGB image; an unreadable or corrupt file is a DataError naming it (raised when the loader reaches it)."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"unreadable image {path} ({type(e).__name__}); remove or replace it") from None


def load_dataset(name: str, root: str, train: bool, augment: bool = True, cutout: int = 0,
                 image_size: Optional[int] = None) -> Tuple[Dataset, DataInfo]:
    """The train (or test) split of `name` and its DataInfo. ImageFolder layouts use train/ and val/;
    `image_size` applies to the MNISTs and image folders."""
    if name == "digits":
        return _digits(train, cutout), DataInfo(1, 10, 8)
    if name in ("mnist", "fashion_mnist"):
        _, _, _, ch, classes, size, _ = _TV[name]
        return _mnist(name, root, train, augment, cutout, image_size), DataInfo(ch, classes, image_size or size)
    if name in _TV:
        _, _, _, ch, classes, size, _ = _TV[name]
        return _torchvision(name, root, train, augment, cutout), DataInfo(ch, classes, size)
    if name in ("imagefolder", "imagenet"):
        size = image_size or (224 if name == "imagenet" else 32)
        ds = _image_folder(root, "train" if train else "val", train, size, augment, cutout, name == "imagenet")
        return ds, DataInfo(3, len(ds.classes), size)
    raise DataError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")


RESIZABLE = ("mnist", "fashion_mnist", "imagefolder", "imagenet")  # data sets that take --image_size


def subset(ds: Dataset, n: Optional[int], seed: int = 0) -> Dataset:
    """A stratified subset of `n` samples of a training split, drawn with `seed` (the whole split for None)."""
    if n is None:
        return ds
    from sklearn.model_selection import train_test_split
    from torch.utils.data import Subset
    targets = targets_of(ds)
    classes = len(np.unique(targets))
    if not classes <= n < len(ds):
        raise DataError(f"--subset {n}: give between {classes} (one per class) and {len(ds) - 1} of the "
                        f"{len(ds)} training images")
    idx, _ = train_test_split(np.arange(len(ds)), train_size=n, random_state=seed, stratify=targets)
    return Subset(ds, sorted(idx.tolist()))


def split_meta(args) -> dict:
    """What a genotype's meta records of the data a search saw beyond its name: --image_size, --subset."""
    return {**({"image_size": args.image_size} if args.image_size else {}),
            **({"subset": args.subset, "subset_seed": args.subset_seed} if args.subset is not None else {})}


def targets_of(ds: Dataset) -> np.ndarray:
    """Labels of a data set without loading its images (for stratified splits)."""
    from torch.utils.data import Subset
    if isinstance(ds, Subset):
        return targets_of(ds.dataset)[np.asarray(ds.indices)]
    if isinstance(ds, (TensorDataset,)):
        return ds.tensors[1].numpy()
    if isinstance(ds, TransformedTensors):
        return ds.y.numpy()
    if hasattr(ds, "targets"):
        return np.asarray(ds.targets)
    return np.asarray([ds[i][1] for i in range(len(ds))])


def _loader(ds, batch_size: int, workers: int, device, sampler=None, shuffle: bool = False, drop_last=False,
            random: bool = True):
    """A DataLoader whose draws a resume reproduces. Every iterator draws its workers' base seed from the torch
    RNG (the checkpoint restores it), so a loader that draws (`random`: shuffling, augmentation) starts its workers
    afresh each epoch: a resumed run then sees the same samples and augmentations as an uninterrupted one (with
    persistent workers the streams of the epochs before a resume would be lost). A loader that draws nothing
    (evaluation) keeps its workers, and its seed comes from a generator of its own, so that building its iterator
    once, at whichever epoch, never moves the run's RNG."""
    from torch.utils.data import DataLoader
    keep = workers > 0 and not random
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=shuffle, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=drop_last, persistent_workers=keep,
                      generator=torch.Generator().manual_seed(0) if keep else None)


def search_loaders(train_data, args, device):
    """DARTS's bilevel split of the training set (its --subset): the first `train_portion` for the weights, the
    rest for the alphas; both shuffled every epoch (by the global torch RNG, so seeds and resumes reproduce it)."""
    from torch.utils.data import SubsetRandomSampler
    train_data = subset(train_data, getattr(args, "subset", None), getattr(args, "subset_seed", 0))
    n = len(train_data)
    split = int(math.floor(args.train_portion * n))
    if split < 1 or split >= n:
        raise DataError(f"--train_portion {args.train_portion} leaves an empty half of {n} training images")
    idx = list(range(n))
    # --compile on CUDA runs CUDA graphs of one batch shape: the last partial batch is dropped, not recompiled
    drop = bool(getattr(args, "compile", False)) and device.type == "cuda"
    if distributed.enabled():  # torchrun: each rank reads its own share of each half (set_epoch reshuffles)
        from torch.utils.data import Subset
        halves = [Subset(train_data, idx[:split]), Subset(train_data, idx[split:])]
        return tuple(_loader(h, args.batch_size, args.workers, device, distributed.train_sampler(h, args.seed),
                             drop_last=drop) for h in halves)
    train = _loader(train_data, args.batch_size, args.workers, device, SubsetRandomSampler(idx[:split]),
                    drop_last=drop)
    valid = _loader(train_data, args.batch_size, args.workers, device, SubsetRandomSampler(idx[split:]),
                    drop_last=drop)
    return train, valid


def known_info(name: str, image_size: Optional[int] = None) -> Optional[DataInfo]:
    """DataInfo of the built-in data sets without loading them (None for folders of a user's images);
    `image_size` for the MNISTs resized by --image_size."""
    if name == "digits":
        return DataInfo(1, 10, 8)
    if name in _TV:
        _, _, _, ch, classes, size, _ = _TV[name]
        return DataInfo(ch, classes, (image_size if name in RESIZABLE else None) or size)
    if name == "imagenet":
        return DataInfo(3, 1000, 224)
    return None


def eval_loaders(train_data, plain_train, test_data, args, device):
    """Loaders of train.py: the whole training split (or its --subset; less a stratified `valid_portion` held out,
    read without augmentation from `plain_train`) and the test split."""
    from sklearn.model_selection import train_test_split
    from torch.utils.data import Subset
    n, seed = getattr(args, "subset", None), getattr(args, "subset_seed", 0)
    train_data = subset(train_data, n, seed)  # the same draw from both copies
    plain_train = subset(plain_train, n, seed) if plain_train is not None else None
    valid = None
    if args.valid_portion:
        idx = np.arange(len(train_data))
        tr_idx, va_idx = train_test_split(idx, test_size=args.valid_portion, random_state=0,
                                          stratify=targets_of(train_data))
        train_data = Subset(train_data, sorted(tr_idx.tolist()))
        valid = Subset(plain_train, sorted(va_idx.tolist()))
        valid = _loader(valid, args.batch_size, args.workers, device, _shard(valid), random=False)
    sampler = distributed.train_sampler(train_data, args.seed)  # None without torchrun
    train = _loader(train_data, args.batch_size, args.workers, device, sampler, shuffle=sampler is None)
    test = _loader(test_data, args.batch_size, args.workers, device, _shard(test_data), random=False)
    return train, valid, test


def _shard(ds):
    """Under torchrun each rank evaluates its own share (no padding: the averaged metrics are exact)."""
    return distributed.ShardSampler(len(ds)) if distributed.enabled() else None
