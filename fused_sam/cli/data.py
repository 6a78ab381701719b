"""Small image-classification data sets for the demo, and symmetric label noise.

* ``digits``: scikit-learn's handwritten digits (1797 grey 8x8 images, 10 classes). It ships
  inside scikit-learn, so nothing is downloaded.
* ``cifar10`` / ``cifar100``: read from a local folder in the standard python-pickle format
  (``cifar-10-batches-py``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
  ``batches.meta``; ``cifar-100-python``: ``train``, ``test``, ``meta``). Nothing is downloaded
  either: point ``data_dir`` at the extracted folder (or its parent).

Every loader returns a :class:`Dataset` of float32 ``N x C x H x W`` images standardised with the
training split's per-channel mean and std, and int64 labels.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "add_symmetric_noise",
    "load_cifar",
    "load_dataset",
    "load_digits",
]

#: Names accepted by :func:`load_dataset` (and by ``fused-sam demo --data``).
DATASETS = ("digits", "cifar10", "cifar100")

_CIFAR_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": b"labels",
        "classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": b"fine_labels",
        "classes": 100,
    },
}


class DataError(RuntimeError):
    """A data set cannot be loaded; the message says what is missing or malformed."""


@dataclass
class Dataset:
    """Train and test tensors of one image-classification data set.

    Attributes:
        name: data set name.
        x_train: ``N x C x H x W`` float32 training images (standardised).
        y_train: ``N`` int64 training labels.
        x_test: test images, standardised with the training statistics.
        y_test: test labels.
        num_classes: number of classes.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


def _standardise(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x_train - mean) / std, (x_test - mean) / std


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> Dataset:
    """scikit-learn's handwritten digits, split into train and test (stratified).

    Args:
        test_fraction: fraction of the 1797 images held out as the test split.
        seed: seed of the split (fixed, so every method and seed sees the same test set).

    Raises:
        ImportError: scikit-learn is not installed (``pip install "fused_sam[demo]"``).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(
            'the digits data set needs scikit-learn: pip install "fused_sam[demo]"'
        ) from exc
    bunch = sk_load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.images,
        bunch.target,
        test_size=test_fraction,
        random_state=seed,
        stratify=bunch.target,
    )

    def images(a: object) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float32).unsqueeze(1) / 16.0

    x_train, x_test = _standardise(images(x_tr), images(x_te))
    return Dataset(
        "digits",
        x_train,
        torch.as_tensor(y_tr, dtype=torch.int64),
        x_test,
        torch.as_tensor(y_te, dtype=torch.int64),
        10,
    )


def _read_batch(path: Path, label_key: bytes) -> tuple[Tensor, Tensor]:
    import numpy as np  # the pickled batches hold numpy arrays

    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        with path.open("rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except Exception as exc:
        raise DataError(f"{path} is not a python-pickle CIFAR batch: {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"{path} is malformed: expected a dict with keys b'data' and {label_key!r}, got {keys}"
        )
    data = torch.as_tensor(np.asarray(batch[b"data"]))
    labels = torch.as_tensor(list(batch[label_key]), dtype=torch.int64)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{path} is malformed: b'data' must be uint8 of shape N x 3072, "
            f"got {data.dtype} {tuple(data.shape)}"
        )
    if labels.numel() != data.shape[0]:
        raise DataError(f"{path} is malformed: {data.shape[0]} images but {labels.numel()} labels")
    return data.reshape(-1, 3, 32, 32).float() / 255.0, labels


def load_cifar(name: str, data_dir: str | Path) -> Dataset:
    """CIFAR-10 or CIFAR-100 from a local folder in the python-pickle format.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or the
            folder that contains it.

    Raises:
        DataError: the folder or one of its files is missing or malformed.
    """
    if name not in _CIFAR_LAYOUT:
        raise ValueError(f"unknown CIFAR variant {name!r}; choose cifar10 or cifar100")
    layout = _CIFAR_LAYOUT[name]
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{name}: data folder {root} does not exist; download and extract the python "
            f"version of {name} and pass --data-dir to the extracted '{layout['folder']}' folder"
        )
    if (root / layout["folder"]).is_dir():
        root = root / layout["folder"]
    if not (root / layout["meta"]).is_file():
        expected = ", ".join([*layout["train"], *layout["test"], layout["meta"]])
        raise DataError(
            f"{name}: {root} does not look like a {name} python folder (expected {expected})"
        )
    parts = {
        split: [_read_batch(root / f, layout["label_key"]) for f in layout[split]]
        for split in ("train", "test")
    }
    x_train = torch.cat([x for x, _ in parts["train"]])
    y_train = torch.cat([y for _, y in parts["train"]])
    x_test = torch.cat([x for x, _ in parts["test"]])
    y_test = torch.cat([y for _, y in parts["test"]])
    classes = layout["classes"]
    for split, y in (("train", y_train), ("test", y_test)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise DataError(f"{name}: {split} labels outside 0..{classes - 1} in {root}")
    x_train, x_test = _standardise(x_train, x_test)
    return Dataset(name, x_train, y_train, x_test, y_test, classes)


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load one of :data:`DATASETS` (``data_dir`` is required for the CIFAR ones)."""
    if name == "digits":
        return load_digits()
    if name in _CIFAR_LAYOUT:
        if data_dir is None:
            raise DataError(f"--data {name} needs --data-dir (the folder with the python batches)")
        return load_cifar(name, data_dir)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def add_symmetric_noise(
    labels: Tensor, rate: float, num_classes: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Symmetric label noise: relabel exactly ``round(rate * N)`` examples to a wrong class.

    The corrupted examples are drawn uniformly without replacement and each gets a class drawn
    uniformly from the ``num_classes - 1`` wrong ones, so exactly a fraction ``rate`` of the
    labels is wrong.

    Args:
        labels: clean int64 labels.
        rate: fraction in ``[0, 1)`` of labels to corrupt.
        num_classes: number of classes.
        generator: random source (fixed seed for reproducible noise).

    Returns:
        ``(noisy_labels, corrupted)``, where ``corrupted`` is a bool mask of the changed labels.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    n = labels.numel()
    flip = torch.randperm(n, generator=generator)[: round(rate * n)]
    offset = torch.randint(1, num_classes, (flip.numel(),), generator=generator)
    noisy = labels.clone()
    noisy[flip] = (labels[flip] + offset) % num_classes
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[flip] = True
    return noisy, corrupted
