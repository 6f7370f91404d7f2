"""Data sets for both scripts: torchvision's CIFARs and MNISTs, a user's ImageFolder, ImageNet, and the
embedded default, scikit-learn's `digits` (8x8 grey images, 1,797 of them, no download).

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

import distributed
from cliargs import CLIError

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


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
    """The train (or test) split of `name` and its DataInfo. ImageFolder layouts use train/ and val/."""
    if name == "digits":
        return _digits(train, cutout), DataInfo(1, 10, 8)
    if name in _TV:
        _, _, _, ch, classes, size, _ = _TV[name]
        return _torchvision(name, root, train, augment, cutout), DataInfo(ch, classes, size)
    if name in ("imagefolder", "imagenet"):
        size = image_size or (224 if name == "imagenet" else 32)
        ds = _image_folder(root, "train" if train else "val", train, size, augment, cutout, name == "imagenet")
        return ds, DataInfo(3, len(ds.classes), size)
    raise DataError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")


def targets_of(ds: Dataset) -> np.ndarray:
    """Labels of a data set without loading its images (for stratified splits)."""
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
    """DARTS's bilevel split of the training set: the first `train_portion` for the weights, the rest for
    the alphas; both shuffled every epoch (by the global torch RNG, so seeds and resumes reproduce it)."""
    from torch.utils.data import SubsetRandomSampler
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


def known_info(name: str) -> Optional[DataInfo]:
    """DataInfo of the built-in data sets without loading them (None for folders of a user's images)."""
    if name == "digits":
        return DataInfo(1, 10, 8)
    if name in _TV:
        _, _, _, ch, classes, size, _ = _TV[name]
        return DataInfo(ch, classes, size)
    if name == "imagenet":
        return DataInfo(3, 1000, 224)
    return None


def eval_loaders(train_data, plain_train, test_data, args, device):
    """Loaders of train.py: the whole training split (less a stratified `valid_portion` held out, read without
    augmentation from `plain_train`) and the test split."""
    from sklearn.model_selection import train_test_split
    from torch.utils.data import Subset
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
